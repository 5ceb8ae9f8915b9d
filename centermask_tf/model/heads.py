"""The five CenterMask heads: each a 3x3 conv -> ReLU -> 1x1 conv on the stride-4 features."""

import math

import keras

# Heatmap bias -2.19 = -log((1 - 0.1) / 0.1): every location starts at p ~= 0.1 (CenterNet).
HEATMAP_BIAS = -math.log((1.0 - 0.1) / 0.1)

HEAD_NAMES = ("heatmap", "offset", "size", "shape", "saliency")


@keras.saving.register_keras_serializable(package="centermask")
class Head(keras.layers.Layer):
    """A prediction head: 3x3 conv (`head_conv` channels) -> ReLU -> 1x1 conv (`filters`).

    The output is always float32, also under a mixed-precision policy: every head's output is a
    logit or regression value that feeds losses and sigmoids.

    Args:
        filters: output channels.
        head_conv: channels of the hidden 3x3 conv.
        bias_init: initial bias of the final 1x1 conv.

    Example:

    >>> head = Head(filters=2, head_conv=16)
    >>> head(keras.ops.zeros([1, 8, 8, 4])).shape
    (1, 8, 8, 2)
    """

    def __init__(self, filters, head_conv=256, bias_init=0.0, **kwargs):
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.head_conv = int(head_conv)
        self.bias_init = float(bias_init)

    def build(self, input_shape):
        self.hidden = keras.layers.Conv2D(
            self.head_conv,
            3,
            padding="same",
            activation="relu",
            dtype=self.dtype_policy,
            name="hidden",
        )
        self.hidden.build(input_shape)
        self.out = keras.layers.Conv2D(
            self.filters,
            1,
            bias_initializer=keras.initializers.Constant(self.bias_init),
            dtype=self.dtype_policy,
            name="out",
        )
        self.out.build((*input_shape[:-1], self.head_conv))

    def call(self, features):
        return keras.ops.cast(self.out(self.hidden(features)), "float32")

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.filters)

    def compute_output_spec(self, features):
        return keras.KerasTensor(self.compute_output_shape(features.shape), dtype="float32")

    def get_config(self):
        config = super().get_config()
        config.update(
            {"filters": self.filters, "head_conv": self.head_conv, "bias_init": self.bias_init}
        )
        return config


def build_heads(num_classes, shape_size, head_conv, class_specific_saliency):
    """The five heads, keyed by `HEAD_NAMES`."""
    return {
        "heatmap": Head(num_classes, head_conv, HEATMAP_BIAS, name="heatmap"),
        "offset": Head(2, head_conv, name="offset"),
        "size": Head(2, head_conv, name="size"),
        "shape": Head(shape_size * shape_size, head_conv, name="shape"),
        "saliency": Head(num_classes if class_specific_saliency else 1, head_conv, name="saliency"),
    }
