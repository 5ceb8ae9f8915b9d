"""`CocoResults`: detections in the COCO results format, stored column by column.

A list of COCO result dicts costs about 940 bytes of Python objects per detection (two dicts,
a list of four floats, a size list and the RLE string); evaluating 5,000 images at 100
detections each holds half a million of them. Here each detection is its RLE bytes plus 52
bytes of numbers, in arrays that grow by chunks. The dicts are made only when the COCO library
or a file needs them, and are the same dicts, value for value, as evaluation made one by one
before (box values rounded to 3 decimals, scores to 5; `tests/test_coco_results.py`).
"""

import contextlib
import gc
import json

import numpy as np

from centermask_tf.files import atomic_write

# Per-image pieces are joined into one chunk every this many images: the per-array overhead
# of many small pieces would otherwise cost more than the numbers themselves.
_CHUNK = 256


class CocoResults:
    """Columns of COCO results (`image_id`, `category_id`, `bbox` [x, y, w, h], `score`, RLE
    `segmentation`), filled image by image with `add`; iterating yields the COCO dicts."""

    _NUMBERS = ("image_id", "category_id", "bbox", "score", "size")

    def __init__(self):
        self._chunks = {name: [] for name in self._NUMBERS + ("counts", "lengths")}
        self._pending = {name: [] for name in self._chunks}
        self._count = 0

    def add(self, image_id, bboxes, scores, category_ids, rles, size):
        """One image's detections.

        Args:
            image_id: the image's id in the annotation file.
            bboxes: `[n, 4]` (x, y, width, height) image pixels, rounded as they should be written.
            scores: `[n]`, rounded as they should be written.
            category_ids: `[n]` ids of the annotation file.
            rles: n compressed RLE strings (bytes, pycocotools' `counts`).
            size: the image's (height, width).
        """
        n = len(rles)
        pending = self._pending
        pending["image_id"].append(np.full(n, image_id, np.int64))
        pending["category_id"].append(np.asarray(category_ids, np.int64).reshape(n))
        pending["bbox"].append(np.asarray(bboxes, np.float64).reshape(n, 4))
        pending["score"].append(np.asarray(scores, np.float64).reshape(n))
        pending["size"].append(np.tile(np.asarray(size, np.int32), (n, 1)))
        pending["counts"].append(b"".join(rles))
        pending["lengths"].append(np.fromiter(map(len, rles), np.int64, n))
        self._count += n
        if len(pending["image_id"]) >= _CHUNK:
            self._join_pending()

    def _join_pending(self):
        for name, pieces in self._pending.items():
            if pieces:
                self._chunks[name].append(b"".join(pieces) if name == "counts" else np.concatenate(pieces))
                pieces.clear()

    def __len__(self):
        return self._count

    def __bool__(self):
        return self._count > 0

    @property
    def nbytes(self):
        """Bytes held by the columns (numbers and RLE strings, without Python's per-object
        overhead of the chunks)."""
        self._join_pending()
        return sum(len(c) if isinstance(c, bytes) else c.nbytes for chunks in self._chunks.values() for c in chunks)

    def __iter__(self):
        """The COCO result dicts, in the order they were added."""
        self._join_pending()
        chunks = self._chunks
        for k in range(len(chunks["image_id"])):
            counts, ends = chunks["counts"][k], np.cumsum(chunks["lengths"][k]).tolist()
            columns = zip(chunks["image_id"][k].tolist(), chunks["category_id"][k].tolist(), chunks["bbox"][k].tolist(),
                          chunks["score"][k].tolist(), chunks["size"][k].tolist(), [0] + ends[:-1], ends)
            # Python's cyclic garbage collector paused while a chunk's dicts are made: they form
            # no cycles, and its passes over a heap of half a million dicts took half the time.
            with collector_paused():
                entries = [
                    {
                        "image_id": image_id,
                        "category_id": category_id,
                        "bbox": bbox,
                        "score": score,
                        "segmentation": {"size": size, "counts": counts[start:end].decode("ascii")},
                    }
                    for image_id, category_id, bbox, score, size, start, end in columns
                ]
            yield from entries

    def write_json(self, path):
        """`path` as the JSON list of the dicts (the bytes `json.dumps(list(self))` gives),
        written entry by entry to a temporary file and renamed (`files.atomic_write`)."""

        def write(tmp):
            with open(tmp, "w", encoding="utf-8") as f:
                f.write("[")
                for k, entry in enumerate(self):
                    f.write(", " if k else "")
                    f.write(json.dumps(entry))
                f.write("]")

        return atomic_write(path, write, expected_size=self.nbytes)


@contextlib.contextmanager
def collector_paused():
    """Python's cyclic garbage collector paused (dicts by the hundred thousand form no cycles)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
