"""The one TFRecord schema and the manifest that lists shards (docs/DESIGN.md, contract 2:
record schema).

The writer (``data_prep``) and every reader (``sr_tf.data.pipeline``, ``evaluate.py``)
import this module, so the schema lives in exactly one place.

A record holds one 2-D slice as a 16-bit grayscale PNG plus its provenance:

=================  ==========  ===================================================
feature            type        meaning
=================  ==========  ===================================================
image              bytes       PNG, uint16, one channel
height, width      int64       image size in pixels
modality           bytes       ``CT``, ``CR``/``DX`` (X-ray), ``MR``, ...
source             bytes       file path or id the slice came from
patient_id         bytes       decides the split (docs/DESIGN.md, contract 3)
slice_index        int64       position in its volume/series/frames; 0 for 2-D
pixel_spacing      float x2    row, column spacing in mm; 0 when unknown
intensity_min/max  float       physical values mapped to 0 and 65535
split              bytes       ``train``, ``val`` or ``test``
=================  ==========  ===================================================
"""

import dataclasses
import json
import os

import cv2
import numpy as np

from sr_tf import intensity
from sr_tf.io.files import file_sha256  # noqa: F401  (the one checksum; records.file_sha256)

SPLITS = ("train", "val", "test")
MANIFEST_NAME = "manifest.json"
SHARD_SUFFIX = ".tfrecord"
MANIFEST_VERSION = 1


@dataclasses.dataclass
class SliceRecord:
    """One slice ready to be written. ``image`` is uint16 (H, W), or None when the
    already-encoded PNG is passed to :func:`serialize`."""

    image: np.ndarray
    modality: str
    source: str
    patient_id: str
    slice_index: int
    pixel_spacing: tuple
    intensity_min: float
    intensity_max: float
    split: str = "train"


def encode_png16(image):
    """Encode a uint16 (H, W) array as a 16-bit grayscale PNG."""
    image = np.asarray(image)
    if image.dtype != np.uint16 or image.ndim != 2:
        raise ValueError(f"expected a uint16 (H, W) image, got {image.dtype} {image.shape}")
    ok, buffer = cv2.imencode(".png", image)
    if not ok:
        raise ValueError("PNG encoding failed")
    return buffer.tobytes()


def decode_png16(data):
    """Decode PNG bytes written by :func:`encode_png16` back to uint16 (H, W)."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError("not a decodable PNG")
    return image


def png_size(png):
    """(height, width) from a PNG's IHDR chunk."""
    if png[:8] != b"\x89PNG\r\n\x1a\n" or png[12:16] != b"IHDR":
        raise ValueError("not a PNG")
    return int.from_bytes(png[20:24], "big"), int.from_bytes(png[16:20], "big")


def serialize(record, png=None):
    """``SliceRecord`` -> serialized ``tf.train.Example`` bytes.

    ``png`` may be given when the image was already encoded (e.g. in a worker process).
    """
    import tensorflow as tf

    def _bytes(value):
        if isinstance(value, str):
            # A file name that is not valid UTF-8 (its bytes decoded by Python as
            # surrogates) is stored escaped, e.g. "ct\\udcff.dcm": valid text, never a crash.
            value = value.encode("utf-8", "backslashreplace")
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    def _int(value):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))

    def _floats(values):
        return tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in values]))

    if png is None:
        png = encode_png16(record.image)
    height, width = png_size(png)
    features = {
        "image": _bytes(png),
        "height": _int(height),
        "width": _int(width),
        "modality": _bytes(record.modality),
        "source": _bytes(record.source),
        "patient_id": _bytes(record.patient_id),
        "slice_index": _int(record.slice_index),
        "pixel_spacing": _floats(record.pixel_spacing),
        "intensity_min": _floats([record.intensity_min]),
        "intensity_max": _floats([record.intensity_max]),
        "split": _bytes(record.split),
    }
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


def feature_spec():
    """The ``tf.io.parse_single_example`` spec of the schema."""
    import tensorflow as tf

    return {
        "image": tf.io.FixedLenFeature([], tf.string),
        "height": tf.io.FixedLenFeature([], tf.int64),
        "width": tf.io.FixedLenFeature([], tf.int64),
        "modality": tf.io.FixedLenFeature([], tf.string),
        "source": tf.io.FixedLenFeature([], tf.string),
        "patient_id": tf.io.FixedLenFeature([], tf.string),
        "slice_index": tf.io.FixedLenFeature([], tf.int64),
        "pixel_spacing": tf.io.FixedLenFeature([2], tf.float32),
        "intensity_min": tf.io.FixedLenFeature([], tf.float32),
        "intensity_max": tf.io.FixedLenFeature([], tf.float32),
        "split": tf.io.FixedLenFeature([], tf.string),
    }


def parse(serialized):
    """Parse one serialized record into a dict of tensors (usable inside ``tf.data``).

    ``image`` is decoded to float32 (H, W, 1) in [0, 1]; ``image_uint16`` keeps the
    stored levels for exact physical recovery.
    """
    import tensorflow as tf

    features = tf.io.parse_single_example(serialized, feature_spec())
    stored = tf.io.decode_png(features["image"], channels=1, dtype=tf.uint16)
    stored = tf.ensure_shape(stored, [None, None, 1])
    features["image_uint16"] = stored
    features["image"] = intensity.stored_to_unit(stored)
    return features


def shard_name(split, index, run_id):
    """File name of a shard; ``run_id`` keeps a new conversion's shards apart from an old one's."""
    return f"{split}-{index:05d}-{run_id}{SHARD_SUFFIX}"


class RecordsError(ValueError):
    """A records folder that cannot be read, with the folder and reason in the message."""


def read_manifest(records_dir):
    """Load and check ``manifest.json`` of a data_prep output folder."""
    records_dir = os.fspath(records_dir)
    if not os.path.isdir(records_dir):
        raise RecordsError(f"{records_dir}: records folder does not exist")
    path = os.path.join(records_dir, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise RecordsError(
            f"{records_dir}: no {MANIFEST_NAME}; not a data_prep output folder "
            "(create one with `python -m data_prep --input=... --output=...`)"
        )
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise RecordsError(f"{path}: unreadable manifest ({exc})") from exc
    if not isinstance(manifest, dict) or "shards" not in manifest:
        raise RecordsError(f"{path}: manifest has no shard list")
    return manifest




# (path, size, mtime) -> SHA-256 of the shards already checked in this process, so that
# the training and validation pipelines of one run hash each shard once.
_CHECKED = {}


def shard_files(records_dir, split, manifest=None, checksums=False):
    """Absolute paths of the shards the manifest lists for ``split``, in order.

    Only listed shards are trusted: a stray or half-written file is never read. Every
    shard's size is checked against the manifest, and with ``checksums`` its SHA-256
    too (each shard once per process), so a truncated, corrupt or swapped shard is named
    with what is wrong before anything trains on it (RecordsError).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    manifest = manifest if manifest is not None else read_manifest(records_dir)
    entries = [shard for shard in manifest["shards"] if shard["split"] == split]
    files = [os.path.join(os.fspath(records_dir), shard["file"]) for shard in entries]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise RecordsError(f"{records_dir}: manifest lists missing shard(s): {missing}")
    for path, shard in zip(files, entries):
        size = os.path.getsize(path)
        if "bytes" in shard and size != shard["bytes"]:
            raise RecordsError(f"{path}: {size} bytes, the manifest says {shard['bytes']} "
                               "(truncated, grown or replaced since it was written); convert again")
        if checksums and "sha256" in shard:
            key = (path, size, os.stat(path).st_mtime_ns)
            if key not in _CHECKED:
                _CHECKED[key] = file_sha256(path)
            if _CHECKED[key] != shard["sha256"]:
                raise RecordsError(f"{path}: its SHA-256 differs from the manifest's (corrupt, or another "
                                   "shard copied over it); convert again, or pass --verify_shards=false to "
                                   "read it anyway")
    return files


def record_count(records_dir, split, manifest=None):
    """Number of records of ``split`` according to the manifest."""
    manifest = manifest if manifest is not None else read_manifest(records_dir)
    return sum(s["records"] for s in manifest["shards"] if s["split"] == split)
