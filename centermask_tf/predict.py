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

import colorsys
import logging
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from centermask_tf.files import atomic_write, remove_stale_temporaries, write_json
from centermask_tf.images import (
    DEFAULT_MAX_MEGABYTES,
    DEFAULT_MAX_PIXELS,
    OVERLAY_SUFFIX,
    ImageError,
    letterbox_image,
    load_image,
)
from centermask_tf.postprocess import coco_results, to_original_image

logger = logging.getLogger("centermask_tf.predict")


def _colour(index):
    r, g, b = colorsys.hsv_to_rgb((index * 0.618034) % 1.0, 0.85, 1.0)
    return np.array([r, g, b]) * 255


def draw_overlay(image, result, names):
    """The image with each detection's mask tinted, its box outlined and 'name score' written.
    Tinting touches only each mask's own pixels, in uint8: no full-size float copy."""
    canvas = np.array(image, np.uint8)
    for i, mask in enumerate(result["masks"]):
        window = canvas[mask.top : mask.top + mask.crop.shape[0], mask.left : mask.left + mask.crop.shape[1]]
        window[mask.crop] = (0.45 * window[mask.crop] + 0.55 * _colour(i)).astype(np.uint8)
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default()
    for i, (box, score, cls) in enumerate(zip(result["boxes"], result["scores"], result["classes"])):
        ymin, xmin, ymax, xmax = (float(v) for v in box)
        colour = tuple(int(c) for c in _colour(i))
        draw.rectangle([xmin, ymin, xmax, ymax], outline=colour, width=1)
        draw.text((xmin + 1, max(ymin - 11, 0)), f"{names[int(cls)]} {score:.2f}", fill=colour, font=font)
    return picture


def detect_image(detect, image, input_size, score_threshold, mask_threshold):
    """One uint8 image through `detect` (letterboxed canvases -> decoded detections): its
    detections scoring at least `score_threshold`, in its own pixels (`to_original_image`)."""
    canvas, scale = letterbox_image(image, input_size)
    detections = {k: np.asarray(v) for k, v in detect(canvas[None]).items()}
    keep = int(np.sum(detections["scores"][0] >= score_threshold))
    detections["num_detections"] = np.minimum(detections["num_detections"], keep)
    return to_original_image(detections, 0, scale, image.shape[:2], mask_threshold)


def predict_files(
    detect, files, input_size, categories, score_threshold, mask_threshold, output,
    max_pixels=DEFAULT_MAX_PIXELS, max_megabytes=DEFAULT_MAX_MEGABYTES,
):
    """Runs `detect` (images `[1, N, N, 3]` -> decoded detections) on each file, writes an
    overlay `<file name>.overlay.png` per image and `predictions.json` into `output`.

    Returns:
        One entry per file: `{"file", "overlay", "detections"}`, or `{"file", "error"}` for a
        file that was skipped.
    """
    os.makedirs(output, exist_ok=True)
    remove_stale_temporaries(output)  # overlays and JSON half-written by a killed run
    ids = [c["id"] for c in categories]
    names = [c["name"] for c in categories]
    predictions = []
    for path in tqdm(files, desc="predict", unit="img", disable=None):  # no bar in log files
        try:
            image = load_image(path, max_pixels, max_megabytes)
        except ImageError as e:
            logger.warning("skipped %s", e)
            predictions.append({"file": path, "error": str(e)})
            continue
        result = detect_image(detect, image, input_size, score_threshold, mask_threshold)
        overlay = os.path.join(output, os.path.basename(path) + OVERLAY_SUFFIX)
        picture = draw_overlay(image, result, names)
        atomic_write(overlay, lambda tmp: picture.save(tmp, format="PNG"), "overlay", image.size)
        entries = coco_results(0, result, ids)
        for entry, cls in zip(entries, result["classes"]):
            del entry["image_id"]
            entry["category"] = names[int(cls)]
        predictions.append({"file": path, "overlay": overlay, "detections": entries})
    write_json(os.path.join(output, "predictions.json"), predictions)
    return predictions
