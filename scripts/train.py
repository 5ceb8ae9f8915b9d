"""Thin wrapper: `python scripts/train.py ARGS` is `centermask train ARGS`."""

import sys

from centermask_tf.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
