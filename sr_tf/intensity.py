"""The intensity convention (docs/DESIGN.md, contract 1: intensity convention).

A record stores a slice as uint16: physical values (HU for CT, detector value for
X-ray with dense bright, MR signal) are mapped linearly from
``[intensity_min, intensity_max]`` to ``[0, 65535]``; models see float32 in [0, 1].
Both bounds travel with the record, so physical values can be recovered.
"""

import numpy as np

STORED_MAX = 65535

CT_RANGE = (-1024.0, 3071.0)
XRAY_MODALITIES = frozenset({"CR", "DX", "MG", "RF", "XA", "IO", "PX", "RG"})
MR_PERCENTILE = 99.9


def xray_range(bits_stored):
    """Default X-ray window: the full detector range of ``bits_stored`` bits."""
    return 0.0, float(2 ** int(bits_stored) - 1)


def percentile_range(values, percentile=MR_PERCENTILE):
    """MR and other modalities: ``[0, percentile]`` of the finite values.

    Computed over a whole volume so that every slice of it shares one mapping.
    Falls back to the maximum when the percentile is not positive (mostly-zero data).
    """
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        raise ValueError("no finite values to derive an intensity range from")
    hi = float(np.percentile(finite, percentile))
    if hi <= 0:
        hi = float(finite.max())
    if hi <= 0:
        raise ValueError("image has no positive values; pass an explicit intensity range")
    return 0.0, hi


def to_stored(physical, lo, hi):
    """Map physical values to uint16. Returns ``(stored, n_clipped)``.

    Values outside ``[lo, hi]`` are clipped; ``n_clipped`` counts them.
    """
    if not hi > lo:
        raise ValueError(f"intensity range must have max > min, got [{lo}, {hi}]")
    values = np.asarray(physical, dtype=np.float64)
    n_clipped = int(np.count_nonzero((values < lo) | (values > hi)))
    return np.rint(to_levels(np.clip(values, lo, hi), lo, hi)).astype(np.uint16), n_clipped


def to_levels(physical, lo, hi, peak=STORED_MAX):
    """Physical values -> float64 levels, ``lo`` at 0 and ``hi`` at ``peak`` (neither
    clipped nor rounded): a stored representation of ``peak + 1`` levels, e.g. 255 for an
    8-bit PNG."""
    return (np.asarray(physical, np.float64) - lo) * (peak / (hi - lo))


def to_unit(physical, lo, hi):
    """Physical values -> float32 in [0, 1] through the window ``[lo, hi]`` (clipped): what
    a model sees. ``lo`` and ``hi`` may be arrays that broadcast (one window a slice)."""
    lo, hi = np.asarray(lo, np.float32), np.asarray(hi, np.float32)
    if not np.all(hi > lo):
        raise ValueError(f"intensity range must have max > min, got [{lo}, {hi}]")
    unit = np.subtract(physical, lo, dtype=np.float32)
    unit /= hi - lo
    return np.clip(unit, 0.0, 1.0, out=unit)


def stored_to_unit(stored):
    """Stored uint16 values -> float32 in [0, 1]: a NumPy array, or a TensorFlow tensor
    (in a ``tf.data`` pipeline or a graph)."""
    if isinstance(stored, np.ndarray) or np.isscalar(stored):
        return np.asarray(stored, np.float32) / np.float32(STORED_MAX)
    import tensorflow as tf

    return tf.cast(stored, tf.float32) / float(STORED_MAX)


def to_physical(stored, lo, hi):
    """Inverse of :func:`to_stored` for uint16 input, or for float input in [0, 1]."""
    values = np.asarray(stored)
    unit = values / STORED_MAX if values.dtype == np.uint16 else values.astype(np.float64)
    return lo + unit * (hi - lo)


def quantisation_step(lo, hi):
    """Physical size of one stored level."""
    return (hi - lo) / STORED_MAX
