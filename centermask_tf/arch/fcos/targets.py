"""FCOS training targets (Tian et al., ICCV 2019), in TensorFlow ops for `tf.data`: the first
part of CenterMask-FCOS, which plugs Local Shape + Global Saliency into FCOS.

Every feature-map location of every FPN level (P3-P7, strides 8-128) is a candidate. A location
is positive for a ground-truth box when
- it lies inside the box's centre region: the box's centre +- `centre_radius` x the level's
  stride, clipped to the box ("centre sampling"), and
- the largest of its distances to the box's sides (l, t, r, b) lies in the level's size range
  (P3 [0, 64], P4 [64, 128], P5 [128, 256], P6 [256, 512], P7 [512, inf) input pixels),
and of several such boxes it takes the smallest (by area). Its targets: the box's class, the
distances (l, t, r, b) in input pixels, and centerness sqrt(min(l, r) / max(l, r) *
min(t, b) / max(t, b)).

Locations are listed level by level, row-major, each at (stride // 2 + stride * i) as FCOS
places them; `fcos_locations` returns them with their level's stride and range.

`encode_fcos_targets` is the training-target contract of CenterMask-FCOS (`fcos_target_spec`):
the per-location FCOS targets, the objects' slots (as the CenterNet variant's, for the mask
loss) and the positive locations the mask loss assembles masks at.
"""

import numpy as np
import tensorflow as tf

from centermask_tf.data.instances import object_slots

FCOS_STRIDES = (8, 16, 32, 64, 128)
FCOS_RANGES = ((0.0, 64.0), (64.0, 128.0), (128.0, 256.0), (256.0, 512.0), (512.0, float("inf")))
# FCOS's centre-sampling radius, in strides (the FCOS repository's default, "center_sample: 1.5").
CENTRE_RADIUS = 1.5


def level_sides(input_size, strides=FCOS_STRIDES):
    """(stride, side) of each level's square map: side = ceil(N / stride), the size the FPN's
    stride-2 "same" convolutions give P6 and P7."""
    return [(stride, -(-input_size // stride)) for stride in strides]


def fcos_locations(input_size, strides=FCOS_STRIDES, ranges=FCOS_RANGES):
    """All levels' locations for a square `input_size` canvas.

    Returns:
        (points `[L, 2]` float32 (y, x) in input pixels, strides `[L]` float32, ranges `[L, 2]`
        float32), levels concatenated in order, each row-major.
    """
    points, level_strides, level_ranges = [], [], []
    for (stride, side), size_range in zip(level_sides(input_size, strides), ranges):
        centres = stride // 2 + stride * np.arange(side, dtype=np.float32)
        ys, xs = np.meshgrid(centres, centres, indexing="ij")
        points.append(np.stack([ys.ravel(), xs.ravel()], -1))
        level_strides.append(np.full(side * side, stride, np.float32))
        level_ranges.append(np.tile(np.asarray(size_range, np.float32), (side * side, 1)))
    return np.concatenate(points), np.concatenate(level_strides), np.concatenate(level_ranges)


def fcos_targets(boxes, classes, valid, input_size, strides=FCOS_STRIDES, ranges=FCOS_RANGES,
                 centre_radius=CENTRE_RADIUS):
    """One image's FCOS targets, vectorised over locations x boxes.

    Args:
        boxes: `[M, 4]` (ymin, xmin, ymax, xmax) input pixels (padded slots allowed).
        classes: `[M]` int32 contiguous class indices.
        valid: `[M]` 1 for a real box, 0 for a padded slot.
        input_size: the square canvas side N.

    Returns:
        dict of `[L]`-leading tensors: `labels` int32 (class, -1 for background), `ltrb`
        float32 `[L, 4]` (distances to the matched box's sides, 0 for background),
        `centerness` float32 (0 for background) and `matched` int32 (the box slot, -1).
    """
    points, level_strides, level_ranges = (tf.constant(v) for v in fcos_locations(input_size, strides, ranges))
    boxes = tf.cast(boxes, tf.float32)
    y, x = points[:, 0:1], points[:, 1:2]  # [L, 1]
    ymin, xmin, ymax, xmax = (boxes[None, :, i] for i in range(4))  # [1, M]
    ltrb = tf.stack([x - xmin, y - ymin, xmax - x, ymax - y], axis=-1)  # [L, M, 4]
    # Centre region: the box centre +- radius * stride, clipped to the box.
    cy, cx = (ymin + ymax) / 2, (xmin + xmax) / 2
    reach = centre_radius * level_strides[:, None]
    in_centre = (
        (y > tf.maximum(cy - reach, ymin)) & (y < tf.minimum(cy + reach, ymax))
        & (x > tf.maximum(cx - reach, xmin)) & (x < tf.minimum(cx + reach, xmax))
    )
    extent = tf.reduce_max(ltrb, axis=-1)
    in_range = (extent >= level_ranges[:, 0:1]) & (extent <= level_ranges[:, 1:2])
    candidate = in_centre & in_range & (tf.cast(valid, tf.float32)[None, :] > 0)
    area = (ymax - ymin) * (xmax - xmin)
    area = tf.where(candidate, tf.broadcast_to(area, tf.shape(candidate)), np.inf)
    best = tf.argmin(area, axis=1, output_type=tf.int32)  # smallest box wins; ties: first slot
    positive = tf.reduce_any(candidate, axis=1)
    matched = tf.where(positive, best, -1)
    chosen = tf.gather(ltrb, best, axis=1, batch_dims=1)  # [L, 4]
    chosen = tf.where(positive[:, None], chosen, 0.0)
    left, top, right, bottom = tf.unstack(chosen, axis=-1)
    ratio = (tf.minimum(left, right) / tf.maximum(tf.maximum(left, right), 1e-9)
             * tf.minimum(top, bottom) / tf.maximum(tf.maximum(top, bottom), 1e-9))
    return {
        "labels": tf.where(positive, tf.gather(tf.cast(classes, tf.int32), best), -1),
        "ltrb": chosen,
        "centerness": tf.where(positive, tf.sqrt(tf.maximum(ratio, 0.0)), 0.0),
        "matched": matched,
    }


def num_locations(input_size, strides=FCOS_STRIDES):
    """L, the number of locations over all levels of a square `input_size` canvas."""
    return sum(side * side for _, side in level_sides(input_size, strides))


def fcos_target_spec(input_size, max_instances=128, mask_size=32, mask_samples=64):
    """`tf.TensorSpec`s of one image's CenterMask-FCOS targets (L = `num_locations`, M slots,
    Q = `mask_samples`):

    - `labels` int32 `[L]` class of each location, -1 for background;
    - `ltrb` float32 `[L, 4]` distances to the matched box's sides, input pixels;
    - `centerness` float32 `[L]`;
    - `boxes` float32 `[M, 4]` (ymin, xmin, ymax, xmax) input pixels, `classes` int32 `[M]`,
      `valid` float32 `[M]`, `masks` uint8 `[M, P, P]` (box-relative, as the CenterNet
      variant's), `dropped` int32 `[]`;
    - `sample_locations` int32 `[Q]` positive locations for the mask loss, `sample_slots`
      int32 `[Q]` their object's slot, `sample_valid` float32 `[Q]` 1 for a real sample.
    """
    locations, m, q = num_locations(input_size), max_instances, mask_samples
    return {
        "labels": tf.TensorSpec([locations], tf.int32),
        "ltrb": tf.TensorSpec([locations, 4], tf.float32),
        "centerness": tf.TensorSpec([locations], tf.float32),
        "boxes": tf.TensorSpec([m, 4], tf.float32),
        "classes": tf.TensorSpec([m], tf.int32),
        "valid": tf.TensorSpec([m], tf.float32),
        "masks": tf.TensorSpec([m, mask_size, mask_size], tf.uint8),
        "dropped": tf.TensorSpec([], tf.int32),
        "sample_locations": tf.TensorSpec([q], tf.int32),
        "sample_slots": tf.TensorSpec([q], tf.int32),
        "sample_valid": tf.TensorSpec([q], tf.float32),
    }


def encode_fcos_targets(boxes, classes, masks, is_crowd, *, input_size, max_instances=128, mask_size=32,
                        mask_samples=64):
    """One image's CenterMask-FCOS training targets (`fcos_target_spec`).

    Args:
        boxes, classes, masks, is_crowd: as the CenterNet variant's `encode_targets` takes them.
        input_size: N, the square canvas side.
        max_instances: M object slots; objects beyond are counted in `dropped`.
        mask_size: P, side of the box-relative mask targets.
        mask_samples: Q, positive locations kept for the mask loss: those with the highest
            centerness target (the best-centred first), at most all positives.
    """
    slots, _ = object_slots(boxes, classes, masks, is_crowd, max_instances, mask_size)
    located = fcos_targets(slots["boxes"], slots["classes"], slots["valid"], input_size)
    positive = located["labels"] >= 0
    # Positives rank by centerness (+1, so a positive of centerness 0 still ranks above background).
    k = min(mask_samples, num_locations(input_size))
    rank, chosen = tf.math.top_k(tf.where(positive, located["centerness"] + 1.0, 0.0), k=k)
    rank, chosen = tf.pad(rank, [[0, mask_samples - k]]), tf.pad(chosen, [[0, mask_samples - k]])
    sample_valid = tf.cast(rank > 0, tf.float32)
    targets = slots | {
        "labels": located["labels"],
        "ltrb": located["ltrb"],
        "centerness": located["centerness"],
        "sample_locations": chosen * tf.cast(sample_valid, tf.int32),
        "sample_slots": tf.maximum(tf.gather(located["matched"], chosen), 0),
        "sample_valid": sample_valid,
    }
    spec = fcos_target_spec(input_size, max_instances, mask_size, mask_samples)
    return {key: tf.ensure_shape(value, spec[key].shape) for key, value in targets.items()}
