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

from centermask_tf.arch import build_network
from centermask_tf.cli import main
from centermask_tf.config import load_config
from centermask_tf.workdir import save_run_files
from tests.helpers import train_args

CONFIG = "configs/shapes_tiny.yaml"


def one_line_error(capsys, command):
    """The error line, which must be the last thing on stderr (progress bars may come before)."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.splitlines()[-1].startswith(f"centermask {command}: error: "), err
    return err.splitlines()[-1]


@pytest.mark.parametrize("override, message", [
    ("model.input_size=0", "'model.input_size' must be >= 32 and <= 4096, got 0"),
    ("model.input_size=100", "model.input_size=100 must be a multiple of 32"),
    ("train.batch_size=0", "'train.batch_size' must be >= 1, got 0"),
    ("eval.batch_size=0", "'eval.batch_size' must be >= 1, got 0"),
    ("train.steps_per_epoch=-3", "'train.steps_per_epoch' must be >= 1, got -3"),
    ("train.epochs=0", "'train.epochs' must be >= 1, got 0"),
    ("train.learning_rate=-1", "'train.learning_rate' must be > 0, got -1.0"),
    ("train.learning_rate=.nan", "'train.learning_rate' must be a finite number"),
    ("model.score_threshold=2", "'model.score_threshold' must be >= 0 and <= 1, got 2.0"),
    ("train.ema_decay=1.5", "'train.ema_decay' must be > 0 and <= 1, got 1.5"),
    ("data.max_instances=0", "'data.max_instances' must be >= 1 and <= 1000, got 0"),
    ("model.mask_samples=1000000", "'model.mask_samples' must be >= 1 and <= 1024, got 1000000"),
    ("data.max_instances=100000", "'data.max_instances' must be >= 1 and <= 1000, got 100000"),
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
    network = build_network(config.model)
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
    build_network(other.model).save_weights(str(weights))
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


def test_two_saved_models_are_evaluated_into_separate_results(workdir, tmp_path, capsys):
    """`A/1` and `B/1` used to share `eval/1/`: the second result replaced the first."""
    directory, overrides = workdir
    sets = [part for override in overrides for part in ("--set", override)]
    folders = []
    for name in ("A", "B"):
        assert main(["export", "--workdir", str(directory), "--format", "saved_model",
                     "--output", str(tmp_path / name)]) == 0
        assert main(["evaluate", "--config", CONFIG, "--workdir", str(directory),
                     "--saved-model", str(tmp_path / name / "1"), *sets]) == 0
        folders.append(capsys.readouterr().out.strip().splitlines()[-1].split()[1].rsplit("/", 1)[0])
    assert folders[0] != folders[1] and all(os.path.basename(f).startswith("1-") or "_1-" in f for f in folders)
    for folder in folders:
        with open(os.path.join(folder, "metrics.json")) as f:
            assert set(json.load(f)) == {"bbox", "segm", "best_f1_score_threshold"}


def test_demo_names_the_saved_model_version_it_exported(tmp_path):
    from centermask_tf.tools.demo import demo_saved_model

    root, record = tmp_path / "saved_models" / "shapes", tmp_path / "exports.json"
    assert demo_saved_model(str(record), str(root), reuse=True) == str(root / "1")  # nothing yet
    (root / "1").mkdir(parents=True)
    record.write_text(json.dumps({"saved_model": str(root / "1")}))
    (root / "2").mkdir()  # another run exported since
    assert demo_saved_model(str(record), str(root), reuse=True) == str(root / "1")
    assert demo_saved_model(str(record), str(root), reuse=False) == str(root / "3")
    record.write_text("{not json")
    assert demo_saved_model(str(record), str(root), reuse=True) == str(root / "3")


def test_a_training_file_without_annotations_is_refused(tmp_path, capsys):
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "images" / "a.png")
    data = {"images": [{"id": 1, "file_name": "a.png", "height": 64, "width": 64}], "annotations": [],
            "categories": [{"id": 1, "name": "box"}, {"id": 2, "name": "ring"}, {"id": 3, "name": "cone"}]}
    (tmp_path / "ann.json").write_text(json.dumps(data))
    args = ["train", "--config", CONFIG, "--workdir", str(tmp_path / "run")]
    for override in (f"data.train.annotations={tmp_path}/ann.json", f"data.train.images={tmp_path}/images",
                     f"data.tfds_data_dir={tmp_path}/tfds", "data.val.annotations=null", "data.val.images=null",
                     "train.batch_size=1"):
        args += ["--set", override]
    assert main(args) == 2
    assert "has 1 usable images but not one annotation that can be trained on" in one_line_error(capsys, "train")
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_cli_numbers_and_paths_are_range_checked(capsys):
    for args, message in (
        (["make-shapes", "--output", "x", "--image-size", "0"], "argument --image-size: must be >= 32, got 0"),
        (["make-shapes", "--output", "x", "--train", "-5"], "argument --train: must be >= 0, got -5"),
        (["ablate", "--workdir", "w", "--images", "-1"], "argument --images: must be >= 1, got -1"),
        (["predict", "--workdir", "w", "--input", "i", "--output", "o", "--max-megabytes", "nan"],
         "argument --max-megabytes: 'nan' is not a finite number"),
        (["predict", "--workdir", "w", "--input", "i", "--output", "o", "--max-pixels", "0"],
         "argument --max-pixels: must be >= 1, got 0"),
        (["benchmark", "inference", "--runs", "0"], "argument --runs: must be >= 1, got 0"),
        (["export", "--workdir", "w", "--format", "saved_model", "--output", "o", "--version", "-1"],
         "argument --version: must be >= 1, got -1"),
        (["train", "--config", CONFIG, "--workdir", ""], "argument --workdir: an empty path"),
        (["data-service", "dispatcher", "--port", "70000"], "argument --port: must be >= 0 and <= 65535, got 70000"),
    ):
        with pytest.raises(SystemExit) as exit_:
            main(args)
        assert exit_.value.code == 2
        assert message in one_line_error(capsys, args[0])


def test_evaluate_prints_per_category_results_and_predict_score_auto_uses_its_threshold(shapes, workdir, tmp_path,
                                                                                      capsys):
    import shutil

    source, _ = workdir
    directory = tmp_path / "run"
    shutil.copytree(source, directory)
    predict = ["predict", "--workdir", str(directory), "--input", str(shapes[0] / "val"),
               "--output", str(tmp_path / "out"), "--score", "auto"]
    assert main(predict) == 2
    assert "run `centermask evaluate --workdir" in one_line_error(capsys, "predict")
    # Without --config: the workdir's own (its data paths are the test set's).
    assert main(["evaluate", "--workdir", str(directory)]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].split() == ["category", "type", "AP", "AP50", "AP75", "AR100", "objects"]
    metrics = json.loads((directory / "eval" / "metrics.json").read_text())
    rows = metrics["segm"]["per_category"]
    assert [(r["id"], r["name"]) for r in rows] == [(1, "circle"), (2, "rectangle"), (3, "triangle")]
    assert sum(r["instances"] for r in rows) > 0
    threshold = metrics["best_f1_score_threshold"]
    assert 0 <= threshold <= 1 and f"best F1 at score {threshold:.2f}" in printed
    assert sorted(os.listdir(directory / "eval" / "plots")) == [
        "confusion_matrix.png", "f1_score.png", "pr_bbox.png", "pr_segm.png"]
    assert main(predict) == 0
    assert f"--score auto: {threshold:.2f}" in capsys.readouterr().out


def test_leftovers_of_killed_exports_predictions_and_evaluations_are_removed_by_the_next_run(
        workdir, tmp_path, capsys):
    """A killed export leaves `.tmp-<pid>-<version>/`, a killed predict `.tmp-<pid>-*.png`, a
    killed evaluate `.tmp-<pid>-detections.json`; the next run into the same folder removes
    those of dead processes, and keeps a live one's."""
    directory, _ = workdir
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / "sm" / f".tmp-{pid}-1" / "variables").mkdir(parents=True)
    live = tmp_path / "sm" / f".tmp-{os.getppid()}-9"
    live.mkdir()
    assert main(["export", "--workdir", str(directory), "--format", "saved_model", "--output", str(tmp_path / "sm")]) == 0
    assert sorted(os.listdir(tmp_path / "sm")) == [live.name, "1"]

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / f".tmp-{pid}-a.png.overlay.png").write_bytes(b"half")
    images = tmp_path / "in"
    images.mkdir()
    (images / "a.png").write_bytes(b"")  # skipped as empty: the run still writes predictions.json
    assert main(["predict", "--workdir", str(directory), "--input", str(images), "--output", str(tmp_path / "out")]) == 0
    assert not [n for n in os.listdir(tmp_path / "out") if n.startswith(".tmp-")]

    evaluation = directory / "eval"
    evaluation.mkdir(exist_ok=True)
    (evaluation / f".tmp-{pid}-detections.json").write_text("[{")
    (evaluation / f".tmp-{os.getppid()}-metrics.json").write_text("{")
    assert main(["evaluate", "--workdir", str(directory)]) == 0
    assert [n for n in os.listdir(evaluation) if n.startswith(".tmp-")] == [f".tmp-{os.getppid()}-metrics.json"]
    (evaluation / f".tmp-{os.getppid()}-metrics.json").unlink()

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["export", "--workdir", str(directory), "--format", "saved_model", "--output", str(blocker)]) == 2
    assert "is a file; a SavedModel goes into a folder" in one_line_error(capsys, "export")
    assert main(["export", "--workdir", str(directory), "--format", "tflite", "--output", str(tmp_path)]) == 2
    assert "is a folder; a TFLite export is a file" in one_line_error(capsys, "export")


def test_library_failures_outside_our_writes_are_one_line(shapes, workdir, tmp_path, capsys, monkeypatch):
    """A full disk under a SavedModel export or a dataset build, an unknown Beam runner and a
    bad TF_CONFIG each end in one line (exit 2), and nothing half-written is left."""
    import errno

    import tensorflow as tf

    from centermask_tf.data import tfds_builder
    from centermask_tf.export import serving

    directory, overrides = workdir

    def full_disk_archive(detector, endpoints, path):
        os.makedirs(os.path.join(path, "variables"))
        raise tf.errors.ResourceExhaustedError(None, None, f"{path}/variables: No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(serving, "_write_archive", full_disk_archive)
        assert main(["export", "--workdir", str(directory), "--format", "saved_model", "--output", str(tmp_path / "sm")]) == 2
    assert "disk full while exporting to" in one_line_error(capsys, "export")
    assert os.listdir(tmp_path / "sm") == []

    root, _ = shapes
    fresh = [f"data.tfds_data_dir={tmp_path}/tfds", "train.epochs=1"]

    def full_disk_build(self, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(tfds_builder.CocoFolder, "download_and_prepare", full_disk_build)
        assert main(train_args(shapes, tmp_path / "run", *fresh)) == 2
    assert "disk full while building the dataset" in one_line_error(capsys, "train")

    assert main(train_args(shapes, tmp_path / "run", *fresh, "data.beam_options=[--runner=FooRunner]")) == 2
    assert "data.beam_options: Unexpected pipeline runner: FooRunner" in one_line_error(capsys, "train")

    for tf_config, message in (
        ("{not json", "TF_CONFIG is not valid JSON"),
        ('{"cluster": {"worker": ["not a host"]}, "task": {"type": "worker", "index": 0}}', 'TF_CONFIG needs "cluster"'),
        ('{"cluster": {"worker": ["localhost:1234"]}, "task": {"type": "worker", "index": 3}}', 'TF_CONFIG needs "task"'),
    ):
        monkeypatch.setenv("TF_CONFIG", tf_config)
        assert main([*train_args(shapes, tmp_path / "mw"), "--strategy", "multi_worker"]) == 2
        assert message in one_line_error(capsys, "train")
