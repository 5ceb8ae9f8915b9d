"""Exported artifacts behind the Keras detector's interface, so `evaluate` and `predict` measure
and show exactly what a SavedModel or a `.tflite` file returns.

    centermask evaluate --config configs/shapes_tiny.yaml --workdir work/demo --tflite saved_models/shapes_tiny_int8.tflite
    centermask predict --workdir work/demo --saved-model saved_models/shapes_tiny/1 --input IMAGES --output DIR
    load_exported("saved_models/shapes_tiny/1", "work/demo").detect(images)   # -> Results

A detector takes letterboxed images `[B, N, N, 3]` (float, 0..255) and returns what
`CenterMask.detect_canvases` returns: `boxes` in input pixels, `scores`, contiguous `classes`,
box-relative `masks` and `num_detections`. The artifacts receive the images as uint8, as a
client would send them.
"""

import json
import logging
import os

import numpy as np
import tensorflow as tf

from centermask_tf.errors import MissingError, UserError
from centermask_tf.export.serving import CATEGORIES_FILE
from centermask_tf.export.tflite import as_uint8, tflite_categories
from centermask_tf.inference import ImageDetector
from centermask_tf.workdir import load_workdir

logger = logging.getLogger("centermask_tf.export")


class ArtifactError(UserError):
    """An exported file that cannot be run here, or that disagrees with the workdir."""


def _check_categories(path, carried, categories):
    """Refuses an artifact whose categories differ from the workdir's (its class ids would be
    read as other classes)."""
    if carried is None:
        logger.warning("'%s' carries no category list (exported by an older version); assuming "
                       "the workdir's, and checking every detected id against it", path)
        return
    if [(c["id"], c["name"]) for c in carried] != [(c["id"], c["name"]) for c in categories]:
        show = lambda cs: ", ".join(f"{c['id']}:{c['name']}" for c in cs[:6]) + (" ..." if len(cs) > 6 else "")  # noqa: E731
        raise ArtifactError(
            f"'{path}' was exported with categories [{show(carried)}] but the workdir's data has "
            f"[{show(categories)}]; evaluate or predict it with the workdir it was exported from."
        )


def _from_exported(outputs, input_size, category_ids):
    """Object Detection API outputs (boxes normalised to an `N x N` input, the dataset's own
    category ids) -> the decoded-detections dict of `CenterMask.detect_canvases`."""
    outputs = {k: np.asarray(v) for k, v in outputs.items()}
    num = outputs["num_detections"].astype(np.int32)
    index_of = {int(cid): i for i, cid in enumerate(category_ids)}
    ids = outputs["detection_classes"].astype(np.int64)
    valid = np.arange(ids.shape[1])[None, :] < num[:, None]  # entries past num are zero padding
    unknown = set(ids[valid].tolist()) - set(index_of)
    if unknown:
        raise ArtifactError(
            f"the exported model detects category ids {sorted(unknown)} that the workdir's data does "
            f"not have ({sorted(index_of)}); use the workdir it was exported from."
        )
    classes = np.vectorize(lambda cid: index_of.get(int(cid), 0), otypes=[np.int32])(ids)
    return {
        "boxes": outputs["detection_boxes"] * float(input_size),
        "scores": outputs["detection_scores"],
        "classes": classes,
        "masks": outputs["detection_masks"],
        "num_detections": num,
    }


def _first_line(error):
    return " ".join(str(error).split())[:200]


def saved_model_detector(path, input_size, categories):
    """A detector running the `image_tensor` signature of an exported SavedModel version folder
    (`saved_models/NAME/1`). A letterboxed `N x N` canvas passes the export's own letterbox
    unchanged, so its normalised boxes are in canvas units."""
    if not os.path.isfile(os.path.join(path, "saved_model.pb")):
        raise MissingError(
            f"--saved-model '{path}' holds no saved_model.pb; pass the version folder, "
            "e.g. saved_models/NAME/1."
        )
    carried = None
    if os.path.isfile(os.path.join(path, CATEGORIES_FILE)):
        with open(os.path.join(path, CATEGORIES_FILE), encoding="utf-8") as f:
            carried = json.load(f)
    _check_categories(path, carried, categories)
    try:
        signature = tf.saved_model.load(path).signatures["image_tensor"]
    except Exception as e:  # protobuf, OS and TF errors alike: the folder is not a usable export
        raise ArtifactError(f"cannot load SavedModel '{path}': {_first_line(e)}") from None
    category_ids = [c["id"] for c in categories]

    def detect(images):
        return _from_exported(signature(image_tensor=as_uint8(images)), input_size, category_ids)

    return detect


def tflite_detector(path, input_size, categories):
    """A detector running a `.tflite` export (any quantisation) with LiteRT, one image at a time
    (the file's input is `[1, N, N, 3]` uint8)."""
    from ai_edge_litert.interpreter import Interpreter

    if not os.path.isfile(path):
        raise MissingError(f"--tflite '{path}' does not exist.")
    with open(path, "rb") as f:
        content = f.read()
    try:
        runner = Interpreter(model_content=content).get_signature_runner()
        carried = tflite_categories(content)
        shape = [int(v) for v in runner.get_input_details()["image"]["shape"]]
    except Exception as e:  # LiteRT raises ValueError/RuntimeError for what is not a model
        raise ArtifactError(f"'{path}' is not a usable TFLite model: {_first_line(e)}") from None
    _check_categories(path, carried, categories)
    category_ids = [c["id"] for c in categories]
    expected = [1, input_size, input_size, 3]
    if shape != expected:
        raise ArtifactError(
            f"'{path}' takes images of shape {shape} but the workdir's config has "
            f"model.input_size={input_size}; pass the workdir that produced this file."
        )

    def detect(images):
        per_image = [runner(image=as_uint8(image[None]).numpy()) for image in images]
        stacked = {k: np.concatenate([out[k] for out in per_image]) for k in per_image[0]}
        return _from_exported(stacked, input_size, category_ids)

    return detect


def load_exported(path, workdir, overrides=()):
    """An exported SavedModel version folder or `.tflite` file as an `inference.ImageDetector`:
    `detect(images, tile=...)` and `detect_video(path)` return `Results`, as the Keras model's do.
    `workdir` (the run it was exported from) gives the input size, thresholds and categories,
    and the artifact's own category list is checked against them.

        detector = load_exported("saved_models/shapes_tiny/1", "work/demo")
        (result,) = detector.detect("work/shapes/val/100001.jpg")
    """
    config, categories = load_workdir(workdir, overrides)
    model = config.model
    make = tflite_detector if os.path.isfile(path) else saved_model_detector
    return ImageDetector(make(os.fspath(path), model.input_size, categories), model.input_size, categories,
                         model.score_threshold, model.mask_threshold)
