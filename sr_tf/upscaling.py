"""Upscale DICOM, NIfTI and PNG/JPEG/TIFF files with a trained model, in their own format.

    predictor = inference.load_predictor("runs/swift_srgan_x4")
    predictor = inference.with_consistency(predictor, "project")   # data-consistency projection
    image = upscaling.load("ct.dcm")                      # slices (S, H, W) in [0, 1]
    sr = upscaling.upscale(predictor, image)              # (S, 4H, 4W) in [0, 1], tiled
    upscaling.write(image, sr, predictor, "out/ct_x4.dcm")

Intensities. The model sees what it was trained on: each file is read by the same
readers as conversion into records (``sr_tf.io.readers``), each volume mapped through its
own window to [0, 1] (docs/DESIGN.md, contract 1: CT -1024..3071 HU, X-ray
0..2**BitsStored-1, MR and others 0..99.9th percentile of the volume; a DICOM series
through one window, ``readers.series_window``, as conversion maps a series). Values
outside the window are not lost: :class:`Image` keeps them and the writers carry them
into the output (``sr_tf.io.writers``).

Writing back: the input's own format and stored representation, a derived DICOM object
in a new series, a NIfTI on the input's own voxel grid, a PNG of the input's bit depth
(``sr_tf.io.writers``); the DerivationDescription, the NIfTI descrip and the new series
say how the pixels were made (:func:`derivation`).

Outputs are written under a temporary name and renamed, and never over their input.
"""

import dataclasses
import io
import os
import time

import numpy as np

from sr_tf import inference
from sr_tf.io import files, readers, writers


class UpscaleError(ValueError):
    """An input that cannot be upscaled or written; the message names the file and the reason."""


# ----------------------------------------------------------------------------- loading


Image = readers.Image  # one file as a model sees it (sr_tf.io.readers)


def load(path, modality=None, window=None):
    """Load one DICOM, NIfTI or PNG/JPEG/TIFF file as an :class:`Image` (what conversion
    would put in records, mapped the same way: ``sr_tf.io.readers.load_image``; ``modality``
    for NIfTI and raster inputs, ``window`` the intensity window of a DICOM series:
    ``readers.series_window``); UpscaleError("<path>: <reason>") if it cannot be."""
    path = os.fspath(path)
    try:
        return readers.load_image(path, modality, window)
    except (readers.InputError, ValueError) as exc:
        raise UpscaleError(f"{path}: {exc}") from exc


# ----------------------------------------------------------------------------- inference


def _indices(image, slices):
    count = image.slices.shape[0]
    if slices is None:
        return list(range(count))
    indices = [int(k) for k in slices]
    bad = [k for k in indices if not 0 <= k < count]
    if bad or not indices:
        raise UpscaleError(f"{image.path}: slice indices {bad or indices} out of range for {count} slice(s)")
    return indices


def upscale(predictor, image, tile=inference.DEFAULT_TILE, overlap=inference.DEFAULT_OVERLAP,
            batch_size=inference.DEFAULT_BATCH, slices=None, progress=None, uncertainty=False):
    """Super-resolve the slices of ``image`` (all, or the indices in ``slices``) with tiled
    inference; returns (S', s*H, s*W) float32 in [0, 1]. ``progress(done, total)`` counts
    tiles over all the slices.

    ``uncertainty=True`` (``predictor`` an ``sr_tf.ensemble.EnsemblePredictor`` with
    ``spread=True``, possibly projected) returns ``(upscaled, uncertainty)``, the second
    the uncertainty map of each slice (``sr_tf.ensemble.uncertainty``), same shape.
    """
    indices = _indices(image, slices)
    if uncertainty:
        from sr_tf import ensemble
        from sr_tf.data import degrade

        kernel = degrade.consistency_kernel(inference.degradation_of(inference.innermost(predictor)))
        maps = None
    out = None
    for i, k in enumerate(indices):
        per_slice = None
        if progress is not None:
            def per_slice(done, total, i=i):
                progress(i * total + done, len(indices) * total)
        result = inference.tiled_predict(predictor, image.slices[k], tile, overlap, batch_size, progress=per_slice)
        if not np.isfinite(result).all():
            raise UpscaleError(f"{image.path}: the model produced NaN or Inf (slice {k}); nothing written")
        if uncertainty and result.shape[-1] != 2:
            raise UpscaleError(f"{image.path}: an uncertainty map needs the self-ensemble's spread (--ensemble)")
        spread = result[..., 1] if uncertainty else None
        result = np.clip(result[..., 0], 0.0, 1.0)
        if out is None:
            out = np.empty((len(indices), *result.shape), np.float32)
            if uncertainty:
                maps = np.empty_like(out)
        out[i] = result
        if uncertainty:
            maps[i] = ensemble.uncertainty(image.slices[k], result, spread, predictor.scale, kernel)
    return (out, maps) if uncertainty else out


# ----------------------------------------------------------------------------- files


def split_extension(name):
    """``(stem, extension)`` with ``.nii.gz`` as one extension."""
    if name.lower().endswith(".nii.gz"):
        return name[:-7], name[-7:]
    return os.path.splitext(name)


def output_path(image_path, output_dir, scale):
    """``<output_dir>/<stem>_x<scale><ext>``: .nii/.nii.gz kept, rasters become .png and
    DICOM .dcm (a DICOM name without a known extension is kept whole as the stem)."""
    name = os.path.basename(os.fspath(image_path))
    stem, ext = split_extension(name)
    lower = ext.lower()
    if lower in readers.NIFTI_EXTENSIONS:
        new_ext = ext
    elif lower in readers.RASTER_EXTENSIONS:
        new_ext = ".png"
    else:
        new_ext = ".dcm"
        if lower not in readers.DICOM_EXTENSIONS:
            stem = name
    return os.path.join(os.fspath(output_dir), f"{stem}_x{scale}{new_ext}")


def uncertainty_path(output):
    """Where the uncertainty map of the output ``output`` goes: ``<stem>_uncertainty<ext>``
    beside it (a 16-bit PNG for a PNG)."""
    folder, name = os.path.split(os.fspath(output))
    stem, ext = split_extension(name)
    return os.path.join(folder, f"{stem}_uncertainty{ext}")


def derivation(predictor):
    """What the written file records of how ``predictor`` made its pixels
    (``sr_tf.io.writers.Derivation``): the model, the scale, its description (model,
    projection, ensemble, adaptation) and what else makes the pixels (so that outputs
    with and without projection, ensemble or adaptation are never one series)."""
    *wrappers, model = inference.chain(predictor)
    options = [f"adapted seed {model.adaptation.seed}"] if getattr(model, "adaptation", None) is not None else []
    options += ["ensemble" for wrapper in wrappers if getattr(wrapper, "ensemble_description", None)]
    note = ""
    if predictor.projection is not None:
        card = predictor.projection.card()
        options.append("projection " + " ".join(f"{k}={card[k]}" for k in sorted(card) if k != "description"))
        note = f" +projection {predictor.projection.iterations}"
    return writers.Derivation(int(predictor.scale), str(predictor.name), inference.describe(predictor),
                              tuple(options), note)


def _encode(image, upscaled, predictor, slices, fileobj, uncertainty=False):
    try:
        writers.encode(image, upscaled, derivation(predictor), _indices(image, slices), fileobj, uncertainty)
    except readers.InputError as exc:
        raise UpscaleError(f"{image.path}: {exc}") from exc


def to_bytes(image, upscaled, predictor, slices=None, uncertainty=False):
    """The file :func:`write` would write, in memory, and a suggested file name."""
    buffer = io.BytesIO()
    _encode(image, upscaled, predictor, slices, buffer, uncertainty)
    name = output_path(image.path, "", predictor.scale)
    return buffer.getvalue(), os.path.basename(uncertainty_path(name) if uncertainty else name)


def _refuse_input(image_path, target):
    if os.path.abspath(target) == os.path.abspath(image_path) or (
            os.path.exists(target) and os.path.samefile(target, image_path)):
        raise UpscaleError(f"{image_path}: refusing to overwrite the input with its output")


def write(image, upscaled, predictor, output_path, slices=None, uncertainty=False):
    """Write the upscaled slices in the input's own format to ``output_path`` (under a
    temporary name, then renamed; never over the input). Returns the path.
    ``uncertainty=True``: ``upscaled`` is the uncertainty map, written as a derived image
    of its own (``_as_uncertainty``; for DICOM in its own series)."""
    target = os.fspath(output_path)
    _refuse_input(image.path, target)
    with files.atomic_open(target, "wb") as f:
        _encode(image, upscaled, predictor, slices, f, uncertainty)
    return target


def adapted(predictor, image, adapt):
    """``predictor`` with its model replaced by a copy adapted to ``image``
    (``sr_tf.adaptation``; ``adapt`` a dict of :func:`sr_tf.adaptation.adapt`'s keywords:
    steps, seconds, seed), the report on the copy's ``adaptation``. UpscaleError when the
    model is not a Keras model or cannot be adapted."""
    from sr_tf import adaptation

    try:
        return inference.adapted(predictor, image.slices, **adapt)
    except adaptation.AdaptationError as exc:
        raise UpscaleError(f"{image.path}: {exc}") from exc


def upscale_file(predictor, path, output_dir, tile=inference.DEFAULT_TILE, overlap=inference.DEFAULT_OVERLAP,
                 batch_size=inference.DEFAULT_BATCH, output=None, progress=None, adapt=None, uncertainty=False,
                 threshold=None, modality=None, window=None):
    """Load, upscale and write one file (to ``output``, default :func:`output_path`).
    Never raises for a bad input: returns a report dict with ``status`` "ok" or "failed",
    ``output`` and ``error`` (the reason, naming the file).

    ``adapt``: fine-tune a copy of the model on this file first (:func:`adapted`; the
    report gains ``adaptation``). ``uncertainty``: also write the uncertainty map beside
    the output (:func:`uncertainty_path`; ``predictor`` must run the self-ensemble with
    its spread); the report gains ``uncertainty`` with the fraction of pixels above
    ``threshold`` (``sr_tf.ensemble.DEFAULT_THRESHOLD`` by default). ``modality`` and
    ``window``: as :func:`load` takes them.
    """
    from sr_tf import ensemble

    started = time.perf_counter()
    report = {"input": os.fspath(path), "status": "failed", "output": None, "error": None}
    try:
        target = output or output_path(path, output_dir, predictor.scale)
        _refuse_input(path, target)
        image = load(path, modality, window)
        report.update(kind=image.kind, modality=image.modality, input_shape=list(image.slices.shape))
        if adapt is not None:
            predictor = adapted(predictor, image, adapt)
            report["adaptation"] = dataclasses.asdict(inference.innermost(predictor).adaptation)
        result = upscale(predictor, image, tile, overlap, batch_size, progress=progress, uncertainty=uncertainty)
        upscaled, maps = result if uncertainty else (result, None)
        report["output_shape"] = list(upscaled.shape)
        if uncertainty:
            _refuse_input(path, uncertainty_path(target))
        written = write(image, upscaled, predictor, target)
        if uncertainty:  # after the output: a failed output leaves no map behind
            threshold = ensemble.DEFAULT_THRESHOLD if threshold is None else float(threshold)
            report["uncertainty"] = {"output": write(image, maps, predictor, uncertainty_path(target), uncertainty=True),
                                     "threshold": threshold, "fraction_above": ensemble.fraction_above(maps, threshold)}
        report["output"] = written
        report["status"] = "ok"
    except UpscaleError as exc:
        report["error"] = str(exc)
    except Exception as exc:  # a model or I/O failure on one file must not stop the others
        report["error"] = f"{path}: {type(exc).__name__}: {exc}"
    report["seconds"] = round(time.perf_counter() - started, 3)
    return report
