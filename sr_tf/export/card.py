"""The model card (``model_card.json``): what the model is, what it was trained on, how
to feed it, and which forms run data-consistency projection after it."""

import datetime
import importlib.metadata
import os

import tensorflow as tf

from sr_tf import records
from sr_tf.export.forms import INPUT_NAME, OUTPUT_NAME, UNPROJECTED, VARIANTS, tflite_name


def family(model, training):
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


def consistency_entry(projection, entries=None):
    """The card's and report's ``consistency``: the projection and, given the card's file
    ``entries``, the forms that include it."""
    if projection is None:
        return {"mode": "none"}
    entry = projection.card()
    if entries is not None:
        built = [file["path"] for file in entries]
        entry["forms"] = ["saved_model"] + [v for v in VARIANTS if tflite_name(v) in built and v not in UNPROJECTED]
    entry["not_in"] = dict(UNPROJECTED)
    return entry


def model_card(name, model, training, settings, data, validation, entries, projection=None):
    """The card of ``model`` exported as ``name``: ``settings`` (family, scale,
    degradation), its run's ``training`` config, the records ``data``, the last
    ``validation`` and the exported file ``entries``."""
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
        "consistency": consistency_entry(projection, entries),
        "training_data": _training_data(data),
        "validation": validation,
        "training": training or None,
        "files": entries,
        "exported": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"tensorflow": tf.__version__, "keras": importlib.metadata.version("keras"),
                     "ai_edge_litert": importlib.metadata.version("ai-edge-litert")},
    }


def _training_data(data):
    if data is None:
        return None
    manifest = records.read_manifest(data)
    return {"path": data, "counts": manifest.get("counts"), "run_id": manifest.get("run_id"),
            "created": manifest.get("created")}
