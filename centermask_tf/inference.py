"""Images -> `Results`, for any detector of letterboxed canvases: the Keras model's
`detect_canvases`, or an exported SavedModel's or TFLite file's (`export.runtime`). One code path
serves `CenterMask.detect`, `centermask predict`, video frames and tiled inference, so they all
return the same detections for the same pixels.

Every image is cut into windows (`tiling.tile_windows`: the whole image unless a tile size is
given); windows of consecutive images share network batches; an image's Results are yielded as
soon as its last window is decoded, so a stream of images or frames is never held at once.
"""

import os

import numpy as np
import tensorflow as tf

from centermask_tf.errors import UserError
from centermask_tf.images import letterbox_image, load_image
from centermask_tf.postprocess import InstanceMask, to_original_image
from centermask_tf.results import Results
from centermask_tf.tiling import check_tiling, merge_tiles, tile_windows
from centermask_tf.video import read_frames


def as_image(array):
    image = np.asarray(array)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8 or 0 in image.shape:
        raise UserError(
            f"detect() takes uint8 [H, W, 3] images with H, W > 0 (or file paths); got {image.dtype} {list(image.shape)}."
        )
    return image


def check_argument(name, value, kind, low, high=None):
    """Refuses a `detect()` argument that is not a finite `kind` in [low, high]."""
    numeric = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if kind is int:
        numeric = numeric and float(value).is_integer()
    if not numeric or not np.isfinite(value) or value < low or (high is not None and value > high):
        wanted = f"an integer >= {low}" if kind is int else f"a number in [{low}, {high}]"
        raise UserError(f"detect(): {name} must be {wanted}; got {value!r}.")


def _shifted(found, top, left):
    """A window's detections moved into the whole image's pixels."""
    if top == 0 and left == 0:
        return found
    return {
        **found,
        "boxes": np.asarray(found["boxes"]) + np.array([top, left, top, left], np.float32),
        "masks": [InstanceMask(m.top + top, m.left + left, m.crop) for m in found["masks"]],
    }


class ImageDetector:
    """Detects instances in images with `detect_canvases` (letterboxed float `[B, N, N, 3]` ->
    decoded detections, as `CenterMask.detect_canvases` returns them).

    Args:
        detect_canvases: the network and decoder.
        input_size: N, the network's input side.
        categories: `[{"id", "name"}]` in contiguous-index order.
        score_threshold, mask_threshold: the defaults (the model config's).
    """

    def __init__(self, detect_canvases, input_size, categories, score_threshold, mask_threshold):
        self.detect_canvases = detect_canvases
        self.input_size = int(input_size)
        self.categories = list(categories)
        self.score_threshold, self.mask_threshold = score_threshold, mask_threshold

    def detect(self, images, score_threshold=None, max_detections=None, batch_size=8, tile=None, tile_overlap=0.25):
        """Detects instances in images in memory or in files.

        Args:
            images: one `[H, W, 3]` uint8 array, a file path, or a list of them (sizes may
                differ). Files are read upright (EXIF orientation applied).
            score_threshold: keep detections scoring at least this (default: the config's).
            max_detections: keep at most this many per image (default: all; the network finds
                at most the config's K per image, or per tile).
            batch_size: images (or tiles) per network call.
            tile: cut images larger than this many pixels into overlapping tiles of this size
                (at least the network input) and merge the detections across seams.
            tile_overlap: how much neighbouring tiles overlap, as a fraction of the tile.

        Returns:
            One `Results` per image.
        """
        single = isinstance(images, (str, os.PathLike)) or (isinstance(images, np.ndarray) and images.ndim == 3)
        if images is None or not (single or isinstance(images, (list, tuple, np.ndarray))):
            raise UserError(
                "detect() takes an image ([H, W, 3] uint8 array or file path) or a list of them; "
                f"got {type(images).__name__}."
            )
        items = [images] if single else list(images)
        arrays = [(None, as_image(x)) if not isinstance(x, (str, os.PathLike)) else (os.fspath(x), None) for x in items]
        return list(self.stream(arrays, score_threshold, max_detections, batch_size, tile, tile_overlap))

    def detect_video(self, path, score_threshold=None, max_detections=None, batch_size=8, tile=None,
                     tile_overlap=0.25):
        """A generator of `Results`, one per frame of a video file (PyAV, the `video` extra),
        frames decoded and detected `batch_size` at a time. Each has `frame` (index), `time`
        (seconds) and its frame's pixels (for `plot`); `video.VideoError` says why a file
        cannot be read."""
        frames = ((os.fspath(path), image, index, time) for index, time, image in read_frames(path))
        return self.stream(frames, score_threshold, max_detections, batch_size, tile, tile_overlap)

    def stream(self, items, score_threshold=None, max_detections=None, batch_size=8, tile=None, tile_overlap=0.25):
        """Results for a stream of `(path, image)` pairs, in order, lazily (arguments checked
        now). An image of None is read from `path`; an image given is kept in its Results for
        `plot`. Two more items (a video frame's index and time) go into the Results."""
        threshold = self.score_threshold if score_threshold is None else score_threshold
        check_argument("score_threshold", threshold, float, 0, 1)
        if max_detections is not None:
            check_argument("max_detections", max_detections, int, 0)
        check_argument("batch_size", batch_size, int, 1)
        check_tiling(tile, tile_overlap, self.input_size)
        return self._stream(items, threshold, max_detections, batch_size, tile, tile_overlap)

    def _stream(self, items, threshold, limit, batch_size, tile, tile_overlap):
        pending = []  # (image record, window index, canvas, scale) waiting for a batch
        records = []  # images whose windows are not all decoded yet, oldest first
        for item in items:
            path, image, *where = item
            image = load_image(path) if image is None else image
            height, width = image.shape[:2]
            windows = tile_windows(height, width, tile, tile_overlap)
            record = {"path": path, "image": image, "windows": windows, "parts": [None] * len(windows),
                      "where": where, "keep_image": item[1] is not None}
            records.append(record)
            for w, (top, left, h, wd) in enumerate(windows):
                canvas, scale = letterbox_image(image[top : top + h, left : left + wd], self.input_size)
                pending.append((record, w, canvas, scale))
                if len(pending) == batch_size:
                    self._run(pending, threshold)
                    pending = []
            yield from self._finished(records, limit)
        if pending:
            self._run(pending, threshold)
        yield from self._finished(records, limit)

    def _run(self, pending, threshold):
        batch = self.detect_canvases(tf.stack([canvas for _, _, canvas, _ in pending]))
        batch = {k: np.asarray(v) for k, v in batch.items()}
        for i, (record, w, _, scale) in enumerate(pending):
            top, left, height, width = record["windows"][w]
            n = min(int(np.sum(batch["scores"][i] >= threshold)), int(batch["num_detections"][i]))
            found = to_original_image(batch, i, scale, (height, width), self.mask_threshold, n)
            record["parts"][w] = _shifted(found, top, left)

    def _finished(self, records, limit):
        while records and all(part is not None for part in records[0]["parts"]):
            record = records.pop(0)
            parts = record["parts"]
            found = parts[0] if len(parts) == 1 else merge_tiles(record["windows"], parts)
            found = {k: v[:limit] for k, v in found.items() if k != "size"}  # limit None: all
            found["size"] = record["image"].shape[:2]
            frame, time = (record["where"] + [None, None])[:2]
            yield Results.from_detections(
                found, self.categories, record["image"] if record["keep_image"] else None, record["path"],
                frame=frame, time=time,
            )
