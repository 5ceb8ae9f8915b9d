"""Tensor helpers shared by targets, losses, heads and decoding: positions on a feature map as
flat indices, gathering at them, and box conversions.

A position (row, col) on a `[B, H, W, D]` map is the flat index `row * W + col`; boxes are either
corners (ymin, xmin, ymax, xmax) or centres (cy, cx, h, w), always in the last axis.
"""

import tensorflow as tf


def flat_index(rows, cols, width):
    """Flat indices `row * width + col` of integer positions."""
    return rows * width + cols


def unflatten_index(indices, width):
    """(rows, cols) of flat indices on a map `width` wide."""
    return indices // width, indices % width


def gather_at(feature_map, indices):
    """Values of `[B, H, W, D]` at flat positions `[B, K]` -> `[B, K, D]`."""
    batch = tf.shape(feature_map)[0]
    flat = tf.reshape(feature_map, [batch, -1, feature_map.shape[-1]])
    return tf.gather(flat, indices, batch_dims=1)


def centre_to_corners(boxes):
    """`[..., 4]` (cy, cx, h, w) -> (ymin, xmin, ymax, xmax)."""
    cy, cx, h, w = tf.unstack(boxes, axis=-1)
    return tf.stack([cy - h / 2.0, cx - w / 2.0, cy + h / 2.0, cx + w / 2.0], axis=-1)


def corners_to_centre(boxes):
    """`[..., 4]` (ymin, xmin, ymax, xmax) -> (cy, cx, h, w)."""
    ymin, xmin, ymax, xmax = tf.unstack(boxes, axis=-1)
    return tf.stack([(ymin + ymax) / 2.0, (xmin + xmax) / 2.0, ymax - ymin, xmax - xmin], axis=-1)


def mean_probability_logits(logits, other):
    """Logits of the mean of two sigmoid probabilities (the flip test's score averaging)."""
    mean = 0.5 * (tf.sigmoid(logits) + tf.sigmoid(other))
    mean = tf.clip_by_value(mean, 1e-7, 1.0 - 1e-7)
    return tf.math.log(mean) - tf.math.log1p(-mean)
