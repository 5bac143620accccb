"""The model registry: every network is built by name.

    model = sr_tf.models.build("swift_srgan", scale=4)          # LR (N, H, W, 1) -> (N, 4H, 4W, 1)
    critic = sr_tf.models.build_discriminator("swift_srgan")    # (N, h, w, 1) -> logits (N, 1)

``scale`` is 1 (restoration at the same size: artifact removal, denoising), 2, 4 or 8;
height and width are free. Options are the model class's keyword arguments (``filters``,
``num_blocks``, ``codebook_size``, ...); their defaults are the published configurations.
Models come back built (weights created) for inputs of shape (None, None, None, channels).

Outputs are float32 in [0, 1] (float32 also under a ``mixed_float16`` or ``mixed_bfloat16`` policy). Every
model by default adds a learned correction to the interpolated input (bicubic; the input
itself at scale 1), faded where the image is flat and clipped, straight-through while
training (``blocks.ResidualOutput``); srgan and swift_srgan start from bicubic exactly
and take ``residual=False`` for the published form, ``(tanh(x) + 1) / 2`` without a skip.
"""

import keras
import numpy as np

from sr_tf.models.blocks import SCALES, num_doublings
from sr_tf.models.residual_cnn import ResidualCNN
from sr_tf.models.srgan import SRGANDiscriminator, SRResNet
from sr_tf.models.swift_srgan import SwiftSRGANDiscriminator, SwiftSRResNet
from sr_tf.models.vq_autoencoder import VQAutoencoder

NAMES = ("srgan", "swift_srgan", "vq_autoencoder", "residual_cnn")

_GENERATORS = {
    "srgan": SRResNet,
    "swift_srgan": SwiftSRResNet,
    "vq_autoencoder": VQAutoencoder,
    "residual_cnn": ResidualCNN,
}
_DISCRIMINATORS = {"srgan": SRGANDiscriminator, "swift_srgan": SwiftSRGANDiscriminator}


def _check_name(name):
    if name not in _GENERATORS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(NAMES)}")


def name_of(model):
    """The registry name of ``model``'s class (``"swift_srgan"``, ...), or None."""
    return next((name for name, cls in _GENERATORS.items() if type(model) is cls), None)


def is_gan(name):
    """True for the models trained adversarially (they have a discriminator)."""
    _check_name(name)
    return name in _DISCRIMINATORS


def build(name, scale=4, channels=1, **options):
    """The generator / super-resolution network ``name`` for ``scale`` (1, 2, 4 or 8)."""
    _check_name(name)
    num_doublings(scale)
    model = _GENERATORS[name](scale=scale, channels=channels, **options)
    model(keras.Input((None, None, channels)))
    return model


def pretrained(name):
    """The Keras model of a zoo model (``sr_tf.zoo``), e.g. ``pretrained("swift_srgan_x4")``:
    its ``generator.keras`` in ``saved_models/<name>/``. ``sr_tf.zoo.ZooError`` (a
    ValueError) for an unknown name (listing the known ones) or a missing or corrupt file."""
    from sr_tf import zoo

    return zoo.load(name)


def build_discriminator(name, channels=1, **options):
    """The discriminator of a GAN model; it returns logits (N, 1) for any crop size."""
    _check_name(name)
    if name not in _DISCRIMINATORS:
        raise ValueError(f"{name!r} has no discriminator; GAN models are {', '.join(_DISCRIMINATORS)}")
    model = _DISCRIMINATORS[name](channels=channels, **options)
    model(keras.Input((None, None, channels)))
    return model


def copy(model, policy=None):
    """A new model with ``model``'s configuration and weights. ``policy`` (a Keras dtype
    policy name, e.g. "float32"): the copy computes under it instead of the model's own."""
    config = model.get_config()
    previous = keras.config.dtype_policy()
    if policy is not None:
        config = {key: value for key, value in config.items() if key != "dtype"}
        keras.config.set_dtype_policy(policy)
    try:
        duplicate = type(model).from_config(config)
        duplicate(np.zeros((1, 16, 16, getattr(model, "channels", 1)), np.float32))
    finally:
        keras.config.set_dtype_policy(previous)
    duplicate.set_weights(model.get_weights())
    return duplicate


__all__ = ["NAMES", "SCALES", "build", "build_discriminator", "copy", "is_gan", "pretrained"]
