"""Host-side post-processing of decoded detections: canvas -> original image pixels, box-crop
instance masks pasted at image size, RLE encoding and COCO result entries."""

from typing import NamedTuple

import numpy as np
import pycocotools.mask as mask_utils


class InstanceMask(NamedTuple):
    """A binary instance mask stored as the crop of its box: `crop` covers rows
    `top:top + crop.shape[0]` and columns `left:left + crop.shape[1]` of the image; every pixel
    outside is 0. A full-size mask per detection of a 50-megapixel photo would not fit memory."""

    top: int
    left: int
    crop: np.ndarray

    def full(self, height, width):
        """The mask at full image size, uint8 and Fortran-ordered as pycocotools encodes it."""
        mask = np.zeros((height, width), np.uint8, order="F")
        mask[self.top : self.top + self.crop.shape[0], self.left : self.left + self.crop.shape[1]] = self.crop
        return mask


def union_masks(masks):
    """One `InstanceMask` covering the union of `masks` (crops in the same image)."""
    top = min(m.top for m in masks)
    left = min(m.left for m in masks)
    bottom = max(m.top + m.crop.shape[0] for m in masks)
    right = max(m.left + m.crop.shape[1] for m in masks)
    crop = np.zeros((bottom - top, right - left), bool)
    for m in masks:
        crop[m.top - top : m.top - top + m.crop.shape[0], m.left - left : m.left - left + m.crop.shape[1]] |= m.crop
    return InstanceMask(top, left, crop)



def _span_pixels(start, end, first, counts, cells):
    """The pixels of n spans [start, end) along one axis, `counts[k]` of span k from pixel
    `first[k]` on, all spans' pixels concatenated (`model.assembly.paste_masks`' geometry):
    each pixel's coordinate in its span's `cells` (clipped to [0, cells - 1]), whether its
    centre lies inside the span, its span, and where each span's pixels start."""
    offsets = np.concatenate([[0], np.cumsum(counts)])
    span = np.repeat(np.arange(len(counts)), counts)
    pixel = np.arange(offsets[-1]) - offsets[span] + first[span]
    rel = (pixel + 0.5 - start[span]) / np.maximum(end - start, 1e-6)[span]
    inside = (rel >= 0.0) & (rel <= 1.0)
    return np.clip(rel * cells - 0.5, 0.0, cells - 1.0), inside, span, offsets


def _paste_weights(start, end, first, counts, cells):
    """Bilinear weights that resize `cells` values onto each span's pixels (`_span_pixels`):
    `[sum(counts), cells]`, zero for pixels whose centre lies outside their span, with where
    each span's rows start and which pixels lie inside."""
    coords, inside, _, offsets = _span_pixels(start, end, first, counts, cells)
    weights = np.maximum(0.0, 1.0 - np.abs(coords[:, None] - np.arange(cells)))
    return (weights * inside[:, None]).astype(np.float32), offsets, inside


def _box_pixels(boxes, height, width):
    """Each box's first pixel (top, left) and its number of rows and columns in the image."""
    limits = np.array([height, width], np.float32)
    first = np.clip(np.floor(boxes[:, :2]), 0, limits - 1).astype(np.int64)
    spans = np.maximum(np.clip(np.ceil(boxes[:, 2:]), 0, limits).astype(np.int64) - first, 0)
    return first, spans


def paste_instances(box_masks, boxes, height, width, threshold):
    """Box-relative `[n, M, M]` mask probabilities pasted (bilinear, as `paste_masks`) into
    their boxes `[n, 4]` (ymin, xmin, ymax, xmax, image pixels) and thresholded, each kept as
    the crop of its box (`InstanceMask`). Only each box's own pixels are computed: the weights
    of every box's rows and columns at once, then two small matmuls per detection (padding
    detections to a common size cost 4x more on COCO-sized boxes). Each crop is computed
    column by column, the order RLE encoding reads."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    box_masks = np.asarray(box_masks, np.float32)
    first, spans = _box_pixels(boxes, height, width)
    cells = box_masks.shape[-1]
    row_weights, row_at, in_rows = _paste_weights(boxes[:, 0], boxes[:, 2], first[:, 0], spans[:, 0], cells)
    col_weights, col_at, in_cols = _paste_weights(boxes[:, 1], boxes[:, 3], first[:, 1], spans[:, 1], cells)
    masks = []
    for k, (top, left) in enumerate(first.tolist()):
        rows, cols = slice(row_at[k], row_at[k + 1]), slice(col_at[k], col_at[k + 1])
        crop = (col_weights[cols] @ box_masks[k].T @ row_weights[rows].T) >= threshold  # [cols, rows]
        if threshold <= 0:  # outside the span the product is 0: only a threshold of 0 keeps it
            crop &= in_cols[cols, None] & in_rows[None, rows]
        masks.append(InstanceMask(top, left, crop.T))
    return masks


def box_mask_rles(box_masks, boxes, height, width, threshold):
    """COCO compressed RLEs of box-relative `[n, M, M]` mask probabilities pasted into their
    boxes `[n, 4]` (ymin, xmin, ymax, xmax, image pixels) and thresholded: what
    `encode_instances(paste_instances(...))` gives, without computing a pixel.

    Bilinear resizing is linear between two cells, so down an image column of a box the
    pasted value crosses the threshold at most once between two cells of that column's values,
    and a run of the mask starts or ends there. The work is each column's M values (two taps),
    the crossings between them and, for each crossing, the first row past it (the row
    coordinates are linear in the row): O(columns x M) per box instead of pasting's
    O(pixels x M), for all boxes of the image at once. Rows are placed by the same float
    arithmetic as `_span_pixels`; a pixel can still differ where the interpolated value is
    within float32 rounding of the threshold, as pasting's own matmuls round it (54 of the
    scale benchmark's 500,000 masks differ by one pixel; one inspected: 0.49999997 in float64,
    0.5 through pasting's float32 matmul)."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    box_masks = np.asarray(box_masks, np.float32)
    n, cells = len(boxes), box_masks.shape[-1]
    if n == 0:
        return []
    first, spans = _box_pixels(boxes, height, width)
    # Each box's rows whose centre lies inside it (`_span_pixels`' test): image rows
    # [row_lo, row_hi), solved per box.
    top, size = boxes[:, 0].astype(np.float64), np.maximum(boxes[:, 2] - boxes[:, 0], 1e-6)
    row_lo = np.maximum(first[:, 0], np.ceil(top - 0.5).astype(np.int64))  # (row + 0.5 - top) >= 0, exactly
    last = np.floor(top + size - 0.5).astype(np.int64)  # _relative(row) <= 1, up to rounding
    last += (_relative(last + 1, top, size) <= 1.0) * 1 - (_relative(last, top, size) > 1.0)
    row_hi = np.maximum(np.minimum(last + 1, first[:, 0] + spans[:, 0]), row_lo)

    # Each inside column's M values down its box, by the same two-tap interpolation.
    col_coords, col_inside, col_box, col_at = _span_pixels(boxes[:, 1], boxes[:, 3], first[:, 1], spans[:, 1], cells)
    columns = np.flatnonzero(col_inside)
    box = col_box[columns]
    coord = col_coords[columns]
    left = np.minimum(np.floor(coord).astype(np.int64), max(cells - 2, 0))
    frac = (coord - left).astype(np.float32)[:, None]
    by_column = box_masks.transpose(0, 2, 1).reshape(n * cells, cells)  # [box, column cell] x row cell
    cell = box * cells + left
    right = np.minimum(cell + 1, box * cells + cells - 1)
    values = by_column.take(cell, 0)
    values *= 1.0 - frac
    values += by_column.take(right, 0) * frac

    # Each column's cells padded with "off" at both ends: its changes of state, in order down
    # the column, are then every start and end of its runs. A change into the top pad's
    # neighbour starts a run at the box's first row, one into the bottom pad ends it after its
    # last; one between cells i and i + 1 is a crossing at cell coordinate i + t, and a run
    # starts at the first row at or past a rising crossing and ends at the first row past a
    # falling one (the value there is still at the threshold).
    threshold = float(np.float32(threshold))  # what a float32 comparison compares with
    padded = np.zeros((len(columns), cells + 2), bool)
    padded[:, 1:-1] = values >= threshold
    flat = padded.reshape(-1)
    event_column, j = np.divmod(np.flatnonzero(flat[1:] != flat[:-1]), cells + 2)
    event_box = box[event_column]
    event_row = np.where(j == 0, row_lo[event_box], row_hi[event_box])
    inner = np.flatnonzero((j > 0) & (j < cells))
    at_cell = event_column[inner] * cells + j[inner] - 1
    low, high = values.reshape(-1)[at_cell].astype(np.float64), values.reshape(-1)[at_cell + 1].astype(np.float64)
    inner_box = event_box[inner]
    rows = _first_row_past(top[inner_box], size[inner_box], j[inner] - 1 + (threshold - low) / (high - low), cells,
                           strict=high < threshold)
    event_row[inner] = np.clip(rows, row_lo[inner_box], row_hi[inner_box])
    # Monotone down each column (rounding could swap two crossings a hair apart).
    stride = height + 1
    event_row = np.maximum.accumulate(event_row + event_column * stride) - event_column * stride
    # Each column's events alternate start, end: runs in column-major image positions.
    base = (first[event_box, 1] + columns[event_column] - col_at[event_box]) * height + event_row
    starts, ends, run_box = base[0::2], base[1::2], event_box[0::2]
    kept = ends > starts
    starts, ends, run_box = starts[kept], ends[kept], run_box[kept]
    # A run reaching the image's last row goes on at the top of the next column.
    joined = (ends[:-1] == starts[1:]) & (run_box[:-1] == run_box[1:])
    if joined.any():
        starts, run_box = starts[np.concatenate([[True], ~joined])], run_box[np.concatenate([[True], ~joined])]
        ends = ends[np.concatenate([~joined, [True]])]

    # Counts: zeros before the first run, then run, gap, run, ... and the zeros after the last
    # (none when a mask reaches the last pixel).
    bounds = np.stack([starts, ends], 1).reshape(-1)
    counts = np.diff(bounds, prepend=0)
    at = np.searchsorted(run_box, np.arange(n + 1)) * 2  # each box's first bound
    has_runs = at[:-1] < at[1:]
    counts[at[:-1][has_runs]] = bounds[at[:-1][has_runs]]
    tails = np.full(n, height * width, np.int64)
    tails[has_runs] -= bounds[at[1:][has_runs] - 1]
    counts = np.insert(counts, at[1:][tails > 0], tails[tails > 0])
    at = at + np.concatenate([[0], np.cumsum(tails > 0)])
    uncompressed = [{"size": [height, width], "counts": counts[at[k] : at[k + 1]]} for k in range(n)]
    return mask_utils.frPyObjects(uncompressed, height, width)


def _relative(row, top, size):
    """A row's centre in its box's height (0 at the top, 1 at the bottom), by `_span_pixels`'
    float arithmetic."""
    return (row + 0.5 - top) / size


def _first_row_past(top, size, coordinate, cells, strict):
    """The first image row whose row coordinate in the cells of its box (top `top`, height
    `size`; `_span_pixels`) is at or past `coordinate` (past it, where `strict`): the row solved
    from the coordinate's linear formula. Where that lands within 1e-6 of a row, the rounding of
    `_span_pixels`' own float arithmetic decides, so it is checked there one row either side."""
    solved = (coordinate + 0.5) * (size / cells) + top - 0.5
    row = np.ceil(solved).astype(np.int64)
    near = np.flatnonzero(np.abs(solved - np.rint(solved)) < 1e-6)
    if len(near):
        top, size, coordinate, strict = top[near], size[near], coordinate[near], strict[near]

        def past(r):
            at = _relative(r, top, size) * cells - 0.5
            return (at > coordinate) | ((at == coordinate) & ~strict)

        row[near] += ~past(row[near]) * 1 - past(row[near] - 1)
    return row


def encode_instances(masks, height, width):
    """COCO compressed RLEs of `InstanceMask`s in a `height` x `width` image, from the crops
    alone: the crop's runs in column-major order, split where a column ends inside the image,
    shifted to image positions, compressed by pycocotools. Equal to `pycocotools.mask.encode`
    of the full masks without making or scanning a full-size mask per detection."""
    uncompressed = []
    for mask in masks:
        rows, cols = mask.crop.shape
        flat = mask.crop.T.reshape(-1)  # column-major (a view of `paste_instances`' crops)
        bounds = np.zeros(0, np.int64)
        if flat.size:
            edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1  # run starts and ends, alternating
            if flat[0]:
                edges = np.concatenate([[0], edges])
            if flat[-1]:
                edges = np.append(edges, flat.size)
            if rows < height and cols > 1:  # a run over a column's end stops there in the image
                boundaries = np.arange(1, cols) * rows
                crossing = boundaries[flat[boundaries - 1] & flat[boundaries]]
                edges = np.sort(np.concatenate([edges, crossing, crossing]))
            starts, last = edges[0::2], edges[1::2] - 1  # last: each run's final pixel
            bounds = np.empty(edges.size, np.int64)
            bounds[0::2] = (mask.left + starts // rows) * height + mask.top + starts % rows
            bounds[1::2] = (mask.left + last // rows) * height + mask.top + last % rows + 1
        counts = np.diff(np.concatenate([[0], bounds, [height * width]]))
        if len(counts) > 1 and counts[-1] == 0:  # a mask running to the last pixel has no final zeros
            counts = counts[:-1]
        uncompressed.append({"size": [height, width], "counts": counts.tolist()})
    return mask_utils.frPyObjects(uncompressed, height, width) if uncompressed else []



def _original_boxes(detections, index, scale, original_size, n):
    """An image's number of detections, height, width and boxes in its own pixels."""
    n = int(detections["num_detections"][index]) if n is None else n
    height, width = (int(v) for v in original_size)
    boxes = np.asarray(detections["boxes"][index, :n]) / float(scale)
    return n, height, width, np.clip(boxes, 0.0, [height, width, height, width])


def to_original_image(detections, index, scale, original_size, mask_threshold, n=None):
    """One image's first `n` detections (default: `num_detections`) mapped back to its original
    pixels.

    Args:
        detections: a batch from a detector (numpy or tensors).
        index: the image's position in the batch.
        scale: input pixels per original pixel (the image sits at the canvas's top-left).
        original_size: (height, width).
        mask_threshold: probability above which a pixel belongs to the instance.

    Returns:
        dict with `boxes` [n, 4] (ymin, xmin, ymax, xmax), `scores` [n], `classes` [n]
        (contiguous indices), `masks` (n `InstanceMask`s) and `size` (height, width).
    """
    n, height, width, boxes = _original_boxes(detections, index, scale, original_size, n)
    masks = np.asarray(detections["masks"][index, :n], np.float32)
    return {
        "boxes": boxes,
        "scores": np.asarray(detections["scores"][index, :n]),
        "classes": np.asarray(detections["classes"][index, :n]),
        "masks": paste_instances(masks, mask_boxes(detections, index, n, scale, boxes), height, width, mask_threshold),
        "size": (height, width),
    }


def mask_boxes(detections, index, n, scale, boxes):
    """Where an image's `n` masks are pasted, in its own pixels: their boxes, or for native
    assembly the windows the decoder cut around them (`mask_boxes`, canvas pixels)."""
    if "mask_boxes" not in detections:
        return boxes
    return np.asarray(detections["mask_boxes"][index, :n], np.float32) / float(scale)


def coco_columns(detections, index, scale, original_size, mask_threshold, category_ids):
    """One image's detections in the COCO results format, as `CocoResults.add` takes them:
    boxes [x, y, width, height] rounded to 3 decimals, scores to 5, the file's category ids
    (`category_ids[class]`) and compressed RLE masks at the image's size (`box_mask_rles`)."""
    n, height, width, boxes = _original_boxes(detections, index, scale, original_size, None)
    masks = np.asarray(detections["masks"][index, :n], np.float32)
    rles = box_mask_rles(masks, mask_boxes(detections, index, n, scale, boxes), height, width, mask_threshold)
    # float64 before rounding: a float32 times 10^3 (or 10^5) is then exact, so numpy's
    # round-half-even of it gives what Python's round() gives.
    boxes = boxes.astype(np.float64)
    classes = np.asarray(detections["classes"][index, :n], np.int64)
    return {
        "bboxes": np.round(np.concatenate([boxes[:, 1::-1], boxes[:, 3:1:-1] - boxes[:, 1::-1]], 1), 3),
        "scores": np.round(np.asarray(detections["scores"][index, :n], np.float64), 5),
        "category_ids": np.asarray(category_ids, np.int64)[classes],
        "rles": [rle["counts"] for rle in rles],
        "size": (height, width),
    }
