import json
import os
import tempfile

import pytest

from centermask_tf.cli import main


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the generated benchmark images
    return tmp_path / "results.json"


def run_benchmark(what, results, *extra, config="configs/shapes_tiny.yaml"):
    args = ["benchmark", what, "--quick", "--config", config, "--runs", "2",
            "--results", str(results), *extra]
    assert main(args) == 0
    return json.loads(results.read_text())


def test_assembly_benchmark_records_every_k(results, capsys):
    (record,) = run_benchmark("assembly", results)
    assert "us_per_instance" in capsys.readouterr().out
    assert record["benchmark"] == "assembly" and record["machine"]["cores"] >= 1
    rows = record["rows"]
    assert [r["k"] for r in rows[:5]] == [1, 10, 50, 100, 200]
    assert all(r["output"] == 32 for r in rows[:5]) and all(r["ms"] > 0 for r in rows)


def test_data_benchmark_compares_pipeline_and_step(results):
    (record,) = run_benchmark("data", results)
    row = record["rows"][0]
    assert row["input_size"] == 128 and row["batch_size"] == 2
    assert row["images_per_s"] > 0 and row["train_images_per_s"] > 0
    assert row["pipeline_over_step"] == pytest.approx(row["images_per_s"] / row["train_images_per_s"])
    # Cores per GPU: the GPU's estimated images/s over the pipeline's images/s per core.
    assert row["images_per_s_per_core"] == pytest.approx(row["images_per_s"] / os.cpu_count())
    assert row["cores_per_gpu_est"] == pytest.approx(row["gpu_images_per_s_est"] / row["images_per_s_per_core"])


def test_inference_benchmark_takes_an_fcos_config(results):
    (record,) = run_benchmark("inference", results, config="configs/shapes_fcos_tiny.yaml")
    assert record["config"] == "shapes_fcos_tiny.yaml"
    assert [r["form"] for r in record["rows"]] == ["keras", "saved_model"]
    assert all(r["median_ms"] > 0 and r["images_per_s"] > 0 for r in record["rows"])


def test_fcos_benchmark_counts_what_the_sparse_shape_and_p3_saliency_save(results):
    """The graphs' GFLOPs fall by the dense Shape conv's work at the locations no detection
    keeps (a 1x1 conv C -> S*S, 2 * C * S*S per location) and by the saliency head's work at
    three quarters of its stride-4 pixels."""
    from centermask_tf.arch.fcos.targets import num_locations
    from centermask_tf.config import load_config

    (record,) = run_benchmark("fcos-heads", results, config="configs/shapes_fcos_tiny.yaml")
    gflops = {row["form"]: row["gflops"] for row in record["rows"]}
    model = load_config("configs/shapes_fcos_tiny.yaml").model
    c, s2, n = model.head_conv, model.shape_size**2, model.input_size
    shape_conv = (2 * c * s2 + s2) * (num_locations(n) - model.max_detections)  # multiply-adds and bias
    assert gflops["dense_shape"] - gflops["sparse_shape"] == pytest.approx(shape_conv / 1e9, rel=0.05)
    saliency = (2 * (9 * c * c + c) + c + 1) * ((n // 4) ** 2 - (n // 8) ** 2)
    assert gflops["sparse_shape"] - gflops["sparse_shape_p3_saliency"] == pytest.approx(saliency / 1e9, rel=0.05)
    assert all(row["median_ms"] > 0 and row["speedup"] > 0 for row in record["rows"])
    args = ["benchmark", "fcos-heads", "--config", "configs/shapes_tiny.yaml", "--results", str(results)]
    assert main(args) == 2  # a CenterNet config is refused up front, nothing appended
    assert len(json.loads(results.read_text())) == 1


@pytest.mark.slow
def test_scale_benchmark_quick_builds_three_ways_and_splits_evaluation(tmp_path, capsys):
    """`benchmark scale --quick`: 50 COCO-sized images, built in 1 and 2 processes and through
    Beam, evaluated with K=100 detections per image, every stage timed."""
    results = tmp_path / "results.json"
    args = ["benchmark", "scale", "--quick", "--cache", str(tmp_path / "cache"), "--results", str(results)]
    assert main(args) == 0
    build, evaluate = json.loads(results.read_text())
    rows = build["rows"]
    assert [r["build"] for r in rows] == [
        "1 process", "2 processes", "Beam DirectRunner, 1 worker", "Beam DirectRunner, 2 workers"]
    # Every build that is kept has every image (a build that lost some is refused: kept False).
    assert all(r["images"] == 50 and r["images_per_s"] > 0 for r in rows if r["kept"]) and rows[0]["kept"]
    assert all(r["peak_rss_mb"] > 100 for r in rows)
    stages = {r["stage"]: r for r in evaluate["rows"]}
    for stage in ("input", "forward", "decode", "masks", "ground_truth", "results", "coco_eval pycocotools",
                  "coco_eval faster_coco_eval", "diagnostics (F1, confusion matrix, plots)"):
        assert stages[stage]["seconds"] > 0 and stages[stage]["images"] == 50, stage
    ours = stages["ours (all but forward and COCO eval)"]["seconds"]
    parts = ("input", "decode", "masks", "ground_truth", "results")
    assert ours == pytest.approx(sum(stages[s]["seconds"] for s in parts))
    assert "ms_per_image" in capsys.readouterr().out
    (folder,) = (tmp_path / "cache").glob("coco-val-50-*")
    assert len(list((folder / "val").iterdir())) == 50


def test_litert_timing_runs_in_a_process_without_tensorflow(tmp_path):
    """TFLite forms are timed by `python -m centermask_tf.timing`, which must not load
    TensorFlow (it slows LiteRT's kernels in the same process)."""
    import subprocess
    import sys

    import keras

    from centermask_tf.export.tflite import keras_to_tflite

    inputs = keras.Input((16, 16, 3))
    path = tmp_path / "tiny.tflite"
    path.write_bytes(keras_to_tflite(keras.Model(inputs, keras.layers.Conv2D(4, 3)(inputs))))
    code = (
        "import sys, runpy; sys.argv = ['timing', sys.argv[1], '--runs', '3'];"
        "runpy.run_module('centermask_tf.timing', run_name='__main__');"
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'"
    )
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    row = json.loads(result.stdout.strip().splitlines()[-1])
    assert row["runs"] == 3 and 0 < row["min_ms"] <= row["median_ms"] <= row["p90_ms"]
    assert len(row["times_ms"]) == 3 and min(row["times_ms"]) == row["min_ms"]


def tiny_onnx(path):
    """A one-convolution ONNX model with a `[1, 3, 16, 16]` float input, written to `path`."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["images", "w"], ["out"])], "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 14, 14])], initializer=[weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return str(path)


def test_an_onnx_peer_is_timed_in_the_same_rounds(tmp_path, monkeypatch):
    """`--peer model.onnx` files run under ONNX Runtime in a TensorFlow-free process; each of our
    files gets the median over rounds of the peer's median over its own (hand computation with
    fixed times: rounds of 10/5 ms and 30/10 ms give ratios 2 and 3, median 2.5)."""
    from centermask_tf.tools import benchmark

    assert len(benchmark._file_latency(tiny_onnx(tmp_path / "peer.onnx"), 3)) == 3
    fixed = iter([[0.004, 0.005, 0.006], [0.010, 0.010, 0.011], [0.010, 0.009, 0.011], [0.030, 0.031, 0.029]])
    monkeypatch.setattr(benchmark, "_file_latency", lambda path, runs: next(fixed))
    ours, peer = benchmark.alternating_latency({"tflite_int8": __file__, "peer": __file__}, runs=3, rounds=2)
    assert ours["peer_over_this"] == pytest.approx(2.5) and "peer_over_this" not in peer
    assert ours["runs"] == 6 and ours["min_ms"] == pytest.approx(4.0) and ours["median_ms"] == pytest.approx(7.5)
    assert peer["median_ms"] == pytest.approx(20.0) and ours["images_per_s"] == pytest.approx(1e3 / 7.5)


@pytest.mark.parametrize("peer, message", [("model.tflite", "takes an .onnx model"), ("missing.onnx", "does not exist")])
def test_a_peer_that_is_no_onnx_file_is_refused(peer, message, capsys):
    assert main(["benchmark", "inference", "--config", "configs/shapes_tiny.yaml", "--peer", peer]) == 2
    assert message in capsys.readouterr().err


def test_plots_without_matplotlib_fail_before_benchmarking(results, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    hide = lambda name, *rest: None if name == "matplotlib" else real(name, *rest)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", hide)
    args = ["benchmark", "assembly", "--config", "configs/shapes_tiny.yaml",
            "--results", str(results), "--plots"]
    assert main(args) == 2
    assert "pip install -e '.[plots]'" in capsys.readouterr().err
    assert not results.exists()  # nothing was run
