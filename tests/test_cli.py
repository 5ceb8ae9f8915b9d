"""Every user error is one line, `centermask <cmd>: error: ...` with exit code 2, and predict never
stops on a bad file or writes over an input."""

import hashlib
import json
import os
import struct
import subprocess
import sys
import zlib

import pytest

from centermask_tf.cli import main
from centermask_tf.config import load_config
from centermask_tf.model.centermask import build_model
from centermask_tf.training import save_run_files
from tests.helpers import train_args

CONFIG = "configs/shapes_tiny.yaml"


def one_line_error(capsys, command):
    """The error line, which must be the last thing on stderr (progress bars may come before)."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.splitlines()[-1].startswith(f"centermask {command}: error: "), err
    return err.splitlines()[-1]


@pytest.mark.parametrize("override, message", [
    ("model.input_size=0", "'model.input_size' must be >= 32, got 0"),
    ("model.input_size=100", "model.input_size=100 must be a multiple of 32"),
    ("train.batch_size=0", "'train.batch_size' must be >= 1, got 0"),
    ("eval.batch_size=0", "'eval.batch_size' must be >= 1, got 0"),
    ("train.steps_per_epoch=-3", "'train.steps_per_epoch' must be >= 1, got -3"),
    ("train.epochs=0", "'train.epochs' must be >= 1, got 0"),
    ("train.learning_rate=-1", "'train.learning_rate' must be > 0, got -1.0"),
    ("train.learning_rate=.nan", "'train.learning_rate' must be a finite number"),
    ("model.score_threshold=2", "'model.score_threshold' must be >= 0 and <= 1, got 2.0"),
    ("train.ema_decay=1.5", "'train.ema_decay' must be > 0 and <= 1, got 1.5"),
    ("data.max_instances=0", "'data.max_instances' must be >= 1, got 0"),
    ("train.decay_epochs=[0]", "train.decay_epochs must hold epochs >= 1"),
])
def test_each_bad_config_value_gets_one_line_naming_the_key(capsys, tmp_path, override, message):
    assert main(["train", "--config", CONFIG, "--workdir", str(tmp_path / "w"), "--set", override]) == 2
    assert message in one_line_error(capsys, "train")
    assert not os.path.exists(tmp_path / "w")  # refused before any work


@pytest.mark.parametrize("config, message", [
    ("configs", "is a folder; pass a YAML file"),
    (sys.executable, "is not text (binary file?)"),
])
def test_config_that_is_not_a_yaml_file(capsys, config, message):
    assert main(["info", "--config", config]) == 2
    assert message in one_line_error(capsys, "info")


@pytest.fixture(scope="module")
def workdir(shapes, tmp_path_factory):
    """A workdir with random weights (enough to load artifacts and weights against)."""
    root, overrides = shapes
    config = load_config(CONFIG, overrides)
    workdir = tmp_path_factory.mktemp("cli_workdir")
    save_run_files(config, str(workdir), [{"id": 1, "name": "circle"}, {"id": 2, "name": "rectangle"},
                                          {"id": 3, "name": "triangle"}])
    network = build_model(config.model)
    (workdir / "checkpoints").mkdir()
    network.save_weights(str(workdir / "checkpoints" / "last.weights.h5"))
    return workdir, overrides


def test_artifacts_and_weights_that_do_not_fit_are_one_line(workdir, tmp_path, capsys):
    directory, overrides = workdir
    sets = [part for override in overrides for part in ("--set", override)]
    jpeg = tmp_path / "photo.jpg"
    jpeg.write_bytes(b"\xff\xd8\xff\xe0 not really a model")
    assert main(["predict", "--workdir", str(directory), "--tflite", str(jpeg), "--input", str(jpeg),
                 "--output", str(tmp_path / "out")]) == 2
    assert "is not a usable TFLite model" in one_line_error(capsys, "predict")

    broken = tmp_path / "sm" / "1"
    broken.mkdir(parents=True)
    (broken / "saved_model.pb").write_bytes(b"\x00garbage" * 10)
    assert main(["evaluate", "--config", CONFIG, "--workdir", str(directory), "--saved-model", str(broken), *sets]) == 2
    assert f"cannot load SavedModel '{broken}'" in one_line_error(capsys, "evaluate")

    other = load_config(CONFIG, [*overrides, "model.head_conv=16"])
    weights = tmp_path / "other.weights.h5"
    build_model(other.model).save_weights(str(weights))
    assert main(["evaluate", "--config", CONFIG, "--workdir", str(directory), "--weights", str(weights), *sets]) == 2
    assert f"cannot load weights '{weights}' into the network of this config" in one_line_error(capsys, "evaluate")


def test_unusable_paths_and_data_are_one_line(shapes, tmp_path, capsys):
    _, overrides = shapes
    sets = [part for override in overrides for part in ("--set", override)]
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["train", "--config", CONFIG, "--workdir", str(blocker / "run"), *sets]) == 2
    assert f"Not a directory: '{blocker}/run'" in one_line_error(capsys, "train")

    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"images": [{"id": 1, "file_name": "gone.jpg", "height": 9, "width": 9}],
                                 "annotations": [], "categories": [{"id": 1, "name": "a"}]}))
    assert main(["train", "--config", CONFIG, "--workdir", str(tmp_path / "run"), *sets,
                 "--set", f"data.train.annotations={empty}", "--set", "model.num_classes=1",
                 "--set", f"data.tfds_data_dir={tmp_path}/tfds"]) == 2
    assert f"data.train ({empty}) has 0 usable images (skipped 1 bad samples (missing_image: 1))" in one_line_error(capsys, "train")


def test_start_up_is_quiet_and_debug_shows_the_traceback(tmp_path):
    command = [sys.executable, "-m", "centermask_tf.cli", "info", "--no-weights", "--config", CONFIG]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "resnet18" in run.stdout
    assert run.stderr == ""
    failing = [sys.executable, "-m", "centermask_tf.cli", "info", "--config", "configs", "--debug"]
    run = subprocess.run(failing, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "Traceback" in run.stderr and "ConfigError" in run.stderr


def _png_declaring(path, width, height):
    """A small PNG whose header declares `width x height` pixels (a decompression bomb)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = zlib.compress(b"\x00" * (width * 3 + 1) * 4)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def _digests(folder):
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in sorted(os.listdir(folder))}


def test_predict_into_its_input_folder_skips_bad_files_and_changes_no_input(shapes, workdir, tmp_path, capsys):
    import shutil

    root, _ = shapes
    directory, _ = workdir
    folder = tmp_path / "photos"
    shutil.copytree(root / "val", folder)
    good = sorted(os.listdir(folder))
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("not an image")
    _png_declaring(folder / "bomb.png", 20000, 20000)
    _png_declaring(folder / "large.png", 10000, 10000)  # under PIL's hard limit, over ours
    (folder / "huge.jpg").write_bytes(os.urandom(1_500_000))
    shutil.copy(folder / good[0], folder / (os.path.splitext(good[0])[0] + ".png"))  # a.jpg and a.png
    good.append(os.path.splitext(good[0])[0] + ".png")
    before = _digests(folder)
    args = ["predict", "--workdir", str(directory), "--input", str(folder), "--output", str(folder),
            "--score", "0", "--max-megabytes", "1"]
    for _ in range(2):  # a rerun neither reads the overlays as inputs nor changes an input
        assert main(args) == 0
        assert "skipped 5 unusable files" in capsys.readouterr().out
        predictions = json.loads((folder / "predictions.json").read_text())
        assert len(predictions) == len(good) + 5
        assert {k: v for k, v in _digests(folder).items() if k in before} == before
    errors = {os.path.basename(p["file"]): p["error"] for p in predictions if "error" in p}
    assert "is empty (0 bytes)" in errors["zero.jpg"]
    assert "is not a readable image" in errors["notes.png"]
    assert "declares more than 179 megapixels, over the 89 megapixel limit" in errors["bomb.png"]
    assert "declares 10000x10000 = 100 megapixels, over the 89 megapixel limit" in errors["large.png"]
    assert "is 2 MB, over the 1.0 MB limit" in errors["huge.jpg"]
    overlays = {os.path.basename(p["overlay"]) for p in predictions if "overlay" in p}
    assert overlays == {name + ".overlay.png" for name in good}
    assert all((folder / name).is_file() for name in overlays)


def test_training_piped_to_a_file_prints_a_few_lines_per_epoch(shapes, tmp_path):
    """No progress bar redrawn per step in a log file: Keras's one-line-per-epoch mode."""
    command = [sys.executable, "-m", "centermask_tf.cli", *train_args(shapes, tmp_path / "run", "eval.every_epochs=1")]
    with open(tmp_path / "log.txt", "w") as log:
        run = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=600)
    text = (tmp_path / "log.txt").read_text()
    assert run.returncode == 0, text[-2000:]
    assert "\r" not in text and "━" not in text
    assert text.count("Epoch ") == 2 and len(text.splitlines()) <= 2 * 10, text
