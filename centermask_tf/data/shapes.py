"""A synthetic COCO-format instance segmentation set: coloured shapes on textured backgrounds.

    centermask make-shapes --output work/shapes --train 600 --val 100 --seed 0

writes `annotations/instances_{train,val}.json` and `train/`, `val/` image folders. Objects are
circles, rectangles and triangles of random colour and size (12-55 % of the image side, or
`--object-size MIN MAX`); `--classes star,hexagon` draws other shapes instead (`SHAPES`),
drawn in sequence so later ones occlude earlier ones; each annotation is the *visible* part, as
in COCO. `--occlusion P` controls overlap: each object after the first is placed over an earlier
one with probability P (its centre 25-60 % of its size away from the other's) and elsewhere
apart from the others (when there is room); without it, positions are uniform.
Unoccluded objects are annotated with polygons, occluded ones with RLE (alternately compressed
and uncompressed); about 8 % of the images have no objects. Images are JPEG and PNG of varied
sizes. Everything is deterministic for a seed.

`--preset coco-val` imitates COCO val2017's shape instead (`COCO_VAL`): 5,000 validation images
(no training split) whose longer side is 640 px, 7.3 objects per image on average, object sizes
spread like COCO's small/medium/large, and about 1 % crowd regions (`iscrowd: 1`, uncompressed
RLE over a cluster of small shapes) - a set to measure building and evaluating at COCO scale.
"""

import dataclasses
import hashlib
import os

import numpy as np
import pycocotools.mask as mask_utils
import tensorflow as tf
from tqdm import tqdm

from centermask_tf.data.coco import uncompressed_counts
from centermask_tf.errors import UserError
from centermask_tf.files import write_json
from centermask_tf.video import VideoWriter

# Every shape the generator draws, with its fixed category id; a set holds `CATEGORIES` unless
# `--classes` picks others (a set of other classes, to fine-tune a model of these onto).
SHAPES = {name: {"id": i + 1, "name": name, "supercategory": "shape"}
          for i, name in enumerate(("circle", "rectangle", "triangle", "star", "hexagon"))}
CATEGORIES = [SHAPES["circle"], SHAPES["rectangle"], SHAPES["triangle"]]
# Object size range, as fractions of the shorter image side.
OBJECT_SIZES = (0.12, 0.55)
# Objects whose visible part is below this fraction of their full area are not annotated.
_MIN_VISIBLE = 0.25
# Minimum RGB distance between an object's colour and each background colour.
_MIN_CONTRAST = 80.0


@dataclasses.dataclass(frozen=True)
class Layout:
    """What the generated images hold.

    Attributes:
        sizes: (min, max) object size as fractions of the shorter image side.
        log_sizes: draw sizes log-uniformly in that range (many small objects, as in COCO)
            instead of uniformly.
        mean_objects: objects per image drawn from a geometric distribution with this mean;
            None: 8 % of the images empty, else 1-6 uniformly.
        crowd: probability that an image gets one crowd region.
        coco_sizes: image sizes as in COCO (longer side `image_size`, the other mostly 3/4 or
            2/3 of it, a quarter portrait) instead of 75-100 % of `image_size` each side.
    """

    sizes: tuple = OBJECT_SIZES
    log_sizes: bool = False
    mean_objects: float = None
    crowd: float = 0.0
    coco_sizes: bool = False


# COCO val2017: 36,781 instances on 5,000 images (7.3 each); by area 41 % small (< 32^2 px),
# 34 % medium, 24 % large. Log-uniform sizes from 8 px to 90 % of a 480-px side give about
# that split; 9.8 objects drawn per image leave about 7.3 annotated once occlusion hides some.
# About 1 % of COCO's annotations are crowd regions: one in 14 images gets one.
COCO_VAL = {"train": 0, "val": 5000, "image_size": 640,
            "layout": Layout(sizes=(8 / 480, 0.9), log_sizes=True, mean_objects=9.8, crowd=0.07, coco_sizes=True)}
PRESETS = {"coco-val": COCO_VAL}
# Changes whenever the same seed and settings would draw different images.
GENERATOR_VERSION = 2


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


def _polygon(kind, rng, height, width, placed=(), occlusion=None, layout=Layout(), size=None, centre=None):
    """A random shape of `kind` as a flat [x0, y0, x1, y1, ...] polygon in pixel coordinates,
    sized per `layout` (or `size` pixels) and placed per `placed` and `occlusion` as in
    `_centre` (or at `centre`)."""
    if size is None:
        low, high = (f * min(height, width) for f in layout.sizes)
        size = float(np.exp(rng.uniform(np.log(low), np.log(high)))) if layout.log_sizes else rng.uniform(low, high)
    cy, cx = centre or _centre(rng, size, height, width, placed, occlusion)
    if kind == "circle":
        angles = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        ry, rx = size / 2, size / 2 * rng.uniform(0.7, 1.0)
        points = np.stack([cx + rx * np.cos(angles), cy + ry * np.sin(angles)], -1)
    elif kind == "rectangle":
        h, w = size, size * rng.uniform(0.5, 1.0)
        points = np.array(
            [[cx - w / 2, cy - h / 2], [cx + w / 2, cy - h / 2], [cx + w / 2, cy + h / 2], [cx - w / 2, cy + h / 2]]
        )
    else:  # a regular polygon: a triangle, a hexagon, or a five-pointed star (inner radius 0.45)
        corners = {"triangle": 3, "hexagon": 6, "star": 10}[kind]
        angles = rng.uniform(0, 2 * np.pi) + np.arange(corners) * 2 * np.pi / corners
        radii = size / 2 * (np.where(np.arange(corners) % 2, 0.45, 1.0) if kind == "star" else 1.0)
        points = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], -1)
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


def _object_count(rng, layout):
    if layout.mean_objects is None:
        return 0 if rng.uniform() < 0.08 else int(rng.integers(1, 7))
    return int(rng.geometric(1.0 / layout.mean_objects)) - 1 + int(rng.uniform() < 1.0 - 1.0 / layout.mean_objects)


def _paint(image, mask, colour, rng):
    """Fills `mask` with `colour` plus noise, computing the noise over the mask's box only."""
    ys, xs = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    if not len(ys):
        return
    window = (slice(ys[0], ys[-1] + 1), slice(xs[0], xs[-1] + 1))
    inside = mask[window]
    image[window][inside] = (colour + rng.normal(0, 8, inside.shape + (3,)))[inside]


def _crowd(rng, height, width):
    """A crowd region: 4-8 small shapes of one category clustered together, one mask."""
    category = CATEGORIES[int(rng.integers(0, len(CATEGORIES)))]
    side = min(height, width)
    cy, cx = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width
    mask = np.zeros((height, width), bool)
    for _ in range(int(rng.integers(4, 9))):
        size = rng.uniform(0.03, 0.08) * side
        centre = (cy + rng.normal(0, 0.06 * side), cx + rng.normal(0, 0.06 * side))
        polygon, _ = _polygon(category["name"], rng, height, width, size=size, centre=centre)
        mask |= mask_utils.decode(mask_utils.frPyObjects([polygon], height, width))[..., 0].astype(bool)
    return mask, category["id"]


def _make_image(rng, image_id, height, width, annotation_id, occlusion=None, layout=Layout(), categories=CATEGORIES):
    image, background_colours = _background(rng, height, width)
    full_masks, polygons, labels, crowds, placed = [], [], [], [], []
    for _ in range(_object_count(rng, layout)):
        category = categories[int(rng.integers(0, len(categories)))]
        polygon, where = _polygon(category["name"], rng, height, width, placed, occlusion, layout)
        placed.append(where)
        rle = mask_utils.frPyObjects([polygon], height, width)
        mask = mask_utils.decode(rle)[..., 0].astype(bool)
        _paint(image, mask, _object_colour(rng, background_colours), rng)
        full_masks.append(mask)
        polygons.append(polygon)
        labels.append(category["id"])
        crowds.append(False)
    if rng.uniform() < layout.crowd:
        mask, label = _crowd(rng, height, width)
        colour = _object_colour(rng, background_colours)
        _paint(image, mask, colour, rng)
        full_masks.append(mask)
        polygons.append(None)
        labels.append(label)
        crowds.append(True)

    annotations = []
    covered = np.zeros((height, width), bool)
    # Walk from the top-most object down: what is already covered is occluded.
    for mask, polygon, label, crowd in reversed(list(zip(full_masks, polygons, labels, crowds))):
        visible = mask & ~covered
        covered |= mask
        area = int(visible.sum())
        if area < _MIN_VISIBLE * mask.sum() or area < 4:
            continue
        if crowd:  # COCO stores crowd regions as uncompressed RLE
            segmentation = {"size": [height, width], "counts": uncompressed_counts(visible).tolist()}
        elif (visible == mask).all():
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
                "iscrowd": int(crowd),
            }
        )
    return np.clip(image, 0, 255).astype(np.uint8), annotations


def _image_size(rng, image_size, layout):
    """(height, width) of the next image."""
    if not layout.coco_sizes:
        return int(image_size * rng.uniform(0.75, 1.0)), int(image_size * rng.uniform(0.75, 1.0))
    short = int(image_size * rng.choice([0.75, 2 / 3, rng.uniform(0.56, 1.0)], p=[0.5, 0.25, 0.25]))
    return (image_size, short) if rng.uniform() < 0.25 else (short, image_size)


def _write_split(output, split, count, rng, image_size, first_image_id, occlusion, layout, categories):
    folder = os.path.join(output, split)
    os.makedirs(folder, exist_ok=True)
    images, annotations = [], []
    for index in tqdm(range(count), desc=f"shapes {split}", unit="img", leave=False, disable=None):
        height, width = _image_size(rng, image_size, layout)
        image_id = first_image_id + index
        pixels, objects = _make_image(rng, image_id, height, width, len(annotations) + 1, occlusion, layout, categories)
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
        "categories": categories,
    }
    # Written whole or not at all: the validation JSON, written last, marks a complete set.
    write_json(os.path.join(output, "annotations", f"instances_{split}.json"), coco, indent=None)
    occluded = sum(isinstance(a["segmentation"], dict) for a in annotations)
    return len(images), len(annotations), occluded


def make_shapes(output, train=600, val=100, seed=0, image_size=128, occlusion=None, layout=Layout(), classes=None):
    """Writes the synthetic shapes dataset in COCO format under `output`.

    `occlusion`: None (uniform positions) or the fraction P in [0, 1] of objects placed over
    an earlier one (see the module docstring). `layout`: what the images hold (`Layout`).
    `classes`: names from `SHAPES` (default: circle, rectangle, triangle), each keeping its id.
    A split of 0 images is not written.

    Returns:
        {"train": (images, annotations, occluded), "val": (...)} counts of the written splits;
        `occluded` counts the annotations whose object is partly hidden by a later one.
    """
    for name, value, low in (("train", train, 0), ("val", val, 0), ("image_size", image_size, 32), ("seed", seed, 0)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise UserError(f"make_shapes: {name} must be an integer >= {low}, got {value!r}.")
    rng = np.random.default_rng(seed)
    if occlusion is not None and not 0 <= occlusion <= 1:
        raise UserError(f"--occlusion must be a fraction between 0 and 1, got {occlusion}.")
    if not 0 < layout.sizes[0] <= layout.sizes[1] <= 1:
        raise UserError(f"--object-size must be MIN MAX with 0 < MIN <= MAX <= 1, got {list(layout.sizes)}.")
    unknown = sorted(set(classes or ()) - set(SHAPES))
    if unknown or (classes is not None and len(set(classes)) != len(classes)) or classes == []:
        raise UserError(f"--classes must name distinct shapes of {', '.join(SHAPES)}; got {classes}.")
    categories = [SHAPES[name] for name in classes] if classes else CATEGORIES
    os.makedirs(os.path.join(output, "annotations"), exist_ok=True)
    counts = {}
    # Validation ids start far from training ids: image ids are arbitrary in COCO.
    for split, count, first_id in (("train", train, 1), ("val", val, 100001)):
        if count:
            counts[split] = _write_split(output, split, count, rng, image_size, first_id, occlusion, layout, categories)
    return counts


def make_preset(cache, name, seed=0, val=None):
    """Writes preset `name` (`PRESETS`) into a folder under `cache` once and returns the
    folder: a complete set there is reused. `val` overrides the preset's image count (a small
    version of the same set). The folder name holds a digest of everything that shapes the
    set, so a changed preset or generator version is made anew, not mistaken for the old one."""
    preset = dict(PRESETS[name])
    if val is not None:
        preset["val"] = val
    digest = hashlib.sha256(f"{GENERATOR_VERSION} {seed} {sorted(preset.items())}".encode()).hexdigest()[:8]
    output = os.path.join(cache, f"{name}-{preset['val']}-{digest}")
    if not os.path.exists(os.path.join(output, "annotations", "instances_val.json")):
        make_shapes(output, preset["train"], preset["val"], seed, preset["image_size"], layout=preset["layout"])
    return output


def make_clip(path, frames=30, size=(96, 128), fps=10, seed=0, categories=CATEGORIES):
    """A video of shapes gliding over a textured background (`video.VideoWriter`, H.264): one
    object of each category, each moving in a straight line at its own speed, to try `predict`
    and `detect_video` on. Returns the number of frames written."""
    rng = np.random.default_rng(seed)
    height, width = size
    background, colours = _background(rng, height, width)
    movers = []
    for category in categories:
        polygon, (cy, cx, _) = _polygon(category["name"], rng, height, width, size=0.3 * min(size))
        step = rng.uniform(-1.0, 1.0, 2) * 0.6 * min(size) / frames  # (dx, dy) per frame
        movers.append((np.reshape(polygon, (-1, 2)) - [cx, cy], (cx, cy), step, _object_colour(rng, colours)))
    with VideoWriter(path, fps) as video:
        for t in range(frames):
            image = background.copy()
            for points, (cx, cy), (dx, dy), colour in movers:
                moved = points + [cx + t * dx, cy + t * dy]
                mask = mask_utils.decode(mask_utils.frPyObjects([moved.ravel().tolist()], height, width))[..., 0]
                image[mask.astype(bool)] = colour
            video.write(np.clip(image, 0, 255).astype(np.uint8))
    return frames
