"""Prediction on image files: overlay PNGs (coloured masks, boxes, class names, scores) and a
`predictions.json` in the COCO results format (plus the file name and category name).

    centermask predict --workdir work/demo --input work/shapes/val --output work/demo/predictions

Prediction never stops on a bad file and never overwrites an input: each image's overlay is
`<file name>.overlay.png` (so `a.jpg` and `a.png` get different ones, and none can replace an
input even when `--output` is the input folder), overlay files are never read as inputs, and a
file that cannot be used (empty, corrupt, over the size or pixel limit) is skipped with a warning
and listed in `predictions.json` with the reason. Images are read upright (EXIF orientation
applied, as a photo viewer shows them); the file-size and pixel limits are checked before any
pixel is decoded.
"""

import collections
import logging
import os
import time

import numpy as np
from PIL import Image
from tqdm import tqdm

from centermask_tf.files import atomic_write, remove_stale_temporaries, write_json
from centermask_tf.images import (
    DEFAULT_MAX_MEGABYTES,
    DEFAULT_MAX_PIXELS,
    OVERLAY_SUFFIX,
    ImageError,
    load_image,
)

logger = logging.getLogger("centermask_tf.predict")
PREDICTIONS_COCO = "predictions_coco.json"
SAVE_CHOICES = ("overlays", "coco", "masks")


def _relative_names(files):
    """Each file's path relative to the inputs' common folder (where outputs mirror it), and
    that folder."""
    folders = [os.path.dirname(os.path.abspath(f)) for f in files]
    root = os.path.commonpath(folders) if folders else os.getcwd()
    return [os.path.relpath(os.path.abspath(f), root) for f in files], root


class _Progress:
    """A tqdm bar with images/s on a terminal; in a log file, one line every `every` images."""

    def __init__(self, total, every=50):
        self.bar = tqdm(total=total, desc="predict", unit="img", disable=None)
        self.total, self.every, self.done, self.start = total, every, 0, time.monotonic()

    def update(self):
        self.done += 1
        self.bar.update(1)
        if self.bar.disable and (self.done % self.every == 0 or self.done == self.total):
            rate = self.done / max(time.monotonic() - self.start, 1e-9)
            logger.info("predict: %d/%d images, %.1f img/s", self.done, self.total, rate)

    def close(self):
        self.bar.close()


def coco_file(images, annotations, categories, root):
    """A COCO instances file (dict) of predictions: images with file names relative to `root`
    (what `data.*.images` points at to train on it) and annotations with polygons and scores."""
    return {
        "info": {"description": "centermask predict", "images_root": root},
        "images": images,
        "categories": [{"id": int(c["id"]), "name": c["name"]} for c in categories],
        "annotations": annotations,
    }


def predict_files(detector, files, output, score_threshold=None, save=("overlays",), tile=None, tile_overlap=0.25,
                  max_pixels=DEFAULT_MAX_PIXELS, max_megabytes=DEFAULT_MAX_MEGABYTES, batch_size=None):
    """Runs `detector` (an `inference.ImageDetector`) on image files and writes, into `output`
    (mirroring the inputs' folders below their common folder): `predictions.json` always, and
    per `save`: `overlays` (`<file name>.overlay.png`), `coco` (`predictions_coco.json`, a COCO
    instances file with polygons) and `masks` (`masks/<file name>.mask<k>.png` per instance).

    Args:
        batch_size: images (tiles with `tile`) per network call; default 1 image, 8 tiles.

    Returns:
        One entry per file: `{"file", "detections", ...}`, or `{"file", "error"}` for a file
        that was skipped.
    """
    os.makedirs(output, exist_ok=True)
    remove_stale_temporaries(output)  # overlays and JSON half-written by a killed run
    relative, root = _relative_names(files)
    names = {int(c["id"]): c["name"] for c in detector.categories}
    entries = [None] * len(files)
    loaded = collections.deque()  # indices of the files handed to the detector, in order
    progress = _Progress(len(files))

    def readable():
        for index, path in enumerate(files):
            try:
                image = load_image(path, max_pixels, max_megabytes)
            except ImageError as e:
                logger.warning("skipped %s", e)
                entries[index] = {"file": path, "error": str(e)}
                progress.update()
                continue
            loaded.append(index)
            yield path, image

    images, annotations = [], []
    stream = detector.stream(readable(), score_threshold, None, batch_size or (8 if tile else 1), tile, tile_overlap)
    for result in stream:
        index = loaded.popleft()
        entries[index] = _save(result, os.path.join(output, relative[index]), save, names)
        if "coco" in save:
            image_id = len(images) + 1
            height, width = result.size
            images.append({"id": image_id, "file_name": relative[index], "height": height, "width": width})
            annotations.extend(result.to_coco(image_id, len(annotations) + 1))
        progress.update()
    progress.close()
    write_json(os.path.join(output, "predictions.json"), entries)
    if "coco" in save:
        write_json(os.path.join(output, PREDICTIONS_COCO), coco_file(images, annotations, detector.categories, root))
    return entries


def _save(result, target, save, names):
    """Writes one image's outputs beside `target` (its mirrored path in the output folder) and
    returns its `predictions.json` entry."""
    entry = {"file": result.path}
    if "overlays" in save:
        picture = Image.fromarray(result.plot())
        entry["overlay"] = atomic_write(target + OVERLAY_SUFFIX, lambda tmp: picture.save(tmp, format="PNG"),
                                        "overlay", picture.size[0] * picture.size[1])
    if "masks" in save:
        folder = os.path.join(os.path.dirname(target), "masks")
        entry["masks"] = []
        for k, mask in enumerate(result.instance_masks):  # one full-size mask at a time
            png = Image.fromarray(mask.full(*result.size) * np.uint8(255))
            path = os.path.join(folder, f"{os.path.basename(target)}.mask{k:03d}.png")
            entry["masks"].append(atomic_write(path, lambda tmp, png=png: png.save(tmp, format="PNG"), "mask"))
    entry["detections"] = [
        {"category_id": a["category_id"], "category": names[a["category_id"]], "bbox": a["bbox"],
         "score": a["score"], "area": a["area"], "segmentation": a["segmentation"]}
        for a in result.to_coco(segmentation="rle")
    ]
    return entry
