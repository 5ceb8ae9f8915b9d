"""CenterMask-FCOS's loss terms: FCOS's sigmoid focal classification loss, centerness BCE and
GIoU box loss, the mask BCE at sampled positive locations, and the optional saliency BCE
(`shared_losses`)."""

import tensorflow as tf

from centermask_tf.arch.fcos.network import SALIENCY_STRIDE, shape_at_locations
from centermask_tf.arch.shared_losses import (
    bce,
    check_saliency,
    computed_terms,
    loss_weights,
    output_mask_heads,
    saliency_loss,
    weighted_total,
)
from centermask_tf.model.assembly import assemble_box_masks, mask_inputs
from centermask_tf.ops import corners_to_centre

LOSS_TERMS = ("classification", "centerness", "box", "mask", "saliency")
# RetinaNet/FCOS sigmoid focal loss parameters.
FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0


def giou_loss(predicted, target):
    """1 - GIoU between boxes given as distances (l, t, r, b) from the same location (FCOS's
    box regression), element-wise over leading dims: `[..., 4]` -> `[...]`."""
    pl, pt, pr, pb = tf.unstack(predicted, axis=-1)
    tl, tt, tr, tb = tf.unstack(target, axis=-1)
    predicted_area = (pl + pr) * (pt + pb)
    target_area = (tl + tr) * (tt + tb)
    intersection = (tf.minimum(pl, tl) + tf.minimum(pr, tr)) * (tf.minimum(pt, tt) + tf.minimum(pb, tb))
    union = predicted_area + target_area - intersection
    enclosing = (tf.maximum(pl, tl) + tf.maximum(pr, tr)) * (tf.maximum(pt, tt) + tf.maximum(pb, tb))
    giou = intersection / tf.maximum(union, 1e-9) - (enclosing - union) / tf.maximum(enclosing, 1e-9)
    return 1.0 - giou


def sigmoid_focal_loss(logits, labels):
    """RetinaNet's sigmoid focal loss (alpha 0.25, gamma 2), summed: `[..., C]` logits and
    `[...]` int labels (-1: background, every class negative)."""
    logits = tf.cast(logits, tf.float32)
    truth = tf.one_hot(labels, logits.shape[-1], dtype=tf.float32)  # -1 -> all zeros
    prob = tf.sigmoid(logits)
    p_true = prob * truth + (1.0 - prob) * (1.0 - truth)
    alpha = FOCAL_ALPHA * truth + (1.0 - FOCAL_ALPHA) * (1.0 - truth)
    cross_entropy = tf.nn.sigmoid_cross_entropy_with_logits(labels=truth, logits=logits)
    return tf.reduce_sum(alpha * tf.pow(1.0 - p_true, FOCAL_GAMMA) * cross_entropy)


def _fcos_mask_loss(outputs, targets, boxes, shape_head):
    """BCE of masks assembled at the sampled positive locations (their own Shape vector, their
    object's box and saliency crop) against the objects' box-relative masks, averaged over the
    samples. `boxes`: `[B, M, 4]` (cy, cx, h, w) in saliency-map pixels. The Shape vectors are
    the dense output's at the samples, or `shape_head` run there on `shape_features`
    (`training_network`)."""
    slots = targets["sample_slots"]
    sample_boxes = tf.gather(boxes, slots, batch_dims=1)
    truth = tf.cast(tf.gather(targets["masks"], slots, batch_dims=1), tf.float32)  # [B, Q, P, P]

    def at_samples():
        if "shape_features" in outputs:
            return shape_at_locations(shape_head, outputs["shape_features"], targets["sample_locations"])
        return tf.gather(outputs["shape"], targets["sample_locations"], batch_dims=1)

    classes = tf.gather(targets["classes"], slots, batch_dims=1)
    heads = output_mask_heads(outputs)
    shape_vectors, saliency, classes = mask_inputs(heads, at_samples, outputs.get("saliency"), classes)
    prob = assemble_box_masks(shape_vectors, sample_boxes, saliency, truth.shape[-1], classes)
    per_sample = tf.reduce_mean(bce(prob, truth), axis=[2, 3])
    valid = targets["sample_valid"]
    return tf.reduce_sum(per_sample * valid) / tf.maximum(tf.reduce_sum(valid), 1.0)


def compute_fcos_losses(outputs, targets, weights=None, shape_head=None):
    """CenterMask-FCOS's loss terms and their weighted sum.

    - classification: sigmoid focal loss over every location and class, per positive;
    - centerness: BCE on the positives' centerness logits, per positive;
    - box: 1 - GIoU at the positives, weighted by their centerness targets (FCOS);
    - mask: `_fcos_mask_loss`; saliency: `saliency_loss` when its weight is above 0.

    Args:
        outputs: a `build_fcos_model` network's outputs.
        targets: a batch of `encode_fcos_targets` dicts.
        weights: `LOSS_TERMS` -> weight; missing ones are the config's defaults (FCOS's equal
            weights for its three terms).
        shape_head: the 1x1 Shape conv, for outputs of `training_network` (`shape_features` in
            place of the dense `shape` output).
    """
    weights = {**loss_weights(LOSS_TERMS), **(weights or {})}
    positive = tf.cast(targets["labels"] >= 0, tf.float32)  # [B, L]
    positives = tf.maximum(tf.reduce_sum(positive), 1.0)
    centerness = targets["centerness"]
    centerness_bce = tf.nn.sigmoid_cross_entropy_with_logits(labels=centerness, logits=outputs["centerness"][..., 0])
    giou = giou_loss(tf.cast(outputs["box"], tf.float32), targets["ltrb"])
    corners = targets["boxes"] / SALIENCY_STRIDE  # in saliency-map pixels
    losses = {
        "classification": sigmoid_focal_loss(outputs["classification"], targets["labels"]) / positives,
        "centerness": tf.reduce_sum(centerness_bce * positive) / positives,
        "box": tf.reduce_sum(giou * centerness * positive) / tf.maximum(tf.reduce_sum(centerness * positive), 1e-6),
        "mask": _fcos_mask_loss(outputs, targets, corners_to_centre(corners), shape_head),
    }
    if "saliency" in computed_terms(LOSS_TERMS, weights):
        check_saliency(outputs)
        losses["saliency"] = saliency_loss(outputs, targets, corners)
    return weighted_total(losses, weights)
