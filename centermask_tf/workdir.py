"""A training workdir that protects its run.

    WORKDIR/config.yaml, categories.json     what the run was started with
    WORKDIR/state.json                       the commit record: epochs done, best value, history
    WORKDIR/checkpoints/{last,best}.weights.h5
    WORKDIR/backup/epoch_NNNN.weights.h5     network + optimizer state of the committed epoch
    WORKDIR/history.csv, logs/, eval/, model.keras, ablate/, exports.json
    WORKDIR/previous/<time>/                 earlier runs moved aside by --overwrite
    WORKDIR/.lock                            held by the process that trains here

Each epoch ends in two phases. First the backup and *pending* copies of `last`/`best` are
written (each atomically); then `state.json` is replaced, which commits the epoch; then the
pending copies are renamed over `last`/`best` and `history.csv` is rewritten from the state. A
kill before the commit leaves the previous epoch committed and intact (the rerun repeats one
epoch); a kill after it is completed by `recover()` on the rerun. So `last`, `best`, the best
value and `history.csv` always agree with `state.json`.
"""

import csv
import dataclasses
import io
import json
import logging
import os
import re
import shutil
import time
from typing import Optional

import numpy as np
import tensorflow as tf
import yaml

from centermask_tf import files
from centermask_tf.config import config_from_dict
from centermask_tf.errors import MissingError, UserError

logger = logging.getLogger("centermask_tf.workdir")

# What a run owns; `--overwrite` moves these aside together.
# Where `demo` records the artifacts it exported of this run.
EXPORTS_RECORD = "exports.json"
RUN_FILES = ("config.yaml", "categories.json", "state.json", "checkpoints", "backup", "history.csv",
             "logs", "eval", "model.keras", "predictions", "ablate", EXPORTS_RECORD)
# Keys that may change between a run and its continuation.
RESUMABLE_KEYS = ("train.epochs", "eval.", "data.service", "data.build_workers", "data.beam_options")
_PENDING = re.compile(r"^\.pending-(last|best)-(\d+)\.weights\.h5$")
_BACKUP = re.compile(r"^epoch_(\d+)\.weights\.h5$")


class WorkdirError(UserError):
    """The workdir holds something this command must not overwrite or cannot resume."""


@dataclasses.dataclass
class RunState:
    """The committed progress of a run (`state.json`).

    Attributes:
        epochs: the epochs the run is to train.
        epochs_done: epochs committed (their checkpoints and history rows are written).
        finished: training ended and `model.keras` is written.
        monitor: the log value that chooses `best` (higher is better for `*AP*`).
        best: its best value so far; best_epoch: the epoch (1-based) it came from.
        backup: the committed backup file, relative to the workdir.
        history: one dict of logs per committed epoch (`epoch` 0-based, as Keras counts).
    """

    epochs: int
    epochs_done: int = 0
    finished: bool = False
    monitor: str = "loss"
    best: Optional[float] = None
    best_epoch: Optional[int] = None
    backup: Optional[str] = None
    history: list = dataclasses.field(default_factory=list)

    def improves(self, value):
        if value is None:
            return False
        if self.best is None:
            return True
        return value > self.best if "AP" in self.monitor else value < self.best

    def follow(self, monitor):
        """Makes `monitor` choose `best` from now on. A best value of another monitor (a loss
        against an AP) cannot be compared, so it is dropped: the next value seen becomes the
        best, and `best.weights.h5` follows it."""
        if monitor == self.monitor:
            return
        if self.best is not None:
            logger.warning(
                "the best checkpoint is now chosen by %s instead of %s (best %.4g at epoch %s): "
                "checkpoints/best.weights.h5 is replaced at the next %s value",
                monitor, self.monitor, self.best, self.best_epoch, monitor,
            )
        self.monitor, self.best, self.best_epoch = monitor, None, None


def _flatten(tree, prefix=""):
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(old, new):
    """`key: old -> new` for every config value that differs, except `RESUMABLE_KEYS`."""
    old, new = _flatten(old), _flatten(new)
    return [
        f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key) and not key.startswith(RESUMABLE_KEYS)
    ]


class Workdir:
    """The files of one training run and the rules that keep them."""

    def __init__(self, path):
        self.path = path

    def join(self, *parts):
        return os.path.join(self.path, *parts)

    def lock(self):
        """Held while training: a second `train` here refuses, naming this process."""
        os.makedirs(self.path, exist_ok=True)
        return files.locked(self.join(".lock"), f"workdir '{self.path}'")

    def load_state(self):
        """The committed `RunState`, or None for a workdir where no run started."""
        path = self.join("state.json")
        try:
            with open(path, encoding="utf-8") as f:
                return RunState(**json.load(f))
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as e:
            raise WorkdirError(
                f"'{path}' is damaged ({e}); it is only ever replaced whole, so something else "
                f"wrote it. Pass --overwrite to move this run aside into '{self.join('previous')}' "
                "and start over."
            ) from None

    def finished(self, config):
        """Whether this workdir holds a finished run of `config`'s number of epochs."""
        state = self.load_state()
        return bool(state and state.finished and state.epochs == config.train.epochs)

    def save_state(self, state):
        files.write_json(self.join("state.json"), dataclasses.asdict(state), point="state")

    def save_config(self, config):
        files.write_text(self.join("config.yaml"), yaml.safe_dump(config.to_dict(), sort_keys=False))

    def has_run_files(self):
        return any(os.path.exists(self.join(name)) for name in ("checkpoints", "backup", "model.keras"))

    def move_aside(self):
        """Moves every run file into `previous/<time>/` (nothing is deleted); returns that folder."""
        target = self.join("previous", time.strftime("%Y%m%d-%H%M%S"))
        while os.path.exists(target):
            target += "+"
        os.makedirs(target)
        for name in RUN_FILES:
            if os.path.exists(self.join(name)):
                shutil.move(self.join(name), os.path.join(target, name))
        return target

    def start(self, config, overwrite=False):
        """The `RunState` that `train` continues from: a new one, or the committed one when the
        same config is trained again (with more epochs after a finished run).

        Raises:
            WorkdirError: the workdir holds a finished run, a run of a different config, or
                checkpoints without a run record; the message says what is there and what to do.
        """
        state = self.load_state()
        if overwrite and (state or self.has_run_files()):
            logger.warning("--overwrite: moved the previous run to %s", self.move_aside())
            state = None
        if state is None and self.has_run_files():
            raise WorkdirError(
                f"'{self.path}' holds checkpoints but no state.json (a run of an older version, "
                f"or copied files). Use another --workdir, or pass --overwrite to move them "
                f"into '{self.join('previous')}' and start over."
            )
        if state is None or state.epochs_done == 0:  # nothing committed yet: (re)start
            state = RunState(epochs=config.train.epochs)
            self.save_config(config)
            self.save_state(state)
            return state
        with open(self.join("config.yaml"), encoding="utf-8") as f:
            # Read through the current Config, so keys added since the run default as they did.
            differences = config_differences(config_from_dict(yaml.safe_load(f)).to_dict(), config.to_dict())
        if differences:
            shown = "; ".join(differences[:4]) + (f"; and {len(differences) - 4} more" if len(differences) > 4 else "")
            raise WorkdirError(
                f"'{self.path}' holds a run of a different config ({shown}). Rerun with its config "
                f"({self.join('config.yaml')}), use another --workdir, or pass --overwrite to move "
                f"the old run into '{self.join('previous')}'."
            )
        done = state.epochs_done
        wanted = config.train.epochs
        if wanted < done or (state.finished and wanted == done):
            best = f", best {state.monitor} {state.best:.4g} at epoch {state.best_epoch}" if state.best is not None else ""
            raise WorkdirError(
                f"'{self.path}' holds a {'finished ' if state.finished else ''}run of {done} epochs{best}: "
                f"checkpoints/best.weights.h5, checkpoints/last.weights.h5"
                f"{', model.keras' if state.finished else ''}. Nothing to do for train.epochs={wanted}. "
                f"To train longer, set train.epochs above {done}; to start over, pass --overwrite "
                f"(the old run is moved into '{self.join('previous')}')."
            )
        state.epochs = wanted
        state.finished = False
        return state

    def recover(self, state):
        """Completes what a kill interrupted: promotes the pending checkpoints of the committed
        epoch, drops other pending files, older backups and temporary files, and rewrites
        `history.csv` from the state."""
        for folder in (self.path, self.join("checkpoints"), self.join("backup")):
            files.remove_stale_temporaries(folder)
        checkpoints = self.join("checkpoints")
        if os.path.isdir(checkpoints):
            for name in sorted(os.listdir(checkpoints)):
                match = _PENDING.match(name)
                if not match:
                    continue
                source = os.path.join(checkpoints, name)
                if int(match.group(2)) == state.epochs_done:
                    os.replace(source, os.path.join(checkpoints, f"{match.group(1)}.weights.h5"))
                else:
                    os.remove(source)
        backups = self.join("backup")
        if os.path.isdir(backups):
            for name in os.listdir(backups):
                match = _BACKUP.match(name)
                if match and int(match.group(1)) != state.epochs_done:
                    os.remove(os.path.join(backups, name))
        self.write_history(state.history)

    def pending(self, kind, epoch):
        return self.join("checkpoints", f".pending-{kind}-{epoch:04d}.weights.h5")

    def backup_name(self, epoch):
        return os.path.join("backup", f"epoch_{epoch:04d}.weights.h5")

    def read_history(self):
        """The rows of `history.csv` (epoch int, values float; a value a row lacks is left out)."""
        try:
            with open(self.join("history.csv"), encoding="utf-8") as f:
                return [
                    {k: int(v) if k == "epoch" else float(v) for k, v in row.items() if v != ""}
                    for row in csv.DictReader(f)
                ]
        except FileNotFoundError:
            return []

    def write_history(self, rows):
        if not rows:
            return
        keys = sorted({key for row in rows for key in row if key != "epoch"})
        text = io.StringIO()
        writer = csv.DictWriter(text, ["epoch", *keys], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        files.write_text(self.join("history.csv"), text.getvalue(), point="history")


def weights_bytes(model):
    """Bytes of a model's variables (its optimizer's too, when it has one): the size of its
    `.weights.h5`, give or take the HDF5 overhead."""
    variables = list(model.weights)
    if getattr(model, "optimizer", None) is not None:
        variables += list(model.optimizer.variables)
    return sum(int(np.prod(v.shape)) * tf.as_dtype(v.dtype).size for v in variables)



def save_weights(model, path, point):
    """`model.save_weights` through an atomic, space-checked write."""
    return files.atomic_write(path, model.save_weights, point, expected_size=weights_bytes(model))



def weights_path(workdir, weights=None):
    """The weights file to evaluate or export: explicit, else best, else last."""
    if weights:
        if not os.path.isfile(weights):
            raise MissingError(f"--weights: file '{weights}' does not exist.")
        return weights
    for name in ("best", "last"):
        path = os.path.join(workdir, "checkpoints", f"{name}.weights.h5")
        if os.path.isfile(path):
            return path
    raise MissingError(
        f"No checkpoint in '{workdir}/checkpoints'; train first (centermask train --workdir "
        f"{workdir}) or pass --weights FILE."
    )



def save_run_files(config, workdir, categories):
    """Writes the resolved config and the category list that evaluate/predict/export read."""
    Workdir(workdir).save_config(config)
    files.write_json(os.path.join(workdir, "categories.json"), categories)


def load_workdir(workdir, overrides=()):
    """The resolved `Config` (with `overrides`, "key=value") and category list a training run
    saved in its workdir."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise MissingError(f"'{workdir}' is a file; pass the training workdir (or preset) folder that holds it.")
    config_path, categories_path = os.path.join(workdir, "config.yaml"), os.path.join(workdir, "categories.json")
    raw = _read_run_file(workdir, config_path, yaml.safe_load, "YAML")
    categories = _read_run_file(workdir, categories_path, json.load, "JSON")
    if not isinstance(raw, dict):
        raise UserError(f"'{config_path}' must hold a mapping of config sections; restore it or retrain.")
    if not (isinstance(categories, list) and all(
            isinstance(c, dict) and isinstance(c.get("id"), int) and isinstance(c.get("name"), str) for c in categories)):
        raise UserError(f"'{categories_path}' must be a list of {{\"id\": int, \"name\": str}}; restore it or retrain.")
    try:
        return config_from_dict(raw, overrides), categories
    except UserError as e:
        raise type(e)(f"{config_path}: {e}") from None



def _read_run_file(workdir, path, parse, kind):
    try:
        with open(path, encoding="utf-8") as f:
            return parse(f)
    except FileNotFoundError:
        raise MissingError(
            f"'{workdir}' is not a training workdir ({path} is missing); run `centermask train --workdir` first."
        ) from None
    except (ValueError, yaml.YAMLError) as e:  # JSON and UTF-8 decoding errors are ValueErrors
        raise UserError(
            f"'{path}' is not valid {kind} ({' '.join(str(e).split())[:120]}); it is written by "
            "`centermask train`: restore it or retrain."
        ) from None
