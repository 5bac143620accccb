"""Image quality metrics on [0, 1] images, as TensorFlow ops.

PSNR with ``data_range`` 1 (never a per-image max), SSIM with an 11x11 Gaussian window,
sigma 1.5, K1 0.01, K2 0.03 (Wang et al. 2004; the same as ``tf.image.ssim``, MONAI and
``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
use_sample_covariance=False)``). Borders of ``scale`` pixels are shaved before
measuring, as is standard in super-resolution, since no method can recover them.
"""

import tensorflow as tf


def shave(images, border):
    """Crop ``border`` pixels from each side of (N, H, W, C) or (H, W, C) images."""
    if not border:
        return images
    return images[..., border:-border, border:-border, :]


def psnr(reference, test, max_val=1.0, border=0):
    """Per-image PSNR in dB; +inf for identical images."""
    reference, test = shave(reference, border), shave(test, border)
    mse = tf.reduce_mean(tf.square(tf.cast(reference, tf.float32) - tf.cast(test, tf.float32)), axis=[-3, -2, -1])
    return 10.0 * tf.math.log(max_val**2 / mse) / tf.math.log(10.0)


def ssim(reference, test, max_val=1.0, border=0):
    """Per-image SSIM (11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03)."""
    reference, test = shave(reference, border), shave(test, border)
    return tf.image.ssim(
        tf.cast(reference, tf.float32), tf.cast(test, tf.float32), max_val=max_val,
        filter_size=11, filter_sigma=1.5, k1=0.01, k2=0.03,
    )


def nrmse(reference, test, border=0):
    """Root-mean-square error divided by the reference's Euclidean norm per pixel (skimage's default)."""
    reference, test = shave(reference, border), shave(test, border)
    reference, test = tf.cast(reference, tf.float32), tf.cast(test, tf.float32)
    err = tf.sqrt(tf.reduce_mean(tf.square(reference - test), axis=[-3, -2, -1]))
    denom = tf.sqrt(tf.reduce_mean(tf.square(reference), axis=[-3, -2, -1]))
    return err / denom


def upsample(images, size, method="bicubic"):
    """Interpolation baseline: resize LR to ``size`` (no antialias when enlarging), clipped to [0, 1]."""
    return tf.clip_by_value(tf.image.resize(images, size, method=method), 0.0, 1.0)
