"""Static cost of a model: parameters and FLOPs counted on its concrete function's graph."""

import tensorflow as tf
from tensorflow.python.framework.convert_to_constants import (
    convert_variables_to_constants_v2,
)


def count_flops(fn, input_spec):
    """Floating-point operations of one call of `fn` (a multiply-add counts as 2).

    Args:
        fn: a callable of one tensor (e.g. a Keras model).
        input_spec: the `tf.TensorSpec` it is traced with (a fixed shape).
    """
    concrete = tf.function(fn).get_concrete_function(input_spec)
    frozen = convert_variables_to_constants_v2(concrete)
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    profile = tf.compat.v1.profiler.profile(
        graph=frozen.graph, run_meta=tf.compat.v1.RunMetadata(), cmd="op", options=options
    )
    return profile.total_float_ops


def model_flops(model, batch_size=1):
    """FLOPs of a Keras image model at batch `batch_size` (inference mode)."""
    spec = tf.TensorSpec([batch_size, *model.input_shape[1:]], tf.float32)
    return count_flops(lambda images: model(images, training=False), spec)
