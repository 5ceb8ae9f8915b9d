"""`centermask benchmark scale`: building and evaluating a COCO-val-sized set (`make-shapes
--preset coco-val`, made once and cached): the TFDS build's images/s in one process, in a pool
and through Beam, and evaluation's time and peak memory per stage, each step in its own process."""

import json
import logging
import os
import tempfile
import time

import numpy as np
import tensorflow as tf

from centermask_tf.data.coco import DataError
from centermask_tf.data.shapes import make_preset
from centermask_tf.data.tfds_builder import prepare_dataset
from centermask_tf.detector import CenterMask
from centermask_tf.evaluation import coco_metrics, evaluate_detector
from centermask_tf.processes import process_pool
from centermask_tf.timing import Stopwatch, block, peak_rss_mb

# Where `benchmark scale` keeps its generated COCO-sized set between runs.
SCALE_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "centermask_tf")



# Build rows: (name, data.build_workers, data.beam_options).
SCALE_BUILDS = (
    ("1 process", 1, []),
    ("2 processes", 2, []),
    ("Beam DirectRunner, 1 worker", 1, ["--runner=DirectRunner"]),
    # Refused at 5,000 images here: the run shows whether Beam still loses examples.
    ("Beam DirectRunner, 2 workers", 1, ["--runner=DirectRunner", "--direct_num_workers=2",
                                        "--direct_running_mode=multi_processing"]),
)



def _measured(fn, *args):
    """`fn(*args)` with the peak memory of this process or of its largest child (build workers)."""
    row = fn(*args)
    return {**row, "peak_rss_mb": max(peak_rss_mb(), peak_rss_mb(children=True))}



def _in_child(fn, *args):
    """`fn(*args)` (a row dict) in a fresh spawned process, so the row's `peak_rss_mb` is that
    step's alone."""
    with process_pool(1) as pool:
        return pool.submit(_measured, fn, *args).result()



def _val_only(config, root, tfds_dir):
    config.data.train.annotations = config.data.train.images = None
    config.data.val.annotations = os.path.join(root, "annotations", "instances_val.json")
    config.data.val.images = os.path.join(root, "val")
    config.data.tfds_data_dir = tfds_dir
    return config



def _build(config, workers, beam_options):
    """Builds the val split; a build refused for losing examples is a row with `kept` False."""
    config.data.build_workers, config.data.beam_options = workers, beam_options
    start = time.perf_counter()
    try:
        images = prepare_dataset(config.data, splits=("val",)).info.splits["val"].num_examples
    except DataError as e:
        logging.getLogger("centermask_tf.tools.benchmark").warning("%s", e)
        return {"images": 0, "seconds": time.perf_counter() - start, "images_per_s": 0.0, "kept": False}
    seconds = time.perf_counter() - start
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds, "kept": True}



def _synthetic_detections(detections, sizes, scales, rng, mask_size):
    """The decoder's K detections per image with their boxes, scores and masks replaced by
    COCO-like ones: log-uniform sizes from 8 px to 90 % of the shorter side inside the image,
    elliptical masks. An untrained network's boxes are near-empty, so its masks would cost
    nothing to paste and encode; a trained model's detections would need a trained model.
    `sizes`: each image's (height, width); `scales`: its canvas pixels per image pixel."""
    batch, k = detections["scores"].shape
    heights, widths = sizes[:, :1], sizes[:, 1:]
    short = np.minimum(heights, widths)
    size = np.exp(rng.uniform(np.log(8.0), np.log(0.9 * short), (2, batch, k)))
    top = rng.uniform(0, 1, (batch, k)) * (heights - size[0])
    left = rng.uniform(0, 1, (batch, k)) * (widths - size[1])
    boxes = np.stack([top, left, top + size[0], left + size[1]], -1) * scales[:, None, None]
    grid = (np.arange(mask_size) + 0.5) / mask_size - 0.5
    radii = rng.uniform(0.25, 0.5, (2, batch, k, 1, 1))
    ellipse = (grid[:, None] / radii[0]) ** 2 + (grid[None, :] / radii[1]) ** 2
    return {
        **detections,
        "boxes": boxes.astype(np.float32),
        "scores": np.sort(rng.uniform(0, 1, (batch, k)))[:, ::-1].astype(np.float32),
        "masks": np.clip(1.5 - ellipse, 0, 1).astype(np.float32),
        "num_detections": np.full(batch, k, np.int32),
    }



def _evaluate(config, output_dir):
    """`evaluate_detector` over the set with its time per stage. The network (untrained) and the
    decoder run for real, timed apart; the detections they make are then replaced by
    `_synthetic_detections` (K per image), so pasting, encoding and COCO evaluation see K
    COCO-sized masks per image."""
    builder = prepare_dataset(config.data, splits=("val",))
    detector = CenterMask(config, categories=builder.info.metadata["categories"])
    network = detector.inference_network  # as `CenterMask.decode`: Shape head at the peaks only
    forward = tf.function(lambda canvases: network(canvases, training=False))
    decode = tf.function(lambda outputs: detector.decoder(outputs, shape_head=detector.shape_head))
    # The image sizes in reading order (no image decoding), so `detect` knows where its boxes may go.
    sizes = [(int(e["height"]), int(e["width"])) for e in builder.as_dataset(split="val", shuffle_files=False)]
    watch, rng = Stopwatch(), np.random.default_rng(0)

    def detect(canvases):
        with watch("forward"):
            outputs = block(forward(canvases))
        with watch("decode"):
            detections = block(decode(outputs))
        batch = np.asarray([sizes.pop(0) for _ in range(len(canvases))], np.float32)
        return _synthetic_detections(detections, batch, canvases.shape[1] / batch.max(axis=1), rng, config.model.mask_size)

    evaluate_detector(detect, builder, config, output_dir=output_dir, timer=watch)
    return {"images": builder.info.splits["val"].num_examples, "seconds": dict(watch.seconds), "peaks": watch.peak_rss_mb}



def _coco_eval_only(annotations, detections_path, image_ids, backend):
    """COCO evaluate/accumulate of written detections with `backend`, timed."""
    with open(detections_path) as f:
        detections = json.load(f)
    watch = Stopwatch()
    coco_metrics(annotations, detections, image_ids, backend, timer=watch)
    return {"seconds": dict(watch.seconds), "peaks": watch.peak_rss_mb}



def scale(config, *, images=5000, cache=SCALE_CACHE, builds=SCALE_BUILDS):
    """Building and evaluating a COCO-val-sized set (`make-shapes --preset coco-val`, made once
    under `cache`): the TFDS build's images/s per way of building, and evaluation's seconds and
    peak memory per stage. Each build, the evaluation and the second COCO backend run in
    processes of their own, so one step's memory is not another's.

    Returns:
        (build rows, evaluation rows).
    """
    root = make_preset(cache, "coco-val", val=images)
    kept = os.path.join(root, "tfds")  # the evaluation's dataset, kept between runs
    build_rows = []
    for name, workers, options in builds:
        with tempfile.TemporaryDirectory(prefix="build-", dir=cache) as scratch:
            row = _in_child(_build, _val_only(config, root, scratch), workers, options)
            build_rows.append({"build": name, **row})
            if row["kept"] and not os.path.exists(kept):
                os.replace(scratch, kept)
                os.mkdir(scratch)  # for TemporaryDirectory to remove
    single = build_rows[0]["images_per_s"]
    for row in build_rows:
        row["speedup"] = row["images_per_s"] / single

    _val_only(config, root, kept)
    config.model.weights = None  # untrained: the forward costs the same
    config.model.score_threshold = 0.0  # every one of the K peaks is a detection
    with tempfile.TemporaryDirectory(dir=cache) as output:
        evaluated = _in_child(_evaluate, config, output)
        # The other backend in a process of its own, from the written detections.
        faster = _in_child(
            _coco_eval_only, config.data.val.annotations, os.path.join(output, "detections.json"),
            _image_ids(config.data.val.annotations), "faster_coco_eval",
        )
    n, seconds, peaks = evaluated["images"], evaluated["seconds"], evaluated["peaks"]

    def row(stage, spent, peak):
        return {"stage": stage, "images": n, "seconds": spent, "ms_per_image": 1e3 * spent / n, "peak_rss_mb": peak}

    # peak_rss_mb: the evaluating process's peak so far when the stage last ended.
    loop = ["input", "forward", "decode", "masks"]
    rows = [row(stage, seconds[stage], peaks[stage]) for stage in loop + ["ground_truth", "results"]]
    ours = sum(seconds[stage] for stage in loop + ["ground_truth", "results"] if stage != "forward")
    rows.append(row("ours (all but forward and COCO eval)", ours, max(peaks[stage] for stage in loop)))
    rows.append(row("coco_eval pycocotools", seconds["coco_eval"], peaks["coco_eval"]))
    rows.append(row("coco_eval faster_coco_eval", faster["seconds"]["coco_eval"], faster["peaks"]["coco_eval"]))
    rows.append(row("diagnostics (F1, confusion matrix, plots)", seconds["diagnostics"], peaks["diagnostics"]))
    return build_rows, rows



def _image_ids(annotations):
    with open(annotations) as f:
        return [image["id"] for image in json.load(f)["images"]]
