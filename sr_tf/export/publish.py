"""An export folder is assembled under a temporary name beside its destination and
renamed when complete, so a failed export leaves nothing half-written; an existing
destination is replaced only when it is a previous export or empty."""

import os
import shutil
import uuid

from sr_tf import inference
from sr_tf.export.forms import REPORT, SAVED_MODEL_DIR, VARIANTS, ExportError, tflite_name
from sr_tf.io import files

EXPORT_ENTRIES = frozenset(
    {SAVED_MODEL_DIR, REPORT, inference.MODEL_CARD, *(tflite_name(v) for v in VARIANTS)}
)


def check_output(output_dir, model_path):
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


def staging_path(output):
    """Where ``output`` is assembled: ``.<name>.partial-<8 hex>`` beside it (the parent
    folder is created; the staging folder is not)."""
    parent, name = os.path.split(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    return os.path.join(parent, f".{name}.partial-{uuid.uuid4().hex[:8]}")


def replace_folder(staging, output):
    """Move the finished ``staging`` folder to ``output``, replacing a previous one."""
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


def file_entry(folder, relative):
    """The card's entry of ``folder/relative``: its path and size, and the SHA-256 of a
    file (a folder, ``relative/``, gets its total size)."""
    path = os.path.join(folder, relative)
    if os.path.isdir(path):
        size = sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)
        return {"path": relative + "/", "bytes": size}
    return {"path": relative, "bytes": os.path.getsize(path), "sha256": files.file_sha256(path)}
