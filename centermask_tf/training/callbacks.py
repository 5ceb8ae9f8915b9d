"""What runs at each epoch's end: the workdir commit (`RunCheckpoint`) and COCO evaluation
with TensorBoard images (`CocoEvalCallback`), both on the EMA weights when training keeps them."""

import contextlib
import os

import keras
import numpy as np
import tensorflow as tf

from centermask_tf.data.pipeline import eval_dataset
from centermask_tf.evaluation import evaluate_detector
from centermask_tf.files import write_json
from centermask_tf.postprocess import to_original_image
from centermask_tf.results import Results, draw_overlay
from centermask_tf.workdir import save_weights


@contextlib.contextmanager
def averaged_weights(model):
    """Inside the block, `model`'s trainable variables hold its optimizer's exponential moving
    averages (`train.ema_decay`); their trained values come back on exit. Keras swaps the
    averages in only when `fit` ends, so per-epoch evaluation and checkpoints ask for them here.
    Without EMA this does nothing."""
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or not optimizer.use_ema:
        yield
        return
    variables = model.trainable_variables
    trained = [v.numpy() for v in variables]
    optimizer.finalize_variable_values(variables)
    try:
        yield
    finally:
        for variable, value in zip(variables, trained):
            variable.assign(value)



class RunCheckpoint(keras.callbacks.Callback):
    """Commits each epoch to the workdir (see `workdir.py`): backup of network and optimizer,
    `last` and (when the monitored value improves) `best` network weights, the history row and
    the best-so-far value, so that a kill at any moment loses at most the running epoch.
    `last` and `best` hold the averaged weights when training keeps an EMA; the backup holds the
    trained ones, from which training resumes."""

    def __init__(self, network, run, state):
        super().__init__()
        self.network = network
        self.run = run
        self.state = state

    def on_epoch_end(self, epoch, logs=None):
        logs = {k: float(v) for k, v in (logs or {}).items()}
        state, run, done = self.state, self.run, epoch + 1
        save_weights(self.model, run.join(run.backup_name(done)), "backup")
        value = logs.get(state.monitor)
        with averaged_weights(self.model):
            save_weights(self.network, run.pending("last", done), "last")
            if state.improves(value):
                save_weights(self.network, run.pending("best", done), "best")
                state.best, state.best_epoch = value, done
        state.epochs_done, state.backup = done, run.backup_name(done)
        state.history.append({"epoch": epoch, **logs})
        run.save_state(state)  # the commit
        run.recover(state)


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
        panels = []
        for i, canvas in enumerate(np.asarray(tf.cast(tf.round(canvases), tf.uint8))):
            found = to_original_image(detections, i, 1.0, (size, size), self.config.model.mask_threshold)
            panel = [np.asarray(draw_overlay(canvas, Results.from_detections(found, self.detector.categories)))]
            if saliency is not None:
                panel.append(np.repeat(np.asarray(saliency[i] * 255.0).astype(np.uint8), 3, axis=-1))
            panels.append(np.concatenate(panel, axis=1))
        with self._writer.as_default():
            tf.summary.image("validation/detections_and_saliency", np.stack(panels), step=step, max_outputs=IMAGE_SAMPLES)
        self._writer.flush()
