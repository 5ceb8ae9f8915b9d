"""Ground truth -> training targets, in TensorFlow ops so that it runs inside `tf.data`.

The targets contract (`target_spec`) is the one place that names the keys, shapes and dtypes the
losses read; the pipeline's `element_spec` is tested against it. With `O = input_size / stride`
and `M = max_instances` slots (fixed-size, CenterNet style, so batches have static shapes):

- `heatmap`  float32 `[O, O, C]`  CenterNet Gaussians, max where objects of a class overlap.
- `indices`  int32   `[M]`        flattened centre index y * O + x of each slot.
- `offset`   float32 `[M, 2]`     (dy, dx) sub-pixel centre offset, in [0, 1).
- `size`     float32 `[M, 2]`     (h, w) box size in output pixels.
- `classes`  int32   `[M]`        contiguous class index.
- `valid`    float32 `[M]`        1 for a real object, 0 for padding.
- `masks`    uint8   `[M, P, P]`  the instance mask sampled on a P x P grid over its box
                                  (P = `mask_size`), the grid the mask loss assembles on.
- `map_masks` uint8  `[M, O, O]`  only with `map_masks=True` (`model.assembly: native`): the
                                  instance mask at output-map resolution (4 x 4 pixel blocks,
                                  >= half covered), which the native mask loss compares with.
- `dropped`  int32   `[]`         objects beyond M slots (counted, not a crash).

Instance masks are stored box-relative rather than as full `[M, O, O]` maps: at 512 px and
M = 128 a full map costs 2 MiB per image against 128 KiB, and the box-grid mask loss compares
masks on the box grid anyway; only the native loss needs the maps.
"""

import tensorflow as tf

from centermask_tf.data.instances import object_slots, padded
from centermask_tf.ops import corners_to_centre, flat_index


def target_spec(input_size, num_classes, max_instances=128, mask_size=32, stride=4, map_masks=False):
    """`tf.TensorSpec`s of one image's targets (add a leading batch dim for batches)."""
    out = input_size // stride
    m = max_instances
    extra = {"map_masks": tf.TensorSpec([m, out, out], tf.uint8)} if map_masks else {}
    return extra | {
        "heatmap": tf.TensorSpec([out, out, num_classes], tf.float32),
        "indices": tf.TensorSpec([m], tf.int32),
        "offset": tf.TensorSpec([m, 2], tf.float32),
        "size": tf.TensorSpec([m, 2], tf.float32),
        "classes": tf.TensorSpec([m], tf.int32),
        "valid": tf.TensorSpec([m], tf.float32),
        "masks": tf.TensorSpec([m, mask_size, mask_size], tf.uint8),
        "dropped": tf.TensorSpec([], tf.int32),
    }


def gaussian_radius(height, width, min_overlap=0.7):
    """CenterNet's `gaussian_radius`: the largest centre shift keeping IoU >= min_overlap.

    Reproduces CenterNet's formula as published (the three quadratic cases and their
    `(b + sqrt(b^2 - 4ac)) / 2` roots), which is what CenterNet and CenterMask trained with.
    """
    height = tf.cast(height, tf.float32)
    width = tf.cast(width, tf.float32)
    b1 = height + width
    c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + tf.sqrt(b1**2 - 4 * c1)) / 2
    b2 = 2 * (height + width)
    c2 = (1 - min_overlap) * width * height
    r2 = (b2 + tf.sqrt(b2**2 - 16 * c2)) / 2
    a3 = 4 * min_overlap
    b3 = -2 * min_overlap * (height + width)
    c3 = (min_overlap - 1) * width * height
    r3 = (b3 + tf.sqrt(b3**2 - 4 * a3 * c3)) / 2
    return tf.minimum(tf.minimum(r1, r2), r3)


def _draw_gaussians(centres, radii, classes, out, num_classes):
    """Heatmap `[O, O, C]` with one truncated Gaussian (peak 1) per object, max-merged by class."""
    grid = tf.range(out, dtype=tf.float32)
    dy = grid[None, :] - centres[:, 0:1]  # [N, O]
    dx = grid[None, :] - centres[:, 1:2]  # [N, O]
    sigma = (2.0 * radii + 1.0) / 6.0  # [N]
    two_sigma_sq = (2.0 * sigma**2)[:, None, None]
    gauss = tf.exp(-(dy[:, :, None] ** 2 + dx[:, None, :] ** 2) / two_sigma_sq)  # [N, O, O]
    r = radii[:, None]
    window = (tf.abs(dy) <= r)[:, :, None] & (tf.abs(dx) <= r)[:, None, :]
    gauss = tf.where(window, gauss, 0.0)
    per_class = tf.math.unsorted_segment_max(gauss, classes, num_classes)  # [C, O, O]
    # Classes without objects come back as the lowest float: clamp to 0.
    return tf.transpose(tf.maximum(per_class, 0.0), [1, 2, 0])


def encode_targets(
    boxes,
    classes,
    masks,
    is_crowd,
    *,
    input_size,
    num_classes,
    max_instances=128,
    mask_size=32,
    stride=4,
    min_overlap=0.7,
    map_masks=False,
):
    """Training targets of one image (see the module docstring for the keys).

    Args:
        boxes: `[N, 4]` (ymin, xmin, ymax, xmax) in input pixels.
        classes: `[N]` contiguous class indices in [0, num_classes).
        masks: `[N, input_size, input_size]` instance masks (uint8 or float; >= 0.5 = inside).
        is_crowd: `[N]` crowd flags; crowd regions never become positives.
        input_size: side of the (square) network input.
        num_classes: C.
        max_instances: M slots; objects beyond are dropped and counted in `dropped`.
        mask_size: P, side of the box-relative mask targets.
        stride: network output stride.
        min_overlap: `gaussian_radius` IoU parameter.
        map_masks: also encode `map_masks` (for `model.assembly: native`).
    """
    out = input_size // stride
    slots, keep_idx = object_slots(boxes, classes, masks, is_crowd, max_instances, mask_size)
    n = tf.size(keep_idx)
    boxes, classes = slots["boxes"][:n], slots["classes"][:n]
    sizes = tf.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], axis=-1) / stride
    centres = corners_to_centre(boxes)[:, :2] / stride  # [n, 2] (cy, cx) in output pixels
    centres_int = tf.clip_by_value(tf.floor(centres), 0.0, out - 1.0)
    offsets = centres - centres_int

    radii = tf.maximum(
        0.0, tf.floor(gaussian_radius(tf.math.ceil(sizes[:, 0]), tf.math.ceil(sizes[:, 1]), min_overlap))
    )
    heatmap = _draw_gaussians(centres_int, radii, classes, out, num_classes)

    centres_int = tf.cast(centres_int, tf.int32)
    indices = flat_index(centres_int[:, 0], centres_int[:, 1], out)
    targets = {
        "heatmap": heatmap,
        "indices": padded(indices, max_instances),
        "offset": padded(offsets, max_instances),
        "size": padded(sizes, max_instances),
        **{key: slots[key] for key in ("classes", "valid", "masks", "dropped")},
    }
    if map_masks:
        kept = tf.cast(tf.gather(masks, keep_idx)[..., None], tf.float32)  # [n, N, N, 1]
        at_output = tf.image.resize(kept, [out, out], method="area")[..., 0] >= 0.5
        targets["map_masks"] = padded(tf.cast(at_output, tf.uint8), max_instances)
    spec = target_spec(input_size, num_classes, max_instances, mask_size, stride, map_masks)
    return {key: tf.ensure_shape(value, spec[key].shape) for key, value in targets.items()}
