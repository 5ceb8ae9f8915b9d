"""`centermask recipe`: runs per set and seed, their summary, and reruns that train nothing."""

import json
import statistics

import pytest

from centermask_tf.config import load_config
from centermask_tf.errors import UserError
from centermask_tf.tools import recipe as recipe_module
from centermask_tf.workdir import load_workdir
from tests.conftest import TINY_RUN


@pytest.mark.slow
def test_recipe_trains_each_seed_summarises_and_reuses_finished_runs(tmp_path, monkeypatch):
    config = load_config("configs/shapes_tiny.yaml", TINY_RUN + [f"data.tfds_data_dir={tmp_path}/tfds"])
    workdir, data = str(tmp_path / "recipe"), str(tmp_path / "data")
    kwargs = dict(sets=("classes",), seeds=(0, 3), data_root=data, images=(16, 4))
    summary = recipe_module.recipe(config, workdir, **kwargs)

    with open(tmp_path / "recipe" / "recipe.json", encoding="utf-8") as f:
        record = json.load(f)
    runs = [record["runs"][f"classes/seed{seed}"] for seed in (0, 3)]
    for key in ("segm", "bbox", "train_seconds", "eval_seconds"):
        values = [run[key] for run in runs]
        assert summary["classes"][key]["mean"] == pytest.approx(statistics.fmean(values))
        assert summary["classes"][key]["std"] == pytest.approx(statistics.stdev(values))
        assert summary["classes"][key]["min"] == min(values) and summary["classes"][key]["max"] == max(values)
    assert all(0.0 <= run["segm"] <= 1.0 and run["train_seconds"] > 0 for run in runs)
    # Each run trained with its own seed on the set's four non-contiguous categories.
    for seed in (0, 3):
        run_config, categories = load_workdir(str(tmp_path / "recipe" / "classes" / f"seed{seed}"))
        assert run_config.train.seed == seed and run_config.model.num_classes == 4
        assert [c["id"] for c in categories] == [1, 3, 4, 5]
    assert "| classes |" in (tmp_path / "recipe" / "recipe.md").read_text()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(recipe_module, "train", no_training)
    assert recipe_module.recipe(config, workdir, **kwargs) == summary
    # Another decoding of the same networks: evaluated, not trained, kept beside the first.
    flipped = recipe_module.recipe(config, workdir, **kwargs, eval_overrides=["eval.flip_test=true"])
    assert flipped["classes"]["train_seconds"] == summary["classes"]["train_seconds"]
    for seed in (0, 3):
        run = tmp_path / "recipe" / "classes" / f"seed{seed}"
        evals = json.loads((run / recipe_module.RUN_RECORD).read_text())["evals"]
        assert set(evals) == {"config", "eval.flip_test=true"}
        assert (run / "eval" / "last_eval.flip_test=true" / "metrics.json").exists()
    assert (tmp_path / "recipe" / "recipe_eval.flip_test=true.md").exists()
    # The summary is of every run in the workdir: asking for one seed, or another set's run
    # finished earlier, neither hides nor drops a row.
    shapes_run = tmp_path / "recipe" / "shapes" / "seed1"
    shapes_run.mkdir(parents=True)
    (shapes_run / recipe_module.RUN_RECORD).write_text(
        json.dumps({"train_seconds": 60.0, "evals": {"config": {"segm": 0.5, "bbox": 0.25, "eval_seconds": 2.0}}}))
    one_seed = recipe_module.recipe(config, workdir, **kwargs | {"seeds": (0,)})
    assert one_seed["classes"] == summary["classes"] and summary["classes"]["seeds"] == 2
    assert one_seed["shapes"]["segm"] == {"mean": 0.5, "std": 0.0, "min": 0.5, "max": 0.5}
    table = (tmp_path / "recipe" / "recipe.md").read_text()
    assert "| shapes | 1 | 0.500 ± 0.000 | 0.500–0.500 | 0.250 ± 0.000 | 0.250–0.250 | 1.0 min | 2 s |" in table
    assert "| classes | 2 |" in table
    # Killed after training, before its record: evaluated again, not trained; time unknown.
    (tmp_path / "recipe" / "classes" / "seed3" / recipe_module.RUN_RECORD).unlink()
    again = recipe_module.recipe(config, workdir, **kwargs)["classes"]
    assert again["segm"] == summary["classes"]["segm"]
    assert again["train_seconds"]["mean"] == runs[0]["train_seconds"]


def test_unknown_set_is_refused_with_the_choices(tmp_path):
    config = load_config("configs/shapes_tiny.yaml", TINY_RUN)
    with pytest.raises(UserError, match="unknown set.*occludded.*choose from shapes, occluded"):
        recipe_module.recipe(config, str(tmp_path), sets=("occludded",))
