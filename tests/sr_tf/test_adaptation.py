"""Per-scan self-supervised adaptation (``sr_tf.adaptation``)."""

import keras
import numpy as np
import pydicom
import pytest
import tensorflow as tf

from sr_tf import adaptation, models
from sr_tf.data import degrade


@pytest.fixture(scope="module")
def ct(testdata):
    """pydicom's CT_small.dcm (128 x 128, the smallest input adapted to at x2) scaled to
    [0, 1]: the LR input to adapt to."""
    pixels = pydicom.dcmread(testdata("CT_small.dcm")).pixel_array.astype(np.float32)
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


def test_adaptation_lowers_the_loss_on_the_image_and_leaves_the_model_alone(tiny, ct):
    before = [w.copy() for w in tiny.get_weights()]
    last, report = adaptation.adapt(tiny, ct, steps=40, seconds=None, seed=1, patch=32, learning_rate=1e-3,
                                    average=0.0)
    assert report.steps == 40 and report.stopped_by == "steps" and report.patch == 32
    assert pair_loss(last, ct) < 0.95 * pair_loss(tiny, ct)
    averaged, report = adaptation.adapt(tiny, ct, steps=40, seconds=None, seed=1, patch=32, learning_rate=1e-3,
                                        average=0.9)
    assert pair_loss(averaged, ct) < 0.97 * pair_loss(tiny, ct)
    for a, b in zip(tiny.get_weights(), before):
        np.testing.assert_array_equal(a, b)
    assert "40 self-supervised steps" in report.describe() and "seed 1" in report.describe()
    assert "weights averaged at 0.9" in report.describe()


def test_the_copy_has_the_moving_average_of_the_weights(tiny, ct):
    """After steps w1, w2 from w0, decay a gives a^2 w0 + a (1 - a) w1 + (1 - a) w2."""
    keywords = dict(seconds=None, seed=2, patch=32, learning_rate=1e-2)
    w0 = tiny.get_weights()
    w1 = adaptation.adapt(tiny, ct, steps=1, average=0.0, **keywords)[0].get_weights()
    w2 = adaptation.adapt(tiny, ct, steps=2, average=0.0, **keywords)[0].get_weights()
    averaged = adaptation.adapt(tiny, ct, steps=2, average=0.75, **keywords)[0].get_weights()
    changed = 0
    for a0, a1, a2, got in zip(w0, w1, w2, averaged):
        np.testing.assert_allclose(got, 0.75**2 * a0 + 0.75 * 0.25 * a1 + 0.25 * a2, rtol=1e-5, atol=1e-7)
        changed += not np.allclose(a2, got)
    assert changed  # not the last step's weights


def test_adaptation_is_deterministic_with_a_seed(tiny, ct):
    runs = [adaptation.adapt(tiny, ct, steps=5, seconds=None, seed=seed, patch=32, learning_rate=1e-3)[0]
            for seed in (3, 3, 4)]
    for a, b in zip(runs[0].get_weights(), runs[1].get_weights()):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(runs[0].get_weights(), runs[2].get_weights()))


def test_adaptation_stops_at_its_time_limit(tiny, ct):
    _, report = adaptation.adapt(tiny, ct, steps=10_000, seconds=1.0, seed=0, patch=32)
    assert report.stopped_by == "seconds" and 1 <= report.steps < 10_000 and report.seconds < 20


def test_zero_steps_is_a_copy(tiny, ct):
    adapted, report = adaptation.adapt(tiny, np.stack([ct, ct]), steps=0)
    assert adapted is not tiny and report.steps == 0
    for a, b in zip(adapted.get_weights(), tiny.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("steps, seconds, message", [
    (-1, None, "adapt_steps must be a whole number >= 0, got -1"),
    (2.5, None, "adapt_steps must be a whole number"),
    (5, 0, "adapt_seconds must be > 0, got 0"),
])
def test_bad_values_are_refused(tiny, ct, steps, seconds, message):
    with pytest.raises(ValueError, match=message):
        adaptation.adapt(tiny, ct, steps=steps, seconds=seconds)


@pytest.mark.parametrize("average", [1.0, -0.1, True])
def test_a_bad_weight_average_is_refused(tiny, ct, average):
    with pytest.raises(ValueError, match=r"weight average must be in \[0, 1\), got"):
        adaptation.adapt(tiny, ct, steps=1, average=average)


def test_models_and_inputs_it_cannot_adapt(ct):
    keras.utils.set_random_seed(0)
    restoration = models.build("residual_cnn", scale=1, filters=8)
    with pytest.raises(adaptation.AdaptationError, match="scale > 1"):
        adaptation.adapt(restoration, ct, steps=1)
    with pytest.raises(adaptation.AdaptationError, match="needs a Keras model"):
        adaptation.adapt(object(), ct, steps=1)
    model = models.build("residual_cnn", scale=4, filters=8)
    with pytest.raises(adaptation.AdaptationError, match=r"\(6 x 6\) is too small to adapt to at x4 "
                                                         r"\(at least 256 x 256 pixels, so that its pairs' inputs "
                                                         r"are 64 px\)"):
        adaptation.adapt(model, ct[:6, :6], steps=1)
    with pytest.raises(adaptation.AdaptationError, match=r"\(128 x 128\) is too small to adapt to at x4"):
        adaptation.adapt(model, ct, steps=1)  # what x2 adapts to
    x2 = models.build("residual_cnn", scale=2, filters=8)
    with pytest.raises(adaptation.AdaptationError, match=r"\(127 x 128\) is too small to adapt to at x2"):
        adaptation.adapt(x2, ct[:127], steps=1)
    with pytest.raises(adaptation.AdaptationError, match="'bilinear_artifacts' is not one of"):
        adaptation.adapt(model, ct, steps=1, degradation="bilinear_artifacts")
