"""Subprocess entry for the distributed and resume tests.

    python -m tests.train_worker CONFIG_OVERRIDES_JSON WORKDIR STRATEGY [LOGICAL_CPUS]

Splits the CPU into LOGICAL_CPUS logical devices before TensorFlow runs any op (that must
happen first in a process), then trains with `centermask_tf.training.train.train`.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main():
    overrides, workdir, strategy = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
    logical = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    import tensorflow as tf

    if logical > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * logical)

    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from centermask_tf.config import load_config
    from centermask_tf.training.train import train

    config = load_config("configs/shapes_tiny.yaml", overrides)
    history = train(config, workdir, strategy)
    print("HISTORY " + json.dumps([{k: float(v) for k, v in logs.items()} for logs in history]))


if __name__ == "__main__":
    main()
