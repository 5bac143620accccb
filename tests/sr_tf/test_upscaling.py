"""upscale.py and sr_tf.upscaling: DICOM, NIfTI and PNG back in their own format, honestly.

Most tests use a nearest-neighbour "model" (each pixel repeated s x s), so that the
written values must equal the input's values repeated: the whole intensity and geometry
path is then checked exactly. A tiny real Keras model checks tiling and the CLI.
"""

import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import cv2
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from tests import ROOT
from sr_tf.io import readers
from sr_tf import inference, upscaling

NIBABEL_DATA = os.path.join(os.path.dirname(nib.__file__), "tests", "data")
SCALE = 2


class Nearest(inference.Predictor):
    """Identity-like model: every LR pixel repeated ``scale`` x ``scale`` times."""

    def __init__(self, scale=SCALE):
        super().__init__(path="nearest", name="nearest")
        self._model_scale = scale
        self.largest_batch = (0, 0, 0, 0)

    def predict(self, batch):
        batch = np.asarray(batch, np.float32)
        self.largest_batch = max(self.largest_batch, batch.shape)
        return np.repeat(np.repeat(batch, self.scale, axis=1), self.scale, axis=2)


def repeat(array, scale=SCALE):
    """Nearest-neighbour upsampling of the last two axes."""
    return np.repeat(np.repeat(array, scale, axis=-2), scale, axis=-1)


def outer_corner(position, orientation, spacing):
    """Patient coordinates of the outer corner of the first pixel (ImagePositionPatient is its centre)."""
    orientation = np.asarray(orientation, float)
    rows, cols = (float(v) for v in spacing)
    return np.asarray(position, float) - 0.5 * cols * orientation[:3] - 0.5 * rows * orientation[3:]


def dciodvfy_errors(path):
    """The set of dciodvfy's error lines for ``path`` (file names stripped)."""
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    lines = (result.stdout + result.stderr).replace(str(path), "<file>").splitlines()
    return {line.strip() for line in lines if line.lstrip().lower().startswith("error")}


@pytest.fixture(scope="module")
def nearest():
    return Nearest()


@pytest.fixture(scope="module")
def monochrome1_crop(testdata, tmp_path_factory):
    """A 200x240 crop of the real MONOCHROME1 chest radiograph RG1_UNCI.dcm (1955x1841)."""
    ds = pydicom.dcmread(testdata("RG1_UNCI.dcm"))
    crop = np.ascontiguousarray(ds.pixel_array[900:1100, 800:1040])
    ds.PixelData = crop.tobytes()
    ds.Rows, ds.Columns = crop.shape
    path = tmp_path_factory.mktemp("mono1") / "RG1_crop.dcm"
    ds.save_as(path)
    return os.fspath(path)


@pytest.fixture(scope="module")
def dicom_outputs(testdata, nearest, monochrome1_crop, tmp_path_factory):
    """Each DICOM input upscaled once with the nearest-neighbour model: name -> (input, output)."""
    out = tmp_path_factory.mktemp("dicom_out")
    inputs = {name: testdata(name) for name in (
        "CT_small.dcm", "693_UNCI.dcm", "693_J2KR.dcm", "eCT_Supplemental.dcm", "emri_small_RLE.dcm",
        "MR_small_bigendian.dcm", "US1_J2KR.dcm", "mlut_18.dcm")}
    inputs["RG1_crop.dcm"] = monochrome1_crop
    outputs = {}
    for name, path in inputs.items():
        report = upscaling.upscale_file(nearest, path, out, tile=64, overlap=8)
        assert report["status"] == "ok", report["error"]
        outputs[name] = (path, report["output"])
    return outputs


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A small real conv model (residual CNN x2, 8 filters) saved as .keras, and its predictor."""
    import sr_tf.models

    path = tmp_path_factory.mktemp("model") / "tiny_x2.keras"
    model = sr_tf.models.build("residual_cnn", scale=SCALE, filters=8)
    rng = np.random.default_rng(0)
    model.set_weights([rng.normal(0, 0.1, w.shape).astype(np.float32) for w in model.get_weights()])
    model.save(path)
    return os.fspath(path), inference.load_predictor(path)


# ----------------------------------------------------------------------------- DICOM


@pytest.mark.parametrize("name", ["CT_small.dcm", "693_UNCI.dcm"])
def test_ct_dicom_keeps_hu_stored_representation_and_geometry(dicom_outputs, name):
    source, output = dicom_outputs[name]
    before, after = pydicom.dcmread(source), pydicom.dcmread(output)
    assert (after.Rows, after.Columns) == (before.Rows * SCALE, before.Columns * SCALE)
    np.testing.assert_allclose([float(v) for v in after.PixelSpacing],
                               [float(v) / SCALE for v in before.PixelSpacing], rtol=1e-6)
    for keyword in ("RescaleSlope", "RescaleIntercept", "BitsAllocated", "BitsStored", "HighBit",
                    "PixelRepresentation", "PhotometricInterpretation", "Modality", "StudyInstanceUID",
                    "FrameOfReferenceUID", "PatientID"):
        assert after.get(keyword) == before.get(keyword), keyword
    # HU equal the input's repeated, padding (-3024 HU, outside the model's window) included.
    hu_before = pydicom.pixels.apply_modality_lut(before.pixel_array, before)
    hu_after = pydicom.pixels.apply_modality_lut(after.pixel_array, after)
    assert hu_before.min() < -1024 or name == "CT_small.dcm"
    assert np.max(np.abs(hu_after - repeat(hu_before))) <= float(before.RescaleSlope)
    # New identity, derived, uncompressed; the outer corner of the image has not moved.
    assert after.SOPInstanceUID != before.SOPInstanceUID
    assert after.file_meta.MediaStorageSOPInstanceUID == after.SOPInstanceUID
    assert after.SeriesInstanceUID != before.SeriesInstanceUID
    assert list(after.ImageType[:2]) == ["DERIVED", "SECONDARY"]
    assert list(after.ImageType[2:]) == list(before.ImageType[2:])
    assert "nearest" in after.DerivationDescription and f"x{SCALE}" in after.DerivationDescription
    assert after.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    corners = [outer_corner(ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing)
               for ds in (before, after)]
    np.testing.assert_allclose(corners[1], corners[0], atol=1e-4)
    for stale in ("SmallestImagePixelValue", "LargestImagePixelValue"):
        assert stale not in after


def test_series_uid_is_shared_by_the_files_of_one_series(testdata, nearest, tmp_path):
    """Files of one series upscaled by one model form one new series; SOP UIDs stay unique."""
    first = upscaling.upscale_file(nearest, testdata("CT_small.dcm"), tmp_path / "a")
    second = upscaling.upscale_file(nearest, testdata("CT_small.dcm"), tmp_path / "b")
    a, b = pydicom.dcmread(first["output"]), pydicom.dcmread(second["output"])
    assert a.SeriesInstanceUID == b.SeriesInstanceUID != pydicom.dcmread(testdata("CT_small.dcm")).SeriesInstanceUID
    assert a.SOPInstanceUID != b.SOPInstanceUID


@pytest.mark.parametrize("name", ["693_J2KR.dcm", "emri_small_RLE.dcm", "MR_small_bigendian.dcm"])
def test_compressed_and_big_endian_input_comes_out_explicit_little_endian(dicom_outputs, name):
    source, output = dicom_outputs[name]
    before, after = pydicom.dcmread(source), pydicom.dcmread(output)
    assert before.file_meta.TransferSyntaxUID != ExplicitVRLittleEndian
    assert after.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert int(after.get("NumberOfFrames", 1)) == int(before.get("NumberOfFrames", 1))
    np.testing.assert_array_equal(after.pixel_array, repeat(before.pixel_array))


def test_monochrome1_comes_back_monochrome1_with_its_polarity(dicom_outputs):
    source, output = dicom_outputs["RG1_crop.dcm"]
    before, after = pydicom.dcmread(source), pydicom.dcmread(output)
    assert before.PhotometricInterpretation == after.PhotometricInterpretation == "MONOCHROME1"
    np.testing.assert_array_equal(after.pixel_array, repeat(before.pixel_array))
    spacing = np.array(readers.dicom_pixel_spacing(before)) / SCALE
    np.testing.assert_allclose(readers.dicom_pixel_spacing(after), spacing, rtol=1e-6)
    # The model saw dense as bright: the loaded slice is the stored image inverted.
    image = upscaling.load(source)
    expected = 1.0 - before.pixel_array / (2.0 ** before.BitsStored - 1)
    np.testing.assert_allclose(image.slices[0], expected, atol=1e-6)


def test_enhanced_multiframe_stays_multiframe_with_its_functional_groups(dicom_outputs):
    source, output = dicom_outputs["eCT_Supplemental.dcm"]
    before, after = pydicom.dcmread(source), pydicom.dcmread(output)
    assert int(after.NumberOfFrames) == int(before.NumberOfFrames) == 2
    assert after.pixel_array.shape == (2, 1024, 1024)
    hu_before = readers.dicom_to_physical(before, source)
    hu_after = readers.dicom_to_physical(after, output)
    for frame in range(2):
        np.testing.assert_array_equal(hu_after[frame], repeat(hu_before[frame]))
    # Enhanced IODs allow only PRIMARY as value 2; the frames are marked DERIVED too.
    assert list(after.ImageType[:2]) == ["DERIVED", "PRIMARY"]
    groups = [*after.SharedFunctionalGroupsSequence, *after.PerFrameFunctionalGroupsSequence]
    frame_types = [str(item.FrameType[0]) for group in groups
                   for element in group if element.VR == "SQ" for item in element.value if "FrameType" in item]
    assert frame_types and set(frame_types) == {"DERIVED"}
    for frame in range(2):
        old, new = (readers.dicom_pixel_spacing(ds, frame) for ds in (before, after))
        np.testing.assert_allclose(new, np.array(old) / SCALE, rtol=1e-6)
        corners = []
        for ds in (before, after):
            position = ds.PerFrameFunctionalGroupsSequence[frame].PlanePositionSequence[0].ImagePositionPatient
            orientation = readers.functional_group_item(ds, frame, "PlaneOrientationSequence").ImageOrientationPatient
            corners.append(outer_corner(position, orientation, readers.dicom_pixel_spacing(ds, frame)))
        np.testing.assert_allclose(corners[1], corners[0], atol=1e-4)


def test_one_frame_of_a_multiframe_file_for_the_app(testdata, nearest):
    image = upscaling.load(testdata("eCT_Supplemental.dcm"))
    upscaled = upscaling.upscale(nearest, image, slices=[1])
    assert upscaled.shape == (1, 1024, 1024)
    data, name = upscaling.to_bytes(image, upscaled, nearest, slices=[1])
    assert name == "eCT_Supplemental_x2.dcm"
    after = pydicom.dcmread(io.BytesIO(data))
    before = pydicom.dcmread(testdata("eCT_Supplemental.dcm"))
    assert int(after.NumberOfFrames) == 1 and len(after.PerFrameFunctionalGroupsSequence) == 1
    old = before.PerFrameFunctionalGroupsSequence[1].FrameContentSequence[0]
    assert after.PerFrameFunctionalGroupsSequence[0].FrameContentSequence[0] == old
    np.testing.assert_array_equal(readers.dicom_to_physical(after, "x")[0],
                                  repeat(readers.dicom_to_physical(before, "x")[1]))


def test_rgb_dicom_is_written_as_monochrome2(dicom_outputs):
    source, output = dicom_outputs["US1_J2KR.dcm"]
    before, after = pydicom.dcmread(source), pydicom.dcmread(output)
    assert int(before.SamplesPerPixel) == 3
    assert after.PhotometricInterpretation == "MONOCHROME2" and int(after.SamplesPerPixel) == 1
    assert "PlanarConfiguration" not in after
    luminance = cv2.cvtColor(before.pixel_array, cv2.COLOR_RGB2GRAY)
    np.testing.assert_array_equal(after.pixel_array, repeat(luminance))


def test_modality_lut_sequence_is_inverted(dicom_outputs):
    source, output = dicom_outputs["mlut_18.dcm"]
    before, after = pydicom.dcmread(source), pydicom.dcmread(output)
    assert "ModalityLUTSequence" in after
    np.testing.assert_array_equal(after.pixel_array, repeat(before.pixel_array))


@pytest.mark.parametrize("name", ["CT_small.dcm", "693_J2KR.dcm", "eCT_Supplemental.dcm", "RG1_crop.dcm",
                                  "US1_J2KR.dcm", "MR_small_bigendian.dcm"])
def test_dciodvfy_finds_no_error_the_input_does_not_have(dicom_outputs, name):
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy is not on PATH (apt-get install dicom3tools)")
    source, output = dicom_outputs[name]
    new = dciodvfy_errors(output) - dciodvfy_errors(source)
    assert not new, f"dciodvfy errors in the output of {name} only: {sorted(new)}"


@pytest.mark.parametrize("name", ["CT_small.dcm", "RG1_crop.dcm"])
def test_projected_dicom_says_so_and_passes_dciodvfy(tiny_model, monochrome1_crop, testdata, tmp_path, name):
    """With data-consistency projection the output agrees with its input, the
    DerivationDescription says how it was made, and dciodvfy finds nothing new."""
    from sr_tf import consistency
    from sr_tf.data import degrade

    _, plain = tiny_model
    predictor = inference.with_consistency(plain, "project", 8)
    source = monochrome1_crop if name == "RG1_crop.dcm" else testdata(name)
    report = upscaling.upscale_file(predictor, source, tmp_path, tile=64, overlap=16)
    assert report["status"] == "ok", report["error"]
    written = pydicom.dcmread(report["output"])
    assert "data-consistency projection (8 iterations" in written.DerivationDescription
    assert "tiny_x2" in written.DerivationDescription
    image = upscaling.load(source)
    projected = upscaling.load(report["output"]).slices[0]  # the written values, read back
    down = np.asarray(degrade.downsample(projected[..., None], SCALE))[..., 0]
    unprojected = upscaling.upscale(plain, image)[0]
    before = np.asarray(degrade.downsample(unprojected[..., None], SCALE))[..., 0]
    assert np.abs(down - image.slices[0]).mean() < 0.25 * np.abs(before - image.slices[0]).mean()
    plain_report = upscaling.upscale_file(plain, source, tmp_path / "plain", tile=64, overlap=16)
    assert "projection" not in pydicom.dcmread(plain_report["output"]).DerivationDescription
    assert consistency.DEFAULT_MODE in consistency.MODES
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy is not on PATH (apt-get install dicom3tools)")
    new = dciodvfy_errors(report["output"]) - dciodvfy_errors(source)
    assert not new, f"dciodvfy errors in the projected output of {name} only: {sorted(new)}"


# ----------------------------------------------------------------------------- NIfTI


def voxel_corners(shape, axes):
    """Outer corners of the voxel grid (index -0.5 and N-0.5) along ``axes``, others at 0."""
    corners = []
    for bits in range(4):
        index = np.zeros(4)
        index[3] = 1.0
        for j, axis in enumerate(axes):
            index[axis] = -0.5 if (bits >> j) & 1 == 0 else shape[axis] - 0.5
        corners.append(index)
    return np.array(corners).T


@pytest.mark.parametrize("name", ["example4d.nii.gz", "anatomical.nii", "reoriented_anat_moved.nii"])
def test_nifti_keeps_field_of_view_layout_dtype_and_values(nearest, tmp_path, name):
    path = os.path.join(NIBABEL_DATA, name)
    report = upscaling.upscale_file(nearest, path, tmp_path)
    assert report["status"] == "ok", report["error"]
    assert report["output"].endswith(name.replace(".nii", f"_x{SCALE}.nii"))
    before, after = nib.load(path), nib.load(report["output"])
    assert after.get_data_dtype() == before.get_data_dtype()
    expected_shape = list(before.shape)
    expected_shape[0] *= SCALE
    expected_shape[1] *= SCALE
    assert list(after.shape) == expected_shape
    assert nib.aff2axcodes(after.affine) == nib.aff2axcodes(before.affine)  # never reoriented
    np.testing.assert_allclose(after.affine @ voxel_corners(after.shape, (0, 1)),
                               before.affine @ voxel_corners(before.shape, (0, 1)), atol=1e-4)
    np.testing.assert_allclose(after.header.get_zooms()[:2], np.array(before.header.get_zooms()[:2]) / SCALE)
    assert after.header.get_zooms()[2:] == before.header.get_zooms()[2:]
    for code in ("sform_code", "qform_code"):
        assert after.header[code] == before.header[code]
    data_before = np.asanyarray(before.dataobj)
    want = np.repeat(np.repeat(data_before, SCALE, axis=0), SCALE, axis=1)
    if np.issubdtype(want.dtype, np.integer):
        np.testing.assert_array_equal(np.asanyarray(after.dataobj), want)
    else:  # through float32 [0, 1] and back
        np.testing.assert_allclose(np.asanyarray(after.dataobj), want, rtol=1e-6, atol=1e-6 * want.max())


def test_nifti_scl_slope_and_inter_are_respected(nearest, tmp_path):
    source = nib.load(os.path.join(NIBABEL_DATA, "anatomical.nii"))
    scaled = nib.Nifti1Image(np.asanyarray(source.dataobj).astype(np.int16), source.affine, source.header)
    scaled.header.set_data_dtype(np.int16)
    scaled.header.set_slope_inter(0.5, -100.0)
    path = tmp_path / "scaled.nii"
    nib.save(scaled, path)
    loaded = nib.load(path)  # nibabel moves the scaling from the header into the array proxy
    assert (loaded.dataobj.slope, loaded.dataobj.inter) == (0.5, -100.0)
    report = upscaling.upscale_file(nearest, path, tmp_path / "out")
    after = nib.load(report["output"])
    assert (after.dataobj.slope, after.dataobj.inter) == (0.5, -100.0)
    assert after.get_data_dtype() == loaded.get_data_dtype()  # big-endian int16, as the header came
    np.testing.assert_array_equal(np.asanyarray(after.dataobj.get_unscaled()),
                                  np.repeat(np.repeat(loaded.dataobj.get_unscaled(), 2, 0), 2, 1))
    np.testing.assert_allclose(after.get_fdata(), np.repeat(np.repeat(loaded.get_fdata(), 2, 0), 2, 1))


def test_nifti_slice_dimension_and_a_single_slice_keep_world_coordinates(nearest, tmp_path):
    source = nib.load(os.path.join(NIBABEL_DATA, "anatomical.nii"))  # (33, 41, 25)
    image = nib.Nifti1Image(np.asanyarray(source.dataobj), source.affine, source.header)
    image.header.set_dim_info(slice=0)  # sagittal slices: axes 1 and 2 are in-plane
    path = tmp_path / "sagittal.nii.gz"
    nib.save(image, path)
    loaded = upscaling.load(path)
    assert loaded.slices.shape == (33, 25, 41)  # 33 slices along axis 0, rows along axis 2
    upscaled = upscaling.upscale(nearest, loaded, slices=[7])
    data, name = upscaling.to_bytes(loaded, upscaled, nearest, slices=[7])
    assert name == "sagittal_x2.nii.gz" and data[:2] == b"\x1f\x8b"
    out_path = tmp_path / name
    out_path.write_bytes(data)
    after = nib.load(out_path)
    assert after.shape == (1, 41 * SCALE, 25 * SCALE)
    # Slice 7's outer corners (index 6.5 .. 7.5 along axis 0) are where they were.
    old = voxel_corners(source.shape, (1, 2))
    old[0] = 7.0
    new = voxel_corners(after.shape, (1, 2))
    np.testing.assert_allclose(after.affine @ new, source.affine @ old, atol=1e-4)
    np.testing.assert_array_equal(np.asanyarray(after.dataobj)[0],
                                  repeat(np.asanyarray(source.dataobj)[7]))


# ----------------------------------------------------------------------------- raster


@pytest.mark.parametrize("dtype, channels", [(np.uint16, 1), (np.uint8, 1), (np.uint8, 3)])
def test_png_keeps_its_bit_depth_and_becomes_grayscale(nearest, tmp_path, dtype, channels):
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, np.iinfo(dtype).max, (37, 53, channels), dtype=dtype, endpoint=True)
    path = tmp_path / "xray.png"
    cv2.imwrite(str(path), pixels)
    report = upscaling.upscale_file(nearest, path, tmp_path / "out")
    assert report["output"].endswith("xray_x2.png")
    after = cv2.imread(report["output"], cv2.IMREAD_UNCHANGED)
    assert after.dtype == dtype and after.shape == (74, 106)
    gray = pixels[..., 0] if channels == 1 else cv2.cvtColor(pixels, cv2.COLOR_BGR2GRAY)
    np.testing.assert_array_equal(after, repeat(gray))


def test_4096_square_16bit_png_upscales_in_bounded_memory(tmp_path):
    """A 4096x4096 16-bit radiograph through tiles of 512, in a fresh process so that its
    peak memory is measured: it must stay near the size of the output itself."""
    yy, xx = np.ogrid[:4096, :4096]
    pixels = ((xx * 13 + yy * 7) % 65536).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "big.png"), pixels)
    script = textwrap.dedent(f"""
        import json, sys
        sys.path[:0] = [{ROOT!r}, {os.path.dirname(os.path.abspath(__file__))!r}]
        from test_upscaling import Nearest
        from sr_tf import upscaling

        def status(key):
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) / 1024 for line in f if line.startswith(key))

        predictor = Nearest()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set size to the current one
        before = status("VmRSS:")
        report = upscaling.upscale_file(predictor, {str(tmp_path / 'big.png')!r}, {str(tmp_path / 'out')!r},
                                        tile=512, overlap=32, batch_size=4)
        print(json.dumps(dict(report=report, before_mb=before, peak_mb=status("VmHWM:"),
                              largest_batch=list(predictor.largest_batch))))
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["report"]["status"] == "ok", measured["report"]["error"]
    assert measured["largest_batch"] == [4, 484, 484, 1]  # 9 x 9 balanced tiles of at most 512
    after = cv2.imread(measured["report"]["output"], cv2.IMREAD_UNCHANGED)
    assert after.dtype == np.uint16 and after.shape == (8192, 8192)
    np.testing.assert_array_equal(after[::997, ::991], repeat(pixels)[::997, ::991])
    # The float32 output alone is 256 MB; input, 16-bit output and PNG encoding add to it.
    output_mb = 8192 * 8192 * 4 / 2**20
    assert measured["peak_mb"] - measured["before_mb"] < 2.5 * output_mb, measured


# ----------------------------------------------------------------------------- tiling


@pytest.mark.parametrize("tile, overlap, batch_size, message", [
    (4, 0, 1, "tile must be at least 8"), (64, 32, 1, "overlap in \\[0, 32\\)"), (64, -1, 1, "overlap"),
    (64, 8, 0, "batch_size must be at least 1"),
])
def test_bad_tiling_is_refused_before_any_work(tile, overlap, batch_size, message, nearest, tmp_path):
    with pytest.raises(ValueError, match=message):
        inference.tiled_predict(nearest, np.zeros((100, 100), np.float32), tile, overlap, batch_size)
    result = _cli("--model=unused", "--input=unused.png", f"--output={tmp_path / 'out'}", f"--tile={tile}",
                  f"--overlap={overlap}", f"--batch_size={batch_size}")
    assert result.returncode != 0 and re.search(message, result.stderr + result.stdout)
    assert not (tmp_path / "out").exists()


def test_tiled_equals_whole_image_inference_with_a_real_model(tiny_model, testdata):
    _, predictor = tiny_model
    image = upscaling.load(testdata("CT_small.dcm"))  # 128x128
    calls = []
    tiled = upscaling.upscale(predictor, image, tile=48, overlap=16, batch_size=3,
                              progress=lambda done, total: calls.append((done, total)))
    whole = predictor.predict(image.slices[..., None])[..., 0]
    assert tiled.shape == whole.shape == (1, 256, 256)
    np.testing.assert_allclose(tiled, np.clip(whole, 0, 1), atol=1e-3)
    assert calls[-1][0] == calls[-1][1] > 1 and [d for d, _ in calls] == sorted(d for d, _ in calls)


# ----------------------------------------------------------------------------- naming, safety, failures


@pytest.mark.parametrize("name, expected", [
    ("a/b/ct.dcm", "ct_x4.dcm"), ("IM0001", "IM0001_x4.dcm"), ("1.2.840.10008.5", "1.2.840.10008.5_x4.dcm"),
    ("brain.nii.gz", "brain_x4.nii.gz"), ("brain.nii", "brain_x4.nii"), ("cxr.JPG", "cxr_x4.png"),
    ("scan.tiff", "scan_x4.png"),
])
def test_output_names(name, expected):
    assert upscaling.output_path(name, "out", 4) == os.path.join("out", expected)


def test_never_overwrites_the_input(testdata, nearest, tmp_path):
    path = tmp_path / "ct.dcm"
    path.write_bytes(open(testdata("CT_small.dcm"), "rb").read())
    original = path.read_bytes()
    image = upscaling.load(path)
    upscaled = upscaling.upscale(nearest, image)
    with pytest.raises(upscaling.UpscaleError, match="overwrite the input"):
        upscaling.write(image, upscaled, nearest, path)
    report = upscaling.upscale_file(nearest, path, tmp_path, output=os.fspath(path))
    assert report["status"] == "failed" and "overwrite" in report["error"]
    assert path.read_bytes() == original
    written = upscaling.write(image, upscaled, nearest, tmp_path / "ct_x2.dcm")
    assert sorted(os.listdir(tmp_path)) == ["ct.dcm", "ct_x2.dcm"] and written.endswith("ct_x2.dcm")


def test_an_output_never_replaces_another_input(testdata, nearest, tmp_path):
    import upscale

    first = tmp_path / "ct.dcm"
    first.write_bytes(open(testdata("CT_small.dcm"), "rb").read())
    second = tmp_path / "ct_x2.dcm"  # the name ct.dcm's output would take
    second.write_bytes(open(testdata("MR_small.dcm"), "rb").read())
    original = second.read_bytes()
    reports = upscale.run(nearest, [str(first), str(second)], str(tmp_path), 256, 32, 4, progress=False)
    assert [r["status"] for r in reports] == ["ok", "ok"]
    assert second.read_bytes() == original
    assert {os.path.basename(r["output"]) for r in reports} == {"ct_x2-2.dcm", "ct_x2_x2.dcm"}


class Broken(Nearest):
    """A diverged model: NaN everywhere."""

    def predict(self, batch):
        return super().predict(batch) * np.nan


def test_a_nan_output_is_an_error_and_writes_nothing(testdata, tmp_path):
    report = upscaling.upscale_file(Broken(), testdata("CT_small.dcm"), tmp_path)
    assert report["status"] == "failed" and "NaN" in report["error"] and "CT_small.dcm" in report["error"]
    assert os.listdir(tmp_path) == []


def _bad_inputs(folder, testdata):
    folder.mkdir(parents=True, exist_ok=True)
    truncated = folder / "truncated.dcm"
    truncated.write_bytes(open(testdata("CT_small.dcm"), "rb").read()[:3000])
    (folder / "random.dcm").write_bytes(np.random.default_rng(0).bytes(4096))
    (folder / "notes.png").write_text("this is not an image\n")
    return [truncated, folder / "random.dcm", folder / "notes.png"]


def test_bad_files_are_reported_by_name_and_do_not_stop_the_others(testdata, nearest, tmp_path):
    bad = _bad_inputs(tmp_path / "in", testdata)
    unsupported = [testdata(name) for name in ("liver_1frame.dcm", "OBXXXX1A.dcm", "rtplan.dcm")]
    for path in [*bad, *unsupported]:
        with pytest.raises(upscaling.UpscaleError) as caught:
            upscaling.load(path)
        assert str(caught.value).startswith(f"{path}: ")
    reports = [upscaling.upscale_file(nearest, path, tmp_path / "out") for path in [*bad, testdata("CT_small.dcm")]]
    assert [r["status"] for r in reports] == ["failed", "failed", "failed", "ok"]
    for report in reports[:3]:
        assert report["input"] in report["error"]
    assert os.listdir(tmp_path / "out") == ["CT_small_x2.dcm"]  # no temporary files left behind
    # A write killed earlier left a partial file of its own: the next write of that name removes it.
    stale = tmp_path / "out" / ".CT_small_x2.dcm.0123abcd.tmp"
    stale.write_bytes(b"partial")
    os.utime(stale, (0, 0))
    keep = tmp_path / "out" / ".notes.tmp"  # not one of ours
    keep.write_bytes(b"")
    assert upscaling.upscale_file(nearest, testdata("CT_small.dcm"), tmp_path / "out")["status"] == "ok"
    assert sorted(os.listdir(tmp_path / "out")) == [".notes.tmp", "CT_small_x2.dcm"]


@pytest.mark.skipif(importlib.util.find_spec("libjpeg") is not None, reason="pylibjpeg-libjpeg is installed")
def test_12_bit_jpeg_names_the_optional_decoder(testdata):
    with pytest.raises(upscaling.UpscaleError, match="pip install pylibjpeg-libjpeg"):
        upscaling.load(testdata("JPGExtended.dcm"))


def _cli(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "upscale.py", *args, "--noprogress"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_report_and_exit_codes(testdata, tiny_model, tmp_path):
    model, _ = tiny_model
    bad = _bad_inputs(tmp_path / "in", testdata)
    good = tmp_path / "in" / "sub"
    good.mkdir()
    cv2.imwrite(str(good / "xray.png"), np.random.default_rng(2).integers(0, 255, (40, 30), dtype=np.uint8))
    out = tmp_path / "out"
    result = _cli(f"--model={model}", f"--input={tmp_path / 'in'}", f"--input={testdata('CT_small.dcm')},{bad[0]}",
                  f"--output={out}", "--tile=32", "--overlap=8", "--batch_size=2")
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "upscale_report.json").read_text())
    by_input = {os.path.basename(item["input"]): item for item in report["files"]}
    assert sorted(by_input) == ["CT_small.dcm", "notes.png", "random.dcm", "truncated.dcm", "xray.png"]
    assert report["written"] == 2 and report["failed"] == 3 and report["scale"] == SCALE
    for name in ("notes.png", "random.dcm", "truncated.dcm"):
        assert by_input[name]["status"] == "failed" and name in by_input[name]["error"]
        assert name in result.stdout
    assert pydicom.dcmread(by_input["CT_small.dcm"]["output"]).Rows == 256
    assert cv2.imread(by_input["xray.png"]["output"], cv2.IMREAD_UNCHANGED).shape == (80, 60)
    assert "upscaled 2 of 5 file(s)" in result.stdout
    assert report["consistency"]["mode"] == "project" and report["consistency"]["iterations"] > 0
    assert "data-consistency projection" in pydicom.dcmread(by_input["CT_small.dcm"]["output"]).DerivationDescription
    # Bad consistency values: refused by flag and value before anything runs.
    for flag, message in (("--consistency=always", "--consistency"), ("--consistency_iterations=-1",
                                                                       "--consistency_iterations must be a "
                                                                       "non-negative integer, got -1")):
        refused = _cli(f"--model={model}", f"--input={testdata('CT_small.dcm')}", f"--output={tmp_path / 'no'}",
                       flag)
        assert refused.returncode != 0 and message in refused.stderr, refused.stderr[-2000:]
    assert not (tmp_path / "no").exists()
    # Nothing written: a non-zero exit code, and the report says why.
    failed = _cli(f"--model={model}", f"--input={bad[1]}", f"--input={tmp_path / 'missing.dcm'}",
                  f"--output={tmp_path / 'none'}")
    assert failed.returncode != 0
    report = json.loads((tmp_path / "none" / "upscale_report.json").read_text())
    assert report["written"] == 0 and {item["status"] for item in report["files"]} == {"failed"}
    assert any("no such file" in item["error"] for item in report["files"])
    # A model that cannot be loaded: the error names it, and --output is not even created.
    broken = _cli(f"--model={tmp_path / 'no_model.keras'}", f"--input={testdata('CT_small.dcm')}",
                  f"--output={tmp_path / 'never'}")
    assert broken.returncode == 1 and "no_model.keras" in broken.stderr
    assert not (tmp_path / "never").exists()


def test_a_decompression_bomb_and_odd_file_names(testdata, nearest, tmp_path, png_bomb):
    """A PNG claiming 32000 x 32000 pixels is refused from its header; files whose names
    are not UTF-8 upscale like any other, and the report names them."""
    folder = tmp_path / "in"
    folder.mkdir()
    bomb = png_bomb(folder / "bomb.png")
    dicom = os.path.join(os.fsencode(folder), b"ct\xff.dcm")
    shutil.copy(testdata("CT_small.dcm"), dicom)
    ok, png = cv2.imencode(".png", (np.arange(48 * 40) % 251).astype(np.uint8).reshape(48, 40))
    raster = os.path.join(os.fsencode(folder), b"x\xff\xfe.png")
    with open(raster, "wb") as f:
        f.write(png.tobytes())
    with pytest.raises(upscaling.UpscaleError, match=r"bomb\.png: image of 32000 x 32000 pixels .*\(--max_pixels\)"):
        upscaling.load(str(bomb))
    reports = [upscaling.upscale_file(nearest, os.fsdecode(path), tmp_path / "out") for path in (dicom, raster)]
    assert [r["status"] for r in reports] == ["ok", "ok"], reports
    written = sorted(os.listdir(os.fsencode(tmp_path / "out")))
    assert written == [b"ct\xff_x2.dcm", b"x\xff\xfe_x2.png"]
    json.dumps(reports)  # the report can be written


def test_special_files_in_an_input_folder_are_never_opened(testdata, tmp_path):
    import upscale

    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(testdata("CT_small.dcm"), folder / "ct.dcm")
    os.mkfifo(folder / "pipe.dcm")
    os.symlink(folder / "gone.dcm", folder / "dangling.dcm")
    files, failures, skipped = upscale.collect_inputs([str(folder)], str(tmp_path / "out"))
    assert [os.path.basename(p) for p in files] == ["ct.dcm"]
    assert any("pipe.dcm" in s["input"] and "FIFO" in s["reason"] for s in skipped), skipped
    assert any("dangling.dcm" in f["input"] and "broken symbolic link" in f["error"] for f in failures), failures


# ----------------------------------------------------------------------------- uncertainty, adaptation


def test_uncertainty_maps_beside_each_format(testdata, monochrome1_crop, tmp_path):
    """--uncertainty: a DICOM in its own series on the output's grid that dciodvfy accepts
    with no new errors, a NIfTI with the output's geometry, a 16-bit PNG; each holds the
    self-ensemble spread and the consistency residual in the image's units, and the
    report gives the fraction of pixels above the threshold."""
    from sr_tf import ensemble

    predictor = ensemble.EnsemblePredictor(Nearest(), spread=True)  # equivariant: only the residual remains
    ct = testdata("CT_small.dcm")
    ok, png = cv2.imencode(".png", (np.arange(48 * 40) % 251).astype(np.uint8).reshape(48, 40))
    (tmp_path / "x.png").write_bytes(png.tobytes())
    nifti = os.path.join(NIBABEL_DATA, "anatomical.nii")
    fractions = []
    for source in (ct, str(tmp_path / "x.png"), nifti):
        report = upscaling.upscale_file(predictor, source, tmp_path / "out", tile=64, overlap=8, uncertainty=True)
        assert report["status"] == "ok", report["error"]
        u = report["uncertainty"]
        assert u["output"] == upscaling.uncertainty_path(report["output"]) and os.path.isfile(u["output"])
        assert u["threshold"] == ensemble.DEFAULT_THRESHOLD and 0 <= u["fraction_above"] < 0.5
        fractions.append(u["fraction_above"])
    assert fractions[1] > 0  # the PNG's sharp synthetic edges: nearest-neighbour disagrees with them
    out_dir = tmp_path / "out"
    image, uncertainty = pydicom.dcmread(out_dir / "CT_small_x2.dcm"), pydicom.dcmread(out_dir / "CT_small_x2_uncertainty.dcm")
    assert (uncertainty.Rows, uncertainty.Columns) == (image.Rows, image.Columns)
    assert uncertainty.SeriesInstanceUID not in (image.SeriesInstanceUID, pydicom.dcmread(ct).SeriesInstanceUID)
    assert uncertainty.StudyInstanceUID == image.StudyInstanceUID
    assert uncertainty.DerivationDescription.startswith("Uncertainty map of the x2 output of the model nearest")
    hu = pydicom.pixels.apply_modality_lut(uncertainty.pixel_array, uncertainty)
    assert hu.min() >= 0 and 0 < np.median(hu) < 500  # HU of disagreement, not of tissue
    assert dciodvfy_errors(out_dir / "CT_small_x2_uncertainty.dcm") <= dciodvfy_errors(ct)
    raster = cv2.imread(str(out_dir / "x_x2_uncertainty.png"), cv2.IMREAD_UNCHANGED)
    assert raster.dtype == np.uint16 and raster.shape == (96, 80) and raster.max() > 0
    upscaled, mapped = nib.load(out_dir / "anatomical_x2.nii"), nib.load(out_dir / "anatomical_x2_uncertainty.nii")
    assert mapped.shape == upscaled.shape
    np.testing.assert_allclose(mapped.affine, upscaled.affine)
    assert mapped.header["descrip"].tobytes().startswith(b"sr_tf uncertainty x2")
    assert float(mapped.header["cal_max"]) == 0.0
    # The map reads back in the image's units from its own linear rescale: uint16 MONOCHROME2
    # whatever the input (the MONOCHROME1 radiograph, a multi-frame MR), no window.
    assert (uncertainty.PhotometricInterpretation, uncertainty.BitsStored, uncertainty.PixelRepresentation) == (
        "MONOCHROME2", 16, 0)
    assert "WindowCenter" not in uncertainty and "ModalityLUTSequence" not in uncertainty
    maps = {}
    for name in ("RG1_crop.dcm", "emri_small_RLE.dcm"):
        source = monochrome1_crop if name == "RG1_crop.dcm" else testdata(name)
        report = upscaling.upscale_file(predictor, source, tmp_path / "more", tile=64, overlap=8, uncertainty=True)
        assert report["status"] == "ok", report["error"]
        written = pydicom.dcmread(report["uncertainty"]["output"])
        assert written.PhotometricInterpretation == "MONOCHROME2"
        maps[name] = pydicom.pixels.apply_modality_lut(written.pixel_array, written)
        # no error that the input or the upscaled output itself does not have
        assert dciodvfy_errors(report["uncertainty"]["output"]) <= (dciodvfy_errors(source)
                                                                    | dciodvfy_errors(report["output"]))
    assert np.median(maps["RG1_crop.dcm"]) < 0.05 * 4095  # near zero where the model agrees, not inverted
    assert maps["emri_small_RLE.dcm"].shape[0] == 10  # every frame
    # Outputs made with other options are other series: with and without the ensemble.
    plain_ds = pydicom.dcmread(upscaling.upscale_file(Nearest(), ct, tmp_path / "plain_series")["output"])
    assert plain_ds.SeriesInstanceUID != image.SeriesInstanceUID
    # Without the spread there is nothing to map: the file fails with the reason.
    plain = upscaling.upscale_file(Nearest(), ct, tmp_path / "plain", uncertainty=True)
    assert plain["status"] == "failed" and "needs the self-ensemble's spread" in plain["error"]


def test_adaptation_per_file_is_recorded_in_the_output(testdata, tiny_model, nearest, tmp_path):
    _, predictor = tiny_model
    report = upscaling.upscale_file(predictor, testdata("CT_small.dcm"), tmp_path, tile=64, overlap=8,
                                    adapt=dict(steps=3, seconds=None, seed=2, patch=32))
    assert report["status"] == "ok", report["error"]
    assert report["adaptation"]["steps"] == 3 and report["adaptation"]["seed"] == 2
    description = pydicom.dcmread(report["output"]).DerivationDescription
    assert "adapted to this input: 3 self-supervised steps" in description and "seed 2" in description
    refused = upscaling.upscale_file(nearest, testdata("CT_small.dcm"), tmp_path / "no", adapt=dict(steps=3))
    assert refused["status"] == "failed" and "per-scan adaptation needs a Keras model" in refused["error"]


def test_cli_ensemble_uncertainty_and_adaptation_flags(testdata, tiny_model, tmp_path):
    model, _ = tiny_model
    out = tmp_path / "out"
    result = _cli(f"--model={model}", f"--input={testdata('CT_small.dcm')}", f"--output={out}", "--uncertainty",
                  "--adapt_steps=2", "--seed=1", "--tile=64", "--overlap=8")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "upscale_report.json").read_text())
    assert report["ensemble"] is True and report["adapt"]["steps"] == 2
    item = report["files"][0]
    assert item["adaptation"]["steps"] == 2 and os.path.isfile(item["uncertainty"]["output"])
    assert "uncertainty ->" in result.stdout
    description = pydicom.dcmread(item["output"]).DerivationDescription
    assert "self-ensemble" in description and "adapted to this input" in description
    for flag, message in (("--adapt_steps=-2", "--adapt_steps must be a whole number >= 0, got -2"),
                          ("--adapt_seconds=0", "--adapt_seconds must be > 0"),
                          ("--uncertainty_threshold=-1", "--uncertainty_threshold must be >= 0")):
        refused = _cli(f"--model={model}", f"--input={testdata('MR_small.dcm')}", f"--output={tmp_path / 'no'}",
                       flag, "--adapt_steps=1" if "seconds" in flag else "--noensemble")
        assert refused.returncode != 0 and message in refused.stderr, refused.stderr[-2000:]
    assert not (tmp_path / "no").exists()
