"""CenterMask losses: focal heatmap loss, L1 offset/size, and mask BCE on assembled masks.

Every term is normalised by the number of objects in the batch (at least 1, so an image with no
objects gives finite values) and computed in float32 with clamped logs, so it is also stable when
the network runs in float16.
"""

import tensorflow as tf

from centermask_tf.model.assembly import assemble_box_masks
from centermask_tf.ops import gather_at, unflatten_index

# CenterNet clamps probabilities to [1e-4, 1 - 1e-4] before taking logs.
_EPS = 1e-4

LOSS_NAMES = ("heatmap", "offset", "size", "mask")


def focal_loss(logits, target, normalizer):
    """Penalty-reduced pixel-wise focal loss (CenterNet; alpha = 2, beta = 4).

    Args:
        logits: `[B, H, W, C]` heatmap logits.
        target: `[B, H, W, C]` Gaussian heatmap; exactly 1 at object centres.
        normalizer: number of objects (> 0).
    """
    prob = tf.clip_by_value(tf.sigmoid(tf.cast(logits, tf.float32)), _EPS, 1.0 - _EPS)
    positive = tf.cast(tf.equal(target, 1.0), tf.float32)
    pos_loss = tf.math.log(prob) * tf.square(1.0 - prob) * positive
    neg_loss = tf.math.log(1.0 - prob) * tf.square(prob) * tf.pow(1.0 - target, 4.0) * (1.0 - positive)
    return -(tf.reduce_sum(pos_loss) + tf.reduce_sum(neg_loss)) / normalizer


def _masked_l1(prediction, target, valid, normalizer):
    return tf.reduce_sum(tf.abs(prediction - target) * valid[..., None]) / normalizer


def ground_truth_boxes(targets, output_width):
    """(cy, cx, h, w) in output pixels of every target slot: centre cell + offset, size."""
    rows, cols = unflatten_index(targets["indices"], output_width)
    centre = tf.cast(tf.stack([rows, cols], axis=-1), tf.float32) + targets["offset"]
    return tf.concat([centre, targets["size"]], axis=-1)  # [B, M, 4]


def mask_loss(outputs, targets, normalizer):
    """BCE between masks assembled at the ground-truth boxes and the box-relative GT masks."""
    saliency = tf.cast(outputs["saliency"], tf.float32)
    shape_vectors = gather_at(tf.cast(outputs["shape"], tf.float32), targets["indices"])
    boxes = ground_truth_boxes(targets, saliency.shape[2] or tf.shape(saliency)[2])
    mask_size = targets["masks"].shape[-1]
    classes = targets["classes"] if saliency.shape[-1] > 1 else None
    prob = assemble_box_masks(shape_vectors, boxes, saliency, mask_size, classes)  # [B, M, P, P]
    prob = tf.clip_by_value(prob, _EPS, 1.0 - _EPS)
    truth = tf.cast(targets["masks"], tf.float32)
    bce = -(truth * tf.math.log(prob) + (1.0 - truth) * tf.math.log(1.0 - prob))
    per_instance = tf.reduce_mean(bce, axis=[2, 3])  # [B, M]
    return tf.reduce_sum(per_instance * targets["valid"]) / normalizer


def compute_losses(outputs, targets, weights=None):
    """All loss terms and their weighted sum.

    Args:
        outputs: the model's dict of head outputs (batched).
        targets: a batch of `encode_targets` dicts.
        weights: {"heatmap", "offset", "size", "mask"} -> lambda; defaults to the paper's
            1, 1, 0.1, 1.

    Returns:
        {"heatmap", "offset", "size", "mask", "total"} scalar float32 tensors.
    """
    weights = weights or {"heatmap": 1.0, "offset": 1.0, "size": 0.1, "mask": 1.0}
    valid = tf.cast(targets["valid"], tf.float32)
    normalizer = tf.maximum(tf.reduce_sum(valid), 1.0)
    offset = gather_at(tf.cast(outputs["offset"], tf.float32), targets["indices"])
    size = gather_at(tf.cast(outputs["size"], tf.float32), targets["indices"])
    losses = {
        "heatmap": focal_loss(outputs["heatmap"], targets["heatmap"], normalizer),
        "offset": _masked_l1(offset, targets["offset"], valid, normalizer),
        "size": _masked_l1(size, targets["size"], valid, normalizer),
        "mask": mask_loss(outputs, targets, normalizer),
    }
    losses["total"] = tf.add_n([weights[name] * losses[name] for name in LOSS_NAMES])
    return losses
