"""The training losses: per-sample values, weights, gradients, and the offline policy
of the perceptual loss (docs/DESIGN.md, contract 8:
pretrained weights)."""

import logging
import urllib.request

import keras
import numpy as np
import pytest
import tensorflow as tf

from sr_tf import losses


def images(shape=(2, 32, 36, 1), seed=0):
    return tf.constant(np.random.default_rng(seed).random(shape, dtype=np.float32))


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty Keras cache, and any download attempt fails the test."""

    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(keras.utils, "get_file", no_network)
    monkeypatch.setattr(keras.src.utils.file_utils, "get_file", no_network)
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(urllib.request, "urlretrieve", no_network)
    return tmp_path


def test_pixel_losses_per_sample_and_weighted():
    y_true = tf.zeros((3, 4, 5, 1))
    y_pred = tf.concat([tf.fill((1, 4, 5, 1), v) for v in (0.0, 0.5, -0.25)], axis=0)
    np.testing.assert_allclose(losses.PixelLoss("l1")(y_true, y_pred), [0.0, 0.5, 0.25])
    np.testing.assert_allclose(losses.PixelLoss("mse", weight=2.0)(y_true, y_pred), [0.0, 0.5, 0.125])
    charbonnier = losses.PixelLoss("charbonnier", epsilon=1e-3)(y_true, y_pred)
    np.testing.assert_allclose(charbonnier, [1e-3, np.hypot(0.5, 1e-3), np.hypot(0.25, 1e-3)], rtol=1e-6)
    with pytest.raises(ValueError, match="charbonnier"):
        losses.PixelLoss("l3")


def test_total_variation():
    ramp = tf.reshape(tf.range(12, dtype="float32"), (1, 3, 4, 1))
    flat = tf.ones((1, 3, 4, 1))
    tv = losses.TotalVariationLoss(weight=1.0)(None, tf.concat([ramp, flat], axis=0))
    # rows differ by 4 (2 x 4 pairs), columns by 1 (3 x 3 pairs)
    np.testing.assert_allclose(tv, [2 * 4 * 4 + 3 * 3 * 1, 0.0])
    np.testing.assert_allclose(losses.TotalVariationLoss()(None, ramp), [41 * 2e-8], rtol=1e-6)


def test_ssim_loss():
    a, b = images(seed=1), images(seed=2)
    ssim = losses.SSIMLoss(weight=0.5)
    np.testing.assert_allclose(ssim(a, a), [0.0, 0.0], atol=1e-6)
    value = ssim(a, b)
    assert value.shape == (2,) and np.all(value.numpy() > 0.1) and np.all(value.numpy() <= 1.0)


def test_adversarial_loss():
    real, fake = tf.constant([[2.0], [1.0]]), tf.constant([[-1.0], [0.5]])
    softplus = lambda x: np.log1p(np.exp(x))  # noqa: E731
    standard = losses.AdversarialLoss(weight=0.1)
    np.testing.assert_allclose(standard.generator(real, fake), 0.1 * softplus(np.array([1.0, -0.5])), rtol=1e-6)
    np.testing.assert_allclose(
        standard.discriminator(real, fake), softplus(-np.array([2.0, 1.0])) + softplus(np.array([-1.0, 0.5])), rtol=1e-6
    )
    relativistic = losses.AdversarialLoss(relativistic=True, weight=1.0)
    # relative to the other set's mean: real - (-0.25), fake - 1.5
    d_real, d_fake = np.array([2.25, 1.25]), np.array([-2.5, -1.0])
    np.testing.assert_allclose(
        relativistic.discriminator(real, fake), 0.5 * (softplus(-d_real) + softplus(d_fake)), rtol=1e-6
    )
    np.testing.assert_allclose(relativistic.generator(real, fake), 0.5 * (softplus(d_real) + softplus(-d_fake)), rtol=1e-6)
    # a discriminator that separates well has a lower loss than a confused one
    assert np.all(standard.discriminator(real + 5, fake - 5) < standard.discriminator(fake, real))


@pytest.mark.parametrize("backbone", ["vgg19", "mobilenet_v2"])
def test_perceptual_loss_offline(backbone, offline, caplog):
    with caplog.at_level(logging.WARNING, logger="sr_tf.losses"):
        loss = losses.PerceptualLoss(backbone, weights="imagenet", weight=1.0)
    warnings = [r for r in caplog.records if r.name == "sr_tf.losses"]
    assert len(warnings) == 1 and str(offline) in warnings[0].getMessage()
    assert loss.weights_path is None and not loss.extractor.trainable
    a, b = images(seed=1), images(seed=2)
    np.testing.assert_allclose(loss(a, a), [0.0, 0.0], atol=1e-7)
    assert loss(a, b).shape == (2,) and np.all(loss(a, b).numpy() > 0.0)
    # any size from 32 px, and the same seeded backbone every time
    c, d = images((1, 48, 40, 1), seed=3), images((1, 48, 40, 1), seed=4)
    np.testing.assert_allclose(losses.PerceptualLoss(backbone, weights=None, weight=1.0)(c, d), loss(c, d), rtol=1e-5)


def test_perceptual_loss_loads_the_keras_cache(offline, caplog):
    reference = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(None, None, 3))
    (offline / "models").mkdir()
    reference.save(offline / "models" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5")
    with caplog.at_level(logging.WARNING, logger="sr_tf.losses"):
        loss = losses.PerceptualLoss("mobilenet_v2")
    assert not [r for r in caplog.records if r.name == "sr_tf.losses"]
    assert loss.weights_path == losses.cached_weights_path("mobilenet_v2")
    x = images((1, 32, 32, 3))
    tap = keras.Model(reference.input, reference.get_layer("block_13_expand_relu").output)
    expected = tap(keras.applications.mobilenet_v2.preprocess_input(x * 255.0), training=False)
    np.testing.assert_allclose(loss.features(x), expected, rtol=1e-5, atol=1e-5)


def test_vgg_features_are_taken_before_the_activation(offline):
    loss = losses.PerceptualLoss("vgg19", weights=None)
    assert loss.extractor.layers[-1].get_config()["activation"] == "linear"
    assert float(tf.reduce_min(loss.features(images()))) < 0.0


def test_perceptual_loss_explicit_path_must_exist(offline):
    with pytest.raises(FileNotFoundError):
        losses.PerceptualLoss("vgg19", weights=str(offline / "missing.h5"))


@pytest.fixture(scope="module")
def random_perceptual():
    return losses.PerceptualLoss("mobilenet_v2", weights=None)


@pytest.mark.parametrize(
    "make",
    [
        lambda p: losses.PixelLoss("l1"),
        lambda p: losses.PixelLoss("mse"),
        lambda p: losses.PixelLoss("charbonnier"),
        lambda p: losses.TotalVariationLoss(),
        lambda p: losses.SSIMLoss(),
        lambda p: p,
        lambda p: (lambda y_true, y_pred: losses.AdversarialLoss().generator(y_true[:, 0, 0], y_pred[:, 0, 0])),
        lambda p: (lambda y_true, y_pred: losses.AdversarialLoss(True).discriminator(y_true[:, 0, 0], y_pred[:, 0, 0])),
    ],
    ids=["l1", "mse", "charbonnier", "tv", "ssim", "perceptual", "adversarial_g", "adversarial_d_relativistic"],
)
def test_gradients_are_finite(make, random_perceptual):
    loss = make(random_perceptual)
    y_true = images(seed=5)
    for y_pred in (images(seed=6), tf.identity(y_true)):
        with tf.GradientTape() as tape:
            tape.watch(y_pred)
            value = tf.reduce_sum(loss(y_true, y_pred))
        grad = tape.gradient(value, y_pred)
        assert np.isfinite(float(value)) and np.all(np.isfinite(grad.numpy()))


def test_perceptual_loss_is_per_image_and_differentiates_the_prediction_only(random_perceptual):
    """Targets and predictions go through the backbone in two calls: the same per-image
    values as one call on both batches joined, and gradients for the prediction alone."""
    rng = np.random.default_rng(3)
    hr = tf.constant(rng.random((2, 40, 40, 1), dtype=np.float32))
    sr = tf.constant(rng.random((2, 40, 40, 1), dtype=np.float32))
    joined = random_perceptual.features(tf.concat([hr, sr], axis=0))
    expected = random_perceptual.weight * tf.reduce_mean(tf.square(joined[2:] - joined[:2]), axis=[1, 2, 3])
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([hr, sr])
        value = random_perceptual(hr, sr)
    np.testing.assert_allclose(value, expected, rtol=1e-4)
    assert tape.gradient(value, hr) is None
    assert float(tf.reduce_max(tf.abs(tape.gradient(value, sr)))) > 0


def _with_statistics(model, seed=0):
    """``model`` with every batch normalisation's gamma, beta, mean and variance drawn at
    random (seeded), so that folding them changes the kernels."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, n), rng.normal(0, 0.2, n), rng.normal(0, 0.2, n),
                               rng.uniform(0.5, 2.0, n)])
    return model


def test_folding_the_backbones_batch_norms_keeps_its_features_and_gradients():
    reference = _with_statistics(keras.applications.MobileNetV2(include_top=False, weights=None,
                                                                input_shape=(None, None, 3)))
    tap = keras.Model(reference.input, reference.get_layer("block_13_expand_relu").output)
    before = [w.copy() for w in tap.get_weights()]
    folded = losses.fold_batch_norms(tap)
    count = sum(isinstance(layer, keras.layers.BatchNormalization) for layer in tap.layers)
    assert count == 40 and not any(isinstance(layer, keras.layers.BatchNormalization) for layer in folded.layers)
    assert [layer.name for layer in folded.layers[1:]] == [layer.name for layer in tap.layers[1:]]
    assert not folded.trainable
    x = tf.constant(images((2, 64, 48, 3), seed=5) * 2.0 - 1.0)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        want, got = tap(x, training=False), folded(x, training=False)
        want_loss, got_loss = tf.reduce_sum(want**2), tf.reduce_sum(got**2)
    scale = float(tf.reduce_max(tf.abs(want)))
    np.testing.assert_allclose(got, want, atol=1e-5 * scale)
    want_grad, got_grad = tape.gradient(want_loss, x), tape.gradient(got_loss, x)
    np.testing.assert_allclose(got_grad, want_grad, atol=1e-4 * float(tf.reduce_max(tf.abs(want_grad))))
    for a, b in zip(tap.get_weights(), before):  # the model folded from is unchanged
        np.testing.assert_array_equal(a, b)


def test_only_a_batch_norm_that_alone_reads_a_convolution_is_folded():
    inputs = keras.Input((8, 8, 2))
    shared = keras.layers.Conv2D(3, 3, padding="same", name="shared")(inputs)
    kept = keras.layers.BatchNormalization(name="kept")(shared)  # the convolution has another reader
    alone = keras.layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, use_bias=False, name="alone")(inputs)
    folded_bn = keras.layers.BatchNormalization(name="folded")(alone)
    after_add = keras.layers.BatchNormalization(name="after_add")(keras.layers.Add()([kept, shared]))
    # a convolution with its own non-linearity, one whose output is also the model's, and
    # one batch normalisation called twice are not folded either
    relu = keras.layers.BatchNormalization(name="after_relu")(
        keras.layers.Conv2D(2, 3, padding="same", activation="relu", name="relu_conv")(inputs))
    exposed = keras.layers.Conv2D(2, 1, name="exposed")(inputs)
    after_exposed = keras.layers.BatchNormalization(name="after_exposed")(exposed)
    twice = keras.layers.BatchNormalization(name="twice")
    first = twice(keras.layers.Conv2D(2, 1, name="first")(inputs))
    second = twice(keras.layers.Conv2D(2, 1, name="second")(inputs))
    model = _with_statistics(keras.Model(inputs, [after_add, folded_bn, relu, exposed, after_exposed, first, second]),
                             seed=1)
    folded = losses.fold_batch_norms(model)
    norms = {layer.name for layer in folded.layers if isinstance(layer, keras.layers.BatchNormalization)}
    assert norms == {"kept", "after_add", "after_relu", "after_exposed", "twice"}
    assert folded.get_layer("alone").use_bias
    x = images((2, 8, 8, 2), seed=6)
    for got, want in zip(folded(x, training=False), model(x, training=False)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    nothing = losses.fold_batch_norms(keras.Model(inputs, exposed))  # nothing to fold: a frozen copy
    assert nothing is not model and not nothing.trainable


def test_the_perceptual_loss_is_the_same_with_its_batch_norms_folded(offline):
    # ImageNet-like statistics from a cached weights file, so that folding changes the kernels
    reference = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(None, None, 3))
    losses._he_normal_init(reference, seed=3)
    rng = np.random.default_rng(3)
    for layer in reference.layers:  # statistics near neutral, so the features neither vanish nor blow up
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.8, 1.2, n), rng.normal(0, 0.05, n), rng.normal(0, 0.05, n),
                               rng.uniform(0.8, 1.25, n)])
    (offline / "models").mkdir()
    reference.save(offline / "models" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5")
    folded = losses.PerceptualLoss("mobilenet_v2", weight=1.0)
    unfolded = losses.PerceptualLoss("mobilenet_v2", weight=1.0, fold_batch_norm=False)
    assert folded.weights_path == unfolded.weights_path == losses.cached_weights_path("mobilenet_v2")
    assert any(isinstance(layer, keras.layers.BatchNormalization) for layer in unfolded.extractor.layers)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in folded.extractor.layers)
    a, b = images((2, 48, 48, 1), seed=7), images((2, 48, 48, 1), seed=8)
    want = unfolded.features(a)
    assert float(tf.reduce_max(tf.abs(want))) > 1e-3  # features that carry the statistics
    np.testing.assert_allclose(folded.features(a), want, atol=1e-4 * float(tf.reduce_max(tf.abs(want))))
    np.testing.assert_allclose(folded(a, b), unfolded(a, b), rtol=1e-4)
    vgg = losses.PerceptualLoss("vgg19", weights=None)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in vgg.extractor.layers)
