"""TFLite conversion of a SavedModel, builtin ops only, and the ops a TFLite model runs."""

import numpy as np
import tensorflow as tf

from sr_tf.export.forms import VARIANTS, ExportError


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
