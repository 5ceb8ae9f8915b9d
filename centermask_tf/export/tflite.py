"""TFLite conversion with TFLITE_BUILTINS only, and running `.tflite` files with LiteRT.

A `.tflite` file carries its category list (ids and names, JSON) as the flatbuffer metadata
entry `centermask_categories`, which runtimes ignore and `tflite_categories` reads.
"""

import json
import os
import re
import tempfile

import numpy as np
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter
from tensorflow.lite.python import schema_py_generated as schema
from tensorflow.lite.tools import flatbuffer_utils

from centermask_tf.data.pipeline import eval_dataset
from centermask_tf.data.tfds_builder import prepare_dataset
from centermask_tf.export.serving import export_tflite_saved_model, network_scope
from centermask_tf.files import remove_stale_temporaries, write_bytes

CATEGORIES_METADATA = "centermask_categories"


def representative_dataset(builder, input_size, count, split="train"):
    """Calibration inputs for int8: `count` images of `split`, letterboxed as the validation
    pipeline places them, as the uint8 `[1, N, N, 3]` tensors the TFLite model takes."""
    images = eval_dataset(builder, input_size=input_size, batch_size=1, split=split).take(count)

    def generate():
        for canvas, _ in images:
            yield [as_uint8(canvas)]

    return generate


def config_calibration(config):
    """int8 calibration as `centermask export` does it: `export.representative_images` images of
    the config's training data."""
    count = config.export.representative_images
    return representative_dataset(prepare_dataset(config.data), config.model.input_size, count)


def saved_model_to_tflite(saved_model_dir, quantize="none", representative_dataset=None, int8_scope=None,
                          float_layers=()):
    """Converts a SavedModel to a TFLite flatbuffer using builtin ops only (no Flex, no custom).

    Args:
        saved_model_dir: a SavedModel directory (e.g. from `keras.Model.export`).
        quantize: "none", "fp16" (float16 weights) or "int8" (integer quantisation with a
            uint8 image input; needs `representative_dataset`).
        representative_dataset: callable yielding lists of input arrays, for "int8".
        int8_scope: for "int8", quantise only the ops under this name scope (the network, see
            `serving.network_scope`) and keep the rest float32; None quantises every op.
        float_layers: with `int8_scope`, names of network layers (e.g. heads) whose ops stay
            float32 as well.
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
        if int8_scope is not None:
            return _quantize_scope(converter, representative_dataset, int8_scope, float_layers)
    elif quantize != "none":
        raise ValueError(f"quantize must be none, fp16 or int8; got {quantize!r}.")
    return converter.convert()


# GroupNormalization (CenterMask-FCOS's head towers) stays float32 inside the int8 network: its
# int8 variance + epsilon ADD gets a rescale factor LiteRT cannot represent, and LiteRT aborts
# the process (QuantizeMultiplierSmallerThanOneExp) when it allocates the tensors.
_GROUP_NORM = re.compile(r"(_gn|group_normalization)(_\d+)?/")


def _quantize_scope(converter, representative_dataset, scope, float_layers=()):
    """int8 for the ops under `scope` (but those of `float_layers`), float32 for the others.

    Post-processing quantised to int8 costs accuracy and time: box coordinates and peak
    indices in 256 levels, and integer kernels for small gathers and matmuls that XNNPACK does
    not take. As the TF Object Detection API's int8 detectors do (their post-processing op
    runs on dequantised outputs), only the network is quantised. `QuantizationDebugger` is
    TFLite's tool for selective quantisation: it calibrates once, then quantises with a denylist
    of the other ops.
    """
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=converter, debug_dataset=representative_dataset
    )
    inside = re.compile(rf"^{re.escape(scope)}(_\d+)?/")
    layers = "|".join(re.escape(name) for name in float_layers)
    stay_float = re.compile(_GROUP_NORM.pattern + (rf"|/({layers})(_\d+)?/" if layers else ""))
    interpreter = Interpreter(model_content=debugger.calibrated_model)
    names = {t["index"]: t["name"] for t in interpreter.get_tensor_details()}
    outside, inside_types, outside_types = set(), set(), set()
    for op in interpreter._get_ops_details():
        outputs = [names[i] for i in op["outputs"]]
        if all(inside.match(name) and not stay_float.search(name) for name in outputs):
            inside_types.add(op["op_name"])
        else:
            outside.update(outputs)
            outside_types.add(op["op_name"])
    # The quantiser does not match multi-output ops (TOPK_V2, UNPACK) by tensor name: deny the
    # op types that only post-processing uses as well.
    debugger.options = tf.lite.experimental.QuantizationDebugOptions(
        denylisted_nodes=sorted(outside), denylisted_ops=sorted(outside_types - inside_types)
    )
    return debugger.get_nondebug_quantized_model()


def keras_to_tflite(model, quantize="none", representative_dataset=None):
    """Converts a Keras model (via `model.export`, which keeps its weights) to TFLite bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        model.export(tmp, format="tf_saved_model", verbose=False)
        return saved_model_to_tflite(tmp, quantize, representative_dataset)


def with_categories(content, categories):
    """The TFLite flatbuffer `content` with `categories` ([{"id", "name"}]) as metadata."""
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(content))
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(json.dumps(categories).encode(), np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = CATEGORIES_METADATA
    entry.buffer = len(model.buffers) - 1
    model.metadata = [*(model.metadata or []), entry]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def tflite_categories(content):
    """The category list a `.tflite` file carries, or None (exported without one)."""
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(content))
    for entry in model.metadata or []:
        if entry.name.decode() == CATEGORIES_METADATA:
            return json.loads(bytes(model.buffers[entry.buffer].data))
    return None


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


def as_uint8(images):
    """Float images in 0..255 -> the uint8 an exported model takes (rounded, clipped)."""
    return tf.cast(tf.clip_by_value(tf.round(images), 0.0, 255.0), tf.uint8)


def float_layers(detector):
    """The network layers an int8 export keeps float32: the architecture's score heads, unless
    `export.float_score_heads` is false. The scores rank detections for AP and the top-K cut;
    in 256 levels they tie and reorder (the edge config on the shapes set lost 0.025 segm AP
    int8 with its heatmap head quantised, none with it float, at no measured speed cost:
    docs/experiments.md)."""
    return detector.arch.score_heads if detector.config.export.float_score_heads else ()


def export_tflite(detector, output, quantize="none", calibration=None):
    """Writes `detector` to the file `output` (atomically) as a TFLite model of builtin ops only
    that carries the detector's categories; returns its size in bytes.

    Args:
        quantize: "none", "fp16" or "int8" (`saved_model_to_tflite`).
        calibration: for int8, a `representative_dataset`.
    """
    remove_stale_temporaries(os.path.dirname(os.path.abspath(output)))  # what killed exports left
    with tempfile.TemporaryDirectory() as tmp:
        source = export_tflite_saved_model(detector, tmp)
        content = saved_model_to_tflite(source, quantize, calibration, network_scope(detector), float_layers(detector))
    extra = non_builtin_ops(content)
    if extra:
        raise RuntimeError(f"TFLite model contains non-builtin ops {sorted(extra)}.")
    content = with_categories(content, detector.categories)
    write_bytes(output, content, "tflite")
    return len(content)
