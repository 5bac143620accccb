"""Self-ensemble over the eight symmetries of the square, and the uncertainty map it gives.

A model run on an image turned or mirrored should give the same image turned or mirrored
back; where its eight outputs (four rotations, each also mirrored; Lim et al., EDSR,
"geometric self-ensemble") disagree, the model is unsure of what it drew. Their mean is
a slightly better output, and their per-pixel spread, together with the data-consistency
residual (how far the output, degraded again, is from its own input), is an uncertainty
map a reader can lay over the image:

    predictor = EnsemblePredictor(load_predictor("swift_srgan_x4"), spread=True)
    both = tiled_predict(predictor, lr)          # (sH, sW, 2): mean, spread
    u = uncertainty(lr, both[..., 0], both[..., 1], scale=4)

Tiling is unchanged: each tile is turned, run, turned back and averaged, so the
ensemble is tiled exactly as the model is.
"""

import numpy as np

from sr_tf import inference

TRANSFORMS = 8
# Uncertainty above this (in [0, 1] units of the display window: 2 %) counts as "unsure"
# in the reports' fraction.
DEFAULT_THRESHOLD = 0.02


def transform(batch, k):
    """Symmetry ``k`` (0-7) of a batch (N, H, W, C): ``k % 4`` quarter turns, then a
    mirror (left-right) when ``k >= 4``."""
    out = np.rot90(batch, k % 4, axes=(1, 2))
    return out[:, :, ::-1] if k >= 4 else out


def inverse(batch, k):
    """The inverse of :func:`transform` ``k``."""
    out = batch[:, :, ::-1] if k >= 4 else batch
    return np.rot90(out, -(k % 4), axes=(1, 2))


def predict(predictor, batch):
    """``(mean, spread)`` of ``predictor`` over the eight symmetries of ``batch``: the
    mean output and the per-pixel standard deviation of the eight, (N, sH, sW, C) each."""
    batch = np.asarray(batch, np.float32)
    total = squares = None
    for k in (0, 2, 4, 6, 1, 3, 5, 7):  # the quarter turns last: a runtime resized per shape resizes twice
        out = inverse(np.asarray(predictor.predict(np.ascontiguousarray(transform(batch, k))), np.float64), k)
        total = out if total is None else total + out
        squares = out * out if squares is None else squares + out * out
    mean = total / TRANSFORMS
    spread = np.sqrt(np.maximum(squares / TRANSFORMS - mean * mean, 0.0))
    return mean.astype(np.float32), spread.astype(np.float32)


class EnsemblePredictor(inference.Predictor):
    """A predictor that runs ``predictor`` over the eight symmetries of each batch and
    returns their mean; with ``spread=True`` a second channel holds their spread."""

    ensemble_description = "averaged over the 8 flips and rotations of its input (self-ensemble)"

    def __init__(self, predictor, spread=False):
        super().__init__(predictor.path, predictor.name, predictor.config, predictor.card)
        self.inner = predictor
        self.kind = predictor.kind
        self.spread = bool(spread)
        # A graph with the projection baked in: each of the eight outputs is consistent
        # with its (turned) input, and so is their mean, the constraint being linear.
        self.projection = predictor.projection

    @property
    def scale(self):
        return self.inner.scale

    def predict(self, batch):
        mean, spread = predict(self.inner, batch)
        return np.concatenate([mean, spread], axis=-1) if self.spread else mean


def consistency_residual(lr, output, scale, kernel="bicubic"):
    """|LR - downsample(output)| brought to the output's grid (each LR pixel's residual
    over the ``scale`` x ``scale`` output pixels it covers): where, degraded again, the
    output does not reproduce its input."""
    from sr_tf.data import degrade

    lr = np.asarray(lr, np.float32).reshape(np.shape(lr)[:2])
    output = np.asarray(output, np.float32).reshape(np.shape(output)[:2])
    if scale == 1:
        return np.zeros_like(output)
    down = degrade.downsample(output[..., None], scale, kernel).numpy()[..., 0]
    residual = np.abs(lr - down)
    return np.repeat(np.repeat(residual, scale, axis=0), scale, axis=1)


def uncertainty(lr, output, spread, scale, kernel="bicubic"):
    """The uncertainty map (sH, sW) in [0, 1] intensity units: the root of the squared
    ensemble spread plus the squared consistency residual (:func:`consistency_residual`).
    Both are errors the output may carry; a pixel is as uncertain as the larger says."""
    spread = np.asarray(spread, np.float32).reshape(np.shape(spread)[:2])
    residual = consistency_residual(lr, output, scale, kernel)
    return np.sqrt(spread * spread + residual * residual).astype(np.float32)


def fraction_above(values, threshold=DEFAULT_THRESHOLD):
    """The fraction of pixels of ``values`` above ``threshold``."""
    values = np.asarray(values)
    return float(np.mean(values > threshold)) if values.size else 0.0
