"""The forms an export writes, their names and parity targets, and the SavedModel.

Every form maps ``lr`` (N, H, W, C) float32 in [0, 1] to ``sr`` (N, s*H, s*W, C) float32;
batch, height and width are free.
"""

import tensorflow as tf

VARIANTS = ("float32", "float16", "dynamic_int8", "int8")
# Minimum PSNR (dB) of each form's output against the Keras model's.
TARGET_DB = {"saved_model": 50.0, "float32": 50.0, "float16": 50.0, "dynamic_int8": 35.0, "int8": 35.0}
INPUT_NAME = "lr"
OUTPUT_NAME = "sr"
SAVED_MODEL_DIR = "saved_model"
REPORT = "export_report.json"
# Forms converted without the data-consistency projection even when it is baked into the
# others, and why; sr_tf.inference projects their output in float instead.
UNPROJECTED = {"int8": "full-integer arithmetic cannot hold the projection's small residuals (parity "
                       "falls below the int8 target); project its output in float"}


class ExportError(ValueError):
    """The export cannot run (bad model path, output folder, data); says which path and why."""


def tflite_name(variant):
    return f"model_{variant}.tflite"


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
