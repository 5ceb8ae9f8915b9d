"""Thin wrapper: `python scripts/benchmark.py all --quick` is `centermask benchmark all --quick`.

    python scripts/benchmark.py inference|efficiency|assembly|data|train|all [--quick]
        [--config configs/edge_mobilenetv3.yaml ...] [--runs 20] [--plots]

Each sub-benchmark prints a table and appends a record (machine, CPU flags, cores, TF/Keras
versions, config, date) to benchmarks/results.json; see BENCHMARKS.md.
"""

import sys

from centermask_tf.cli import main

if __name__ == "__main__":
    sys.exit(main(["benchmark", *sys.argv[1:]]))
