"""Parity of an exported form: the PSNR (dB, data range 1) of its output against the
reference outputs (the Keras model's, projected when the projection is baked in) on the
same inputs."""

import math

import numpy as np

from sr_tf.export.forms import ExportError


def psnr(reference, output):
    """PSNR in dB with data range 1; None when the outputs are identical."""
    mse = float(np.mean((np.asarray(reference, np.float64) - np.asarray(output, np.float64)) ** 2))
    return None if mse == 0 else 10 * math.log10(1.0 / mse)


def parity(predictor, images, references, target_db):
    """Parity entry of one form: worst and per-image PSNR against the references, the
    largest absolute difference, and whether the worst PSNR reaches ``target_db``."""
    per_image, max_error = [], 0.0
    for image, reference in zip(images, references):
        output = predictor.predict(image)
        if output.shape != reference.shape:
            raise ExportError(f"{predictor.path}: output shape {output.shape}, expected {reference.shape}")
        per_image.append(psnr(reference, output))
        max_error = max(max_error, float(np.max(np.abs(output - reference))))
    finite = [value for value in per_image if value is not None]
    worst = min(finite) if finite else None
    return {
        "psnr_db": _round(worst),
        "psnr_db_per_image": [_round(value) for value in per_image],
        "max_abs_error": max_error,
        "target_db": target_db,
        "meets_target": worst is None or worst >= target_db,
    }


def _round(value):
    return None if value is None else round(value, 2)
