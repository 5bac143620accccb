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


@pytest.fixture
def png_bomb():
    """Writes a small PNG whose header claims ``side`` x ``side`` 8-bit pixels (a
    decompression bomb): the first rows' data only, since a header is all a guard reads."""
    import zlib

    def chunk(kind, payload):
        return len(payload).to_bytes(4, "big") + kind + payload + zlib.crc32(kind + payload).to_bytes(4, "big")

    def write(path, side=32000):
        header = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
        body = zlib.compress(b"\x00" * (side + 1) * 30, 9)
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
        return path

    return write
