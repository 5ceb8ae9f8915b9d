import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time

import h5py
import keras
import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from centermask_tf.arch import build_network
from centermask_tf.cli import main
from centermask_tf.config import load_config
from centermask_tf.evaluation import METRIC_NAMES, coco_metrics
from centermask_tf.training.optimizer import WarmupSchedule, build_optimizer

CONFIG = "configs/shapes_tiny.yaml"


def worker_command(overrides, workdir, strategy, logical=1):
    return [sys.executable, "-m", "tests.train_worker", json.dumps(overrides), str(workdir), strategy, str(logical)]


def history_of(output):
    line = [l for l in output.splitlines() if l.startswith("HISTORY ")][-1]
    return json.loads(line[len("HISTORY "):])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("config, extra", [
    (CONFIG, []),
    (CONFIG, ["model.head_type=separable", "model.saliency=specific"]),
    (CONFIG, ["model.mask_factors=shape", "train.saliency_weight=0"]),
    ("configs/shapes_fcos_tiny.yaml", ["model.mask_samples=16", "train.saliency_weight=1.0"]),
])
def test_training_runs_the_shape_head_at_the_supervised_locations_with_the_dense_losses_and_gradients(
        shapes, config, extra):
    """`fit` runs the architecture's training network (Shape head features, no dense S*S map) and
    the loss runs the head at the objects' centres (FCOS: its sampled positives): every loss term
    and every gradient equal the dense network's."""
    import tensorflow as tf

    from centermask_tf.data.tfds_builder import prepare_dataset
    from centermask_tf.detector import CenterMask
    from centermask_tf.training.setup import config_train_dataset

    _, overrides = shapes
    config = load_config(config, overrides + extra)
    images, targets = next(iter(config_train_dataset(config, prepare_dataset(config.data))))
    detector = CenterMask(config)
    variables = detector.network.trainable_variables

    def losses_and_gradients(outputs_of, shape_head):
        with tf.GradientTape() as tape:
            outputs = outputs_of(images)
            losses = detector.arch.compute_losses(outputs, targets, detector.loss_weights, shape_head=shape_head)
        return outputs, losses, tape.gradient(losses["total"], variables)

    sparse_outputs, sparse, sparse_gradients = losses_and_gradients(
        lambda x: detector(x, training=True), detector.network.get_layer("shape"))
    dense_outputs, dense, dense_gradients = losses_and_gradients(
        lambda x: detector.network(x, training=True), None)
    assert "shape" in dense_outputs and "shape" not in sparse_outputs and "shape_features" in sparse_outputs
    assert float(dense["mask"]) > 0.1
    for name in dense:
        np.testing.assert_allclose(sparse[name], dense[name], rtol=1e-5, err_msg=name)
    for variable, got, expected in zip(variables, sparse_gradients, dense_gradients):
        scale = float(tf.reduce_max(tf.abs(expected))) + 1e-12
        np.testing.assert_allclose(got / scale, expected / scale, atol=1e-5, err_msg=variable.path)


def test_sgd_steps_with_momentum_and_weight_decay():
    """FCOS's optimiser: the first step is w - lr * (g + wd * w), the second adds 0.9 x the
    first's velocity."""
    train_config = load_config("configs/coco_fcos_r50.yaml").train
    train_config.warmup_steps = 0
    optimizer = build_optimizer(train_config, steps_per_epoch=1000)
    weight = keras.Variable([2.0, -1.0])
    lr, wd, grad = 0.01, 1e-4, np.array([0.5, 0.25], np.float32)
    optimizer.apply_gradients([(grad, weight)])
    first = np.array([2.0, -1.0]) * (1 - lr * wd) - lr * grad
    np.testing.assert_allclose(weight.numpy(), first, rtol=1e-6)
    optimizer.apply_gradients([(grad, weight)])
    np.testing.assert_allclose(weight.numpy(), first * (1 - lr * wd) - lr * grad * 1.9, rtol=1e-6)


def test_warmup_schedule_values():
    step = WarmupSchedule(1.0, 10, 100, "step", [50, 80])
    assert float(step(0)) == pytest.approx(0.1) and float(step(20)) == pytest.approx(1.0)
    assert float(step(60)) == pytest.approx(0.1) and float(step(90)) == pytest.approx(0.01)
    cosine = WarmupSchedule(1.0, 0, 100, "cosine")
    assert float(cosine(50)) == pytest.approx(0.5) and float(cosine(100)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.slow
def test_mirrored_over_two_logical_cpus_trains_with_falling_loss(shapes, tmp_path):
    _, overrides = shapes
    overrides = overrides + ["train.epochs=4", "train.learning_rate=3e-3"]
    run = subprocess.run(
        worker_command(overrides, tmp_path / "run", "mirrored", logical=2),
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "training on 2 replica(s)" in run.stderr
    assert "1 thread(s) per op" in run.stderr  # train.intra_op_threads of the config
    losses = [epoch["loss"] for epoch in history_of(run.stdout)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses


def test_intra_op_threads_apply_before_tensorflow_starts_and_warn_after():
    """`train.intra_op_threads` sets TensorFlow's threads per op when nothing ran yet; once TF
    runs, the same number is accepted and another one is refused with a warning naming the field."""
    script = (
        "import logging, tensorflow as tf\n"
        "from centermask_tf.training.strategies import set_op_threads\n"
        "logging.basicConfig(level=logging.WARNING, format='%(message)s')\n"
        "first = set_op_threads(1)\n"
        "tf.constant(1.0) + 1.0\n"
        "print('RESULT', first, tf.config.threading.get_intra_op_parallelism_threads(), set_op_threads(1),"
        " set_op_threads(None), set_op_threads(2), tf.config.threading.get_intra_op_parallelism_threads())\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split("RESULT ")[1].split() == ["True", "1", "True", "True", "False", "1"]
    assert "train.intra_op_threads=2 not applied" in run.stderr and "with 1 threads per op" in run.stderr


def run_workers(overrides, workdir, count=2):
    """Trains with `--strategy multi_worker` in `count` processes; their (return code, stdout,
    stderr)."""
    workers = [f"127.0.0.1:{free_port()}" for _ in range(count)]
    processes = []
    for index in range(count):
        env = dict(os.environ, TF_CONFIG=json.dumps(
            {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        ))
        processes.append(subprocess.Popen(
            worker_command(overrides, workdir, "multi_worker"), env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=600))
    finally:
        for process in processes:
            process.kill()
    return [(process.returncode, out, err) for process, (out, err) in zip(processes, outputs)]


def assert_same_weights(first, second):
    with h5py.File(first, "r") as a, h5py.File(second, "r") as b:
        names = []
        a.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        assert len(names) > 20
        for name in names:
            np.testing.assert_array_equal(a[name][()], b[name][()], err_msg=name)


@pytest.mark.slow
def test_multi_worker_two_processes_end_with_identical_weights(shapes, tmp_path):
    """Also what `fit` has, on the chief: per-epoch evaluation, TensorBoard, history.csv, EMA."""
    _, overrides = shapes
    overrides = overrides + ["eval.every_epochs=1", "train.ema_decay=0.9"]
    results = run_workers(overrides, tmp_path / "run")
    for code, _, err in results:
        assert code == 0, err[-3000:]
    histories = [history_of(out) for _, out, _ in results]
    assert len(histories[0]) == 2 and all(np.isfinite(h["loss"]) for h in histories[0])
    run = tmp_path / "run"
    assert sorted(os.listdir(run / "eval")) == ["epoch_001.json", "epoch_002.json"]
    assert os.listdir(run / "logs" / "images") and os.listdir(run / "logs" / "train")
    with open(run / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [0, 1] and "val_segm_AP" in rows[0]
    assert_same_weights(run / "checkpoints" / "last.weights.h5", run / "worker_1" / "checkpoints" / "last.weights.h5")


@pytest.mark.slow
def test_a_multi_worker_run_resumes_from_the_chiefs_commit_and_refuses_a_finished_one(shapes, tmp_path):
    """The guarantees of `fit`'s workdir: a run continued with more epochs starts after the
    committed one, from the chief's weights (the other worker's scratch folder is wiped), and a
    finished run is refused by every worker instead of leaving one waiting forever. The run
    starts from `init_from` with its backbone frozen in epoch 1, as `fit` does."""
    from centermask_tf.detector import CenterMask
    from centermask_tf.transfer import layer_weights

    _, overrides = shapes
    keras.utils.set_random_seed(5)  # other weights than training's seed draws
    source = build_network(load_config(CONFIG, overrides).model)
    source.save_weights(str(tmp_path / "source.weights.h5"))
    frozen = {path: arrays for path, arrays in layer_weights(source).items()
              if path.startswith("resnet18_backbone/") and "/neck_" not in path}
    overrides = [*overrides, f"train.init_from={tmp_path / 'source.weights.h5'}", "train.freeze_backbone_epochs=1"]
    run = tmp_path / "run"
    for epochs in (1, 2):  # the second run trains epoch 2 only
        results = run_workers([*overrides, f"train.epochs={epochs}"], run)
        for code, _, err in results:
            assert code == 0, err[-3000:]
        assert len(history_of(results[0][1])) == 1
        trained = layer_weights(CenterMask.from_workdir(str(run), str(run / "checkpoints" / "last.weights.h5")).network)
        change = max(float(np.abs(a - b).max()) for path in frozen for a, b in zip(trained[path], frozen[path]))
        assert (change == 0) if epochs == 1 else (change > 1e-4), (epochs, change)
    with open(run / "history.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [0, 1]
    assert json.loads((run / "state.json").read_text())["epochs_done"] == 2
    assert_same_weights(run / "checkpoints" / "last.weights.h5", run / "worker_1" / "checkpoints" / "last.weights.h5")
    refused = run_workers([*overrides, "train.epochs=2"], run)
    assert [code for code, _, _ in refused] == [1, 1]
    assert "Nothing to do for train.epochs=2" in refused[0][2]
    assert "another worker refused" in refused[1][2]


@pytest.mark.slow
def test_sigkill_mid_epoch_resumes_at_the_next_epoch(shapes, tmp_path):
    _, overrides = shapes
    overrides = overrides + ["train.epochs=4", "train.steps_per_epoch=8"]
    workdir = tmp_path / "run"
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(worker_command(overrides, workdir, "mirrored"), stdout=log, stderr=log)
    history = workdir / "history.csv"
    deadline = time.time() + 300
    while time.time() < deadline and not (history.exists() and len(history.read_text().splitlines()) >= 2):
        time.sleep(0.2)
    time.sleep(1.0)  # into the second epoch
    first.send_signal(signal.SIGKILL)
    first.wait()
    done_before = len(history.read_text().splitlines()) - 1
    assert 1 <= done_before < 4

    second = subprocess.run(
        worker_command(overrides, workdir, "mirrored"), capture_output=True, text=True, timeout=600
    )
    assert second.returncode == 0, second.stderr[-3000:]
    first_epoch = int(second.stdout.split("Epoch ")[1].split("/")[0])
    assert first_epoch == done_before + 1, (first_epoch, done_before)
    with open(history) as f:
        epochs = [int(row["epoch"]) for row in csv.DictReader(f)]
    assert sorted(set(epochs)) == [0, 1, 2, 3]
    assert (workdir / "checkpoints" / "last.weights.h5").exists()


def direct_cocoeval(annotations, detections, image_ids, iou_type):
    ground_truth = COCO(annotations)
    evaluator = COCOeval(ground_truth, ground_truth.loadRes(detections), iou_type)
    evaluator.params.imgIds = sorted(image_ids)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return evaluator.stats[:6]


def test_evaluate_metrics_equal_pycocotools_on_its_detections(shapes, untrained_workdir):
    root, _ = shapes
    workdir, overrides = untrained_workdir
    args = ["evaluate", "--config", CONFIG, "--workdir", str(workdir)]
    for override in overrides:
        args += ["--set", override]
    assert main(args) == 0
    metrics = json.loads((workdir / "eval" / "metrics.json").read_text())
    detections = json.loads((workdir / "eval" / "detections.json").read_text())
    assert detections and {d["category_id"] for d in detections} <= {1, 2, 3}
    annotations = str(root / "annotations" / "instances_val.json")
    image_ids = COCO(annotations).getImgIds()
    for iou_type in ("bbox", "segm"):
        expected = direct_cocoeval(annotations, detections, image_ids, iou_type)
        got = [metrics[iou_type][name] for name in METRIC_NAMES]
        np.testing.assert_allclose(got, np.maximum(expected, 0.0), atol=1e-12)


def test_coco_metrics_equal_pycocotools_on_good_detections(shapes, rng):
    """Non-trivial numbers: ground truth with jittered boxes and random scores."""
    root, _ = shapes
    annotations = str(root / "annotations" / "instances_val.json")
    coco = COCO(annotations)
    detections = []
    for ann in coco.dataset["annotations"]:
        x, y, w, h = ann["bbox"]
        jitter = rng.normal(0, 1.0, 4)
        detections.append({
            "image_id": ann["image_id"], "category_id": ann["category_id"],
            "bbox": [x + jitter[0], y + jitter[1], w + jitter[2], h + jitter[3]],
            "score": float(rng.uniform(0.3, 1.0)), "segmentation": coco.annToRLE(ann),
        })
    for d in detections:
        d["segmentation"]["counts"] = d["segmentation"]["counts"].decode("ascii") if isinstance(d["segmentation"]["counts"], bytes) else d["segmentation"]["counts"]
    metrics = coco_metrics(annotations, detections, coco.getImgIds())
    assert metrics["segm"]["AP"] > 0.9 and 0.2 < metrics["bbox"]["AP"] < 0.99
    for iou_type in ("bbox", "segm"):
        expected = direct_cocoeval(annotations, detections, coco.getImgIds(), iou_type)
        np.testing.assert_allclose([metrics[iou_type][n] for n in METRIC_NAMES], np.maximum(expected, 0), atol=1e-12)


def test_predict_overlays_differ_from_input_inside_masks(shapes, untrained_workdir, tmp_path):
    import pycocotools.mask as mask_utils
    import tensorflow as tf

    root, _ = shapes
    workdir, _ = untrained_workdir
    out = tmp_path / "pred"
    assert main(["predict", "--workdir", str(workdir), "--input", str(root / "val"), "--output", str(out), "--score", "0.0"]) == 0
    predictions = json.loads((out / "predictions.json").read_text())
    assert len(predictions) == 4
    checked = 0
    for item in predictions:
        original = tf.io.decode_image(tf.io.read_file(item["file"]), channels=3).numpy().astype(int)
        assert item["overlay"] == str(out / (os.path.basename(item["file"]) + ".overlay.png"))
        overlay = tf.io.decode_png(tf.io.read_file(item["overlay"])).numpy().astype(int)
        assert overlay.shape == original.shape
        for detection in item["detections"]:
            assert detection["category"] in {"circle", "rectangle", "triangle"}
            mask = mask_utils.decode(detection["segmentation"]).astype(bool)
            if mask.sum() > 20:
                differs = np.abs(overlay[mask] - original[mask]).sum(-1) > 0
                assert differs.mean() > 0.9
                checked += 1
    assert checked > 0


def test_num_classes_mismatch_is_explained(shapes, tmp_path):
    _, overrides = shapes
    from centermask_tf.training.train import train

    with pytest.raises(ValueError, match=r"model\.num_classes=5.*3 categories"):
        train(load_config(CONFIG, overrides + ["model.num_classes=5"]), str(tmp_path / "w"))


@pytest.mark.slow
def test_train_and_evaluate_on_a_foreign_coco_folder(tmp_path):
    """Non-contiguous ids, mixed image formats, crowd and broken files: only data.* paths set."""
    from tests.messy_coco import CATEGORY_IDS, write_messy_coco

    annotations, images = write_messy_coco(str(tmp_path / "messy"))
    paths = [
        f"data.train.annotations={annotations}", f"data.train.images={images}",
        f"data.val.annotations={annotations}", f"data.val.images={images}",
        f"data.tfds_data_dir={tmp_path}/tfds",
    ]
    tiny = ["model.width_multiplier=0.125", "model.input_size=64", "model.head_conv=8",
            "model.shape_size=8", "model.mask_size=8", "train.batch_size=2", "train.epochs=1",
            "train.steps_per_epoch=2", "eval.every_epochs=0"]
    args = []
    for override in paths + tiny:
        args += ["--set", override]
    workdir = str(tmp_path / "run")
    assert main(["train", "--config", CONFIG, "--workdir", workdir, *args]) == 0
    assert main(["evaluate", "--config", CONFIG, "--workdir", workdir, *args]) == 0
    detections = json.loads((tmp_path / "run" / "eval" / "detections.json").read_text())
    assert detections and {d["category_id"] for d in detections} <= set(CATEGORY_IDS)
    assert json.loads((tmp_path / "run" / "categories.json").read_text())[0]["id"] == 3


def test_faster_coco_eval_backend_gives_pycocotools_numbers(tmp_path, rng):
    """eval.backend=faster_coco_eval: every bbox and segm metric equal to pycocotools' (1e-6)
    on detections with jittered boxes, shifted masks, false positives and random scores."""
    import pycocotools.mask as mask_utils

    from centermask_tf.data.shapes import make_shapes

    make_shapes(str(tmp_path), train=1, val=30, seed=4, image_size=96)
    annotations = str(tmp_path / "annotations" / "instances_val.json")
    coco = COCO(annotations)
    detections = []
    for ann in coco.dataset["annotations"]:
        image = coco.imgs[ann["image_id"]]
        x, y, w, h = np.array(ann["bbox"]) + rng.normal(0, 2.0, 4)
        mask = np.roll(coco.annToMask(ann), tuple(rng.integers(-3, 4, 2)), axis=(0, 1))
        for category, score in ((ann["category_id"], rng.uniform(0.3, 1.0)), (rng.integers(1, 4), rng.uniform(0, 0.5))):
            rle = mask_utils.encode(np.asfortranarray(mask))
            detections.append({
                "image_id": ann["image_id"], "category_id": int(category), "bbox": [x, y, max(w, 1.0), max(h, 1.0)],
                "score": float(score), "segmentation": {"size": [image["height"], image["width"]],
                                                        "counts": rle["counts"].decode("ascii")},
            })
    reference = coco_metrics(annotations, detections, coco.getImgIds())
    faster = coco_metrics(annotations, detections, coco.getImgIds(), backend="faster_coco_eval")
    assert 0.2 < reference["segm"]["AP"] < 0.95 and 0.2 < reference["bbox"]["AP"] < 0.95, reference
    for iou_type in ("bbox", "segm"):
        np.testing.assert_allclose([faster[iou_type][n] for n in METRIC_NAMES],
                                   [reference[iou_type][n] for n in METRIC_NAMES], atol=1e-6)
