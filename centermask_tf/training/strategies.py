"""`tf.distribute` strategies by name, and the checks `TF_CONFIG` gets before TF reads it."""

import json
import logging
import os
import re

import tensorflow as tf

from centermask_tf.errors import UserError

logger = logging.getLogger(__name__)

STRATEGIES = ("mirrored", "one_device", "multi_worker")


def set_op_threads(threads):
    """Lets each TensorFlow op use `threads` threads (`train.intra_op_threads`; None keeps
    TensorFlow's default). TensorFlow fixes the number when it starts: in a process where it
    already runs with another number, this warns and changes nothing. Returns whether the
    process now runs with `threads`."""
    if threads is None:
        return True
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
    except RuntimeError:
        current = tf.config.threading.get_intra_op_parallelism_threads() or "its default (every core)"
        logger.warning("train.intra_op_threads=%d not applied: TensorFlow already runs in this process "
                       "with %s threads per op; it applies when set before any TensorFlow work, as "
                       "the centermask commands do.", threads, current)
        return False
    return True


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



def is_chief(strategy):
    """Whether this process is the chief: the worker that owns the run's workdir."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    return resolver.task_type in ("chief", None) or (
        resolver.task_type == "worker" and resolver.task_id == 0
    )
