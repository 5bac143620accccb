"""Training augmentations that widen what a model sees beyond its training scans.

A zoo model trained on a handful of patients meets other modalities, windows, noise
levels and sharpness. These draws, applied to training patches only and stateless like
everything in ``sr_tf.data`` (a shape-[2] seed fixes each), make those differences part
of training, so that a model adds detail where the input supports it and nothing where
it does not:

``intensity``
    a random gamma, a random window (a sub-range of the patch stretched to [0, 1] and
    clipped, as a display window or another scanner's range does), a random contrast
    reduction about the patch mean, and inversion (dense dark, as MONOCHROME1 or
    another MR weighting shows it). Each with its own probability.
``smooth``
    an already-smooth target: the HR patch blurred (Gaussian, sigma in HR pixels drawn
    from ``SMOOTH_SIGMA_PER_SCALE * scale``), so that the model learns that a smooth
    input may have a smooth truth and must not be sharpened into structure.
``lr_noise``
    faint Gaussian noise on the model input only (the target stays clean), so that
    noise-like variation in an input is not amplified into detail.
"""

import tensorflow as tf

from sr_tf.data import degrade

GAMMA_PROBABILITY = 0.5
GAMMA_RANGE = (0.6, 1.7)  # log-uniform
WINDOW_PROBABILITY = 0.3
WINDOW_CUT = 0.3  # up to this fraction of the patch's range cut at each end
CONTRAST_PROBABILITY = 0.2
CONTRAST_RANGE = (0.3, 1.0)  # factor on the deviation from the patch mean
INVERT_PROBABILITY = 0.25
SMOOTH_PROBABILITY = 0.15
SMOOTH_SIGMA_PER_SCALE = (0.25, 0.5)
LR_NOISE_PROBABILITY = 0.25
LR_NOISE_SIGMA = (0.0005, 0.004)  # [0, 1] units: 2-16 HU on the default CT window


def _uniform(seed, lo=0.0, hi=1.0, shape=()):
    return tf.random.stateless_uniform(shape, seed, lo, hi)


def _seeds(seed, count):
    return tf.unstack(tf.random.experimental.stateless_split(degrade.as_seed(seed), count))


def intensity(patch, seed):
    """Random gamma, window, contrast and inversion of one patch (H, W, C) in [0, 1]."""
    seeds = _seeds(seed, 8)
    patch = tf.convert_to_tensor(patch, tf.float32)

    def maybe(index, probability, changed):
        return tf.where(_uniform(seeds[index]) < probability, changed, patch)

    log_gamma = _uniform(seeds[1], *(tf.math.log(g) for g in GAMMA_RANGE))
    patch = maybe(0, GAMMA_PROBABILITY, tf.pow(tf.maximum(patch, 1e-6), tf.exp(log_gamma)))
    low, high = tf.reduce_min(patch), tf.reduce_max(patch)
    span = high - low
    window_low = low + _uniform(seeds[3], 0.0, WINDOW_CUT) * span
    window_high = high - _uniform(seeds[4], 0.0, WINDOW_CUT) * span
    windowed = (patch - window_low) / tf.maximum(window_high - window_low, 1e-3)
    patch = maybe(2, WINDOW_PROBABILITY, tf.clip_by_value(windowed, 0.0, 1.0))
    mean = tf.reduce_mean(patch)
    reduced = mean + _uniform(seeds[6], *CONTRAST_RANGE) * (patch - mean)
    patch = maybe(5, CONTRAST_PROBABILITY, reduced)
    return maybe(7, INVERT_PROBABILITY, 1.0 - patch)


def smooth(patch, scale, seed):
    """One patch (H, W, C), blurred with probability ``SMOOTH_PROBABILITY``."""
    flag_seed, blur_seed = _seeds(seed, 2)
    sigma = tuple(factor * scale for factor in SMOOTH_SIGMA_PER_SCALE)
    blurred = degrade.gaussian_blur(patch, sigma, blur_seed)
    return tf.where(_uniform(flag_seed) < SMOOTH_PROBABILITY, blurred, patch)


def lr_noise(batch, seed):
    """A batch (N, h, w, C) with faint Gaussian noise on a ``LR_NOISE_PROBABILITY``
    share of its images (sigma drawn per image), clipped to [0, 1]."""
    flag_seed, noise_seed = _seeds(seed, 2)
    noisy = degrade.gaussian_noise(batch, LR_NOISE_SIGMA, noise_seed)
    chosen = _uniform(flag_seed, shape=tf.shape(batch)[:1]) < LR_NOISE_PROBABILITY
    return tf.where(chosen[:, tf.newaxis, tf.newaxis, tf.newaxis], noisy, batch)
