"""CenterMask losses: focal heatmap loss, L1 offset/size, mask BCE on assembled masks, and an
optional per-pixel saliency BCE; for CenterMask-FCOS (`compute_fcos_losses`) FCOS's sigmoid
focal classification loss, centerness BCE and GIoU box loss in place of the first three.

Every term is normalised by the number of objects in the batch (at least 1, so an image with no
objects gives finite values) and computed in float32 with clamped logs, so it is also stable when
the network runs in float16.
"""

import tensorflow as tf

from centermask_tf.model.assembly import assemble_box_masks, assemble_masks, inside_boxes, paste_masks
from centermask_tf.model.centermask import INTERMEDIATE
from centermask_tf.model.fcos import SALIENCY_STRIDE
from centermask_tf.ops import centre_to_corners, corners_to_centre, gather_at, unflatten_index

# CenterNet clamps probabilities to [1e-4, 1 - 1e-4] before taking logs.
_EPS = 1e-4

LOSS_NAMES = ("heatmap", "offset", "size", "mask", "saliency")
PAPER_WEIGHTS = {"heatmap": 1.0, "offset": 1.0, "size": 0.1, "mask": 1.0, "saliency": 0.0}
FCOS_LOSS_NAMES = ("classification", "centerness", "box", "mask", "saliency")
# FCOS weighs its three terms equally; the mask term as CenterMask's.
FCOS_WEIGHTS = {"classification": 1.0, "centerness": 1.0, "box": 1.0, "mask": 1.0, "saliency": 0.0}
# RetinaNet/FCOS sigmoid focal loss parameters.
FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0


def loss_names(weights, model_type="centernet"):
    """The terms computed for `weights` and a `model.type`: the saliency BCE only when its
    weight is above 0."""
    names = FCOS_LOSS_NAMES if model_type == "fcos" else LOSS_NAMES
    return [name for name in names if name != "saliency" or weights.get(name, 0.0) > 0]


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


def _bce(prob, truth):
    prob = tf.clip_by_value(prob, _EPS, 1.0 - _EPS)
    return -(truth * tf.math.log(prob) + (1.0 - truth) * tf.math.log(1.0 - prob))


def mask_loss(outputs, targets, normalizer):
    """BCE between masks assembled at the ground-truth boxes and the ground-truth masks.

    The mask is made of the factors the network has: Local Shape times saliency, or the one of
    them a `mask_factors` shape / saliency network carries. With `map_masks` targets
    (`model.assembly: native`) it is assembled at output-map resolution and compared pixel by
    pixel inside each box; otherwise on the P x P grid of the box-relative `masks`.
    """
    saliency = tf.cast(outputs["saliency"], tf.float32) if "saliency" in outputs else None
    shape_vectors = gather_at(outputs["shape"], targets["indices"]) if "shape" in outputs else None
    _, height, width, _ = (outputs.get("saliency", outputs.get("shape"))).shape
    boxes = ground_truth_boxes(targets, width)
    classes = targets["classes"] if saliency is not None and saliency.shape[-1] > 1 else None
    if "map_masks" in targets:
        prob = assemble_masks(shape_vectors, boxes, saliency, classes, map_size=(height, width))  # [B, M, H, W]
        inside = inside_boxes(boxes, height, width)
        bce = _bce(prob, tf.cast(targets["map_masks"], tf.float32)) * inside
        per_instance = tf.reduce_sum(bce, axis=[2, 3]) / tf.maximum(tf.reduce_sum(inside, axis=[2, 3]), 1.0)
    else:
        mask_size = targets["masks"].shape[-1]
        prob = assemble_box_masks(shape_vectors, boxes, saliency, mask_size, classes)  # [B, M, P, P]
        per_instance = tf.reduce_mean(_bce(prob, tf.cast(targets["masks"], tf.float32)), axis=[2, 3])
    return tf.reduce_sum(per_instance * targets["valid"]) / normalizer


def saliency_target(targets, height, width, channels, boxes=None):
    """`[B, H, W, channels]` 0/1 map: the union of the instance masks (one channel per class
    when `channels` > 1): the output-resolution `map_masks` when the targets have them, else
    the box-relative mask targets pasted onto the output map at `boxes` (ymin, xmin, ymax,
    xmax in output pixels; default: the CenterNet targets' boxes)."""
    if "map_masks" in targets:
        inside = tf.cast(targets["map_masks"], tf.float32)
    else:
        if boxes is None:
            boxes = centre_to_corners(ground_truth_boxes(targets, width))
        pasted = paste_masks(tf.cast(targets["masks"], tf.float32), boxes, height, width)  # [B, M, H, W]
        inside = tf.cast(pasted >= 0.5, tf.float32)
    inside *= targets["valid"][..., None, None]
    if channels == 1:
        return tf.reduce_max(inside, axis=1)[..., None]
    # Max over the instances of each (image, class); padding slots go to one extra segment.
    batch, slots = tf.shape(inside)[0], tf.shape(inside)[1]
    segments = tf.range(batch)[:, None] * channels + targets["classes"]
    segments = tf.where(targets["valid"] > 0, segments, batch * channels)
    per_class = tf.math.unsorted_segment_max(
        tf.reshape(inside, [batch * slots, height, width]), tf.reshape(segments, [-1]), batch * channels + 1
    )[:-1]  # [B * C, H, W]; empty segments come back as the lowest float
    per_class = tf.reshape(tf.maximum(per_class, 0.0), [batch, channels, height, width])
    return tf.transpose(per_class, [0, 2, 3, 1])


def saliency_loss(outputs, targets, boxes=None):
    """Per-pixel BCE of the saliency map against `saliency_target`, averaged over pixels."""
    logits = tf.cast(outputs["saliency"], tf.float32)
    _, height, width, channels = logits.shape
    truth = saliency_target(targets, height, width, channels, boxes)
    return tf.reduce_mean(_bce(tf.sigmoid(logits), truth))


def _check_saliency(outputs):
    if "saliency" not in outputs:
        raise ValueError("train.saliency_weight > 0 needs a Saliency head (model.mask_factors both or saliency).")


def compute_losses(outputs, targets, weights=None):
    """All loss terms and their weighted sum.

    Args:
        outputs: the model's dict of head outputs (batched); a CenterMask-FCOS network's go to
            `compute_fcos_losses`.
        targets: a batch of `encode_targets` dicts.
        weights: `LOSS_NAMES` -> lambda; defaults to `PAPER_WEIGHTS` (1, 1, 0.1, 1, and no
            saliency supervision).

    Returns:
        {"heatmap", "offset", "size", "mask", ["saliency",] "total"} scalar float32 tensors,
        each summed over the stacks of a stacked network.
    """
    if "classification" in outputs:
        return compute_fcos_losses(outputs, targets, weights)
    weights = {**PAPER_WEIGHTS, **(weights or {})}
    valid = tf.cast(targets["valid"], tf.float32)
    normalizer = tf.maximum(tf.reduce_sum(valid), 1.0)
    # Stacked networks (hourglass104): every stack's heads are supervised and the losses summed.
    stacks = [_stack_losses(stack, targets, weights, valid, normalizer)
              for stack in (outputs, *outputs.get(INTERMEDIATE, ()))]
    losses = {name: tf.add_n([stack[name] for stack in stacks]) for name in stacks[0]}
    losses["total"] = tf.add_n([weights[name] * value for name, value in losses.items()])
    return losses


def _stack_losses(outputs, targets, weights, valid, normalizer):
    """The loss terms of one set of head outputs."""
    offset = gather_at(tf.cast(outputs["offset"], tf.float32), targets["indices"])
    size = gather_at(tf.cast(outputs["size"], tf.float32), targets["indices"])
    losses = {
        "heatmap": focal_loss(outputs["heatmap"], targets["heatmap"], normalizer),
        "offset": _masked_l1(offset, targets["offset"], valid, normalizer),
        "size": _masked_l1(size, targets["size"], valid, normalizer),
        "mask": mask_loss(outputs, targets, normalizer),
    }
    if "saliency" in loss_names(weights):
        _check_saliency(outputs)
        losses["saliency"] = saliency_loss(outputs, targets)
    return losses


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


def _fcos_mask_loss(outputs, targets, boxes):
    """BCE of masks assembled at the sampled positive locations (their own Shape vector, their
    object's box and saliency crop) against the objects' box-relative masks, averaged over the
    samples. `boxes`: `[B, M, 4]` (cy, cx, h, w) in saliency-map pixels."""
    slots = targets["sample_slots"]
    sample_boxes = tf.gather(boxes, slots, batch_dims=1)
    truth = tf.cast(tf.gather(targets["masks"], slots, batch_dims=1), tf.float32)  # [B, Q, P, P]
    shape_vectors = None
    if "shape" in outputs:
        shape_vectors = tf.gather(outputs["shape"], targets["sample_locations"], batch_dims=1)
    saliency = outputs.get("saliency")
    classes = None
    if saliency is not None and saliency.shape[-1] > 1:
        classes = tf.gather(targets["classes"], slots, batch_dims=1)
    prob = assemble_box_masks(shape_vectors, sample_boxes, saliency, truth.shape[-1], classes)
    per_sample = tf.reduce_mean(_bce(prob, truth), axis=[2, 3])
    valid = targets["sample_valid"]
    return tf.reduce_sum(per_sample * valid) / tf.maximum(tf.reduce_sum(valid), 1.0)


def compute_fcos_losses(outputs, targets, weights=None):
    """CenterMask-FCOS's loss terms and their weighted sum.

    - classification: sigmoid focal loss over every location and class, per positive;
    - centerness: BCE on the positives' centerness logits, per positive;
    - box: 1 - GIoU at the positives, weighted by their centerness targets (FCOS);
    - mask: `_fcos_mask_loss`; saliency: `saliency_loss` when its weight is above 0.

    Args:
        outputs: a `build_fcos_model` network's outputs.
        targets: a batch of `encode_fcos_targets` dicts.
        weights: `FCOS_LOSS_NAMES` -> weight; defaults to `FCOS_WEIGHTS`.
    """
    weights = {**FCOS_WEIGHTS, **(weights or {})}
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
        "mask": _fcos_mask_loss(outputs, targets, corners_to_centre(corners)),
    }
    if "saliency" in loss_names(weights, "fcos"):
        _check_saliency(outputs)
        losses["saliency"] = saliency_loss(outputs, targets, corners)
    losses["total"] = tf.add_n([weights[name] * value for name, value in losses.items()])
    return losses
