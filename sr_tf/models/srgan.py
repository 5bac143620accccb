"""SRGAN (Ledig et al., "Photo-Realistic Single Image Super-Resolution Using a Generative
Adversarial Network", CVPR 2017): the SRResNet generator and its discriminator.

Swift-SRGAN (``swift_srgan.py``) is the same network with depthwise-separable
convolutions; both classes here take that switch from a class attribute.
"""

import keras
from keras import layers

from sr_tf.models.blocks import (
    ResidualBlock,
    SuperResolutionModel,
    UnitRange,
    UpsampleBlock,
    batch_norm,
    conv2d,
    num_doublings,
    prelu,
    serializable,
)


@serializable
class SRResNet(SuperResolutionModel):
    """SRResNet generator: LR (N, H, W, C) in [0, 1] -> (N, scale*H, scale*W, C).

    9x9 head conv + PReLU, ``num_blocks`` residual blocks (conv-BN-PReLU-conv-BN), conv-BN
    with a skip from the head, log2(scale) x2 sub-pixel upsampling blocks (none for
    scale 1: restoration at the same size), 9x9 tail conv. The output is
    ``(tanh(x) + 1) / 2`` (Swift-SRGAN's head), computed in float32.
    """

    separable = False

    def __init__(self, scale=4, channels=1, filters=64, num_blocks=16, **kwargs):
        super().__init__(scale=scale, channels=channels, **kwargs)
        self.filters = filters
        self.num_blocks = num_blocks
        sep = self.separable
        self.head = conv2d(filters, 9, separable=sep, name="head")
        self.head_act = prelu(name="head_prelu")
        self.body = [ResidualBlock(filters, separable=sep, name=f"block_{i}") for i in range(num_blocks)]
        self.body_conv = conv2d(filters, 3, use_bias=False, separable=sep, name="body_conv")
        self.body_bn = batch_norm(name="body_bn")
        self.upsample = [UpsampleBlock(filters, separable=sep, name=f"upsample_{i}") for i in range(num_doublings(scale))]
        self.tail = conv2d(channels, 9, separable=sep, name="tail")
        self.to_output = UnitRange("tanh", dtype="float32", name="output")

    def call(self, inputs):
        x = self.trunk(inputs)
        if self.upsample:
            x = self.upsample[-1](x)
        return self.to_output(self.tail(x))

    def trunk(self, inputs):
        """Everything before the last upsampling block: head, residual body with its
        skip, and all but the last x2 step (``sr_tf.export`` rearranges the last step
        and the tail for TFLite)."""
        skip = self.head_act(self.head(inputs))
        x = skip
        for block in self.body:
            x = block(x)
        x = skip + self.body_bn(self.body_conv(x))
        for block in self.upsample[:-1]:
            x = block(x)
        return x

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "num_blocks": self.num_blocks}


@serializable
class SRGANDiscriminator(keras.Model):
    """SRGAN discriminator: images (N, H, W, C) in [0, 1] -> logits (N, 1).

    Eight 3x3 conv blocks, ``filters`` doubling every second block up to 8x, stride 2 on
    every second block, batch norm on all but the first, LeakyReLU 0.2; then a dense
    ``dense_units`` head with LeakyReLU and a dense logit. Global average pooling replaces
    the published fixed-size flatten (96x96 crops in SRGAN, a 6x6 adaptive pool in
    Swift-SRGAN), so any crop size works. Inputs are mapped to [-1, 1] inside.
    """

    separable = False

    def __init__(self, channels=1, filters=64, dense_units=1024, **kwargs):
        super().__init__(**kwargs)
        self.channels = channels
        self.filters = filters
        self.dense_units = dense_units
        features = [layers.Rescaling(2.0, offset=-1.0, name="to_signed")]
        for i in range(8):
            first = i == 0
            features.append(
                conv2d(
                    filters * 2 ** (i // 2),
                    3,
                    strides=1 + i % 2,
                    use_bias=first,
                    separable=self.separable,
                    name=f"conv_{i}",
                )
            )
            if not first:
                features.append(batch_norm(name=f"bn_{i}"))
            features.append(layers.LeakyReLU(0.2, name=f"lrelu_{i}"))
        features.append(layers.GlobalAveragePooling2D(name="pool"))
        self.features = features
        self.dense = layers.Dense(dense_units, name="dense")
        self.dense_act = layers.LeakyReLU(0.2, name="dense_lrelu")
        self.logit = layers.Dense(1, dtype="float32", name="logit")

    def call(self, inputs):
        x = inputs
        for layer in self.features:
            x = layer(x)
        return self.logit(self.dense_act(self.dense(x)))

    def get_config(self):
        return {
            **super().get_config(),
            "channels": self.channels,
            "filters": self.filters,
            "dense_units": self.dense_units,
        }
