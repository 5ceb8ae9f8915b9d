"""Thin wrapper: `python scripts/evaluate.py ARGS` is `centermask evaluate ARGS`."""

import sys

from centermask_tf.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
