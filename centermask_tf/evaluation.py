"""COCO evaluation: detections in the COCO results format and pycocotools bbox/segm AP.

    centermask evaluate --config configs/shapes_tiny.yaml --workdir work/demo

writes `workdir/eval/detections.json` (the dataset's own category ids, RLE masks at original
image size: what the COCO evaluation server accepts) and `workdir/eval/metrics.json`:
`{"bbox": {"AP", "AP50", "AP75", "APs", "APm", "APl", "per_category"}, "segm": {...},
"best_f1_score_threshold"}`, where `per_category` lists `{"id", "name", "AP", "AP50", "AP75",
"AR100", "instances"}` for each category of the file (AP null for one without ground truth).
With matplotlib (the `plots` extra) it also draws `workdir/eval/plots/` (`diagnostics.py`).
"""

import contextlib
import io
import json
import logging
import os

import numpy as np
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from centermask_tf import diagnostics
from centermask_tf.coco_results import CocoResults, collector_paused
from centermask_tf.config import ConfigError
from centermask_tf.data.coco import index_coco, load_annotations
from centermask_tf.data.pipeline import decode_example, eval_dataset
from centermask_tf.errors import MissingError
from centermask_tf.files import remove_stale_temporaries, write_json
from centermask_tf.inference import ImageDetector
from centermask_tf.postprocess import coco_columns
from centermask_tf.tiling import check_tiling
from centermask_tf.timing import Stopwatch

logger = logging.getLogger("centermask_tf.evaluation")

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
IOU_TYPES = ("bbox", "segm")


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


def _per_category(evaluator, categories, instances):
    """`per_category` rows from an accumulated COCOeval: its precision `[T, R, K, A, M]` and
    recall `[T, K, A, M]` at area "all" and 100 detections, -1 where a category has no ground
    truth (null here)."""
    precision, recall = evaluator.eval["precision"], evaluator.eval["recall"]
    thresholds = list(np.round(evaluator.params.iouThrs, 2))

    def mean(values):
        values = values[values > -1]
        return float(values.mean()) if values.size else None

    names = {c["id"]: c["name"] for c in categories}
    rows = []
    for k, category_id in enumerate(evaluator.params.catIds):
        rows.append({
            "id": int(category_id), "name": names[category_id],
            "AP": mean(precision[:, :, k, 0, -1]),
            "AP50": mean(precision[thresholds.index(0.5), :, k, 0, -1]),
            "AP75": mean(precision[thresholds.index(0.75), :, k, 0, -1]),
            "AR100": mean(recall[:, k, 0, -1]),
            "instances": instances.get(category_id, 0),
        })
    return rows


def _instances(data, image_ids):
    """Ground-truth objects per category on `image_ids` (crowd regions are not objects)."""
    wanted = set(image_ids)
    counts = {}
    for a in data["annotations"]:
        if a["image_id"] in wanted and not a.get("iscrowd", 0):
            counts[a["category_id"]] = counts.get(a["category_id"], 0) + 1
    return counts


def coco_metrics(annotations, detections, image_ids, backend="pycocotools", annotation_ids=None, timer=None,
                 plots_dir=None):
    """COCO bbox and segm stats on `image_ids`, overall and per category, with pycocotools'
    COCOeval or (`backend` "faster_coco_eval") faster-coco-eval's, which gives the same numbers
    faster.

    The ground truth is the annotations in `annotation_ids` (None: every annotation of the
    file): the ones the dataset build kept. A malformed segmentation would crash COCOeval, and
    a skipped one is never trained on. `detections`: a `CocoResults` or a list of COCO result
    dicts. `timer` (a `timing.Stopwatch`) adds the seconds of "ground_truth", "results" (the
    dicts the COCO library reads, made from a `CocoResults`), "coco_eval" and "diagnostics".
    `plots_dir`: where to draw the diagnostic plots (`diagnostics.py`); only then is the
    best-F1 score threshold computed.

    Returns:
        {"bbox": {name: value, "per_category": [...]}, "segm": {...},
        "best_f1_score_threshold": float or None} with `METRIC_NAMES`; 0.0 throughout when
        there are no detections.
    """
    coco_class, evaluator_class = _coco_library(backend)
    timer = timer or Stopwatch()
    with timer("ground_truth"), collector_paused():
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
    with timer("results"), collector_paused():
        detections = list(detections)
    metrics, evaluators = {}, {}
    instances = _instances(data, image_ids)
    for iou_type in IOU_TYPES:
        if not detections:
            metrics[iou_type] = {name: 0.0 for name in METRIC_NAMES}
            metrics[iou_type]["per_category"] = [
                {"id": c["id"], "name": c["name"], **{k: 0.0 if instances.get(c["id"]) else None for k in
                                                      ("AP", "AP50", "AP75", "AR100")},
                 "instances": instances.get(c["id"], 0)} for c in data["categories"]]
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
        metrics[iou_type]["per_category"] = _per_category(evaluator, data["categories"], instances)
        evaluators[iou_type] = evaluator
    metrics["best_f1_score_threshold"] = None
    if plots_dir is not None:  # not in the per-epoch evaluation: its matching costs seconds
        with timer("diagnostics"):
            metrics["best_f1_score_threshold"] = diagnostics.write(data, detections, image_ids, evaluators, plots_dir)
    return metrics


def per_category_table(metrics):
    """The per-category AP table of `metrics`, best AP first (null AP last)."""
    lines = [f"{'category':<20}{'type':<6}{'AP':>7}{'AP50':>7}{'AP75':>7}{'AR100':>7}{'objects':>9}"]
    for iou_type in IOU_TYPES:
        rows = sorted(metrics[iou_type]["per_category"], key=lambda r: -1 if r["AP"] is None else r["AP"], reverse=True)
        for row in rows:
            values = "".join(" " * 6 + "-" if row[k] is None else f"{row[k]:>7.3f}" for k in ("AP", "AP50", "AP75", "AR100"))
            lines.append(f"{row['name'][:19]:<20}{iou_type:<6}{values}{row['instances']:>9}")
    return "\n".join(lines)


def best_f1_threshold(workdir):
    """The score threshold of the best segm F1 that `evaluate` stored in `workdir`."""
    path = os.path.join(workdir, "eval", "metrics.json")
    try:
        with open(path, encoding="utf-8") as f:
            threshold = json.load(f).get("best_f1_score_threshold")
    except (FileNotFoundError, ValueError):
        threshold = None
    if threshold is None:
        raise MissingError(
            f"--score auto reads best_f1_score_threshold from '{path}', which has none; run "
            f"`centermask evaluate --workdir {workdir}` first, or pass a number such as --score 0.3."
        )
    return float(threshold)


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
            letterboxing), "detect", "masks" (masks pasted at image size as RLE, and the
            results' columns), "ground_truth", "results" and "coco_eval" (`coco_metrics`).

    Returns:
        The metrics dict.
    """
    if "val" not in builder.info.splits:
        raise ConfigError("Evaluation needs data.val.annotations and data.val.images in the config.")
    check_tiling(config.eval.tile, config.eval.tile_overlap, config.model.input_size,
                 ("eval.tile", "eval.tile_overlap"))
    total = builder.info.splits["val"].num_examples
    if max_images:
        total = min(total, max_images)
    timer = timer or Stopwatch()
    # disable=None: no bar when stderr is not a terminal (a log file would get one per update).
    with tqdm(total=total, desc="evaluate", unit="img", leave=False, disable=None) as progress:
        if config.eval.tile:
            detections, image_ids, annotation_ids = _tiled_detections(detect, builder, config, max_images, progress)
        else:
            detections, image_ids, annotation_ids = _detections(detect, builder, config, max_images, timer, progress)
    metrics = coco_metrics(
        builder.builder_config.splits["val"][0], detections, image_ids, config.eval.backend, annotation_ids, timer,
        plots_dir=os.path.join(output_dir, "plots") if output_dir else None,
    )
    if output_dir:
        remove_stale_temporaries(output_dir)  # what killed evaluations left (160 MB at COCO scale)
        detections.write_json(os.path.join(output_dir, "detections.json"))
        write_json(os.path.join(output_dir, "metrics.json"), metrics)
    return metrics


def _detections(detect, builder, config, max_images, timer, progress):
    """COCO results (`CocoResults`) of whole letterboxed images, with the image and
    annotation ids seen."""
    dataset = eval_dataset(
        builder, input_size=config.model.input_size, batch_size=config.eval.batch_size, max_images=max_images
    )
    category_ids = [c["id"] for c in builder.info.metadata["categories"]]
    detections, image_ids, annotation_ids = CocoResults(), [], []
    batches = iter(dataset)
    while True:
        with timer("input"):
            images, info = next(batches, (None, None))
            if images is None:
                break
            info = {k: v.flat_values.numpy() if k == "annotation_ids" else v.numpy() for k, v in info.items()}
        with timer("detect"):
            batch = {k: np.asarray(v) for k, v in detect(images).items()}
        for i, image_id in enumerate(info["image_id"]):
            with timer("masks"):
                detections.add(int(image_id), **coco_columns(
                    batch, i, info["scale"][i], info["original_size"][i], config.model.mask_threshold, category_ids
                ))
            image_ids.append(int(image_id))
        annotation_ids.extend(info["annotation_ids"].tolist())
        progress.update(len(images))
    return detections, image_ids, annotation_ids


def _tiled_detections(detect, builder, config, max_images, progress):
    """COCO results (`CocoResults`) of the validation images cut into `eval.tile` tiles
    (`inference`), with the image and annotation ids seen. Detections whose mask came out empty
    are left out, as in `Results.to_coco`."""
    model = config.model
    detector = ImageDetector(detect, model.input_size, builder.info.metadata["categories"], 0.0, model.mask_threshold)
    dataset = builder.as_dataset(split="val", shuffle_files=False)
    if max_images:
        dataset = dataset.take(max_images)
    dataset = dataset.map(lambda ex: (decode_example(ex, max_objects=0)["image"], ex["image_id"], ex["objects"]["id"]))
    image_ids, annotation_ids = [], []

    def images():
        for image, image_id, ids in dataset.as_numpy_iterator():
            image_ids.append(int(image_id))
            annotation_ids.extend(ids.tolist())
            yield None, image

    detections = CocoResults()
    results = detector.stream(images(), batch_size=config.eval.batch_size, tile=config.eval.tile,
                              tile_overlap=config.eval.tile_overlap)
    for k, result in enumerate(results):
        entries = result.to_coco(image_ids[k], segmentation="rle")
        detections.add(image_ids[k], [e["bbox"] for e in entries], [e["score"] for e in entries],
                       [e["category_id"] for e in entries],
                       [e["segmentation"]["counts"].encode("ascii") for e in entries], result.size)
        progress.update(1)
    return detections, image_ids, annotation_ids
