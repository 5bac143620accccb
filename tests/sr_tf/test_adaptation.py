"""Per-scan self-supervised adaptation (``sr_tf.adaptation``)."""

import keras
import numpy as np
import pydicom
import pytest
import tensorflow as tf

from sr_tf import adaptation, models
from sr_tf.data import degrade


@pytest.fixture(scope="module")
def mr(testdata):
    """pydicom's MR_small.dcm (64 x 64) scaled to [0, 1]: the LR input to adapt to."""
    pixels = pydicom.dcmread(testdata("MR_small.dcm")).pixel_array.astype(np.float32)
    return (pixels - pixels.min()) / (pixels.max() - pixels.min())


@pytest.fixture(scope="module")
def tiny():
    keras.utils.set_random_seed(0)
    model = models.build("residual_cnn", scale=2, filters=8)
    model(np.zeros((1, 8, 8, 1), np.float32))
    return model


def pair_loss(model, image):
    """L1 of the model on the image's own pair: the image degraded once more, and itself."""
    inputs, targets = degrade.apply("bicubic", tf.constant(image[None, ..., None]), 2, tf.constant([0, 0]))
    return float(tf.reduce_mean(tf.abs(model(inputs, training=False) - targets)))


def test_adaptation_lowers_the_loss_on_the_image_and_leaves_the_model_alone(tiny, mr):
    before = [w.copy() for w in tiny.get_weights()]
    adapted, report = adaptation.adapt(tiny, mr, steps=40, seconds=None, seed=1, patch=32, learning_rate=1e-3)
    assert report.steps == 40 and report.stopped_by == "steps" and report.patch == 32
    assert pair_loss(adapted, mr) < 0.95 * pair_loss(tiny, mr)
    for a, b in zip(tiny.get_weights(), before):
        np.testing.assert_array_equal(a, b)
    assert "40 self-supervised steps" in report.describe() and "seed 1" in report.describe()


def test_adaptation_is_deterministic_with_a_seed(tiny, mr):
    runs = [adaptation.adapt(tiny, mr, steps=5, seconds=None, seed=seed, patch=32, learning_rate=1e-3)[0]
            for seed in (3, 3, 4)]
    for a, b in zip(runs[0].get_weights(), runs[1].get_weights()):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(runs[0].get_weights(), runs[2].get_weights()))


def test_adaptation_stops_at_its_time_limit(tiny, mr):
    _, report = adaptation.adapt(tiny, mr, steps=10_000, seconds=1.0, seed=0, patch=32)
    assert report.stopped_by == "seconds" and 1 <= report.steps < 10_000 and report.seconds < 20


def test_zero_steps_is_a_copy(tiny, mr):
    adapted, report = adaptation.adapt(tiny, np.stack([mr, mr]), steps=0)
    assert adapted is not tiny and report.steps == 0
    for a, b in zip(adapted.get_weights(), tiny.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("steps, seconds, message", [
    (-1, None, "adapt_steps must be a whole number >= 0, got -1"),
    (2.5, None, "adapt_steps must be a whole number"),
    (5, 0, "adapt_seconds must be > 0, got 0"),
])
def test_bad_values_are_refused(tiny, mr, steps, seconds, message):
    with pytest.raises(ValueError, match=message):
        adaptation.adapt(tiny, mr, steps=steps, seconds=seconds)


def test_models_and_inputs_it_cannot_adapt(mr):
    keras.utils.set_random_seed(0)
    restoration = models.build("residual_cnn", scale=1, filters=8)
    with pytest.raises(adaptation.AdaptationError, match="scale > 1"):
        adaptation.adapt(restoration, mr, steps=1)
    with pytest.raises(adaptation.AdaptationError, match="needs a Keras model"):
        adaptation.adapt(object(), mr, steps=1)
    model = models.build("residual_cnn", scale=4, filters=8)
    with pytest.raises(adaptation.AdaptationError, match=r"\(6 x 6\) is too small to adapt to \(at least 64 x 64 pixels\)"):
        adaptation.adapt(model, mr[:6, :6], steps=1)
    with pytest.raises(adaptation.AdaptationError, match="too small"):
        adaptation.adapt(model, mr[:40], steps=1)
    with pytest.raises(adaptation.AdaptationError, match="'bilinear_artifacts' is not one of"):
        adaptation.adapt(model, mr, steps=1, degradation="bilinear_artifacts")
