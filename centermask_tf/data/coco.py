"""Reading COCO-format instance annotations (pycocotools) with every fault reported, not fatal.

`read_coco` validates the JSON, maps category ids of any value to contiguous indices (sorted by
id; `Categories` maps back), decodes polygons, compressed and uncompressed RLE with pycocotools,
and yields one clean record per usable image. Each bad image or annotation is skipped with a
warning naming the file or annotation id and the reason, counted per kind in a `FaultReport`;
with `strict=True` the first one raises `DataError` instead.
"""

import collections
import contextlib
import io
import json
import logging
import os
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
from pycocotools.coco import COCO

from centermask_tf.errors import UserError

logger = logging.getLogger("centermask_tf.data")

FAULT_KINDS = {
    "missing_image": "the image file does not exist",
    "unreadable_image": "the file is not a decodable JPEG/PNG/BMP/GIF (truncated or not an image)",
    "unsafe_path": "file_name resolves outside the image root; refused",
    "size_mismatch": "the decoded image size differs from the JSON's height/width",
    "orphan_annotation": "the annotation's image_id is not in 'images'",
    "unknown_category": "the annotation's category_id is not in 'categories'",
    "zero_area_box": "the bbox has zero or negative width/height (or is missing)",
    "degenerate_polygon": "every polygon has fewer than 3 points",
    "empty_segmentation": "the segmentation is empty or covers no pixel",
    "bad_rle": "the RLE's size differs from the image or its counts are malformed",
    "out_of_bounds": "coordinates lie outside the image",
}
# Real annotation tools round coordinates: allow this much slack before calling them outside.
_BOUNDS_SLACK = 1.0


class DataError(UserError, ValueError):
    """A dataset fault that cannot be skipped (or any fault with strict: true)."""


class FaultReport:
    """Counts skipped samples per kind; warns for each, or raises on the first if strict."""

    def __init__(self, strict=False, log=True):
        self.strict = strict
        self.log = log
        self.counts = collections.Counter()

    def add(self, kind, where, detail=""):
        message = f"{where}: {FAULT_KINDS[kind]}" + (f" ({detail})" if detail else "")
        if self.strict:
            raise DataError(
                f"{message}. Fix or remove it, or set data.strict: false to skip bad samples."
            )
        self.counts[kind] += 1
        if self.log:
            logger.warning("skipped %s", message)

    def summary(self):
        if not self.counts:
            return "no bad samples"
        parts = ", ".join(f"{kind}: {n}" for kind, n in sorted(self.counts.items()))
        return f"skipped {sum(self.counts.values())} bad samples ({parts})"


@dataclass(frozen=True)
class Categories:
    """The dataset's categories in contiguous-index order (sorted by their own ids)."""

    ids: tuple
    names: tuple

    @classmethod
    def from_coco(cls, categories):
        ordered = sorted(categories, key=lambda c: c["id"])
        return cls(tuple(int(c["id"]) for c in ordered), tuple(str(c["name"]) for c in ordered))

    def index_of(self, category_id):
        return self.ids.index(category_id)

    def to_list(self):
        return [{"id": i, "name": n} for i, n in zip(self.ids, self.names)]


def uncompressed_counts(mask):
    """COCO uncompressed RLE counts of a binary `[H, W]` mask (column-major, zeros first)."""
    flat = np.asarray(mask, np.uint8).reshape(-1, order="F")
    edges = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = np.diff(edges)
    return np.concatenate([[0], counts]) if flat.size and flat[0] == 1 else counts


def load_annotations(path):
    """Reads and structurally checks a COCO instances JSON; returns a pycocotools `COCO`."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DataError(f"Annotation file '{path}' does not exist; check data.*.annotations.")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"Annotation file '{path}' is not valid JSON: {e}")
    if not isinstance(data, dict):
        raise DataError(f"Annotation file '{path}' must hold a JSON object.")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"Annotation file '{path}' has no '{key}' list (COCO instances format).")
    if not data["categories"]:
        raise DataError(f"Annotation file '{path}' has an empty 'categories' list.")
    return index_coco(data)


def index_coco(data):
    """A pycocotools `COCO` over an already loaded instances dict."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco.createIndex()
    return coco


def _resolve(root, file_name):
    """The image path under `root`, or None when `file_name` escapes it (`../`, absolute)."""
    root = os.path.realpath(root)
    path = os.path.realpath(os.path.join(root, file_name))
    return path if os.path.commonpath([root, path]) == root else None


def _check_image(path, height, width, where, report):
    """True when the file decodes as an image of the annotated size."""
    if not os.path.isfile(path):
        report.add("missing_image", where, path)
        return False
    try:
        data = tf.io.read_file(path)
        shape = tf.io.decode_image(data, channels=3, expand_animations=False).shape
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError, ValueError) as e:
        report.add("unreadable_image", where, str(e).splitlines()[0][:120])
        return False
    if (shape[0], shape[1]) != (height, width):
        report.add("size_mismatch", where, f"file {shape[0]}x{shape[1]}, JSON {height}x{width}")
        return False
    return True


def _annotation_mask(coco, ann, height, width, where, report):
    """The annotation's binary mask, or None (reported) when its segmentation is unusable."""
    segmentation = ann.get("segmentation")
    if not segmentation:
        report.add("empty_segmentation", where)
        return None
    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]
        if not polygons:
            report.add("degenerate_polygon", where)
            return None
        coords = np.concatenate([np.asarray(p, np.float64) for p in polygons])
        xs, ys = coords[0::2], coords[1::2]
        if xs.min() < -_BOUNDS_SLACK or ys.min() < -_BOUNDS_SLACK or xs.max() > width + _BOUNDS_SLACK or ys.max() > height + _BOUNDS_SLACK:
            report.add("out_of_bounds", where, "polygon")
            return None
        ann = dict(ann, segmentation=polygons)
    elif isinstance(segmentation, dict):
        size = segmentation.get("size")
        counts = segmentation.get("counts")
        if list(size or []) != [height, width] or counts is None:
            report.add("bad_rle", where, f"size {size}, image {height}x{width}")
            return None
        if isinstance(counts, list) and sum(counts) != height * width:
            report.add("bad_rle", where, f"counts sum to {sum(counts)}, not {height * width}")
            return None
    else:
        report.add("empty_segmentation", where, f"unsupported segmentation {type(segmentation).__name__}")
        return None
    try:
        mask = coco.annToMask(ann)
    except Exception as e:  # pycocotools raises bare exceptions on malformed RLE strings
        report.add("bad_rle", where, str(e)[:120])
        return None
    if not mask.any():
        report.add("empty_segmentation", where, "no pixel set")
        return None
    return mask


def _box(ann, height, width, where, report):
    """COCO [x, y, w, h] -> [ymin, xmin, ymax, xmax] clipped to the image, or None."""
    bbox = ann.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4 or bbox[2] <= 0 or bbox[3] <= 0:
        report.add("zero_area_box", where, f"bbox {bbox}")
        return None
    x, y, w, h = (float(v) for v in bbox)
    if x < -_BOUNDS_SLACK or y < -_BOUNDS_SLACK or x + w > width + _BOUNDS_SLACK or y + h > height + _BOUNDS_SLACK:
        report.add("out_of_bounds", where, f"bbox {bbox} in a {width}x{height} image")
        return None
    return [max(y, 0.0), max(x, 0.0), min(y + h, height), min(x + w, width)]


def usable_annotations(coco, image_ids):
    """The annotations of `image_ids` that reading keeps (valid box, category and segmentation),
    e.g. as evaluation ground truth: pycocotools' COCOeval fails on malformed segmentations."""
    report = FaultReport(log=False)
    category_ids = {c["id"] for c in coco.dataset["categories"]}
    kept = []
    for image_id in image_ids:
        info = coco.imgs[image_id]
        height, width = int(info["height"]), int(info["width"])
        for ann in coco.imgToAnns.get(image_id, []):
            if ann.get("category_id") not in category_ids:
                continue
            where = f"annotation id {ann.get('id')}"
            if _box(ann, height, width, where, report) is None:
                continue
            if _annotation_mask(coco, ann, height, width, where, report) is not None:
                kept.append(ann)
    return kept


def read_coco(annotations, images, categories=None, report=None):
    """Yields clean per-image records of a COCO-format split.

    Args:
        annotations: path of the instances JSON.
        images: image root folder that `file_name`s are relative to.
        categories: the `Categories` to map to (e.g. the training split's); default: this file's.
        report: a `FaultReport` collecting skipped samples.

    Yields:
        dicts with `image_id`, `path`, `height`, `width` and `objects`: a list of dicts with
        `bbox` [ymin, xmin, ymax, xmax] (pixels), `label` (contiguous index), `is_crowd`,
        `rle` (uncompressed counts, int32, column-major).
    """
    report = report or FaultReport()
    coco = load_annotations(annotations)
    categories = categories or Categories.from_coco(coco.dataset["categories"])
    known_images = set(coco.imgs)
    for ann in coco.dataset["annotations"]:
        where = f"{annotations}: annotation id {ann.get('id')}"
        if ann.get("image_id") not in known_images:
            report.add("orphan_annotation", where, f"image_id {ann.get('image_id')}")
        elif ann.get("category_id") not in categories.ids:
            report.add("unknown_category", where, f"category_id {ann.get('category_id')}")

    for image_id in sorted(coco.imgs):
        info = coco.imgs[image_id]
        height, width = int(info["height"]), int(info["width"])
        file_name = str(info.get("file_name", ""))
        where = f"image id {image_id} '{file_name}'"
        path = _resolve(images, file_name)
        if path is None:
            report.add("unsafe_path", where, f"root '{images}'")
            continue
        if not _check_image(path, height, width, where, report):
            continue
        objects = []
        for ann in coco.imgToAnns.get(image_id, []):
            if ann.get("category_id") not in categories.ids:
                continue  # already reported above
            where = f"{annotations}: annotation id {ann.get('id')} (image '{file_name}')"
            box = _box(ann, height, width, where, report)
            if box is None:
                continue
            mask = _annotation_mask(coco, ann, height, width, where, report)
            if mask is None:
                continue
            objects.append(
                {
                    "bbox": np.asarray(box, np.float32),
                    "label": categories.index_of(ann["category_id"]),
                    "is_crowd": bool(ann.get("iscrowd", 0)),
                    "rle": uncompressed_counts(mask).astype(np.int32),
                }
            )
        yield {"image_id": int(image_id), "path": path, "height": height, "width": width, "objects": objects}
