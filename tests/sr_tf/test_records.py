"""sr_tf.records: the record schema, its PNG encoding and the manifest's checks."""

import json
import os

import numpy as np
import pydicom
import pytest
import tensorflow as tf

from sr_tf import records


@pytest.fixture
def slice_record(testdata):
    pixels = pydicom.dcmread(testdata("CT_small.dcm")).pixel_array
    image = (pixels.astype(np.int64) - pixels.min()).astype(np.uint16) * 16
    return records.SliceRecord(image=image, modality="CT", source="ct\udcff.dcm", patient_id="1CT1", slice_index=3,
                               pixel_spacing=(0.66, 0.66), intensity_min=-1024.0, intensity_max=3071.0, split="val")


def test_a_record_round_trips_every_field(slice_record):
    parsed = records.parse(tf.constant(records.serialize(slice_record)))
    np.testing.assert_array_equal(parsed["image_uint16"].numpy()[..., 0], slice_record.image)
    np.testing.assert_allclose(parsed["image"].numpy()[..., 0], slice_record.image / 65535.0, atol=1e-7)
    assert (int(parsed["height"]), int(parsed["width"])) == slice_record.image.shape
    assert parsed["modality"].numpy() == b"CT" and parsed["split"].numpy() == b"val"
    assert parsed["source"].numpy().decode() == "ct\\udcff.dcm"  # a non-UTF-8 name, escaped
    assert int(parsed["slice_index"]) == 3
    np.testing.assert_allclose(parsed["pixel_spacing"].numpy(), [0.66, 0.66], rtol=1e-6)
    assert (float(parsed["intensity_min"]), float(parsed["intensity_max"])) == (-1024.0, 3071.0)


def test_png16_encoding(slice_record):
    png = records.encode_png16(slice_record.image)
    assert records.png_size(png) == slice_record.image.shape
    np.testing.assert_array_equal(records.decode_png16(png), slice_record.image)
    with pytest.raises(ValueError, match="uint16"):
        records.encode_png16(slice_record.image.astype(np.float32))
    with pytest.raises(ValueError, match="not a PNG"):
        records.png_size(b"GIF89a" + bytes(30))


def _folder(tmp_path, shards):
    folder = tmp_path / "records"
    folder.mkdir(exist_ok=True)
    (folder / records.MANIFEST_NAME).write_text(json.dumps({"version": 1, "shards": shards}))
    return folder


def test_only_listed_shards_of_the_right_size_and_checksum_are_read(tmp_path, slice_record):
    folder = _folder(tmp_path, [])
    name = records.shard_name("train", 0, "20260101T000000-abcdef")
    with tf.io.TFRecordWriter(os.fspath(folder / name)) as writer:
        writer.write(records.serialize(slice_record))
    entry = {"file": name, "split": "train", "records": 1, "bytes": os.path.getsize(folder / name),
             "sha256": records.file_sha256(folder / name)}
    (folder / "stray.tfrecord").write_bytes(b"never read")
    _folder(tmp_path, [entry])
    assert records.shard_files(folder, "train", checksums=True) == [os.path.join(os.fspath(folder), name)]
    assert records.shard_files(folder, "val") == [] and records.record_count(folder, "train") == 1

    _folder(tmp_path, [dict(entry, bytes=entry["bytes"] + 1)])
    with pytest.raises(records.RecordsError, match="the manifest says"):
        records.shard_files(folder, "train")
    _folder(tmp_path, [dict(entry, sha256="0" * 64)])
    with pytest.raises(records.RecordsError, match="SHA-256 differs"):
        records.shard_files(folder, "train", checksums=True)
    _folder(tmp_path, [dict(entry, file="train-00009-x.tfrecord")])
    with pytest.raises(records.RecordsError, match="missing shard"):
        records.shard_files(folder, "train")
    with pytest.raises(ValueError, match="split must be one of"):
        records.shard_files(folder, "everything")


def test_a_folder_that_is_not_records_is_named(tmp_path):
    with pytest.raises(records.RecordsError, match="does not exist"):
        records.read_manifest(tmp_path / "nowhere")
    with pytest.raises(records.RecordsError, match="no manifest.json"):
        records.read_manifest(tmp_path)
    (tmp_path / records.MANIFEST_NAME).write_text("{not json")
    with pytest.raises(records.RecordsError, match="unreadable manifest"):
        records.read_manifest(tmp_path)
    (tmp_path / records.MANIFEST_NAME).write_text("[]")
    with pytest.raises(records.RecordsError, match="no shard list"):
        records.read_manifest(tmp_path)
