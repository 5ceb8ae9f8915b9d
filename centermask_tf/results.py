"""`Results`: the detections in one image, as `CenterMask.detect` and the exported detectors
return them.

    (result,) = detector.detect("photo.jpg")
    len(result), result.boxes, result.class_names      # N, [N, 4] xyxy pixels, N names
    result.polygons[0]                                 # rings [K, 2] (x, y) of the first instance
    result.filter(min_score=0.5, classes=["star"]).plot()   # uint8 overlay
    result.to_coco(image_id=7)                         # COCO annotation dicts with polygons
    result["boxes"], result["masks"]                   # dict-style access works too

Masks are kept as the crops of their boxes (`InstanceMask`), so memory grows with the boxes, not
with the image: 100 full-size masks of a 48-megapixel photo would take 4.8 GB. `masks` builds
the full-size boolean array only when asked for.
"""

import colorsys
import functools

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from centermask_tf.errors import UserError
from centermask_tf.images import load_image
from centermask_tf.postprocess import encode_instances

FIELDS = ("boxes", "scores", "class_ids", "class_names", "masks", "polygons")
# Contours are traced on the crop upsampled this much: a polygon through the centres of the
# sub-pixels along the border lies a quarter pixel inside the true edge, so rasterising it
# (pixel centres, as pycocotools does) gives the mask back; through pixel centres it would
# lose half a pixel all around (IoU 0.87 on the demo's masks, against 0.999).
_CONTOUR_UPSAMPLE = 2


def _bridge(ring, hole):
    """One ring holding `ring` and its `hole`: joined by a zero-width cut from the closest pair
    of vertices. Filled even-odd, as pycocotools and drawing libraries fill polygons, the cut
    adds nothing and the hole stays empty."""
    distances = ((ring[:, None, :] - hole[None, :, :]) ** 2).sum(-1)
    i, j = np.unravel_index(np.argmin(distances), distances.shape)
    return np.concatenate([ring[: i + 1], hole[j:], hole[: j + 1], ring[i:]])


def mask_polygons(mask):
    """An `InstanceMask` -> its polygons: one `[K, 2]` float32 ring of (x, y) image coordinates
    per connected part (pixel i spans [i, i + 1]), each part's holes bridged into its ring, so
    that filling every ring (even-odd) and uniting them gives the mask back."""
    crop = np.pad(np.asarray(mask.crop, np.uint8), 1)
    crop = np.repeat(np.repeat(crop, _CONTOUR_UPSAMPLE, axis=0), _CONTOUR_UPSAMPLE, axis=1)
    contours, hierarchy = cv2.findContours(crop, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return []
    offset = np.array([mask.left - 1, mask.top - 1], np.float64)
    rings = [(c[:, 0, :] + 0.5) / _CONTOUR_UPSAMPLE + offset for c in contours]
    polygons = []
    for k, (_, _, child, parent) in enumerate(hierarchy[0]):
        if parent >= 0:
            continue  # a hole: bridged into its part below
        ring = rings[k]
        while child >= 0:
            ring = _bridge(ring, rings[child])
            child = hierarchy[0][child][0]
        if len(ring) >= 3:
            polygons.append(ring.astype(np.float32))
    return polygons


def _colour(index):
    r, g, b = colorsys.hsv_to_rgb((index * 0.618034) % 1.0, 0.85, 1.0)
    return np.array([r, g, b]) * 255


def draw_overlay(image, result, labels=True):
    """The image (a PIL image) with each detection of `result` (`Results`) tinted, its box
    outlined and, with `labels`, 'name score' written. Tinting touches only each mask's own
    pixels, in uint8: no full-size float copy."""
    canvas = np.array(image, np.uint8)
    for i, mask in enumerate(result.instance_masks):
        window = canvas[mask.top : mask.top + mask.crop.shape[0], mask.left : mask.left + mask.crop.shape[1]]
        window[mask.crop] = (0.45 * window[mask.crop] + 0.55 * _colour(i)).astype(np.uint8)
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default()
    for i, (box, score, name) in enumerate(zip(result.boxes, result.scores, result.class_names)):
        xmin, ymin, xmax, ymax = (float(v) for v in box)
        colour = tuple(int(c) for c in _colour(i))
        draw.rectangle([xmin, ymin, xmax, ymax], outline=colour, width=1)
        if labels:
            draw.text((xmin + 1, max(ymin - 11, 0)), f"{name} {score:.2f}", fill=colour, font=font)
    return picture


class Results:
    """Detections in one image, best first.

    Attributes:
        boxes: float32 `[N, 4]` (x_min, y_min, x_max, y_max) in the image's pixels.
        scores: float32 `[N]`.
        class_ids: int64 `[N]`, the dataset's own category ids.
        class_names: N strings.
        instance_masks: N `InstanceMask`s (box crops).
        size: the image's (height, width).
        image: the uint8 image, when known (`plot` draws on it).
        path: the file the image came from, or None.
        frame, time: the frame index and its time in seconds, for video frames.

    `result[i]`, `result[1:3]`, `result[result.scores > 0.5]` select detections; `result["boxes"]`
    reads a field, as when results were dicts.
    """

    def __init__(self, boxes, scores, class_ids, class_names, instance_masks, size, image=None, path=None,
                 frame=None, time=None):
        self.boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        self.scores = np.asarray(scores, np.float32).reshape(-1)
        self.class_ids = np.asarray(class_ids, np.int64).reshape(-1)
        self.class_names = list(class_names)
        self.instance_masks = list(instance_masks)
        self.size = tuple(int(v) for v in size)
        self.image, self.path, self.frame, self.time = image, path, frame, time
        counts = {len(v) for v in (self.boxes, self.scores, self.class_ids, self.class_names, self.instance_masks)}
        if len(counts) != 1:
            raise ValueError(f"Results fields disagree on the number of detections: {sorted(counts)}")

    @classmethod
    def from_detections(cls, found, categories, image=None, path=None, **where):
        """From `postprocess.to_original_image`'s dict (boxes ymin-first, contiguous classes)."""
        classes = np.asarray(found["classes"], np.int64)
        return cls(
            np.asarray(found["boxes"], np.float32).reshape(-1, 4)[:, [1, 0, 3, 2]],
            found["scores"],
            np.asarray([c["id"] for c in categories], np.int64)[classes] if len(classes) else [],
            [categories[c]["name"] for c in classes],
            found["masks"],
            found["size"],
            image,
            path,
            **where,
        )

    # === Selection and dict-style access ===

    def __len__(self):
        return len(self.boxes)

    def keys(self):
        return FIELDS

    def __contains__(self, key):
        return key in FIELDS

    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in FIELDS:
                raise KeyError(f"{key!r}; Results fields are {', '.join(FIELDS)}")
            return getattr(self, key)
        index = np.arange(len(self))[key]
        index = np.atleast_1d(index)
        return Results(
            self.boxes[index], self.scores[index], self.class_ids[index],
            [self.class_names[i] for i in index], [self.instance_masks[i] for i in index],
            self.size, self.image, self.path, self.frame, self.time,
        )

    def filter(self, min_score=None, classes=None):
        """The detections scoring at least `min_score` whose class is in `classes` (ids or
        names)."""
        keep = np.ones(len(self), bool)
        if min_score is not None:
            keep &= self.scores >= min_score
        if classes is not None:
            wanted = {classes} if isinstance(classes, (str, int, np.integer)) else set(classes)
            keep &= np.array([n in wanted or int(i) in wanted for n, i in zip(self.class_names, self.class_ids)], bool)
        return self[keep]

    def __repr__(self):
        where = f" of '{self.path}'" if self.path else ""
        return f"<Results{where}: {len(self)} detections in {self.size[1]}x{self.size[0]}>"

    # === Masks and polygons ===

    @property
    def masks(self):
        """bool `[N, H, W]` at the image's size (built on each access; prefer `instance_masks`
        or `polygons` for large images)."""
        full = np.zeros((len(self), *self.size), bool)
        for k, m in enumerate(self.instance_masks):
            full[k, m.top : m.top + m.crop.shape[0], m.left : m.left + m.crop.shape[1]] = m.crop
        return full

    @property
    def areas(self):
        """Mask pixel counts `[N]`."""
        return np.array([int(m.crop.sum()) for m in self.instance_masks], np.int64)

    @functools.cached_property
    def polygons(self):
        """Per instance, a list of float32 `[K, 2]` (x, y) rings in image pixels (one per
        connected part, holes bridged in; see `mask_polygons`); empty for an empty mask."""
        return [mask_polygons(m) for m in self.instance_masks]

    # === Output ===

    def plot(self, image=None, labels=True):
        """uint8 `[H, W, 3]`: the image with each mask tinted, its box outlined and, with
        `labels`, 'name score' written (the drawing of `centermask predict`)."""
        if image is None:
            image = self.image if self.image is not None else load_image(self.path) if self.path else None
        if image is None:
            raise UserError("plot() needs the image: these Results hold neither pixels nor a path; pass plot(image).")
        return np.asarray(draw_overlay(image, self, labels))

    def rles(self):
        """COCO compressed RLEs of the masks (pycocotools' format)."""
        return encode_instances(self.instance_masks, *self.size)

    def to_coco(self, image_id=0, first_id=1, segmentation="polygons"):
        """COCO annotation dicts (`id`, `image_id`, `category_id`, `segmentation`, `area`,
        `bbox` [x, y, w, h], `iscrowd` 0, `score`), ids counted from `first_id`.
        `segmentation="polygons"` writes flat `[x1, y1, x2, y2, ...]` lists (what labelling
        tools import); `"rle"` writes compressed RLE. An instance whose mask is empty is left
        out (it has no polygon)."""
        if segmentation not in ("polygons", "rle"):
            raise UserError(f"segmentation must be 'polygons' or 'rle', got {segmentation!r}")
        shapes = (
            [[np.round(r, 2).ravel().tolist() for r in rings] for rings in self.polygons]
            if segmentation == "polygons"
            else [{"size": list(r["size"]), "counts": r["counts"].decode("ascii")} for r in self.rles()]
        )
        annotations = []
        for box, score, cid, area, shape in zip(self.boxes, self.scores, self.class_ids, self.areas, shapes):
            if not shape or area == 0:
                continue
            x0, y0, x1, y1 = (float(v) for v in box)
            annotations.append({
                "id": first_id + len(annotations),
                "image_id": image_id,
                "category_id": int(cid),
                "segmentation": shape,
                "area": int(area),
                "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                "iscrowd": 0,
                "score": round(float(score), 5),
            })
        return annotations
