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

Batch, height and width are free in every form: the TFLite models keep the SavedModel's
(None, None, None, C) signature, and the interpreter is resized to each input
(``resize_tensor_input``, then ``allocate_tensors``; ``sr_tf.inference`` does it). Every
TFLite model uses builtin ops only (no Flex / select TF ops), so the LiteRT runtime
(``ai_edge_litert``) runs it, and every one keeps float32 input and output: the int8
model quantises its input and dequantises its output inside, so callers pass and get
[0, 1] floats whatever the variant.

The TFLite models are converted from the model's function rearranged for XNNPACK
(LiteRT's default CPU delegate), the same function up to float rounding
(``tflite_graph``):

* SRGAN and Swift-SRGAN run their last PReLU and their 9x9 tail before the final pixel
  shuffle, the tail as a 1x5 and a 5x1 convolution (``SRResNet.rearranged_tail``, the
  models' own form by default; applied here to models saved with the tail after it), so
  that no 64-channel tensor at the output resolution is made;
* depthwise convolutions of more than ``XNNPACK_FAST_TAPS`` taps (Swift-SRGAN's 9x9 head)
  are split into bands of kernel rows whose outputs are summed: XNNPACK runs depthwise
  kernels of up to 25 taps on a fast path and larger ones on a path about 30 times
  slower per tap, slower even than TFLite's own kernel.

The SavedModel keeps the model's graph as it is.

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

import contextlib
import datetime
import importlib.metadata
import math
import os
import shutil
import uuid

import numpy as np
import tensorflow as tf

from sr_tf import inference, records
from sr_tf.io import files as io_files

VARIANTS = ("float32", "float16", "dynamic_int8", "int8")
# Minimum PSNR (dB) of each form's output against the Keras model's.
TARGET_DB = {"saved_model": 50.0, "float32": 50.0, "float16": 50.0, "dynamic_int8": 35.0, "int8": 35.0}
INPUT_NAME = "lr"
OUTPUT_NAME = "sr"
SAVED_MODEL_DIR = "saved_model"
REPORT = "export_report.json"
# LR sizes (height, width) of the parity images: non-square, different, not multiples of
# 4 (so the VQ autoencoder's padding is exercised); smaller images are cropped less.
PARITY_SHAPES = ((90, 150), (126, 70))
CALIBRATION_SAMPLES = 100
STRETCH_EVERY = 4  # calibration patches stretched to [0, 1]: one in this many
XNNPACK_FAST_TAPS = 25  # largest depthwise kernel (taps) on XNNPACK's fast path
DEFAULT_PATCH = 96  # HR patch for calibration when the run's config does not give one
# Forms converted without the data-consistency projection even when it is baked into the
# others, and why; sr_tf.inference projects their output in float instead.
UNPROJECTED = {"int8": "full-integer arithmetic cannot hold the projection's small residuals (parity "
                       "falls below the int8 target); project its output in float"}


class ExportError(ValueError):
    """The export cannot run (bad model path, output folder, data); says which path and why."""


def tflite_name(variant):
    return f"model_{variant}.tflite"


EXPORT_ENTRIES = frozenset(
    {SAVED_MODEL_DIR, REPORT, inference.MODEL_CARD, *(tflite_name(v) for v in VARIANTS)}
)


# ----------------------------------------------------------------------------- forms


def save_saved_model(model, directory, function=None):
    """A SavedModel whose ``serving_default`` maps ``lr`` (N, H, W, C) float32 in [0, 1]
    to ``sr`` (N, s*H, s*W, C); batch, height and width are free. ``function`` (default:
    the model in inference mode) computes ``sr`` from ``lr`` with the model's weights."""
    import keras

    function = function or (lambda lr: model(lr, training=False))
    archive = keras.export.ExportArchive()
    archive.track(model)
    spec = tf.TensorSpec((None, None, None, model.channels), tf.float32, name=INPUT_NAME)
    archive.add_endpoint("serve", lambda lr: {OUTPUT_NAME: function(lr)}, input_signature=[spec])
    archive.write_out(directory, verbose=False)


def convert(saved_model_dir, variant, representative=None):
    """The TFLite flatbuffer of ``variant`` (one of ``VARIANTS``), builtin ops only.

    ``representative`` (int8 only): a list of LR inputs (1, h, w, C) float32 that set the
    activation ranges. Input and output stay float32 in every variant.
    """
    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if variant == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif variant == "dynamic_int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif variant == "int8":
        if not representative:
            raise ExportError("full-integer int8 needs a representative dataset")
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([sample] for sample in representative)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    elif variant != "float32":
        raise ExportError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    return converter.convert()


def _large_depthwise(model):
    """The separable convolutions whose depthwise kernel has more than ``XNNPACK_FAST_TAPS``
    taps and that ``banded_depthwise`` can split (stride 1, no dilation, "same", NHWC)."""
    import keras

    return [
        layer for layer in model._flatten_layers()  # every nested layer; Keras has no public walk
        if isinstance(layer, keras.layers.SeparableConv2D)
        and layer.kernel_size[0] * layer.kernel_size[1] > XNNPACK_FAST_TAPS
        and tuple(layer.strides) == (1, 1) and tuple(layer.dilation_rate) == (1, 1)
        and layer.padding == "same" and layer.data_format == "channels_last"
    ]


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


def _banded_call(layer):
    """``layer.call`` (a SeparableConv2D) with its depthwise step split by ``split_depthwise``."""
    rows = max(1, XNNPACK_FAST_TAPS // layer.kernel_size[1])

    def call(inputs):
        depthwise = split_depthwise(inputs, tf.convert_to_tensor(layer.depthwise_kernel), rows)
        outputs = tf.nn.conv2d(depthwise, tf.convert_to_tensor(layer.pointwise_kernel), 1, "VALID")
        if layer.use_bias:
            outputs = outputs + layer.bias
        return outputs if layer.activation is None else layer.activation(outputs)

    return call


def _subpixel_tail(model):
    """For an SRResNet-family model (SRGAN, Swift-SRGAN) that upsamples and was built with
    its tail after the last pixel shuffle (``tail_before_shuffle=False``, as models saved
    before that form was the default): the same function with the tail before it
    (``SRResNet.rearranged_tail``). None for any other model."""
    from sr_tf.models.srgan import SRResNet

    if not isinstance(model, SRResNet) or not model.upsample or model.tail_before_shuffle:
        return None
    return lambda lr: model.finish(lr, model.rearranged_tail(model.trunk(lr)))


@contextlib.contextmanager
def tflite_graph(model):
    """The function the TFLite models are converted from, and what was rearranged in it
    (a list of notes; empty: the model as it is). The same function as the model up to
    float rounding, arranged for XNNPACK: ``_subpixel_tail`` for the SRResNet family,
    and large depthwise kernels split into row bands (``banded_depthwise``)."""
    from sr_tf.models.srgan import SRResNet

    notes, function = [], _subpixel_tail(model)
    layers = _large_depthwise(model)
    if isinstance(model, SRResNet) and model.upsample:
        notes.append("last PReLU and 9x9 tail run before the final pixel shuffle, the tail as a 1x5 and a 5x1 "
                     "convolution (same function; " + ("rearranged here)" if function else "the model's own form)"))
        layers = [layer for layer in layers if layer is not model.tail]  # its weights are used, not its call
    if function is None:
        function = lambda lr: model(lr, training=False)  # noqa: E731
    if layers:
        notes.append(f"{len(layers)} depthwise convolution(s) of more than {XNNPACK_FAST_TAPS} taps "
                     "split into bands of kernel rows (XNNPACK fast path; same function)")
    with banded_depthwise(model, layers):
        yield function, notes


@contextlib.contextmanager
def banded_depthwise(model, layers=None):
    """Within the block, ``layers`` (default: all of ``model``'s large separable
    convolutions, ``_large_depthwise``) run split into row bands (see the module doc);
    yields the number of layers changed. The model is restored after."""
    layers = _large_depthwise(model) if layers is None else layers
    for layer in layers:
        layer.call = _banded_call(layer)
    try:
        yield len(layers)
    finally:
        for layer in layers:
            del layer.call


def tflite_ops(path):
    """(op names, ops computing in float32) of a TFLite model, each sorted and unique.

    The float list leaves out QUANTIZE and DEQUANTIZE (the float I/O of the int8 model,
    the float16 weights' expansion): empty means integer compute throughout.
    """
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    # Without the default delegate, whose node would stand for the ops it takes over.
    interpreter = Interpreter(model_path=path,
                              experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    dtypes = {t["index"]: t["dtype"] for t in interpreter.get_tensor_details()}
    names, floating = set(), set()
    for op in interpreter._get_ops_details():  # the public API has no op list
        names.add(op["op_name"])
        tensors = [i for i in (*op["inputs"], *op["outputs"]) if i >= 0]
        if op["op_name"] not in ("QUANTIZE", "DEQUANTIZE") and any(dtypes.get(i) == np.float32 for i in tensors):
            floating.add(op["op_name"])
    return sorted(names), sorted(floating)


# ----------------------------------------------------------------------------- inputs


def _locate_records(data, explicit):
    """``(records_dir, None)`` when ``data`` is a readable records folder, else
    ``(None, reason)``; an explicitly given folder that cannot be read is an error."""
    if not data:
        return None, "no records: the run's config.json names no training data and no --data was given"
    try:
        records.read_manifest(data)
    except records.RecordsError as exc:
        if explicit:
            raise ExportError(str(exc)) from exc
        return None, f"the training data named in the run's config.json cannot be read ({exc})"
    return data, None


def calibration_inputs(data, scale, degradation, patch_size, count, seed=0):
    """``count`` LR training patches (1, p/s, p/s, 1), degraded as in training, for int8
    calibration (``sr_tf.data.pipeline.make_dataset`` on the ``train`` split).

    Every ``STRETCH_EVERY``-th patch is stretched to span [0, 1], so that the quantisation
    ranges cover the whole input range of the contract: otherwise an image brighter than
    every sampled patch (metal, contrast agent, another modality) is clipped at the
    brightest value calibration saw.
    """
    from sr_tf.data import pipeline

    dataset = pipeline.make_dataset(
        data, "train", scale, patch_size, 1, degradation=degradation, seed=seed, shuffle_buffer=4 * count
    )
    patches = [lr.numpy() for lr, _ in dataset.take(count)]
    for index in range(0, len(patches), STRETCH_EVERY):
        low, high = patches[index].min(), patches[index].max()
        if high > low:
            patches[index] = (patches[index] - low) / (high - low)
    return patches


def parity_inputs(data, scale, degradation, seed=0):
    """LR images (1, h, w, 1) of ``PARITY_SHAPES`` (or smaller, still non-square),
    degraded as in training, from the first of the val, test and train splits that has
    records; with ``data=None``, deterministic synthetic images. Returns
    ``(images, descriptions)``."""
    if data is None:
        return _synthetic_inputs()
    from sr_tf.data import degrade, pipeline

    split = next((s for s in ("val", "test", "train") if records.record_count(data, s)), None)
    if split is None:
        raise ExportError(f"{data}: the records folder holds no records")
    divisor = degrade.target_divisor(degradation, scale)
    examples = list(pipeline.make_eval_dataset(data, split, multiple_of=divisor).take(len(PARITY_SHAPES)))
    images, descriptions = [], []
    for index, shape in enumerate(PARITY_SHAPES):
        example = examples[index % len(examples)]
        lr, _ = degrade.apply(degradation, example["image"], scale, degrade.as_seed(seed + index))
        height, width = _non_square(shape, lr.shape[:2], taken=[image.shape[1:3] for image in images])
        top, left = (lr.shape[0] - height) // 2, (lr.shape[1] - width) // 2
        images.append(lr.numpy()[None, top:top + height, left:left + width])
        source = f"{os.path.basename(example['source'].numpy().decode())}#{int(example['slice_index'])}"
        descriptions.append({"source": source, "split": split, "lr_shape": [height, width]})
    return images, descriptions


def _non_square(wanted, available, taken):
    """``wanted`` (h, w) cut to ``available``, made non-square and unlike the ``taken``
    shapes by trimming the width."""
    height, width = min(wanted[0], available[0]), min(wanted[1], available[1])
    while width > 1 and (width == height or (height, width) in [tuple(t) for t in taken]):
        width -= 1
    return height, width


def _synthetic_inputs():
    """Deterministic smooth images with an edge, when no records are available."""
    rng = np.random.default_rng(0)
    images, descriptions = [], []
    for height, width in PARITY_SHAPES:
        coarse = rng.random((1, height // 8 + 2, width // 8 + 2, 1)).astype(np.float32)
        smooth = tf.image.resize(coarse, (height, width), "bicubic").numpy()
        rows, cols = np.mgrid[:height, :width]
        disk = ((rows - height / 2) ** 2 + (cols - width / 2) ** 2 < (min(height, width) / 3) ** 2)
        images.append(np.clip(0.6 * smooth + 0.3 * disk[None, ..., None], 0, 1).astype(np.float32))
        descriptions.append({"source": "synthetic", "lr_shape": [height, width]})
    return images, descriptions


# ----------------------------------------------------------------------------- parity


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


# ----------------------------------------------------------------------------- card


def _family(model, training):
    """The registry name of the model (the run's ``model`` when known)."""
    from sr_tf import models

    if training.get("model"):
        return training["model"]
    return models.name_of(model) or type(model).__name__


def last_validation(metrics_csv):
    """``{"step": N, metric: value, ...}`` of the last ``val`` rows of a run's
    metrics.csv, or None when there are none."""
    import csv

    if not os.path.isfile(metrics_csv):
        return None
    with open(metrics_csv, newline="", encoding="utf-8") as f:
        rows = [row for row in csv.DictReader(f) if row.get("phase") == "val"]
    if not rows:
        return None
    step = max(int(row["step"]) for row in rows)
    return {"step": step, **{row["metric"]: float(row["value"]) for row in rows if int(row["step"]) == step}}


def _training_data(data):
    if data is None:
        return None
    manifest = records.read_manifest(data)
    return {"path": data, "counts": manifest.get("counts"), "run_id": manifest.get("run_id"),
            "created": manifest.get("created")}


def _file_entry(folder, relative):
    path = os.path.join(folder, relative)
    if os.path.isdir(path):
        size = sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)
        return {"path": relative + "/", "bytes": size}
    return {"path": relative, "bytes": os.path.getsize(path), "sha256": io_files.file_sha256(path)}


def _consistency_entry(projection, files=None):
    """The card's and report's ``consistency``: the projection and the forms that include it."""
    if projection is None:
        return {"mode": "none"}
    entry = projection.card()
    if files is not None:
        built = [entry_["path"] for entry_ in files]
        entry["forms"] = ["saved_model"] + [v for v in VARIANTS if tflite_name(v) in built and v not in UNPROJECTED]
    entry["not_in"] = dict(UNPROJECTED)
    return entry


def model_card(name, model, training, settings, data, validation, files, projection=None):
    channels = model.channels
    return {
        "name": name,
        "model": settings["model"],
        "model_scale": int(model.scale),
        "scale": settings["scale"],
        "degradation": settings["degradation"],
        "channels": channels,
        "input": {"name": INPUT_NAME, "dtype": "float32", "shape": [None, None, None, channels], "range": [0.0, 1.0]},
        "output": {"name": OUTPUT_NAME, "dtype": "float32",
                   "shape": ["N", f"{model.scale}*H", f"{model.scale}*W", channels], "range": [0.0, 1.0]},
        "intensity": {
            "model_input": "float32 in [0, 1]: the record's 16-bit stored value / 65535",
            "stored_mapping": "physical values mapped linearly from [intensity_min, intensity_max] to [0, 65535] "
                              "(both bounds travel with each record, so physical values are recoverable)",
            "default_ranges": {"CT": "[-1024, 3071] HU", "X-ray (CR/DX)": "[0, 2**BitsStored - 1], MONOCHROME1 "
                               "inverted so dense is bright", "MR and other": "[0, 99.9th percentile of the volume]"},
            "physical_value": "intensity_min + output * (intensity_max - intensity_min)",
        },
        # Whether the exported graphs run data-consistency projection after the model (the
        # .keras model itself never does).
        "consistency": _consistency_entry(projection, files),
        "training_data": _training_data(data),
        "validation": validation,
        "training": training or None,
        "files": files,
        "exported": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"tensorflow": tf.__version__, "keras": importlib.metadata.version("keras"),
                     "ai_edge_litert": importlib.metadata.version("ai-edge-litert")},
    }


# ----------------------------------------------------------------------------- folder


def _check_output(output_dir, model_path):
    """ExportError unless ``output_dir`` is new, empty or a previous export, and does not
    hold the input model."""
    output, model = os.path.abspath(output_dir), os.path.abspath(model_path)
    if model == output or model.startswith(output + os.sep):
        raise ExportError(f"{output_dir}: the output folder holds the input model {model_path}; "
                          "choose another --output")
    if os.path.exists(output) and not os.path.isdir(output):
        raise ExportError(f"{output_dir}: exists and is not a folder")
    if os.path.isdir(output):
        foreign = sorted(set(os.listdir(output)) - EXPORT_ENTRIES)
        if foreign:
            raise ExportError(
                f"{output_dir}: exists and is not an export folder (it holds {', '.join(foreign[:5])}"
                f"{', ...' if len(foreign) > 5 else ''}); remove it or choose another --output"
            )


def _publish(staging, output):
    """Move the finished ``staging`` folder to ``output``, replacing a previous export."""
    previous = None
    if os.path.exists(output):
        previous = os.path.join(os.path.dirname(output), f".{os.path.basename(output)}.old-{uuid.uuid4().hex[:8]}")
        os.rename(output, previous)
    try:
        os.rename(staging, output)
    except OSError:
        if previous:
            os.rename(previous, output)
        raise
    if previous:
        shutil.rmtree(previous, ignore_errors=True)


# ----------------------------------------------------------------------------- export


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
    _check_output(output_dir, predictor.path)
    model, training = predictor.model, dict(predictor.config or {})
    settings = _settings(model, training, degradation)
    projection = None
    if consistency == "project":
        preset = "bicubic" if settings["degradation"] == "self_supervised" else settings["degradation"]
        projection = consistency_lib.Projection(settings["scale"], preset, iterations, step)
    records_dir, no_records = _locate_records(data or training.get("data"), explicit=data is not None)

    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{os.path.basename(output_dir)}.partial-{uuid.uuid4().hex[:8]}")
    os.makedirs(staging)
    try:
        report = _write_forms(predictor, staging, variants, settings, records_dir, no_records,
                              calibration_samples, seed, say, projection)
        files = [_file_entry(staging, SAVED_MODEL_DIR)]
        files += [_file_entry(staging, tflite_name(v)) for v in variants if report["variants"][v]["status"] == "ok"]
        files.append({"path": REPORT})
        name = os.path.basename(os.path.abspath(output_dir))
        validation = last_validation(os.path.join(os.path.dirname(os.path.abspath(predictor.path)), "metrics.csv"))
        card = model_card(name, model, training, settings, records_dir, validation, files, projection)
        io_files.write_json_atomic(os.path.join(staging, REPORT), report)
        io_files.write_json_atomic(os.path.join(staging, inference.MODEL_CARD), card)
        _publish(staging, os.path.abspath(output_dir))
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
    return {"model": _family(model, training), "scale": scale, "degradation": chosen,
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
        "consistency": _consistency_entry(projection),
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
    entry = {"path": SAVED_MODEL_DIR + "/", "status": "ok", "bytes": _file_entry(staging, SAVED_MODEL_DIR)["bytes"]}
    loaded = inference.SavedModelPredictor(saved_model, "saved_model")
    entry.update(parity(loaded, images, references, TARGET_DB["saved_model"]))
    report["variants"]["saved_model"] = entry

    source, plain = saved_model, None  # what the TFLite forms are converted from, with and without projection
    with tflite_graph(model) as (function, notes):
        if notes:
            source = os.path.join(staging, ".tflite_source")
            save_saved_model(model, source, _projected(function, projection))
            report["tflite_graph"] = notes
        if projection is not None and set(variants) & set(UNPROJECTED):
            plain = os.path.join(staging, ".tflite_plain")
            save_saved_model(model, plain, function)
            plain_references = [predictor.predict(image) for image in images]
    calibration = None
    if "int8" in variants:
        calibration = _calibration(records_dir, no_records, settings, calibration_samples, seed, report)
    for variant in variants:
        say(f"converting to TFLite {variant}")
        entry = {"file": tflite_name(variant), "status": "ok"}
        path = os.path.join(staging, entry["file"])
        try:
            if variant == "int8" and calibration is None:
                raise ExportError(report["calibration"]["error"])
            if projection is not None and variant in UNPROJECTED:
                entry["consistency"] = f"none: {UNPROJECTED[variant]}"
                entry.update(_tflite_form(plain, path, variant, calibration, images, plain_references))
            else:
                entry.update(_tflite_form(source, path, variant, calibration, images, references))
        except Exception as exc:  # converter and runtime errors of every kind: reported, not fatal
            entry.update(status="failed", error=f"{type(exc).__name__}: {_shorten(str(exc))}")
            if os.path.exists(path):
                os.remove(path)
            say(f"  {variant} not built: {entry['error']}")
        report["variants"][variant] = entry
    for folder in {source, plain} - {saved_model, None}:
        shutil.rmtree(folder)
    return report


def _tflite_form(source, path, variant, calibration, images, references):
    """Convert ``source`` to ``path``; the variant's report entry (size, ops, parity)."""
    with open(path, "wb") as f:
        f.write(convert(source, variant, calibration if variant == "int8" else None))
    entry = {"bytes": os.path.getsize(path)}
    entry["ops"], floating = tflite_ops(path)
    if variant == "int8":
        entry.update(integer_only=not floating, float_ops=floating)
    entry.update(parity(inference.TFLitePredictor(path, variant), images, references, TARGET_DB[variant]))
    return entry


def _calibration(records_dir, no_records, settings, count, seed, report):
    """The int8 representative inputs, or None with the reason in ``report["calibration"]``."""
    from sr_tf.data import pipeline

    info = {"data": records_dir, "split": "train", "degradation": settings["degradation"],
            "hr_patch": settings["patch_size"], "samples": count}
    report["calibration"] = info
    if records_dir is None:
        info["error"] = f"full-integer int8 needs calibration data: {no_records}; pass --data"
        return None
    try:
        samples = calibration_inputs(records_dir, settings["scale"], settings["degradation"],
                                     settings["patch_size"], count, seed)
    except pipeline.DatasetError as exc:
        info["error"] = f"no calibration patches: {exc}"
        return None
    info["lr_patch"] = list(samples[0].shape[1:3])
    return samples


def _shorten(text, limit=2000):
    """The end of a long converter message, where its reason is."""
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]
