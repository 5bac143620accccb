"""Data-consistency projection: make a model's output agree with its own input.

    sr = consistency.project(lr, model(lr), scale=4, degradation="bicubic")

A super-resolved image ``sr`` is consistent with its input ``lr`` when degrading it
again gives ``lr`` back: ``degrade.downsample(sr, scale, degrade.consistency_kernel(...))
== lr``, the check that evaluation and the app report as "consistency". A model may add
detail that fails it (structure the input does not hold); iterative back-projection
(Irani and Peleg 1991) removes that part and keeps the rest::

    repeat: sr = clip(sr + step * U(lr - A(sr)), 0, 1)

with ``A`` the degradation's own deterministic operator (the same op the consistency
metric applies) and ``U`` its adjoint, scaled so that a constant residual is corrected
in one step of 1. This is gradient descent on ``|lr - A(sr)|^2`` started at the model's
output, so it converges to the consistent image nearest to that output (the orthogonal
projection onto ``A(sr) = lr``): what the input determines comes from the input, what it
does not determine from the model. Each step is clipped to [0, 1] (projection onto
convex sets: the consistent images and the valid range, whose intersection holds the
true image), so that the clip does not undo the agreement, as one clip at the end of
the iteration does on an output far from its input.

Being orthogonal, the projection removes the part of the model's error that the input
can see (the true image is consistent too, so the error left is the rest, by Pythagoras;
exactly so without the clipping, at convergence, over the whole image); how much PSNR it
adds is a property of the model: little for one that already reproduces its input. Weighting the correction towards where the model changed
the bicubic image most, or towards edges (a preconditioned iteration that converges to
another consistent image), measured 0.02 to 0.08 dB below the orthogonal projection on
the development set, so it is not offered.

``A`` is antialiased downsampling by the scale with ``degrade.consistency_kernel`` of
the preset. For ``bilinear_artifacts`` (same-size restoration, model scale 1) the input
is itself a degraded full-size image, bilinear upsampling of an unknown LR grid, so
``A`` is the whole degradation (downsampling by the scale, then bilinear upsampling):
an output that passes through it unchanged has the LR grid of the input (bilinear
upsampling is one-to-one), which is what evaluation measures for such models.

Everything is TensorFlow ops on (N, H, W, C) or (H, W, C) float32, with sizes free, so
it runs eagerly, inside a ``tf.function``, and in the exported SavedModel and TFLite
graphs (matrix products, builtin TFLite ops only). The adjoint is applied as the
transposed one-axis matrices of ``degrade.downsampling_matrix``. TensorFlow is imported
when a projection is made or run, so that the front ends read the defaults without it.
"""

import dataclasses

MODES = ("none", "project")
# Chosen on the development held-out set (docs/RESULTS.md): see ``bench.zoo``.
DEFAULT_MODE = "project"
DEFAULT_ITERATIONS = 20
DEFAULT_STEP = 1.5
MAX_STEP = 2.0  # beyond 2 the iteration diverges (the scaled operator's largest eigenvalue is 1)


class ConsistencyError(ValueError):
    """A bad consistency mode, iteration count or step; names the flag and the value."""


@dataclasses.dataclass(frozen=True)
class Projection:
    """The projection applied after a model: its degradation, scale and schedule."""

    scale: int  # the degradation's scale (4 for the x4 artifact model, whose model scale is 1)
    degradation: str = "bicubic"
    iterations: int = DEFAULT_ITERATIONS
    step: float = DEFAULT_STEP

    def __post_init__(self):
        from sr_tf.data import degrade

        check(iterations=self.iterations, step=self.step)
        degrade.model_scale(self.degradation, self.scale)  # ValueError for an unknown preset or scale

    def __call__(self, lr, sr):
        return project(lr, sr, self.scale, self.degradation, self.iterations, self.step)

    def describe(self):
        """How the projection reads in a DICOM DerivationDescription or a report."""
        from sr_tf.data import degrade

        return (f"data-consistency projection ({self.iterations} iterations, step {self.step:g}, "
                f"{degrade.consistency_kernel(self.degradation)} x{self.scale})")

    def card(self):
        """The model card's ``consistency`` entry."""
        from sr_tf.data import degrade

        return {"mode": "project", "iterations": self.iterations, "step": self.step, "scale": self.scale,
                "degradation": self.degradation, "kernel": degrade.consistency_kernel(self.degradation),
                "description": self.describe()}

    @classmethod
    def from_card(cls, entry):
        """The projection a model card's ``consistency`` entry records, or None."""
        if not entry or entry.get("mode") != "project":
            return None
        return cls(int(entry["scale"]), entry["degradation"], int(entry["iterations"]), float(entry["step"]))


def define_flags(mode_help):
    """Define the front ends' ``--consistency`` (with ``mode_help``: what "project" and
    "none" do there), ``--consistency_iterations`` and ``--consistency_step`` absl flags,
    with this module's defaults; :func:`check` validates their values."""
    from absl import flags

    flags.DEFINE_enum("consistency", DEFAULT_MODE, list(MODES), mode_help)
    flags.DEFINE_integer("consistency_iterations", DEFAULT_ITERATIONS, "Back-projection iterations.")
    flags.DEFINE_float("consistency_step", DEFAULT_STEP, f"Back-projection step size, in (0, {MAX_STEP:g}).")


def check(mode="project", iterations=DEFAULT_ITERATIONS, step=DEFAULT_STEP):
    """ConsistencyError naming the flag and the value unless ``mode`` is one of ``MODES``,
    ``iterations`` a non-negative integer and ``0 < step < MAX_STEP``."""
    if mode not in MODES:
        raise ConsistencyError(f"--consistency must be one of {', '.join(MODES)}, got {mode!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ConsistencyError(f"--consistency_iterations must be a non-negative integer, got {iterations!r}")
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not 0.0 < step < MAX_STEP:
        raise ConsistencyError(f"--consistency_step must be in (0, {MAX_STEP:g}), got {step!r}")


def _bilinear_upsampling_matrix(size, scale):
    """(size * scale, size) weights of ``tf.image.resize(..., "bilinear")`` (half-pixel
    centres, edges clamped) along one axis."""
    import tensorflow as tf

    source = (tf.range(size * scale, dtype=tf.float32) + 0.5) / scale - 0.5
    source = tf.clip_by_value(source, 0.0, tf.cast(size - 1, tf.float32))
    positions = tf.range(size, dtype=tf.float32)
    return tf.maximum(1.0 - tf.abs(source[:, tf.newaxis] - positions[tf.newaxis, :]), 0.0)


def _axis_operator(size, scale, degradation):
    """The degradation along one axis of ``size`` output pixels as a matrix (rows: the
    degraded pixels) and the factor that scales its transpose into the back-projection."""
    import tensorflow as tf

    from sr_tf.data import degrade

    kernel = degrade.consistency_kernel(degradation)
    down = degrade.downsampling_matrix(size, scale, kernel)
    if degrade.model_scale(degradation, scale) == 1:
        return tf.matmul(_bilinear_upsampling_matrix(size // scale, scale), down), 1.0
    return down, float(scale)


def _degrade(batch, scale, degradation):
    """The deterministic degradation that consistency is measured with."""
    from sr_tf.data import degrade

    kernel = degrade.consistency_kernel(degradation)
    if degrade.model_scale(degradation, scale) == 1:
        return degrade.bilinear_artifacts(batch, scale, kernel)
    return degrade.downsample(batch, scale, kernel)


def project(lr, sr, scale, degradation="bicubic", iterations=DEFAULT_ITERATIONS, step=DEFAULT_STEP):
    """``sr`` moved towards agreement with ``lr``: ``iterations`` steps of back-projection
    (see the module doc), then clipped to [0, 1].

    ``lr`` is the model's input (h, w, C) or (N, h, w, C) and ``sr`` its output, ``scale``
    times larger (the same size for ``bilinear_artifacts``, whose ``scale`` is the
    degradation's). With ``iterations=0`` the output is only clipped to [0, 1].
    """
    import tensorflow as tf

    from sr_tf.data import degrade

    check(iterations=iterations, step=step)
    sr_batch, single = degrade._as_batch(sr)
    lr_batch, _ = degrade._as_batch(lr)
    if iterations:
        _, height, width, _ = degrade._dims(sr_batch)
        rows, row_gain = _axis_operator(height, scale, degradation)
        cols, col_gain = _axis_operator(width, scale, degradation)
        gain = tf.constant(step * row_gain * col_gain, tf.float32)
        for _ in range(iterations):
            residual = lr_batch - _degrade(sr_batch, scale, degradation)
            back = tf.einsum("ph,npqc->nhqc", rows, residual)  # the transposed matrices: the adjoint
            back = tf.einsum("qw,nhqc->nhwc", cols, back)
            sr_batch = tf.clip_by_value(sr_batch + gain * back, 0.0, 1.0)
    out = tf.clip_by_value(sr_batch, 0.0, 1.0)
    return out[0] if single else out
