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



def _paste_weights(start, end, first, counts, cells):
    """Bilinear weights that resize `cells` values onto each of n spans [start, end), for the
    `counts[k]` pixels of span k from pixel `first[k]` on (`model.assembly.paste_masks`'s
    geometry), all spans' pixels concatenated: `[sum(counts), cells]`, and where each span's
    rows start. Pixels whose centre lies outside their span get zero weights, and `[sum(counts)]`
    says which lie inside."""
    offsets = np.concatenate([[0], np.cumsum(counts)])
    span = np.repeat(np.arange(len(counts)), counts)
    pixel = np.arange(offsets[-1]) - offsets[span] + first[span]
    rel = (pixel + 0.5 - start[span]) / np.maximum(end - start, 1e-6)[span]
    inside = (rel >= 0.0) & (rel <= 1.0)
    coords = np.clip(rel * cells - 0.5, 0.0, cells - 1.0)
    weights = np.maximum(0.0, 1.0 - np.abs(coords[:, None] - np.arange(cells)))
    return (weights * inside[:, None]).astype(np.float32), offsets, inside



def paste_instances(box_masks, boxes, height, width, threshold):
    """Box-relative `[n, M, M]` mask probabilities pasted (bilinear, as `paste_masks`) into
    their boxes `[n, 4]` (ymin, xmin, ymax, xmax, image pixels) and thresholded, each kept as
    the crop of its box (`InstanceMask`). Only each box's own pixels are computed: the weights
    of every box's rows and columns at once, then two small matmuls per detection (padding
    detections to a common size cost 4x more on COCO-sized boxes). Each crop is computed
    column by column, the order RLE encoding reads."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    box_masks = np.asarray(box_masks, np.float32)
    limits = np.array([height, width], np.float32)
    first = np.clip(np.floor(boxes[:, :2]), 0, limits - 1).astype(np.int64)  # top, left
    spans = np.maximum(np.clip(np.ceil(boxes[:, 2:]), 0, limits).astype(np.int64) - first, 0)
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
    n = int(detections["num_detections"][index]) if n is None else n
    height, width = (int(v) for v in original_size)
    boxes = np.asarray(detections["boxes"][index, :n]) / float(scale)
    boxes = np.clip(boxes, 0.0, [height, width, height, width])
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



def coco_results(image_id, result, category_ids):
    """COCO results-format dicts for one image (category ids from the dataset's file)."""
    entries = []
    rles = encode_instances(result["masks"], *result["size"])
    for box, score, cls, rle in zip(result["boxes"], result["scores"], result["classes"], rles):
        ymin, xmin, ymax, xmax = (float(v) for v in box)
        entries.append(
            {
                "image_id": int(image_id),
                "category_id": int(category_ids[int(cls)]),
                "bbox": [round(xmin, 3), round(ymin, 3), round(xmax - xmin, 3), round(ymax - ymin, 3)],
                "score": round(float(score), 5),
                "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")},
            }
        )
    return entries
