"""The recipe protocol: one config trained on several generated sets with several seeds, so that
a default is chosen from a mean and a spread instead of one run.

    centermask recipe --config configs/shapes_tiny.yaml --workdir work/recipe/base
    centermask recipe --config configs/shapes_tiny.yaml --workdir work/recipe/cp \\
        --set data.copy_paste=0.5 --sets shapes occluded --seeds 0 1 2

Each (set, seed) trains into `WORKDIR/<set>/seed<k>` with `train.seed=k` and the set's data, and
is evaluated at its last epoch (the weights training ended with, not the best checkpoint: the
best is picked on the same validation split). Its training wall time and the metrics and time
of each evaluation are kept in `recipe_run.json` there (a resumed run's time is that of its last
part); a rerun reuses finished runs and evaluations and resumes killed runs. `--eval-set
eval.flip_test=true` evaluates the same networks decoded otherwise, without training again.
The sets are generated once under `--data` (`SETS`). Writes `WORKDIR/recipe[_<eval-set>].json`
(every run) and `.md` (mean ± std and range per set) over every run of the workdir evaluated
that way, whichever invocation trained it. Figures from a shared machine have a shared clock:
run nothing else alongside when wall times matter.
"""

import json
import os
import re
import statistics
import time

from centermask_tf.config import config_from_dict
from centermask_tf.data.shapes import Layout, make_shapes
from centermask_tf.data.tfds_builder import prepare_dataset
from centermask_tf.detector import CenterMask
from centermask_tf.errors import UserError
from centermask_tf.evaluation import evaluate_detector
from centermask_tf.files import write_json, write_text
from centermask_tf.training.strategies import set_op_threads
from centermask_tf.training.train import train
from centermask_tf.workdir import Workdir

# name -> (make_shapes arguments, config overrides). 600/100 images of 128 px like the demo's.
SETS = {
    # The demo's own set (`make demo` writes the same one to work/shapes).
    "shapes": ({"seed": 0}, []),
    # Most objects placed over an earlier one (the paper's occlusion experiment, `make ablation`).
    "occluded": ({"seed": 1, "occlusion": 0.7}, []),
    # Objects of 40-90 % of the image side.
    "large": ({"seed": 2, "layout": Layout(sizes=(0.4, 0.9))}, []),
    # Many small objects: 5-20 % of the side, log-uniform, 6 per image on average.
    "small": ({"seed": 3, "layout": Layout(sizes=(0.05, 0.2), log_sizes=True, mean_objects=6.0)}, []),
    # Four classes whose ids (1, 3, 4, 5) are not contiguous.
    "classes": ({"seed": 4, "classes": ["circle", "triangle", "star", "hexagon"]}, ["model.num_classes=4"]),
}
SEEDS = (0, 1, 2)
RUN_RECORD = "recipe_run.json"


def make_set(data_root, name, images=(600, 100)):
    """The folder of set `name` with `images` (train, val), generated on first use (its val
    annotations are written last)."""
    folder = os.path.join(data_root, name)
    if not os.path.exists(os.path.join(folder, "annotations", "instances_val.json")):
        print(f"writing the {name} set to {folder}")
        make_shapes(folder, train=images[0], val=images[1], **SETS[name][0])
    return folder


def set_config(config, folder, name, seed):
    return config_from_dict(config.to_dict(), [
        f"data.train.annotations={folder}/annotations/instances_train.json", f"data.train.images={folder}/train",
        f"data.val.annotations={folder}/annotations/instances_val.json", f"data.val.images={folder}/val",
        f"train.seed={seed}", *SETS[name][1],
    ])


def run_one(config, run, eval_overrides=()):
    """Trains `run` (unless finished) and evaluates its last weights decoded with
    `eval_overrides` (unless done before), keeping the times and AP in its `RUN_RECORD`."""
    record_path = os.path.join(run, RUN_RECORD)
    record = {"train_seconds": None, "evals": {}}  # a run that finished before a kill: time unknown
    if os.path.exists(record_path):
        with open(record_path, encoding="utf-8") as f:
            record = json.load(f)
    if not Workdir(run).finished(config):
        start = time.time()
        train(config, run)
        record = {"train_seconds": time.time() - start, "evals": {}}
        write_json(record_path, record)
    key = _eval_key(eval_overrides)
    if key not in record["evals"]:
        start = time.time()
        detector = CenterMask.from_workdir(run, os.path.join(run, "checkpoints", "last.weights.h5"), eval_overrides)
        output = os.path.join(run, "eval", "last" + _slug(eval_overrides))
        metrics = evaluate_detector(detector.detect_canvases, prepare_dataset(config.data), detector.config, output)
        record["evals"][key] = {"segm": metrics["segm"]["AP"], "bbox": metrics["bbox"]["AP"],
                                "eval_seconds": time.time() - start}
        write_json(record_path, record)


def _eval_key(overrides):
    return " ".join(overrides) or "config"


def _slug(overrides):
    """File-name suffix of a list of "key=value" overrides ("" for none)."""
    return "".join("_" + re.sub(r"[^\w.=-]", "", override) for override in overrides)


def summarise(values):
    if not values:
        return None
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values)}


def recipe(config, workdir, sets=tuple(SETS), seeds=SEEDS, data_root="work/recipe_data", images=(600, 100),
           eval_overrides=()):
    """Trains and evaluates `config` on each set with each seed; returns {set: summary}.
    `images`: (train, val) images of each generated set; `eval_overrides`: how the trained
    networks decode ("key=value": flip test, thresholds), evaluated without training again."""
    unknown = sorted(set(sets) - set(SETS))
    if unknown:
        raise UserError(f"recipe: unknown set(s) {', '.join(unknown)}; choose from {', '.join(SETS)}.")
    set_op_threads(config.train.intra_op_threads)  # before generating a set starts TensorFlow
    for name in sets:
        folder = make_set(data_root, name, images)
        for seed in seeds:
            run = os.path.join(workdir, name, f"seed{seed}")
            print(f"[{name} seed {seed}] {run}")
            run_one(set_config(config, folder, name, seed), run, eval_overrides)
    # The summary covers every run of the workdir evaluated this way, not only this invocation's
    # sets and seeds: `--sets occluded` after `--sets shapes` must not hide the shapes table.
    runs = workdir_runs(workdir, eval_overrides)
    summary = {}
    for name in SETS:
        records = [record for key, record in runs.items() if key.split("/")[0] == name]
        if records:
            summary[name] = {key: summarise([r[key] for r in records if r[key] is not None])
                             for key in ("segm", "bbox", "train_seconds", "eval_seconds")}
            summary[name]["seeds"] = len(records)
    suffix = _slug(eval_overrides)
    write_json(os.path.join(workdir, f"recipe{suffix}.json"), {
        "config": config.to_dict(), "eval_overrides": list(eval_overrides), "runs": runs, "summary": summary})
    table = recipe_table(summary)
    write_text(os.path.join(workdir, f"recipe{suffix}.md"), table)
    print(table)
    return summary


def workdir_runs(workdir, eval_overrides=()):
    """{"<set>/seed<k>": segm, bbox, train_seconds, eval_seconds} of every run under `workdir`
    evaluated with `eval_overrides`, in set and seed order."""
    key, runs = _eval_key(eval_overrides), {}
    for name in SETS:
        folder = os.path.join(workdir, name)
        seeds = sorted(int(entry[4:]) for entry in os.listdir(folder) if re.fullmatch(r"seed\d+", entry)) \
            if os.path.isdir(folder) else []
        for seed in seeds:
            record_path = os.path.join(folder, f"seed{seed}", RUN_RECORD)
            if os.path.exists(record_path):
                with open(record_path, encoding="utf-8") as f:
                    record = json.load(f)
                if key in record["evals"]:
                    runs[f"{name}/seed{seed}"] = {**record["evals"][key], "train_seconds": record["train_seconds"]}
    return runs


def recipe_table(summary):
    lines = ["| set | seeds | segm AP, mean ± std | range | bbox AP, mean ± std | range | training | evaluation |",
             "| --- | ---: | --- | --- | --- | --- | ---: | ---: |"]
    for name, s in summary.items():
        wall = s["train_seconds"]
        minutes = f"{wall['mean'] / 60:.1f} min" if wall else "—"
        evaluation = f"{s['eval_seconds']['mean']:.0f} s" if s["eval_seconds"] else "—"
        ap = [f"{v['mean']:.3f} ± {v['std']:.3f} | {v['min']:.3f}–{v['max']:.3f}" for v in (s["segm"], s["bbox"])]
        lines.append(f"| {name} | {s['seeds']} | {ap[0]} | {ap[1]} | {minutes} | {evaluation} |")
    return "\n".join(lines) + "\n"
