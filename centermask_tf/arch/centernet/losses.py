"""CenterMask's loss terms: focal heatmap loss, L1 offset/size, mask BCE on masks assembled at
the ground-truth boxes, and the optional per-pixel saliency BCE (`shared_losses`)."""

import tensorflow as tf

from centermask_tf.arch.centernet.network import INTERMEDIATE
from centermask_tf.arch.shared_losses import (
    EPS,
    bce,
    check_saliency,
    computed_terms,
    loss_weights,
    output_mask_heads,
    saliency_loss,
    weighted_total,
)
from centermask_tf.model.assembly import (
    assemble_box_masks,
    assemble_masks,
    inside_boxes,
    mask_inputs,
)
from centermask_tf.ops import centre_to_corners, gather_at, unflatten_index

LOSS_TERMS = ("heatmap", "offset", "size", "mask", "saliency")


def focal_loss(logits, target, normalizer):
    """Penalty-reduced pixel-wise focal loss (CenterNet; alpha = 2, beta = 4).

    Args:
        logits: `[B, H, W, C]` heatmap logits.
        target: `[B, H, W, C]` Gaussian heatmap; exactly 1 at object centres.
        normalizer: number of objects (> 0).
    """
    prob = tf.clip_by_value(tf.sigmoid(tf.cast(logits, tf.float32)), EPS, 1.0 - EPS)
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


def mask_loss(outputs, targets, normalizer, shape_head=None):
    """BCE between masks assembled at the ground-truth boxes and the ground-truth masks.

    The Local Shape vectors are the dense Shape map's at the objects' centres, or, when the
    outputs carry the head's input `shape_features` (`training_network`), `shape_head` run
    there.

    The mask is made of the factors the network has: Local Shape times saliency, or the one of
    them a `mask_factors` shape / saliency network carries. With `map_masks` targets
    (`model.assembly: native`) it is assembled at output-map resolution and compared pixel by
    pixel inside each box; otherwise on the P x P grid of the box-relative `masks`.
    """
    def at_centres():
        if "shape_features" in outputs:
            return shape_head.call_at(outputs["shape_features"], targets["indices"])
        return gather_at(outputs["shape"], targets["indices"])

    shape_vectors, saliency, classes = mask_inputs(
        output_mask_heads(outputs), at_centres, outputs.get("saliency"), targets["classes"]
    )
    _, height, width, _ = outputs["heatmap"].shape
    boxes = ground_truth_boxes(targets, width)
    if "map_masks" in targets:
        prob = assemble_masks(shape_vectors, boxes, saliency, classes, map_size=(height, width))  # [B, M, H, W]
        inside = inside_boxes(boxes, height, width)
        per_pixel = bce(prob, tf.cast(targets["map_masks"], tf.float32)) * inside
        per_instance = tf.reduce_sum(per_pixel, axis=[2, 3]) / tf.maximum(tf.reduce_sum(inside, axis=[2, 3]), 1.0)
    else:
        mask_size = targets["masks"].shape[-1]
        prob = assemble_box_masks(shape_vectors, boxes, saliency, mask_size, classes)  # [B, M, P, P]
        per_instance = tf.reduce_mean(bce(prob, tf.cast(targets["masks"], tf.float32)), axis=[2, 3])
    return tf.reduce_sum(per_instance * targets["valid"]) / normalizer


def compute_losses(outputs, targets, weights=None, shape_head=None):
    """All loss terms and their weighted sum.

    Args:
        outputs: the model's dict of head outputs (batched).
        targets: a batch of `encode_targets` dicts.
        weights: `LOSS_TERMS` -> lambda; missing ones are the config's defaults (the paper's
            1, 1, 0.1, 1, and no saliency supervision).
        shape_head: the Shape `Head`, for outputs of `training_network` (`shape_features` in
            place of the dense `shape` map).

    Returns:
        {"heatmap", "offset", "size", "mask", ["saliency",] "total"} scalar float32 tensors,
        each summed over the stacks of a stacked network.
    """
    weights = {**loss_weights(LOSS_TERMS), **(weights or {})}
    valid = tf.cast(targets["valid"], tf.float32)
    normalizer = tf.maximum(tf.reduce_sum(valid), 1.0)
    # Stacked networks (hourglass104): every stack's heads are supervised and the losses summed.
    stacks = [_stack_losses(stack, targets, weights, valid, normalizer, shape_head)
              for stack in (outputs, *outputs.get(INTERMEDIATE, ()))]
    return weighted_total({name: tf.add_n([stack[name] for stack in stacks]) for name in stacks[0]}, weights)


def _stack_losses(outputs, targets, weights, valid, normalizer, shape_head):
    """The loss terms of one set of head outputs."""
    offset = gather_at(tf.cast(outputs["offset"], tf.float32), targets["indices"])
    size = gather_at(tf.cast(outputs["size"], tf.float32), targets["indices"])
    losses = {
        "heatmap": focal_loss(outputs["heatmap"], targets["heatmap"], normalizer),
        "offset": _masked_l1(offset, targets["offset"], valid, normalizer),
        "size": _masked_l1(size, targets["size"], valid, normalizer),
        "mask": mask_loss(outputs, targets, normalizer, shape_head),
    }
    if "saliency" in computed_terms(LOSS_TERMS, weights):
        check_saliency(outputs)
        width = outputs["saliency"].shape[2]
        losses["saliency"] = saliency_loss(outputs, targets, centre_to_corners(ground_truth_boxes(targets, width)))
    return losses
