"""Degradations that turn a high-resolution image into a model input.

The rules are docs/DESIGN.md, contract 5 (degradations).

Everything here is plain TensorFlow, so the same ops run inside ``tf.data`` on the
CPU and inside a ``tf.function`` train step on an accelerator. Every op takes one
image (H, W, C) or a batch (N, H, W, C), float32 in [0, 1], and returns the same rank.
Randomness is stateless: a ``seed`` is a shape-[2] integer tensor (a Python int ``s``
stands for ``[s, 0]``), so the same seed gives the same output wherever it runs.
Random parameters (blur width, noise level) are drawn per image.

Downsampling is antialiased exactly like ``tf.image.resize(..., antialias=True)``
(the kernel is widened by the scale factor and renormalised at the borders), but it
is computed as two small matrix products instead of the ``ScaleAndTranslate`` op,
which has a CPU kernel only; matrix products run on any device and under XLA.

Presets, and what each models:

``bicubic``
    inputs = bicubic antialiased downsampling of the target. The standard SR benchmark
    degradation.
``blur_downsample``
    the CT regime: a Gaussian point-spread function with sigma drawn uniformly from
    ``BLUR_SIGMA_PER_SCALE * scale`` (that is ``(0.5, 1.5) * scale / 2``: 0.5-1.5 px at
    x2, 1-3 px at x4, 2-6 px at x8), then area downsampling, the averaging of a detector
    element or a thick reconstruction voxel.
``noisy``
    bicubic downsampling, then signal-dependent quantum noise (Poisson, photons per unit
    intensity drawn log-uniformly from ``PHOTONS_RANGE``) and additive Gaussian noise
    (sigma drawn uniformly from ``NOISE_SIGMA_RANGE``). See those constants for the
    clinical levels they stand for.
``bilinear_artifacts``
    the bicubic low-resolution image upsampled back to the target size with bilinear
    interpolation: the blurred, jagged input an artifact-removal model cleans up.
    Input and target have the same size (``model_scale`` is 1).
``self_supervised``
    for data without true high resolution: the target is the data downsampled once,
    the input the data downsampled twice (bicubic both times), so the model learns the
    ``scale`` step from one level to the next. Sizes must divide by ``scale**2``.
"""

import functools
import math

import tensorflow as tf

from sr_tf.data.presets import PRESETS, SCALES

KERNELS = ("bicubic", "bilinear", "area")

# blur_downsample: Gaussian sigma range in HR pixels = this range times the scale.
BLUR_SIGMA_PER_SCALE = (0.25, 0.75)
# blur_downsample: downsampling kernel after the blur (detector / voxel averaging).
BLUR_DOWNSAMPLE_KERNEL = "area"
# noisy: additive Gaussian noise, in [0, 1] units. On the default CT window
# [-1024, 3071] HU (4095 HU wide) this is 8-41 HU: standard-dose to quarter-dose CT.
NOISE_SIGMA_RANGE = (0.002, 0.01)
# noisy: photons per unit intensity, log-uniform. The Poisson noise has standard
# deviation sqrt(v / photons) at intensity v: at mid-grey 0.7-2.2 %, the quantum
# noise of a clinical radiograph (SNR about 45-140).
PHOTONS_RANGE = (1000.0, 10000.0)


# ----------------------------------------------------------------------------- helpers


def _check_scale(scale):
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")


def _check_preset(preset):
    if preset not in PRESETS:
        raise ValueError(f"unknown degradation preset {preset!r}; choose one of {PRESETS}")


def _check_range(values, name, positive=False):
    """A (low, high) pair of Python numbers with 0 <= low <= high (0 < low if ``positive``)."""
    try:
        lo, hi = (float(v) for v in values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a (low, high) pair of numbers, got {values!r}") from exc
    if not (0.0 < lo if positive else 0.0 <= lo) or not lo <= hi:
        bound = "0 <" if positive else "0 <="
        raise ValueError(f"{name} must satisfy {bound} low <= high, got {values!r}")
    return lo, hi


def as_seed(seed):
    """A shape-[2] int64 seed tensor from a Python int, a pair or a seed tensor."""
    seed = tf.convert_to_tensor(seed)
    if not seed.dtype.is_integer:
        raise ValueError(f"seed must be an integer or a pair of integers, got {seed.dtype.name}")
    seed = tf.cast(seed, tf.int64)
    if seed.shape.rank == 0:
        seed = tf.stack([seed, tf.zeros_like(seed)])
    return tf.ensure_shape(seed, [2])


def _split_seed(seed, num):
    return tf.unstack(tf.random.experimental.stateless_split(as_seed(seed), num))


def _as_batch(image):
    """(batch float32 (N, H, W, C), True when the input was a single image)."""
    image = tf.convert_to_tensor(image)
    if image.dtype != tf.float32:
        image = tf.cast(image, tf.float32)
    if image.shape.rank == 3:
        return image[tf.newaxis], True
    if image.shape.rank == 4:
        return image, False
    raise ValueError(f"expected an image (H, W, C) or a batch (N, H, W, C), got shape {image.shape}")


def _per_image_or_batch(fn):
    """Let ``fn``, written for a float32 batch, take one image or a batch."""

    @functools.wraps(fn)
    def wrapper(image, *args, **kwargs):
        batch, single = _as_batch(image)
        out = fn(batch, *args, **kwargs)
        return out[0] if single else out

    return wrapper


def _dims(batch):
    """(N, H, W, C) with Python ints where the size is static, scalar tensors elsewhere."""
    dynamic = tf.shape(batch)
    return [size if size is not None else dynamic[i] for i, size in enumerate(batch.shape.as_list())]


def _check_divisible(batch, divisor, reason):
    """Static sizes raise ValueError now; dynamic ones get a runtime assertion."""
    _, height, width, _ = _dims(batch)
    checks = []
    for name, size in (("height", height), ("width", width)):
        if isinstance(size, int):
            if size % divisor or size == 0:
                raise ValueError(f"image {name} {size} is not a positive multiple of {divisor} ({reason})")
        else:
            checks.append(
                tf.debugging.assert_equal(
                    size % divisor, 0, message=f"image {name} is not a multiple of {divisor} ({reason})"
                )
            )
    if not checks:
        return batch
    with tf.control_dependencies(checks):
        return tf.identity(batch)


def _clip(batch):
    return tf.clip_by_value(batch, 0.0, 1.0)


# ----------------------------------------------------------------------------- ops


def _keys_cubic(x):
    """Keys (1981) cubic convolution kernel, a = -0.5: the one ``tf.image.resize`` uses."""
    near = (1.5 * x - 2.5) * x * x + 1.0
    far = ((-0.5 * x + 2.5) * x - 4.0) * x + 2.0
    return tf.where(x < 1.0, near, tf.where(x < 2.0, far, 0.0))


_RESAMPLING_KERNELS = {
    "bicubic": _keys_cubic,
    "bilinear": lambda x: tf.maximum(1.0 - x, 0.0),
    "area": lambda x: tf.cast(x < 0.5, tf.float32),
}


def downsampling_matrix(size, scale, kernel):
    """(size // scale, size) weights of an antialiased downsampling along one axis.

    Output pixel ``o`` is centred at ``(o + 0.5) * scale`` input pixels; the kernel is
    stretched by ``scale`` and each row renormalised, as ``ScaleAndTranslate`` does.
    """
    centres = (tf.range(size // scale, dtype=tf.float32) + 0.5) * scale
    positions = tf.range(size, dtype=tf.float32) + 0.5
    weights = _RESAMPLING_KERNELS[kernel](tf.abs(positions[tf.newaxis, :] - centres[:, tf.newaxis]) / scale)
    return weights / tf.reduce_sum(weights, axis=1, keepdims=True)


def _downsample(batch, scale, kernel):
    _check_scale(scale)
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    batch = _check_divisible(batch, scale, f"downsampling by {scale}")
    _, height, width, _ = _dims(batch)
    rows = downsampling_matrix(height, scale, kernel)
    cols = downsampling_matrix(width, scale, kernel)
    out = tf.einsum("oh,nhwc->nowc", rows, batch)
    return _clip(tf.einsum("pw,nowc->nopc", cols, out))


@_per_image_or_batch
def downsample(image, scale, kernel="bicubic"):
    """Antialiased downsampling by an integer ``scale`` (2, 4 or 8), clipped to [0, 1].

    ``kernel`` is ``bicubic`` (Keys cubic), ``bilinear`` (triangle) or ``area`` (box);
    identical to ``tf.image.resize(..., method=kernel, antialias=True)`` up to float
    rounding. Height and width must be multiples of ``scale`` (ValueError otherwise).
    """
    return _downsample(image, scale, kernel)


@_per_image_or_batch
def gaussian_blur(image, sigma_range, seed):
    """Gaussian blur with sigma (pixels) drawn uniformly from ``sigma_range`` per image.

    The separable kernel spans 3 sigma of the largest sigma; reflect padding keeps a
    constant image constant. Height and width must exceed that radius.
    """
    lo, hi = _check_range(sigma_range, "sigma_range", positive=True)
    count, height, width, channels = _dims(image)
    radius = max(1, math.ceil(3.0 * hi))
    for name, size in (("height", height), ("width", width)):
        if isinstance(size, int) and size <= radius:
            raise ValueError(f"image {name} {size} too small for a blur of sigma up to {hi} (radius {radius})")
    sigma = tf.random.stateless_uniform([count], as_seed(seed), lo, hi)
    taps = tf.range(-radius, radius + 1, dtype=tf.float32)
    kernels = tf.exp(-0.5 * tf.square(taps[tf.newaxis, :] / sigma[:, tf.newaxis]))
    kernels /= tf.reduce_sum(kernels, axis=1, keepdims=True)  # (N, taps)
    # Fold the batch into the channels so that one depthwise conv gives every image its kernel.
    kernels = tf.transpose(tf.repeat(kernels, channels, axis=0))  # (taps, N*C), image-major
    folded = tf.reshape(tf.transpose(image, [1, 2, 0, 3]), [1, height, width, count * channels])
    folded = tf.pad(folded, [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="REFLECT")
    folded = tf.nn.depthwise_conv2d(folded, kernels[:, tf.newaxis, :, tf.newaxis], [1, 1, 1, 1], "VALID")
    folded = tf.nn.depthwise_conv2d(folded, kernels[tf.newaxis, :, :, tf.newaxis], [1, 1, 1, 1], "VALID")
    blurred = tf.transpose(tf.reshape(folded, [height, width, count, channels]), [2, 0, 1, 3])
    return _clip(blurred)


@_per_image_or_batch
def gaussian_noise(image, sigma_range, seed):
    """Additive Gaussian noise, sigma drawn uniformly from ``sigma_range`` per image; clipped."""
    lo, hi = _check_range(sigma_range, "sigma_range")
    sigma_seed, noise_seed = _split_seed(seed, 2)
    sigma = tf.random.stateless_uniform([_dims(image)[0]], sigma_seed, lo, hi)
    noise = tf.random.stateless_normal(tf.shape(image), noise_seed)
    return _clip(image + noise * sigma[:, tf.newaxis, tf.newaxis, tf.newaxis])


@_per_image_or_batch
def poisson_noise(image, photons_range, seed):
    """Photon-count noise: Poisson(image * photons) / photons, clipped.

    ``photons`` (per unit intensity) is drawn log-uniformly from ``photons_range`` per
    image: fewer photons, more noise; the variance at intensity v is v / photons.
    """
    lo, hi = _check_range(photons_range, "photons_range", positive=True)
    photons_seed, noise_seed = _split_seed(seed, 2)
    log_photons = tf.random.stateless_uniform([_dims(image)[0]], photons_seed, math.log(lo), math.log(hi))
    photons = tf.exp(log_photons)[:, tf.newaxis, tf.newaxis, tf.newaxis]
    counts = tf.random.stateless_poisson(tf.shape(image), noise_seed, lam=image * photons, dtype=tf.float32)
    return _clip(counts / photons)


@_per_image_or_batch
def bilinear_artifacts(image, scale, kernel="bicubic"):
    """The image downsampled by ``scale`` and upsampled back to its size bilinearly."""
    low = _downsample(image, scale, kernel)
    size = tf.shape(image)[1:3]
    upsampled = tf.image.resize(low, size, method="bilinear")
    return _clip(tf.ensure_shape(upsampled, image.shape))


# ----------------------------------------------------------------------------- presets


def model_scale(preset, scale):
    """Target size / input size for ``preset``: the scale to build the model with."""
    _check_preset(preset)
    _check_scale(scale)
    return 1 if preset == "bilinear_artifacts" else scale


def consistency_kernel(preset):
    """The deterministic downsampling kernel of ``preset``: what an output is degraded
    with again to check that it agrees with its LR input (evaluation and the app)."""
    _check_preset(preset)
    return BLUR_DOWNSAMPLE_KERNEL if preset == "blur_downsample" else "bicubic"


def target_divisor(preset, scale):
    """What the high-resolution crop size must be a multiple of for ``preset``."""
    _check_preset(preset)
    _check_scale(scale)
    return scale * scale if preset == "self_supervised" else scale


def blur_sigma_range(scale):
    """The ``blur_downsample`` sigma range in HR pixels at ``scale``."""
    return tuple(factor * scale for factor in BLUR_SIGMA_PER_SCALE)


def apply(preset, hr, scale, seed):
    """``(inputs, targets)`` float32 for ``preset`` (see the module doc) at ``scale``.

    ``hr`` is one image (H, W, C) or a batch (N, H, W, C) in [0, 1]; its height and
    width must be multiples of ``target_divisor(preset, scale)``. ``seed`` (shape [2])
    fixes every random draw.
    """
    divisor = target_divisor(preset, scale)
    batch, single = _as_batch(hr)
    batch = _check_divisible(batch, divisor, f"preset {preset!r} at scale {scale}")
    blur_seed, poisson_seed, gaussian_seed = _split_seed(seed, 3)
    if preset == "bicubic":
        inputs, targets = _downsample(batch, scale, "bicubic"), batch
    elif preset == "blur_downsample":
        blurred = gaussian_blur(batch, blur_sigma_range(scale), blur_seed)
        inputs, targets = _downsample(blurred, scale, BLUR_DOWNSAMPLE_KERNEL), batch
    elif preset == "noisy":
        low = _downsample(batch, scale, "bicubic")
        low = poisson_noise(low, PHOTONS_RANGE, poisson_seed)
        inputs, targets = gaussian_noise(low, NOISE_SIGMA_RANGE, gaussian_seed), batch
    elif preset == "bilinear_artifacts":
        inputs, targets = bilinear_artifacts(batch, scale), batch
    else:  # self_supervised
        targets = _downsample(batch, scale, "bicubic")
        inputs = _downsample(targets, scale, "bicubic")
    if single:
        return inputs[0], targets[0]
    return inputs, targets
