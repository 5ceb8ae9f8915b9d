"""Tiled inference for images much larger than the network input: overlapping tiles, and the
detections of neighbouring tiles merged where they overlap.

Shrinking a 512-px image of 20-px objects into a 128-px input leaves 5-px objects, which the
network cannot find; cut into 128-px tiles each object keeps its size. An object near a seam
appears in two (or four) tiles, whole in one and cut in another, or cut in all. Three steps make
it one detection:

1. Each tile owns its core, the part of it nearer its centre than any neighbour's: a detection
   is kept only by the tile owning its box's centre. An object no larger than the overlap lies
   whole in the tile owning its centre, so its cut views elsewhere are dropped here.
2. Two kept detections of neighbouring tiles are one object when they have the same class and
   their masks agree inside the band both tiles see (IoU >= 0.5 of the masks restricted to
   that band): two halves of an object larger than the overlap agree there, while two
   neighbouring objects do not.
3. A merged object takes the mask and box of a view that no seam cuts when there is one, else
   the union of its views' masks and boxes; its score is the highest.

On the demo model's 4x4 mosaics (docs/experiments.md) these steps raised segm AP from 0.457
(merging every pair of views, masks united) to 0.488 at overlap 0.25 and 0.504 at 0.5.
"""

import bisect

import numpy as np

from centermask_tf.errors import UserError
from centermask_tf.postprocess import union_masks

# Band IoU from which two detections of neighbouring tiles are one object.
MERGE_IOU = 0.5
MAX_OVERLAP = 0.9


def check_tiling(tile, overlap, input_size, names=("tile", "tile_overlap")):
    """Refuses a tile smaller than the network input (it would be upscaled: no gain, more tiles)
    or an overlap outside [0, 0.9]; `names` are what the user set them as."""
    if tile is None:
        return
    if isinstance(tile, bool) or not isinstance(tile, (int, np.integer)) or tile < input_size:
        raise UserError(
            f"{names[0]}={tile!r}: a tile must be an integer of at least the network input "
            f"(model.input_size={input_size}) pixels; smaller tiles would only be upscaled."
        )
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not 0 <= overlap <= MAX_OVERLAP:
        raise UserError(f"{names[1]}={overlap!r}: the overlap is a fraction of the tile in [0, {MAX_OVERLAP}].")


def _starts(length, tile, stride):
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]  # the last tile ends at the image's edge


def tile_windows(height, width, tile=None, overlap=0.25):
    """`(top, left, height, width)` windows covering the image: the whole image when it fits in
    one tile (or `tile` is None), else `tile`-sized windows overlapping by `overlap` of a tile,
    the last ones flush with the image's edges."""
    if tile is None or (height <= tile and width <= tile):
        return [(0, 0, height, width)]
    stride = max(1, int(round(tile * (1.0 - overlap))))
    return [
        (top, left, min(tile, height - top), min(tile, width - left))
        for top in _starts(height, tile, stride)
        for left in _starts(width, tile, stride)
    ]


def _intersection(a, b):
    """The overlap of two (top, left, height, width) windows as (y0, x0, y1, x1), or None."""
    y0, x0 = max(a[0], b[0]), max(a[1], b[1])
    y1, x1 = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
    return (y0, x0, y1, x1) if y1 > y0 and x1 > x0 else None


def _in_window(mask, y0, x0, y1, x1):
    """`mask` (an `InstanceMask`) restricted to the window, as a bool array of the window."""
    out = np.zeros((y1 - y0, x1 - x0), bool)
    top, left = max(mask.top, y0), max(mask.left, x0)
    bottom, right = min(mask.top + mask.crop.shape[0], y1), min(mask.left + mask.crop.shape[1], x1)
    if bottom > top and right > left:
        inside = mask.crop[top - mask.top : bottom - mask.top, left - mask.left : right - mask.left]
        out[top - y0 : bottom - y0, left - x0 : right - x0] = inside
    return out


def _overlapping_pairs(windows):
    """`(a, b, band)` for each pair of windows that overlap (a < b), `band` their overlap;
    `windows` is `tile_windows`'s row-major grid, so each window is compared with the few near
    it, not with all: a 20,000-px image has thousands of tiles."""
    tops, lefts = sorted({w[0] for w in windows}), sorted({w[1] for w in windows})
    columns = len(lefts)
    for a, (top, left, height, width) in enumerate(windows):
        row, column = divmod(a, columns)
        for other_row in range(row, len(tops)):
            if tops[other_row] >= top + height:
                break
            first = column + 1 if other_row == row else bisect.bisect_right(lefts, left - width)
            for other_column in range(first, columns):
                if lefts[other_column] >= left + width:
                    break
                b = other_row * columns + other_column
                band = _intersection(windows[a], windows[b])
                if band is not None:
                    yield a, b, band


def _band_iou(a, b, band):
    """IoU of two masks inside `band` (y0, x0, y1, x1), over the part of the band their crops
    cover."""
    y0 = max(band[0], min(a.top, b.top))
    x0 = max(band[1], min(a.left, b.left))
    y1 = min(band[2], max(a.top + a.crop.shape[0], b.top + b.crop.shape[0]))
    x1 = min(band[3], max(a.left + a.crop.shape[1], b.left + b.crop.shape[1]))
    if y1 <= y0 or x1 <= x0:
        return 0.0
    ma, mb = _in_window(a, y0, x0, y1, x1), _in_window(b, y0, x0, y1, x1)
    union = np.count_nonzero(ma | mb)
    return np.count_nonzero(ma & mb) / union if union else 0.0


def _find(parent, i):
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def _cores(windows):
    """Each window's core `(y0, y1, x0, x1)`: the part nearer its own centre than any
    neighbour's, bounded at the middle of each overlap (or the image's edge). Cores tile the
    image without overlapping."""
    def bounds(starts, start, size, total):
        i = starts.index(start)
        low = 0 if i == 0 else (start + starts[i - 1] + size) / 2
        high = total if i == len(starts) - 1 else (start + size + starts[i + 1]) / 2
        return low, high

    height = max(w[0] + w[2] for w in windows)
    width = max(w[1] + w[3] for w in windows)
    tops, lefts = sorted({w[0] for w in windows}), sorted({w[1] for w in windows})
    return [(*bounds(tops, top, h, height), *bounds(lefts, left, w, width)) for top, left, h, w in windows]


def _whole(boxes, tile_of, windows, margin=1.0):
    """Whether each detection's box (ymin, xmin, ymax, xmax) stays `margin` pixels clear of
    every edge its window (`windows[tile_of]`) shares with another window (edges on the image's
    border are fine)."""
    height = max(w[0] + w[2] for w in windows)
    width = max(w[1] + w[3] for w in windows)
    clear = []
    for box, t in zip(boxes, tile_of):
        top, left, h, w = windows[t]
        cut = ((top > 0 and box[0] <= top + margin) or (left > 0 and box[1] <= left + margin)
               or (top + h < height and box[2] >= top + h - margin)
               or (left + w < width and box[3] >= left + w - margin))
        clear.append(not cut)
    return np.array(clear, bool)


def merge_tiles(windows, parts):
    """The detections of every tile of one image, each object once.

    Args:
        windows: the tiles' `(top, left, height, width)`, a grid as `tile_windows` makes it.
        parts: per tile, `to_original_image`'s dict in image coordinates (boxes ymin-first,
            `InstanceMask`s placed in the image).

    Returns:
        The same dict for the whole image, sorted by score.
    """
    tile_of = np.concatenate([np.full(len(p["scores"]), t) for t, p in enumerate(parts)]).astype(int)
    boxes = np.concatenate([np.asarray(p["boxes"], np.float32).reshape(-1, 4) for p in parts])
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    cores = np.array(_cores(windows), np.float32).reshape(-1, 4)[tile_of]
    owned = np.flatnonzero((centres[:, 0] >= cores[:, 0]) & (centres[:, 0] < cores[:, 1])
                           & (centres[:, 1] >= cores[:, 2]) & (centres[:, 1] < cores[:, 3]))
    tile_of, boxes = tile_of[owned], boxes[owned]
    scores = np.concatenate([np.asarray(p["scores"], np.float32) for p in parts])[owned]
    classes = np.concatenate([np.asarray(p["classes"], np.int64) for p in parts])[owned]
    masks = [m for p in parts for m in p["masks"]]
    masks = [masks[i] for i in owned]
    parent = list(range(len(scores)))
    order = np.argsort(tile_of, kind="stable")
    per_tile = np.split(order, np.searchsorted(tile_of[order], np.arange(1, len(windows))))
    for a, b, band in _overlapping_pairs(windows):
        first, second = per_tile[a], per_tile[b]
        if len(first) and len(second):
            # Candidate pairs: same class, both boxes reach into the band, and the boxes overlap.
            ba, bb = boxes[first][:, None, :], boxes[second][None, :, :]
            candidates = (
                (classes[first][:, None] == classes[second][None, :])
                & (np.maximum(ba[..., 0], bb[..., 0]) < np.minimum(ba[..., 2], bb[..., 2]))
                & (np.maximum(ba[..., 1], bb[..., 1]) < np.minimum(ba[..., 3], bb[..., 3]))
                & (ba[..., 0] < band[2]) & (ba[..., 2] > band[0]) & (ba[..., 1] < band[3]) & (ba[..., 3] > band[1])
            )
            for i, j in zip(*np.nonzero(candidates)):
                i, j = first[i], second[j]
                if _band_iou(masks[i], masks[j], band) >= MERGE_IOU:
                    parent[_find(parent, i)] = _find(parent, j)
    groups = {}
    for i in range(len(scores)):
        groups.setdefault(_find(parent, i), []).append(i)
    groups = sorted(groups.values(), key=lambda g: -scores[g].max())
    # A tile that saw the object whole has its mask and box; views cut by seams are united.
    whole = _whole(boxes, tile_of, windows)
    views = [[max((i for i in g if whole[i]), key=lambda i: scores[i])] if whole[g].any() else g for g in groups]
    return {
        "boxes": np.array([[*boxes[v, :2].min(0), *boxes[v, 2:].max(0)] for v in views], np.float32).reshape(-1, 4),
        "scores": np.array([scores[g].max() for g in groups], np.float32),
        "classes": np.array([classes[g[0]] for g in groups], np.int64),
        "masks": [masks[v[0]] if len(v) == 1 else union_masks([masks[i] for i in v]) for v in views],
    }
