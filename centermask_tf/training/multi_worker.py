"""Multi-worker training (MultiWorkerMirroredStrategy): a `strategy.run` epoch loop, since Keras
3's `fit` fails under that strategy (keras-team/keras#20585).

The chief's workdir is the run, started, resumed and committed as `fit`'s (`Workdir.start`,
`recover`, `RunCheckpoint`), so a killed multi-worker run resumes under the same guarantees.
Every other worker commits the same epochs into a scratch run of its own,
`WORKDIR/worker_<index>/` (saving runs the same ops on every worker), and takes the chief's
decision, epoch, weights and optimiser state through collectives at the start: workers need not
share a filesystem, and a run the chief refuses stops every worker.
"""

import contextlib
import logging
import os
import shutil

import keras
import numpy as np
import tensorflow as tf

from centermask_tf.errors import UserError
from centermask_tf.training.setup import (
    build_detector,
    config_train_dataset,
    epoch_callbacks,
    finish,
    initial_layers,
    prepare,
    set_backbone_trainable,
)
from centermask_tf.training.strategies import is_chief
from centermask_tf.workdir import Workdir, WorkdirError

logger = logging.getLogger("centermask_tf.training")


def from_first_replica(strategy, values):
    """`values` (variables or tensors, read on each replica) as the first replica, on the chief,
    holds them: an all-reduce to which only that replica contributes."""

    def local():
        first = tf.distribute.get_replica_context().replica_id_in_sync_group == 0
        return [tf.where(first, tf.identity(value), tf.zeros_like(value)) for value in values]

    return [strategy.reduce("SUM", value, axis=None) for value in strategy.run(local)]


def train_multi_worker(config, workdir, strategy, overwrite=False):
    """`train()` under a MultiWorkerMirroredStrategy; returns the logs of the epochs it ran."""
    chief = is_chief(strategy)
    if chief:
        run = Workdir(workdir)
    else:
        run = Workdir(os.path.join(workdir, f"worker_{strategy.cluster_resolver.task_id}"))
        shutil.rmtree(run.path, ignore_errors=True)  # scratch: the chief's state decides
    with contextlib.ExitStack() as held:
        refusal = state = initial = None
        try:
            initial = initial_layers(config, run, overwrite and chief)
            held.enter_context(run.lock())
            state = run.start(config, overwrite and chief)
        except UserError as e:  # every worker must reach the collective below, refused or not
            refusal = e
        refused = strategy.reduce("SUM", strategy.run(lambda: tf.constant(int(refusal is not None))), axis=None)
        if refusal is not None:
            raise refusal
        if int(refused):
            raise WorkdirError(f"another worker refused to train into '{workdir}'; its log says why.")
        run.recover(state)
        builder, categories, steps_per_epoch = prepare(config, run.path, strategy)
        detector = build_detector(config, categories, steps_per_epoch, strategy, run, state, initial)
        _take_chief_state(strategy, detector, state)
        callbacks = epoch_callbacks(config, builder, detector, run, state, chief=chief)
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        dataset = config_train_dataset(config, builder).with_options(options)
        history = _epochs(strategy, detector, dataset, state, steps_per_epoch, callbacks, chief,
                          config.train.freeze_backbone_epochs)
        finish(run, state, detector.network)
        return history


def _take_chief_state(strategy, detector, state):
    """Gives every worker the chief's committed epoch, weights and optimiser state."""
    variables = [*detector.network.variables, *detector.optimizer.variables]
    epochs_done, *values = from_first_replica(strategy, [tf.constant(state.epochs_done), *variables])
    for variable, value in zip(variables, values):
        variable.assign(value)
    state.epochs_done = int(epochs_done)


def _train_step(strategy, detector):
    """One distributed optimiser step over the variables trainable now."""
    variables = detector.network.trainable_variables

    def replica_step(images, targets):
        with tf.GradientTape() as tape:
            loss = detector.compute_loss(y=targets, y_pred=detector(images, training=True))
        detector.optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    @tf.function
    def train_step(batch):
        # Each replica's loss is already divided by the replica count (`compute_loss`).
        return strategy.reduce("SUM", strategy.run(replica_step, args=batch), axis=None)

    return train_step


def _epochs(strategy, detector, dataset, state, steps_per_epoch, callbacks, chief, frozen_epochs):
    """Epochs `state.epochs_done` .. `state.epochs - 1`, the backbone frozen in those below
    `frozen_epochs`; each ends with `callbacks`, whose last one (`RunCheckpoint`) commits it.
    Logs carry the names `fit` logs: `loss` (the epoch's mean total loss) and `<term>_loss`
    (the detector's trackers)."""
    distributed = iter(strategy.experimental_distribute_dataset(dataset))
    steps = {}  # one traced step per backbone state
    statistics = detector.network.non_trainable_variables

    @tf.function
    def sync_statistics():
        # BatchNorm moving statistics are updated from each worker's own shard; averaging
        # them keeps every worker's weights identical (trainable ones already are).
        local = strategy.run(lambda: [tf.identity(v.value) for v in statistics])
        for variable, value in zip(statistics, local):
            variable.assign(strategy.reduce("MEAN", value, axis=None))

    # Called one by one, not through keras' CallbackList, which hands each callback a copy of
    # the logs: the evaluation's val_*_AP must reach the commit.
    for callback in callbacks:
        callback.set_model(detector)
        callback.set_params({"epochs": state.epochs, "steps": steps_per_epoch, "verbose": 0})
        callback.on_train_begin()
    history = []
    for epoch in range(state.epochs_done, state.epochs):
        trainable = epoch >= frozen_epochs
        set_backbone_trainable(detector, trainable)
        if trainable not in steps:
            steps[trainable] = _train_step(strategy, detector)
        progress = keras.utils.Progbar(steps_per_epoch, verbose=1 if chief else 0)
        for tracker in detector.loss_trackers.values():
            tracker.reset_state()
        totals = []
        for step in range(steps_per_epoch):
            totals.append(float(steps[trainable](next(distributed))))
            logs = {"loss": float(np.mean(totals))}
            logs |= {tracker.name: float(tracker.result()) for tracker in detector.loss_trackers.values()}
            progress.update(step + 1, list(logs.items()))
        sync_statistics()
        for callback in callbacks:
            callback.on_epoch_end(epoch, logs)
        history.append(logs)
    for callback in callbacks:
        callback.on_train_end()
    return history
