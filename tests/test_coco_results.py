"""Evaluation's compact results (`CocoResults`, `postprocess.coco_columns`) against the list of
COCO dicts evaluation kept before: the same dicts, file and metrics, in half the memory."""

import json
import tracemalloc

import numpy as np
import pytest
from pycocotools.coco import COCO

from centermask_tf.coco_results import CocoResults
from centermask_tf.data.shapes import make_shapes
from centermask_tf.evaluation import IOU_TYPES, METRIC_NAMES, coco_metrics
from centermask_tf.postprocess import coco_columns, encode_instances, to_original_image

CATEGORY_IDS = [1, 2, 3]


def reference_entries(image_id, result):
    """The COCO dicts evaluation made before `CocoResults`: pasted masks encoded one by one,
    Python's round() per value."""
    entries = []
    rles = encode_instances(result["masks"], *result["size"])
    for box, score, cls, rle in zip(result["boxes"], result["scores"], result["classes"], rles):
        ymin, xmin, ymax, xmax = (float(v) for v in box)
        entries.append({
            "image_id": int(image_id),
            "category_id": CATEGORY_IDS[int(cls)],
            "bbox": [round(xmin, 3), round(ymin, 3), round(xmax - xmin, 3), round(ymax - ymin, 3)],
            "score": round(float(score), 5),
            "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")},
        })
    return entries


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A 6-image shapes split and a detector's batch for it: each object found with a jittered
    box and its own mask sampled at 16 x 16 with noise, plus low-scored clutter, K = 12 per
    image at a 128-px canvas (the images are 128 px: scale 1)."""
    root = tmp_path_factory.mktemp("shapes")
    make_shapes(str(root), train=0, val=6, seed=3)
    annotations = str(root / "annotations" / "instances_val.json")
    coco = COCO(annotations)
    rng = np.random.default_rng(5)
    images, k, cells = coco.dataset["images"], 12, 16
    boxes = np.zeros((len(images), k, 4), np.float32)
    scores = np.sort(rng.uniform(0, 0.3, (len(images), k)), axis=1)[:, ::-1].astype(np.float32)
    classes = rng.integers(0, 3, (len(images), k)).astype(np.int32)
    masks = rng.uniform(0, 1, (len(images), k, cells, cells)).astype(np.float32)
    grid = (np.arange(cells) + 0.5) / cells
    for b, image in enumerate(images):
        for j, a in enumerate(coco.imgToAnns[image["id"]][:k]):
            x, y, w, h = a["bbox"]
            rows = np.clip((y + grid * h).astype(int), 0, image["height"] - 1)
            cols = np.clip((x + grid * w).astype(int), 0, image["width"] - 1)
            masks[b, j] = coco.annToMask(a)[rows][:, cols] + rng.normal(0, 0.2, (cells, cells))
            x, y, w, h = np.asarray(a["bbox"]) + rng.normal(0, 1.0, 4)
            boxes[b, j] = [y, x, y + h, x + w]
            scores[b, j] = rng.uniform(0.4, 1.0)
            classes[b, j] = CATEGORY_IDS.index(a["category_id"])
        for j in range(len(coco.imgToAnns[image["id"]][:k]), k):
            y, x = rng.uniform(0, 100, 2)
            boxes[b, j] = [y, x, y + rng.uniform(2, 40), x + rng.uniform(2, 40)]
    batch = {"boxes": boxes, "scores": scores, "classes": classes, "masks": masks.clip(0, 1),
             "num_detections": np.full(len(images), k, np.int32)}
    sizes = [(image["height"], image["width"]) for image in images]
    return annotations, [image["id"] for image in images], batch, sizes


def both(evaluated):
    _, image_ids, batch, sizes = evaluated
    reference, compact = [], CocoResults()
    for i, (image_id, size) in enumerate(zip(image_ids, sizes)):
        reference.extend(reference_entries(image_id, to_original_image(batch, i, 1.0, size, 0.5)))
        compact.add(image_id, **coco_columns(batch, i, 1.0, size, 0.5, CATEGORY_IDS))
    return reference, compact


def test_compact_results_equal_the_dicts_and_give_the_same_metrics(evaluated):
    annotations, image_ids, _, _ = evaluated
    reference, compact = both(evaluated)
    assert len(compact) == len(reference) == 6 * 12
    assert list(compact) == reference  # every value, masks included
    expected = coco_metrics(annotations, reference, image_ids)
    got = coco_metrics(annotations, compact, image_ids)
    assert 0.3 < expected["segm"]["AP"] < 0.99 and 0.3 < expected["bbox"]["AP"] < 0.99  # not trivial
    for iou_type in IOU_TYPES:
        for name in METRIC_NAMES:
            assert got[iou_type][name] == pytest.approx(expected[iou_type][name], abs=1e-9)


def test_compact_results_take_under_half_the_memory(evaluated):
    """Python's allocations for the same detections, counted by tracemalloc."""
    _, image_ids, batch, sizes = evaluated
    results = [to_original_image(batch, i, 1.0, size, 0.5) for i, size in enumerate(sizes)]
    columns = [coco_columns(batch, i, 1.0, size, 0.5, CATEGORY_IDS) for i, size in enumerate(sizes)]

    def allocated(build):
        tracemalloc.start()
        kept = build()
        size = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        return size, kept

    def as_dicts():
        return [entry for image_id, result in zip(image_ids * 20, results * 20)
                for entry in reference_entries(image_id, result)]

    def as_columns():
        compact = CocoResults()
        for image_id, found in zip(image_ids * 20, columns * 20):
            compact.add(image_id, **found)
        compact.nbytes  # joins the pending pieces, as iterating does
        return compact

    dicts, kept_dicts = allocated(as_dicts)
    compact, kept_compact = allocated(as_columns)
    assert len(kept_dicts) == len(kept_compact) == 20 * 6 * 12
    print(f"bytes per detection: dicts {dicts / len(kept_dicts):.0f}, columns {compact / len(kept_dicts):.0f}")
    assert compact <= 0.5 * dicts, (compact / len(kept_dicts), dicts / len(kept_dicts))


def test_write_json_gives_the_bytes_of_the_list(evaluated, tmp_path):
    reference, compact = both(evaluated)
    path = tmp_path / "detections.json"
    compact.write_json(str(path))
    assert path.read_text() == json.dumps(reference)
    assert [p.name for p in tmp_path.iterdir()] == ["detections.json"]  # no temporary file left
    empty = tmp_path / "empty.json"
    CocoResults().write_json(str(empty))
    assert json.loads(empty.read_text()) == [] and not CocoResults()
