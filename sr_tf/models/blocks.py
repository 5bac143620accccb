"""Building blocks shared by the model families, defined once.

Conventions: channels-last, "same" padding, no convolution bias in front of a batch
normalisation (the BN offset makes it redundant), per-channel PReLU initialised at 0.25
as in the published PyTorch code. Sub-layers take the ``training`` flag from the calling
model (Keras 3 propagates it), so only layers that use it declare it.
"""

import functools
import math
from typing import Callable, NamedTuple

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

SCALES = (1, 2, 4, 8)

serializable = keras.saving.register_keras_serializable(package="sr_tf")


def num_doublings(scale):
    """The number of x2 upsampling steps for ``scale`` (log2); ValueError if unsupported."""
    if isinstance(scale, bool) or scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    return int(scale).bit_length() - 1


def conv2d(filters, kernel_size, strides=1, use_bias=True, separable=False, initializer=None, **kwargs):
    """A "same"-padded convolution, plain or depthwise-separable.

    The separable form is a depthwise ``kernel_size`` convolution followed by a pointwise
    1x1 convolution with one bias after the pointwise step. The Swift-SRGAN reference also
    puts a bias on the depthwise step; that bias folds into the pointwise one, so it is
    left out here. ``initializer`` (default Glorot uniform) initialises the kernel, or
    the pointwise kernel of the separable form: the one that mixes output channels.
    """
    kind = layers.SeparableConv2D if separable else layers.Conv2D
    if initializer is not None:
        kwargs["pointwise_initializer" if separable else "kernel_initializer"] = initializer
    return kind(filters, kernel_size, strides=strides, padding="same", use_bias=use_bias, **kwargs)


@serializable
class ICNR(keras.initializers.Initializer):
    """ICNR initialisation of a convolution followed by a pixel shuffle of ``block``
    (Aitken et al., "Checkerboard artifact free sub-pixel convolution", 2017).

    The kernel of ``filters * block**2`` outputs is ``filters`` kernels drawn from
    ``initializer``, each repeated for the ``block**2`` sub-pixel positions in the
    order ``depth_to_space`` reads them, so that at initialisation the shuffle equals
    nearest-neighbour upsampling of one convolution: no checkerboard pattern to unlearn.
    """

    def __init__(self, initializer="glorot_uniform", block=2):
        self.initializer = keras.initializers.get(initializer)
        self.block = block

    def __call__(self, shape, dtype=None):
        repeats = self.block * self.block
        if shape[-1] % repeats:
            raise ValueError(f"ICNR needs a multiple of {repeats} output channels, got shape {shape}")
        base = self.initializer((*shape[:-1], shape[-1] // repeats), dtype=dtype)
        return ops.tile(base, [1] * (len(shape) - 1) + [repeats])

    def get_config(self):
        return {"initializer": keras.initializers.serialize(self.initializer), "block": self.block}


def batch_norm(fused=True, **kwargs):
    """Batch normalisation with the PyTorch defaults the reference models were trained with
    (momentum 0.1 there, i.e. 0.9 for the moving averages here; epsilon 1e-5); its
    training step runs TensorFlow's fused kernel unless ``fused=False``."""
    kind = FusedBatchNormalization if fused else layers.BatchNormalization
    return kind(momentum=0.9, epsilon=1e-5, **kwargs)


@serializable
class FusedBatchNormalization(layers.BatchNormalization):
    """``keras.layers.BatchNormalization`` whose training step is TensorFlow's fused kernel.

    Keras 3 normalises with about ten separate ops (moments, then the affine map); the
    fused kernel does the same in one pass, forward and backward: about three times as
    fast on a CPU for Swift-SRGAN's 64-channel LR features (``bench/train_step.py``). The same
    function: the output uses the batch mean and (biased) variance, and the moving
    averages are updated exactly as Keras does. Inference, masks, renormalisation and
    anything but 4-D channels-last input on the TensorFlow backend take Keras' own path.
    """

    def call(self, inputs, training=None, mask=None):
        from keras import backend

        if (not (training and self.trainable) or mask is not None or self.renorm or len(inputs.shape) != 4
                or self.axis not in (-1, 3) or backend.backend() != "tensorflow"):
            return super().call(inputs, training=training, mask=mask)
        compute = "float16" if inputs.dtype == "float16" else "float32"
        x = tf.cast(inputs, compute)
        channels = x.shape[-1]
        gamma = tf.cast(self.gamma, "float32") if self.scale else tf.ones([channels])
        beta = tf.cast(self.beta, "float32") if self.center else tf.zeros([channels])
        outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            x, gamma, beta, epsilon=self.epsilon, data_format="NHWC", is_training=True
        )
        # The kernel returns the Bessel-corrected variance for the running average; Keras
        # averages the biased one.
        count = tf.cast(tf.reduce_prod(tf.shape(x)[:3]), "float32")
        variance = variance * (count - 1.0) / tf.maximum(count, 1.0)
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
        return tf.cast(outputs, self.compute_dtype)


def prelu(fused=True, **kwargs):
    """Per-channel PReLU (one slope per feature map), initialised at 0.25; its training
    step runs the fused form (:class:`FusedPReLU`) unless ``fused=False``."""
    kind = FusedPReLU if fused else layers.PReLU
    return kind(alpha_initializer=keras.initializers.Constant(0.25), shared_axes=[1, 2], **kwargs)


@tf.autograph.experimental.do_not_convert
@tf.custom_gradient
def _prelu_with_gradient(x, slopes):
    """``x`` where positive, ``slopes * x`` elsewhere, with a hand-written gradient.

    Keras writes PReLU as ``relu(x) - slopes * relu(-x)``: five element-wise passes
    forward and about seven backward. This is three forward (minimum, multiply, add) and
    four backward (compare, select, multiply, channel sum), the same function; at zero it
    takes the negative side's slope as its subgradient. ``slopes`` broadcasts over all
    but the last axis.
    """
    negative = tf.minimum(x, tf.zeros([], x.dtype))
    outputs = x + (slopes - tf.ones([], x.dtype)) * negative

    def gradient(upstream):
        d_inputs = tf.where(x > 0, upstream, upstream * slopes)
        d_slopes = tf.reshape(tf.reduce_sum(upstream * negative, axis=list(range(x.shape.rank - 1))),
                              tf.shape(slopes))
        return d_inputs, d_slopes

    return outputs, gradient


def prelu_apply(x, slopes, training=False):
    """PReLU of ``x`` with per-channel ``slopes``: the fused form above while training on
    the TensorFlow backend, Keras' own ops otherwise, so that the exported inference graph
    keeps the pattern the TFLite converter turns into its PRELU kernel."""
    from keras import backend

    slopes = ops.cast(slopes, x.dtype)
    if training and backend.backend() == "tensorflow":
        return _prelu_with_gradient(x, slopes)
    return ops.relu(x) + (-slopes) * ops.relu(-x)  # Keras' own form, op for op


@serializable
class FusedPReLU(layers.PReLU):
    """``keras.layers.PReLU`` whose training step is :func:`prelu_apply`'s fused form:
    the same weights, the same function, fewer passes over the features."""

    def call(self, inputs, training=None):
        return prelu_apply(inputs, self.alpha, training=bool(training) and self.trainable)


def _keys_cubic(distance, a=-0.5):
    """The Keys cubic convolution kernel (a = -0.5), as in ``tf.image.resize``."""
    x = abs(distance)
    if x <= 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return 0.0


@functools.lru_cache(maxsize=None)
def _bicubic_kernel(scale, channels):
    """Conv kernel (5, 5, channels, scale^2 * channels) whose output, pixel-shuffled by
    ``scale``, is bicubic interpolation with half-pixel centres. Output channel
    ``(py * scale + px) * channels + c`` holds phase (py, px) of channel c, the layout
    ``depth_to_space`` expects."""
    taps = np.zeros((scale, 5))
    for phase in range(scale):
        position = (phase + 0.5) / scale - 0.5
        first = math.floor(position) - 1
        for k in range(first, first + 4):
            taps[phase, k + 2] = _keys_cubic(position - k)
    kernel = np.zeros((5, 5, channels, scale * scale * channels), "float32")
    for py in range(scale):
        for px in range(scale):
            for c in range(channels):
                kernel[:, :, c, (py * scale + px) * channels + c] = np.outer(taps[py], taps[px])
    return kernel


def bicubic_upsample(images, scale):
    """Bicubic interpolation by an integer ``scale``; identity for scale 1.

    Equal to ``tf.image.resize(images, (scale*H, scale*W), "bicubic")`` (half-pixel
    centres, Keys a = -0.5, taps outside the image dropped and the rest renormalised),
    built from a fixed convolution, ``depth_to_space`` and a division, so that it exports
    to TFLite builtins (the TFLite runtime has no bicubic resize) and traces with unknown
    height and width (``keras.ops.image.resize`` checks the target size with Python
    comparisons, which fail on a symbolic size inside a ``tf.function``).
    """
    if scale == 1:
        return images
    channels = images.shape[-1]
    kernel = ops.convert_to_tensor(_bicubic_kernel(scale, channels), images.dtype)
    weighted = ops.depth_to_space(ops.conv(images, kernel, padding="same"), scale)
    ones = ops.ones_like(images[..., :1])
    total = ops.depth_to_space(ops.conv(ones, kernel[:, :, :1, ::channels], padding="same"), scale)
    return weighted / total


def pad_to_multiple(images, multiple):
    """Pad height and width at the bottom and right up to a multiple of ``multiple``,
    repeating the edge pixels. Returns the padded images; crop back with
    ``padded[:, :height, :width]``. A gather, so it works for any size, even 1 pixel."""
    for axis in (1, 2):
        size = ops.shape(images)[axis]
        padded = (size + multiple - 1) // multiple * multiple
        index = ops.minimum(ops.arange(padded), size - 1)
        images = ops.take(images, index, axis=axis)
    return images


class Deployable(NamedTuple):
    """A model's inference function arranged for deployment (``SuperResolutionModel.deployable``)."""

    function: Callable  # LR (N, H, W, C) float32 -> the model's output, in inference mode
    notes: list  # what is arranged differently from the model's own call, one line each; empty: nothing


class KeptOptions:
    """Mixin of the layers and models here: the constructor's options kept as attributes
    (:meth:`keep`) and written by ``get_config``, so that a saved model is rebuilt with
    them. ``SAVED_BEFORE``: options added since models were first saved, with the value
    that older models, whose configs lack them, had; ``from_config`` fills them in."""

    SAVED_BEFORE = {}

    def keep(self, **options):
        """Set each option as an attribute of that name and keep it for ``get_config``."""
        for name, value in options.items():
            setattr(self, name, value)
        self._kept_options = (*getattr(self, "_kept_options", ()), *options)

    def get_config(self):
        return {**super().get_config(), **{name: getattr(self, name) for name in self._kept_options}}

    @classmethod
    def from_config(cls, config):
        return super().from_config({**cls.SAVED_BEFORE, **config})


@serializable
class SuperResolutionModel(KeptOptions, keras.Model):
    """Base of the image-to-image networks: LR (N, H, W, channels) in [0, 1] ->
    (N, scale*H, scale*W, channels), for any H and W.

    Inputs are not cast to the compute dtype (``autocast=False``): under
    ``mixed_float16`` the interpolated image that a model adds its prediction to stays
    float32, and every convolution casts for itself. Call the model once (the registry
    calls it on a symbolic input) to create its weights.
    """

    def __init__(self, scale=4, channels=1, **kwargs):
        super().__init__(autocast=False, **kwargs)
        num_doublings(scale)
        self.keep(scale=scale, channels=channels)

    def deployable(self):
        """The model's inference function as deployed (``sr_tf.export`` converts it to
        TFLite), with notes on what it arranges differently: the same function as
        ``model(x, training=False)`` up to float rounding, laid out for XNNPACK, LiteRT's
        default CPU delegate. Here the model's own call, with no notes; a family with
        something to rearrange overrides it (``SRResNet.deployable``)."""
        return Deployable(lambda inputs: self(inputs, training=False), [])


@serializable
class ResidualBlock(KeptOptions, layers.Layer):
    """``x + body(x)`` with body conv-[BN]-activation-conv-[BN].

    The default is the SRResNet block (Ledig et al., 2017): 3x3 convs, batch norm, PReLU.
    ``separable=True`` gives the Swift-SRGAN block; ``batch_norm=False, activation="relu"``
    the EDSR block (Lim et al., 2017).
    """

    def __init__(self, filters, kernel_size=3, separable=False, batch_norm=True, activation="prelu",
                 fused_batch_norm=True, fused_prelu=True, **kwargs):
        super().__init__(**kwargs)
        self.keep(filters=filters, kernel_size=kernel_size, separable=separable, batch_norm=batch_norm,
                  activation=activation, fused_batch_norm=fused_batch_norm, fused_prelu=fused_prelu)
        conv = dict(use_bias=not batch_norm, separable=separable)
        self.conv1 = conv2d(filters, kernel_size, name="conv1", **conv)
        self.conv2 = conv2d(filters, kernel_size, name="conv2", **conv)
        self.bn1 = _batch_norm_or_none(batch_norm, fused_batch_norm, name="bn1")
        self.bn2 = _batch_norm_or_none(batch_norm, fused_batch_norm, name="bn2")
        self.act = prelu(fused_prelu, name="prelu") if activation == "prelu" else layers.Activation(activation, name=activation)

    def call(self, inputs):
        x = self.conv1(inputs)
        if self.bn1 is not None:
            x = self.bn1(x)
        x = self.conv2(self.act(x))
        if self.bn2 is not None:
            x = self.bn2(x)
        return inputs + x


def _batch_norm_or_none(enabled, fused, name):
    return batch_norm(fused, name=name) if enabled else None


def dense_kernel(conv):
    """The (k, k, C, O) kernel of a plain or separable (depth multiplier 1) convolution,
    as a tensor of its weights (differentiable)."""
    if hasattr(conv, "depthwise_kernel"):
        depthwise = ops.convert_to_tensor(conv.depthwise_kernel)[:, :, :, 0]
        return depthwise[..., None] * ops.convert_to_tensor(conv.pointwise_kernel)[0, 0][None, None]
    return ops.convert_to_tensor(conv.kernel)


@functools.lru_cache(maxsize=None)
def _subpixel_index(size, block):
    """For ``subpixel_kernel``: which tap of the k x k kernel fills each (ty, tx,
    input phase, output phase) entry of the rearranged kernel; k*k marks a zero."""
    radius = size // 2
    reach = (radius + block - 1) // block
    phases = [(a, b) for a in range(block) for b in range(block)]
    index = np.full((2 * reach + 1, 2 * reach + 1, len(phases), len(phases)), size * size, np.int32)
    for ty in range(-reach, reach + 1):
        for tx in range(-reach, reach + 1):
            for out_index, (a, b) in enumerate(phases):
                for in_index, (a2, b2) in enumerate(phases):
                    dy, dx = block * ty + a2 - a, block * tx + b2 - b
                    if abs(dy) <= radius and abs(dx) <= radius:
                        index[ty + reach, tx + reach, in_index, out_index] = (dy + radius) * size + dx + radius
    return index


def subpixel_kernel(kernel, block=2):
    """The kernel of the "same" convolution on the grid *before* ``depth_to_space(block)``
    that equals ``kernel`` (k, k, C, O; odd k; "same", stride 1) applied *after* it.

    Input and output channels follow ``depth_to_space``'s layout (sub-pixel (a, b) of
    channel c is channel ``(a * block + b) * C + c``), so
    ``depth_to_space(conv(x, subpixel_kernel(K)))`` equals ``conv(depth_to_space(x), K)``,
    zero padding included. Shape (k', k', block^2 C, block^2 O) with
    k' = 2 * ((k // 2 + block - 1) // block) + 1: 5 for a 9x9 kernel and block 2.
    A gather of the kernel's taps, so it is differentiable and traces into any graph.
    """
    kernel = ops.convert_to_tensor(kernel)
    size, width, channels, outputs = kernel.shape
    if size % 2 == 0 or width != size:
        raise ValueError(f"expected a square kernel of odd size, got {tuple(kernel.shape[:2])}")
    index = _subpixel_index(size, block)
    taps = ops.concatenate([ops.reshape(kernel, (size * size, channels, outputs)),
                            ops.zeros((1, channels, outputs), kernel.dtype)], axis=0)
    fused = ops.take(taps, index, axis=0)  # (k', k', in phase, out phase, C, O)
    fused = ops.transpose(fused, (0, 1, 2, 4, 3, 5))
    side, phases = index.shape[0], block * block
    return ops.reshape(fused, (side, side, phases * channels, phases * outputs))


def row_factored_conv(inputs, kernel):
    """A "same", stride-1 convolution with ``kernel`` (k, k, C, O) as two convolutions:
    a 1 x k one from C to k*O channels (each kernel row's contribution for every output:
    one matrix product with a k-times wider output, which CPU kernels run far nearer
    their peak than one with a handful of outputs), then a fixed k x 1 one that shifts
    each row's part into place and sums them. The same sums in another order: for
    Swift-SRGAN's rearranged tail, 1.6x as fast as the direct 5x5 convolution forward and
    backward in TensorFlow on a CPU, and a quarter faster in TFLite."""
    kernel = ops.convert_to_tensor(kernel)
    size, _, channels, outputs = kernel.shape
    rows = ops.reshape(ops.transpose(kernel, (1, 2, 0, 3)), (1, size, channels, size * outputs))
    gather = np.zeros((size, 1, size * outputs, outputs), "float32")
    for row in range(size):
        gather[row, 0, row * outputs:(row + 1) * outputs] = np.eye(outputs, dtype="float32")
    gather = ops.convert_to_tensor(gather, rows.dtype)
    return ops.conv(ops.conv(inputs, ops.cast(rows, inputs.dtype), padding="same"),
                    ops.cast(gather, inputs.dtype), padding="same")


# Largest depthwise kernel (taps) on XNNPACK's fast path: it runs depthwise kernels of up
# to 25 taps on a fast path and, on some CPUs, larger ones on a path about 30 times
# slower per tap, slower even than TFLite's own kernel (docs/BENCHMARKS.md measures it).
XNNPACK_FAST_TAPS = 25


def has_large_depthwise(conv):
    """True for a separable convolution whose depthwise kernel has more than
    ``XNNPACK_FAST_TAPS`` taps and that ``deployed_conv`` can split (stride 1, no
    dilation, "same", channels-last)."""
    return (isinstance(conv, layers.SeparableConv2D)
            and conv.kernel_size[0] * conv.kernel_size[1] > XNNPACK_FAST_TAPS
            and tuple(conv.strides) == (1, 1) and tuple(conv.dilation_rate) == (1, 1)
            and conv.padding == "same" and conv.data_format == "channels_last")


def split_depthwise(inputs, kernel, rows):
    """A "same", stride-1 depthwise convolution as a sum of convolutions over bands of at
    most ``rows`` kernel rows, each on the zero-padded input shifted by its first row.
    Slices have constant bounds, so no shape arithmetic enters the graph."""
    height, width = kernel.shape[:2]
    top, left = (height - 1) // 2, (width - 1) // 2
    padded = tf.pad(inputs, [[0, 0], [top, height - 1 - top], [left, width - 1 - left], [0, 0]])
    total = None
    for first in range(0, height, rows):
        last = min(height, first + rows)
        band = padded[:, first:(last - height) or None]
        part = tf.nn.depthwise_conv2d(band, kernel[first:last], [1, 1, 1, 1], "VALID")
        total = part if total is None else total + part
    return total


def deployed_conv(conv, inputs):
    """``conv(inputs)`` in its deployed form: a convolution with ``has_large_depthwise``
    runs its depthwise step in bands of kernel rows of at most ``XNNPACK_FAST_TAPS`` taps
    (``split_depthwise``) whose outputs are summed, the same function on XNNPACK's fast
    path; any other layer runs as it is."""
    if not has_large_depthwise(conv):
        return conv(inputs)
    dtype = conv.compute_dtype
    rows = max(1, XNNPACK_FAST_TAPS // conv.kernel_size[1])
    inputs = tf.cast(inputs, dtype)
    depthwise = split_depthwise(inputs, tf.cast(conv.depthwise_kernel, dtype), rows)
    outputs = tf.nn.conv2d(depthwise, tf.cast(conv.pointwise_kernel, dtype), 1, "VALID")
    if conv.use_bias:
        outputs = outputs + tf.cast(conv.bias, dtype)
    return conv.activation(outputs)


@serializable
class UpsampleBlock(layers.Layer):
    """x2 sub-pixel upsampling (Shi et al., 2016): conv to 4x the channels, pixel shuffle
    (``keras.ops.depth_to_space``), per-channel PReLU."""

    def __init__(self, filters, separable=False, icnr=False, fused_prelu=True, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.separable = separable
        self.icnr = icnr
        self.fused_prelu = fused_prelu
        self.conv = conv2d(filters * 4, 3, separable=separable, initializer=ICNR() if icnr else None, name="conv")
        self.act = prelu(fused_prelu, name="prelu")

    def call(self, inputs, training=None):
        return self.act(ops.depth_to_space(self.conv(inputs), 2), training=training)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "separable": self.separable, "icnr": self.icnr,
                "fused_prelu": self.fused_prelu}


def _clip_unit(values, training):
    """Clip to [0, 1]; straight-through while training (forward clipped, gradient of the
    identity), so that pixels predicted out of range still learn."""
    clipped = ops.clip(values, 0.0, 1.0)
    if training:
        return values + ops.stop_gradient(clipped - values)
    return clipped


@serializable
class UnitRange(layers.Layer):
    """The output head that brings a prediction into [0, 1].

    ``mode="tanh"``: ``(tanh(x) + 1) / 2``, the Swift-SRGAN output, smooth and bounded.
    ``mode="clip"``: a clip to [0, 1]; during training the clip is straight-through
    (forward clipped, gradient of the identity), so pixels predicted out of range still
    learn, and at inference it is an exact clip.

    Models create it with ``dtype="float32"`` so that the output is float32 under a
    ``mixed_float16`` policy.
    """

    def __init__(self, mode="clip", **kwargs):
        super().__init__(**kwargs)
        if mode not in ("tanh", "clip"):
            raise ValueError(f"mode must be 'tanh' or 'clip', got {mode!r}")
        self.mode = mode

    def call(self, inputs, training=None):
        if self.mode == "tanh":
            return (ops.tanh(inputs) + 1.0) * 0.5
        return _clip_unit(inputs, training)

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


# Local standard deviation (in [0, 1] units) at which ResidualOutput passes three quarters
# of the learned correction: 0.004 is 16 HU on the default CT window [-1024, 3071] HU,
# about the quantum noise of a standard-dose CT, and well under the contrast of an edge.
DEFAULT_FLAT_STD = 0.004
# Variance ratio (v / flat_std**2) above which the gate is 1 (tanh(16)).
GATE_SATURATION = 4.0


@serializable
class ResidualOutput(layers.Layer):
    """``clip(base + gate * residual)``: the output head of the models that learn a
    correction to an interpolated image.

    ``gate`` fades the correction where the interpolated image is flat: with ``v`` the
    variance of ``base`` in a ``(2 * radius + 1)`` square window (borders renormalised)
    and ``s = min(v / flat_std**2, 4)``, ``gate = tanh(s**2)``: 0.76 at a local standard
    deviation of ``flat_std``, 0.06 at half of it, 1 from twice it, and 0 on a constant
    image. So a model returns the interpolation where there is nothing to add (a
    constant image stays that constant exactly) and cannot lay a noise floor of small
    errors over smooth background; where there is structure the correction passes, and
    the network learns its size there. The form avoids divisions by small numbers (the
    bounded ``s`` and ``tanh`` quantise to int8 without losing the zero) so the same gate
    runs in every export. ``flat_std=0`` turns the gate off. The clip to [0, 1] is
    straight-through while training. Computed in float32.
    """

    def __init__(self, flat_std=DEFAULT_FLAT_STD, radius=2, **kwargs):
        super().__init__(**kwargs)
        if flat_std < 0 or radius < 1:
            raise ValueError(f"flat_std must be >= 0 and radius >= 1, got {flat_std!r}, {radius!r}")
        self.flat_std = float(flat_std)
        self.radius = int(radius)

    def gate(self, base):
        """The factor (N, H, W, C) in [0, 1] applied to the correction."""
        size = 2 * self.radius + 1
        channels = base.shape[-1]
        rows = ops.ones((size, 1, channels, 1), base.dtype)
        cols = ops.ones((1, size, channels, 1), base.dtype)

        def box(x, count):
            return ops.depthwise_conv(ops.depthwise_conv(x, rows[..., :count, :], padding="same"),
                                      cols[..., :count, :], padding="same")

        count = box(ops.ones_like(base[..., :1]), 1)
        mean = box(base, channels) / count
        variance = ops.maximum(box(base * base, channels) / count - mean * mean, 0.0)
        ratio = ops.minimum(variance * (1.0 / self.flat_std**2), GATE_SATURATION)
        return ops.tanh(ratio * ratio)

    def call(self, base, residual, training=None):
        base = ops.cast(base, "float32")
        residual = ops.cast(residual, "float32")
        if self.flat_std > 0:
            residual = residual * self.gate(base)
        return _clip_unit(base + residual, training)

    def get_config(self):
        return {**super().get_config(), "flat_std": self.flat_std, "radius": self.radius}


def gate_radius(scale):
    """The ResidualOutput window radius (HR pixels) for ``scale``: one LR pixel each side,
    at least 2."""
    return max(2, int(scale))


@serializable
class VectorQuantizer(KeptOptions, layers.Layer):
    """Vector quantisation of the last axis against a learned codebook (van den Oord et al.,
    "Neural Discrete Representation Learning", 2017).

    Each input vector is replaced by its nearest codebook entry; the straight-through
    estimator passes the decoder's gradient to the encoder unchanged. Two losses are added
    with ``add_loss``, each a mean over the local batch:

    * codebook loss ``mean((sg[z] - e)^2)``, moving the entries towards the encodings
      (left out when ``ema=True``, where the codebook follows exponential moving averages
      of the encodings assigned to it instead);
    * commitment loss ``commitment_weight * mean((z - sg[e])^2)``, keeping the encoder
      close to its codes.

    They are scalars, not per-sample losses: under a distribution strategy a trainer
    scales them with ``tf.nn.scale_regularization_loss`` (divides by the replica count).

    With ``ema=True`` an entry that receives no vectors keeps its position: its running
    count and running sum start at 1 and at the entry itself and decay together.
    Runs in float32 (create it with ``dtype="float32"`` under mixed precision).
    """

    def __init__(
        self,
        codebook_size=512,
        embedding_dim=64,
        commitment_weight=0.25,
        ema=False,
        decay=0.99,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.keep(codebook_size=codebook_size, embedding_dim=embedding_dim, commitment_weight=commitment_weight,
                  ema=ema, decay=decay)

    def build(self, input_shape):
        if input_shape[-1] != self.embedding_dim:
            raise ValueError(f"expected {self.embedding_dim} channels to quantise, got {input_shape[-1]}")
        shape = (self.codebook_size, self.embedding_dim)
        init = keras.initializers.RandomUniform(-1.0 / self.codebook_size, 1.0 / self.codebook_size)
        self.codebook = self.add_weight(
            shape=shape,
            initializer=init,
            trainable=not self.ema,
            aggregation="mean" if self.ema else "none",
            name="codebook",
        )
        if self.ema:
            self.ema_count = self.add_weight(
                shape=(self.codebook_size,), initializer="ones", trainable=False, aggregation="mean", name="ema_count"
            )
            self.ema_sum = self.add_weight(shape=shape, initializer="zeros", trainable=False, aggregation="mean", name="ema_sum")
            self.ema_sum.assign(self.codebook)

    def call(self, inputs, training=None):
        flat = ops.reshape(inputs, (-1, self.embedding_dim))
        distances = (
            ops.sum(flat**2, axis=1, keepdims=True)
            - 2.0 * ops.matmul(flat, ops.transpose(self.codebook))
            + ops.sum(self.codebook**2, axis=1)
        )
        # tf.argmin, not keras.ops.argmin: the latter adds a sign-bit test (bitwise ops)
        # that the TFLite runtime lacks.
        codes = ops.one_hot(tf.argmin(distances, axis=1), self.codebook_size, dtype=flat.dtype)
        if training and self.ema:
            self._update_codebook(codes, flat)
        quantized = ops.reshape(ops.matmul(codes, self.codebook), ops.shape(inputs))

        commitment = ops.mean((inputs - ops.stop_gradient(quantized)) ** 2)
        self.add_loss(self.commitment_weight * commitment)
        if not self.ema:
            self.add_loss(ops.mean((ops.stop_gradient(inputs) - quantized) ** 2))
        return inputs + ops.stop_gradient(quantized - inputs)

    def _update_codebook(self, codes, flat):
        self.ema_count.assign(self.decay * self.ema_count + (1.0 - self.decay) * ops.sum(codes, axis=0))
        self.ema_sum.assign(self.decay * self.ema_sum + (1.0 - self.decay) * ops.matmul(ops.transpose(codes), flat))
        # Read back: under a distribution strategy the assignments above average the
        # replicas' statistics, so every replica derives the same codebook from them.
        count, total = ops.convert_to_tensor(self.ema_count), ops.convert_to_tensor(self.ema_sum)
        used = count[:, None] > 1e-12
        self.codebook.assign(ops.where(used, total / ops.maximum(count, 1e-12)[:, None], self.codebook))
