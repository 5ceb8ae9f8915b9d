"""Benchmarks that print a table and append a record to `benchmarks/results.json`.

Each record carries the machine (CPU model and flags, core count), TF/Keras versions, the
config and the date, so numbers from different runs stay comparable. Timings are medians of
several runs after a warm-up.
"""

import datetime
import json
import os
import platform
import statistics
import tempfile
import time

import keras
import tensorflow as tf

RESULTS = os.path.join("benchmarks", "results.json")


def machine_info():
    cpu, flags = platform.processor(), []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not cpu:
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    wanted = ("avx", "avx2", "avx512f", "fma", "sse4_2", "amx_tile")
                    flags = sorted(set(line.split(":", 1)[1].split()) & set(wanted))
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_flags": flags,
        "cores": os.cpu_count(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "python": platform.python_version(),
    }


def append_result(kind, config_name, rows, path=RESULTS):
    """Appends one benchmark record to the results JSON list."""
    record = {
        "benchmark": kind,
        "config": config_name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "rows": rows,
    }
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    records = []
    if os.path.exists(path):
        with open(path) as f:
            records = json.load(f)
    records.append(record)
    with open(path, "w") as f:
        json.dump(records, f, indent=1)
    return record


def print_table(rows, columns):
    widths = [max(len(c), *(len(_fmt(r[c])) for r in rows)) + 2 for c in columns]
    print("".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in rows:
        print("".join(_fmt(row[c]).rjust(w) for c, w in zip(columns, widths)))


def _fmt(value):
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def data_throughput(config, *, runs=3, batches=20, warmup=3, workdir=None, images=64):
    """Training-pipeline images/s at `config.model.input_size` with augmentation.

    Uses a shapes set of 640-px images (COCO-like sizes) generated once under `workdir`.
    Returns a row with the median and every run's images/s.
    """
    from centermask_tf.data.shapes import make_shapes
    from centermask_tf.data.tfds_builder import prepare_dataset
    from centermask_tf.training import config_train_dataset

    workdir = workdir or os.path.join(tempfile.gettempdir(), "centermask_bench")
    root = os.path.join(workdir, "shapes640")
    if not os.path.exists(os.path.join(root, "annotations", "instances_train.json")):
        make_shapes(root, train=images, val=1, seed=0, image_size=640)
    config.data.train.annotations = os.path.join(root, "annotations", "instances_train.json")
    config.data.train.images = os.path.join(root, "train")
    config.data.val.annotations = config.data.val.images = None
    config.data.tfds_data_dir = os.path.join(workdir, "tfds")
    dataset = config_train_dataset(config, prepare_dataset(config.data))
    rates = []
    for _ in range(runs):
        iterator = iter(dataset)
        for _ in range(warmup):
            next(iterator)
        start = time.perf_counter()
        for _ in range(batches):
            next(iterator)
        rates.append(batches * config.train.batch_size / (time.perf_counter() - start))
    return {
        "input_size": config.model.input_size,
        "batch_size": config.train.batch_size,
        "images_per_s": statistics.median(rates),
        "runs": [round(r, 1) for r in rates],
    }
