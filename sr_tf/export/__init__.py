"""Export a trained generator for serving and for edge devices, and check every form
against the Keras model it came from.

    report = export.export("runs/swift_srgan_x4", "saved_models/swift_srgan_x4")

The output folder::

    saved_model/                SavedModel; serving_default: lr float32 (N, H, W, C) -> sr
    model_float32.tflite        TFLite, float32 weights and compute
    model_float16.tflite        float16 weights (half the size), float32 compute
    model_dynamic_int8.tflite   int8 weights (dynamic-range quantisation), float activations
    model_int8.tflite           full-integer int8 compute, calibrated on LR training patches
    export_report.json          size of every form and its parity with the Keras model
    model_card.json             what the model is, what it was trained on, how to feed it

One concern a module: ``forms`` (the forms, their names and targets, the SavedModel),
``tflite`` (conversion, op listing), ``calibration`` (calibration and parity inputs),
``parity``, ``card`` (the model card), ``publish`` (the output folder); here the driver,
:func:`export`. The names other code uses are importable from this package.

Batch, height and width are free in every form: the TFLite models keep the SavedModel's
(None, None, None, C) signature, and the interpreter is resized to each input
(``resize_tensor_input``, then ``allocate_tensors``; ``sr_tf.inference`` does it). Every
TFLite model uses builtin ops only (no Flex / select TF ops), so the LiteRT runtime
(``ai_edge_litert``) runs it, and every one keeps float32 input and output: the int8
model quantises its input and dequantises its output inside, so callers pass and get
[0, 1] floats whatever the variant.

The TFLite models are converted from the model's deployable form (``model.deployable()``,
``sr_tf.models.blocks.SuperResolutionModel.deployable``): the same function up to float
rounding, arranged for XNNPACK, LiteRT's default CPU delegate. SRGAN and Swift-SRGAN run
their last PReLU and 9x9 tail before the final pixel shuffle, so that no 64-channel
tensor at the output resolution is made, and split Swift-SRGAN's 9x9 depthwise kernels
into bands of kernel rows that XNNPACK runs on its fast path; the report's
``tflite_graph`` lists what the model rearranged. The SavedModel keeps the model's graph
as it is.

Data-consistency projection (``sr_tf.consistency``, ``consistency="project"``, the
default) is baked into the SavedModel and every TFLite form after the model, against
the graph's own input, in builtin ops; the parity references are then the Keras model
followed by the library's projection, and ``model_card.json`` records it
(``consistency``, with the forms that include it), so that ``sr_tf.inference`` does not
project such a graph twice. The full-integer int8 model is converted without it
(``UNPROJECTED``): 8-bit activations cannot hold the residuals it corrects.

Parity is the PSNR (dB, data range 1) of a form's output against the Keras model's on
the same inputs: non-square LR images from the records, degraded as in training, run by
the LiteRT interpreter resized to each image. A variant that cannot be built (a
conversion error, no calibration data for int8) is reported with its reason; the others
are still written.

The folder is written under a temporary name beside ``output_dir`` and renamed when
complete, so a failed export leaves nothing half-written. An existing ``output_dir`` is
replaced only when it is a previous export (nothing in it but export files) or empty;
any other folder, or one holding the input model, is refused.
"""

import os
import shutil

from sr_tf import inference
from sr_tf.export.calibration import (
    CALIBRATION_SAMPLES,
    DEFAULT_PATCH,
    PARITY_SHAPES,
    calibration,
    calibration_inputs,
    locate_records,
    parity_inputs,
)
from sr_tf.export.card import consistency_entry, family, last_validation, model_card
from sr_tf.export.forms import (
    INPUT_NAME,
    OUTPUT_NAME,
    REPORT,
    SAVED_MODEL_DIR,
    TARGET_DB,
    UNPROJECTED,
    VARIANTS,
    ExportError,
    save_saved_model,
    tflite_name,
)
from sr_tf.export.parity import parity, psnr
from sr_tf.export.publish import EXPORT_ENTRIES, check_output, file_entry, replace_folder, staging_path
from sr_tf.export.tflite import convert, tflite_ops
from sr_tf.io import files

__all__ = [
    "CALIBRATION_SAMPLES", "EXPORT_ENTRIES", "INPUT_NAME", "OUTPUT_NAME", "PARITY_SHAPES", "REPORT",
    "SAVED_MODEL_DIR", "TARGET_DB", "UNPROJECTED", "VARIANTS", "ExportError", "calibration_inputs", "convert",
    "export", "file_entry", "last_validation", "model_card", "parity", "parity_inputs", "psnr", "replace_folder",
    "save_saved_model", "staging_path", "tflite_name", "tflite_ops",
]


def export(model_path, output_dir, data=None, variants=VARIANTS, calibration_samples=CALIBRATION_SAMPLES,
           degradation=None, seed=0, progress=None, consistency=None, consistency_iterations=None,
           consistency_step=None):
    """Export the Keras model at ``model_path`` (a run folder or a ``.keras`` file) into
    ``output_dir``; returns the report (also written as ``export_report.json``).

    ``data`` overrides the run's training records (calibration and parity images);
    ``degradation`` the run's degradation (``bicubic`` when the run does not say).
    ``consistency`` "project" (default ``sr_tf.consistency.DEFAULT_MODE``) bakes
    data-consistency projection after the model into every form, with
    ``consistency_iterations`` and ``consistency_step`` (default: the library's); "none"
    exports the model alone. The model card's ``consistency`` says which.
    ``progress`` is called with a line of text at each step.
    """
    from sr_tf import consistency as consistency_lib

    consistency = consistency or consistency_lib.DEFAULT_MODE
    iterations = consistency_lib.DEFAULT_ITERATIONS if consistency_iterations is None else consistency_iterations
    step = consistency_lib.DEFAULT_STEP if consistency_step is None else consistency_step
    consistency_lib.check(consistency, iterations, step)
    say = progress or (lambda _: None)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ExportError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    model_path, output_dir = os.fspath(model_path), os.path.normpath(os.fspath(output_dir))
    predictor = inference.load_predictor(model_path)  # ValueError naming the path
    if not isinstance(predictor, inference.KerasPredictor):
        raise ExportError(f"{model_path}: export needs a Keras model (a run folder or a .keras file), "
                          f"this is a {predictor.kind}")
    check_output(output_dir, predictor.path)
    model, training = predictor.model, dict(predictor.config or {})
    settings = _settings(model, training, degradation)
    projection = None
    if consistency == "project":
        preset = "bicubic" if settings["degradation"] == "self_supervised" else settings["degradation"]
        projection = consistency_lib.Projection(settings["scale"], preset, iterations, step)
    records_dir, no_records = locate_records(data or training.get("data"), explicit=data is not None)

    staging = staging_path(output_dir)
    os.makedirs(staging)
    try:
        report = _write_forms(predictor, staging, variants, settings, records_dir, no_records,
                              calibration_samples, seed, say, projection)
        entries = [file_entry(staging, SAVED_MODEL_DIR)]
        entries += [file_entry(staging, tflite_name(v)) for v in variants if report["variants"][v]["status"] == "ok"]
        entries.append({"path": REPORT})
        name = os.path.basename(os.path.abspath(output_dir))
        validation = last_validation(os.path.join(os.path.dirname(os.path.abspath(predictor.path)), "metrics.csv"))
        card = model_card(name, model, training, settings, records_dir, validation, entries, projection)
        files.write_json_atomic(os.path.join(staging, REPORT), report)
        files.write_json_atomic(os.path.join(staging, inference.MODEL_CARD), card)
        replace_folder(staging, os.path.abspath(output_dir))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def _settings(model, training, degradation):
    """Family, scale and degradation of the model (from its run's config when known)."""
    from sr_tf.data import degrade

    scale = int(training.get("scale") or model.scale)
    chosen = degradation or training.get("degradation") or ("bicubic" if model.scale > 1 else "bilinear_artifacts")
    if model.scale == 1 and scale == 1:
        scale = 4  # restoration model of unknown training scale: artifacts of a x4 interpolation
    if degrade.model_scale(chosen, scale) != model.scale:
        raise ExportError(f"degradation {chosen!r} at scale {scale} needs a x{degrade.model_scale(chosen, scale)} "
                          f"model, this one upscales x{model.scale}")
    patch = int(training.get("patch_size") or DEFAULT_PATCH)
    divisor = degrade.target_divisor(chosen, scale)
    return {"model": family(model, training), "scale": scale, "degradation": chosen,
            "patch_size": max(divisor, patch // divisor * divisor)}


def _projected(function, projection):
    """``function`` followed by ``projection`` against its own input (or ``function``)."""
    if projection is None:
        return function
    return lambda lr: projection(lr, function(lr))


def _write_forms(predictor, staging, variants, settings, records_dir, no_records, calibration_samples, seed, say,
                 projection=None):
    model = predictor.model
    images, described = parity_inputs(records_dir, settings["scale"], settings["degradation"], seed)
    # The references are the Keras model and, when it is baked in, the library's projection after it.
    python = predictor if projection is None else inference.ProjectedPredictor(predictor, projection)
    references = [python.predict(image) for image in images]
    report = {
        "model": predictor.path,
        "consistency": consistency_entry(projection),
        "parity": {
            "metric": "PSNR (dB, data range 1) of each form's output against the Keras model's on the same input; "
                      "psnr_db is the worst image, null means identical outputs",
            "images": described,
            "image_source": "records" if records_dir else "synthetic",
        },
        "variants": {},
    }
    if not records_dir:
        report["parity"]["note"] = f"synthetic parity images: {no_records}"

    say("writing the SavedModel")
    saved_model = os.path.join(staging, SAVED_MODEL_DIR)
    save_saved_model(model, saved_model, _projected(lambda lr: model(lr, training=False), projection))
    entry = {"path": SAVED_MODEL_DIR + "/", "status": "ok", "bytes": file_entry(staging, SAVED_MODEL_DIR)["bytes"]}
    loaded = inference.SavedModelPredictor(saved_model, "saved_model")
    entry.update(parity(loaded, images, references, TARGET_DB["saved_model"]))
    report["variants"]["saved_model"] = entry

    # What the TFLite forms are converted from, with and without projection: the model's
    # deployable form when it rearranges anything, else the SavedModel just written.
    function, notes = model.deployable()
    source, plain = saved_model, None
    if notes:
        source = os.path.join(staging, ".tflite_source")
        save_saved_model(model, source, _projected(function, projection))
        report["tflite_graph"] = list(notes)
    if projection is not None and set(variants) & set(UNPROJECTED):
        plain = os.path.join(staging, ".tflite_plain")
        save_saved_model(model, plain, function)
        plain_references = [predictor.predict(image) for image in images]
    representative = None
    if "int8" in variants:
        representative, report["calibration"] = calibration(records_dir, no_records, settings, calibration_samples,
                                                            seed)
    for variant in variants:
        say(f"converting to TFLite {variant}")
        entry = {"file": tflite_name(variant), "status": "ok"}
        path = os.path.join(staging, entry["file"])
        try:
            if variant == "int8" and representative is None:
                raise ExportError(report["calibration"]["error"])
            if projection is not None and variant in UNPROJECTED:
                entry["consistency"] = f"none: {UNPROJECTED[variant]}"
                entry.update(_tflite_form(plain, path, variant, representative, images, plain_references))
            else:
                entry.update(_tflite_form(source, path, variant, representative, images, references))
        except Exception as exc:  # converter and runtime errors of every kind: reported, not fatal
            entry.update(status="failed", error=f"{type(exc).__name__}: {_shorten(str(exc))}")
            if os.path.exists(path):
                os.remove(path)
            say(f"  {variant} not built: {entry['error']}")
        report["variants"][variant] = entry
    for folder in {source, plain} - {saved_model, None}:
        shutil.rmtree(folder)
    return report


def _tflite_form(source, path, variant, representative, images, references):
    """Convert ``source`` to ``path``; the variant's report entry (size, ops, parity)."""
    files.write_bytes_atomic(path, convert(source, variant, representative if variant == "int8" else None))
    entry = {"bytes": os.path.getsize(path)}
    entry["ops"], floating = tflite_ops(path)
    if variant == "int8":
        entry.update(integer_only=not floating, float_ops=floating)
    entry.update(parity(inference.TFLitePredictor(path, variant), images, references, TARGET_DB[variant]))
    return entry


def _shorten(text, limit=2000):
    """The end of a long converter message, where its reason is."""
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]
