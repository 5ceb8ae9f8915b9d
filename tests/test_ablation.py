"""`centermask ablate`: the Local Shape / Global Saliency experiment writes the three-row table,
its JSON and the grid, with the numbers `evaluate` gives for each mode."""

import json

import pytest
from PIL import Image

from centermask_tf.cli import main
from centermask_tf.tools import ablation
from centermask_tf.tools.ablation import METRICS, ablate
from tests.helpers import train_args

MODES = ("shape", "saliency", "both")


@pytest.fixture(scope="module")
def trained(shapes, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ablate")
    # A tiny 6-step run: detections at any score, masks thresholded where its logits sit (near 0).
    assert main(train_args(shapes, workdir, "model.score_threshold=0.0", "model.mask_threshold=0.5")) == 0
    return workdir


def evaluate_args(shapes, workdir, *extra):
    _, overrides = shapes
    args = ["evaluate", "--config", "configs/shapes_tiny.yaml", "--workdir", str(workdir)]
    for override in [*overrides, "model.score_threshold=0.0", "model.mask_threshold=0.5", *extra]:
        args += ["--set", override]
    return args


def test_ablate_decodes_one_model_three_ways(shapes, trained, capsys):
    assert main(["ablate", "--workdir", str(trained), "--images", "2"]) == 0
    folder = trained / "ablate"
    table = (folder / "ablation.md").read_text()
    assert "| Local Shape only |" in table and "| Global Saliency only |" in table and "| both (CenterMask) |" in table
    assert table.count("- both ") == 2  # one verdict per single factor
    assert "| Local Shape only |" in capsys.readouterr().out  # the table is printed too
    metrics = json.loads((folder / "ablation.json").read_text())["metrics"]
    assert set(metrics) == set(MODES)
    masks = {}
    for mode in MODES:  # each mode is what `evaluate --set model.mask_factors=<mode>` writes
        assert main(evaluate_args(shapes, trained, f"model.mask_factors={mode}")) == 0
        assert json.loads((trained / "eval" / "metrics.json").read_text()) == metrics[mode]
        written = json.loads((folder / mode / "detections.json").read_text())
        assert json.loads((trained / "eval" / "detections.json").read_text()) == written
        masks[mode] = [d["segmentation"]["counts"] for d in written]
        assert [d["bbox"] for d in written] == [d["bbox"] for d in json.loads(
            (folder / "both" / "detections.json").read_text())]  # boxes do not depend on the factors
    assert len(masks["both"]) > 0 and len({json.dumps(m) for m in masks.values()}) == 3  # masks do
    grid = Image.open(folder / "ablation.png")
    assert grid.size == (3 * 256, 18 + 2 * 256)


def test_ablate_takes_an_evaluation_it_is_given_as_it_is(trained, monkeypatch):
    """The demo's own evaluation of `both` is not repeated: only the two single factors run."""
    outputs, evaluate = [], ablation.evaluate_detector
    monkeypatch.setattr(ablation, "evaluate_detector", lambda *a: outputs.append(a[3]) or evaluate(*a))
    given = {"segm": dict.fromkeys(METRICS, 0.5), "bbox": dict.fromkeys(METRICS, 0.25)}
    metrics = ablate(str(trained), images=1, evaluated={"both": given})
    assert [output.split("/")[-1] for output in outputs] == ["shape", "saliency"]
    assert metrics["both"] == given
    assert json.loads((trained / "ablate" / "ablation.json").read_text())["metrics"]["both"] == given
    assert "| both (CenterMask) | 0.500 | 0.500 |" in (trained / "ablate" / "ablation.md").read_text()


def test_ablate_refuses_a_single_factor_model_and_a_stray_config(shapes, tmp_path, capsys):
    assert main(train_args(shapes, tmp_path, "model.mask_factors=shape", "train.saliency_weight=0")) == 0
    assert main(["ablate", "--workdir", str(tmp_path)]) == 2
    assert "trained with model.mask_factors=shape" in capsys.readouterr().err
    assert main(["ablate", "--workdir", str(tmp_path), "--config", "configs/shapes_tiny.yaml"]) == 2
    assert "drop --config" in capsys.readouterr().err
    assert main(["ablate", "--workdir", str(tmp_path), "--train"]) == 2
    assert "needs --config" in capsys.readouterr().err


@pytest.mark.slow
def test_ablate_train_runs_one_model_per_mode_and_reuses_them(shapes, tmp_path):
    _, overrides = shapes
    args = ["ablate", "--workdir", str(tmp_path), "--train", "--config", "configs/shapes_tiny.yaml", "--images", "1"]
    for override in overrides:
        args += ["--set", override]
    assert main(args) == 0
    stamps = {}
    for mode in MODES:
        run = tmp_path / "ablate" / mode
        assert json.loads((run / "state.json").read_text())["finished"]
        assert "mask_factors: " + mode in (run / "config.yaml").read_text()
        assert (run / "eval" / "metrics.json").exists()
        stamps[mode] = (run / "checkpoints" / "last.weights.h5").stat().st_mtime_ns
    assert (tmp_path / "ablate" / "ablation.png").exists()
    assert "one model per mode" in (tmp_path / "ablate" / "ablation.md").read_text()
    # A rerun reuses the finished runs: no checkpoint is rewritten.
    assert main(args) == 0
    for mode in MODES:
        assert (tmp_path / "ablate" / mode / "checkpoints" / "last.weights.h5").stat().st_mtime_ns == stamps[mode]


def test_grid_shows_images_where_masks_can_collide(tmp_path):
    from centermask_tf.config import SplitConfig
    from centermask_tf.tools.ablation import grid_images

    coco = {"images": [{"id": i, "file_name": f"{i}.jpg"} for i in (3, 1, 2, 4)],
            "annotations": [{"image_id": i} for i in (1, 2, 2, 4, 4, 4)]}
    (tmp_path / "val.json").write_text(json.dumps(coco))
    split = SplitConfig(str(tmp_path / "val.json"), "imgs")
    assert grid_images(split, 2) == ["imgs/2.jpg", "imgs/4.jpg"]
    assert grid_images(split, 3) == ["imgs/2.jpg", "imgs/4.jpg", "imgs/1.jpg"]


def test_table_says_how_both_compares():
    from centermask_tf.tools.ablation import ablation_table

    def row(ap):
        return {"segm": dict.fromkeys(("AP", "AP50", "AP75", "APs", "APm", "APl"), ap), "bbox": {"AP": 0.5}}

    table = ablation_table({"shape": row(0.5), "saliency": row(0.6), "both": row(0.55)}, "test")
    assert "- both beats Local Shape only by +0.050 segm AP." in table
    assert "- both does not beat Global Saliency only: -0.050 segm AP." in table
    assert "have the same segm AP (0.550)" in ablation_table({"shape": row(0.55), "saliency": row(0.55), "both": row(0.55)}, "t")
