"""Nothing a user has is lost: finished runs are refused, kills and a full disk at every write
point resume with the right epochs and an intact `best`, and a second trainer is refused."""

import csv
import errno
import os
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from centermask_tf import files
from centermask_tf.cli import main
from centermask_tf.config import load_config
from centermask_tf.training.train import train
from centermask_tf.workdir import Workdir, WorkdirError
from tests.helpers import train_args

CONFIG = "configs/shapes_tiny.yaml"
# Write point -> (the hit that crashes, epochs committed after the crash). `state` is first
# written when the run starts; `best` is written in the first epoch for sure (nothing to beat
# yet); `history` and `model` come after their epoch's commit.
WRITE_POINTS = {"backup": (2, 1), "last": (2, 1), "best": (1, 0), "state": (3, 1), "history": (2, 2),
                "model": (1, 3)}


@pytest.fixture
def fault(monkeypatch):
    """Arms `CENTERMASK_FAULT` (hit counts start from zero) for one train call."""

    def arm(spec):
        monkeypatch.setattr(files, "_fault_hits", files.collections.Counter())
        monkeypatch.setenv(files.FAULT_ENV, spec)

    yield arm
    monkeypatch.delenv(files.FAULT_ENV, raising=False)


def config_for(shapes, *extra):
    _, overrides = shapes
    return load_config(CONFIG, [*overrides, *extra])


def history_epochs(workdir):
    with open(os.path.join(workdir, "history.csv")) as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


def weights_of(path):
    with h5py.File(path, "r") as f:
        values = []
        f.visititems(lambda name, obj: values.append(obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return values


def assert_complete(workdir, epochs):
    """The run is finished, every epoch has exactly one history row, `best` is the state's best
    epoch by loss, and no temporary or pending file is left behind."""
    state = Workdir(str(workdir)).load_state()
    assert state.finished and state.epochs_done == epochs
    assert history_epochs(workdir) == list(range(epochs))
    losses = [row["loss"] for row in state.history]
    assert state.best == min(losses) and state.best_epoch == int(np.argmin(losses)) + 1
    assert weights_of(workdir / "checkpoints" / "best.weights.h5")
    assert os.path.isfile(workdir / "model.keras")
    leftovers = [
        name for folder in (workdir, workdir / "checkpoints", workdir / "backup")
        for name in os.listdir(folder) if name.startswith((".tmp-", ".pending-"))
    ]
    assert leftovers == []
    assert os.listdir(workdir / "backup") == [f"epoch_{epochs:04d}.weights.h5"]


def test_finished_run_is_refused_continued_with_more_epochs_and_overwrite_moves_it(shapes, tmp_path):
    workdir = tmp_path / "run"
    train(config_for(shapes), str(workdir))
    best = (workdir / "checkpoints" / "best.weights.h5").read_bytes()
    with pytest.raises(WorkdirError, match=r"finished run of 2 epochs.*train\.epochs above 2.*--overwrite"):
        train(config_for(shapes), str(workdir))
    assert (workdir / "checkpoints" / "best.weights.h5").read_bytes() == best
    with pytest.raises(WorkdirError, match=r"different config \(model\.head_conv: 8 -> 16\)"):
        train(config_for(shapes, "model.head_conv=16", "train.epochs=3"), str(workdir))

    history = train(config_for(shapes, "train.epochs=3"), str(workdir))
    assert len(history) == 1  # only the third epoch ran
    assert_complete(workdir, 3)

    (workdir / "ablate").mkdir()  # `ablate` describes this run's model: it moves with it
    (workdir / "ablate" / "ablation.md").write_text("table")
    train(config_for(shapes), str(workdir), overwrite=True)
    (previous,) = (workdir / "previous").iterdir()
    assert Workdir(str(previous)).load_state().epochs_done == 3
    assert (previous / "ablate" / "ablation.md").read_text() == "table" and not (workdir / "ablate").exists()
    assert history_epochs(previous) == [0, 1, 2]
    assert_complete(workdir, 2)


@pytest.mark.parametrize("point", WRITE_POINTS)
def test_a_crash_at_each_write_point_resumes_to_the_right_epochs(shapes, tmp_path, fault, point):
    """A crash after the temporary file is written and before its rename, then the same command
    again."""
    workdir = tmp_path / "run"
    config = config_for(shapes, "train.epochs=3")
    hit, committed = WRITE_POINTS[point]
    fault(f"raise:{point}:{hit}")
    with pytest.raises(files.InjectedFault):
        train(config, str(workdir))
    state = Workdir(str(workdir)).load_state()
    assert state.epochs_done == committed and not state.finished
    fault("none:none")
    train(config, str(workdir))
    assert_complete(workdir, 3)


@pytest.mark.slow
def test_sigkill_at_the_commit_resumes_and_keeps_best(shapes, tmp_path):
    """A real SIGKILL, in a separate process, while state.json is being replaced."""
    workdir = tmp_path / "run"
    command = [sys.executable, "-m", "centermask_tf.cli", *train_args(shapes, workdir, "train.epochs=3")]
    killed = subprocess.run(command, env=dict(os.environ, CENTERMASK_FAULT="kill:state:4"),
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert Workdir(str(workdir)).load_state().epochs_done == 2
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resuming after epoch 2 of 3" in rerun.stderr
    assert_complete(workdir, 3)


def test_disk_full_leaves_the_checkpoints_and_the_rerun_resumes(shapes, tmp_path, fault, capsys):
    workdir = tmp_path / "run"
    args = train_args(shapes, workdir, "train.epochs=3")
    fault("enospc:last:2")
    assert main(args) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [f"centermask train: error: disk full while writing '{workdir}/checkpoints/.pending-last-0002"
                     ".weights.h5'; files written before are intact. Free some space and rerun the same command."]
    assert Workdir(str(workdir)).load_state().epochs_done == 1
    assert weights_of(workdir / "checkpoints" / "last.weights.h5")
    fault("none:none")
    assert main(args) == 0
    assert_complete(workdir, 3)


def test_a_write_that_would_not_fit_is_refused_before_it_starts(tmp_path, monkeypatch):
    """h5py can segfault on a full disk, so the free space is checked first."""
    target = tmp_path / "big.bin"
    target.write_bytes(b"old")
    usage = files.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: usage._replace(free=10 << 20))
    with pytest.raises(files.DiskFullError, match=r"only 10\.5 MB free.*27\.3 MB needed"):
        files.atomic_write(str(target), lambda tmp: open(tmp, "wb").write(b"new"), expected_size=10 << 20)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["big.bin"]


def test_an_oserror_enospc_becomes_a_disk_full_error(tmp_path):
    def write(tmp):
        open(tmp, "wb").write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(files.DiskFullError, match="disk full while writing"):
        files.atomic_write(str(tmp_path / "x.json"), write)
    assert os.listdir(tmp_path) == []


def test_a_second_train_is_refused_naming_the_holder_and_a_dead_holder_is_taken_over(shapes, tmp_path, capsys):
    """The holder is a real second process; SIGKILL leaves its lock file behind."""
    workdir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from centermask_tf.workdir import Workdir\n"
         f"with Workdir({str(workdir)!r}).lock():\n    print('held', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        args = train_args(shapes, workdir)
        assert main(args) == 2
        error = capsys.readouterr().err.strip()
        assert f"workdir '{workdir}' is in use by process {holder.pid} (" in error and "\n" not in error
    finally:
        holder.kill()
        holder.wait()
    assert os.path.exists(workdir / ".lock")
    assert main(args) == 0
    assert_complete(workdir, 2)


@pytest.mark.slow
def test_two_concurrent_trains_one_refused_the_other_finishes(shapes, tmp_path):
    workdir = tmp_path / "run"
    command = [sys.executable, "-m", "centermask_tf.cli", *train_args(shapes, workdir, "train.epochs=4")]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=600) for run in runs]
    codes = sorted(run.returncode for run in runs)
    assert codes == [0, 2], [err[-1500:] for _, err in outputs]
    refused = [err for run, (_, err) in zip(runs, outputs) if run.returncode == 2][0]
    assert "is in use by process" in refused
    assert_complete(workdir, 4)


def test_workdir_with_checkpoints_but_no_state_is_refused(shapes, tmp_path):
    workdir = tmp_path / "old"
    (workdir / "checkpoints").mkdir(parents=True)
    (workdir / "checkpoints" / "best.weights.h5").write_bytes(b"an older run's weights")
    with pytest.raises(WorkdirError, match="no state.json.*--overwrite"):
        train(config_for(shapes), str(workdir))
    assert (workdir / "checkpoints" / "best.weights.h5").read_bytes() == b"an older run's weights"


def test_the_lock_file_names_its_holder(tmp_path):
    path = str(tmp_path / ".lock")
    with files.locked(path, "thing"):
        with open(path) as f:
            assert f.read().startswith(f"process {os.getpid()} (")
        start = time.time()
        with pytest.raises(files.BusyError, match=rf"thing is in use by process {os.getpid()}"):
            with files.locked(path, "thing"):
                pass
        assert time.time() - start < 1
    with files.locked(path, "thing"):
        pass


def test_state_json_round_trips(tmp_path):
    run = Workdir(str(tmp_path))
    state = Workdir(str(tmp_path)).start(load_config(CONFIG), overwrite=False)
    state.history.append({"epoch": 0, "loss": 1.5})
    state.epochs_done, state.best, state.best_epoch = 1, 1.5, 1
    run.save_state(state)
    assert run.load_state() == state
    (tmp_path / "state.json").write_text("{ not json")
    with pytest.raises(WorkdirError, match="state.json' is damaged"):
        run.load_state()


def test_with_ema_evaluation_and_last_use_the_averaged_weights(shapes, tmp_path, monkeypatch):
    import keras

    from centermask_tf import evaluation
    from centermask_tf.arch import build_network
    from centermask_tf.training import callbacks

    seen = {}  # epoch -> weights the evaluation ran with, the EMA and the trained values

    def record_evaluation(detect, *args, **kwargs):
        network = detect.__self__.network  # CenterMask.detect_canvases
        seen.setdefault("evaluated", []).append([v.numpy() for v in network.trainable_variables])
        return {t: {name: 0.0 for name in evaluation.METRIC_NAMES} for t in ("bbox", "segm")}

    class Probe(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.setdefault("ema", []).append([v.numpy() for v in self.model.optimizer._model_variables_moving_average])
            seen.setdefault("trained", []).append([v.numpy() for v in self.model.trainable_variables])

    monkeypatch.setattr(callbacks, "evaluate_detector", record_evaluation)
    config = config_for(shapes, "train.ema_decay=0.5", "eval.every_epochs=1", "train.learning_rate=0.01")
    train(config, str(tmp_path / "run"), extra_callbacks=[Probe()])
    assert len(seen["evaluated"]) == len(seen["ema"]) == 2
    for evaluated, ema, trained in zip(seen["evaluated"], seen["ema"], seen["trained"]):
        for a, b in zip(evaluated, ema):
            np.testing.assert_array_equal(a, b)
        assert max(np.abs(a - b).max() for a, b in zip(ema, trained)) > 1e-4  # EMA made a difference
    config.model.weights = None
    last = build_network(config.model)
    last.load_weights(str(tmp_path / "run" / "checkpoints" / "last.weights.h5"))
    for a, b in zip(last.trainable_variables, seen["ema"][-1]):
        np.testing.assert_array_equal(a.numpy(), b)


def test_each_evaluation_writes_detection_and_saliency_images_to_tensorboard(shapes, tmp_path):
    import tensorflow as tf

    train(config_for(shapes, "eval.every_epochs=1"), str(tmp_path / "run"))
    (events,) = (tmp_path / "run" / "logs" / "images").iterdir()
    steps = {}
    for event in tf.compat.v1.train.summary_iterator(str(events)):
        for value in event.summary.value:
            if value.tag == "validation/detections_and_saliency":
                images = tf.make_ndarray(value.tensor)  # [width, height, png, png, ...]
                first = tf.io.decode_png(images[2]).numpy()
                steps[event.step] = (len(images) - 2, first.shape)
    # 4 validation images, each its 64 x 64 canvas beside its 64 x 64 saliency map.
    assert steps == {1: (4, (64, 128, 3)), 2: (4, (64, 128, 3))}


def test_a_holder_that_has_not_written_its_name_yet_is_waited_for(tmp_path):
    import fcntl
    import threading

    path = tmp_path / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # taken, name not written yet (the moment the race hits)
    threading.Timer(0.3, lambda: os.write(fd, b"process 4242 (centermask train)")).start()
    try:
        with pytest.raises(files.BusyError, match=r"in use by process 4242 \(centermask train\)"):
            with files.locked(str(path), "workdir 'run'"):
                pass
    finally:
        os.close(fd)


@pytest.mark.parametrize("before, after", [("0", "1"), ("1", "0")])
def test_a_continued_run_whose_evaluation_changed_chooses_best_by_the_new_monitor(shapes, tmp_path, before, after):
    """eval.* may change when a run continues: the best checkpoint then follows the new monitor
    (AP, higher is better, or the loss) instead of comparing it with the old monitor's best."""
    workdir = tmp_path / "run"
    train(config_for(shapes, "train.epochs=1", f"eval.every_epochs={before}"), str(workdir))
    train(config_for(shapes, "train.epochs=2", f"eval.every_epochs={after}"), str(workdir))
    state = Workdir(str(workdir)).load_state()
    monitor = "val_segm_AP" if after == "1" else "loss"
    assert state.monitor == monitor
    assert state.best_epoch == 2 and state.best == state.history[1][monitor]
    if monitor == "val_segm_AP":
        assert 0.0 <= state.best <= 1.0
    best, last = (weights_of(workdir / "checkpoints" / f"{k}.weights.h5") for k in ("best", "last"))
    assert all(np.array_equal(b, l) for b, l in zip(best, last))
