"""What the COCO summary numbers do not show: F1 against the score threshold (and the threshold
that maximises it), a confusion matrix, and precision-recall curves per class.

`write()` computes the best F1 threshold always (`predict --score auto` reads it from
metrics.json) and, when matplotlib is installed (the `plots` extra), draws into `eval/plots/`:

- `pr_segm.png`, `pr_bbox.png`: precision against recall per class at IoU 0.5 and 0.75 (the
  curves COCOeval accumulates, at area "all" and 100 detections per image);
- `f1_score.png`: F1 over all classes against the score threshold, segm and bbox, the best
  segm threshold marked;
- `confusion_matrix.png`: detections at or above that threshold matched to ground-truth objects
  at mask IoU >= 0.5 whatever their class, rows the predicted class, columns the true one, plus
  a background row (objects nothing found) and column (detections of nothing).

Matching is greedy, the highest score first, as COCOeval matches; crowd regions are left out.
"""

import functools
import logging
import os

import numpy as np
import pycocotools.mask as mask_utils

from centermask_tf.data.coco import index_coco
from centermask_tf.files import atomic_write

logger = logging.getLogger("centermask_tf.diagnostics")

MATCH_IOU = 0.5
SCORE_THRESHOLDS = np.round(np.linspace(0.0, 1.0, 101), 2)
# Classes up to which the plots label every curve and every cell.
_LEGIBLE = 12


def match(coco, detections, iou_type, class_aware=True):
    """For each detection (in the order given), the index into `coco.dataset["annotations"]`
    of the ground-truth object it matches at IoU >= `MATCH_IOU`, or -1."""
    annotations = coco.dataset["annotations"]
    position = {a["id"]: i for i, a in enumerate(annotations)}
    matched = np.full(len(detections), -1)
    by_image = {}
    for i, d in enumerate(detections):
        by_image.setdefault(d["image_id"], []).append(i)
    for image_id, indices in by_image.items():
        truth = [a for a in coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        if not truth:
            continue
        indices = sorted(indices, key=lambda i: -detections[i]["score"])
        if iou_type == "segm":
            found = [detections[i]["segmentation"] for i in indices]
            true = [coco.annToRLE(a) for a in truth]
        else:
            found = [detections[i]["bbox"] for i in indices]
            true = [a["bbox"] for a in truth]
        ious = np.asarray(mask_utils.iou(found, true, [0] * len(truth))).reshape(len(indices), len(truth))
        classes = np.array([a["category_id"] for a in truth])
        taken = np.zeros(len(truth), bool)
        for row, i in enumerate(indices):
            allowed = ~taken & (ious[row] >= MATCH_IOU)
            if class_aware:
                allowed &= classes == detections[i]["category_id"]
            if allowed.any():
                best = int(np.argmax(np.where(allowed, ious[row], -1)))
                taken[best] = True
                matched[i] = position[truth[best]["id"]]
    return matched


def f1_curve(coco, detections, iou_type):
    """F1 over all classes at each of `SCORE_THRESHOLDS` (class-aware matches)."""
    objects = sum(1 for a in coco.dataset["annotations"] if not a.get("iscrowd", 0))
    scores = np.array([d["score"] for d in detections])
    hits = match(coco, detections, iou_type) >= 0
    kept = scores[None, :] >= SCORE_THRESHOLDS[:, None]
    true_positives = (kept & hits).sum(1)
    found = kept.sum(1)
    precision = np.divide(true_positives, found, out=np.zeros(len(found)), where=found > 0)
    recall = true_positives / max(objects, 1)
    return np.divide(2 * precision * recall, precision + recall, out=np.zeros(len(found)),
                     where=precision + recall > 0)


def confusion_matrix(coco, detections, threshold):
    """`[C + 1, C + 1]` counts: rows the predicted class, columns the true one, in the order
    of `coco.dataset["categories"]`; the last row and column are the background."""
    categories = [c["id"] for c in coco.dataset["categories"]]
    index = {category: i for i, category in enumerate(categories)}
    background = len(categories)
    kept = [d for d in detections if d["score"] >= threshold]
    matched = match(coco, kept, "segm", class_aware=False)
    counts = np.zeros((background + 1, background + 1), np.int64)
    annotations = coco.dataset["annotations"]
    for d, m in zip(kept, matched):
        counts[index[d["category_id"]], index[annotations[m]["category_id"]] if m >= 0 else background] += 1
    found = set(matched[matched >= 0].tolist())
    for i, a in enumerate(annotations):
        if i not in found and not a.get("iscrowd", 0):
            counts[background, index[a["category_id"]]] += 1
    return counts


@functools.cache
def _no_matplotlib_notice():
    """Said once per process: the demo evaluates three times."""
    logger.warning("no plots: they need matplotlib (.venv/bin/pip install -e '.[plots]')")


def write(data, detections, image_ids, evaluators, plots_dir):
    """The score threshold of the best segm F1 (None without detections) and, with
    matplotlib, the plots of the module docstring in `plots_dir`. The ground truth is
    `data`'s on `image_ids`."""
    if not detections:
        return None
    wanted = set(image_ids)
    coco = index_coco({**data, "images": [i for i in data["images"] if i["id"] in wanted],
                       "annotations": [a for a in data["annotations"] if a["image_id"] in wanted]})
    curves = {iou_type: f1_curve(coco, detections, iou_type) for iou_type in evaluators}
    best = float(SCORE_THRESHOLDS[int(np.argmax(curves["segm"]))])
    try:
        import matplotlib
    except ImportError:
        _no_matplotlib_notice()
        return best
    matplotlib.use("Agg")  # files only: no display here or on a server
    from matplotlib import pyplot

    names = {c["id"]: c["name"] for c in data["categories"]}
    for iou_type, evaluator in evaluators.items():
        figure, axes = pyplot.subplots(1, 2, figsize=(10, 4.5), sharey=True)
        thresholds = list(np.round(evaluator.params.iouThrs, 2))
        recall = evaluator.params.recThrs
        for axis, iou in zip(axes, (0.5, 0.75)):
            precision = evaluator.eval["precision"][thresholds.index(iou), :, :, 0, -1]
            for k, category_id in enumerate(evaluator.params.catIds):
                curve = precision[:, k]
                if (curve > -1).any():  # -1: no ground truth of this class
                    curve = np.maximum(curve, 0)
                    axis.plot(recall, curve, label=f"{names[category_id]} (AP {curve.mean():.3f})")
            axis.set(title=f"{iou_type} precision-recall, IoU {iou}", xlabel="recall", xlim=(0, 1), ylim=(0, 1.02))
            if len(names) <= _LEGIBLE:  # 80 COCO names would hide the curves: metrics.json has them
                axis.legend(loc="lower left", fontsize=8)
            axis.grid(alpha=0.3)
        axes[0].set_ylabel("precision")
        _save(figure, os.path.join(plots_dir, f"pr_{iou_type}.png"), pyplot)

    figure, axis = pyplot.subplots(figsize=(6, 4.5))
    for iou_type, curve in curves.items():
        axis.plot(SCORE_THRESHOLDS, curve, label=iou_type)
    axis.axvline(best, color="grey", linestyle="--")
    axis.annotate(f"best segm F1 {curves['segm'].max():.3f}\nat score {best:.2f}", (best, curves["segm"].max()),
                  xytext=(8, -30), textcoords="offset points", fontsize=9)
    axis.set(title=f"F1 against score threshold (IoU {MATCH_IOU})", xlabel="score threshold", ylabel="F1",
             xlim=(0, 1), ylim=(0, 1.02))
    axis.legend()
    axis.grid(alpha=0.3)
    _save(figure, os.path.join(plots_dir, "f1_score.png"), pyplot)

    counts = confusion_matrix(coco, detections, best)
    labels = [*names.values(), "background"]
    side = min(len(labels), 4 * _LEGIBLE)  # at COCO's 81 labels, a readable but bounded canvas
    figure, axis = pyplot.subplots(figsize=(1.2 * side + 2.5, 1.0 * side + 2))
    axis.imshow(counts, cmap="Blues")
    if len(labels) <= 2 * _LEGIBLE:
        for (row, column), value in np.ndenumerate(counts):
            axis.text(column, row, str(value), ha="center", va="center",
                      color="white" if value > counts.max() / 2 else "black")
    axis.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    axis.set_yticks(range(len(labels)), labels)
    axis.set(title=f"confusion matrix: segm IoU >= {MATCH_IOU}, score >= {best:.2f}", xlabel="true", ylabel="predicted")
    _save(figure, os.path.join(plots_dir, "confusion_matrix.png"), pyplot)
    return best


def _save(figure, path, pyplot):
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=100, format="png"), "plot")
    pyplot.close(figure)
