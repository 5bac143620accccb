"""Shared test set-up: quiet TensorFlow, Keras on the TF backend, real sample files."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def testdata():
    """Path of a DICOM file shipped with pydicom or pydicom-data, by name."""
    from pydicom.data import get_testdata_file

    def _get(name):
        path = get_testdata_file(name)
        if path is None:
            raise FileNotFoundError(f"{name} is not in pydicom / pydicom-data")
        return os.fspath(path)

    return _get
