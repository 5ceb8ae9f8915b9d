"""Timing helpers that import no TensorFlow, and a timing entry point for model files run in
its own process.

TFLite latency is measured in a process that never imports TensorFlow, as on a phone or an edge
board: with TensorFlow loaded in the same process, LiteRT's XNNPACK float kernels ran about
1.8x slower here (34 vs 62 ms for the edge config's fp32 model). An `.onnx` file (a peer model
to compare with, e.g. YOLOv8n-seg) is run by ONNX Runtime the same way (the `bench` extra).

    python -m centermask_tf.timing model.tflite --runs 20 --threads 2   # prints JSON
"""

import argparse
import collections
import contextlib
import json
import os
import statistics
import time

import numpy as np


def timings(fn, runs, warmup=2):
    """Seconds of each of `runs` calls of `fn` after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


class Stopwatch:
    """Wall seconds summed per named stage (`with watch("paste"): ...`; `watch.seconds`) and
    the process's peak resident memory when each stage last ended (`watch.peak_rss_mb`)."""

    def __init__(self):
        self.seconds = collections.defaultdict(float)
        self.peak_rss_mb = {}

    @contextlib.contextmanager
    def __call__(self, stage):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - start
            self.peak_rss_mb[stage] = peak_rss_mb()


def peak_rss_mb(children=False):
    """Peak resident memory in MB of this process (or, with `children`, of the largest of its
    finished child processes); None where the OS does not say (no `resource` module)."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF).ru_maxrss / 1024


def latency_row(times):
    """Min, median and p90 in milliseconds."""
    return {
        "min_ms": 1e3 * min(times),
        "median_ms": 1e3 * statistics.median(times),
        "p90_ms": 1e3 * float(np.percentile(times, 90)),
        "runs": len(times),
    }


def litert_latency(path, runs=20, threads=None):
    """Seconds of `runs` calls of a `.tflite` file's default signature on a random uint8 image,
    run by LiteRT (XNNPACK) with `threads` threads (default: all cores)."""
    from ai_edge_litert.interpreter import Interpreter

    with open(path, "rb") as f:
        interpreter = Interpreter(model_content=f.read(), num_threads=threads or os.cpu_count())
    runner = interpreter.get_signature_runner()
    (name, detail), = runner.get_input_details().items()
    image = np.random.default_rng(0).integers(0, 255, detail["shape"]).astype(detail["dtype"])
    return timings(lambda: runner(**{name: image}), runs)


def onnx_latency(path, runs=20, threads=None):
    """Seconds of `runs` forward passes of an `.onnx` file on a random float input in [0, 1],
    run by ONNX Runtime's CPU provider with `threads` intra-op threads (default: all cores)."""
    try:
        import onnxruntime
    except ImportError:
        raise SystemExit(f"timing {path} needs onnxruntime: .venv/bin/pip install -e '.[bench]'") from None
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or os.cpu_count()
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    (detail,) = session.get_inputs()
    image = np.random.default_rng(0).random(detail.shape, dtype=np.float32)
    return timings(lambda: session.run(None, {detail.name: image}), runs)


def block(outputs):
    """Forces execution to finish (numpy of every output)."""
    return {k: np.asarray(v) for k, v in outputs.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description="Time a .tflite (LiteRT) or .onnx (ONNX Runtime) model; prints JSON.")
    parser.add_argument("model")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    latency = onnx_latency if args.model.endswith(".onnx") else litert_latency
    times = latency(args.model, args.runs, args.threads)
    print(json.dumps({**latency_row(times), "times_ms": [1e3 * t for t in times]}))


if __name__ == "__main__":
    main()
