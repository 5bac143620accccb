"""Inputs made to break the readers: the failures the fuzzer found (tests/data/fuzz, saved
by ``python -m bench.fuzz``) and decompression bombs: PNG, TIFF, DICOM and NIfTI files
whose headers claim far more pixels than they hold, refused before anything is decoded."""

import glob
import gzip
import os
import struct
import tracemalloc
import zlib

import nibabel as nib
import numpy as np
import pydicom
import pytest

from bench import fuzz_targets
from tests import ROOT
from sr_tf import upscaling
from sr_tf.io import readers

FUZZ_DATA = os.path.join(ROOT, "tests", "data", "fuzz")
SAVED = sorted(os.path.relpath(p, FUZZ_DATA) for p in glob.glob(os.path.join(FUZZ_DATA, "*", "*")))
# Saved inputs that once made their target fail and that it now reads, and why reading them is right.
READ = {
    "read_dicom/d0fc02c54db5.dcm": "a JPEG Baseline stream with a stray byte before a marker and entropy data "
                                   "cut short: Pillow's libjpeg decodes it, with a warning, as it would outside "
                                   "DICOM (GDCM ended the process on it)",
    "read_dicom_header/a256f7687e8b.dcm": "an element claims 4 GB where the file ends: pydicom reads what there is "
                                          "(it first allocated the 4 GB)",
    "read_dicom_header/d8a6e8010188.dcm": "an empty InstanceNumber and no position: it sorts in its series as "
                                          "number 0, as a file without one does",
}
MEMORY_LIMIT = 256 << 20  # bytes a target may allocate on any of these small files


def peak_allocation(call, *args):
    """The call's result (or the exception it raised) and the most memory it held at once."""
    tracemalloc.start()
    try:
        return call(*args), tracemalloc.get_traced_memory()[1]
    except Exception as exc:  # noqa: BLE001 - the caller checks which
        return exc, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_the_inputs_listed_as_read_are_saved():
    assert set(READ) <= set(SAVED)


@pytest.mark.parametrize("name", SAVED)
def test_a_saved_fuzz_input_gives_the_named_error(name):
    """Each input once crashed its target, hung, asked for gigabytes or raised something
    else than the named error; now it gives the named error (or, for those in ``READ``,
    reads), allocating little."""
    target, _ = name.split(os.sep)
    call, error, _, _ = fuzz_targets.targets()[target]
    result, peak = peak_allocation(call, os.path.join(FUZZ_DATA, name))
    if name in READ or error is None:
        assert not isinstance(result, Exception), repr(result)
    else:
        assert isinstance(result, error), repr(result)
        assert not isinstance(result.__cause__, MemoryError)
    assert peak < MEMORY_LIMIT, f"{peak / 2**20:.0f} MB"


# ----------------------------------------------------------------------------- decompression bombs


def tiff_bomb(path, side=32000):
    """A small deflate TIFF whose header claims ``side`` x ``side`` 8-bit grey pixels."""
    strip = zlib.compress(b"\x00" * side * 30, 9)
    entries = [(256, 4, side), (257, 4, side), (258, 3, 8), (259, 3, 8), (262, 3, 1), (273, 4, 0),
               (277, 3, 1), (278, 4, side), (279, 4, len(strip))]
    data_offset = 8 + 2 + 12 * len(entries) + 4
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHI", tag, kind, 1) + (struct.pack("<HH", value, 0) if kind == 3 else
                                             struct.pack("<I", data_offset if tag == 273 else value))
        for tag, kind, value in entries) + struct.pack("<I", 0)
    path.write_bytes(b"II*\x00" + struct.pack("<I", 8) + ifd + strip)
    return path


@pytest.mark.parametrize("load", [readers.read_raster, upscaling.load], ids=["read_raster", "load"])
@pytest.mark.parametrize("kind", ["png", "tiff"])
def test_a_raster_claiming_a_gigapixel_is_refused_from_its_header(load, kind, tmp_path, png_bomb):
    bomb = png_bomb(tmp_path / "bomb.png") if kind == "png" else tiff_bomb(tmp_path / "bomb.tif")
    assert bomb.stat().st_size < 100_000
    result, peak = peak_allocation(load, str(bomb))
    assert isinstance(result, readers.InputError if load is readers.read_raster else upscaling.UpscaleError)
    assert ("32000 x 32000 pixels (1024 MP) is over the limit of 100 MP (--max_pixels); refused before decoding"
            in str(result))
    assert peak < 16 << 20


def dicom_bomb(testdata, path, name, rows, frames=None):
    """``name`` (a pydicom test file) with a header claiming ``rows`` x ``rows`` pixels
    (and ``frames`` frames), its pixel data unchanged."""
    ds = pydicom.dcmread(testdata(name))
    ds.Rows = ds.Columns = rows
    if frames is not None:
        ds.NumberOfFrames = frames
    ds.save_as(path)
    return str(path)


@pytest.mark.parametrize("load", [readers.read_dicom, upscaling.load], ids=["read_dicom", "load"])
@pytest.mark.parametrize("name, rows, frames, message", [
    ("CT_small.dcm", 20000, None, "a frame of 20000 x 20000 pixels (400 MP) is over the limit of 100 MP"),
    ("JPEG2000.dcm", 20000, None, "a frame of 20000 x 20000 pixels (400 MP) is over the limit of 100 MP"),
    ("emri_small.dcm", 1000, 2000, "2000 frames of 1000 x 1000 pixels (2000 M in all) is over the limit of 1000 M"),
    ("emri_small_jpeg_2k_lossless.dcm", 1000, 2000,
     "2000 frames of 1000 x 1000 pixels (2000 M in all) is over the limit of 1000 M"),
], ids=["uncompressed", "jpeg2000", "uncompressed-frames", "jpeg2000-frames"])
def test_a_dicom_claiming_too_many_pixels_is_refused_before_decoding(load, name, rows, frames, message, testdata,
                                                                      tmp_path):
    """Per frame, and for all frames together (pydicom allocates every frame of a
    compressed file before decoding the first)."""
    bomb = dicom_bomb(testdata, tmp_path / "bomb.dcm", name, rows, frames)
    result, peak = peak_allocation(load, bomb)
    assert isinstance(result, readers.InputError if load is readers.read_dicom else upscaling.UpscaleError)
    assert message in str(result) and "refused before decoding" in str(result), str(result)
    assert peak < 16 << 20


def nifti_claiming(path, shape, dtype=np.int16):
    """A NIfTI-1 file (gzipped for a .gz name) whose header claims ``shape`` but that holds
    one 64 x 64 slice of data."""
    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    header.set_data_shape(shape)
    header["vox_offset"] = 352
    data = header.binaryblock + b"\x00" * 4 + np.zeros((64, 64), dtype).tobytes()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return str(path)


@pytest.mark.parametrize("load", [readers.read_nifti, upscaling.load], ids=["read_nifti", "load"])
@pytest.mark.parametrize("file, shape, message", [
    ("slices.nii", (64, 64, 30000),
     "the header claims 245760352 bytes of voxel data, more than the file of 8544 bytes holds"),
    ("volumes.nii.gz", (64, 64, 64, 3000), "more than the file of "),
    ("huge.nii.gz", (2000, 2000, 300),
     "a volume of 2000 x 2000 x 300 voxels (1200 M in all) is over the limit of 1000 M for one file"),
], ids=["many-slices", "many-volumes", "over-the-limit"])
def test_a_nifti_claiming_a_huge_volume_is_refused_from_its_header(load, file, shape, message, tmp_path):
    """nibabel allocates what a header claims before it reads: a slice size within the
    limit is not enough, the whole file's voxels are checked, and so is what the file can
    hold (gzip expands at most 1032:1)."""
    path = nifti_claiming(tmp_path / file, shape)
    result, peak = peak_allocation(load, path)
    assert isinstance(result, readers.InputError if load is readers.read_nifti else upscaling.UpscaleError)
    assert message in str(result), str(result)
    assert peak < 16 << 20


def test_upscaling_refuses_a_nifti_slice_over_the_limit(tmp_path):
    path = nifti_claiming(tmp_path / "wide.nii.gz", (12000, 12000, 1), np.uint8)
    with pytest.raises(upscaling.UpscaleError, match=r"a slice of 12000 x 12000 pixels \(144 MP\) is over the limit"):
        upscaling.load(path)


def test_an_image_with_no_positive_value_gives_the_named_error(testdata, tmp_path):
    """Its default window, [0, p99.9], would be empty: a DICOM MR, a NIfTI and a float TIFF."""
    import cv2

    ds = pydicom.dcmread(testdata("MR_small.dcm"))
    ds.PixelData = np.zeros((ds.Rows, ds.Columns), np.int16).tobytes()
    ds.save_as(tmp_path / "zero.dcm")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.int16), np.eye(4)), tmp_path / "zero.nii")
    cv2.imwrite(str(tmp_path / "negative.tif"), np.full((8, 8), -1.0, np.float32))
    for read, name in ((readers.read_dicom, "zero.dcm"), (readers.read_nifti, "zero.nii"),
                       (readers.read_raster, "negative.tif")):
        with pytest.raises(readers.InputError, match="no positive values; pass an explicit intensity range"):
            read(str(tmp_path / name))
