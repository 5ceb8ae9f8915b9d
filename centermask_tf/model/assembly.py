"""Mask assembly: Local Shape resized onto its box, times the Global Saliency inside the box.

Bilinear resizing and cropping are separable, so for every instance we build two small
interpolation matrices (one per axis; rows = output samples, columns = source cells, "tent"
weights) and apply them as two batched matmuls. This needs no `CropAndResize` (absent from XLA
and from TFLite's builtins), no per-pixel gather, and no Python loop over instances.

Conventions, used everywhere in the package:
- A pixel `i` covers the continuous interval [i, i + 1); its centre is i + 0.5.
- `boxes` are (cy, cx, h, w) in output-map pixels (centre and size).
- Interpolation is done on logits and the sigmoid applied after, i.e.
  mask = sigmoid(resize(shape)) * sigmoid(saliency). The sigmoid placement is unconfirmed
  (docs/paper.md); this is the paper's formula (sigma applied to LocalShape and to the saliency crop).
- Either factor may be left out (`None`): the mask is then the other factor alone, as in the
  paper's Local Shape / Global Saliency ablation (`model.mask_factors`).
"""

import keras
import tensorflow as tf

from centermask_tf.ops import corners_to_centre

# Smallest box side used in divisions, so a degenerate (zero-size) box yields an empty mask
# rather than NaN.
_MIN_SIZE = 1e-6


def tent_weights(coords, size):
    """Bilinear interpolation weights of continuous source positions onto `size` cells.

    Args:
        coords: float tensor `[..., N]` of source positions in cell units (cell j is centred at
            j); positions beyond the first/last cell are clamped to it, as image resizing does.
        size: number of source cells (a Python int or a scalar tensor).

    Returns:
        `[..., N, size]` weights; each row sums to 1.
    """
    coords = tf.clip_by_value(coords, 0.0, tf.cast(size, coords.dtype) - 1.0)
    cells = tf.range(size, dtype=coords.dtype)
    return tf.nn.relu(1.0 - tf.abs(coords[..., None] - cells))


def _paste_axis(centre, extent, num_pixels, cells):
    """Weights that resize `cells` values onto the box along one axis of a `num_pixels` map.

    Returns `([B, K, num_pixels, cells], [B, K, num_pixels])`: the interpolation matrix and a
    0/1 indicator of the pixels whose centres lie inside the box.
    """
    extent = tf.maximum(extent, _MIN_SIZE)
    centres = tf.range(num_pixels, dtype=tf.float32) + 0.5  # [P]
    rel = (centres - (centre - extent / 2.0)[..., None]) / extent[..., None]  # [B, K, P]
    inside = tf.cast((rel >= 0.0) & (rel <= 1.0), tf.float32)
    return tent_weights(rel * cells - 0.5, cells), inside


def _sample_axis(centre, extent, num_samples, num_pixels):
    """Weights that sample a `num_pixels` map at `num_samples` points spread over the box.

    Returns `[B, K, num_samples, num_pixels]`.
    """
    grid = (tf.range(num_samples, dtype=tf.float32) + 0.5) / num_samples  # [M]
    positions = (centre - extent / 2.0)[..., None] + grid * extent[..., None]  # [B, K, M]
    return tent_weights(positions - 0.5, num_pixels)


def shape_cells(shape_logits):
    """S, the side of the Local Shape grid, from the static S*S channel count."""
    cells = int(round(shape_logits.shape[-1] ** 0.5))
    if cells * cells != shape_logits.shape[-1]:
        raise ValueError(
            f"Shape vectors must have S*S channels for an integer S; got {shape_logits.shape[-1]}."
        )
    return cells


def mirror_shape_grids(vectors):
    """Shape vectors `[..., S*S]` with each S x S grid mirrored left-right."""
    cells = shape_cells(vectors)
    grids = tf.reshape(vectors, tf.concat([tf.shape(vectors)[:-1], [cells, cells]], axis=0))
    return tf.reshape(tf.reverse(grids, axis=[-1]), tf.shape(vectors))


def _shape_grid(shape_logits):
    """[B, K, S*S] logits -> [B, K, S, S] float32."""
    cells = shape_cells(shape_logits)
    shape_logits = tf.cast(shape_logits, tf.float32)
    batch, instances = tf.shape(shape_logits)[0], tf.shape(shape_logits)[1]
    return tf.reshape(shape_logits, [batch, instances, cells, cells])


def _instance_saliency(saliency, classes):
    """Saliency logits per instance: `[B, 1, H, W]` (class-agnostic) or `[B, K, H, W]`."""
    channels_first = tf.transpose(saliency, [0, 3, 1, 2])  # [B, Cs, H, W]
    if saliency.shape[-1] == 1:
        return channels_first
    if classes is None:
        raise ValueError(
            "Class-specific saliency (more than one channel) needs the instances' class ids."
        )
    return tf.gather(channels_first, tf.cast(classes, tf.int32), batch_dims=1)


def inside_boxes(boxes, height, width):
    """`[B, K, height, width]` 1 where a map pixel's centre lies in the (cy, cx, h, w) box."""
    cy, cx, h, w = tf.unstack(tf.cast(boxes, tf.float32), axis=-1)
    _, inside_y = _paste_axis(cy, h, height, 1)
    _, inside_x = _paste_axis(cx, w, width, 1)
    return inside_y[..., :, None] * inside_x[..., None, :]


def mask_inputs(heads, shape_vectors, saliency_logits, classes):
    """What the `assemble_*` functions take for masks made of the mask heads `heads` ("shape",
    "saliency" or both): the Local Shape vectors (`shape_vectors()`, called only when used), the
    saliency logits, and the classes that pick a class-specific saliency channel; None where
    unused."""
    vectors = shape_vectors() if "shape" in heads else None
    saliency = saliency_logits if "saliency" in heads else None
    return vectors, saliency, classes if saliency is not None and saliency.shape[-1] > 1 else None


def _check_factors(shape_logits, saliency_logits):
    if shape_logits is None and saliency_logits is None:
        raise ValueError("A mask needs at least one factor: Shape logits, saliency logits or both.")


@tf.function
def assemble_masks(shape_logits, boxes, saliency_logits, classes=None, map_size=None):
    """Full-map masks: `[B, K, H, W]` probabilities, 0 outside each box.

    Args:
        shape_logits: `[B, K, S*S]` Shape-head logits at each instance's centre, or None
            (saliency only).
        boxes: `[B, K, 4]` (cy, cx, h, w) in output pixels.
        saliency_logits: `[B, H, W, Cs]` Saliency-head logits (Cs = 1 or C), or None (Local
            Shape only).
        classes: `[B, K]` class indices; needed only when Cs > 1.
        map_size: (H, W) of the output map; needed only without saliency.
    """
    _check_factors(shape_logits, saliency_logits)
    boxes = tf.cast(boxes, tf.float32)
    if saliency_logits is None:
        if map_size is None:
            raise ValueError("Full-map masks without saliency need map_size=(H, W).")
        height, width = map_size
    else:
        saliency_logits = tf.cast(saliency_logits, tf.float32)
        height, width = tf.shape(saliency_logits)[1], tf.shape(saliency_logits)[2]
    masks = inside_boxes(boxes, height, width)  # [B, K, H, W]
    if shape_logits is not None:
        shape = _shape_grid(shape_logits)  # [B, K, S, S]
        cy, cx, h, w = tf.unstack(boxes, axis=-1)  # each [B, K]
        rows, _ = _paste_axis(cy, h, height, shape.shape[-1])  # [B, K, H, S]
        cols, _ = _paste_axis(cx, w, width, shape.shape[-1])  # [B, K, W, S]
        masks *= tf.sigmoid(tf.matmul(tf.matmul(rows, shape), cols, transpose_b=True))
    if saliency_logits is not None:
        masks *= tf.sigmoid(_instance_saliency(saliency_logits, classes))  # [B, 1 or K, H, W]
    return masks


@tf.function
def assemble_box_masks(shape_logits, boxes, saliency_logits, mask_size, classes=None):
    """Box-relative masks: `[B, K, M, M]` probabilities sampled on an MxM grid over each box.

    The Local Shape is resampled S -> M (the same matrix for every box) and the saliency is
    sampled bilinearly at the grid points; both in logits, then multiplied after the sigmoid.
    Arguments as in `assemble_masks` (either factor may be None); `mask_size` is M (an int).
    """
    _check_factors(shape_logits, saliency_logits)
    boxes = tf.cast(boxes, tf.float32)
    batch, instances = tf.shape(boxes)[0], tf.shape(boxes)[1]
    masks = tf.ones([batch, instances, mask_size, mask_size])
    if shape_logits is not None:
        shape = _shape_grid(shape_logits)  # [B, K, S, S]
        cells = shape.shape[-1]
        grid = (tf.range(mask_size, dtype=tf.float32) + 0.5) * cells / mask_size - 0.5
        resample = tf.broadcast_to(
            tent_weights(grid, cells), [batch, instances, mask_size, cells]
        )  # [B, K, M, S]
        masks *= tf.sigmoid(tf.matmul(tf.matmul(resample, shape), resample, transpose_b=True))
    if saliency_logits is not None:
        saliency_logits = tf.cast(saliency_logits, tf.float32)
        height, width = tf.shape(saliency_logits)[1], tf.shape(saliency_logits)[2]
        cy, cx, h, w = tf.unstack(boxes, axis=-1)
        rows = _sample_axis(cy, h, mask_size, height)  # [B, K, M, H]
        cols = _sample_axis(cx, w, mask_size, width)  # [B, K, M, W]
        saliency = _instance_saliency(saliency_logits, classes)  # [B, 1 or K, H, W]
        if saliency_logits.shape[-1] == 1:
            # One map shared by all instances: fold K into the row axis instead of tiling the map.
            flat_rows = tf.reshape(rows, [batch, instances * mask_size, height])
            partial = tf.matmul(flat_rows, saliency[:, 0])  # [B, K*M, W]
            partial = tf.reshape(partial, [batch, instances, mask_size, width])
        else:
            partial = tf.matmul(rows, saliency)  # [B, K, M, W]
        masks *= tf.sigmoid(tf.matmul(partial, cols, transpose_b=True))  # [B, K, M, M]
    return masks


@tf.function
def paste_masks(box_masks, boxes, height, width):
    """Pastes box-relative mask probabilities onto an image (bilinear, 0 outside the box).

    Args:
        box_masks: `[B, K, M, M]` probabilities, e.g. from `assemble_box_masks`.
        boxes: `[B, K, 4]` (ymin, xmin, ymax, xmax) in the target image's pixels.
        height, width: size of the target image.

    Returns:
        `[B, K, height, width]` probabilities.
    """
    box_masks = tf.cast(box_masks, tf.float32)
    cells = box_masks.shape[-1]
    cy, cx, h, w = tf.unstack(corners_to_centre(tf.cast(boxes, tf.float32)), axis=-1)
    rows, inside_y = _paste_axis(cy, h, height, cells)
    cols, inside_x = _paste_axis(cx, w, width, cells)
    pasted = tf.matmul(tf.matmul(rows, box_masks), cols, transpose_b=True)
    return pasted * inside_y[..., :, None] * inside_x[..., None, :]


@keras.saving.register_keras_serializable(package="centermask")
class MaskAssembly(keras.layers.Layer):
    """Assembles instance masks from Shape vectors, boxes and the Saliency map.

    Always computes in float32 (masks feed a BCE loss and thresholds), also under a mixed
    precision policy.

    Args:
        mode: "full" for `[B, K, H, W]` masks on the saliency map (0 outside the box), or
            "box" for `[B, K, M, M]` masks sampled over each box (used by exports and the loss).
        mask_size: M for the "box" mode.

    Example:

    >>> layer = MaskAssembly(mode="box", mask_size=8)
    >>> masks = layer(tf.zeros([1, 3, 16]), tf.constant([[[4., 4., 4., 4.]] * 3]),
    ...               tf.zeros([1, 8, 8, 1]))
    >>> masks.shape
    TensorShape([1, 3, 8, 8])
    """

    def __init__(self, mode="full", mask_size=32, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if mode not in ("full", "box"):
            raise ValueError(f"MaskAssembly mode must be 'full' or 'box', got {mode!r}.")
        self.mode = mode
        self.mask_size = int(mask_size)

    def call(self, shape_logits, boxes, saliency_logits, classes=None):
        if self.mode == "full":
            return assemble_masks(shape_logits, boxes, saliency_logits, classes)
        return assemble_box_masks(shape_logits, boxes, saliency_logits, self.mask_size, classes)

    def compute_output_shape(
        self, shape_logits_shape, boxes_shape, saliency_logits_shape, classes_shape=None
    ):
        if self.mode == "full":
            return (*shape_logits_shape[:2], *saliency_logits_shape[1:3])
        return (*shape_logits_shape[:2], self.mask_size, self.mask_size)

    def get_config(self):
        config = super().get_config()
        config.update({"mode": self.mode, "mask_size": self.mask_size})
        return config
