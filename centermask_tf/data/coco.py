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
import math
import os
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
from pycocotools.coco import COCO

from centermask_tf.errors import UserError
from centermask_tf.images import exif_orientation

logger = logging.getLogger("centermask_tf.data")

FAULT_KINDS = {
    "missing_image": "the image file does not exist",
    "unreadable_image": "the file is not a decodable JPEG/PNG/BMP/GIF (truncated or not an image)",
    "unsafe_path": "file_name resolves outside the image root; refused",
    "size_mismatch": "the JSON's height/width match neither the image as stored nor as displayed (EXIF orientation)",
    "bad_image_record": "an 'images' entry has a field of the wrong type or value",
    "bad_annotation_record": "an 'annotations' entry has a field of the wrong type or value",
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


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _image_problem(image):
    """What is wrong with one 'images' entry, or None."""
    if not isinstance(image, dict):
        return f"entry {image!r:.60} is not an object"
    if not _is_int(image.get("id")):
        return f"id {image.get('id')!r:.60} is not an integer"
    if not isinstance(image.get("file_name"), str) or not image["file_name"]:
        return f"file_name {image.get('file_name')!r:.60} is not a file name"
    for key in ("height", "width"):
        if not _is_int(image.get(key)) or image[key] < 1:
            return f"{key} {image.get(key)!r:.60} is not a positive integer"
    return None


def _annotation_problem(ann):
    """What is wrong with the types of one 'annotations' entry, or None (values such as a
    zero-area box or an out-of-image polygon are checked later, with their own fault kinds)."""
    if not isinstance(ann, dict):
        return f"entry {ann!r:.60} is not an object"
    for key in ("id", "image_id", "category_id"):  # pycocotools indexes annotations by id
        if not _is_int(ann.get(key)):
            return f"{key} {ann.get(key)!r:.60} is not an integer"
    bbox = ann.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        return f"bbox {bbox!r:.60} is not a list of 4 numbers [x, y, width, height]"
    if ann.get("iscrowd", 0) not in (0, 1):
        return f"iscrowd {ann.get('iscrowd')!r:.60} is not 0 or 1"
    if "area" in ann and not _is_number(ann["area"]):
        return f"area {ann['area']!r:.60} is not a number"
    segmentation = ann.get("segmentation")
    if isinstance(segmentation, list):
        if not all(isinstance(p, list) and all(_is_number(v) for v in p) for p in segmentation):
            return "segmentation polygons are not lists of numbers"
    elif isinstance(segmentation, dict):
        size, counts = segmentation.get("size"), segmentation.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) for v in size)):
            return f"segmentation size {size!r:.60} is not [height, width]"
        if not (isinstance(counts, str) or (isinstance(counts, list) and all(_is_int(v) and v >= 0 for v in counts))):
            return "segmentation counts are neither an RLE string nor a list of run lengths"
    elif segmentation is not None:
        return f"segmentation {segmentation!r:.60} is neither polygons nor RLE"
    return None


def _drop_bad_records(data, path, report):
    """Removes (and reports) 'images' and 'annotations' entries whose fields have the wrong
    type, and later duplicates of an id: pycocotools indexes them blindly."""
    images, seen = [], set()
    for image in data["images"]:
        problem = _image_problem(image)
        if problem is None and image["id"] in seen:
            problem = f"id {image['id']} appears twice"
        if problem:
            report.add("bad_image_record", f"{path}: images entry", problem)
            continue
        seen.add(image["id"])
        images.append(image)
    annotations, seen = [], set()
    for ann in data["annotations"]:
        problem = _annotation_problem(ann)
        ann_id = ann.get("id") if isinstance(ann, dict) else None
        if problem is None and ann_id in seen:
            problem = "the id appears twice"
        if problem:
            report.add("bad_annotation_record", f"{path}: annotation id {ann_id!r:.30}", problem)
            continue
        seen.add(ann_id)
        annotations.append(ann)
    return dict(data, images=images, annotations=annotations)


def _check_categories(categories, path):
    ids = set()
    for category in categories:
        if not isinstance(category, dict) or not _is_int(category.get("id")) or not isinstance(category.get("name"), str):
            raise DataError(
                f"Annotation file '{path}': category {category!r:.80} needs an integer 'id' and a "
                "string 'name'."
            )
        if category["id"] in ids:
            raise DataError(f"Annotation file '{path}': category id {category['id']} appears twice.")
        ids.add(category["id"])


def load_annotations(path, report=None):
    """Reads and checks a COCO instances JSON; returns a pycocotools `COCO` of the entries whose
    fields are well-typed (the others are reported to `report`, default: dropped silently)."""
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
    _check_categories(data["categories"], path)
    return index_coco(_drop_bad_records(data, path, report or FaultReport(log=False)))


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
    """Whether the file decodes, and in which orientation it matches the annotated size.

    Returns:
        None (reported) when unusable; else True when the annotations are in the displayed
        (EXIF-transposed) orientation, as annotation tools draw them, and the stored pixels
        must be transposed; False when they fit the pixels as stored.
    """
    if not os.path.isfile(path):
        report.add("missing_image", where, path)
        return None
    try:
        data = tf.io.read_file(path)
        shape = tf.io.decode_image(data, channels=3, expand_animations=False).shape
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError, ValueError) as e:
        report.add("unreadable_image", where, str(e).splitlines()[0][:120])
        return None
    stored = (shape[0], shape[1])
    orientation = exif_orientation(path)
    displayed = stored[::-1] if orientation >= 5 else stored  # 5-8 turn the image by 90 degrees
    if displayed == (height, width):
        return orientation != 1
    if stored == (height, width):
        logger.warning("%s: EXIF orientation %d ignored, the JSON size fits the stored pixels", where, orientation)
        return False
    report.add(
        "size_mismatch", where,
        f"file {stored[0]}x{stored[1]}" + (f" ({displayed[0]}x{displayed[1]} displayed)" if displayed != stored else "")
        + f", JSON {height}x{width}",
    )
    return None


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


def open_coco(annotations, categories=None, report=None):
    """Loads a COCO-format split and reports its annotations that point nowhere.

    Returns:
        (the pycocotools `COCO`, the `Categories` to map to: `categories` or the file's own).
    """
    report = report or FaultReport()
    coco = load_annotations(annotations, report)
    categories = categories or Categories.from_coco(coco.dataset["categories"])
    known_images = set(coco.imgs)
    for ann in coco.dataset["annotations"]:
        where = f"{annotations}: annotation id {ann.get('id')}"
        if ann.get("image_id") not in known_images:
            report.add("orphan_annotation", where, f"image_id {ann.get('image_id')}")
        elif ann.get("category_id") not in categories.ids:
            report.add("unknown_category", where, f"category_id {ann.get('category_id')}")
    return coco, categories


def image_record(coco, image_id, images, categories, report, annotations=""):
    """One image's clean record (see `read_coco`), or None when the image is unusable
    (reported). `annotations` names the JSON in messages."""
    info = coco.imgs[image_id]
    height, width = int(info["height"]), int(info["width"])
    file_name = str(info.get("file_name", ""))
    where = f"image id {image_id} '{file_name}'"
    path = _resolve(images, file_name)
    if path is None:
        report.add("unsafe_path", where, f"root '{images}'")
        return None
    transpose = _check_image(path, height, width, where, report)
    if transpose is None:
        return None
    objects = []
    for ann in coco.imgToAnns.get(image_id, []):
        if ann.get("category_id") not in categories.ids:
            continue  # reported by open_coco
        where = f"{annotations}: annotation id {ann.get('id')} (image '{file_name}')"
        box = _box(ann, height, width, where, report)
        if box is None:
            continue
        mask = _annotation_mask(coco, ann, height, width, where, report)
        if mask is None:
            continue
        objects.append(
            {
                "id": int(ann["id"]),
                "bbox": np.asarray(box, np.float32),
                "label": categories.index_of(ann["category_id"]),
                "is_crowd": bool(ann.get("iscrowd", 0)),
                "rle": uncompressed_counts(mask).astype(np.int32),
            }
        )
    return {
        "image_id": int(image_id), "path": path, "transpose": transpose,
        "height": height, "width": width, "objects": objects,
    }


def read_coco(annotations, images, categories=None, report=None):
    """Yields clean per-image records of a COCO-format split, in image id order.

    Args:
        annotations: path of the instances JSON.
        images: image root folder that `file_name`s are relative to.
        categories: the `Categories` to map to (e.g. the training split's); default: this file's.
        report: a `FaultReport` collecting skipped samples.

    Yields:
        dicts with `image_id`, `path`, `transpose` (the stored pixels must be EXIF-transposed to
        match the annotations), `height`, `width` and `objects`: a list of dicts with
        `id` (the annotation's), `bbox` [ymin, xmin, ymax, xmax] (pixels), `label` (contiguous
        index), `is_crowd`, `rle` (uncompressed counts, int32, column-major).
    """
    report = report or FaultReport()
    coco, categories = open_coco(annotations, categories, report)
    for image_id in sorted(coco.imgs):
        record = image_record(coco, image_id, images, categories, report, annotations)
        if record is not None:
            yield record
