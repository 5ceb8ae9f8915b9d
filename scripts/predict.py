"""Thin wrapper: `python scripts/predict.py ARGS` is `centermask predict ARGS`."""

import sys

from centermask_tf.cli import main

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]]))
