"""Prediction on image files: overlay PNGs (coloured masks, boxes, class names, scores) and a
`predictions.json` in the COCO results format (plus the file name and category name).

    centermask predict --workdir work/demo --input work/shapes/val --output work/demo/predictions
"""

import colorsys
import json
import os

import numpy as np
import tensorflow as tf
import yaml
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from centermask_tf.config import config_from_dict
from centermask_tf.errors import MissingError
from centermask_tf.data.pipeline import letterbox_images
from centermask_tf.evaluation import coco_results, to_original_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


def load_workdir(workdir):
    """The resolved `Config` and category list a training run saved in its workdir."""
    try:
        with open(os.path.join(workdir, "config.yaml")) as f:
            config = config_from_dict(yaml.safe_load(f))
        with open(os.path.join(workdir, "categories.json")) as f:
            categories = json.load(f)
    except FileNotFoundError as e:
        raise MissingError(
            f"'{workdir}' is not a training workdir ({e.filename} is missing); "
            "run `centermask train --workdir` first."
        ) from None
    return config, categories


def image_files(path):
    """`path` itself, or the image files in the folder `path` (sorted)."""
    if os.path.isdir(path):
        files = sorted(
            os.path.join(path, name)
            for name in os.listdir(path)
            if name.lower().endswith(IMAGE_EXTENSIONS)
        )
        if not files:
            raise MissingError(f"No image files ({', '.join(IMAGE_EXTENSIONS)}) in '{path}'.")
        return files
    if not os.path.isfile(path):
        raise MissingError(f"--input '{path}' does not exist.")
    return [path]


def load_image(path):
    """RGB uint8 `[H, W, 3]` of a JPEG/PNG/BMP/GIF file (grayscale and RGBA converted)."""
    try:
        return tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    except tf.errors.InvalidArgumentError as e:
        raise ValueError(f"'{path}' is not a readable image: {str(e).splitlines()[0]}") from None


def letterbox_image(image, size):
    """`(canvas float32 [size, size, 3], scale)` exactly as the validation pipeline places it."""
    canvases, scale = letterbox_images(image[None], size)
    return canvases[0], float(scale)


def _colour(index):
    r, g, b = colorsys.hsv_to_rgb((index * 0.618034) % 1.0, 0.85, 1.0)
    return np.array([r, g, b]) * 255


def draw_overlay(image, result, names):
    """The image with each detection's mask tinted, its box outlined and 'name score' written."""
    canvas = np.asarray(image, np.float32).copy()
    for i, mask in enumerate(result["masks"]):
        canvas[mask] = 0.45 * canvas[mask] + 0.55 * _colour(i)
    picture = Image.fromarray(canvas.astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default()
    for i, (box, score, cls) in enumerate(zip(result["boxes"], result["scores"], result["classes"])):
        ymin, xmin, ymax, xmax = (float(v) for v in box)
        colour = tuple(int(c) for c in _colour(i))
        draw.rectangle([xmin, ymin, xmax, ymax], outline=colour, width=1)
        draw.text((xmin + 1, max(ymin - 11, 0)), f"{names[int(cls)]} {score:.2f}", fill=colour, font=font)
    return picture


def predict_files(detect, files, input_size, categories, score_threshold, mask_threshold, output):
    """Runs `detect` (images `[1, N, N, 3]` -> decoded detections) on each file, writes an
    overlay PNG per image and `predictions.json` into `output`; returns the predictions."""
    os.makedirs(output, exist_ok=True)
    ids = [c["id"] for c in categories]
    names = [c["name"] for c in categories]
    predictions = []
    for path in tqdm(files, desc="predict", unit="img"):
        image = load_image(path)
        canvas, scale = letterbox_image(image, input_size)
        detections = {k: np.asarray(v) for k, v in detect(canvas[None]).items()}
        keep = int(np.sum(detections["scores"][0] >= score_threshold))
        detections["num_detections"] = np.minimum(detections["num_detections"], keep)
        result = to_original_image(detections, 0, scale, image.shape[:2], mask_threshold)
        stem = os.path.splitext(os.path.basename(path))[0]
        draw_overlay(image.numpy(), result, names).save(os.path.join(output, f"{stem}.png"))
        entries = coco_results(0, result, ids)
        for entry, cls in zip(entries, result["classes"]):
            del entry["image_id"]
            entry["category"] = names[int(cls)]
        predictions.append({"file": path, "detections": entries})
    with open(os.path.join(output, "predictions.json"), "w") as f:
        json.dump(predictions, f, indent=1)
    return predictions
