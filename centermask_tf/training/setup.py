"""What both training loops set up the same way: seeds and precision, the prepared dataset and
its checks, the detector and optimiser, and the training pipeline."""

import logging

import keras
import tensorflow as tf

from centermask_tf import files
from centermask_tf.arch import architecture, build_network
from centermask_tf.data.coco import DataError
from centermask_tf.data.instances import target_instances
from centermask_tf.data.pipeline import train_dataset
from centermask_tf.data.tfds_builder import prepare_dataset
from centermask_tf.detector import CenterMask, source_layers
from centermask_tf.errors import UserError
from centermask_tf.model.backbones import backbone_layers
from centermask_tf.training.callbacks import CocoEvalCallback, RunCheckpoint
from centermask_tf.training.optimizer import build_optimizer
from centermask_tf.transfer import transfer_weights
from centermask_tf.workdir import WorkdirError, save_run_files, weights_bytes

logger = logging.getLogger("centermask_tf.training")


def config_train_dataset(config, builder):
    """The training `tf.data` pipeline for a full `Config` (targets encoded for its architecture)."""
    return train_dataset(
        builder, config.data, input_size=config.model.input_size, batch_size=config.train.batch_size,
        encode=architecture(config.model).target_encoder(config), seed=config.train.seed,
    )



def initial_layers(config, run, overwrite=False):
    """The layers of `train.init_from` and its description (`source_layers`) when a run
    starts, None when it resumes (its own checkpoints win) or has no init_from. Read before the workdir is touched,
    so a source that is missing, unreadable or matches nothing stops the run with nothing
    written."""
    if not config.train.init_from:
        return None
    state = None if overwrite else run.load_state()
    if state and state.epochs_done:
        logger.info("train.init_from ignored: the run resumes from its own epoch %d", state.epochs_done)
        return None
    layers, name = source_layers(config.train.init_from, config.model)
    transfer_weights(build_network(config.model), layers, name, config.model.num_classes, apply=False)
    return layers, name


def prepare(config, workdir, strategy):
    """Seeds, precision, the prepared dataset, its categories and steps per epoch; writes the
    run files (again when continuing a run: the config may hold more epochs now)."""
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
    if not has_objects(builder):
        raise DataError(
            f"data.train ({config.data.train.annotations}) has {num_train} usable images but not one "
            "annotation that can be trained on (every object is a crowd region, has no area, or "
            "the file has none); training would learn nothing. Check the annotation file."
        )
    steps_per_epoch = config.train.steps_per_epoch or num_train // batch
    threads = tf.config.threading.get_intra_op_parallelism_threads()  # 0: TensorFlow's default
    logger.info("training on %d replica(s), %d steps per epoch, %s per op", strategy.num_replicas_in_sync,
                steps_per_epoch, f"{threads} thread(s)" if threads else "every core")
    save_run_files(config, workdir, categories)
    return builder, categories, steps_per_epoch



def has_objects(builder):
    """Whether some training image has an object that can get a target slot. Stops at the first
    one (no image is decoded), so it reads the whole split only when there is none."""
    counts = builder.as_dataset(split="train", shuffle_files=False).map(
        lambda example: tf.size(target_instances(example["objects"]["bbox"], example["objects"]["is_crowd"], 1)[0])
    )
    return any(True for _ in counts.filter(lambda n: n > 0).take(1))



def build_detector(config, categories, steps_per_epoch, strategy, run, state, initial=None):
    """The detector with its compiled optimiser, built in `strategy`'s scope, holding the
    weights and optimiser state of the epoch `state` committed in `run` (if any), else the
    matching layers of `initial` (`initial_layers`)."""
    if config.train.saliency_weight > 0 and config.model.mask_factors == "shape":
        raise UserError(
            "train.saliency_weight > 0 supervises the Saliency head, which a model.mask_factors=shape "
            "network does not have; set train.saliency_weight=0 or another model.mask_factors."
        )
    with strategy.scope():
        detector = CenterMask(config, categories)
        optimizer = build_optimizer(config.train, steps_per_epoch)
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
    elif initial is not None:
        report = transfer_weights(detector.network, *initial, config.model.num_classes)
        logger.info("%s", report.summary())
    return detector


def backbone_phases(config, state):
    """`(first epoch, end epoch, backbone trainable)` of the epochs left: the frozen ones
    (`train.freeze_backbone_epochs`) first."""
    frozen = min(config.train.freeze_backbone_epochs, state.epochs)
    phases = [(state.epochs_done, frozen, False), (max(state.epochs_done, frozen), state.epochs, True)]
    return [phase for phase in phases if phase[0] < phase[1]]


def set_backbone_trainable(detector, trainable):
    """Freezes (`False`) or unfreezes the backbone's own layers; a frozen BatchNorm runs in
    inference mode (Keras 3)."""
    for layer in backbone_layers(detector.network):
        layer.trainable = trainable


def epoch_callbacks(config, builder, detector, run, state, extra=(), chief=True):
    """What runs at each epoch's end, in order: COCO evaluation (it adds val_*_AP to the logs
    the later callbacks record), `extra`, TensorBoard, and the workdir commit. Only the chief
    evaluates and writes TensorBoard logs."""
    evaluating = chief and "val" in builder.info.splits and config.eval.every_epochs > 0
    # A continued run may have turned evaluation on or off (eval.* may change).
    state.follow("val_segm_AP" if evaluating else "loss")
    callbacks = []
    if evaluating:
        last = state.history[-1] if state.history else {}
        callbacks.append(CocoEvalCallback(detector, builder, config, run.path, config.eval.every_epochs, last))
    callbacks += list(extra)
    if chief:
        callbacks.append(keras.callbacks.TensorBoard(run.join("logs"), update_freq="epoch"))
    return [*callbacks, RunCheckpoint(detector.network, run, state)]


def finish(run, state, network):
    """Writes `model.keras` and marks the run finished."""
    files.atomic_write(run.join("model.keras"), network.save, "model", expected_size=weights_bytes(network))
    state.finished = True
    run.save_state(state)
