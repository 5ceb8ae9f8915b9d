"""Per-category COCO metrics, F1 against the score threshold and the confusion matrix on a case
small enough to compute by hand; both evaluation backends give the same rows."""

import json
import sys

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image

from centermask_tf import diagnostics
from centermask_tf.data.coco import index_coco
from centermask_tf.diagnostics import confusion_matrix, f1_curve
from centermask_tf.evaluation import coco_metrics, per_category_table

SIZE = 64
# Category 11 has no ground truth: its rows must say null, not 0.
CATEGORIES = [{"id": 7, "name": "seven"}, {"id": 9, "name": "nine"}, {"id": 11, "name": "eleven"}]


def block(x, y, w, h):
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[y:y + h, x:x + w] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": [SIZE, SIZE], "counts": rle["counts"].decode("ascii")}


def truth(annotation_id, image_id, category_id, box):
    return {"id": annotation_id, "image_id": image_id, "category_id": category_id, "bbox": list(map(float, box)),
            "area": float(box[2] * box[3]), "segmentation": block(*box), "iscrowd": 0}


def found(image_id, category_id, box, score):
    return {"image_id": image_id, "category_id": category_id, "bbox": list(map(float, box)),
            "segmentation": block(*box), "score": score}


A, B, C = (2, 2, 20, 20), (30, 30, 20, 20), (10, 10, 24, 24)
DATA = {
    "images": [{"id": 1, "file_name": "a.png", "height": SIZE, "width": SIZE},
               {"id": 2, "file_name": "b.png", "height": SIZE, "width": SIZE}],
    "annotations": [truth(1, 1, 7, A), truth(2, 1, 9, B), truth(3, 2, 7, C)],
    "categories": CATEGORIES,
}
DETECTIONS = [
    found(1, 7, (40, 2, 10, 10), 0.95),  # seven where there is nothing
    found(1, 7, A, 0.9),
    found(2, 7, C, 0.8),
    found(1, 9, (34, 30, 20, 20), 0.7),  # B moved 4 px: IoU 16/24 = 0.667
    found(2, 11, C, 0.6),  # C again, of the wrong class
]
# By hand. Seven: dets FP, A, C -> precision 1/2 at recall 1/2, 2/3 at recall 1; interpolated,
# 2/3 at every recall and every IoU. Nine: its one object found at IoU 0.667, so at the
# thresholds 0.50-0.65 (4 of 10) with precision 1. Eleven: no ground truth.
EXPECTED = [
    {"id": 7, "name": "seven", "AP": 2 / 3, "AP50": 2 / 3, "AP75": 2 / 3, "AR100": 1.0, "instances": 2},
    {"id": 9, "name": "nine", "AP": 0.4, "AP50": 1.0, "AP75": 0.0, "AR100": 0.4, "instances": 1},
    {"id": 11, "name": "eleven", "AP": None, "AP50": None, "AP75": None, "AR100": None, "instances": 0},
]


@pytest.fixture
def annotations(tmp_path):
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(DATA))
    return str(path)


def assert_rows(rows, expected):
    assert [(r["id"], r["name"], r["instances"]) for r in rows] == [(e["id"], e["name"], e["instances"]) for e in expected]
    for row, want in zip(rows, expected):
        for key in ("AP", "AP50", "AP75", "AR100"):
            assert (row[key] is None) == (want[key] is None), (row, key)
            if want[key] is not None:
                assert row[key] == pytest.approx(want[key], abs=1e-9), (row, key)


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_per_category_rows_equal_the_hand_computation(annotations, backend, tmp_path):
    metrics = coco_metrics(annotations, DETECTIONS, [1, 2], backend, plots_dir=str(tmp_path / "plots"))
    for iou_type in ("bbox", "segm"):
        assert_rows(metrics[iou_type]["per_category"], EXPECTED)
        # COCO's AP is the mean over the categories that have ground truth.
        assert metrics[iou_type]["AP"] == pytest.approx((2 / 3 + 0.4) / 2)
    assert metrics["best_f1_score_threshold"] == 0.61
    table = per_category_table(metrics).splitlines()
    assert [line.split()[0] for line in table[1:4]] == ["seven", "nine", "eleven"]  # by AP, null last
    assert table[3].split()[2:] == ["-", "-", "-", "-", "0"]


def test_both_backends_give_the_same_rows_on_a_trained_like_case(annotations):
    rng = np.random.default_rng(0)
    noisy = [dict(d, score=float(s)) for d in DETECTIONS for s in rng.uniform(0.05, 1, 1)]
    reference = coco_metrics(annotations, noisy, [1, 2])
    faster = coco_metrics(annotations, noisy, [1, 2], backend="faster_coco_eval")
    for iou_type in ("bbox", "segm"):
        assert_rows(faster[iou_type]["per_category"], reference[iou_type]["per_category"])


def test_f1_and_confusion_matrix_by_hand():
    coco = index_coco(DATA)
    curve = f1_curve(coco, DETECTIONS, "segm")
    thresholds = np.round(np.linspace(0, 1, 101), 2)
    # 3 objects. <= 0.6: 5 kept, 3 right -> F1 0.75; (0.6, 0.7]: 4 kept, 3 right -> 6/7;
    # (0.7, 0.8]: 3 kept, 2 right -> 2/3; (0.8, 0.9]: 1 of 2 -> 0.4; above: none right.
    expected = np.select([thresholds <= 0.6, thresholds <= 0.7, thresholds <= 0.8, thresholds <= 0.9],
                         [0.75, 6 / 7, 2 / 3, 0.4], 0.0)
    np.testing.assert_allclose(curve, expected, atol=1e-12)
    # Rows predicted, columns true: seven, nine, eleven, background.
    np.testing.assert_array_equal(confusion_matrix(coco, DETECTIONS, 0.61),
                                  [[2, 0, 0, 1], [0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    # At 0: the eleven on C finds it taken by the seven that scored higher: a detection of nothing.
    np.testing.assert_array_equal(confusion_matrix(coco, DETECTIONS, 0.0),
                                  [[2, 0, 0, 1], [0, 1, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]])
    # At 0.85 two objects are missed: the background row.
    np.testing.assert_array_equal(confusion_matrix(coco, DETECTIONS, 0.85),
                                  [[1, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]])


def test_plots_are_drawn_and_evaluation_without_matplotlib_still_works(annotations, tmp_path, monkeypatch, caplog):
    plots = tmp_path / "plots"
    coco_metrics(annotations, DETECTIONS, [1, 2], plots_dir=str(plots))
    names = sorted(p.name for p in plots.iterdir())
    assert names == ["confusion_matrix.png", "f1_score.png", "pr_bbox.png", "pr_segm.png"]
    for name in names:
        with Image.open(plots / name) as image:
            assert image.format == "PNG" and min(image.size) >= 300
            # Not a blank canvas: a plot has lines and text in more than a few colours.
            assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 20
    assert coco_metrics(annotations, DETECTIONS, [1, 2])["best_f1_score_threshold"] is None  # no plots asked
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    diagnostics._no_matplotlib_notice.cache_clear()  # another test in this process may have said it
    for _ in range(2):
        metrics = coco_metrics(annotations, DETECTIONS, [1, 2], plots_dir=str(tmp_path / "none"))
        assert metrics["best_f1_score_threshold"] == 0.61
    assert not (tmp_path / "none").exists()
    assert caplog.text.count("pip install -e '.[plots]'") == 1  # once per process
