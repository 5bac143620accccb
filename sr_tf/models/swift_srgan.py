"""Swift-SRGAN (Krishnan & Koushik, "Swift-SRGAN: Rethinking Super-Resolution for
Efficient and Real-time Inference", 2022): SRGAN with every convolution
depthwise-separable, about 1/8 of SRResNet's parameters.

Parameter counts against the published PyTorch code (64 filters, 16 blocks, trainable
weights, which is what PyTorch's ``parameters()`` counts): x4 199,506 here vs 200,787
with 1 channel, 199,926 vs 201,209 with 3, x2 182,226 vs 183,443 (0.6-0.7% fewer).
The difference is the reference's 17 PReLUs (1,088 slopes) that are created but unused
in its conv blocks without activation, and the depthwise biases that fold into the
pointwise ones (see ``blocks.conv2d``). The reference repeats its x2 upsampling block
``scale // 2`` times (4 blocks, x16, for "x8"); here it is log2(scale).
"""

from sr_tf.models.blocks import serializable
from sr_tf.models.srgan import SRGANDiscriminator, SRResNet


@serializable
class SwiftSRResNet(SRResNet):
    """Swift-SRGAN generator: the SRResNet layout with depthwise-separable convolutions."""

    separable = True


@serializable
class SwiftSRGANDiscriminator(SRGANDiscriminator):
    """Swift-SRGAN discriminator: the SRGAN discriminator with depthwise-separable
    convolutions, global average pooling before the dense head."""

    separable = True
