"""CenterMask-FCOS outputs -> detections, in-graph: top-K per level, box decoding, class-wise
NMS, then masks assembled as the CenterNet variant's (`assembly.assemble_box_masks`).

At inference the Shape head's 1x1 conv runs at the K kept detections only (`inference_network`
hands the decoder the box tower's features instead of the dense `[B, L, S*S]` Shape output):
the dense output is S*S channels (1,024 at S = 32) at each of the 13,343 locations of an 800-px image.

The outputs have the same keys, shapes and meaning as the CenterNet variant's `decode_detections` (`boxes`,
`scores`, `classes`, `masks`, `num_detections`, `centres`), so evaluation, `detect` and the
exports take either variant unchanged.

NMS is `NonMaxSuppressionV4` (greedy, padded to a static K), which the TFLite converter lowers
to its NON_MAX_SUPPRESSION_V4 builtin (XLA has a kernel for it too); classes are kept apart by
shifting each class's boxes to a region of their own (`class_wise_nms`), so one NMS call per
image serves every class.
"""

import keras
import numpy as np
import tensorflow as tf

from centermask_tf.arch.fcos.network import SALIENCY_STRIDE, shape_at_locations
from centermask_tf.arch.fcos.targets import fcos_locations, level_sides
from centermask_tf.model.assembly import (
    assemble_box_masks,
    mask_inputs,
    mirror_shape_grids,
)
from centermask_tf.model.heads import mask_heads
from centermask_tf.ops import corners_to_centre, mean_probability_logits


def sparse_shape(shape_conv, features, mirrored_features=None, input_size=None):
    """`decode_fcos`'s `shape_at`: the 1x1 Shape conv at the kept locations only. With the mirror
    images' features (the flip test, `input_size` then needed), averaged with the conv at the
    mirroring locations, each grid mirrored back (as `fcos_flip_averaged` averages the dense
    Shape)."""

    def shape_at(locations):
        logits = shape_at_locations(shape_conv, features, locations)
        if mirrored_features is None:
            return logits
        mirroring = tf.gather(mirror_locations(input_size), locations)
        return 0.5 * (logits + mirror_shape_grids(shape_at_locations(shape_conv, mirrored_features, mirroring)))

    return shape_at


def class_wise_nms(boxes, scores, classes, max_output, iou_threshold, score_threshold, extent):
    """Greedy NMS of each image's candidates, suppressing only within a class.

    Args:
        boxes: `[B, T, 4]` (ymin, xmin, ymax, xmax) within [0, extent].
        scores: `[B, T]`; classes: `[B, T]` int32.
        max_output: K, the most boxes kept per image.
        iou_threshold: a box overlapping a kept box of its class by more is suppressed.
        score_threshold: boxes scoring at most this are never kept.
        extent: the largest coordinate (the canvas side); class c's boxes move by c * (extent
            + 1), so boxes of different classes never overlap.

    Returns:
        (`[B, K]` int32 indices into T, highest score first, padded with 0; `[B]` int32 count
        of real entries).
    """
    shifted = boxes + (tf.cast(classes, tf.float32) * (extent + 1.0))[..., None]

    def one_image(args):
        image_boxes, image_scores = args
        selected, count = tf.raw_ops.NonMaxSuppressionV4(
            boxes=image_boxes, scores=image_scores, max_output_size=max_output,
            iou_threshold=iou_threshold, score_threshold=score_threshold, pad_to_max_output_size=True,
        )
        return selected, count

    if shifted.shape[0] is not None:
        # A static batch (the TFLite export's 1, a traced evaluation batch) is unrolled: TFLite's
        # int8 calibrator crashes (SIGSEGV) on the WHILE loop `map_fn` becomes.
        selected, count = zip(*(one_image((shifted[i], scores[i])) for i in range(shifted.shape[0])))
        return tf.stack(selected), tf.stack(count)
    return tf.map_fn(
        one_image, (shifted, scores),
        fn_output_signature=(tf.TensorSpec([max_output], tf.int32), tf.TensorSpec([], tf.int32)),
    )


def mirror_locations(input_size):
    """`[L]` int32: for each location, the location mirroring it left-right within its level."""
    parts, start = [], 0
    for _, side in level_sides(input_size):
        index = np.arange(side * side).reshape(side, side)
        parts.append(start + index[:, ::-1].ravel())
        start += side * side
    return np.concatenate(parts).astype(np.int32)


def fcos_flip_averaged(outputs, mirrored, input_size):
    """FCOS outputs averaged over an image and its mirror image (the flip test):
    classification and centerness as the mean probability, Shape and saliency logits as the
    mean (grids and map mirrored back), and box distances as the mean of the location's own and
    those of the mirrored location, (l, t, r, b) read as (r, t, l, b) and shifted by how far the
    level's grid overhangs the canvas (stride x side - N: 0 unless N is no multiple of the
    stride, e.g. P7 at 800 px), so both describe a box in this image exactly."""
    mirror = mirror_locations(input_size)
    # Entry i of each becomes the mirror image's value at the location mirroring i.
    back = {name: tf.gather(value, mirror, axis=1) for name, value in mirrored.items()
            if name not in ("saliency", "shape_features")}
    averaged = {name: mean_probability_logits(outputs[name], back[name]) for name in ("classification", "centerness")}
    strides = fcos_locations(input_size)[1]
    overhang = tf.constant(strides * np.ceil(input_size / strides) - input_size)  # [L]
    left, top, right, bottom = tf.unstack(back["box"], axis=-1)
    from_mirror = tf.stack([right + overhang, top, left - overhang, bottom], axis=-1)
    averaged["box"] = 0.5 * (outputs["box"] + from_mirror)
    if "shape" in outputs:
        averaged["shape"] = 0.5 * (outputs["shape"] + mirror_shape_grids(back["shape"]))
    if "saliency" in outputs:
        averaged["saliency"] = 0.5 * (outputs["saliency"] + tf.reverse(mirrored["saliency"], axis=[2]))
    return averaged


def _level_candidates(scores, input_size, pre_nms_top_k):
    """The `pre_nms_top_k` best (location, class) pairs of each level: (scores, locations,
    classes), each `[B, T]`, levels concatenated."""
    num_classes = scores.shape[-1]
    batch = tf.shape(scores)[0]
    start, picked = 0, []
    for _, side in level_sides(input_size):
        count = side * side
        flat = tf.reshape(scores[:, start : start + count], [batch, count * num_classes])
        top, index = tf.math.top_k(flat, k=min(pre_nms_top_k, count * num_classes))
        picked.append((top, start + index // num_classes, index % num_classes))
        start += count
    return [tf.concat(parts, axis=1) for parts in zip(*picked)]


def decode_fcos(outputs, *, input_size, max_detections=100, score_threshold=0.05, mask_size=32,
                mask_factors="both", pre_nms_top_k=1000, nms_iou_threshold=0.6, shape_at=None):
    """Decodes a batch of `build_fcos_model` outputs.

    A location's score for a class is sqrt(sigmoid(classification) * sigmoid(centerness))
    (FCOS ranks by the product; the square root keeps it on the classification's scale, as
    later FCOS releases report it). Arguments and returns as `centernet.decoder.decode_detections`
    (box-relative M x M masks); `input_size` is the canvas side N. `shape_at` maps the kept
    location indices `[B, K]` to their Shape logits `[B, K, S*S]` (default: gathered from the
    dense `outputs["shape"]`).
    """
    classification = tf.sigmoid(tf.cast(outputs["classification"], tf.float32))  # [B, L, C]
    centerness = tf.sigmoid(tf.cast(outputs["centerness"], tf.float32))  # [B, L, 1]
    candidates, locations, classes = _level_candidates(
        tf.sqrt(classification * centerness), input_size, pre_nms_top_k
    )
    points = tf.constant(fcos_locations(input_size)[0])  # [L, 2] (y, x)
    y, x = tf.unstack(tf.gather(points, locations), axis=-1)  # [B, T]
    left, top, right, bottom = tf.unstack(tf.gather(tf.cast(outputs["box"], tf.float32), locations, batch_dims=1), axis=-1)
    boxes = tf.clip_by_value(tf.stack([y - top, x - left, y + bottom, x + right], axis=-1), 0.0, float(input_size))

    k = min(max_detections, candidates.shape[1])
    selected, count = class_wise_nms(
        boxes, candidates, classes, k, nms_iou_threshold, score_threshold, float(input_size)
    )
    keep = tf.cast(tf.range(k)[None, :] < count[:, None], tf.float32)  # [B, K]
    boxes = tf.gather(boxes, selected, batch_dims=1)
    scores = tf.gather(candidates, selected, batch_dims=1)
    classes = tf.gather(classes, selected, batch_dims=1)
    locations = tf.gather(locations, selected, batch_dims=1)
    centres = corners_to_centre(boxes) / SALIENCY_STRIDE  # the saliency map's pixels
    if shape_at is None:
        shape_at = lambda at: tf.gather(outputs["shape"], at, batch_dims=1)  # noqa: E731

    shape_vectors, saliency, mask_classes = mask_inputs(
        mask_heads(mask_factors),
        lambda: shape_at(locations),
        outputs.get("saliency"), classes,
    )
    masks = assemble_box_masks(shape_vectors, centres, saliency, mask_size, mask_classes)
    return {
        "boxes": boxes * keep[..., None],
        "scores": scores * keep,
        "classes": classes * tf.cast(keep, tf.int32),
        "masks": masks * keep[..., None, None],
        "num_detections": count,
        "centres": centres * keep[..., None],
    }


@keras.saving.register_keras_serializable(package="centermask")
class FcosDecoder(keras.layers.Layer):
    """CenterMask-FCOS outputs -> detections (`decode_fcos`).

    Args:
        input_size: N, the square canvas side the network runs at.
        max_detections: K, detections kept per image after NMS.
        score_threshold: candidates scoring at most this are not detections.
        mask_size: M, the side of each box-relative mask.
        mask_factors: "both", "shape" or "saliency": what each mask is made of.
        pre_nms_top_k: candidates kept per pyramid level before NMS.
        nms_iou_threshold: class-wise NMS IoU threshold.

    With `mirrored` (the outputs for the mirror images) the two are averaged first
    (`fcos_flip_averaged`). With `shape_head` (the network's 1x1 Shape conv) and
    `outputs["shape_features"]` (`inference_network`'s) in place of `outputs["shape"]`, the
    Shape conv runs at the kept detections only: the same logits as the dense path.

    Example:

    >>> from centermask_tf.arch.fcos.targets import num_locations
    >>> decoder = FcosDecoder(input_size=64, max_detections=5, mask_size=8)
    >>> L = num_locations(64)
    >>> outputs = {"classification": tf.zeros([1, L, 3]), "centerness": tf.zeros([1, L, 1]),
    ...            "box": tf.fill([1, L, 4], 4.0), "shape": tf.zeros([1, L, 64]),
    ...            "saliency": tf.zeros([1, 16, 16, 1])}
    >>> decoder(outputs)["masks"].shape
    TensorShape([1, 5, 8, 8])
    """

    # The constructor's arguments, each named as its `ModelConfig` field.
    _SETTINGS = ("input_size", "max_detections", "score_threshold", "mask_size", "mask_factors",
                 "pre_nms_top_k", "nms_iou_threshold")

    def __init__(self, input_size, max_detections=100, score_threshold=0.05, mask_size=32,
                 mask_factors="both", pre_nms_top_k=1000, nms_iou_threshold=0.6, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.input_size = input_size
        self.max_detections = max_detections
        self.score_threshold = score_threshold
        self.mask_size = mask_size
        self.mask_factors = mask_factors
        self.pre_nms_top_k = pre_nms_top_k
        self.nms_iou_threshold = nms_iou_threshold

    @classmethod
    def from_model_config(cls, model_config, **kwargs):
        return cls(**{name: getattr(model_config, name) for name in cls._SETTINGS}, **kwargs)

    def call(self, outputs, shape_head=None, mirrored=None):
        shape_at = None
        if shape_head is not None and "shape_features" in outputs:
            mirrored_features = None if mirrored is None else mirrored["shape_features"]
            shape_at = sparse_shape(shape_head, outputs["shape_features"], mirrored_features, self.input_size)
        if mirrored is not None:
            outputs = fcos_flip_averaged(outputs, mirrored, self.input_size)
        return decode_fcos(
            outputs, input_size=self.input_size, max_detections=self.max_detections,
            score_threshold=self.score_threshold, mask_size=self.mask_size, mask_factors=self.mask_factors,
            pre_nms_top_k=self.pre_nms_top_k, nms_iou_threshold=self.nms_iou_threshold, shape_at=shape_at,
        )

    def get_config(self):
        return {**super().get_config(), **{name: getattr(self, name) for name in self._SETTINGS}}
