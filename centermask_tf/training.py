"""Training: optimiser and schedule, strategies, epoch commits, and `train()` of a `CenterMask`.

    centermask train --config configs/shapes_tiny.yaml --workdir work/demo

Single host (`mirrored`, the default, or `one_device`) trains with `model.fit`.
`multi_worker` (MultiWorkerMirroredStrategy from `TF_CONFIG`) trains with a `strategy.run` loop
instead: Keras 3's `fit` fails under that strategy (keras-team/keras#20585). Both share the
losses, the optimiser and the checkpoint files.

The workdir (layout, epoch commits, resume and refusals) is described in `workdir.py`; with
`fit`, `RunCheckpoint` commits each epoch. The multi-worker loop resumes from a
`tf.train.CheckpointManager` in `backup/`, whose index file is replaced atomically by TF.
"""

import contextlib
import functools
import json
import logging
import math
import os
import re
import sys

import keras
import numpy as np
import tensorflow as tf

from centermask_tf import files
from centermask_tf.data.coco import DataError
from centermask_tf.data.fcos_targets import encode_fcos_targets
from centermask_tf.data.targets import target_instances
from centermask_tf.errors import MissingError, UserError
from centermask_tf.losses import compute_losses
from centermask_tf.workdir import Workdir, WorkdirError

logger = logging.getLogger("centermask_tf.training")

STRATEGIES = ("mirrored", "one_device", "multi_worker")

# === Layers ===


@keras.saving.register_keras_serializable(package="centermask")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup to `base`, then step decay (x0.1 at each boundary) or cosine decay.

    Args:
        base: learning rate after warmup.
        warmup_steps: linear warmup length.
        total_steps: training length (cosine decays to 0 at its end).
        kind: "step" or "cosine".
        boundaries: steps at which the step schedule divides the rate by 10.
    """

    def __init__(self, base, warmup_steps, total_steps, kind="step", boundaries=()):
        self.base = float(base)
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.kind = kind
        self.boundaries = [int(b) for b in boundaries]

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warmup = tf.minimum(1.0, (step + 1.0) / max(self.warmup_steps, 1))
        if self.kind == "cosine":
            progress = tf.clip_by_value(step / max(self.total_steps, 1), 0.0, 1.0)
            decay = 0.5 * (1.0 + tf.cos(math.pi * progress))
        else:
            passed = tf.add_n([tf.cast(step >= b, tf.float32) for b in self.boundaries] or [0.0])
            decay = tf.pow(0.1, passed)
        return self.base * warmup * decay

    def get_config(self):
        return {
            "base": self.base,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "kind": self.kind,
            "boundaries": self.boundaries,
        }


# === Optimiser and strategy ===


def build_optimizer(train_config, steps_per_epoch):
    """Adam/AdamW/SGD with warmup + step/cosine decay, optional EMA and gradient-norm clipping."""
    total = train_config.epochs * steps_per_epoch
    schedule = WarmupSchedule(
        train_config.learning_rate,
        train_config.warmup_steps,
        total,
        train_config.schedule,
        [e * steps_per_epoch for e in train_config.decay_epochs],
    )
    options = dict(learning_rate=schedule, global_clipnorm=train_config.clipnorm)
    if train_config.ema_decay is not None:
        options.update(use_ema=True, ema_momentum=train_config.ema_decay)
    if train_config.optimizer == "adamw":
        return keras.optimizers.AdamW(weight_decay=train_config.weight_decay, **options)
    if train_config.optimizer == "sgd":
        # FCOS's optimiser: momentum 0.9 and weight decay (Keras applies it to the weights
        # directly; PyTorch adds it to the gradient before the momentum, nearly the same).
        return keras.optimizers.SGD(momentum=0.9, weight_decay=train_config.weight_decay, **options)
    return keras.optimizers.Adam(**options)


def make_strategy(name="mirrored"):
    """`mirrored`: all local GPUs (else all logical CPUs; one device: the default strategy);
    `one_device`: the first GPU, else the default strategy on the CPU;
    `multi_worker`: MultiWorkerMirroredStrategy configured by the TF_CONFIG variable."""
    # With a single device, the default strategy runs the same computation: an explicit
    # Mirrored/OneDevice strategy doubled the CPU training step here (268 vs 115 ms, shapes_tiny).
    # Listing devices starts the runtime, which MultiWorkerMirroredStrategy must precede.
    if name == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        if len(devices) > 1:
            return tf.distribute.MirroredStrategy([d.name for d in devices])
        return tf.distribute.get_strategy()
    if name == "one_device":
        gpus = tf.config.list_logical_devices("GPU")
        return tf.distribute.OneDeviceStrategy(gpus[0].name) if gpus else tf.distribute.get_strategy()
    if name == "multi_worker":
        _check_tf_config(os.environ.get("TF_CONFIG"))
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise UserError(f"Unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}.")


def _check_tf_config(text):
    """Refuses a TF_CONFIG that MultiWorkerMirroredStrategy would fail on deep inside TF (or
    wait on forever): JSON with a `cluster` of "host:port" lists and a `task` in it."""
    if not text:
        raise UserError("--strategy multi_worker needs the TF_CONFIG environment variable.")
    try:
        tf_config = json.loads(text)
    except ValueError as e:
        raise UserError(f"TF_CONFIG is not valid JSON ({e}).") from None
    cluster = tf_config.get("cluster") if isinstance(tf_config, dict) else None
    task = tf_config.get("task") if isinstance(tf_config, dict) else None
    if not (isinstance(cluster, dict) and cluster and all(
            isinstance(hosts, list) and all(re.fullmatch(r"[^:\s]+:\d{1,5}", str(h)) for h in hosts)
            for hosts in cluster.values())):
        raise UserError('TF_CONFIG needs "cluster": {"worker": ["host:port", ...], ...}; got '
                        f"{json.dumps(cluster) if cluster is not None else 'none'}.")
    if not (isinstance(task, dict) and task.get("type") in cluster and isinstance(task.get("index"), int)
            and 0 <= task["index"] < len(cluster[task["type"]])):
        raise UserError(f'TF_CONFIG needs "task": {{"type": one of {sorted(cluster)}, "index": its position}}; '
                        f"got {json.dumps(task)}.")


def _is_chief(strategy):
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    return resolver.task_type in ("chief", None) or (
        resolver.task_type == "worker" and resolver.task_id == 0
    )


# === Checkpoints ===


def _weights_bytes(model):
    """Bytes of a model's variables (its optimizer's too, when it has one): the size of its
    `.weights.h5`, give or take the HDF5 overhead."""
    variables = list(model.weights)
    if getattr(model, "optimizer", None) is not None:
        variables += list(model.optimizer.variables)
    return sum(int(np.prod(v.shape)) * tf.as_dtype(v.dtype).size for v in variables)


def save_weights(model, path, point):
    """`model.save_weights` through an atomic, space-checked write."""
    return files.atomic_write(path, model.save_weights, point, expected_size=_weights_bytes(model))


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


def weights_path(workdir, weights=None):
    """The weights file to evaluate or export: explicit, else best, else last."""
    if weights:
        if not os.path.isfile(weights):
            raise MissingError(f"--weights: file '{weights}' does not exist.")
        return weights
    for name in ("best", "last"):
        path = os.path.join(workdir, "checkpoints", f"{name}.weights.h5")
        if os.path.isfile(path):
            return path
    raise MissingError(
        f"No checkpoint in '{workdir}/checkpoints'; train first (centermask train --workdir "
        f"{workdir}) or pass --weights FILE."
    )


# === Training ===


def save_run_files(config, workdir, categories):
    """Writes the resolved config and the category list that evaluate/predict/export read."""
    Workdir(workdir).save_config(config)
    files.write_json(os.path.join(workdir, "categories.json"), categories)


def _custom_loop(strategy, detector, optimizer, dataset, epochs, steps_per_epoch, workdir, chief, callbacks):
    """Epoch loop with `strategy.run` (used for multi-worker); resumes from `backup/`.

    What `fit` has, the chief has too: `callbacks` (COCO evaluation, TensorBoard) after every
    epoch and `history.csv`; `last.weights.h5` holds the averaged weights under EMA, as with
    `fit`. Every worker saves `last` (non-chief ones into a scratch folder), so all of them run
    the same ops."""
    distributed = iter(strategy.experimental_distribute_dataset(dataset))
    epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False)
    checkpoint = tf.train.Checkpoint(network=detector.network, optimizer=optimizer, epoch=epoch_var)
    # Non-chief workers write their (identical) state to a scratch folder of their own.
    scratch = os.path.join(workdir, f"worker_{strategy.cluster_resolver.task_id}")
    backup = os.path.join(workdir, "backup") if chief else os.path.join(scratch, "backup")
    weights_dir = os.path.join(workdir, "checkpoints") if chief else scratch
    manager = tf.train.CheckpointManager(checkpoint, backup, max_to_keep=1)
    if manager.latest_checkpoint:
        checkpoint.restore(manager.latest_checkpoint)

    def replica_step(images, targets):
        with tf.GradientTape() as tape:
            outputs = detector.network(images, training=True)
            losses = compute_losses(outputs, targets, detector.loss_weights)
            scaled = losses["total"] / strategy.num_replicas_in_sync
        variables = detector.network.trainable_variables
        optimizer.apply_gradients(zip(tape.gradient(scaled, variables), variables))
        return losses

    @tf.function
    def train_step(batch):
        losses = strategy.run(replica_step, args=batch)
        return {k: strategy.reduce("MEAN", v, axis=None) for k, v in losses.items()}

    statistics = detector.network.non_trainable_variables

    @tf.function
    def sync_statistics():
        # BatchNorm moving statistics are updated from each worker's own shard; averaging
        # them keeps every worker's weights identical (trainable ones already are).
        local = strategy.run(lambda: [tf.identity(v.value) for v in statistics])
        for variable, value in zip(statistics, local):
            variable.assign(strategy.reduce("MEAN", value, axis=None))

    run = Workdir(workdir)
    start = int(epoch_var.numpy())
    # Rows of the epochs before a resume come from the history.csv the chief wrote then.
    rows = [row for row in run.read_history() if row["epoch"] < start] if chief else []
    history = []
    # Called one by one, not through keras' CallbackList, which hands each callback a copy of
    # the logs: the evaluation's val_*_AP must reach history.csv.
    for callback in callbacks:
        callback.set_model(detector)
        callback.set_params({"epochs": epochs, "steps": steps_per_epoch, "verbose": 0})
        callback.on_train_begin()
    for epoch in range(start, epochs):
        progress = keras.utils.Progbar(steps_per_epoch, verbose=1 if chief else 0)
        for step in range(steps_per_epoch):
            losses = train_step(next(distributed))
            # The names `fit` logs: `loss` and `<term>_loss`.
            logs = {("loss" if k == "total" else f"{k}_loss"): float(v) for k, v in losses.items()}
            progress.update(step + 1, [(k, v) for k, v in logs.items()])
        sync_statistics()
        epoch_var.assign(epoch + 1)
        manager.save()
        for callback in callbacks:
            callback.on_epoch_end(epoch, logs)
        history.append(logs)
        with averaged_weights(detector):
            save_weights(detector.network, os.path.join(weights_dir, "last.weights.h5"), "last")
        if chief:
            rows.append({"epoch": epoch, **logs})
            run.write_history(rows)
    for callback in callbacks:
        callback.on_train_end()
    return history


def config_train_dataset(config, builder):
    """The training `tf.data` pipeline for a full `Config` (targets encoded for its model)."""
    from centermask_tf.data.pipeline import train_dataset
    from centermask_tf.model.centermask import OUTPUT_STRIDE

    model = config.model
    encode = None
    if model.type == "fcos":
        encode = functools.partial(
            encode_fcos_targets, input_size=model.input_size, max_instances=config.data.max_instances,
            mask_size=model.mask_size, mask_samples=model.mask_samples,
        )
    return train_dataset(
        builder,
        config.data,
        input_size=model.input_size,
        num_classes=model.num_classes,
        mask_size=model.mask_size,
        batch_size=config.train.batch_size,
        stride=OUTPUT_STRIDE,
        seed=config.train.seed,
        map_masks=model.assembly == "native",
        encode=encode,
    )


def train(config, workdir, strategy_name="mirrored", extra_callbacks=(), overwrite=False):
    """Trains `config` into `workdir`; rerunning the same command resumes where it stopped.

    A workdir whose run finished is refused (`WorkdirError`) unless `train.epochs` is larger,
    which continues it; `overwrite=True` moves the old run into `workdir/previous/` first. A
    second process training into the same workdir is refused (`files.BusyError`).

    Returns:
        The list of per-epoch logs of the epochs run by this call.
    """
    strategy = make_strategy(strategy_name)
    if strategy_name == "multi_worker":
        # Workers share the chief's workdir; only the chief writes its run files.
        chief = _is_chief(strategy)
        with Workdir(workdir).lock() if chief else contextlib.nullcontext():
            return _train_multi_worker(config, workdir, strategy, chief)
    run = Workdir(workdir)
    with run.lock():
        state = run.start(config, overwrite)
        run.recover(state)
        return _fit(config, run, state, strategy, extra_callbacks)


def _prepare(config, workdir, strategy, save):
    """Seeds, precision, the prepared dataset, its categories and steps per epoch; `save`:
    write the run files."""
    from centermask_tf.data.tfds_builder import prepare_dataset

    keras.utils.set_random_seed(config.train.seed)
    if config.train.mixed_precision:
        keras.mixed_precision.set_global_policy(config.train.mixed_precision)
    builder = prepare_dataset(config.data)
    categories = builder.info.metadata["categories"]
    if len(categories) != config.model.num_classes:
        raise DataError(
            f"model.num_classes={config.model.num_classes} but {config.data.train.annotations} "
            f"has {len(categories)} categories; set --set model.num_classes={len(categories)}."
        )
    batch = config.train.batch_size
    if batch % strategy.num_replicas_in_sync:
        raise DataError(
            f"train.batch_size={batch} is the global batch; it must divide evenly over "
            f"{strategy.num_replicas_in_sync} replicas."
        )
    num_train = builder.info.splits["train"].num_examples
    if num_train < batch:
        raise DataError(
            f"data.train ({config.data.train.annotations}) has {num_train} usable images, fewer than "
            f"train.batch_size={batch}; the warnings above name the skipped ones. Fix the data or "
            "lower train.batch_size."
        )
    if not _has_objects(builder):
        raise DataError(
            f"data.train ({config.data.train.annotations}) has {num_train} usable images but not one "
            "annotation that can be trained on (every object is a crowd region, has no area, or "
            "the file has none); training would learn nothing. Check the annotation file."
        )
    steps_per_epoch = config.train.steps_per_epoch or num_train // batch
    logger.info("training on %d replica(s), %d steps per epoch", strategy.num_replicas_in_sync, steps_per_epoch)
    if save:
        save_run_files(config, workdir, categories)
    return builder, categories, steps_per_epoch


def _has_objects(builder):
    """Whether some training image has an object that can get a target slot. Stops at the first
    one (no image is decoded), so it reads the whole split only when there is none."""
    counts = builder.as_dataset(split="train", shuffle_files=False).map(
        lambda example: tf.size(target_instances(example["objects"]["bbox"], example["objects"]["is_crowd"], 1)[0])
    )
    return any(True for _ in counts.filter(lambda n: n > 0).take(1))


def _build_detector(config, categories, steps_per_epoch):
    from centermask_tf.detector import CenterMask

    if config.train.saliency_weight > 0 and config.model.mask_factors == "shape":
        raise UserError(
            "train.saliency_weight > 0 supervises the Saliency head, which a model.mask_factors=shape "
            "network does not have; set train.saliency_weight=0 or another model.mask_factors."
        )
    return CenterMask(config, categories), build_optimizer(config.train, steps_per_epoch)


def _train_multi_worker(config, workdir, strategy, chief):
    builder, categories, steps_per_epoch = _prepare(config, workdir, strategy, save=chief)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    dataset = config_train_dataset(config, builder).with_options(options)
    with strategy.scope():
        detector, optimizer = _build_detector(config, categories, steps_per_epoch)
        detector.compile(optimizer=optimizer)  # not for fit: so that averaged_weights finds the EMA
    callbacks = []
    if chief:
        if "val" in builder.info.splits and config.eval.every_epochs > 0:
            from centermask_tf.evaluation import CocoEvalCallback

            callbacks.append(CocoEvalCallback(detector, builder, config, workdir, config.eval.every_epochs))
        callbacks.append(keras.callbacks.TensorBoard(os.path.join(workdir, "logs"), update_freq="epoch"))
    return _custom_loop(
        strategy, detector, optimizer, dataset, config.train.epochs, steps_per_epoch, workdir, chief, callbacks
    )


def _fit(config, run, state, strategy, extra_callbacks):
    """`model.fit` from the committed epoch of `state` to `config.train.epochs`."""
    # Saved again when continuing a run: the config may hold more epochs now.
    builder, categories, steps_per_epoch = _prepare(config, run.path, strategy, save=True)
    with strategy.scope():
        detector, optimizer = _build_detector(config, categories, steps_per_epoch)
        detector.compile(optimizer=optimizer)
        # Restoring needs a built model and optimizer.
        size = config.model.input_size
        detector(tf.zeros([1, size, size, 3]))
        optimizer.build(detector.trainable_variables)
    if state.backup:
        try:
            detector.load_weights(run.join(state.backup))
        except (OSError, ValueError) as e:
            raise WorkdirError(
                f"cannot resume from '{run.join(state.backup)}' ({str(e).splitlines()[0][:200]}); "
                "pass --overwrite to move this run aside and start over."
            ) from None
        logger.info("resuming after epoch %d of %d", state.epochs_done, state.epochs)
    network = detector.network
    callbacks = []
    # Order matters: evaluation adds val_*_AP to the logs that the later callbacks record.
    evaluating = "val" in builder.info.splits and config.eval.every_epochs > 0
    # A continued run may have turned evaluation on or off (eval.* may change).
    state.follow("val_segm_AP" if evaluating else "loss")
    if evaluating:
        from centermask_tf.evaluation import CocoEvalCallback

        last = state.history[-1] if state.history else {}
        callbacks.append(CocoEvalCallback(detector, builder, config, run.path, config.eval.every_epochs, last))
    callbacks += [
        *extra_callbacks,
        keras.callbacks.TensorBoard(run.join("logs"), update_freq="epoch"),
        RunCheckpoint(network, run, state),
    ]
    history = []
    if state.epochs_done < state.epochs:
        fitted = detector.fit(
            config_train_dataset(config, builder), epochs=state.epochs, initial_epoch=state.epochs_done,
            steps_per_epoch=steps_per_epoch, callbacks=callbacks,
            # A progress bar redrawn at every step makes a log file megabytes long: one line
            # per epoch when stdout is not a terminal.
            verbose=1 if sys.stdout.isatty() else 2,
            shuffle=False,  # the pipeline shuffles; Keras warns that it cannot
        )
        history = [dict(zip(fitted.history, values)) for values in zip(*fitted.history.values())]
    files.atomic_write(run.join("model.keras"), network.save, "model", expected_size=_weights_bytes(network))
    state.finished = True
    run.save_state(state)
    return history
