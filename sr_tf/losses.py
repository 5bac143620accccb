"""Losses for training the super-resolution models.

Every loss is a small callable on images (N, H, W, C) in [0, 1] that returns PER-SAMPLE
losses, shape (N,), already multiplied by its ``weight``. A trainer adds the terms it
uses and averages them for the global batch with
``tf.nn.compute_average_loss(per_sample, global_batch_size=...)``, which is right under
any distribution strategy (a plain mean would average per replica and then be summed
across replicas). Everything is computed in float32, whatever the input dtype.
"""

import logging
import os

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

log = logging.getLogger(__name__)


def _float32(x):
    return ops.cast(x, "float32")


def _per_sample_mean(x):
    return ops.mean(x, axis=tuple(range(1, len(x.shape))))


class PixelLoss:
    """Pixel-wise distance, averaged over each image: ``"l1"``, ``"mse"`` or
    ``"charbonnier"`` (``sqrt(d^2 + epsilon^2)``, a smooth L1; its minimum is epsilon)."""

    KINDS = ("l1", "mse", "charbonnier")

    def __init__(self, kind="l1", weight=1.0, epsilon=1e-3):
        if kind not in self.KINDS:
            raise ValueError(f"kind must be one of {self.KINDS}, got {kind!r}")
        self.kind = kind
        self.weight = weight
        self.epsilon = epsilon

    def __call__(self, y_true, y_pred):
        diff = _float32(y_pred) - _float32(y_true)
        if self.kind == "l1":
            distance = ops.abs(diff)
        elif self.kind == "mse":
            distance = ops.square(diff)
        else:
            distance = ops.sqrt(ops.square(diff) + self.epsilon**2)
        return self.weight * _per_sample_mean(distance)


# Feature layer and ImageNet preprocessing of each backbone, and the file name under which
# keras.applications caches its ImageNet weights without the classifier.
_BACKBONES = {
    "vgg19": (
        "block5_conv4",
        keras.applications.vgg19.preprocess_input,
        "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
    ),
    "mobilenet_v2": (
        "block_13_expand_relu",
        keras.applications.mobilenet_v2.preprocess_input,
        "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
    ),
}
BACKBONES = tuple(_BACKBONES)  # the perceptual backbones by name


def keras_cache_dir():
    """Where ``keras.applications`` keeps downloaded weights (under ``models/``):
    ``$KERAS_HOME``, else ``~/.keras`` (``/tmp/.keras`` when home is not writable).
    Read at call time, so that a changed ``KERAS_HOME`` is seen."""
    if "KERAS_HOME" in os.environ:
        return os.environ["KERAS_HOME"]
    home = os.path.expanduser("~")
    return os.path.join(home if os.access(home, os.W_OK) else "/tmp", ".keras")


def cached_weights_path(backbone):
    """The path at which the Keras cache would hold ``backbone``'s ImageNet weights."""
    return os.path.join(keras_cache_dir(), "models", _BACKBONES[backbone][2])


class PerceptualLoss:
    """Mean squared distance between the features of a frozen ImageNet backbone.

    ``backbone="vgg19"``: ``block5_conv4`` before its ReLU, SRGAN's "VGG54" loss (the
    conv is rebuilt with a linear activation and the same weights). ``"mobilenet_v2"``:
    ``block_13_expand_relu``, the last stride-16 feature map of MobileNetV2 (576
    channels), the tap its detection and segmentation heads use, as deep as VGG's
    block 5; Swift-SRGAN uses MobileNetV2 as its lighter feature extractor. Grayscale
    images are repeated to 3 channels, and [0, 1] is mapped to the backbone's ImageNet
    preprocessing. Any input size from 32 px works.

    ``weights``: ``"imagenet"`` loads the Keras cache file (``cached_weights_path``) when
    it is there; when it is not, nothing is downloaded: the backbone is randomly
    initialised (He normal, seeded with ``seed``) and frozen, a working perceptual loss
    too (Liu et al., "Generic Perceptual Loss", CVPR 2021), and one warning says so.
    Feature magnitudes then differ from ImageNet's, so ``weight`` may need retuning.
    A path loads that ``.h5`` file (FileNotFoundError if missing); ``None`` is the
    seeded random backbone on purpose.

    The default ``weight`` 6e-3 is SRGAN's rescaling of the VGG loss (1 / 12.75^2).

    ``fold_batch_norm`` (default): the frozen backbone's batch normalisations, which run
    in inference mode, are folded into the convolutions before them (MobileNetV2's 40
    up to its tap; VGG19 has none): the same function with one pass less each, forward
    and backward (:func:`fold_batch_norms`).
    """

    def __init__(self, backbone="vgg19", weights="imagenet", weight=6e-3, seed=1337, fold_batch_norm=True):
        if backbone not in _BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
        self.backbone = backbone
        self.weight = weight
        self.weights_path = self._resolve_weights(backbone, weights)
        self.extractor = _feature_extractor(backbone, self.weights_path, seed)
        if fold_batch_norm:
            self.extractor = fold_batch_norms(self.extractor)

    @staticmethod
    def _resolve_weights(backbone, weights):
        if weights is None:
            return None
        if weights != "imagenet":
            if not os.path.isfile(weights):
                raise FileNotFoundError(f"no {backbone} weights file at {weights}")
            return weights
        path = cached_weights_path(backbone)
        if os.path.isfile(path):
            return path
        log.warning(
            "PerceptualLoss: ImageNet weights for %s are not in the Keras cache (%s) and are "
            "never downloaded here; using a randomly initialised, frozen %s instead.",
            backbone,
            path,
            backbone,
        )
        return None

    def features(self, images):
        """Backbone features (float32) of images in [0, 1] with 1 or 3 channels."""
        images = _float32(images)
        if images.shape[-1] == 1:
            images = ops.repeat(images, 3, axis=-1)
        preprocess = _BACKBONES[self.backbone][1]
        return _float32(self.extractor(preprocess(images * 255.0), training=False))

    def __call__(self, y_true, y_pred):
        # Two calls rather than one on both batches joined: the backbone runs in inference
        # mode, image by image, so it is the same function, and the backward pass then runs
        # through the predictions' half only (joined, it ran through both, the targets'
        # half with a zero gradient).
        target = ops.stop_gradient(self.features(y_true))
        return self.weight * _per_sample_mean(ops.square(self.features(y_pred) - target))


def _feature_extractor(backbone, weights_path, seed):
    """A frozen model from RGB (preprocessed) to the backbone's feature layer."""
    layer_name = _BACKBONES[backbone][0]
    shape = (None, None, 3)
    if backbone == "vgg19":
        base = keras.applications.VGG19(include_top=False, weights=None, input_shape=shape)
    else:
        base = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=shape)
    if weights_path is None:
        _he_normal_init(base, seed)
    else:
        base.load_weights(weights_path)
    if backbone == "vgg19":
        conv = base.get_layer(layer_name)
        linear = layers.Conv2D.from_config({**conv.get_config(), "activation": "linear", "name": f"{layer_name}_linear"})
        outputs = linear(conv.input)
        linear.set_weights(conv.get_weights())
    else:
        outputs = base.get_layer(layer_name).output
    extractor = keras.Model(base.input, outputs, name=f"{backbone}_features")
    extractor.trainable = False
    return extractor


class _FoldedBatchNormalization(layers.Layer):
    """Where a batch normalisation was, once :func:`fold_batch_norms` moved it into the
    convolution before it: passes its input through (the layer keeps its name)."""

    def call(self, inputs, training=None, mask=None):
        return inputs


def fold_batch_norms(model):
    """A frozen copy of functional ``model`` in which every batch normalisation that is
    the only reader of a linear, channels-last convolution (``Conv2D`` or
    ``DepthwiseConv2D``; neither layer shared, the convolution's output not one of the
    model's) is folded into it, for inference: the kernel scaled by
    ``gamma / sqrt(variance + epsilon)`` per output channel and the bias
    ``beta + (bias - mean) * scale``. The copy computes
    ``model(x, training=False)`` (to float rounding) with one element-wise pass less per
    folded layer, forward and backward; layer names are kept. ``model`` is unchanged."""
    outputs = {id(tensor) for tensor in model.outputs}
    folded = {}  # batch normalisation name -> the convolution before it
    for layer in model.layers:
        if not isinstance(layer, layers.BatchNormalization) or layer.axis not in (-1, 3, [-1], [3]):
            continue
        if len(layer._inbound_nodes) != 1:  # a shared layer: another call may read something else
            continue
        source = layer.input._keras_history.operation
        if (isinstance(source, (layers.Conv2D, layers.DepthwiseConv2D))
                and source.activation is keras.activations.linear
                and source.data_format == "channels_last"
                and len(source._inbound_nodes) == 1 and len(source._outbound_nodes) == 1
                and id(layer.input) not in outputs):  # the convolution's output is read by the BN alone
            folded[layer.name] = source
    norm_after = {conv.name: model.get_layer(name) for name, conv in folded.items()}  # convolution -> its BN

    def clone(layer):
        if layer.name in folded:
            return _FoldedBatchNormalization(name=layer.name)
        config = layer.get_config()
        if layer.name in norm_after:
            config["use_bias"] = True
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=clone)
    for layer in model.layers:
        if layer.name in folded or not layer.weights:
            continue
        target = copy.get_layer(layer.name)
        if layer.name not in norm_after:
            target.set_weights(layer.get_weights())
            continue
        norm = norm_after[layer.name]
        gamma = norm.gamma.numpy() if norm.scale else 1.0
        beta = norm.beta.numpy() if norm.center else 0.0
        mean, variance = norm.moving_mean.numpy(), norm.moving_variance.numpy()
        scale = (gamma / np.sqrt(variance.astype(np.float64) + norm.epsilon)).astype(np.float64)
        kernel = layer.kernel.numpy().astype(np.float64)
        if isinstance(layer, layers.DepthwiseConv2D):  # (kh, kw, channels, multiplier)
            kernel = kernel * scale.reshape(kernel.shape[2], kernel.shape[3])[np.newaxis, np.newaxis]
        else:
            kernel = kernel * scale
        bias = layer.bias.numpy().astype(np.float64) if layer.use_bias else 0.0
        target.set_weights([kernel.astype(np.float32), (beta + (bias - mean) * scale).astype(np.float32)])
    copy.trainable = False
    return copy


def _he_normal_init(model, seed):
    """Seeded He-normal kernels (a depthwise kernel's fan-in is one channel's window);
    biases and batch-norm statistics keep their neutral defaults. Leaves the global RNG
    alone."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if not isinstance(layer, (layers.Conv2D, layers.DepthwiseConv2D)):
            continue
        kh, kw, cin = layer.kernel.shape[:3]
        fan_in = kh * kw * (1 if isinstance(layer, layers.DepthwiseConv2D) else cin)
        layer.kernel.assign(rng.normal(0.0, np.sqrt(2.0 / fan_in), layer.kernel.shape).astype("float32"))


class AdversarialLoss:
    """Non-saturating GAN loss on discriminator logits (N, 1) or (N,).

    ``relativistic=True``: the relativistic average GAN of ESRGAN (Wang et al., 2018):
    each logit is compared with the mean logit of the other set in the batch (the local
    batch under a distribution strategy), and the two terms are averaged.

    ``weight`` (1e-3, SRGAN's) scales ``generator()``, the term added to the generator's
    content loss; ``discriminator()`` is the discriminator's whole objective and is not
    weighted (a factor there would only rescale its learning rate).
    """

    def __init__(self, relativistic=False, weight=1e-3):
        self.relativistic = relativistic
        self.weight = weight

    def generator(self, real_logits, fake_logits):
        real, fake = _logits(real_logits), _logits(fake_logits)
        if self.relativistic:
            loss = 0.5 * (_bce(real - ops.mean(fake), False) + _bce(fake - ops.mean(real), True))
        else:
            loss = _bce(fake, True)
        return self.weight * loss

    def discriminator(self, real_logits, fake_logits):
        real, fake = _logits(real_logits), _logits(fake_logits)
        if self.relativistic:
            return 0.5 * (_bce(real - ops.mean(fake), True) + _bce(fake - ops.mean(real), False))
        return _bce(real, True) + _bce(fake, False)


def _logits(logits):
    return ops.reshape(_float32(logits), (-1,))


def _bce(logits, is_real):
    """Binary cross-entropy of logits against an all-real or all-fake target."""
    return ops.softplus(-logits if is_real else logits)


class TotalVariationLoss:
    """Anisotropic total variation of the prediction, summed over each image as in
    ``tf.image.total_variation`` (SRGAN's regulariser, weight 2e-8)."""

    def __init__(self, weight=2e-8):
        self.weight = weight

    def __call__(self, y_true, y_pred):
        del y_true  # a regulariser of the prediction alone; the signature matches the others
        y = _float32(y_pred)
        rows = ops.sum(ops.abs(y[:, 1:] - y[:, :-1]), axis=(1, 2, 3))
        cols = ops.sum(ops.abs(y[:, :, 1:] - y[:, :, :-1]), axis=(1, 2, 3))
        return self.weight * (rows + cols)


class SSIMLoss:
    """``1 - SSIM`` per image (``tf.image.ssim``, max_val 1, 11x11 Gaussian window, so
    images of at least 11x11 pixels)."""

    def __init__(self, weight=1.0):
        self.weight = weight

    def __call__(self, y_true, y_pred):
        return self.weight * (1.0 - tf.image.ssim(_float32(y_true), _float32(y_pred), max_val=1.0))
