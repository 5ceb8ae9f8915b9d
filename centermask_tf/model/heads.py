"""The five CenterMask heads: each a 3x3 conv -> ReLU -> 1x1 conv on the stride-4 features."""

import math

import keras
import tensorflow as tf

from centermask_tf.ops import flat_index, unflatten_index

# Heatmap bias -2.19 = -log((1 - 0.1) / 0.1): every location starts at p ~= 0.1 (CenterNet).
HEATMAP_BIAS = -math.log((1.0 - 0.1) / 0.1)

HEAD_NAMES = ("heatmap", "offset", "size", "shape", "saliency")


@keras.saving.register_keras_serializable(package="centermask")
class Head(keras.layers.Layer):
    """A prediction head: 3x3 conv (`head_conv` channels) -> ReLU -> 1x1 conv (`filters`).

    With `separable` the 3x3 conv is depthwise-separable (depthwise 3x3, then pointwise to
    `head_conv`), which edge models use to keep four stride-4 heads cheap.

    The output is always float32, also under a mixed-precision policy: every head's output is a
    logit or regression value that feeds losses and sigmoids.

    Args:
        filters: output channels.
        head_conv: channels of the hidden 3x3 conv.
        bias_init: initial bias of the final 1x1 conv.
        separable: depthwise-separable hidden conv instead of a full 3x3 conv.

    Example:

    >>> head = Head(filters=2, head_conv=16)
    >>> head(keras.ops.zeros([1, 8, 8, 4])).shape
    (1, 8, 8, 2)
    """

    def __init__(self, filters, head_conv=256, bias_init=0.0, separable=False, **kwargs):
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.head_conv = int(head_conv)
        self.bias_init = float(bias_init)
        self.separable = bool(separable)

    def build(self, input_shape):
        conv = keras.layers.SeparableConv2D if self.separable else keras.layers.Conv2D
        self.hidden = conv(
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

    def call_at(self, features, pixels):
        """The head's output at a few locations only: `[B, H, W, C]` features and flattened
        positions `[B, K]` (y * W + x) -> `[B, K, filters]` float32, equal to `call` gathered at
        `pixels`.

        Each location's 3x3 neighbourhood (zero outside the map, as the "same" convolution
        pads) is gathered and both convolutions run as matmuls: O(K) instead of O(H * W). The
        Shape head at inference needs its S*S channels at the K peaks only.
        """
        features = tf.cast(features, tf.float32)
        height, width, channels = features.shape[1], features.shape[2], features.shape[3]
        batch, k = tf.shape(pixels)[0], tf.shape(pixels)[1]
        padded = tf.pad(features, [[0, 0], [1, 1], [1, 1], [0, 0]])
        padded = tf.reshape(padded, [batch, (height + 2) * (width + 2), channels])
        # Neighbour (dy, dx) of (y, x) sits at (y + dy, x + dx) in the padded map, dy, dx in 0..2;
        # row-major (dy, dx, channel) order is the order of the conv kernel's reshape below.
        offsets = tf.constant([dy * (width + 2) + dx for dy in range(3) for dx in range(3)], tf.int32)
        rows, cols = unflatten_index(pixels, width)
        centres = flat_index(rows, cols, width + 2)  # the same position in the padded map
        neighbours = tf.reshape(centres[..., None] + offsets, [batch, k * 9])
        patches = tf.reshape(tf.gather(padded, neighbours, batch_dims=1), [batch, k, 9 * channels])
        if self.separable:  # depthwise: per-channel weighted sum of the 9 neighbours, then pointwise
            depthwise = tf.reshape(tf.cast(self.hidden.depthwise_kernel, tf.float32), [9 * channels])
            summed = tf.reduce_sum(tf.reshape(patches * depthwise, [batch, k, 9, channels]), axis=2)
            kernel = tf.reshape(tf.cast(self.hidden.pointwise_kernel, tf.float32), [channels, self.head_conv])
            pre = tf.matmul(summed, kernel)
        else:
            kernel = tf.reshape(tf.cast(self.hidden.kernel, tf.float32), [9 * channels, self.head_conv])
            pre = tf.matmul(patches, kernel)
        hidden = tf.nn.relu(pre + tf.cast(self.hidden.bias, tf.float32))
        out_kernel = tf.reshape(tf.cast(self.out.kernel, tf.float32), [self.head_conv, self.filters])
        return tf.matmul(hidden, out_kernel) + tf.cast(self.out.bias, tf.float32)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.filters)

    def compute_output_spec(self, features):
        return keras.KerasTensor(self.compute_output_shape(features.shape), dtype="float32")

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "filters": self.filters,
                "head_conv": self.head_conv,
                "bias_init": self.bias_init,
                "separable": self.separable,
            }
        )
        return config


def mask_heads(mask_factors):
    """The mask heads a network trained with `mask_factors` (both | shape | saliency) has."""
    return {"both": ("shape", "saliency"), "shape": ("shape",), "saliency": ("saliency",)}[mask_factors]


def network_factors(network):
    """The `mask_factors` a network was built for, read from the mask heads it has."""
    names = {layer.name for layer in network.layers}
    if {"shape", "saliency"} <= names:
        return "both"
    return "shape" if "shape" in names else "saliency"


def build_heads(num_classes, shape_size, head_conv, class_specific_saliency, separable=False,
                mask_factors="both", prefix=""):
    """The heads keyed by `HEAD_NAMES`: all five, or without the mask head `mask_factors` leaves
    out (a Local Shape-only network has no Saliency head, a saliency-only one no Shape head).
    Layer names are `prefix` + the key."""
    channels = {
        "heatmap": num_classes,
        "offset": 2,
        "size": 2,
        "shape": shape_size * shape_size,
        "saliency": num_classes if class_specific_saliency else 1,
    }
    return {
        name: Head(
            filters,
            head_conv,
            HEATMAP_BIAS if name == "heatmap" else 0.0,
            separable=separable,
            name=prefix + name,
        )
        for name, filters in channels.items()
        if name in ("heatmap", "offset", "size", *mask_heads(mask_factors))
    }
