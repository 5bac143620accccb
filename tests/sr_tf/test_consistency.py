"""sr_tf.consistency: projection makes any output agree with its input, leaves a
consistent one alone, runs the same eagerly, in a tf.function and tiled, and refuses bad
values by name."""

import numpy as np
import pydicom
import pytest
import tensorflow as tf

from sr_tf import consistency, inference, metrics
from sr_tf.data import degrade

CASES = [("bicubic", 2), ("bicubic", 4), ("blur_downsample", 4), ("bilinear_artifacts", 4)]


@pytest.fixture(scope="module")
def ct(testdata):
    """A 64 x 96 crop of the real head CT 693_UNCI.dcm on the [0, 1] CT window."""
    ds = pydicom.dcmread(testdata("693_UNCI.dcm"))
    hu = pydicom.pixels.apply_modality_lut(ds.pixel_array, ds)
    return np.clip((hu[200:264, 200:296] + 1024.0) / 4095.0, 0, 1).astype(np.float32)[..., None]


def agreement(lr, sr, scale, degradation):
    """PSNR (dB) of ``sr`` degraded again against ``lr``, as evaluation measures it."""
    return float(metrics.psnr(lr[None], consistency._degrade(tf.constant(sr)[None], scale, degradation))[0])


@pytest.mark.parametrize("degradation,scale", CASES)
def test_projection_makes_a_random_output_consistent(ct, degradation, scale):
    lr = consistency._degrade(ct[None], scale, degradation)[0]
    noise = np.random.default_rng(scale).random(ct.shape).astype(np.float32)
    before = agreement(lr, noise, scale, degradation)
    projected = consistency.project(lr, noise, scale, degradation, iterations=50).numpy()
    assert projected.shape == ct.shape and projected.min() >= 0.0 and projected.max() <= 1.0
    assert before < 15.0 and agreement(lr, projected, scale, degradation) > 60.0
    # Closer to the true image too: what the input determines now comes from the input.
    assert float(metrics.psnr(ct[None], projected[None])[0]) > float(metrics.psnr(ct[None], noise[None])[0]) + 5


@pytest.mark.parametrize("degradation,scale", CASES)
def test_a_consistent_output_is_left_unchanged(ct, degradation, scale):
    lr = consistency._degrade(ct[None], scale, degradation)[0]
    projected = consistency.project(lr, ct, scale, degradation, iterations=10).numpy()
    np.testing.assert_allclose(projected, ct, atol=1e-6)


def test_more_iterations_agree_more_and_the_defaults_reach_60_db(ct):
    lr = degrade.downsample(ct, 4)
    bicubic = metrics.upsample(lr[None], ct.shape[:2])[0].numpy()
    rng = np.random.default_rng(0)
    output = np.clip(bicubic + rng.normal(0, 0.05, ct.shape), 0, 1).astype(np.float32)  # a model's sharpening
    values = [agreement(lr, consistency.project(lr, output, 4, iterations=n).numpy(), 4, "bicubic")
              for n in (0, 2, 5, consistency.DEFAULT_ITERATIONS)]
    assert values == sorted(values) and values[-1] > 60.0, values


def test_the_same_in_a_tf_function_with_free_sizes_and_per_batch(ct):
    lr = degrade.downsample(ct, 2)
    output = metrics.upsample(lr[None], ct.shape[:2], "nearest")[0].numpy()
    eager = consistency.project(lr, output, 2, iterations=4).numpy()
    spec = tf.TensorSpec([None, None, None, 1], tf.float32)
    graph = tf.function(lambda a, b: consistency.project(a, b, 2, iterations=4), input_signature=[spec, spec])
    batch = graph(tf.stack([lr, lr]), tf.stack([output, output])).numpy()
    np.testing.assert_allclose(batch[0], eager, atol=1e-6)
    np.testing.assert_allclose(batch[1], eager, atol=1e-6)


def test_projected_tiled_inference_equals_whole_image_inference(ct, testdata):
    """Each tile is projected against its own LR tile: no seams (the real 512 x 512 CT)."""
    import sr_tf.models

    ds = pydicom.dcmread(testdata("693_UNCI.dcm"))
    image = np.clip((pydicom.pixels.apply_modality_lut(ds.pixel_array, ds)[100:260, 80:220] + 1024.0) / 4095.0,
                    0, 1).astype(np.float32)
    model = sr_tf.models.build("residual_cnn", scale=2, filters=8)
    rng = np.random.default_rng(0)
    model.set_weights([rng.normal(0, 0.1, w.shape).astype(np.float32) for w in model.get_weights()])
    predictor = inference.with_consistency(inference.KerasPredictor(model, "tiny", "tiny"), "project", 10)
    assert isinstance(predictor, inference.ProjectedPredictor) and predictor.projection.iterations == 10
    whole = inference.tiled_predict(predictor, image, tile=512)
    tiled = inference.tiled_predict(predictor, image, tile=64, overlap=24)
    np.testing.assert_allclose(tiled, whole, atol=1e-4)
    assert agreement(image[..., None], whole, 2, "bicubic") > agreement(
        image[..., None], inference.tiled_predict(predictor.inner, image, tile=512), 2, "bicubic") + 10


@pytest.mark.parametrize("kwargs,message", [
    ({"mode": "projected"}, "--consistency must be one of none, project, got 'projected'"),
    ({"iterations": -1}, "--consistency_iterations must be a non-negative integer, got -1"),
    ({"iterations": 2.5}, "--consistency_iterations must be a non-negative integer, got 2.5"),
    ({"step": 0.0}, r"--consistency_step must be in \(0, 2\), got 0.0"),
    ({"step": 3}, r"--consistency_step must be in \(0, 2\), got 3"),
])
def test_bad_values_are_refused_by_name(kwargs, message, ct):
    with pytest.raises(consistency.ConsistencyError, match=message):
        consistency.check(**kwargs)
    if "mode" not in kwargs:
        with pytest.raises(consistency.ConsistencyError, match=message):
            consistency.project(ct[::2, ::2], ct, 2, **kwargs)


def test_a_baked_projection_is_not_applied_twice_nor_silently_dropped():
    class Baked(inference.Predictor):
        projection = consistency.Projection(2, "bicubic", 5, 1.0)
        _model_scale = 2

    baked = Baked("export", "baked")
    assert inference.with_consistency(baked, "project") is baked
    with pytest.raises(consistency.ConsistencyError, match="--consistency=none.*already includes"):
        inference.with_consistency(baked, "none")
    card = baked.projection.card()
    assert consistency.Projection.from_card(card) == baked.projection
    assert consistency.Projection.from_card({"mode": "none"}) is None
    assert "5 iterations" in baked.projection.describe()
