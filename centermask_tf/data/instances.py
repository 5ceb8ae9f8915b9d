"""Which annotated objects become training targets, and their masks on a grid over their box:
what every architecture's target encoder and the pipeline's decoding share."""

import tensorflow as tf


def target_instances(boxes, is_crowd, max_instances):
    """The objects that get target slots: not crowd regions (never positives), with a box of
    positive size, the first `max_instances` of them. Returns (their indices, how many
    qualified: the difference is the `dropped` count)."""
    keep = tf.logical_not(is_crowd) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    keep_idx = tf.where(keep)[:, 0]
    return keep_idx[:max_instances], tf.size(keep_idx)


def box_relative_masks(masks, boxes, mask_size):
    """Samples each `[H, W]` mask on a P x P grid of pixel centres spread over its box.

    Sample m sits at ymin + (m + 0.5) / P * h, the same grid `assemble_box_masks` uses;
    `crop_and_resize` places its samples on corners, so the box is shifted accordingly.
    """
    height = tf.cast(tf.shape(masks)[1], tf.float32)
    width = tf.cast(tf.shape(masks)[2], tf.float32)
    ymin, xmin, ymax, xmax = tf.unstack(boxes, axis=-1)
    half_y = 0.5 * (ymax - ymin) / mask_size
    half_x = 0.5 * (xmax - xmin) / mask_size
    crop_boxes = tf.stack(
        [
            (ymin + half_y - 0.5) / tf.maximum(height - 1.0, 1.0),
            (xmin + half_x - 0.5) / tf.maximum(width - 1.0, 1.0),
            (ymax - half_y - 0.5) / tf.maximum(height - 1.0, 1.0),
            (xmax - half_x - 0.5) / tf.maximum(width - 1.0, 1.0),
        ],
        axis=-1,
    )
    crops = tf.image.crop_and_resize(
        masks[..., None],
        crop_boxes,
        tf.range(tf.shape(masks)[0]),
        [mask_size, mask_size],
        extrapolation_value=0.0,
    )
    return tf.cast(crops[..., 0] >= 0.5, tf.uint8)


def padded(values, slots):
    """`values` padded with zeros along the first axis to `slots` entries."""
    extra = slots - tf.shape(values)[0]
    return tf.pad(values, [[0, extra]] + [[0, 0]] * (len(values.shape) - 1))


def object_slots(boxes, classes, masks, is_crowd, max_instances, mask_size):
    """The objects that get target slots (`target_instances`), padded to `max_instances`.

    Args:
        boxes: `[N, 4]` (ymin, xmin, ymax, xmax) in input pixels; classes `[N]`; masks
            `[N, H, W]`; is_crowd `[N]`.
        mask_size: P, the side of the box-relative masks.

    Returns:
        (slots, kept): `slots` with `boxes [M, 4]` float32, `classes [M]` int32, `valid [M]`
        float32 (1 for an object, 0 for padding), `masks [M, P, P]` uint8 and `dropped` (objects
        beyond M); `kept` the indices of the objects in the inputs.
    """
    boxes = tf.reshape(tf.cast(boxes, tf.float32), [-1, 4])
    classes = tf.cast(tf.reshape(classes, [-1]), tf.int32)
    kept, total = target_instances(boxes, tf.cast(tf.reshape(is_crowd, [-1]), tf.bool), max_instances)
    n = tf.size(kept)
    kept_boxes = tf.gather(boxes, kept)
    slots = {
        "boxes": padded(kept_boxes, max_instances),
        "classes": padded(tf.gather(classes, kept), max_instances),
        "valid": padded(tf.ones([n], tf.float32), max_instances),
        "masks": padded(box_relative_masks(tf.gather(masks, kept), kept_boxes, mask_size), max_instances),
        "dropped": total - n,
    }
    return slots, kept
