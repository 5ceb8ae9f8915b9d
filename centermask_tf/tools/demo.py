"""`centermask demo` (`make demo`): the main job end to end on the built-in shapes set: data,
training, COCO evaluation, overlays, the Local Shape / Global Saliency comparison, and the
SavedModel and TFLite exports. A rerun reuses what a finished earlier run made."""

import json
import logging
import os
import time

from centermask_tf.config import load_config
from centermask_tf.data.shapes import make_shapes
from centermask_tf.data.tfds_builder import prepare_dataset
from centermask_tf.detector import CenterMask
from centermask_tf.evaluation import evaluate_detector
from centermask_tf.export.serving import export_saved_model, next_version
from centermask_tf.export.tflite import export_tflite
from centermask_tf.files import write_json
from centermask_tf.images import image_files
from centermask_tf.predict import predict_files
from centermask_tf.tools.ablation import ablate
from centermask_tf.training.strategies import set_op_threads
from centermask_tf.training.train import train
from centermask_tf.workdir import EXPORTS_RECORD, Workdir, weights_path

SAVED_MODEL = os.path.join("saved_models", "shapes_tiny")
TFLITE = os.path.join("saved_models", "shapes_tiny.tflite")


def demo(config_path, workdir, data, overrides=(), overwrite=False):
    start = time.time()
    config = load_config(config_path, [
        f"data.train.annotations={data}/annotations/instances_train.json",
        f"data.train.images={data}/train",
        f"data.val.annotations={data}/annotations/instances_val.json",
        f"data.val.images={data}/val",
        *overrides,
    ])
    set_op_threads(config.train.intra_op_threads)  # before writing the set starts TensorFlow
    if not os.path.exists(os.path.join(data, "annotations", "instances_val.json")):  # written last
        print(f"[1/6] writing the synthetic shapes set to {data}")
        make_shapes(data, train=600, val=100, seed=0)
    else:
        print(f"[1/6] using the shapes set in {data}")
    reuse = not overwrite and Workdir(workdir).finished(config)
    if reuse:
        print(f"[2/6] {workdir} holds a finished run of {config.train.epochs} epochs: using it "
              "(--overwrite retrains, moving it into previous/)")
    else:
        print(f"[2/6] training {config_path} into {workdir}")
        train(config, workdir, overwrite=overwrite)
    print("[3/6] COCO evaluation on the held-out split")
    builder = prepare_dataset(config.data)
    logging.info("weights: %s", weights_path(workdir))
    detector = CenterMask.from_workdir(workdir)
    eval_dir = os.path.join(workdir, "eval")
    metrics = evaluate_detector(detector.detect_canvases, builder, config, eval_dir)
    overlays = os.path.join(workdir, "predictions")
    print(f"[4/6] overlays of 8 validation images in {overlays}")
    predict_files(detector.image_detector(), image_files(config.data.val.images)[:8], overlays, score_threshold=0.3)
    print("[5/6] mask AP with the Local Shape only, the Global Saliency only, and both")
    ablation = ablate(workdir, evaluated={"both": metrics})  # [3/6] evaluated "both" already
    print("[6/6] exporting SavedModel and TFLite")
    # Versions are immutable for TF Serving: this run's model is the version it recorded when
    # it exported, else the next one (another run may have exported since).
    record = os.path.join(workdir, EXPORTS_RECORD)
    version_path = demo_saved_model(record, SAVED_MODEL, reuse)
    if os.path.isdir(version_path):
        print(f"SavedModel of this run: {version_path}")
    else:
        export_saved_model(detector, SAVED_MODEL, int(os.path.basename(version_path)))
        print(f"SavedModel (TF Serving layout) written to {version_path}")
    size = export_tflite(detector, TFLITE)
    print(f"TFLite (none, builtin ops only) written to {TFLITE}: {size / 1e6:.2f} MB")
    write_json(record, {"saved_model": version_path, "tflite": TFLITE})
    print("\n=== centermask demo summary ===")
    for iou_type in ("bbox", "segm"):
        values = metrics[iou_type]
        print(f"{iou_type:5s} AP {values['AP']:.3f}  AP50 {values['AP50']:.3f}  AP75 {values['AP75']:.3f}  "
              f"APs {values['APs']:.3f}  APm {values['APm']:.3f}")
    print(f"segm AP by mask factors: Local Shape only {ablation['shape']['segm']['AP']:.3f}, Global Saliency only "
          f"{ablation['saliency']['segm']['AP']:.3f}, both {ablation['both']['segm']['AP']:.3f} "
          f"({workdir}/ablate/ablation.md, ablation.png)")
    print(f"wall time      {(time.time() - start) / 60:.1f} min")
    print(f"dataset        {data}")
    print(f"weights        {workdir}/checkpoints/best.weights.h5 (and last.weights.h5)")
    print(f"network        {workdir}/model.keras")
    print(f"metrics        {eval_dir}/metrics.json, per epoch: {eval_dir}/epoch_*.json")
    print(f"detections     {eval_dir}/detections.json (COCO results format)")
    print(f"overlays       {overlays}/*.overlay.png, {overlays}/predictions.json")
    print(f"logs           {workdir}/history.csv, TensorBoard: {workdir}/logs")
    print(f"SavedModel     {version_path} (TF Serving layout)")
    print(f"TFLite         {TFLITE} ({size / 1e6:.2f} MB, builtin ops only)")


def demo_saved_model(record, saved_model, reuse):
    """The SavedModel version folder of the demo's model: the one its workdir's `record` names
    when the run is reused and that folder still exists, else the next free version (to export).
    Never the newest version as such: another run may have exported it."""
    try:
        with open(record, encoding="utf-8") as f:
            recorded = json.load(f).get("saved_model")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if reuse and isinstance(recorded, str) and os.path.isdir(recorded):
        return recorded
    return os.path.join(saved_model, str(next_version(saved_model)))
