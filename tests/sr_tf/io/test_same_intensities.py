"""Conversion into records and upscaling read a file through the same readers, so the
same image reaches the model with the same intensity mapping: a DICOM series (one window
for the series), a 4-D NIfTI (one window a volume) and an MR volume (modality given or
detected)."""

import os

import nibabel as nib
import numpy as np
import pydicom
import pytest

from sr_tf import conversion, intensity, records, upscaling
from sr_tf.io import readers

NIBABEL_DATA = os.path.join(os.path.dirname(nib.__file__), "tests", "data")
STEP = 1.0 / intensity.STORED_MAX  # one stored level, in [0, 1]


def convert(inputs, output, **options):
    options = {"val_fraction": 0.0, "test_fraction": 0.0, "keep_empty": True, **options}
    conversion.convert([os.fspath(p) for p in inputs], os.fspath(output), conversion.Options(**options),
                       progress=False)
    import tensorflow as tf

    out = []
    for path in records.shard_files(os.fspath(output), "train", records.read_manifest(os.fspath(output))):
        for raw in tf.data.TFRecordDataset(path):
            parsed = records.parse(raw)
            out.append({"source": parsed["source"].numpy().decode(), "slice_index": int(parsed["slice_index"]),
                        "modality": parsed["modality"].numpy().decode(),
                        "window": (float(parsed["intensity_min"]), float(parsed["intensity_max"])),
                        "image": parsed["image"].numpy()[..., 0]})
    return out


@pytest.fixture
def mr_series(testdata, tmp_path):
    """Three single-frame MR files of one series whose brightness differs file by file,
    so that a window per file would map them differently from the series' window."""
    folder = tmp_path / "series"
    folder.mkdir()
    paths = []
    for k, gain in enumerate((0.5, 1.0, 3.0)):
        ds = pydicom.dcmread(testdata("MR_small.dcm"))
        pixels = ds.pixel_array.astype(np.float64) * gain
        ds.PixelData = np.clip(pixels, 0, 2 ** int(ds.BitsStored) - 1).astype(ds.pixel_array.dtype).tobytes()
        ds.SOPInstanceUID = f"{ds.SOPInstanceUID}.{k + 1}"
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [0.0, 0.0, 5.0 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        path = folder / f"mr{k}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(os.fspath(path))
    return paths


def test_a_series_reaches_the_model_through_the_series_window(mr_series, tmp_path):
    import upscale  # the command line: how files of a series are upscaled

    stored = {r["source"]: r for r in convert(mr_series, tmp_path / "records")}
    assert len({r["window"] for r in stored.values()}) == 1  # one window for the series
    windows = upscale.series_windows(mr_series)
    for path in mr_series:
        image = upscaling.load(path, window=windows[path])
        assert image.window(0) == pytest.approx(stored[path]["window"])
        np.testing.assert_allclose(image.slices[0], stored[path]["image"], atol=STEP)
    # Read alone, the brightest file gets a window of its own: a different mapping.
    alone = upscaling.load(mr_series[2])
    assert alone.window(0) != pytest.approx(stored[mr_series[2]]["window"])


def test_series_window_needs_no_pixels_for_ct(testdata):
    assert readers.series_window([testdata("CT_small.dcm")] * 2) == intensity.CT_RANGE


def test_a_4d_nifti_maps_each_volume_through_its_own_window(tmp_path):
    path = os.path.join(NIBABEL_DATA, "example4d.nii.gz")
    data = np.asarray(nib.load(path).dataobj, np.float32)
    # Make the two volumes' ranges differ tenfold, as a b0 and a diffusion-weighted one do.
    scaled = nib.Nifti1Image(data * np.array([1.0, 10.0], np.float32), nib.load(path).affine)
    scaled.header.set_dim_info(slice=2)
    path = os.fspath(tmp_path / "two_ranges.nii.gz")
    nib.save(scaled, path)
    stored = convert([path], tmp_path / "records", volume_index="all")
    image = upscaling.load(path)
    depth = data.shape[2]
    assert image.slices.shape[0] == 2 * depth
    for t in range(2):
        volume = [r for r in stored if r["source"] == f"{path}#volume={t}"]
        (window,) = {r["window"] for r in volume}
        assert all(image.window(t * depth + k) == pytest.approx(window) for k in range(depth))
        # The file is RAS already (LAS flipped by conversion's canonical reorientation):
        # the same values, up to the orientation of each slice.
        ours = np.sort(image.slices[t * depth:(t + 1) * depth].ravel())
        theirs = np.sort(np.stack([r["image"] for r in volume]).ravel())
        np.testing.assert_allclose(ours, theirs, atol=STEP)
    assert image.window(0) != pytest.approx(image.window(depth))


def test_an_mr_volume_detected_or_given_modality(tmp_path):
    from nilearn.datasets import MNI152_FILE_PATH

    mni = nib.load(MNI152_FILE_PATH)
    small = nib.Nifti1Image(np.asarray(mni.dataobj, np.float32)[::4, ::4, ::8], mni.affine)
    path = os.fspath(tmp_path / "mr.nii.gz")
    nib.save(small, path)
    for given in (None, "MR", "CT"):
        stored = convert([path], tmp_path / f"records_{given}", modality=given)
        image = upscaling.load(path, modality=given)
        assert {r["modality"] for r in stored} == {image.modality} == {given or "MR"}
        assert {r["window"] for r in stored} == {image.window(0)}
    assert upscaling.load(path, modality="CT").window(0) == intensity.CT_RANGE

