"""The inputs an export runs on: LR training patches that calibrate the int8 model, and
the LR images every form's parity is measured on, both degraded as in training."""

import os

import numpy as np
import tensorflow as tf

from sr_tf import records
from sr_tf.export.forms import ExportError

# LR sizes (height, width) of the parity images: non-square, different, not multiples of
# 4 (so the VQ autoencoder's padding is exercised); smaller images are cropped less.
PARITY_SHAPES = ((90, 150), (126, 70))
CALIBRATION_SAMPLES = 100
STRETCH_EVERY = 4  # calibration patches stretched to [0, 1]: one in this many
DEFAULT_PATCH = 96  # HR patch for calibration when the run's config does not give one


def locate_records(data, explicit):
    """``(records_dir, None)`` when ``data`` is a readable records folder, else
    ``(None, reason)``; an explicitly given folder that cannot be read is an error."""
    if not data:
        return None, "no records: the run's config.json names no training data and no --data was given"
    try:
        records.read_manifest(data)
    except records.RecordsError as exc:
        if explicit:
            raise ExportError(str(exc)) from exc
        return None, f"the training data named in the run's config.json cannot be read ({exc})"
    return data, None


def calibration_inputs(data, scale, degradation, patch_size, count, seed=0):
    """``count`` LR training patches (1, p/s, p/s, 1), degraded as in training, for int8
    calibration (``sr_tf.data.pipeline.make_dataset`` on the ``train`` split).

    Every ``STRETCH_EVERY``-th patch is stretched to span [0, 1], so that the quantisation
    ranges cover the whole input range of the contract: otherwise an image brighter than
    every sampled patch (metal, contrast agent, another modality) is clipped at the
    brightest value calibration saw.
    """
    from sr_tf.data import pipeline

    dataset = pipeline.make_dataset(
        data, "train", scale, patch_size, 1, degradation=degradation, seed=seed, shuffle_buffer=4 * count
    )
    patches = [lr.numpy() for lr, _ in dataset.take(count)]
    for index in range(0, len(patches), STRETCH_EVERY):
        low, high = patches[index].min(), patches[index].max()
        if high > low:
            patches[index] = (patches[index] - low) / (high - low)
    return patches


def calibration(records_dir, no_records, settings, count, seed):
    """``(patches, entry)``: the int8 representative inputs (``calibration_inputs``) and
    the report's ``calibration`` entry; patches None, with the reason in ``entry["error"]``,
    when there are none."""
    from sr_tf.data import pipeline

    entry = {"data": records_dir, "split": "train", "degradation": settings["degradation"],
             "hr_patch": settings["patch_size"], "samples": count}
    if records_dir is None:
        entry["error"] = f"full-integer int8 needs calibration data: {no_records}; pass --data"
        return None, entry
    try:
        patches = calibration_inputs(records_dir, settings["scale"], settings["degradation"],
                                     settings["patch_size"], count, seed)
    except pipeline.DatasetError as exc:
        entry["error"] = f"no calibration patches: {exc}"
        return None, entry
    entry["lr_patch"] = list(patches[0].shape[1:3])
    return patches, entry


def parity_inputs(data, scale, degradation, seed=0):
    """LR images (1, h, w, 1) of ``PARITY_SHAPES`` (or smaller, still non-square),
    degraded as in training, from the first of the val, test and train splits that has
    records; with ``data=None``, deterministic synthetic images. Returns
    ``(images, descriptions)``."""
    if data is None:
        return _synthetic_inputs()
    from sr_tf.data import degrade, pipeline

    split = next((s for s in ("val", "test", "train") if records.record_count(data, s)), None)
    if split is None:
        raise ExportError(f"{data}: the records folder holds no records")
    divisor = degrade.target_divisor(degradation, scale)
    examples = list(pipeline.make_eval_dataset(data, split, multiple_of=divisor).take(len(PARITY_SHAPES)))
    images, descriptions = [], []
    for index, shape in enumerate(PARITY_SHAPES):
        example = examples[index % len(examples)]
        lr, _ = degrade.apply(degradation, example["image"], scale, degrade.as_seed(seed + index))
        height, width = _non_square(shape, lr.shape[:2], taken=[image.shape[1:3] for image in images])
        top, left = (lr.shape[0] - height) // 2, (lr.shape[1] - width) // 2
        images.append(lr.numpy()[None, top:top + height, left:left + width])
        source = f"{os.path.basename(example['source'].numpy().decode())}#{int(example['slice_index'])}"
        descriptions.append({"source": source, "split": split, "lr_shape": [height, width]})
    return images, descriptions


def _non_square(wanted, available, taken):
    """``wanted`` (h, w) cut to ``available``, made non-square and unlike the ``taken``
    shapes by trimming the width."""
    height, width = min(wanted[0], available[0]), min(wanted[1], available[1])
    while width > 1 and (width == height or (height, width) in [tuple(t) for t in taken]):
        width -= 1
    return height, width


def _synthetic_inputs():
    """Deterministic smooth images with an edge, when no records are available."""
    rng = np.random.default_rng(0)
    images, descriptions = [], []
    for height, width in PARITY_SHAPES:
        coarse = rng.random((1, height // 8 + 2, width // 8 + 2, 1)).astype(np.float32)
        smooth = tf.image.resize(coarse, (height, width), "bicubic").numpy()
        rows, cols = np.mgrid[:height, :width]
        disk = ((rows - height / 2) ** 2 + (cols - width / 2) ** 2 < (min(height, width) / 3) ** 2)
        images.append(np.clip(0.6 * smooth + 0.3 * disk[None, ..., None], 0, 1).astype(np.float32))
        descriptions.append({"source": "synthetic", "lr_shape": [height, width]})
    return images, descriptions
