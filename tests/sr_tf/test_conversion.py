"""sr_tf.conversion: real DICOM, NIfTI and raster files into sharded TFRecords."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import cv2
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut

from tests import ROOT
from sr_tf import conversion as convert
from sr_tf.io import readers
from sr_tf.io.shards import ShardWriter
from sr_tf import intensity, records

NIBABEL_DATA = os.path.join(os.path.dirname(nib.__file__), "tests", "data")


def read_all(records_dir, split=None):
    """Every record of a data_prep output (optionally one split) as numpy dicts."""
    import tensorflow as tf

    manifest = records.read_manifest(records_dir)
    splits = [split] if split else records.SPLITS
    out = []
    for name in splits:
        for path in records.shard_files(records_dir, name, manifest):
            for raw in tf.data.TFRecordDataset(path):
                parsed = records.parse(raw)
                item = {k: v.numpy() for k, v in parsed.items()}
                for key in ("modality", "source", "patient_id", "split"):
                    item[key] = item[key].decode()
                out.append(item)
    return out


def run(inputs, output, **kwargs):
    kwargs.setdefault("val_fraction", 0.0)
    kwargs.setdefault("test_fraction", 0.0)
    return convert.convert([os.fspath(p) for p in inputs], os.fspath(output), convert.Options(**kwargs), progress=False)


def physical(record):
    return intensity.to_physical(record["image_uint16"][..., 0], record["intensity_min"], record["intensity_max"])


def test_ct_hu_match_modality_lut_within_one_step(testdata, tmp_path):
    path = testdata("693_UNCI.dcm")
    run([path], tmp_path / "out")
    (record,) = read_all(tmp_path / "out")
    ds = pydicom.dcmread(path)
    expected = np.clip(apply_modality_lut(ds.pixel_array, ds), *intensity.CT_RANGE)
    assert record["modality"] == "CT"
    assert (record["intensity_min"], record["intensity_max"]) == intensity.CT_RANGE
    assert record["patient_id"] == "CQ500-CT-310"
    np.testing.assert_allclose(record["pixel_spacing"], [0.478516, 0.478516], rtol=1e-6)
    step = intensity.quantisation_step(*intensity.CT_RANGE)
    assert np.max(np.abs(physical(record) - expected)) <= step / 2 + 1e-9
    # Contract 1: values outside the range are clipped and counted.
    manifest = records.read_manifest(tmp_path / "out")
    outside = np.count_nonzero((apply_modality_lut(ds.pixel_array, ds) < -1024) | (apply_modality_lut(ds.pixel_array, ds) > 3071))
    assert manifest["stats"]["clipped_pixels"] == outside > 0


def test_enhanced_multiframe_ct_uses_functional_group_rescale(testdata, tmp_path):
    path = testdata("eCT_Supplemental.dcm")
    run([path], tmp_path / "out")
    got = sorted(read_all(tmp_path / "out"), key=lambda r: r["slice_index"])
    ds = pydicom.dcmread(path)
    assert [r["slice_index"] for r in got] == [0, 1]  # one record per frame
    for index, record in enumerate(got):
        expected = np.clip(ds.pixel_array[index].astype(float) - 1024.0, *intensity.CT_RANGE)
        assert np.max(np.abs(physical(record) - expected)) <= intensity.quantisation_step(*intensity.CT_RANGE)
        np.testing.assert_allclose(record["pixel_spacing"], [0.388672, 0.388672], rtol=1e-6)


def test_monochrome1_radiograph_is_inverted(testdata, tmp_path):
    path = testdata("RG1_UNCI.dcm")
    run([path], tmp_path / "out")
    (record,) = read_all(tmp_path / "out")
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    assert record["modality"] == "CR"
    assert (record["intensity_min"], record["intensity_max"]) == (0.0, 2.0**15 - 1)
    expected = (2**15 - 1) - ds.pixel_array.astype(float)
    assert np.max(np.abs(physical(record) - expected)) <= intensity.quantisation_step(0, 2**15 - 1)


@pytest.mark.parametrize(
    "compressed, plain",
    [("emri_small_jpeg_2k_lossless.dcm", "emri_small.dcm"), ("MR_small_RLE.dcm", "MR_small.dcm")],
)
def test_jpeg2000_and_rle_decode_like_their_uncompressed_twins(testdata, tmp_path, compressed, plain):
    run([testdata(compressed)], tmp_path / "c")
    run([testdata(plain)], tmp_path / "p")
    got, want = read_all(tmp_path / "c"), read_all(tmp_path / "p")
    assert len(got) == len(want) == int(pydicom.dcmread(testdata(plain)).get("NumberOfFrames", 1))
    for a, b in zip(sorted(got, key=lambda r: r["slice_index"]), sorted(want, key=lambda r: r["slice_index"])):
        np.testing.assert_array_equal(a["image_uint16"], b["image_uint16"])


def test_rgb_dicom_becomes_luminance(testdata, tmp_path):
    run([testdata("SC_rgb.dcm"), testdata("US1_J2KR.dcm")], tmp_path / "out")
    got = {os.path.basename(r["source"]): r for r in read_all(tmp_path / "out")}
    rgb = pydicom.dcmread(testdata("SC_rgb.dcm")).pixel_array
    expected = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(float)
    assert got["SC_rgb.dcm"]["image_uint16"].shape == (100, 100, 1)
    np.testing.assert_allclose(physical(got["SC_rgb.dcm"]), expected, atol=0.01)
    assert got["US1_J2KR.dcm"]["image_uint16"].shape == (480, 640, 1)


def _las_and_ras_twins(tmp_path):
    las = nib.load(os.path.join(NIBABEL_DATA, "anatomical.nii"))
    assert nib.aff2axcodes(las.affine) == ("L", "A", "S")
    transform = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(las.affine), nib.orientations.axcodes2ornt(("R", "A", "S"))
    )
    ras = las.as_reoriented(transform)
    assert nib.aff2axcodes(ras.affine) == ("R", "A", "S")
    las_path, ras_path = tmp_path / "las" / "subj.nii.gz", tmp_path / "ras" / "subj.nii.gz"
    for img, path in ((las, las_path), (ras, ras_path)):
        path.parent.mkdir()
        nib.save(img, path)
    return las_path, ras_path


@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal"])
def test_las_nifti_gives_the_same_slices_as_its_ras_twin(tmp_path, axis):
    las_path, ras_path = _las_and_ras_twins(tmp_path)
    run([las_path], tmp_path / "a", slice_axis=axis, keep_empty=True)
    run([ras_path], tmp_path / "b", slice_axis=axis, keep_empty=True)
    a = sorted(read_all(tmp_path / "a"), key=lambda r: r["slice_index"])
    b = sorted(read_all(tmp_path / "b"), key=lambda r: r["slice_index"])
    shape = nib.load(las_path).shape
    assert len(a) == shape[readers.SLICE_AXES[axis]]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image_uint16"], y["image_uint16"])
    # Rows run anterior->posterior (axial): the in-plane axes are the other two of (R, A, S).
    assert a[0]["image_uint16"].shape[:2] == {
        "axial": (shape[1], shape[0]), "coronal": (shape[2], shape[0]), "sagittal": (shape[2], shape[1])
    }[axis]
    assert a[0]["modality"] == "MR" and a[0]["patient_id"] == "subj"


def test_nifti_axial_slice_matches_the_canonical_volume(tmp_path):
    las_path, _ = _las_and_ras_twins(tmp_path)
    run([las_path], tmp_path / "a", keep_empty=True)
    got = sorted(read_all(tmp_path / "a"), key=lambda r: r["slice_index"])
    canonical = nib.as_closest_canonical(nib.load(las_path))
    data = canonical.get_fdata()
    lo, hi = intensity.percentile_range(data)
    k = data.shape[2] // 2
    expected = np.clip(np.rot90(data[:, :, k]), lo, hi)
    assert np.max(np.abs(physical(got[k]) - expected)) <= intensity.quantisation_step(lo, hi)
    zooms = canonical.header.get_zooms()
    np.testing.assert_allclose(got[k]["pixel_spacing"], [zooms[1], zooms[0]], rtol=1e-6)


def test_4d_nifti_volume_index_and_all(tmp_path):
    path = os.path.join(NIBABEL_DATA, "example4d.nii.gz")
    run([path], tmp_path / "one", keep_empty=True)
    run([path], tmp_path / "all", keep_empty=True, volume_index="all")
    one, every = read_all(tmp_path / "one"), read_all(tmp_path / "all")
    assert len(one) == 24 and len(every) == 48
    assert {r["source"].rsplit("#", 1)[1] for r in every} == {"volume=0", "volume=1"}
    with pytest.raises(convert.ConversionError, match="volume_index=5 out of range"):
        run([path], tmp_path / "bad", volume_index=5)


def test_mni152_volume_and_ct_detection(tmp_path):
    from nilearn.datasets import MNI152_FILE_PATH

    mni = nib.load(MNI152_FILE_PATH)
    ct_like = nib.Nifti1Image(np.asarray(mni.dataobj, np.float32)[::4, ::4, ::8] * 10 - 1000, mni.affine)
    nib.save(ct_like, tmp_path / "ct.nii.gz")
    run([tmp_path / "ct.nii.gz"], tmp_path / "ct")
    ct = read_all(tmp_path / "ct")
    assert {r["modality"] for r in ct} == {"CT"}
    assert (ct[0]["intensity_min"], ct[0]["intensity_max"]) == intensity.CT_RANGE
    run([tmp_path / "ct.nii.gz"], tmp_path / "forced", modality="MR")
    assert {r["modality"] for r in read_all(tmp_path / "forced")} == {"MR"}


def test_raster_xrays_png8_png16_jpeg_tiff_and_rgb(testdata, tmp_path):
    ds = pydicom.dcmread(testdata("CT_small.dcm"))
    image16 = (ds.pixel_array.astype(np.int64) - ds.pixel_array.min()).astype(np.uint16) * 8
    image8 = (image16 >> 8).astype(np.uint8)
    src = tmp_path / "src"
    src.mkdir()
    cv2.imwrite(str(src / "p16_001.png"), image16)
    cv2.imwrite(str(src / "p08_001.png"), image8)
    cv2.imwrite(str(src / "p08_002.jpg"), image8)
    cv2.imwrite(str(src / "p16_002.tif"), image16)
    cv2.imwrite(str(src / "rgb_001.png"), np.dstack([image8, image8, image8]))
    run([src], tmp_path / "out", patient_id_regex=r"^([a-z0-9]+)_")
    got = {os.path.basename(r["source"]): r for r in read_all(tmp_path / "out")}
    assert set(got) == {"p16_001.png", "p08_001.png", "p08_002.jpg", "p16_002.tif", "rgb_001.png"}
    assert got["p16_001.png"]["intensity_max"] == 65535.0 and got["p08_001.png"]["intensity_max"] == 255.0
    np.testing.assert_array_equal(got["p16_001.png"]["image_uint16"][..., 0], image16)
    np.testing.assert_array_equal(got["p16_002.tif"]["image_uint16"][..., 0], image16)
    np.testing.assert_allclose(physical(got["p08_001.png"]), image8, atol=1e-6)
    np.testing.assert_allclose(physical(got["rgb_001.png"]), image8, atol=1e-6)
    assert np.mean(np.abs(physical(got["p08_002.jpg"]) - image8)) < 3  # lossy JPEG
    assert {r["modality"] for r in got.values()} == {"DX"}
    assert got["p16_002.tif"]["patient_id"] == "p16" and got["p08_002.jpg"]["patient_id"] == "p08"


def _write_series(testdata, folder, positions):
    """A series of slices derived from CT_small, shuffled InstanceNumbers, distinct offsets."""
    ds = pydicom.dcmread(testdata("CT_small.dcm"))
    folder.mkdir()
    base = ds.pixel_array.astype(np.int16)
    for k, z in enumerate(positions):
        item = ds.copy()
        item.ImagePositionPatient = [0.0, 0.0, z]
        item.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        item.InstanceNumber = 100 - k  # deliberately not the spatial order
        item.SOPInstanceUID = pydicom.uid.generate_uid()
        item.PixelData = (base + int(z)).astype(np.int16).tobytes()
        item.save_as(folder / f"slice_{k:02d}.dcm")


def test_series_folder_is_sorted_by_image_position(testdata, tmp_path):
    positions = [30.0, -10.0, 50.0, 10.0]
    _write_series(testdata, tmp_path / "series", positions)
    run([tmp_path / "series"], tmp_path / "out")
    got = sorted(read_all(tmp_path / "out"), key=lambda r: r["slice_index"])
    assert len(got) == 4
    medians = [np.median(physical(r)) for r in got]
    assert medians == sorted(medians)  # ascending z
    order = np.argsort(positions)
    assert [os.path.basename(r["source"]) for r in got] == [f"slice_{k:02d}.dcm" for k in order]


def test_patients_never_span_splits_and_rerun_gives_the_same_split(testdata, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    names = ["CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "emri_small.dcm", "SC_rgb.dcm", "693_UNCI.dcm"]
    for name in names:
        shutil.copy(testdata(name), src / name)
    kwargs = dict(val_fraction=0.3, test_fraction=0.3, workers=2)
    first = run([src], tmp_path / "out", **kwargs)
    a = read_all(tmp_path / "out")
    where = {}
    for r in a:
        where.setdefault(r["patient_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in where.values()), where
    # MR_small and MR_small_RLE are the same patient (4MR1): one split for both.
    assert len(where["4MR1"]) == 1
    run([src], tmp_path / "out", **kwargs)
    b = read_all(tmp_path / "out")
    key = lambda r: (r["source"], r["slice_index"])  # noqa: E731
    assert {key(r): r["split"] for r in a} == {key(r): r["split"] for r in b}
    assert first["counts"] == records.read_manifest(tmp_path / "out")["counts"]
    assert first["options"]["workers"] == 2


def test_split_is_a_stable_hash_and_respects_fractions():
    ids = [f"patient-{i}" for i in range(4000)]
    splits = [convert.split_for(pid, 0.1, 0.2) for pid in ids]
    assert splits == [convert.split_for(pid, 0.1, 0.2) for pid in ids]
    assert abs(splits.count("test") / len(ids) - 0.2) < 0.03
    assert abs(splits.count("val") / len(ids) - 0.1) < 0.03
    assert convert.split_for("patient-1", 0.1, 0.2, {"patient-1": "val"}) == "val"


def test_bad_inputs_are_reported_and_good_ones_survive(testdata, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    good = testdata("CT_small.dcm")
    data = open(good, "rb").read()
    (src / "truncated.dcm").write_bytes(data[: len(data) // 2])
    (src / "corrupt.dcm").write_bytes(b"\x00" * 128 + b"DICM" + os.urandom(300))
    shutil.copy(testdata("rtplan.dcm"), src / "rtplan.dcm")
    ds = pydicom.dcmread(good)
    ds.Rows, ds.Columns, ds.PixelData = 0, 0, b""
    ds.save_as(src / "zero.dcm")
    (src / "empty.png").write_bytes(b"")
    (src / "empty.dcm").write_bytes(b"")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage")
    nan = np.ones((8, 8, 3), np.float32)
    nan[2, 2, 1] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), src / "nan.nii.gz")
    (src / "notes.txt").write_text("not an image")
    shutil.copy(testdata("JPGExtended.dcm"), src / "jpeg_extended.dcm")
    shutil.copy(good, src / "good.dcm")
    manifest = run([src, src / "notes.txt", tmp_path / "missing.dcm"], tmp_path / "out")
    reasons = {os.path.basename(f["input"]): f["reason"] for f in manifest["failed"]}
    assert "not a readable DICOM" in reasons["truncated.dcm"] or "decoded" in reasons["truncated.dcm"]
    assert "not a readable DICOM" in reasons["corrupt.dcm"] or "not a valid DICOM" in reasons["corrupt.dcm"]
    assert "no pixel data" in reasons["rtplan.dcm"] and "RTPLAN" in reasons["rtplan.dcm"]
    assert "zero-size" in reasons["zero.dcm"]
    assert "empty file" in reasons["empty.png"]
    assert reasons["empty.dcm"] == "empty file (0 bytes)"
    assert "not a decodable" in reasons["broken.png"]
    assert "NaN or Inf" in reasons["nan.nii.gz"]
    assert "unknown format" in reasons["notes.txt"]
    assert "no such file" in reasons["missing.dcm"]
    try:
        import pylibjpeg_libjpeg  # noqa: F401  (optional GPL decoder)
    except ImportError:
        assert "pip install pylibjpeg-libjpeg" in reasons["jpeg_extended.dcm"]
    assert "good.dcm" not in reasons
    assert manifest["counts"]["train"] == 1
    assert [os.path.basename(r["source"]) for r in read_all(tmp_path / "out")] == ["good.dcm"]


def test_strict_stops_at_first_failure_and_publishes_nothing(testdata, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"")
    with pytest.raises(convert.ConversionError, match="bad.png: empty file"):
        run([testdata("CT_small.dcm"), bad], tmp_path / "out", strict=True)
    assert not (tmp_path / "out" / records.MANIFEST_NAME).exists()


def test_rerun_replaces_the_output_and_leaves_no_old_shards(testdata, tmp_path):
    out = tmp_path / "out"
    run([testdata("CT_small.dcm"), testdata("MR_small.dcm")], out, shard_size_mb=0.001)
    old = set(os.listdir(out))
    manifest = run([testdata("MR_small.dcm")], out)
    files = set(os.listdir(out))
    assert files == {records.MANIFEST_NAME} | {s["file"] for s in manifest["shards"]}
    assert not (old - {records.MANIFEST_NAME}) & files
    assert [os.path.basename(r["source"]) for r in read_all(out)] == ["MR_small.dcm"]


KILLED_WRITER = textwrap.dedent(
    """
    import sys, time
    from sr_tf.io.shards import ShardWriter
    with ShardWriter(sys.argv[1], shard_size_mb=0.0005) as writer:
        payload = bytes(400)
        for i in range(10**6):
            writer.add("train", payload)
            if i == 3:
                print("started", flush=True)
            time.sleep(0.002)
    """
)


def test_writer_killed_mid_shard_leaves_nothing_listed_incomplete(testdata, tmp_path):
    """Also: while a conversion runs, a second one into the same folder is refused (the
    first one's shards survive); the killed run's lock is taken over by the next run."""
    from sr_tf.io.shards import LOCK_NAME, OutputLockedError

    out = tmp_path / "out"
    run([testdata("CT_small.dcm")], out)
    before = records.read_manifest(out)
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "started"
    time.sleep(1.0)
    with pytest.raises(OutputLockedError, match=rf"another data_prep is writing here \(pid {proc.pid} on "):
        run([testdata("MR_small.dcm")], out)
    assert records.read_manifest(out) == before
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    leftovers = [n for n in os.listdir(out) if n.endswith(".incomplete") or n.startswith("train-") and n not in
                 {s["file"] for s in before["shards"]}]
    assert leftovers, "the killed writer should have left partial files behind"
    after = records.read_manifest(out)
    assert after == before  # the published output is untouched
    for shard in after["shards"]:
        path = out / shard["file"]
        assert os.path.getsize(path) == shard["bytes"]
        assert records.file_sha256(path) == shard["sha256"]
    # The next run takes over the dead run's lock and cleans up what it left.
    assert (out / LOCK_NAME).exists()
    manifest = run([testdata("CT_small.dcm")], out)
    assert set(os.listdir(out)) == {records.MANIFEST_NAME} | {s["file"] for s in manifest["shards"]}


def test_writer_aborts_on_error_without_publishing(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, shard_size_mb=0.0001) as writer:
            for _ in range(5):
                writer.add("train", bytes(200))
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_sample_set_has_every_split_non_empty(tmp_path):
    from sr_tf.io import samples

    manifest = run(samples.sample_paths(), tmp_path / "samples", split_map=samples.SAMPLE_SPLITS,
                   val_fraction=0.1, test_fraction=0.1)
    assert all(manifest["counts"][split] > 0 for split in records.SPLITS), manifest["counts"]
    assert set(manifest["stats"]["modalities"]) == {"CT", "CR", "MR"}
    assert manifest["failed"] == []


def test_broken_symlinks_fail_and_fifos_are_skipped_without_stopping_the_rest(testdata, tmp_path):
    import threading

    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(testdata("CT_small.dcm"), src / "good.dcm")
    os.symlink(src / "gone.dcm", src / "dangling.dcm")
    os.symlink(src / "loop.dcm", src / "loop.dcm")
    os.mkfifo(src / "pipe")
    result = {}
    worker = threading.Thread(target=lambda: result.update(manifest=run([src], tmp_path / "out")), daemon=True)
    worker.start()
    worker.join(120)
    assert not worker.is_alive(), "data_prep waited on the FIFO"
    manifest = result["manifest"]
    reasons = {os.path.basename(f["input"]): f["reason"] for f in manifest["failed"]}
    assert "broken symbolic link" in reasons["dangling.dcm"] and "broken symbolic link" in reasons["loop.dcm"]
    skipped = {os.path.basename(s["input"]): s["reason"] for s in manifest["stats"]["skipped_files"]}
    assert "FIFO" in skipped["pipe"], skipped
    assert [os.path.basename(r["source"]) for r in read_all(tmp_path / "out")] == ["good.dcm"]


def test_a_segmentation_is_refused_and_the_rest_converts(testdata, tmp_path):
    manifest = run([testdata("liver.dcm"), testdata("CT_small.dcm")], tmp_path / "out")
    reasons = {os.path.basename(f["input"]): f["reason"] for f in manifest["failed"]}
    assert "segmentation (BINARY)" in reasons["liver.dcm"] and "labels, not image intensities" in reasons["liver.dcm"]
    assert [os.path.basename(r["source"]) for r in read_all(tmp_path / "out")] == ["CT_small.dcm"]


def test_an_image_claiming_too_many_pixels_is_refused_before_decoding(testdata, tmp_path, png_bomb):
    """A small PNG whose header says 32000 x 32000 (a decompression bomb): refused from its
    header, naming the size and the limit; the rest converts."""
    (tmp_path / "src").mkdir()
    bomb = png_bomb(tmp_path / "src" / "bomb.png")
    assert bomb.stat().st_size < 100_000
    shutil.copy(testdata("CT_small.dcm"), tmp_path / "src" / "good.dcm")
    manifest = run([tmp_path / "src"], tmp_path / "out")
    reasons = {os.path.basename(f["input"]): f["reason"] for f in manifest["failed"]}
    assert ("32000 x 32000 pixels (1024 MP) is over the limit of 100 MP (--max_pixels); refused before decoding"
            in reasons["bomb.png"])
    assert [os.path.basename(r["source"]) for r in read_all(tmp_path / "out")] == ["good.dcm"]
    with pytest.raises(convert.ConversionError, match=r"good.dcm: a frame of 128 x 128 pixels .* limit of 0.0001 MP"):
        run([tmp_path / "src" / "good.dcm"], tmp_path / "out2", max_pixels=100)


def test_file_names_that_are_not_utf8_convert(testdata, tmp_path):
    """Names whose bytes are not UTF-8 (a DICOM and a PNG) convert; the record keeps the
    name escaped."""
    import cv2

    src = tmp_path / "src"
    src.mkdir()
    dicom = os.path.join(os.fsencode(src), b"ct\xff.dcm")
    shutil.copy(testdata("CT_small.dcm"), dicom)
    ok, png = cv2.imencode(".png", (np.arange(64 * 64) % 251).astype(np.uint8).reshape(64, 64))
    with open(os.path.join(os.fsencode(src), b"x\xff\xfe.png"), "wb") as f:
        f.write(png.tobytes())
    manifest = run([src], tmp_path / "out")
    assert not manifest["failed"]
    names = sorted(os.path.basename(r["source"]) for r in read_all(tmp_path / "out"))
    assert names == ["ct\\udcff.dcm", "x\\udcff\\udcfe.png"]
