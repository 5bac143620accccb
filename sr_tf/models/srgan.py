"""SRGAN (Ledig et al., "Photo-Realistic Single Image Super-Resolution Using a Generative
Adversarial Network", CVPR 2017): the SRResNet generator and its discriminator.

Swift-SRGAN (``swift_srgan.py``) is the same network with depthwise-separable
convolutions; both classes here take that switch from a class attribute.
"""

import keras
from keras import layers, ops

from sr_tf.models.blocks import (
    DEFAULT_FLAT_STD,
    XNNPACK_FAST_TAPS,
    Deployable,
    ResidualBlock,
    ResidualOutput,
    SuperResolutionModel,
    UnitRange,
    UpsampleBlock,
    batch_norm,
    row_factored_conv,
    subpixel_kernel,
    bicubic_upsample,
    conv2d,
    dense_kernel,
    deployed_conv,
    gate_radius,
    has_large_depthwise,
    num_doublings,
    prelu,
    prelu_apply,
    serializable,
)


@serializable
class SRResNet(SuperResolutionModel):
    """SRResNet generator: LR (N, H, W, C) in [0, 1] -> (N, scale*H, scale*W, C).

    9x9 head conv + PReLU, ``num_blocks`` residual blocks (conv-BN-PReLU-conv-BN), conv-BN
    with a skip from the head, log2(scale) x2 sub-pixel upsampling blocks (none for
    scale 1: restoration at the same size), 9x9 tail conv. Two output forms, with the
    same weights (the same parameter count):

    * ``residual=True`` (the default): global residual learning, ``bicubic(x) + tail``
      through :class:`ResidualOutput` (the correction faded where the image is flat,
      clipped to [0, 1]), with the tail's output kernel initialised at zero and the
      sub-pixel convolutions ICNR-initialised, so that an untrained model outputs
      bicubic interpolation and training starts from it;
    * ``residual=False``: the published form, ``(tanh(tail) + 1) / 2`` (Swift-SRGAN's
      head), trained from random initialisation.

    The output is float32. Three options change how, not what, the network computes:

    * ``tail_before_shuffle`` (default): the last PReLU and the 9x9 tail run on the grid
      before the last pixel shuffle (``rearranged_tail``), so no 64-channel tensor is
      made at the output resolution;
    * ``fused_batch_norm`` (default): batch normalisation trains with TensorFlow's fused
      kernel (``FusedBatchNormalization``);
    * ``fused_prelu`` (default): PReLU trains with a hand-written gradient in fewer
      element-wise passes (``FusedPReLU``).

    All are the same function up to float rounding; what they save in the CPU training
    step is measured by ``bench/train_step.py`` (docs/BENCHMARKS.md).
    """

    separable = False
    # Models saved before the residual form existed are of the published form.
    SAVED_BEFORE = {"residual": False}

    def __init__(self, scale=4, channels=1, filters=64, num_blocks=16, residual=True, flat_std=DEFAULT_FLAT_STD,
                 tail_before_shuffle=True, fused_batch_norm=True, fused_prelu=True, **kwargs):
        super().__init__(scale=scale, channels=channels, **kwargs)
        self.keep(filters=filters, num_blocks=num_blocks, residual=bool(residual), flat_std=flat_std,
                  tail_before_shuffle=bool(tail_before_shuffle), fused_batch_norm=bool(fused_batch_norm),
                  fused_prelu=bool(fused_prelu))
        sep = self.separable
        self.head = conv2d(filters, 9, separable=sep, name="head")
        self.head_act = prelu(self.fused_prelu, name="head_prelu")
        self.body = [
            ResidualBlock(filters, separable=sep, fused_batch_norm=fused_batch_norm, fused_prelu=self.fused_prelu,
                          name=f"block_{i}")
            for i in range(num_blocks)
        ]
        self.body_conv = conv2d(filters, 3, use_bias=False, separable=sep, name="body_conv")
        self.body_bn = batch_norm(fused_batch_norm, name="body_bn")
        self.upsample = [
            UpsampleBlock(filters, separable=sep, icnr=self.residual, fused_prelu=self.fused_prelu, name=f"upsample_{i}")
            for i in range(num_doublings(scale))
        ]
        self.tail = conv2d(channels, 9, separable=sep, initializer="zeros" if self.residual else None, name="tail")
        if self.residual:
            self.to_output = ResidualOutput(flat_std, gate_radius(scale), dtype="float32", name="output")
        else:
            self.to_output = UnitRange("tanh", dtype="float32", name="output")
        if self.upsample and self.tail_before_shuffle:
            # rearranged_tail uses the last block's layers and the tail without calling
            # the block or the tail: build them here.
            features = (None, None, None, filters)
            last = self.upsample[-1]
            last.conv.build(features)
            last.act.build(features)
            last.built = True
            self.tail.build(features)

    def call(self, inputs, training=None):
        return self._forward(inputs, training, self.tail_before_shuffle, deployed=False)

    def deployable(self, tail_before_shuffle=True):
        """The inference function as deployed, and notes on what it rearranges (see
        ``SuperResolutionModel.deployable``):

        * with upsampling, the last PReLU and the 9x9 tail run before the final pixel
          shuffle (``rearranged_tail``) whatever the model's ``tail_before_shuffle``, so
          that a model saved with the tail after it deploys in the fast form too;
          ``tail_before_shuffle=False`` keeps the tail after it (``bench.inference``
          measures what the rearrangement gains);
        * the 9x9 convolutions that run as layers (the head; the tail when it is not
          rearranged) split their depthwise kernels into row bands when separable
          (``deployed_conv``: Swift-SRGAN). The other convolutions are 3x3.
        """
        rearranged = bool(self.upsample) and tail_before_shuffle
        notes = []
        if rearranged:
            form = "the model's own form" if self.tail_before_shuffle else "rearranged here"
            notes.append("last PReLU and 9x9 tail run before the final pixel shuffle, the tail as a 1x5 and a 5x1 "
                         f"convolution (same function; {form})")
        banded = [conv for conv in (self.head, *(() if rearranged else (self.tail,))) if has_large_depthwise(conv)]
        if banded:
            notes.append(f"{len(banded)} depthwise convolution(s) of more than {XNNPACK_FAST_TAPS} taps split into "
                         "bands of kernel rows (XNNPACK fast path; same function)")
        return Deployable(lambda inputs: self._forward(inputs, False, rearranged, deployed=True), notes)

    def _forward(self, inputs, training, tail_before_shuffle, deployed):
        """The output with the tail before or after the last pixel shuffle; ``deployed``:
        the 9x9 layers in their deployed form (``deployed_conv``)."""
        x = self.trunk(inputs, deployed)
        if not self.upsample:
            return self.finish(inputs, _conv(self.tail, x, deployed))
        if tail_before_shuffle:
            return self.finish(inputs, self.rearranged_tail(x, training=training))
        return self.finish(inputs, _conv(self.tail, self.upsample[-1](x), deployed))

    def rearranged_tail(self, x, training=False):
        """``tail(upsample[-1](x))`` computed on the grid before the last pixel shuffle.

        The last block is ``PReLU(depth_to_space(conv(x)))``. A per-channel PReLU commutes
        with the shuffle (its slopes repeated for the four sub-pixels), and the 9x9 tail
        after the shuffle is a 5x5 convolution before it (``subpixel_kernel``), computed
        as a 1x5 then a 5x1 convolution (``row_factored_conv``); only the final
        ``channels``-channel image is shuffled. On 64 features at the output resolution
        the tail is the costliest layer of the network on a CPU; this form is the same
        function in about a quarter of its time, in training and in TFLite alike.
        """
        last = self.upsample[-1]
        u = last.conv(x)
        slopes = ops.tile(ops.reshape(ops.convert_to_tensor(last.act.alpha), (1, 1, -1)), (1, 1, 4))
        u = prelu_apply(u, slopes, training=bool(training) and self.fused_prelu and last.act.trainable)
        kernel = subpixel_kernel(dense_kernel(self.tail))
        out = row_factored_conv(u, kernel)
        if self.tail.use_bias:
            out = out + ops.cast(ops.tile(ops.convert_to_tensor(self.tail.bias), (4,)), out.dtype)
        return ops.depth_to_space(out, 2)

    def finish(self, inputs, prediction):
        """The model's output from its LR ``inputs`` and the tail's ``prediction`` (at the
        output size): the residual form adds it to bicubic interpolation of the inputs,
        the published form maps it through tanh."""
        if self.residual:
            return self.to_output(bicubic_upsample(inputs, self.scale), prediction)
        return self.to_output(prediction)

    def trunk(self, inputs, deployed=False):
        """Everything before the last upsampling block: head, residual body with its
        skip, and all but the last x2 step (``rearranged_tail`` takes it from there);
        ``deployed``: the head in its deployed form (``deployed_conv``)."""
        skip = self.head_act(_conv(self.head, inputs, deployed))
        x = skip
        for block in self.body:
            x = block(x)
        x = skip + self.body_bn(self.body_conv(x))
        for block in self.upsample[:-1]:
            x = block(x)
        return x


def _conv(layer, inputs, deployed):
    """``layer(inputs)``, or with ``deployed`` its deployed form (``deployed_conv``)."""
    return deployed_conv(layer, inputs) if deployed else layer(inputs)


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

    def __init__(self, channels=1, filters=64, dense_units=1024, fused_batch_norm=True, **kwargs):
        super().__init__(**kwargs)
        self.channels = channels
        self.filters = filters
        self.dense_units = dense_units
        self.fused_batch_norm = bool(fused_batch_norm)
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
                features.append(batch_norm(fused_batch_norm, name=f"bn_{i}"))
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
            "fused_batch_norm": self.fused_batch_norm,
        }
