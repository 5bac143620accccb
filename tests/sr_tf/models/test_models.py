"""The model registry, the four model families and their shared blocks."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from sr_tf import models
from sr_tf.models import blocks

# Small widths and depths where a test is not about the architecture itself.
TINY = {
    "srgan": dict(filters=8, num_blocks=1),
    "swift_srgan": dict(filters=8, num_blocks=1),
    "vq_autoencoder": dict(filters=8, num_res_blocks=1, codebook_size=16, embedding_dim=4),
    "residual_cnn": dict(filters=8),
}
TINY_CRITIC = dict(filters=4, dense_units=8)


def images(shape=(2, 7, 9, 1), seed=0):
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


@pytest.fixture(params=["mixed_float16", "mixed_bfloat16"])
def mixed_precision(request):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(request.param)
    try:
        yield request.param.removeprefix("mixed_")
    finally:
        keras.config.set_dtype_policy(previous)


@pytest.mark.parametrize("scale", [1, 2, 4, 8])
@pytest.mark.parametrize("name", models.NAMES)
def test_output_shape_for_odd_sizes(name, scale):
    model = models.build(name, scale=scale, **TINY[name])
    out = model(images(), training=False)
    assert out.shape == (2, 7 * scale, 9 * scale, 1)
    assert out.dtype == "float32"
    assert 0.0 <= float(tf.reduce_min(out)) and float(tf.reduce_max(out)) <= 1.0


@pytest.mark.parametrize("name", models.NAMES)
def test_three_channels(name):
    model = models.build(name, scale=2, channels=3, **TINY[name])
    assert model(images((1, 5, 6, 3)), training=False).shape == (1, 10, 12, 3)


@pytest.mark.parametrize("name", models.NAMES)
def test_traces_for_unknown_height_and_width(name):
    """The exported signature is (None, None, None, C): one trace serves every size."""
    model = models.build(name, scale=2, **TINY[name])
    infer = tf.function(lambda x: model(x, training=False), input_signature=[tf.TensorSpec((None, None, None, 1))])
    for shape in [(1, 5, 7, 1), (2, 8, 3, 1)]:
        x = images(shape)
        np.testing.assert_allclose(infer(x), model(x, training=False), atol=1e-5)
    assert infer.experimental_get_tracing_count() == 1


def test_registry_names_and_errors():
    assert models.NAMES == ("srgan", "swift_srgan", "vq_autoencoder", "residual_cnn")
    assert [models.is_gan(n) for n in models.NAMES] == [True, True, False, False]
    with pytest.raises(ValueError, match="swift_srgan"):
        models.build("edsr")
    with pytest.raises(ValueError, match=r"\(1, 2, 4, 8\)"):
        models.build("srgan", scale=3)
    with pytest.raises(ValueError, match="srgan"):
        models.build_discriminator("residual_cnn")
    with pytest.raises(ValueError, match="vq_autoencoder"):
        models.is_gan("vqvae")
    for name in models.NAMES:
        assert models.name_of(models.build(name, scale=2, **TINY[name])) == name
    assert models.name_of(keras.Sequential()) is None


@pytest.mark.parametrize(
    "scale, channels, reference",
    [(4, 1, 200_787), (4, 3, 201_209), (2, 1, 183_443)],
)
def test_swift_srgan_parameters_match_the_published_code(scale, channels, reference):
    """Trainable weights, the count PyTorch's ``parameters()`` gives (BN running
    statistics are buffers there, non-trainable weights here)."""
    model = models.build("swift_srgan", scale=scale, channels=channels)
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert abs(trainable - reference) / reference < 0.01


def test_upsampling_blocks_are_log2_of_the_scale():
    for scale, blocks_expected in [(1, 0), (2, 1), (4, 2), (8, 3)]:
        model = models.build("srgan", scale=scale, **TINY["srgan"])
        assert len(model.upsample) == blocks_expected


@pytest.mark.parametrize("name", models.NAMES)
def test_keras_round_trip(name, tmp_path):
    model = models.build(name, scale=2, **TINY[name])
    path = tmp_path / f"{name}.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded) is type(model)
    assert loaded.get_config() == model.get_config()
    x = images((1, 6, 5, 1), seed=1)
    np.testing.assert_array_equal(loaded(x, training=False), model(x, training=False))


@pytest.mark.parametrize("name", ["srgan", "swift_srgan"])
def test_discriminator_any_crop_size_and_round_trip(name, tmp_path):
    critic = models.build_discriminator(name, **TINY_CRITIC)
    for shape in [(2, 24, 24, 1), (3, 40, 33, 1)]:
        logits = critic(images(shape), training=False)
        assert logits.shape == (shape[0], 1)
    path = tmp_path / f"{name}_critic.keras"
    critic.save(path)
    loaded = keras.models.load_model(path)
    x = images((2, 16, 20, 1))
    np.testing.assert_array_equal(loaded(x, training=False), critic(x, training=False))


@pytest.mark.parametrize("name", models.NAMES)
def test_mixed_precision_output_is_float32(name, mixed_precision):
    model = models.build(name, scale=2, **TINY[name])
    assert model.compute_dtype == mixed_precision
    assert model(images(), training=True).dtype == "float32"
    if models.is_gan(name):
        assert models.build_discriminator(name, **TINY_CRITIC)(images((1, 16, 16, 1))).dtype == "float32"


def test_vq_straight_through_gradient_reaches_the_encoder():
    model = models.build("vq_autoencoder", scale=2, **TINY["vq_autoencoder"])
    target = images((2, 14, 18, 1), seed=3)
    with tf.GradientTape() as tape:
        out = model(images(), training=True)
        commitment, codebook = model.losses
        loss = tf.reduce_mean((out - target) ** 2) + commitment + codebook
    assert float(codebook) > 0.0 and float(commitment) > 0.0
    first_conv, codebook_var = model.encoder[0].kernel, model.quantizer.codebook
    grads = tape.gradient(loss, [first_conv, codebook_var])
    assert float(tf.reduce_max(tf.abs(grads[0]))) > 0.0
    assert float(tf.reduce_max(tf.abs(grads[1]))) > 0.0


def test_vq_ema_codebook_follows_the_encodings():
    quantizer = blocks.VectorQuantizer(codebook_size=4, embedding_dim=2, ema=True, decay=0.5)
    vectors = tf.constant([[[[0.9, 0.9], [0.8, 1.0]]]])
    quantizer(vectors)
    start = quantizer.codebook.numpy()
    assert not quantizer.codebook.trainable
    assert len(quantizer.losses) == 1  # commitment only
    quantizer(vectors, training=True)
    moved = np.any(start != quantizer.codebook.numpy(), axis=1)
    assert moved.sum() >= 1  # the entries that were used moved towards the vectors ...
    np.testing.assert_allclose(quantizer.codebook.numpy()[~moved], start[~moved])  # ... the others stayed
    used = np.argmax(moved)
    assert np.linalg.norm(quantizer.codebook.numpy()[used] - 0.9) < np.linalg.norm(start[used] - 0.9)


def test_vq_ema_codebook_stays_identical_across_replicas():
    """Each replica sees different vectors; the averaged statistics give one codebook.
    In a subprocess: the two logical CPUs must be configured before TensorFlow starts."""
    script = textwrap.dedent(
        """
        import numpy as np, tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from sr_tf.models.blocks import VectorQuantizer
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        with strategy.scope():
            quantizer = VectorQuantizer(codebook_size=8, embedding_dim=2, ema=True, decay=0.5)
            quantizer.build((None, 2))
        vectors = np.random.default_rng(0).random((8, 1, 1, 2), dtype=np.float32)
        batches = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices(vectors).batch(8))
        step = tf.function(lambda x: strategy.run(lambda v: quantizer(v, training=True), args=(x,)))
        for batch in batches:
            step(batch)
        first, second = (v.numpy() for v in quantizer.codebook.value.values)
        assert np.array_equal(first, second), (first, second)
        print("identical")
        """
    )
    from tests import ROOT as root
    env = {**os.environ, "PYTHONPATH": root, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert "identical" in result.stdout, result.stderr[-2000:]


def test_straight_through_clip():
    head = blocks.UnitRange("clip")
    x = tf.constant([-0.5, 0.5, 1.5])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = head(x, training=True)
    np.testing.assert_allclose(y, [0.0, 0.5, 1.0])
    np.testing.assert_allclose(tape.gradient(y, x), [1.0, 1.0, 1.0])
    np.testing.assert_allclose(head(x, training=False), [0.0, 0.5, 1.0])


@pytest.mark.parametrize("scale", [2, 4, 8])
def test_bicubic_upsample_equals_tf_image_resize(scale):
    for shape in [(2, 7, 9, 1), (1, 1, 2, 3)]:
        x = images(shape)
        expected = tf.image.resize(x, (shape[1] * scale, shape[2] * scale), method="bicubic")
        np.testing.assert_allclose(blocks.bicubic_upsample(tf.constant(x), scale), expected, atol=1e-6)


def test_pad_to_multiple_repeats_the_edge():
    x = tf.reshape(tf.range(6, dtype="float32"), (1, 2, 3, 1))
    padded = blocks.pad_to_multiple(x, 4)
    assert padded.shape == (1, 4, 4, 1)
    np.testing.assert_array_equal(padded[0, :, :, 0], [[0, 1, 2, 2], [3, 4, 5, 5], [3, 4, 5, 5], [3, 4, 5, 5]])


@pytest.mark.parametrize("scale", [2, 4])
@pytest.mark.parametrize("name", ["srgan", "swift_srgan"])
def test_residual_form_starts_as_bicubic(name, scale):
    """Zero-initialised tail, ICNR sub-pixel convolutions: an untrained model is bicubic."""
    model = models.build(name, scale=scale)
    lr = images((2, 12, 17, 1), seed=3)
    expected = np.clip(blocks.bicubic_upsample(tf.constant(lr), scale).numpy(), 0, 1)
    np.testing.assert_allclose(model(lr, training=False), expected, atol=1e-3)
    published = models.build(name, scale=scale, residual=False)
    assert np.abs(published(lr, training=False).numpy() - expected).max() > 0.05


@pytest.mark.parametrize("name", ["srgan", "swift_srgan"])
def test_residual_and_published_forms_have_the_same_weights(name):
    counts = [sum(int(np.prod(w.shape)) for w in models.build(name, scale=4, residual=r).weights) for r in (True, False)]
    assert counts[0] == counts[1]


def test_icnr_repeats_each_kernel_for_the_four_sub_pixels():
    kernel = blocks.ICNR()((3, 3, 8, 16)).numpy()
    for phase in range(1, 4):
        np.testing.assert_array_equal(kernel[..., phase * 4:(phase + 1) * 4], kernel[..., :4])
    block = blocks.UpsampleBlock(4, icnr=True)
    out = block(images((1, 5, 6, 4))).numpy()
    # Every 2x2 output block holds one value per channel: nearest-neighbour upsampling.
    np.testing.assert_allclose(out[:, 0::2, 0::2], out[:, 1::2, 1::2], atol=1e-6)
    np.testing.assert_allclose(out[:, 0::2, 0::2], out[:, 0::2, 1::2], atol=1e-6)


@pytest.mark.parametrize("level", [0.0, 0.013, 0.5, 0.91, 1.0])
@pytest.mark.parametrize("name", models.NAMES)
def test_constant_image_comes_back_constant(name, level):
    """The residual head fades the correction on flat input: even random weights (which
    predict a large correction everywhere) return a constant image unchanged."""
    keras.utils.set_random_seed(1)
    model = models.build(name, scale=2, **TINY[name])
    if name in ("srgan", "swift_srgan"):  # the zero tail would make this trivial: randomise it
        model.tail.set_weights([np.random.default_rng(0).normal(0, 0.5, w.shape) for w in model.tail.get_weights()])
    flat = np.full((1, 11, 13, 1), level, np.float32)
    out = model(flat, training=False).numpy()
    np.testing.assert_allclose(out, level, atol=1e-3)
    textured = images((1, 11, 13, 1))
    base = np.clip(blocks.bicubic_upsample(tf.constant(textured), 2).numpy(), 0, 1) if name != "vq_autoencoder" else None
    if base is not None:  # the same weights do change a textured image: the gate is not a switch-off
        assert np.abs(model(textured, training=False).numpy() - base).max() > 1e-2


def test_residual_output_gate():
    head = blocks.ResidualOutput(flat_std=0.01, radius=2)
    base = tf.constant(np.full((1, 9, 9, 1), 0.4, np.float32))
    np.testing.assert_allclose(head.gate(base), 0.0, atol=1e-6)
    rng = np.random.default_rng(0)
    for std, expected in ((0.005, 0.08), (0.01, 0.7), (0.02, 0.99), (0.05, 1.0)):
        noise = tf.constant(0.5 + std * rng.standard_normal((1, 200, 200, 1)).astype(np.float32))
        assert abs(float(tf.reduce_mean(head.gate(noise))) - expected) < 0.12, std
    off = blocks.ResidualOutput(flat_std=0.0)
    np.testing.assert_allclose(off(base, tf.fill([1, 9, 9, 1], 0.1)), 0.5, atol=1e-6)
    with pytest.raises(ValueError, match="flat_std"):
        blocks.ResidualOutput(flat_std=-1)


def test_models_saved_before_the_residual_form_load_as_published():
    config = models.build("swift_srgan", scale=2, **TINY["swift_srgan"]).get_config()
    config.pop("residual")
    from sr_tf.models.swift_srgan import SwiftSRResNet

    assert SwiftSRResNet.from_config(config).residual is False


def _step_values(model, lr, hr):
    """Output, loss gradients and the batch-norm moving statistics after one training call."""
    with tf.GradientTape() as tape:
        out = model(lr, training=True)
        loss = tf.reduce_mean(tf.abs(out - hr))
    grads = tape.gradient(loss, model.trainable_variables)
    moving = [w.numpy() for w in model.weights if "moving" in w.path]
    return out.numpy(), [g.numpy() for g in grads], moving


@pytest.mark.parametrize("name", ["srgan", "swift_srgan"])
def test_fast_options_compute_the_same_training_step(name):
    """Fused batch norm, fused PReLU and the tail before the shuffle change how, not what,
    the generator computes: the same output, the same gradients for every weight (slopes
    and batch-norm scales included) and the same moving statistics as Keras' own layers
    with the tail after the shuffle."""
    keras.utils.set_random_seed(4)
    fast = models.build(name, scale=4, filters=8, num_blocks=2)
    rng = np.random.default_rng(2)
    lr, hr = images((2, 10, 11, 1), seed=5), images((2, 40, 44, 1), seed=6)
    fast(lr)
    # Weights away from their initial values (zero tail, unit slopes' ratio, gamma 1), so
    # that every term of every gradient is exercised.
    fast.set_weights([w + rng.normal(0, 0.1, w.shape).astype(np.float32) if "moving" not in p else w
                      for w, p in zip(fast.get_weights(), (v.path for v in fast.weights))])
    former = type(fast).from_config({**fast.get_config(), "fused_batch_norm": False, "fused_prelu": False,
                                     "tail_before_shuffle": False})
    former(lr)
    former.set_weights(fast.get_weights())
    assert not isinstance(former.body[0].act, blocks.FusedPReLU)
    assert not isinstance(former.body[0].bn1, blocks.FusedBatchNormalization)
    out_fast, grads_fast, moving_fast = _step_values(fast, lr, hr)
    out_former, grads_former, moving_former = _step_values(former, lr, hr)
    np.testing.assert_allclose(out_fast, out_former, atol=2e-5)
    assert len(grads_fast) == len(grads_former) > 20
    for variable, a, b in zip(fast.trainable_variables, grads_fast, grads_former):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5 * max(1.0, np.abs(b).max()), err_msg=variable.path)
    for a, b in zip(moving_fast, moving_former):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("scale", [1, 2, 4])
@pytest.mark.parametrize("name", models.NAMES)
def test_deployable_form_computes_the_model(name, scale):
    """``model.deployable()`` is the function of ``model(x, training=False)`` for every
    family (trained-looking weights, odd non-square input), eagerly and traced with free
    height and width as the export traces it, and leaves the model as it was."""
    model = models.build(name, scale=scale, **TINY[name])
    rng = np.random.default_rng(1)
    for weight in model.weights:
        weight.assign(rng.normal(0.0, 0.2, weight.shape) + (1.0 if "variance" in weight.path else 0.0))
    lr = images((2, 13, 7, 1), seed=3)
    reference = model(lr, training=False).numpy()
    function, notes = model.deployable()
    np.testing.assert_allclose(function(tf.constant(lr)).numpy(), reference, atol=1e-5)
    traced = tf.function(function, input_signature=[tf.TensorSpec((None, None, None, 1), tf.float32)])
    np.testing.assert_allclose(traced(tf.constant(lr)).numpy(), reference, atol=1e-5)
    assert all(isinstance(note, str) for note in notes) and (name in ("srgan", "swift_srgan") or not notes)
    np.testing.assert_array_equal(model(lr, training=False).numpy(), reference)


@pytest.mark.parametrize("kernel_size,multiplier", [((9, 9), 1), ((7, 5), 2), ((3, 3), 1)])
def test_deployed_conv_is_the_separable_convolution(kernel_size, multiplier):
    """Depthwise kernels of more than ``XNNPACK_FAST_TAPS`` taps run in row bands with the
    layer's bias and activation; smaller ones run as the layer."""
    conv = keras.layers.SeparableConv2D(5, kernel_size, padding="same", depth_multiplier=multiplier,
                                        activation="relu", bias_initializer="random_normal")
    x = tf.constant(images((2, 11, 6, 3), seed=4))
    reference = conv(x).numpy()
    assert blocks.has_large_depthwise(conv) == (kernel_size[0] * kernel_size[1] > blocks.XNNPACK_FAST_TAPS)
    np.testing.assert_allclose(blocks.deployed_conv(conv, x).numpy(), reference, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_fused_prelu_matches_keras_prelu(dtype):
    """Forward and gradients (inputs and slopes) as ``keras.layers.PReLU``, also under a
    float16 policy; at inference it is Keras' own graph."""
    x = tf.constant(np.random.default_rng(0).normal(0, 1, (3, 5, 6, 4)), dtype)
    upstream = tf.constant(np.random.default_rng(1).normal(0, 1, (3, 5, 6, 4)), dtype)
    results = []
    for kind in (blocks.FusedPReLU, keras.layers.PReLU):
        layer = kind(alpha_initializer=keras.initializers.Constant(0.25), shared_axes=[1, 2], dtype=dtype)
        layer.build(x.shape)
        layer.alpha.assign(np.linspace(-0.5, 1.5, 4).reshape(1, 1, 4))
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(tf.cast(y * upstream, "float32"))
        dx, dalpha = tape.gradient(loss, [x, layer.alpha])
        results.append((y.numpy(), dx.numpy(), dalpha.numpy(), layer(x, training=False).numpy()))
    tolerance = 1e-6 if dtype == "float32" else 2e-2
    for a, b in zip(*results):
        np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), rtol=tolerance, atol=tolerance)
