"""`train()`: a `CenterMask` trained into a workdir that survives reruns and kills.

    centermask train --config configs/shapes_tiny.yaml --workdir work/demo

Single host (`mirrored`, the default, or `one_device`) trains with `model.fit`.
`multi_worker` (MultiWorkerMirroredStrategy from `TF_CONFIG`) trains with a `strategy.run` loop
instead (`multi_worker.py`): Keras 3's `fit` fails under that strategy (keras-team/keras#20585).
Both start and resume the workdir the same way (`Workdir.start`/`recover`), train the
detector's own loss with the same optimiser, and commit each epoch with `RunCheckpoint`; the
workdir's layout, epoch commits and refusals are described in `workdir.py`.
"""

import sys

from centermask_tf.arch import architecture
from centermask_tf.training.multi_worker import train_multi_worker
from centermask_tf.training.setup import (
    backbone_phases,
    build_detector,
    config_train_dataset,
    epoch_callbacks,
    finish,
    initial_layers,
    prepare,
    set_backbone_trainable,
)
from centermask_tf.training.strategies import make_strategy, set_op_threads
from centermask_tf.workdir import Workdir


def train(config, workdir, strategy_name="mirrored", extra_callbacks=(), overwrite=False):
    """Trains `config` into `workdir`; rerunning the same command resumes where it stopped.

    A workdir whose run finished is refused (`WorkdirError`) unless `train.epochs` is larger,
    which continues it; `overwrite=True` moves the old run into `workdir/previous/` first. A
    second process training into the same workdir is refused (`files.BusyError`).

    Returns:
        The list of per-epoch logs of the epochs run by this call.
    """
    architecture(config.model)  # a config its architecture cannot build fails before any data work
    set_op_threads(config.train.intra_op_threads)  # before make_strategy starts TensorFlow
    strategy = make_strategy(strategy_name)
    if strategy_name == "multi_worker":
        return train_multi_worker(config, workdir, strategy, overwrite)
    run = Workdir(workdir)
    initial = initial_layers(config, run, overwrite)
    with run.lock():
        state = run.start(config, overwrite)
        run.recover(state)
        return _fit(config, run, state, strategy, extra_callbacks, initial)


def _fit(config, run, state, strategy, extra_callbacks, initial):
    """`model.fit` from the committed epoch of `state` to `config.train.epochs`, the first
    `train.freeze_backbone_epochs` with the backbone frozen."""
    builder, categories, steps_per_epoch = prepare(config, run.path, strategy)
    detector = build_detector(config, categories, steps_per_epoch, strategy, run, state, initial)
    callbacks = epoch_callbacks(config, builder, detector, run, state, extra_callbacks)
    history = []
    for start, end, trainable in backbone_phases(config, state):
        if config.train.freeze_backbone_epochs:
            set_backbone_trainable(detector, trainable)
            with strategy.scope():  # fit traces its step over the variables trainable now
                detector.compile(optimizer=detector.optimizer)
        fitted = detector.fit(
            config_train_dataset(config, builder), epochs=end, initial_epoch=start,
            steps_per_epoch=steps_per_epoch, callbacks=callbacks,
            # A progress bar redrawn at every step makes a log file megabytes long: one line
            # per epoch when stdout is not a terminal.
            verbose=1 if sys.stdout.isatty() else 2,
            shuffle=False,  # the pipeline shuffles; Keras warns that it cannot
        )
        history += [dict(zip(fitted.history, values)) for values in zip(*fitted.history.values())]
    finish(run, state, detector.network)
    return history
