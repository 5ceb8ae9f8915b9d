"""Thin wrapper: `python scripts/benchmark.py data --config configs/coco_resnet18.yaml`
is `centermask benchmark data --config ...` (see `centermask benchmark --help`)."""

import sys

from centermask_tf.cli import main

if __name__ == "__main__":
    sys.exit(main(["benchmark", *sys.argv[1:]]))
