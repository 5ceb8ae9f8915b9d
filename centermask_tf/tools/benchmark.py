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
import subprocess
import sys
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf

from centermask_tf.arch import architecture, build_network
from centermask_tf.arch.centernet.network import OUTPUT_STRIDE
from centermask_tf.arch.fcos import ARCH as FCOS
from centermask_tf.config import ConfigError, load_config
from centermask_tf.data.service import local_service
from centermask_tf.data.shapes import make_clip, make_shapes
from centermask_tf.data.tfds_builder import prepare_dataset
from centermask_tf.detector import CenterMask
from centermask_tf.export.serving import (
    detection_outputs,
    export_saved_model,
    image_detector,
    letterbox_with_extents,
)
from centermask_tf.export.tflite import config_calibration, export_tflite
from centermask_tf.files import write_json
from centermask_tf.images import load_image
from centermask_tf.model.assembly import assemble_box_masks
from centermask_tf.predict import predict_video
from centermask_tf.timing import block, latency_row, timings
from centermask_tf.tools.flops import count_flops, model_flops
from centermask_tf.tools.scale import SCALE_CACHE, scale
from centermask_tf.training.setup import config_train_dataset
from centermask_tf.video import read_frames

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
                    wanted = (
                        "avx", "avx2", "avx512f", "avx512_vnni", "avx512_bf16", "fma", "sse4_2", "amx_tile"
                    )
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
    write_json(path, records)  # temp file + rename: a killed run never truncates earlier records
    return record


def print_table(rows, columns):
    """Rows as a right-aligned table; a row without a column's key shows "-" there."""
    cells = [[_fmt(row[c]) if c in row else "-" for c in columns] for row in rows]
    widths = [max(len(c), *(len(line[i]) for line in cells)) + 2 for i, c in enumerate(columns)]
    print("".join(c.rjust(w) for c, w in zip(columns, widths)))
    for line in cells:
        print("".join(cell.rjust(w) for cell, w in zip(line, widths)))


def _fmt(value):
    if not isinstance(value, float):
        return str(value)
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3g}"  # ratios and small GFLOPs keep 3 digits


def bench_shapes(config, workdir=None, images=64, split_size=640):
    """Points `config.data` at a generated shapes set of COCO-like 640-px images (made once)."""
    workdir = workdir or os.path.join(tempfile.gettempdir(), "centermask_bench")
    root = os.path.join(workdir, f"shapes{split_size}_{images}")
    if not os.path.exists(os.path.join(root, "annotations", "instances_train.json")):
        make_shapes(root, train=images, val=1, seed=0, image_size=split_size)
    config.data.train.annotations = os.path.join(root, "annotations", "instances_train.json")
    config.data.train.images = os.path.join(root, "train")
    config.data.val.annotations = config.data.val.images = None
    config.data.tfds_data_dir = os.path.join(workdir, "tfds")
    return config


def data_throughput(config, *, runs=3, batches=20, warmup=3, workdir=None, images=64, workers=0):
    """Training-pipeline images/s at `config.model.input_size` with augmentation.

    Uses a shapes set of 640-px images (COCO-like sizes) generated once under `workdir`. With
    `workers` > 0 the batches are prepared by that many tf.data service workers started in this
    process on localhost (`data.service`), sharing this machine's cores with the reader.
    Returns a row with the median and every run's images/s.
    """
    bench_shapes(config, workdir, images)
    rates = []
    with local_service(workers) as address:
        config.data.service = address
        dataset = config_train_dataset(config, prepare_dataset(config.data))
        for _ in range(runs):
            iterator = iter(dataset)
            for _ in range(warmup):
                next(iterator)
            start = time.perf_counter()
            for _ in range(batches):
                next(iterator)
            rates.append(batches * config.train.batch_size / (time.perf_counter() - start))
    config.data.service = None
    return {
        "service_workers": workers,
        "input_size": config.model.input_size,
        "batch_size": config.train.batch_size,
        "images_per_s": statistics.median(rates),
        "runs": [round(r, 1) for r in rates],
    }


class _BatchEnds(keras.callbacks.Callback):
    """The `perf_counter` time at which each training step of each `fit` ended."""

    def __init__(self):
        super().__init__()
        self.fits = []

    def on_train_begin(self, logs=None):
        self.fits.append([])

    def on_train_batch_end(self, batch, logs=None):
        self.fits[-1].append(time.perf_counter())


def train_throughput(config, *, runs=3, steps=5, workdir=None):
    """Training-step images/s (forward, losses, backward, Adam update) on one cached batch, so
    the input pipeline is not in the measurement.

    A step is the time between two consecutive step ends inside one `fit` (median over `runs`
    fits of `steps` + 1 steps): not the whole `fit` call, whose return can wait for tf.data's
    autotuner to wake (its period doubles from 10 ms: 75-step fits whose steps took 5.5-6.7 s
    returned at 10.23 s here) and whose first step starts the iterator."""
    bench_shapes(config, workdir)
    config.model.weights = None  # same cost; no download
    batch = config_train_dataset(config, prepare_dataset(config.data)).take(1).cache().repeat()
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(config.train.mixed_precision or "float32")  # as training sets it
    ends = _BatchEnds()
    try:
        trainer = CenterMask(config)
        trainer.compile(optimizer=keras.optimizers.Adam(1e-4))
        trainer.fit(batch, epochs=1, steps_per_epoch=2, verbose=0)  # traces the step
        for _ in range(runs):
            trainer.fit(batch, epochs=1, steps_per_epoch=steps + 1, verbose=0, callbacks=[ends])
    finally:
        keras.mixed_precision.set_global_policy(policy)
    step = statistics.median(later - earlier for fit in ends.fits for earlier, later in zip(fit, fit[1:]))
    return {
        "input_size": config.model.input_size,
        "batch_size": config.train.batch_size,
        "precision": config.train.mixed_precision or "float32",
        "step_ms": 1e3 * step,
        "images_per_s": config.train.batch_size / step,
    }


# The GPU that `gpu_estimate` sizes the input pipeline for: 15 TFLOP/s, a V100's float32 peak
# (the class of GPU the paper trained on). An assumption, not a measurement: no GPU here.
ASSUMED_GPU_GFLOPS = 15_000.0


def gpu_estimate(pipeline, step, ceiling):
    """How many cores of this machine would feed one GPU, estimated, never measured on a GPU.

    The GPU's training images/s is this CPU's measured training images/s scaled by the ratio
    of `ASSUMED_GPU_GFLOPS` to this CPU's measured matmul ceiling (`ceiling`): it assumes both
    reach the same fraction of their peak on this network. A small network at a small batch
    reaches a far lower fraction on a GPU (launch-bound), and mixed precision a higher one.
    The pipeline's images/s per core is its measured images/s over this machine's cores,
    assuming it scales linearly with cores.

    Returns:
        {"images_per_s_per_core", "gpu_images_per_s_est", "cores_per_gpu_est"}.
    """
    per_core = pipeline["images_per_s"] / os.cpu_count()
    gpu = step["images_per_s"] * ASSUMED_GPU_GFLOPS / ceiling
    return {"images_per_s_per_core": per_core, "gpu_images_per_s_est": gpu, "cores_per_gpu_est": gpu / per_core}


def matmul_ceiling(sizes=(1024, 2048, 3072), runs=5):
    """float32 matmul GFLOP/s of this machine: the best over `sizes` of the median of `runs`
    `n x n` products."""
    best = 0.0
    for n in sizes:
        a = tf.random.normal([n, n])
        b = tf.random.normal([n, n])
        product = tf.function(lambda: tf.matmul(a, b))
        best = max(best, 2.0 * n**3 / statistics.median(timings(lambda: product().numpy(), runs)) / 1e9)
    return best


def efficiency(config, ceiling, *, runs=10):
    """FLOPs of the network (backbone + the five dense heads) per image and the GFLOP/s it
    achieves at batch 1 as a fraction of the matmul `ceiling`."""
    config.model.weights = None
    network = build_network(config.model)
    flops = model_flops(network)
    size = config.model.input_size
    images = tf.random.uniform([1, size, size, 3], 0, 255)
    forward = tf.function(lambda x: network(x, training=False))
    median = statistics.median(timings(lambda: block(forward(images)), runs))
    achieved = flops / median / 1e9
    return {
        "input_size": size,
        "gflops": flops / 1e9,
        "forward_ms": 1e3 * median,
        "gflop_per_s": achieved,
        "ceiling_gflop_per_s": ceiling,
        "fraction_of_ceiling": achieved / ceiling,
    }


def _file_latency(path, runs):
    """Seconds of each of `runs` calls of a model file (`.tflite`, `.onnx`), timed by
    `python -m centermask_tf.timing` in a fresh process that does not import TensorFlow."""
    command = [sys.executable, "-m", "centermask_tf.timing", path, "--runs", str(runs)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"timing {path} failed:\n{result.stderr[-2000:]}")
    return [t / 1e3 for t in json.loads(result.stdout.strip().splitlines()[-1])["times_ms"]]


def per_round_ratio(numerators, denominators):
    """The median over rounds of each round's ratio: times taken side by side compare on a host
    whose speed drifts between minutes, times from different minutes do not."""
    return statistics.median(n / d for n, d in zip(numerators, denominators))


def alternating_latency(files, runs, rounds):
    """Latency rows of model files `{form: path}` timed in turn, `rounds` times over, each time
    in a fresh TensorFlow-free process (`runs` calls after 2 warm-ups): min, median and p90
    over all calls. With a "peer" file each of the others also gets `peer_over_this`, the
    median over the rounds of the peer's median time over its own (`per_round_ratio`)."""
    times = {form: [] for form in files}
    medians = {form: [] for form in files}
    for _ in range(rounds):
        for form, path in files.items():
            seconds = _file_latency(path, runs)
            times[form] += seconds
            medians[form].append(statistics.median(seconds))
    rows = []
    for form, path in files.items():
        row = {"form": form, **latency_row(times[form]), "rounds": rounds, "batch": 1}
        row["images_per_s"] = 1e3 / row["median_ms"]  # a fixed batch-1 input: one image per call
        row["size_mb"] = os.path.getsize(path) / 1e6
        if "peer" in files and form != "peer":
            row["peer_over_this"] = per_round_ratio(medians["peer"], medians[form])
        rows.append(row)
    return rows


INFERENCE_FORMS = ("keras", "xla", "saved_model", "tflite_fp32", "tflite_fp16", "tflite_int8")


def inference(config, forms=INFERENCE_FORMS, *, runs=20, batch=8, batch_runs=3, rounds=3, run_dir=None,
              peer=None):
    """End-to-end latency (uint8 image in -> boxes, classes, scores, masks out) at batch 1 and
    throughput at batch `batch`, for each form of the model. Rows per form.

    `run_dir`: a trained workdir of the config: its network (classes, weights) is what is timed
    and exported, int8 calibrated as `centermask export` does it (`export.representative_images`
    images of its training data): what a user ships. Else random weights at the config's classes,
    calibrated on generated shapes. TFLite files (and the `peer` `.onnx` file) are timed in
    alternating `rounds` (`alternating_latency`)."""
    detector = _detector(config, run_dir)
    config = detector.config
    size = config.model.input_size
    rng = np.random.default_rng(0)
    one = tf.constant(rng.integers(0, 255, (1, size, size, 3), dtype=np.uint8))
    many = tf.constant(rng.integers(0, 255, (batch, size, size, 3), dtype=np.uint8))
    rows = []

    def measure(form, call):
        row = {"form": form, **latency_row(timings(lambda: block(call(one)), runs)), "batch": batch}
        seconds = statistics.median(timings(lambda: block(call(many)), batch_runs, warmup=1))
        row["images_per_s"] = batch / seconds
        report(row)

    def report(row):
        rows.append(row)
        peer_ratio = f"  peer/this {row['peer_over_this']:.2f}x" if "peer_over_this" in row else ""
        print(f"  {row['form']:12s} min {row['min_ms']:8.1f} ms  median {row['median_ms']:8.1f} ms  "
              f"p90 {row['p90_ms']:8.1f} ms  {row['images_per_s']:6.2f} images/s{peer_ratio}", flush=True)

    detect_images = image_detector(detector)
    if "keras" in forms:
        measure("keras", tf.function(detect_images))
    if "xla" in forms:  # XLA has no CropAndResize kernel: the letterbox stays outside
        compiled = tf.function(
            lambda canvases, extents: detection_outputs(detector, canvases, extents),
            jit_compile=True,
        )
        letterbox = tf.function(lambda images: letterbox_with_extents(images, size))
        measure("xla", lambda images: compiled(*letterbox(images)))
    with tempfile.TemporaryDirectory() as tmp:
        if "saved_model" in forms:
            path = export_saved_model(detector, os.path.join(tmp, "sm"))
            signature = tf.saved_model.load(path).signatures["image_tensor"]
            measure("saved_model", lambda images: signature(image_tensor=images))
        files = {}
        for form in [f for f in forms if f.startswith("tflite_")]:
            quantize = {"tflite_fp32": "none", "tflite_fp16": "fp16", "tflite_int8": "int8"}[form]
            calibration = None
            if quantize == "int8":
                calibration = config_calibration(config if run_dir else bench_shapes(config))
            files[form] = os.path.join(tmp, f"{form}.tflite")
            export_tflite(detector, files[form], quantize, calibration)
        if peer:
            files["peer"] = peer
        if files:
            for row in alternating_latency(files, runs, rounds):
                report(row)
    return rows


def assembly(config, ks=(1, 10, 50, 100, 200), sizes=(64, 128, 256), *, runs=20):
    """Box-mode mask assembly time vs K (at the config's output size) and vs output size
    (at K = 100), with the config's S, M and saliency channels."""
    model = config.model
    channels = model.num_classes if model.saliency == "specific" else 1
    rng = np.random.default_rng(0)

    def time_one(k, out):
        vectors = tf.constant(rng.normal(size=(1, k, model.shape_size**2)), tf.float32)
        centres = tf.constant(
            np.concatenate([rng.uniform(0, out, (1, k, 2)), rng.uniform(2, out / 2, (1, k, 2))], -1),
            tf.float32,
        )
        saliency = tf.constant(rng.normal(size=(1, out, out, channels)), tf.float32)
        classes = tf.constant(rng.integers(0, channels, (1, k)), tf.int32) if channels > 1 else None
        fn = tf.function(lambda: assemble_box_masks(vectors, centres, saliency, model.mask_size, classes))
        return 1e3 * statistics.median(timings(lambda: fn().numpy(), runs))

    native = model.input_size // OUTPUT_STRIDE
    rows = [{"k": k, "output": native, "ms": time_one(k, native)} for k in ks]
    rows += [{"k": 100, "output": out, "ms": time_one(100, out)} for out in sizes if out != native]
    for row in rows:
        row["us_per_instance"] = 1e3 * row["ms"] / row["k"]
    return rows


def fcos_inference(config, *, runs=7):
    """CenterMask-FCOS decoding a batch-1 canvas three ways, in alternating rounds: the Shape
    head dense over every location (`dense_shape`, the decoder on the training network's
    outputs), at the kept detections only (`sparse_shape`, what `CenterMask.decode` runs), and
    the latter with `model.saliency_stride: 8` (`sparse_shape_p3_saliency`). GFLOPs of each graph,
    latency median/p90, and the median per-round speed-up over `dense_shape`. Random weights."""
    if architecture(config.model) is not FCOS:
        raise ConfigError("benchmark fcos-heads times CenterMask-FCOS: pass an FCOS config such as "
                          "configs/coco_fcos_r50.yaml.")
    config.model.weights = None
    size = config.model.input_size
    forms = {}
    for stride in (4, 8):
        config.model.saliency_stride = stride
        detector = CenterMask(config)
        if stride == 4:
            forms["dense_shape"] = lambda canvases, d=detector: d.decoder(d.network(canvases, training=False))
            forms["sparse_shape"] = detector.decode
        else:
            forms["sparse_shape_p3_saliency"] = detector.decode
    spec = tf.TensorSpec([1, size, size, 3], tf.float32)
    canvas = tf.constant(np.random.default_rng(0).uniform(0, 255, (1, size, size, 3)), tf.float32)
    compiled = {name: tf.function(fn) for name, fn in forms.items()}
    times = {name: [] for name in forms}
    for fn in compiled.values():
        block(fn(canvas))  # trace and warm up
    for _ in range(runs):
        for name, fn in compiled.items():
            start = time.perf_counter()
            block(fn(canvas))
            times[name].append(time.perf_counter() - start)
    rows = []
    for name, seconds in times.items():
        rows.append({"form": name, "input_size": size, "gflops": count_flops(forms[name], spec) / 1e9,
                     **latency_row(seconds), "speedup": per_round_ratio(times["dense_shape"], seconds)})
    return rows


def _detector(config, workdir):
    """The workdir's trained detector (detections as a user gets them), else random weights."""
    if workdir:
        return CenterMask.from_workdir(workdir)
    config.model.weights = None
    return CenterMask(config)


def video_throughput(config, *, runs=3, frames=40, size=512, workdir=None):
    """Frames/s of a generated `size` x `size` H.264 clip: decoding alone, decoding and
    detecting (`detect_video`), and all of `predict` on a video (decode, detect, draw, polygons,
    encode the overlay MP4, write the JSON lines). Rows per stage, medians of `runs`."""
    detector = _detector(config, workdir)
    image_detector = detector.image_detector()
    names = {c["id"]: c["name"] for c in detector.categories}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        clip = os.path.join(tmp, "clip.mp4")
        make_clip(clip, frames, size=(size, size), fps=25)
        stages = {
            "decode": lambda: sum(1 for _ in read_frames(clip)),
            "decode+detect": lambda: sum(1 for _ in image_detector.detect_video(clip, batch_size=8)),
            "predict (+draw, polygons, encode)": lambda: predict_video(
                image_detector, clip, os.path.join(tmp, "out"), names, batch_size=8)["frames"],
        }
        for stage, call in stages.items():
            seconds = statistics.median(timings(call, runs, warmup=1))
            rows.append({"stage": stage, "frames": frames, "size": size, "frames_per_s": frames / seconds})
            print(f"  {stage:34s} {rows[-1]['frames_per_s']:7.1f} frames/s", flush=True)
    return rows


def tiling_latency(config, *, runs=5, size=512, workdir=None):
    """ms per `size`-px image (a grid of 16 generated shapes images) shrunk whole into the
    input, and cut into input-sized tiles at overlaps 0.25 and 0.5 (batches of 8 tiles), with
    the detections found. Medians of `runs`."""
    detector = _detector(config, workdir)
    cell = size // 4
    with tempfile.TemporaryDirectory() as tmp:
        make_shapes(tmp, train=0, val=16, seed=0, image_size=cell)
        folder = os.path.join(tmp, "val")
        pictures = [load_image(os.path.join(folder, name)) for name in sorted(os.listdir(folder))]
    image = np.full((size, size, 3), 114, np.uint8)
    for k, picture in enumerate(pictures):
        top, left = (k // 4) * cell, (k % 4) * cell
        image[top : top + picture.shape[0], left : left + picture.shape[1]] = picture
    rows = []
    for tile, overlap in [(None, 0.0), (config.model.input_size, 0.25), (config.model.input_size, 0.5)]:
        found = []
        seconds = timings(lambda: found.append(len(detector.detect(image, tile=tile, tile_overlap=overlap)[0])), runs)
        rows.append({"tile": tile or "whole", "overlap": overlap, "size": size, "ms": 1e3 * statistics.median(seconds),
                     "detections": found[-1]})
        print(f"  tile {str(rows[-1]['tile']):6s} overlap {overlap:4.2f}  {rows[-1]['ms']:8.1f} ms  "
              f"{found[-1]} detections", flush=True)
    return rows


def plot_results(path=RESULTS, output_dir="benchmarks"):
    """Two PNGs from the newest records in `path`: latency per format per config, and assembly
    time vs K. Needs matplotlib (`pip install -e .[plots]`); returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as f:
        records = json.load(f)
    newest = {}
    for record in records:  # later records replace earlier ones
        newest[(record["benchmark"], record["config"])] = record
    written = []

    inference = {cfg: rec["rows"] for (kind, cfg), rec in newest.items() if kind == "inference"}
    if inference:
        forms = [f for f in INFERENCE_FORMS if any(r["form"] == f for rows in inference.values() for r in rows)]
        fig, ax = plt.subplots(figsize=(8, 4))
        width = 0.8 / len(inference)
        for i, (cfg, rows) in enumerate(sorted(inference.items())):
            by_form = {r["form"]: r["median_ms"] for r in rows}
            xs = [j + i * width for j, f in enumerate(forms) if f in by_form]
            ax.bar(xs, [by_form[f] for f in forms if f in by_form], width, label=cfg.replace(".yaml", ""))
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(forms))], forms)
        ax.set_yscale("log")
        written.append(_save_plot(fig, ax, None, "median latency, batch 1 (ms, log)",
                                  "End-to-end latency at 512x512 (image in -> boxes + masks out)",
                                  os.path.join(output_dir, "latency.png")))

    assembly_rows = {cfg: rec["rows"] for (kind, cfg), rec in newest.items() if kind == "assembly"}
    if assembly_rows:
        fig, ax = plt.subplots(figsize=(6, 4))
        for cfg, rows in sorted(assembly_rows.items()):
            native = rows[0]["output"]
            points = sorted((r["k"], r["ms"]) for r in rows if r["output"] == native)
            ax.plot(*zip(*points), marker="o", label=f"{cfg.replace('.yaml', '')} ({native}x{native} map)")
        written.append(_save_plot(fig, ax, "K (instances)", "assembly time (ms)", "Mask assembly time vs K",
                                  os.path.join(output_dir, "assembly.png")))
    plt.close("all")
    return written


def _save_plot(fig, ax, xlabel, ylabel, title, path):
    if xlabel:
        ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


BENCHMARK_CONFIGS = ("configs/coco_resnet18.yaml", "configs/coco_resnet50.yaml",
                     "configs/coco_dla34.yaml", "configs/edge_mobilenetv3.yaml")
QUICK_CONFIGS = ("configs/edge_mobilenetv3.yaml", "configs/coco_resnet18.yaml")
TFLITE_CONFIGS = ("edge_mobilenetv3.yaml", "coco_dla34.yaml")


def run(what, configs=None, overrides=(), *, quick=False, runs=None, results=RESULTS, plots=False, cache=None,
        workdir=None, peer=None):
    """`centermask benchmark WHAT`: one benchmark (or `all` but scale) per config; prints tables
    and appends them to `results`. `workdir`: trained weights for inference, video and tiling
    (else random weights, whose detections differ in number). `peer`: an `.onnx` model timed
    alongside the TFLite files (`inference`)."""
    if what == "scale":
        return _run_scale(configs, overrides, quick, results, cache)
    paths = configs or (QUICK_CONFIGS if quick else BENCHMARK_CONFIGS)
    kinds = ["inference", "efficiency", "assembly", "data", "train"] if what == "all" else [what]
    runs = runs if runs is not None else (5 if quick else 20)
    ceiling, steps = None, {}
    if "efficiency" in kinds or "data" in kinds:  # data: sizes the pipeline for a GPU from it
        ceiling = matmul_ceiling()
        print(f"float32 matmul ceiling: {ceiling:.1f} GFLOP/s")
    for path in paths:
        name = os.path.basename(path)
        for kind in kinds:
            config = load_config(path, overrides)
            print(f"\n== {kind}: {name} ==", flush=True)
            if kind == "inference":
                forms = ["keras", "saved_model"] if quick else ["keras", "xla", "saved_model"]
                if name in TFLITE_CONFIGS or workdir or peer:  # a trained run or a peer: what ships
                    forms += ["tflite_int8"] if quick else ["tflite_fp32", "tflite_fp16", "tflite_int8"]
                rows = inference(
                    config, forms, runs=runs, batch=2 if quick else 8, batch_runs=1 if quick else 3,
                    rounds=2 if quick else 3, run_dir=workdir, peer=peer,
                )
                columns = ["form", "min_ms", "median_ms", "p90_ms", "batch", "images_per_s"]
                if peer:
                    columns.append("peer_over_this")
            elif kind == "efficiency":
                rows = [efficiency(config, ceiling, runs=max(3, runs // 2))]
                columns = ["gflops", "forward_ms", "gflop_per_s", "ceiling_gflop_per_s", "fraction_of_ceiling"]
            elif kind == "assembly":
                rows = assembly(config, runs=runs)
                columns = ["k", "output", "ms", "us_per_instance"]
            elif kind == "fcos-heads":
                rows = fcos_inference(config, runs=min(runs, 7))
                columns = ["form", "input_size", "gflops", "median_ms", "p90_ms", "speedup"]
            elif kind == "video":
                rows = video_throughput(config, runs=min(runs, 3), frames=10 if quick else 40, workdir=workdir)
                columns = ["stage", "frames", "size", "frames_per_s"]
            elif kind == "tiling":
                rows = tiling_latency(config, runs=min(runs, 5), workdir=workdir)
                columns = ["tile", "overlap", "size", "ms", "detections"]
            else:  # data, train: batch 8 (a CPU step at the configs' 128 takes minutes)
                config.train.batch_size = 2 if quick else 8
                if name not in steps:  # one step measurement per config serves both
                    steps[name] = train_throughput(
                        config, runs=1 if quick else 2, steps=2 if quick else 3
                    )
                step = steps[name]
                if kind == "train":
                    rows = [step]
                    columns = ["input_size", "batch_size", "precision", "step_ms", "images_per_s"]
                else:
                    # In-process, then through 1 and 2 local tf.data service workers (data.service).
                    rows = []
                    for workers in (0, 1, 2):
                        pipeline = data_throughput(
                            config, runs=1 if quick else 3, batches=5 if quick else 20, workers=workers
                        )
                        rows.append({**pipeline, "train_images_per_s": step["images_per_s"],
                                     "pipeline_over_step": pipeline["images_per_s"] / step["images_per_s"],
                                     **gpu_estimate(pipeline, step, ceiling)})
                    columns = ["service_workers", "input_size", "batch_size", "images_per_s", "train_images_per_s",
                               "pipeline_over_step", "images_per_s_per_core", "cores_per_gpu_est"]
            print_table(rows, columns)
            if kind == "data":
                print(f"cores_per_gpu_est: a GPU at {ASSUMED_GPU_GFLOPS / 1e3:.0f} TFLOP/s (assumed, not "
                      f"measured) trains {rows[0]['gpu_images_per_s_est']:.0f} images/s if it reaches the fraction "
                      f"of its peak this CPU reaches of its {ceiling:.0f} GFLOP/s; see BENCHMARKS.md")
            append_result(kind, name, rows, results)
    print(f"\nappended to {results}")
    if plots:
        plots = plot_results(results, os.path.dirname(results) or ".")
        print("plots: " + ", ".join(plots))


# The scale benchmark's network: its forward is timed but is not what the benchmark is about.
SCALE_CONFIG = "configs/shapes_tiny.yaml"


def _run_scale(configs, overrides, quick, results, cache):
    """`benchmark scale`: TFDS build and evaluation on a COCO-val-sized set (50 images with --quick)."""
    path = (configs or [SCALE_CONFIG])[0]
    # K = 100 detections per image, as COCO evaluation allows.
    config = load_config(path, ["model.max_detections=100", *overrides])
    images, cache = (50 if quick else 5000), cache or SCALE_CACHE
    print(f"== scale: {images} COCO-sized images (cached under {cache}) ==", flush=True)
    builds, stages = scale(config, images=images, cache=cache)
    print_table(builds, ["build", "images", "kept", "seconds", "images_per_s", "speedup", "peak_rss_mb"])
    print()
    print_table(stages, ["stage", "images", "seconds", "ms_per_image", "peak_rss_mb"])
    append_result("scale-build", os.path.basename(path), builds, results)
    append_result("scale-evaluate", os.path.basename(path), stages, results)
    print(f"\nappended to {results}")
