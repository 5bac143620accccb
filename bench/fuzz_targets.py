"""What ``bench.fuzz`` feeds its inputs to, shared with tests/sr_tf/io/test_untrusted_inputs.py.

A target is a reader of ``sr_tf.io.readers``, or ``sr_tf.upscaling.load``, called on one
file path, with the error it names for an input it refuses (``detect_format`` names
none: it answers every input).
"""

import functools
import os

TARGETS = ("detect_format", "read_dicom_header", "read_dicom", "read_dicom_series", "read_nifti", "read_raster", "load")


def read_header(path):
    """``read_dicom_header``, then the series sort key the conversion computes from it."""
    from sr_tf.io import readers

    readers.series_sort_key(readers.read_dicom_header(path), path)


def read_series(path):
    """``read_dicom_series`` over the input, then a sound slice; the failure it reports for
    the input is raised, as read_dicom would raise it."""
    from pydicom.data import get_testdata_file

    from sr_tf.io import readers

    _, failures = readers.read_dicom_series([path, os.fspath(get_testdata_file("CT_small.dcm"))])
    for failed, reason in failures:
        if failed == path:
            raise readers.InputError(reason)


@functools.cache
def targets():
    """name -> (call(path), named error or None, seed kinds, whether the input file is named
    by its content: .dcm, .nii, .nii.gz, .png, .tif, .jpg).

    sr_tf is imported when this is first called, so that a fuzzing process imports it
    instrumented."""
    from sr_tf import upscaling
    from sr_tf.io import readers

    every = ("dicom", "nifti", "raster")
    return {
        "detect_format": (readers.detect_format, None, every, False),  # no extension: the preamble decides
        "read_dicom_header": (read_header, readers.InputError, ("dicom",), True),
        "read_dicom": (readers.read_dicom, readers.InputError, ("dicom",), True),
        "read_dicom_series": (read_series, readers.InputError, ("dicom",), True),
        "read_nifti": (functools.partial(readers.read_nifti, volume_index="all"), readers.InputError, ("nifti",), True),
        "read_raster": (readers.read_raster, readers.InputError, ("raster",), True),
        "load": (upscaling.load, upscaling.UpscaleError, every, True),
    }
