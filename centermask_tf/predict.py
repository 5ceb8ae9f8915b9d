"""Prediction on image and video files: overlay PNGs (coloured masks, boxes, class names,
scores), a `predictions.json` in the COCO results format (plus the file name and category name),
on request a COCO instances file with polygons and one PNG per instance; for a video an overlay
MP4 and one JSON line per frame.

    centermask predict --workdir work/demo --input work/shapes/val --output work/demo/predictions
    centermask predict --workdir work/demo --input 'photos/**/*.tif' clip.mp4 --recursive --output out \\
        --save overlays,coco,masks --tile 512

Prediction never stops on a bad file and never overwrites an input: each image's overlay is
`<file name>.overlay.png` (so `a.jpg` and `a.png` get different ones, and none can replace an
input even when `--output` is the input folder), overlay files are never read as inputs, and a
file that cannot be used (empty, corrupt, over the size or pixel limit) is skipped with a warning
and listed in `predictions.json` with the reason. Images are read upright (EXIF orientation
applied, as a photo viewer shows them); the file-size and pixel limits are checked before any
pixel is decoded.
"""

import collections
import json
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
    VIDEO_EXTENSIONS,
    ImageError,
    load_image,
)
from centermask_tf.video import VideoError, VideoWriter, video_info

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
    """A tqdm bar with the rate on a terminal; in a log file, one line every `every` items."""

    def __init__(self, total, desc="predict", unit="images", every=50):
        self.bar = tqdm(total=total or None, desc=desc, unit=unit, disable=None)
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.done, self.start = 0, time.monotonic()

    def update(self):
        self.done += 1
        self.bar.update(1)
        if self.bar.disable and (self.done % self.every == 0 or self.done == self.total):
            rate = self.done / max(time.monotonic() - self.start, 1e-9)
            logger.info("%s: %d/%s %s, %.1f %s/s", self.desc, self.done, self.total or "?", self.unit, rate, self.unit)

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
    relative, root = _relative_names(files)
    for folder in {os.path.dirname(os.path.join(output, r)) for r in ["", *relative]}:
        for where in (folder, os.path.join(folder, "masks")):
            remove_stale_temporaries(where)  # outputs half-written by a killed run
    names = {int(c["id"]): c["name"] for c in detector.categories}
    entries = [None] * len(files)
    videos = {i for i, f in enumerate(files) if f.lower().endswith(VIDEO_EXTENSIONS)}
    loaded = collections.deque()  # indices of the files handed to the detector, in order
    progress = _Progress(len(files) - len(videos))
    batch_size = batch_size or (8 if tile else 1)

    def readable():
        for index, path in enumerate(files):
            if index in videos:
                continue
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
    stream = detector.stream(readable(), score_threshold, None, batch_size, tile, tile_overlap)
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
    for index in sorted(videos):
        try:
            entries[index] = predict_video(detector, files[index], os.path.join(output, relative[index]), names,
                                           score_threshold, tile, tile_overlap, batch_size)
        except VideoError as e:
            logger.warning("skipped %s", e)
            entries[index] = {"file": files[index], "error": str(e)}
    write_json(os.path.join(output, "predictions.json"), entries)
    if "coco" in save:
        write_json(os.path.join(output, PREDICTIONS_COCO), coco_file(images, annotations, detector.categories, root))
    return entries


def predict_video(detector, path, target, names, score_threshold=None, tile=None, tile_overlap=0.25, batch_size=8):
    """One video through `detector`: `<target>.overlay.mp4` (H.264, the input's frame rate) and
    `<target>.jsonl`, one line per frame: `{"frame", "time", "detections": [{"category_id",
    "category", "bbox", "score", "area", "polygons"}]}`. Both are written under temporary names
    and renamed when the last frame is done, so a killed run leaves neither half-written.
    Returns the video's `predictions.json` entry."""
    info = video_info(path)
    overlay, lines = target + ".overlay.mp4", target + ".jsonl"
    progress = _Progress(info["frames"], path, "frames", every=100)

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as out, VideoWriter(overlay, info["fps"]) as video:
            results = detector.detect_video(path, score_threshold, None, batch_size, tile, tile_overlap)
            for result in results:
                video.write(result.plot())
                detections = _detections(result, names, "polygons")
                line = {"frame": result.frame, "time": round(result.time, 4), "detections": detections}
                out.write(json.dumps(line) + "\n")
                progress.update()

    try:
        atomic_write(lines, write, "video")
    finally:
        progress.close()
    logger.info("%s: %d frames in %.1f s", path, progress.done, time.monotonic() - progress.start)
    return {"file": path, "overlay": overlay, "frames_jsonl": lines, "frames": progress.done}


def _detections(result, names, segmentation):
    """One image's detections as `predictions.json` and the JSON lines list them: the COCO
    fields plus the category name, masks as "rle" (key `segmentation`) or "polygons"."""
    key = "segmentation" if segmentation == "rle" else "polygons"
    return [
        {"category_id": a["category_id"], "category": names[a["category_id"]], "bbox": a["bbox"],
         "score": a["score"], "area": a["area"], key: a["segmentation"]}
        for a in result.to_coco(segmentation=segmentation)
    ]


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
    entry["detections"] = _detections(result, names, "rle")
    return entry
