"""sr_tf.data.pipeline on records written from real DICOM files."""

import hashlib
import os

import numpy as np
import pytest
import tensorflow as tf

from sr_tf.io.shards import ShardWriter
from sr_tf import intensity, records
from sr_tf.data import degrade, pipeline

# (file, frames, split). Sizes: 693_UNCI 512x512 CT, CT_small 128x128 CT,
# MR_small 64x64 MR, emri_small ten 64x64 MR frames.
LAYOUT = [
    ("693_UNCI.dcm", [0], "train"),
    ("CT_small.dcm", [0], "train"),
    ("MR_small.dcm", [0], "train"),
    ("emri_small.dcm", range(0, 6), "train"),
    ("emri_small.dcm", range(6, 10), "val"),
    ("CT_small.dcm", [0], "val"),
    ("MR_small.dcm", [0], "test"),
]
COUNTS = {"train": 9, "val": 5, "test": 1}
TRAIN_LARGEST = 512


def _read(path):
    """Physical slices of a DICOM file and its intensity range (docs/DESIGN.md, contract 1)."""
    import pydicom
    from pydicom.pixels import apply_modality_lut

    ds = pydicom.dcmread(path)
    physical = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    frames = physical if physical.ndim == 3 else physical[np.newaxis]
    lo, hi = intensity.CT_RANGE if ds.Modality == "CT" else intensity.percentile_range(frames)
    return ds.Modality, frames, lo, hi


def _record(image, modality, source, index, lo, hi, split, patient="p"):
    stored, _ = intensity.to_stored(image, lo, hi)
    return records.serialize(
        records.SliceRecord(stored, modality, source, patient, index, (0.5, 0.5), lo, hi, split)
    )


def _write(folder, serialized_by_split, shard_size_mb):
    with ShardWriter(folder, shard_size_mb=shard_size_mb) as writer:
        for split, serialized in serialized_by_split:
            writer.add(split, serialized)
    return os.fspath(folder)


@pytest.fixture(scope="module")
def data(tmp_path_factory, testdata):
    """Record folders: ``many`` (one shard per record), ``single`` (one shard per split),
    ``flat`` (one mostly black training image) and the stored test images."""
    serialized, stored_images = [], {}
    for name, frames, split in LAYOUT:
        path = testdata(name)
        modality, slices, lo, hi = _read(path)
        for index in frames:
            serialized.append((split, _record(slices[index], modality, path, index, lo, hi, split)))
            stored_images[(path, index, split)] = intensity.to_stored(slices[index], lo, hi)[0]
    root = tmp_path_factory.mktemp("records")
    many = _write(root / "many", serialized, shard_size_mb=1e-9)
    single = _write(root / "single", serialized, shard_size_mb=100)

    # A 256x256 black image whose only texture is a 64x64 piece of the small CT.
    modality, slices, lo, hi = _read(testdata("CT_small.dcm"))
    canvas = np.full((256, 256), lo)
    canvas[160:224, 32:96] = slices[0][32:96, 32:96]
    flat = _write(root / "flat", [("train", _record(canvas, modality, "flat", 0, lo, hi, "train"))], 100)
    return {"many": many, "single": single, "flat": flat, "stored": stored_images}


def _batches(dataset, count=None):
    items = dataset if count is None else dataset.take(count)
    return [tuple(t.numpy() for t in (item if isinstance(item, tuple) else (item,))) for item in items]


def _context(pipeline_id, pipelines=2, replicas=None):
    return tf.distribute.InputContext(
        num_input_pipelines=pipelines, input_pipeline_id=pipeline_id, num_replicas_in_sync=replicas or pipelines
    )


def test_manifest_layout(data):
    manifest = records.read_manifest(data["many"])
    assert manifest["counts"] == COUNTS
    assert len(records.shard_files(data["many"], "train")) == COUNTS["train"]
    assert len(records.shard_files(data["single"], "train")) == 1


@pytest.mark.parametrize("preset", degrade.PRESETS)
def test_train_batches_per_preset(preset, data):
    dataset = pipeline.make_dataset(data["many"], "train", 4, 64, 4, degradation=preset, shuffle_buffer=8)
    ((lr, hr),) = _batches(dataset, 1)
    hr_size = 16 if preset == "self_supervised" else 64
    lr_size = hr_size // degrade.model_scale(preset, 4)
    assert hr.shape == (4, hr_size, hr_size, 1) and lr.shape == (4, lr_size, lr_size, 1)
    assert hr.dtype == lr.dtype == np.float32
    assert 0.0 <= min(lr.min(), hr.min()) and max(lr.max(), hr.max()) <= 1.0
    assert dataset.element_spec[1].shape.as_list() == [4, hr_size, hr_size, 1]


@pytest.mark.parametrize("scale", [2, 8])
def test_train_batches_other_scales_and_hr_only(scale, data):
    ((lr, hr),) = _batches(pipeline.make_dataset(data["single"], "train", scale, 64, 2, shuffle_buffer=4), 1)
    assert lr.shape == (2, 64 // scale, 64 // scale, 1) and hr.shape == (2, 64, 64, 1)
    ((hr_only,),) = _batches(pipeline.make_dataset(data["single"], "train", scale, 64, 2, hr_only=True), 1)
    assert hr_only.shape == (2, 64, 64, 1)


def test_same_seed_same_batches_other_seed_other_batches(data):
    def take(seed):
        return _batches(pipeline.make_dataset(data["many"], "train", 4, 32, 4, "noisy", seed=seed), 3)

    first, again, other = take(7), take(7), take(8)
    for (lr_a, hr_a), (lr_b, hr_b) in zip(first, again):
        np.testing.assert_array_equal(hr_a, hr_b)
        np.testing.assert_array_equal(lr_a, lr_b)
    assert not np.array_equal(first[0][1], other[0][1])


def test_augmented_batches_are_repeatable_in_range_and_change_the_patches(data):
    def take(augment, seed=7):
        return _batches(pipeline.make_dataset(data["many"], "train", 4, 32, 8, seed=seed, augment=augment), 4)

    plain, augmented, again = take(False), take(True), take(True)
    for (lr_a, hr_a), (lr_b, hr_b) in zip(augmented, again):
        np.testing.assert_array_equal(hr_a, hr_b)
        np.testing.assert_array_equal(lr_a, lr_b)
    hr_plain = np.concatenate([hr for _, hr in plain])
    hr_augmented = np.concatenate([hr for _, hr in augmented])
    assert 0.0 <= hr_augmented.min() and hr_augmented.max() <= 1.0
    changed = [not np.array_equal(a, b) for a, b in zip(hr_plain, hr_augmented)]
    assert 0.3 < np.mean(changed) < 1.0  # the same crops, most of them changed, some left alone
    # The inputs are still the degraded targets, but for the faint noise on a few.
    for lr, hr in augmented:
        clean = degrade.downsample(hr, 4).numpy()
        assert np.abs(lr - clean).max() < 0.05 and np.median(np.abs(lr - clean)) < 1e-3


def test_unseeded_dataset_runs(data):
    ((lr, hr),) = _batches(pipeline.make_dataset(data["many"], "train", 2, 32, 4, seed=None), 1)
    assert lr.shape == (4, 16, 16, 1)


def test_flat_patches_are_skipped(data):
    min_std = pipeline.DEFAULT_MIN_PATCH_STD

    def patch_stds(tries):
        dataset = pipeline.make_dataset(
            data["flat"], "train", 2, 32, 16, hr_only=True, max_crop_tries=tries, shuffle_buffer=1
        )
        return np.concatenate([hr.std(axis=(1, 2, 3)) for (hr,) in _batches(dataset, 4)])

    assert (patch_stds(1) < min_std).mean() > 0.5  # most single crops are black
    assert (patch_stds(50) >= min_std).all()  # retried crops all land on the texture


def _eval_ids(folder, split, context=None):
    return [
        (e["source"].numpy().decode(), int(e["slice_index"]))
        for e in pipeline.make_eval_dataset(folder, split, input_context=context)
    ]


@pytest.mark.parametrize("folder", ["many", "single"])
def test_two_input_pipelines_cover_every_record_once(folder, data):
    everything = _eval_ids(data[folder], "train")
    shares = [_eval_ids(data[folder], "train", _context(i)) for i in (0, 1)]
    assert len(everything) == COUNTS["train"]
    assert shares[0] and shares[1]
    assert sorted(shares[0] + shares[1]) == sorted(everything)

    def val_patches(context=None):
        dataset = pipeline.make_dataset(data[folder], "val", 2, 64, 2, hr_only=True, input_context=context)
        return sorted(hashlib.sha1(patch.tobytes()).hexdigest() for (hr,) in _batches(dataset) for patch in hr)

    halves = [val_patches(_context(i)) for i in (0, 1)]
    assert sorted(halves[0] + halves[1]) == val_patches()
    assert len(val_patches()) == COUNTS["val"]


def test_input_context_batches_per_replica(data):
    dataset = pipeline.make_dataset(data["many"], "train", 4, 32, 8, input_context=_context(1, replicas=4))
    ((lr, hr),) = _batches(dataset, 1)
    assert hr.shape == (2, 32, 32, 1) and lr.shape == (2, 8, 8, 1)


def test_distribute_datasets_from_function(data):
    strategy = tf.distribute.get_strategy()
    distributed = strategy.distribute_datasets_from_function(
        lambda context: pipeline.make_dataset(data["single"], "train", 2, 32, 4, input_context=context)
    )
    lr, hr = next(iter(distributed))
    assert hr.shape == (4, 32, 32, 1)


def test_validation_is_identical_on_every_call_and_not_augmented(data):
    def val(seed=0):
        return _batches(pipeline.make_dataset(data["many"], "val", 4, 64, 2, degradation="noisy", seed=seed))

    first, second = val(), val(seed=None)  # evaluation ignores a missing seed: always repeatable
    assert [lr.shape[0] for lr, _ in first] == [2, 2, 1]  # the last batch is kept
    for (lr_a, hr_a), (lr_b, hr_b) in zip(first, second):
        np.testing.assert_array_equal(lr_a, lr_b)
        np.testing.assert_array_equal(hr_a, hr_b)
    # Every HR patch is the centre crop of a stored validation image.
    stored = [image for (_, _, split), image in data["stored"].items() if split == "val"]
    centre_crops = {_centre_crop(image, 64).tobytes() for image in stored}
    for _, hr in first:
        for patch in hr:
            assert np.rint(patch[..., 0] * 65535.0).astype(np.uint16).tobytes() in centre_crops


def _centre_crop(image, size):
    top, left = (image.shape[0] - size) // 2, (image.shape[1] - size) // 2
    return image[top : top + size, left : left + size]


def test_images_smaller_than_the_patch_are_left_out(data, testdata):
    # Of the validation images only CT_small (128x128) holds a 128 patch; the 64x64 MR frames are dropped.
    ((hr,),) = _batches(pipeline.make_dataset(data["many"], "val", 2, 128, 4, hr_only=True))
    assert hr.shape == (1, 128, 128, 1)
    stored = data["stored"][(testdata("CT_small.dcm"), 0, "val")]
    np.testing.assert_array_equal(np.rint(hr[0, ..., 0] * 65535.0).astype(np.uint16), stored)


def test_validation_degradation_depends_on_the_image_not_the_pipelines(data):
    def pairs(context=None):
        global_batch = 1 if context is None else context.num_replicas_in_sync
        dataset = pipeline.make_dataset(data["many"], "val", 2, 64, global_batch, "noisy", input_context=context)
        return {hr.tobytes(): lr for lr, hr in _batches(dataset)}

    alone = pairs()
    shared = {**pairs(_context(0)), **pairs(_context(1))}
    assert alone.keys() == shared.keys()
    for key, lr in alone.items():
        np.testing.assert_array_equal(lr, shared[key])


def test_whole_validation_images(data):
    batches = _batches(pipeline.make_dataset(data["many"], "val", 8, None, 1, degradation="self_supervised"))
    # Whole 64x64 and 128x128 images (multiples of 8*8); the targets are them downsampled by 8.
    assert sorted(hr.shape[1] for _, hr in batches) == [8, 8, 8, 8, 16]
    for lr, hr in batches:
        assert hr.shape[1] == hr.shape[2] and lr.shape[1] * 8 == hr.shape[1]


def test_eval_dataset_yields_images_with_metadata(data, testdata):
    examples = list(pipeline.make_eval_dataset(data["many"], "val"))
    assert len(examples) == COUNTS["val"]
    example = next(e for e in examples if e["source"].numpy().decode().endswith("CT_small.dcm"))
    assert example["modality"].numpy() == b"CT"
    assert example["image"].shape == (128, 128, 1) and example["image"].dtype == tf.float32
    assert float(example["intensity_min"]) == intensity.CT_RANGE[0]
    assert float(example["intensity_max"]) == intensity.CT_RANGE[1]
    stored = data["stored"][(testdata("CT_small.dcm"), 0, "val")]
    np.testing.assert_array_equal(example["image_uint16"].numpy()[..., 0], stored)
    again = [(e["source"].numpy(), int(e["slice_index"])) for e in pipeline.make_eval_dataset(data["many"], "val")]
    assert again == [(e["source"].numpy(), int(e["slice_index"])) for e in examples]


def test_eval_dataset_crops_to_a_multiple(data):
    dataset = pipeline.make_eval_dataset(data["flat"], "train", multiple_of=48)
    (example,) = list(dataset)
    assert example["image"].shape == (240, 240, 1)
    assert int(example["height"]) == int(example["width"]) == 240
    assert example["crop_offset"].numpy().tolist() == [8, 8]


@pytest.mark.parametrize(
    "folder, kwargs, message",
    [
        ("missing", {}, "does not exist"),
        ("no_manifest", {}, "no manifest.json"),
        ("flat", {"split": "val"}, "split 'val' has no records"),
        ("many", {"split": "validation"}, "split must be one of"),
        ("many", {"patch_size": 640}, "no image is at least 640x640 pixels .*largest height 512"),
        ("many", {"patch_size": 60, "scale": 8}, "patch_size 60 must be a positive multiple of 8"),
        ("many", {"patch_size": 72, "degradation": "self_supervised"}, "multiple of 16"),
        ("many", {"degradation": "jpeg"}, "unknown degradation preset 'jpeg'"),
        ("many", {"scale": 3}, "scale must be one of"),
        ("many", {"split": "val", "patch_size": None, "batch_size": 4}, "1 image per replica"),
        ("many", {"patch_size": None}, "training needs a patch_size"),
        ("many", {"cache": "disk"}, "cache must be"),
    ],
)
def test_bad_inputs_raise_clear_errors(folder, kwargs, message, data, tmp_path):
    if folder == "missing":
        records_dir = os.fspath(tmp_path / "nowhere")
    elif folder == "no_manifest":
        (tmp_path / "train-00000.tfrecord").write_bytes(b"")
        records_dir = os.fspath(tmp_path)
    else:
        records_dir = data[folder]
    arguments = dict(split="train", scale=4, patch_size=64, batch_size=4)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message) as error:
        pipeline.make_dataset(records_dir, **arguments)
    assert isinstance(error.value, records.RecordsError)
    if folder in ("missing", "no_manifest", "flat"):
        assert records_dir in str(error.value)


def test_shards_are_checked_against_the_manifest(tmp_path, testdata, monkeypatch):
    """A truncated, corrupted or swapped shard is named with what is wrong before any
    batch is made; the SHA-256 check can be skipped for very large data."""
    import shutil

    from sr_tf import conversion as convert

    out = tmp_path / "records"
    split_map = {"1CT1": "train", "CQ500-CT-310": "train", "4MR1": "val"}
    convert.convert([testdata(n) for n in ("CT_small.dcm", "693_UNCI.dcm", "MR_small.dcm")], str(out),
                    convert.Options(split_map=split_map), progress=False)
    train_shard = records.shard_files(out, "train")[0]
    val_shard = records.shard_files(out, "val")[0]
    pristine = open(train_shard, "rb").read()
    assert pipeline.make_dataset(out, "train", 2, 32, 2) is not None

    with open(train_shard, "wb") as f:
        f.write(pristine[:-500])
    with pytest.raises(records.RecordsError, match=r"train-.*bytes, the manifest says \d+ \(truncated"):
        pipeline.make_dataset(out, "train", 2, 32, 2)
    corrupt = bytearray(pristine)
    corrupt[4000:4016] = bytes(16)
    with open(train_shard, "wb") as f:
        f.write(bytes(corrupt))
    with pytest.raises(records.RecordsError, match=r"train-.*SHA-256 differs from the manifest's"):
        pipeline.make_eval_dataset(out, "train")
    hashed = []
    monkeypatch.setattr(records, "file_sha256", lambda path: hashed.append(path) or "")
    records._CHECKED.clear()
    with open(train_shard, "wb") as f:
        f.write(pristine)
    pipeline.make_dataset(out, "train", 2, 32, 2, verify_checksums=False)
    assert not hashed  # skipped: no shard is read twice for very large data
    monkeypatch.undo()
    shutil.copyfile(val_shard, train_shard)  # a val shard under a train shard's name
    with pytest.raises(records.RecordsError, match=os.path.basename(train_shard)):
        pipeline.make_dataset(out, "train", 2, 32, 2)
