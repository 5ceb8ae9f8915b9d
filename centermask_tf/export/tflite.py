"""TFLite conversion with TFLITE_BUILTINS only, and running `.tflite` files with LiteRT."""

import tempfile

import numpy as np
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter


def representative_dataset(builder, input_size, count, split="train"):
    """Calibration inputs for int8: `count` images of `split`, letterboxed as the validation
    pipeline places them, as the uint8 `[1, N, N, 3]` tensors the TFLite model takes."""
    from centermask_tf.data.pipeline import eval_dataset
    from centermask_tf.export.runtime import as_uint8

    images = eval_dataset(builder, input_size=input_size, batch_size=1, split=split).take(count)

    def generate():
        for canvas, _ in images:
            yield [as_uint8(canvas)]

    return generate


def saved_model_to_tflite(saved_model_dir, quantize="none", representative_dataset=None):
    """Converts a SavedModel to a TFLite flatbuffer using builtin ops only (no Flex, no custom).

    Args:
        saved_model_dir: a SavedModel directory (e.g. from `keras.Model.export`).
        quantize: "none", "fp16" (float16 weights) or "int8" (full-integer quantisation with a
            uint8 image input; needs `representative_dataset`).
        representative_dataset: callable yielding lists of input arrays, for "int8".
    """
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model_dir))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantize == "fp16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif quantize == "int8":
        if representative_dataset is None:
            raise ValueError("int8 quantisation needs a representative dataset.")
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative_dataset
        converter.inference_input_type = tf.uint8
    elif quantize != "none":
        raise ValueError(f"quantize must be none, fp16 or int8; got {quantize!r}.")
    return converter.convert()


def keras_to_tflite(model, quantize="none", representative_dataset=None):
    """Converts a Keras model (via `model.export`, which keeps its weights) to TFLite bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        model.export(tmp, format="tf_saved_model", verbose=False)
        return saved_model_to_tflite(tmp, quantize, representative_dataset)


def tflite_op_names(content):
    """The set of operator names in a TFLite flatbuffer."""
    interpreter = Interpreter(model_content=content)
    return {op["op_name"] for op in interpreter._get_ops_details()}


def non_builtin_ops(content):
    """Flex (`Flex*`) and custom ops in a TFLite flatbuffer; empty for a builtins-only model."""
    return {name for name in tflite_op_names(content) if name.startswith("Flex") or name == "CUSTOM"}


def run_tflite(content, inputs):
    """Runs the default signature of a TFLite model.

    Args:
        content: TFLite flatbuffer bytes.
        inputs: dict of input name -> array.

    Returns:
        dict of output name -> numpy array.
    """
    runner = Interpreter(model_content=content).get_signature_runner()
    return {k: np.asarray(v) for k, v in runner(**inputs).items()}
