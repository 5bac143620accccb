"""Training augmentations: stateless, in range, and doing what they say."""

import numpy as np
import tensorflow as tf

from sr_tf.data import augment


def _patch(seed=0, size=32):
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.2, 0.8, size, dtype=np.float32)
    return (ramp[:, None] * ramp[None, :] + 0.05 * rng.random((size, size), dtype=np.float32))[..., None]


def test_intensity_is_repeatable_in_range_and_varied():
    patch = _patch()
    outputs = [augment.intensity(patch, [s, 1]).numpy() for s in range(40)]
    np.testing.assert_array_equal(outputs[3], augment.intensity(patch, [3, 1]).numpy())
    assert all(0.0 <= o.min() and o.max() <= 1.0 for o in outputs)
    changed = [not np.allclose(o, patch) for o in outputs]
    assert 0.5 < np.mean(changed) < 1.0  # most draws change the patch, some leave it
    inverted = [np.corrcoef(o.ravel(), patch.ravel())[0, 1] < -0.9 for o in outputs]
    assert 0 < np.sum(inverted) < len(outputs) / 2


def test_smooth_blurs_a_share_of_patches():
    patch = _patch()
    rough = np.abs(np.diff(patch, axis=0)).mean()
    outputs = [augment.smooth(tf.constant(patch), 4, [s, 2]).numpy() for s in range(60)]
    smoothed = [np.abs(np.diff(o, axis=0)).mean() < 0.7 * rough for o in outputs]
    unchanged = [np.array_equal(o, patch) for o in outputs]
    assert 0 < np.sum(smoothed) < 30 and np.sum(smoothed) + np.sum(unchanged) == len(outputs)


def test_lr_noise_touches_some_images_faintly():
    batch = tf.constant(np.stack([_patch(i) for i in range(64)]))
    noisy = augment.lr_noise(batch, [5, 5]).numpy()
    touched = [not np.array_equal(a, b) for a, b in zip(noisy, batch.numpy())]
    assert 0 < np.sum(touched) < 40
    assert np.abs(noisy - batch.numpy()).std() < augment.LR_NOISE_SIGMA[1]
