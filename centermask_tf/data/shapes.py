"""A synthetic COCO-format instance segmentation set: coloured shapes on textured backgrounds.

    centermask make-shapes --output work/shapes --train 600 --val 100 --seed 0

writes `annotations/instances_{train,val}.json` and `train/`, `val/` image folders. Objects are
circles, rectangles and triangles of random colour and size (12-55 % of the image side, or
`--object-size MIN MAX`),
drawn in sequence so later ones occlude earlier ones; each annotation is the *visible* part, as
in COCO. `--occlusion P` controls overlap: each object after the first is placed over an earlier
one with probability P (its centre 25-60 % of its size away from the other's) and elsewhere
apart from the others (when there is room); without it, positions are uniform.
Unoccluded objects are annotated with polygons, occluded ones with RLE (alternately compressed
and uncompressed); about 8 % of the images have no objects. Images are JPEG and PNG of varied
sizes. Everything is deterministic for a seed.
"""

import os

import numpy as np
import pycocotools.mask as mask_utils
import tensorflow as tf
from tqdm import tqdm

from centermask_tf.data.coco import uncompressed_counts
from centermask_tf.errors import UserError
from centermask_tf.files import write_json

CATEGORIES = [
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 2, "name": "rectangle", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
]
# Object size range, as fractions of the shorter image side.
OBJECT_SIZES = (0.12, 0.55)
# Objects whose visible part is below this fraction of their full area are not annotated.
_MIN_VISIBLE = 0.25
# Minimum RGB distance between an object's colour and each background colour.
_MIN_CONTRAST = 80.0


def _centre(rng, size, height, width, placed, occlusion):
    """An object centre: uniform (`occlusion` None), over an earlier object (probability
    `occlusion`), or else apart from every earlier (cy, cx, size) in `placed` when one of 20
    tries finds room."""
    def uniform():
        return rng.uniform(size / 2, height - size / 2), rng.uniform(size / 2, width - size / 2)

    if occlusion is None or not placed:
        return uniform()
    if rng.uniform() < occlusion:
        cy, cx, other = placed[int(rng.integers(len(placed)))]
        angle, distance = rng.uniform(0, 2 * np.pi), rng.uniform(0.25, 0.6) * max(size, other)
        return (float(np.clip(cy + distance * np.sin(angle), size / 2, height - size / 2)),
                float(np.clip(cx + distance * np.cos(angle), size / 2, width - size / 2)))
    for _ in range(20):
        cy, cx = uniform()
        if all(max(abs(cy - y), abs(cx - x)) > (size + s) / 2 for y, x, s in placed):
            break
    return cy, cx


def _polygon(kind, rng, height, width, placed=(), occlusion=None, sizes=OBJECT_SIZES):
    """A random shape of `kind` as a flat [x0, y0, x1, y1, ...] polygon in pixel coordinates,
    `sizes` (min, max) of the image side; `placed` and `occlusion` as in `_centre`."""
    side = min(height, width)
    size = rng.uniform(*sizes) * side
    cy, cx = _centre(rng, size, height, width, placed, occlusion)
    if kind == "circle":
        angles = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        ry, rx = size / 2, size / 2 * rng.uniform(0.7, 1.0)
        points = np.stack([cx + rx * np.cos(angles), cy + ry * np.sin(angles)], -1)
    elif kind == "rectangle":
        h, w = size, size * rng.uniform(0.5, 1.0)
        points = np.array(
            [[cx - w / 2, cy - h / 2], [cx + w / 2, cy - h / 2], [cx + w / 2, cy + h / 2], [cx - w / 2, cy + h / 2]]
        )
    else:
        angle = rng.uniform(0, 2 * np.pi)
        angles = angle + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3])
        points = np.stack([cx + size / 2 * np.cos(angles), cy + size / 2 * np.sin(angles)], -1)
    points = np.clip(points, 0, [width - 1, height - 1])
    return [float(v) for v in points.reshape(-1).round(2)], (cy, cx, size)


def _object_colour(rng, background_colours):
    """A random colour at least `_MIN_CONTRAST` away from both background colours, so every
    annotated object is visible (a shape that matches its background is noise, not difficulty)."""
    while True:
        colour = rng.uniform(0, 255, 3)
        if min(np.linalg.norm(colour - c) for c in background_colours) >= _MIN_CONTRAST:
            return colour


def _background(rng, height, width):
    """A textured background: two colours blended by sinusoidal stripes, plus noise."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    freq = rng.uniform(0.05, 0.3, 2)
    angle = rng.uniform(0, np.pi)
    stripes = 0.5 + 0.5 * np.sin(freq[0] * (xx * np.cos(angle) + yy * np.sin(angle)))
    blobs = 0.5 + 0.5 * np.sin(freq[1] * xx) * np.cos(freq[1] * yy)
    weight = (0.6 * stripes + 0.4 * blobs)[..., None]
    colour_a, colour_b = rng.uniform(0, 255, (2, 3))
    image = colour_a * weight + colour_b * (1 - weight)
    return image + rng.normal(0, 12, image.shape), (colour_a, colour_b)


def _make_image(rng, image_id, height, width, annotation_id, occlusion=None, sizes=OBJECT_SIZES):
    image, background_colours = _background(rng, height, width)
    count = 0 if rng.uniform() < 0.08 else int(rng.integers(1, 7))
    full_masks, polygons, labels, placed = [], [], [], []
    for _ in range(count):
        category = CATEGORIES[int(rng.integers(0, len(CATEGORIES)))]
        polygon, where = _polygon(category["name"], rng, height, width, placed, occlusion, sizes)
        placed.append(where)
        rle = mask_utils.frPyObjects([polygon], height, width)
        mask = mask_utils.decode(rle)[..., 0].astype(bool)
        colour = _object_colour(rng, background_colours)
        texture = rng.normal(0, 8, (height, width, 3))
        image[mask] = (colour + texture)[mask]
        full_masks.append(mask)
        polygons.append(polygon)
        labels.append(category["id"])

    annotations = []
    covered = np.zeros((height, width), bool)
    # Walk from the top-most object down: what is already covered is occluded.
    for mask, polygon, label in reversed(list(zip(full_masks, polygons, labels))):
        visible = mask & ~covered
        covered |= mask
        area = int(visible.sum())
        if area < _MIN_VISIBLE * mask.sum() or area < 4:
            continue
        if (visible == mask).all():
            segmentation = [polygon]
        else:
            fortran = np.asfortranarray(visible.astype(np.uint8))
            if len(annotations) % 2:
                encoded = mask_utils.encode(fortran)
                segmentation = {"size": [height, width], "counts": encoded["counts"].decode("ascii")}
            else:
                segmentation = {"size": [height, width], "counts": uncompressed_counts(visible).tolist()}
        ys, xs = np.nonzero(visible)
        box = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
        annotations.append(
            {
                "id": annotation_id + len(annotations),
                "image_id": image_id,
                "category_id": label,
                "segmentation": segmentation,
                "area": float(area),
                "bbox": box,
                "iscrowd": 0,
            }
        )
    return np.clip(image, 0, 255).astype(np.uint8), annotations


def _write_split(output, split, count, rng, image_size, first_image_id, occlusion, sizes):
    folder = os.path.join(output, split)
    os.makedirs(folder, exist_ok=True)
    images, annotations = [], []
    for index in tqdm(range(count), desc=f"shapes {split}", unit="img", leave=False, disable=None):
        height = int(image_size * rng.uniform(0.75, 1.0))
        width = int(image_size * rng.uniform(0.75, 1.0))
        image_id = first_image_id + index
        pixels, objects = _make_image(rng, image_id, height, width, len(annotations) + 1, occlusion, sizes)
        use_png = index % 4 == 3
        file_name = f"{image_id:06d}.{'png' if use_png else 'jpg'}"
        encoded = tf.io.encode_png(pixels) if use_png else tf.io.encode_jpeg(pixels, quality=95)
        tf.io.write_file(os.path.join(folder, file_name), encoded)
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        annotations.extend(objects)
    coco = {
        "info": {"description": f"centermask_tf synthetic shapes ({split})"},
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    }
    # Written whole or not at all: the validation JSON, written last, marks a complete set.
    write_json(os.path.join(output, "annotations", f"instances_{split}.json"), coco, indent=None)
    occluded = sum(isinstance(a["segmentation"], dict) for a in annotations)
    return len(images), len(annotations), occluded


def make_shapes(output, train=600, val=100, seed=0, image_size=128, occlusion=None, sizes=OBJECT_SIZES):
    """Writes the synthetic shapes dataset in COCO format under `output`.

    `sizes`: (min, max) object size as fractions of the shorter image side.

    `occlusion`: None (uniform positions) or the fraction P in [0, 1] of objects placed over
    an earlier one (see the module docstring).

    Returns:
        {"train": (images, annotations, occluded), "val": (...)} counts; `occluded` counts the
        annotations whose object is partly hidden by a later one.
    """
    os.makedirs(os.path.join(output, "annotations"), exist_ok=True)
    rng = np.random.default_rng(seed)
    if occlusion is not None and not 0 <= occlusion <= 1:
        raise UserError(f"--occlusion must be a fraction between 0 and 1, got {occlusion}.")
    if not 0 < sizes[0] <= sizes[1] <= 1:
        raise UserError(f"--object-size must be MIN MAX with 0 < MIN <= MAX <= 1, got {list(sizes)}.")
    counts = {"train": _write_split(output, "train", train, rng, image_size, 1, occlusion, sizes)}
    # Validation ids start far from training ids: image ids are arbitrary in COCO.
    counts["val"] = _write_split(output, "val", val, rng, image_size, 100001, occlusion, sizes)
    return counts
