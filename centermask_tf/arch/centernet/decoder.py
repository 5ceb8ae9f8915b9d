"""Network outputs -> detections: peaks, top-K, boxes, classes, scores and masks, all in-graph.

No box NMS: a 3x3 max-pool over the sigmoid heatmap keeps only local maxima (CenterNet).
Outputs keep a static K; entries past `num_detections` (score below the threshold) are zeroed.
"""

import keras
import tensorflow as tf

from centermask_tf.arch.centernet.network import OUTPUT_STRIDE
from centermask_tf.model.assembly import (
    assemble_box_masks,
    assemble_masks,
    mask_inputs,
    mirror_shape_grids,
)
from centermask_tf.model.heads import mask_heads
from centermask_tf.ops import (
    centre_to_corners,
    flat_index,
    gather_at,
    mean_probability_logits,
    unflatten_index,
)


def _mirror(maps):
    return tf.reverse(maps, axis=[2])


def flip_averaged(outputs, mirrored):
    """Head outputs averaged over an image (`outputs`) and its mirror image (`mirrored`), each
    map flipped back first (CenterNet's flip test).

    - heatmap: the mean of the two probabilities (as CenterNet), returned as logits;
    - size: the mean; offset: dy the mean, dx the mean of dx and 1 - dx' (a centre at column
      x + dx sits at W - x - dx in the mirror image, i.e. at cell W - 1 - x with offset 1 - dx);
    - saliency and dense Shape logits: the mean of the logits, each Shape grid mirrored back.

    `shape_features` is not averaged here (the Shape head runs at the peaks: see
    `flip_averaged_shape`); other keys are kept from `outputs`.
    """
    averaged = dict(outputs)
    back = {name: _mirror(value) for name, value in mirrored.items() if name != "shape_features"}
    averaged["heatmap"] = mean_probability_logits(outputs["heatmap"], back["heatmap"])
    averaged["size"] = 0.5 * (outputs["size"] + back["size"])
    dy, dx = tf.unstack(outputs["offset"], axis=-1)
    dy_back, dx_back = tf.unstack(back["offset"], axis=-1)
    averaged["offset"] = tf.stack([0.5 * (dy + dy_back), 0.5 * (dx + 1.0 - dx_back)], axis=-1)
    if "saliency" in outputs:
        averaged["saliency"] = 0.5 * (outputs["saliency"] + back["saliency"])
    if "shape" in outputs:
        averaged["shape"] = 0.5 * (outputs["shape"] + mirror_shape_grids(back["shape"]))
    return averaged


def flip_averaged_shape(shape_head, features, mirrored_features):
    """`shape_at` for the flip test: the Shape head at the peaks of the image and at the
    mirrored peaks of the mirror image, the latter's grids mirrored back, averaged."""
    width = features.shape[2]

    def shape_at(pixels):
        rows, cols = unflatten_index(pixels, width)
        mirrored_pixels = flat_index(rows, width - 1 - cols, width)
        mirrored = mirror_shape_grids(shape_head.call_at(mirrored_features, mirrored_pixels))
        return 0.5 * (shape_head.call_at(features, pixels) + mirrored)

    return shape_at


@keras.saving.register_keras_serializable(package="centermask")
class CenterMaskDecoder(keras.layers.Layer):
    """Head outputs -> detections (`decode_detections`) with box-relative M x M masks.

    Args:
        max_detections: K peaks kept over all classes.
        score_threshold: peaks below it are not detections.
        mask_size: M, the side of each box-relative mask.
        stride: output stride of the head maps.
        mask_factors: "both", "shape" or "saliency": what each mask is made of.
        assembly: "box" (M x M masks over each box) or "native" (output-map resolution: the
            window of each mask that holds its box, with `mask_boxes`).

    Example:

    >>> decoder = CenterMaskDecoder(max_detections=5, score_threshold=0.1, mask_size=8)
    >>> outputs = {"heatmap": tf.zeros([1, 16, 16, 3]), "offset": tf.zeros([1, 16, 16, 2]),
    ...            "size": tf.ones([1, 16, 16, 2]), "shape": tf.zeros([1, 16, 16, 64]),
    ...            "saliency": tf.zeros([1, 16, 16, 1])}
    >>> decoder(outputs)["masks"].shape
    TensorShape([1, 5, 8, 8])

    With `shape_head` (the network's Shape `Head`) and `outputs["shape_features"]` in place of
    `outputs["shape"]`, the Shape head runs at the K peaks only (`Head.call_at`): the same
    numbers as the dense head, without S*S channels at every location. With `mirrored` (the
    outputs for the mirror images) the two are averaged first (`flip_averaged`).
    """

    def __init__(self, max_detections=100, score_threshold=0.05, mask_size=32, stride=OUTPUT_STRIDE,
                 mask_factors="both", assembly="box", **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.max_detections = max_detections
        self.score_threshold = score_threshold
        self.mask_size = mask_size
        self.stride = stride
        self.mask_factors = mask_factors
        self.assembly = assembly

    @classmethod
    def from_model_config(cls, model_config, **kwargs):
        return cls(model_config.max_detections, model_config.score_threshold, model_config.mask_size,
                   mask_factors=model_config.mask_factors, assembly=model_config.assembly, **kwargs)

    def call(self, outputs, shape_head=None, mirrored=None):
        shape_at = None
        if shape_head is not None and self.mask_factors != "saliency":
            features = outputs["shape_features"]
            if mirrored is None:
                shape_at = lambda pixels: shape_head.call_at(features, pixels)  # noqa: E731
            else:
                shape_at = flip_averaged_shape(shape_head, features, mirrored["shape_features"])
        if mirrored is not None:
            outputs = flip_averaged(outputs, mirrored)
        return decode_detections(
            outputs,
            max_detections=self.max_detections,
            score_threshold=self.score_threshold,
            stride=self.stride,
            mask_mode=self.assembly,
            mask_size=self.mask_size,
            shape_at=shape_at,
            mask_factors=self.mask_factors,
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "max_detections": self.max_detections,
                "score_threshold": self.score_threshold,
                "mask_size": self.mask_size,
                "stride": self.stride,
                "mask_factors": self.mask_factors,
                "assembly": self.assembly,
            }
        )
        return config


def _box_windows(maps, centres):
    """Native masks `[B, K, H, W]` (0 outside each box) -> the window of each map that holds
    its box plus one cell all round, `[B, K, P + 2, P + 2]` with P the largest box extent in
    the batch, and the windows' corners `[B, K, 4]` (ymin, xmin, ymax, xmax) in output pixels.

    Pasting a window into its corners equals pasting the whole map (a bilinear upsampling)
    without a full map per detection: the margin gives the interpolation the neighbours it
    would see, and cells past the map's edge repeat the edge cell, as resizing clamps there.
    """
    height, width = maps.shape[2], maps.shape[3]
    cy, cx, h, w = tf.unstack(centres, axis=-1)
    top = tf.clip_by_value(tf.floor(cy - h / 2), 0.0, height - 1.0) - 1.0
    left = tf.clip_by_value(tf.floor(cx - w / 2), 0.0, width - 1.0) - 1.0
    extent = tf.maximum(tf.math.ceil(cy + h / 2) - top, tf.math.ceil(cx + w / 2) - left) + 1.0
    size = tf.cast(tf.clip_by_value(tf.reduce_max(extent), 3.0, float(max(height, width) + 2)), tf.int32)
    rows = tf.clip_by_value(tf.cast(top, tf.int32)[..., None] + tf.range(size), 0, height - 1)  # [B, K, P + 2]
    cols = tf.clip_by_value(tf.cast(left, tf.int32)[..., None] + tf.range(size), 0, width - 1)
    windows = tf.gather(maps, rows, axis=2, batch_dims=2)  # [B, K, P + 2, W]
    windows = tf.gather(windows, cols, axis=3, batch_dims=2)  # [B, K, P + 2, P + 2]
    span = tf.cast(size, tf.float32)
    return windows, tf.stack([top, left, top + span, left + span], axis=-1)


def decode_detections(
    outputs,
    *,
    max_detections=100,
    score_threshold=0.05,
    stride=4,
    mask_mode="box",
    mask_size=32,
    shape_at=None,
    mask_factors="both",
):
    """Decodes a batch of head outputs.

    Args:
        outputs: dict of head outputs (`heatmap`, `offset`, `size`, `shape`, `saliency`).
        max_detections: K peaks kept over all classes.
        score_threshold: peaks below it are not detections.
        stride: output stride, to express boxes in input pixels.
        mask_mode: "box" for `[B, K, M, M]` box-relative masks, "full" for `[B, K, H/s, W/s]`
            native masks, "native" for the window of each native mask that holds its box
            (`[B, K, P + 2, P + 2]`, P the largest box in output pixels, see `_box_windows`)
            plus `mask_boxes`.
        mask_size: M for the "box" mode.
        shape_at: flattened peak positions `[B, K]` -> shape vectors `[B, K, S*S]`; default:
            gathered from `outputs["shape"]`.
        mask_factors: "both" (Local Shape x saliency), "shape" or "saliency" alone; the
            outputs need only the heads it uses.

    Returns:
        dict with `boxes [B, K, 4]` (ymin, xmin, ymax, xmax) in input pixels, `scores [B, K]`,
        `classes [B, K]` int32 contiguous class indices, `masks` (probabilities),
        `num_detections [B]` int32, `centres [B, K, 4]` (cy, cx, h, w) in output pixels and,
        for "native", `mask_boxes [B, K, 4]`: the corners of each mask window in input pixels
        (paste `masks` into these, not into `boxes`).
    """
    heatmap = tf.sigmoid(tf.cast(outputs["heatmap"], tf.float32))  # [B, H, W, C]
    batch = tf.shape(heatmap)[0]
    height, width, num_classes = heatmap.shape[1], heatmap.shape[2], heatmap.shape[3]
    k = min(max_detections, height * width * num_classes)

    pooled = tf.nn.max_pool2d(heatmap, 3, 1, "SAME")
    peaks = heatmap * tf.cast(tf.equal(pooled, heatmap), tf.float32)
    scores, flat = tf.math.top_k(tf.reshape(peaks, [batch, -1]), k=k)  # [B, K]
    classes = flat % num_classes
    pixels = flat // num_classes
    rows, cols = (tf.cast(v, tf.float32) for v in unflatten_index(pixels, width))

    offset = gather_at(tf.cast(outputs["offset"], tf.float32), pixels)  # [B, K, 2]
    size = tf.nn.relu(gather_at(tf.cast(outputs["size"], tf.float32), pixels))  # [B, K, 2]
    cy = rows + offset[..., 0]
    cx = cols + offset[..., 1]
    centres = tf.stack([cy, cx, size[..., 0], size[..., 1]], axis=-1)  # [B, K, 4]

    shape_vectors, saliency, mask_classes = mask_inputs(
        mask_heads(mask_factors),
        lambda: shape_at(pixels) if shape_at else gather_at(outputs["shape"], pixels),  # [B, K, S*S]
        outputs.get("saliency"), classes,
    )
    keep = tf.cast(scores >= score_threshold, tf.float32)  # sorted, so a prefix
    extra = {}
    if mask_mode == "box":
        masks = assemble_box_masks(shape_vectors, centres, saliency, mask_size, mask_classes)
    elif mask_mode in ("full", "native"):
        masks = assemble_masks(shape_vectors, centres, saliency, mask_classes, map_size=(height, width))
        if mask_mode == "native":
            masks, windows = _box_windows(masks, centres)
            extra["mask_boxes"] = windows * stride * keep[..., None]
    else:
        raise ValueError(f"mask_mode must be 'box', 'full' or 'native', got {mask_mode!r}.")

    boxes = centre_to_corners(centres) * stride
    limits = tf.constant([height, width, height, width], tf.float32) * stride
    boxes = tf.clip_by_value(boxes, 0.0, limits)

    return extra | {
        "boxes": boxes * keep[..., None],
        "scores": scores * keep,
        "classes": classes * tf.cast(keep, tf.int32),
        "masks": masks * keep[..., None, None],
        "num_detections": tf.cast(tf.reduce_sum(keep, axis=1), tf.int32),
        "centres": centres * keep[..., None],
    }
