"""What the demo app (``app.py``) shows, as plain numpy: CT windows, one zoom region
for every panel, the difference map and the data-consistency metrics.

No Streamlit here, so the tests reach every rule the page applies. Images are float32
in [0, 1], as the models see them; physical values (HU for CT) are
``lo + value * (hi - lo)`` with the ``lo``/``hi`` of :class:`sr_tf.upscaling.Image`.
"""

import math
import os

import numpy as np

from sr_tf import intensity

# name -> (width, level) in HU: the usual CT display windows.
WINDOW_PRESETS = {
    "soft tissue": (400.0, 40.0),
    "lung": (1500.0, -600.0),
    "bone": (2000.0, 300.0),
    "brain": (80.0, 40.0),
}

MODEL_SUFFIXES = (".keras", ".tflite")


def window(image, lo, hi, width, level):
    """Display values in [0, 1] of ``image`` through the window ``width``/``level``,
    both in physical units: ``level - width/2`` is black, ``level + width/2`` white."""
    if not width > 0:
        raise ValueError(f"window width must be positive, got {width}")
    physical = intensity.to_physical(np.asarray(image, np.float32), lo, hi)
    return np.clip((physical - (level - width / 2.0)) / width, 0.0, 1.0).astype(np.float32)


def zoom_box(height, width, zoom=1.0, centre_x=0.5, centre_y=0.5):
    """(top, bottom, left, right) in pixels of an image of ``height`` x ``width``: the
    region 1/``zoom`` of each side, centred at the fractions ``centre_x``/``centre_y``
    of the width/height and moved inside the image where it would cross an edge.

    Computed on the low-resolution grid and multiplied by the scale (:func:`crop`), the
    same box covers exactly the same anatomy in the input and in every output.
    """
    if zoom < 1:
        raise ValueError(f"zoom must be at least 1, got {zoom}")
    rows = max(1, min(height, round(height / zoom)))
    cols = max(1, min(width, round(width / zoom)))
    top = min(max(0, round(centre_y * height - rows / 2)), height - rows)
    left = min(max(0, round(centre_x * width - cols / 2)), width - cols)
    return top, top + rows, left, left + cols


def crop(image, box, factor=1):
    """The part of ``image`` inside ``box`` (from :func:`zoom_box` on a grid ``factor``
    times coarser than ``image``)."""
    top, bottom, left, right = box
    return image[top * factor:bottom * factor, left * factor:right * factor]


def display_size(shape, long_side):
    """(height, width) with the aspect of ``shape`` and its longer side ``long_side``."""
    height, width = shape[:2]
    ratio = long_side / max(height, width)
    return max(1, round(height * ratio)), max(1, round(width * ratio))


def resize(image, size):
    """``image`` (H, W) float resized to ``size`` (height, width): nearest neighbour when
    enlarging, so that pixels stay pixels and the panels compare the methods rather
    than the browser's smoothing; area averaging when shrinking."""
    from PIL import Image

    array = np.asarray(image, np.float32)
    height, width = size
    if array.shape == (height, width):
        return array
    enlarging = height >= array.shape[0] and width >= array.shape[1]
    resized = Image.fromarray(np.ascontiguousarray(array)).resize((width, height), Image.NEAREST if enlarging else Image.BOX)
    return np.asarray(resized, np.float32)


def to_uint8(image):
    """8-bit pixels of ``image`` in [0, 1] (grayscale or RGB)."""
    return np.round(np.clip(np.asarray(image, np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def difference_map(first, second, size=None, full_scale=None, colormap="inferno"):
    """(RGB image in [0, 1], full_scale): ``|first - second|`` (resized to ``size`` if
    given, each display pixel the mean difference it covers) through ``colormap``:
    black at 0, brightest at ``full_scale`` (default: the 99.5th percentile of the
    difference, so that one hot pixel does not flatten the rest; never below 1e-6)."""
    import matplotlib

    diff = np.abs(np.asarray(first, np.float32) - np.asarray(second, np.float32))
    if size is not None:
        diff = resize(diff, size)
    if full_scale is None:
        full_scale = float(np.percentile(diff, 99.5)) if diff.size else 0.0
    full_scale = max(float(full_scale), 1e-6)
    rgba = matplotlib.colormaps[colormap](np.clip(diff / full_scale, 0.0, 1.0))
    return rgba[..., :3].astype(np.float32), full_scale


def bicubic(lr, scale):
    """The interpolation baseline (``sr_tf.metrics.upsample``) of one (h, w) image."""
    from sr_tf import metrics

    lr = np.asarray(lr, np.float32)
    height, width = lr.shape[:2]
    up = metrics.upsample(lr.reshape(1, height, width, 1), (height * scale, width * scale))
    return np.asarray(up, np.float32)[0, ..., 0]


def consistency(lr, output, scale, degradation="bicubic"):
    """{"psnr": dB, "ssim": ...} of ``output`` (sH, sW) downsampled by ``scale`` with the
    kernel of the model's ``degradation`` (``degrade.consistency_kernel``, as evaluate.py
    does; as it is for scale 1, the restoration models) against the input ``lr`` (H, W).

    Without a high-resolution reference this is what can be checked: an output that
    adds structure the input does not support stops agreeing with it. PSNR is inf for
    an exact match; SSIM is nan for inputs under 11 pixels (its window).
    """
    from sr_tf import metrics
    from sr_tf.data import degrade

    lr = np.asarray(lr, np.float32)
    height, width = lr.shape[:2]
    output = np.asarray(output, np.float32).reshape(1, height * scale, width * scale, 1)
    reference = lr.reshape(1, height, width, 1)
    down = output if scale == 1 else degrade.downsample(output, scale, degrade.consistency_kernel(degradation))
    psnr = float(metrics.psnr(reference, down)[0])
    ssim = float(metrics.ssim(reference, down)[0]) if min(height, width) >= 11 else math.nan
    return {"psnr": psnr, "ssim": ssim}  # +inf for an exact match, NaN for a broken output


def find_models(*roots):
    """Models under ``roots`` that ``sr_tf.inference.load_predictor`` accepts: training
    runs (``generator.keras``), SavedModel and export folders, and ``.keras`` and
    ``.tflite`` files at the top of a root or inside one of its folders. Sorted paths."""
    found = []
    for root in roots:
        if not os.path.isdir(root):
            continue
        for entry in sorted(os.listdir(root)):
            path = os.path.join(root, entry)
            if os.path.isfile(path):
                if entry.endswith(MODEL_SUFFIXES):
                    found.append(path)
                continue
            if not os.path.isdir(path):
                continue
            if _is_model_folder(path):
                found.append(path)
            found.extend(
                os.path.join(path, name)
                for name in sorted(os.listdir(path))
                if name.endswith(MODEL_SUFFIXES) and name != "generator.keras"
                and os.path.isfile(os.path.join(path, name))
            )
    return found


def _is_model_folder(path):
    return any(
        os.path.isfile(os.path.join(path, *parts))
        for parts in (("generator.keras",), ("saved_model.pb",), ("saved_model", "saved_model.pb"))
    )


def uncertainty_overlay(image, uncertainty, threshold, size=None):
    """(RGB in [0, 1]) the grayscale ``image`` with ``uncertainty`` laid over it in red:
    transparent at 0, opaque (at 70 %) from twice ``threshold``, so that what counts as
    unsure stands out and the anatomy under it stays visible. Both are resized to
    ``size`` if given."""
    image = np.asarray(image, np.float32)
    uncertainty = np.asarray(uncertainty, np.float32)
    if size is not None:
        image, uncertainty = resize(image, size), resize(uncertainty, size)
    alpha = 0.7 * np.clip(uncertainty / max(2.0 * float(threshold), 1e-6), 0.0, 1.0)[..., None]
    gray = np.repeat(np.clip(image, 0.0, 1.0)[..., None], 3, axis=-1)
    red = np.array([1.0, 0.1, 0.0], np.float32)
    return (gray * (1.0 - alpha) + red * alpha).astype(np.float32)
