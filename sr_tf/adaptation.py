"""Per-scan self-supervised adaptation: fine-tune a copy of a model on the input itself.

A site's scanner, noise and anatomy differ from the training data, and no
high-resolution reference of the scan exists. The scan still holds its own training
pairs: degraded once more with the model's degradation, a crop of the input is an input
whose target is the crop itself (the double degradation of the ``self_supervised``
preset; Shocher et al., "Zero-Shot Super-Resolution using Deep Internal Learning",
CVPR 2018). :func:`adapt` fine-tunes a copy of the model on such pairs for a bounded
number of steps and seconds and returns it; the model passed in is never changed.

    adapted, report = adapt(model, lr_slices, degradation="bicubic", steps=100, seed=0)

The crops, their flips and rotations and the degradation's random draws come from
``seed``, so the same input, model and seed give the same adapted weights. Batch
normalisation keeps its trained statistics (the copy runs in inference mode while it
learns), since a few crops of one scan are no estimate of the population's. The copy
returned has the exponential moving average of the weights over the steps (``average``,
started at the trained weights), not the last step's: a few hundred steps on one scan's
crops leave the last weights noisy, and the average both smooths that noise and keeps
the copy near the model it started from (at the default decay, about half of the
trained weights remain after the default steps).
"""

import dataclasses
import numbers
import time

import numpy as np

# Defaults chosen on the two development images large enough to adapt to at x2 (the
# 484 x 484 MR and the 512 x 512 CT), PSNR change of residual_cnn_x2 on the MR / the CT,
# within 60 s. 300 steps at 3e-5, average 0.99 (the former default): +0.36 / +0.14 dB;
# the same with an L2 loss +0.40 / -0.00; 1e-4 in a cosine decay, L2 +0.28 / +0.02; the
# last two layers alone at 1e-4 +0.29 / -0.25; 128 px crops, batch 4 +0.37 / +0.10;
# bfloat16, 600 steps +0.22 / +0.07; 1e-4, average 0.995 (about 350 steps in the 60 s)
# +0.28 / +0.30 (seed 1 +0.26 / +0.26), with a quarter of each batch from the sample set
# +0.27 / +0.33; 300 steps at 1e-4, average 0.998 +0.28 / +0.46 (seed 1 +0.30 / +0.45;
# 2e-4 +0.28 / +0.48; average 0.999 +0.20 / +0.33). swift_srgan_x2 (about 240 steps in the
# 60 s) at 1e-4 and 3e-5 with 0.998: +0.13 / +0.18 and +0.16 / +0.14 (former default:
# +0.04 on average). A decay this close to 1 keeps about half of the trained weights in
# the copy after 300 steps (0.998^300 = 0.55): the copy lies between the trained and the
# fine-tuned weights, which measured best (as weight interpolation does in robust
# fine-tuning: Wortsman et al., CVPR 2022). docs/RESULTS.md has the defaults' figures.
DEFAULT_STEPS = 300  # what bench.zoo measures; upscale.py and evaluate.py adapt only when asked
DEFAULT_PATCH = 96  # target crop size in input pixels (rounded down to a multiple of the scale)
DEFAULT_BATCH = 8
DEFAULT_LEARNING_RATE = 1e-4
DEFAULT_AVERAGE = 0.998  # decay of the weights' moving average; 0: the last step's weights
DEFAULT_SECONDS = 60.0
# The smallest side of the pairs' inputs (the input's side over the scale: the input
# degraded once more) adapted to. On the development set every adaptation whose pairs'
# inputs were 32 px or less cost PSNR (a 64 x 64 MR at x2: up to several dB; the
# 484 and 512 px images at x4, pairs' inputs of 30 and 32 px: -0.05 to -2.2 dB over the
# four models and settings tried), while those of 121 and 128 px at x2 ranged from
# -0.37 to +0.42 dB, +0.09 on average over the eight (model, settings) pairs tried. So
# an input is adapted to only when it is at least MIN_PAIR_SIDE * scale pixels on its
# smaller side: 128 at x2, 256 at x4. 64 lies between the sizes measured; nothing in
# between was measured. Those figures are of the former defaults; with the present ones
# the two images at x4 (MR / CT) measured -0.11 / +0.64 dB (residual_cnn_x4), -0.28 /
# -0.06 (srgan_x4) and -0.21 / -0.08 (swift_srgan_x4): still a loss on the whole, so the
# rule stands.
MIN_PAIR_SIDE = 64
MAX_SLICES = 32  # a longer volume adapts to this many of its slices, evenly spaced
# Presets that degrade by downsampling, and the one each adapts with. ``self_supervised``
# models learned one bicubic step, which is what their pairs are made with here.
_PAIR_PRESET = {"bicubic": "bicubic", "blur_downsample": "blur_downsample", "noisy": "noisy",
                "self_supervised": "bicubic"}


class AdaptationError(ValueError):
    """Adaptation cannot run for this model or input; says why."""


@dataclasses.dataclass
class AdaptationReport:
    """What :func:`adapt` did: steps run, seconds, the training loss on the first and
    last steps (of the weights being trained; the copy returned has their average)."""

    steps: int
    seconds: float
    seed: int
    first_loss: float
    last_loss: float
    degradation: str
    patch: int
    stopped_by: str  # "steps" or "seconds"
    average: float = 0.0  # the weights' moving-average decay (0: the last step's weights)

    def describe(self):
        """One line for a DerivationDescription or a report."""
        averaged = f", weights averaged at {self.average:g}" if self.average else ""
        return (f"adapted to this input: {self.steps} self-supervised steps ({self.seconds:.0f} s, "
                f"{self.degradation} pairs, seed {self.seed}{averaged})")


def check(steps, seconds=None, average=DEFAULT_AVERAGE):
    """ValueError unless ``steps`` >= 0, ``seconds`` (when given) > 0 and 0 <= ``average`` < 1."""
    if isinstance(steps, bool) or int(steps) != steps or steps < 0:
        raise ValueError(f"adapt_steps must be a whole number >= 0, got {steps!r}")
    if seconds is not None and not seconds > 0:
        raise ValueError(f"adapt_seconds must be > 0, got {seconds!r}")
    if isinstance(average, bool) or not isinstance(average, numbers.Real) or not 0.0 <= average < 1.0:
        raise ValueError(f"the adaptation's weight average must be in [0, 1), got {average!r}")


def min_side(scale):
    """The smallest input side adapted to at ``scale`` (see ``MIN_PAIR_SIDE``)."""
    return MIN_PAIR_SIDE * int(scale)


def _crop_weights(slices, patch):
    """Per slice, the probability of each crop origin: proportional to the crop's mean
    gradient magnitude (Shocher et al. sample crops by their gradients, so that the steps
    go where there is structure to learn, not to flat background), mixed with 10 %
    uniform so that no region is never seen."""
    weights = []
    for image in slices:
        gy, gx = np.gradient(image.astype(np.float64))
        energy = np.hypot(gy, gx)
        table = np.pad(energy.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        sums = table[patch:, patch:] - table[:-patch, patch:] - table[patch:, :-patch] + table[:-patch, :-patch]
        total = sums.sum()
        flat = np.full(sums.size, 1.0 / sums.size)
        weights.append(flat if total <= 0 else 0.9 * sums.ravel() / total + 0.1 * flat)
    return weights


def _crops(slices, patch, batch, rng, weights):
    """``batch`` random crops of ``patch`` pixels from random slices (origins drawn with
    ``weights``, :func:`_crop_weights`), each flipped and rotated at random (the eight
    symmetries of the square)."""
    out = np.empty((batch, patch, patch, 1), np.float32)
    for i in range(batch):
        k = rng.integers(len(slices))
        image = slices[k]
        origin = rng.choice(weights[k].size, p=weights[k])
        y, x = divmod(int(origin), image.shape[1] - patch + 1)
        crop = image[y:y + patch, x:x + patch]
        crop = np.rot90(crop, int(rng.integers(4)))
        if rng.integers(2):
            crop = crop[:, ::-1]
        out[i, ..., 0] = crop
    return out


def adapt(model, slices, degradation="bicubic", steps=DEFAULT_STEPS, seconds=DEFAULT_SECONDS, seed=0, patch=DEFAULT_PATCH,
          batch=DEFAULT_BATCH, learning_rate=DEFAULT_LEARNING_RATE, average=DEFAULT_AVERAGE):
    """``(adapted copy of model, AdaptationReport)`` after at most ``steps`` steps and
    ``seconds`` seconds of L1 fine-tuning on pairs made from ``slices``; the copy has the
    moving average of the weights with decay ``average`` (0: the last step's weights).

    ``model``: a Keras super-resolution model (``scale`` attribute). ``slices``: the LR
    input, (H, W) or (S, H, W) float32 in [0, 1]. Each step trains on ``batch`` crops of
    ``patch`` pixels (at most the smaller side, rounded down to a multiple of the scale)
    degraded by ``degradation`` to their inputs. Raises :class:`AdaptationError` for a
    model that is not a Keras super-resolution model, a restoration model (scale 1: its
    input is already degraded at full size, so there is no coarser level to learn from),
    an unknown degradation or an input too small to crop.
    """
    import keras
    import tensorflow as tf

    from sr_tf import models
    from sr_tf.data import degrade

    check(steps, seconds, average)
    scale = getattr(model, "scale", None)
    if not isinstance(model, keras.Model) or scale is None:
        raise AdaptationError("adaptation needs a Keras model (.keras, a run folder or a zoo name), "
                              f"not {type(model).__name__}")
    if int(scale) == 1:
        raise AdaptationError("adaptation needs a super-resolution model (scale > 1): a restoration model's "
                              "input has no coarser level to learn from")
    if degradation not in _PAIR_PRESET:
        raise AdaptationError(f"adaptation makes pairs by degrading the input again; degradation {degradation!r} "
                              f"is not one of {tuple(_PAIR_PRESET)}")
    preset = _PAIR_PRESET[degradation]
    slices = np.asarray(slices, np.float32)
    if slices.ndim == 2:
        slices = slices[np.newaxis]
    if len(slices) > MAX_SLICES:  # evenly spaced through a long volume: bounded memory and set-up
        slices = slices[np.linspace(0, len(slices) - 1, MAX_SLICES).round().astype(int)]
    side = min(slices.shape[1:3])
    size = min(int(patch), side) // scale * scale
    if side < min_side(scale) or size < 2 * scale:
        raise AdaptationError(f"the input ({slices.shape[1]} x {slices.shape[2]}) is too small to adapt to at "
                              f"x{scale} (at least {min_side(scale)} x {min_side(scale)} pixels, so that its "
                              f"pairs' inputs are {MIN_PAIR_SIDE} px)")
    started = time.perf_counter()  # ``seconds`` bounds the whole adaptation: the copy and set-up too
    adapted = models.copy(model)
    if steps == 0:
        return adapted, AdaptationReport(0, time.perf_counter() - started, int(seed), float("nan"), float("nan"),
                                         preset, size, "steps", 0.0)
    optimizer = keras.optimizers.Adam(learning_rate)
    variables = adapted.trainable_variables
    optimizer.build(variables)
    means = [tf.Variable(v, trainable=False) for v in variables] if average else []
    decay = tf.constant(float(average), tf.float32)

    @tf.function(reduce_retracing=True)
    def train_step(targets, step_seed):
        inputs, targets = degrade.apply(preset, targets, scale, step_seed)
        with tf.GradientTape() as tape:
            outputs = tf.cast(adapted(inputs, training=False), tf.float32)
            loss = tf.reduce_mean(tf.abs(outputs - targets))
        optimizer.apply(tape.gradient(loss, variables), variables)
        for mean, variable in zip(means, variables):
            mean.assign(decay * mean + (1.0 - decay) * tf.cast(variable, mean.dtype))
        return loss

    rng = np.random.default_rng(seed)
    weights = _crop_weights(slices, size)
    losses = []
    stopped_by = "steps"
    for step in range(int(steps)):
        targets = _crops(slices, size, int(batch), rng, weights)
        losses.append(float(train_step(tf.constant(targets), tf.constant([int(seed), step], tf.int32))))
        if seconds is not None and time.perf_counter() - started >= seconds and step + 1 < steps:
            stopped_by = "seconds"
            break
    for mean, variable in zip(means, variables):
        variable.assign(mean)
    report = AdaptationReport(len(losses), time.perf_counter() - started, int(seed), losses[0], losses[-1], preset,
                              size, stopped_by, float(average))
    return adapted, report
