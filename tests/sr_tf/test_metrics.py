"""sr_tf.metrics: PSNR, SSIM and NRMSE as skimage computes them, on a real CT."""

import pytest
import tensorflow as tf
from skimage.metrics import normalized_root_mse, peak_signal_noise_ratio, structural_similarity

from sr_tf import metrics


def test_psnr_and_ssim_agree_with_skimage(ct_pair):
    hr, test = ct_pair
    ours_psnr = float(metrics.psnr(hr[None], test[None])[0])
    ours_ssim = float(metrics.ssim(hr[None], test[None])[0])
    ref_psnr = peak_signal_noise_ratio(hr[..., 0], test[..., 0], data_range=1.0)
    ref_ssim = structural_similarity(hr[..., 0], test[..., 0], data_range=1.0, gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False)
    assert abs(ours_psnr - ref_psnr) < 1e-4
    assert abs(ours_ssim - ref_ssim) < 1e-4
    # With the border shaved, as evaluation does.
    shaved = float(metrics.psnr(hr[None], test[None], border=4)[0])
    assert abs(shaved - peak_signal_noise_ratio(hr[4:-4, 4:-4, 0], test[4:-4, 4:-4, 0], data_range=1.0)) < 1e-4


def test_nrmse_agrees_with_skimage_and_identical_images(ct_pair):
    hr, test = ct_pair
    ours = float(metrics.nrmse(hr[None], test[None])[0])
    assert ours == pytest.approx(normalized_root_mse(hr[..., 0], test[..., 0], normalization="euclidean"), rel=1e-4)
    assert float(metrics.psnr(hr[None], hr[None])[0]) == float("inf")
    assert float(metrics.ssim(hr[None], hr[None])[0]) == pytest.approx(1.0)


def test_shave_and_the_interpolation_baseline():
    images = tf.random.uniform((2, 10, 12, 1))
    assert metrics.shave(images, 2).shape == (2, 6, 8, 1) and metrics.shave(images, 0) is images
    up = metrics.upsample(images * 3 - 1, (20, 24))
    assert up.shape == (2, 20, 24, 1) and float(tf.reduce_min(up)) >= 0 and float(tf.reduce_max(up)) <= 1
