"""COCO evaluation: detections in the COCO results format and pycocotools bbox/segm AP.

    centermask evaluate --config configs/shapes_tiny.yaml --workdir work/demo

writes `workdir/eval/detections.json` (the dataset's own category ids, RLE masks at original
image size: what the COCO evaluation server accepts) and `workdir/eval/metrics.json`
(`{"bbox": {"AP", "AP50", "AP75", "APs", "APm", "APl"}, "segm": {...}}`).
"""

import contextlib
import io
import logging
import os
from typing import NamedTuple

import keras
import numpy as np
import pycocotools.mask as mask_utils
import tensorflow as tf
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from centermask_tf.config import ConfigError
from centermask_tf.data.coco import index_coco, load_annotations
from centermask_tf.files import write_json
from centermask_tf.timing import Stopwatch

logger = logging.getLogger("centermask_tf.evaluation")

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


class InstanceMask(NamedTuple):
    """A binary instance mask stored as the crop of its box: `crop` covers rows
    `top:top + crop.shape[0]` and columns `left:left + crop.shape[1]` of the image; every pixel
    outside is 0. A full-size mask per detection of a 50-megapixel photo would not fit memory."""

    top: int
    left: int
    crop: np.ndarray

    def full(self, height, width):
        """The mask at full image size, uint8 and Fortran-ordered as pycocotools encodes it."""
        mask = np.zeros((height, width), np.uint8, order="F")
        mask[self.top : self.top + self.crop.shape[0], self.left : self.left + self.crop.shape[1]] = self.crop
        return mask


def _paste_weights(start, end, first, counts, cells):
    """Bilinear weights that resize `cells` values onto each of n spans [start, end), for the
    `counts[k]` pixels of span k from pixel `first[k]` on (`model.assembly.paste_masks`'s
    geometry), all spans' pixels concatenated: `[sum(counts), cells]`, and where each span's
    rows start. Pixels whose centre lies outside their span get zero weights, and `[sum(counts)]`
    says which lie inside."""
    offsets = np.concatenate([[0], np.cumsum(counts)])
    span = np.repeat(np.arange(len(counts)), counts)
    pixel = np.arange(offsets[-1]) - offsets[span] + first[span]
    rel = (pixel + 0.5 - start[span]) / np.maximum(end - start, 1e-6)[span]
    inside = (rel >= 0.0) & (rel <= 1.0)
    coords = np.clip(rel * cells - 0.5, 0.0, cells - 1.0)
    weights = np.maximum(0.0, 1.0 - np.abs(coords[:, None] - np.arange(cells)))
    return (weights * inside[:, None]).astype(np.float32), offsets, inside


def paste_instances(box_masks, boxes, height, width, threshold):
    """Box-relative `[n, M, M]` mask probabilities pasted (bilinear, as `paste_masks`) into
    their boxes `[n, 4]` (ymin, xmin, ymax, xmax, image pixels) and thresholded, each kept as
    the crop of its box (`InstanceMask`). Only each box's own pixels are computed: the weights
    of every box's rows and columns at once, then two small matmuls per detection (padding
    detections to a common size cost 4x more on COCO-sized boxes). Each crop is computed
    column by column, the order RLE encoding reads."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    box_masks = np.asarray(box_masks, np.float32)
    limits = np.array([height, width], np.float32)
    first = np.clip(np.floor(boxes[:, :2]), 0, limits - 1).astype(np.int64)  # top, left
    spans = np.maximum(np.clip(np.ceil(boxes[:, 2:]), 0, limits).astype(np.int64) - first, 0)
    cells = box_masks.shape[-1]
    row_weights, row_at, in_rows = _paste_weights(boxes[:, 0], boxes[:, 2], first[:, 0], spans[:, 0], cells)
    col_weights, col_at, in_cols = _paste_weights(boxes[:, 1], boxes[:, 3], first[:, 1], spans[:, 1], cells)
    masks = []
    for k, (top, left) in enumerate(first.tolist()):
        rows, cols = slice(row_at[k], row_at[k + 1]), slice(col_at[k], col_at[k + 1])
        crop = (col_weights[cols] @ box_masks[k].T @ row_weights[rows].T) >= threshold  # [cols, rows]
        if threshold <= 0:  # outside the span the product is 0: only a threshold of 0 keeps it
            crop &= in_cols[cols, None] & in_rows[None, rows]
        masks.append(InstanceMask(top, left, crop.T))
    return masks


def encode_instances(masks, height, width):
    """COCO compressed RLEs of `InstanceMask`s in a `height` x `width` image, from the crops
    alone: the crop's runs in column-major order, split where a column ends inside the image,
    shifted to image positions, compressed by pycocotools. Equal to `pycocotools.mask.encode`
    of the full masks without making or scanning a full-size mask per detection."""
    uncompressed = []
    for mask in masks:
        rows, cols = mask.crop.shape
        flat = mask.crop.T.reshape(-1)  # column-major (a view of `paste_instances`' crops)
        bounds = np.zeros(0, np.int64)
        if flat.size:
            edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1  # run starts and ends, alternating
            if flat[0]:
                edges = np.concatenate([[0], edges])
            if flat[-1]:
                edges = np.append(edges, flat.size)
            if rows < height and cols > 1:  # a run over a column's end stops there in the image
                boundaries = np.arange(1, cols) * rows
                crossing = boundaries[flat[boundaries - 1] & flat[boundaries]]
                edges = np.sort(np.concatenate([edges, crossing, crossing]))
            starts, last = edges[0::2], edges[1::2] - 1  # last: each run's final pixel
            bounds = np.empty(edges.size, np.int64)
            bounds[0::2] = (mask.left + starts // rows) * height + mask.top + starts % rows
            bounds[1::2] = (mask.left + last // rows) * height + mask.top + last % rows + 1
        counts = np.diff(np.concatenate([[0], bounds, [height * width]]))
        if len(counts) > 1 and counts[-1] == 0:  # a mask running to the last pixel has no final zeros
            counts = counts[:-1]
        uncompressed.append({"size": [height, width], "counts": counts.tolist()})
    return mask_utils.frPyObjects(uncompressed, height, width) if uncompressed else []


def to_original_image(detections, index, scale, original_size, mask_threshold):
    """One image's detections mapped back to its original pixels.

    Args:
        detections: a batch from a detector (numpy or tensors).
        index: the image's position in the batch.
        scale: input pixels per original pixel (the image sits at the canvas's top-left).
        original_size: (height, width).
        mask_threshold: probability above which a pixel belongs to the instance.

    Returns:
        dict with `boxes` [n, 4] (ymin, xmin, ymax, xmax), `scores` [n], `classes` [n]
        (contiguous indices), `masks` (n `InstanceMask`s) and `size` (height, width).
    """
    n = int(detections["num_detections"][index])
    height, width = (int(v) for v in original_size)
    boxes = np.asarray(detections["boxes"][index, :n]) / float(scale)
    boxes = np.clip(boxes, 0.0, [height, width, height, width])
    masks = np.asarray(detections["masks"][index, :n], np.float32)
    return {
        "boxes": boxes,
        "scores": np.asarray(detections["scores"][index, :n]),
        "classes": np.asarray(detections["classes"][index, :n]),
        "masks": paste_instances(masks, mask_boxes(detections, index, n, scale, boxes), height, width, mask_threshold),
        "size": (height, width),
    }


def mask_boxes(detections, index, n, scale, boxes):
    """Where an image's `n` masks are pasted, in its own pixels: their boxes, or for native
    assembly the windows the decoder cut around them (`mask_boxes`, canvas pixels)."""
    if "mask_boxes" not in detections:
        return boxes
    return np.asarray(detections["mask_boxes"][index, :n], np.float32) / float(scale)


def coco_results(image_id, result, category_ids):
    """COCO results-format dicts for one image (category ids from the dataset's file)."""
    entries = []
    rles = encode_instances(result["masks"], *result["size"])
    for box, score, cls, rle in zip(result["boxes"], result["scores"], result["classes"], rles):
        ymin, xmin, ymax, xmax = (float(v) for v in box)
        entries.append(
            {
                "image_id": int(image_id),
                "category_id": int(category_ids[int(cls)]),
                "bbox": [round(xmin, 3), round(ymin, 3), round(xmax - xmin, 3), round(ymax - ymin, 3)],
                "score": round(float(score), 5),
                "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")},
            }
        )
    return entries


def _coco_library(backend):
    """The (COCO, COCOeval) classes of `eval.backend`."""
    if backend == "pycocotools":
        return None, COCOeval
    try:
        from faster_coco_eval import COCO as FasterCOCO
        from faster_coco_eval import COCOeval_faster
    except ImportError:
        raise ConfigError(
            "eval.backend=faster_coco_eval needs the faster-coco-eval package: "
            ".venv/bin/pip install -e '.[fast-eval]' (or set eval.backend=pycocotools)."
        ) from None
    return FasterCOCO, COCOeval_faster


def coco_metrics(annotations, detections, image_ids, backend="pycocotools", annotation_ids=None, timer=None):
    """COCO bbox and segm stats on `image_ids`, with pycocotools' COCOeval or (`backend`
    "faster_coco_eval") faster-coco-eval's, which gives the same numbers faster.

    The ground truth is the annotations in `annotation_ids` (None: every annotation of the
    file): the ones the dataset build kept. A malformed segmentation would crash COCOeval, and
    a skipped one is never trained on. `timer` (a `timing.Stopwatch`) adds the seconds of
    "ground_truth" and "coco_eval".

    Returns:
        {"bbox": {name: value}, "segm": {name: value}} with `METRIC_NAMES`; 0.0 throughout
        when there are no detections.
    """
    coco_class, evaluator_class = _coco_library(backend)
    timer = timer or Stopwatch()
    with timer("ground_truth"):
        full = load_annotations(annotations)
        if annotation_ids is not None:
            kept = set(int(i) for i in annotation_ids)
            full.dataset["annotations"] = [a for a in full.dataset["annotations"] if a["id"] in kept]
        data = full.dataset
        if coco_class is None:
            ground_truth = index_coco(data)
        else:
            ground_truth = coco_class()
            ground_truth.dataset = data
            ground_truth.createIndex()
    metrics = {}
    for iou_type in ("bbox", "segm"):
        if not detections:
            metrics[iou_type] = {name: 0.0 for name in METRIC_NAMES}
            continue
        with contextlib.redirect_stdout(io.StringIO()) as printed, timer("coco_eval"):
            results = ground_truth.loadRes(detections)
            evaluator = evaluator_class(ground_truth, results, iou_type)
            evaluator.params.imgIds = sorted(image_ids)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        summary = [line for line in printed.getvalue().splitlines() if line.startswith(" Average")]
        logger.debug("%s:\n%s", iou_type, "\n".join(summary))
        metrics[iou_type] = {name: float(max(v, 0.0)) for name, v in zip(METRIC_NAMES, evaluator.stats)}
    return metrics


def evaluate_detector(detect, builder, config, output_dir=None, max_images=None, timer=None):
    """Runs a detector over the validation split and computes COCO metrics.

    Args:
        detect: letterboxed images `[B, N, N, 3]` -> decoded detections (`CenterMask`'s
            `detect_canvases`, or an exported artifact's `export.runtime` detector).
        builder: the prepared TFDS builder (with a `val` split).
        config: the full `Config`.
        output_dir: where to write detections.json and metrics.json (None: not written).
        max_images: evaluate at most this many images.
        timer: a `timing.Stopwatch` that gets the seconds of each stage: "input" (reading and
            letterboxing), "detect", "paste" (masks to image pixels), "encode" (RLE and
            results), "ground_truth" and "coco_eval".

    Returns:
        The metrics dict.
    """
    from centermask_tf.data.pipeline import eval_dataset

    if "val" not in builder.info.splits:
        raise ConfigError("Evaluation needs data.val.annotations and data.val.images in the config.")
    dataset = eval_dataset(
        builder, input_size=config.model.input_size, batch_size=config.eval.batch_size, max_images=max_images
    )
    total = builder.info.splits["val"].num_examples
    if max_images:
        total = min(total, max_images)
    category_ids = [c["id"] for c in builder.info.metadata["categories"]]
    detections, image_ids, annotation_ids = [], [], []
    timer = timer or Stopwatch()
    batches = iter(dataset)
    # disable=None: no bar when stderr is not a terminal (a log file would get one per update).
    with tqdm(total=total, desc="evaluate", unit="img", leave=False, disable=None) as progress:
        while True:
            with timer("input"):
                images, info = next(batches, (None, None))
                if images is None:
                    break
                info = {k: v.flat_values.numpy() if k == "annotation_ids" else v.numpy() for k, v in info.items()}
            with timer("detect"):
                batch = {k: np.asarray(v) for k, v in detect(images).items()}
            for i, image_id in enumerate(info["image_id"]):
                with timer("paste"):
                    result = to_original_image(
                        batch, i, info["scale"][i], info["original_size"][i], config.model.mask_threshold
                    )
                with timer("encode"):
                    detections.extend(coco_results(image_id, result, category_ids))
                image_ids.append(int(image_id))
            annotation_ids.extend(info["annotation_ids"].tolist())
            progress.update(len(images))
    metrics = coco_metrics(
        builder.builder_config.splits["val"][0], detections, image_ids, config.eval.backend, annotation_ids, timer
    )
    if output_dir:
        write_json(os.path.join(output_dir, "detections.json"), detections, indent=None)
        write_json(os.path.join(output_dir, "metrics.json"), metrics)
    return metrics


# Validation images shown in TensorBoard at each evaluation, and the score they are drawn from.
IMAGE_SAMPLES = 4
IMAGE_SCORE = 0.3


class CocoEvalCallback(keras.callbacks.Callback):
    """Runs COCO evaluation every `every` epochs; adds `val_bbox_AP` and `val_segm_AP` to the
    epoch logs (so TensorBoard, the CSV log and checkpointing see them) and writes
    `eval/epoch_NNN.json`. Between evaluations the last values are repeated.

    At each evaluation it also writes `logs/images`: for the first `IMAGE_SAMPLES` validation
    images, the detections (masks, boxes, class names) beside the Global Saliency map (when the
    network has one), as the
    TF Object Detection API's side-by-side evaluation images."""

    def __init__(self, detector, builder, config, workdir, every, last=None):
        super().__init__()
        self.detector = detector
        self.builder = builder
        self.config = config
        self.workdir = workdir
        self.every = every
        # A resumed run repeats the values of its last committed epoch until it evaluates again;
        # one that never evaluated logs none (a made-up 0 would become the best checkpoint).
        last = last or {}
        self.last = {name: float(last[name]) for name in ("val_bbox_AP", "val_segm_AP") if name in last}
        self._samples = self._writer = None

    def on_epoch_end(self, epoch, logs=None):
        from centermask_tf.training import averaged_weights

        last_epoch = epoch + 1 == self.params.get("epochs")
        if (epoch + 1) % self.every == 0 or last_epoch:
            with averaged_weights(self.model):
                metrics = evaluate_detector(
                    self.detector.detect_canvases, self.builder, self.config, max_images=self.config.eval.max_images
                )
                self._log_images(epoch + 1)
            self.last = {"val_bbox_AP": metrics["bbox"]["AP"], "val_segm_AP": metrics["segm"]["AP"]}
            write_json(os.path.join(self.workdir, "eval", f"epoch_{epoch + 1:03d}.json"), metrics)
            print(f"\nepoch {epoch + 1}: bbox AP {self.last['val_bbox_AP']:.3f}, segm AP {self.last['val_segm_AP']:.3f}")
        if logs is not None:
            logs.update(self.last)

    def _log_images(self, step):
        from centermask_tf.data.pipeline import eval_dataset
        from centermask_tf.predict import draw_overlay

        if self._samples is None:  # the same images at every evaluation
            size = self.config.model.input_size
            self._samples, _ = next(iter(eval_dataset(self.builder, input_size=size, batch_size=IMAGE_SAMPLES)))
            self._writer = tf.summary.create_file_writer(os.path.join(self.workdir, "logs", "images"))
        canvases = self._samples
        size = canvases.shape[1]
        detections = {k: np.asarray(v) for k, v in self.detector.detect_canvases(canvases).items()}
        shown = (detections["scores"] >= IMAGE_SCORE).sum(axis=1)
        detections["num_detections"] = np.minimum(detections["num_detections"], shown)
        outputs = self.detector.network(canvases, training=False)
        saliency = None
        if "saliency" in outputs:  # a mask_factors=shape network has none
            saliency = tf.sigmoid(outputs["saliency"])
            saliency = tf.image.resize(tf.reduce_max(saliency, axis=-1, keepdims=True), [size, size])  # [B, N, N, 1]
        names = [c["name"] for c in self.detector.categories]
        panels = []
        for i, canvas in enumerate(np.asarray(tf.cast(tf.round(canvases), tf.uint8))):
            result = to_original_image(detections, i, 1.0, (size, size), self.config.model.mask_threshold)
            panel = [np.asarray(draw_overlay(canvas, result, names))]
            if saliency is not None:
                panel.append(np.repeat(np.asarray(saliency[i] * 255.0).astype(np.uint8), 3, axis=-1))
            panels.append(np.concatenate(panel, axis=1))
        with self._writer.as_default():
            tf.summary.image("validation/detections_and_saliency", np.stack(panels), step=step, max_outputs=IMAGE_SAMPLES)
        self._writer.flush()
