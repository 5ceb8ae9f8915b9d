"""Exported artifacts behind the Keras detector's interface, so `evaluate` and `predict` measure
and show exactly what a SavedModel or a `.tflite` file returns.

    centermask evaluate --config configs/shapes_tiny.yaml --workdir work/demo --tflite saved_models/shapes_tiny_int8.tflite
    centermask predict --workdir work/demo --saved-model saved_models/shapes_tiny/1 --input IMAGES --output DIR

A detector takes letterboxed images `[B, N, N, 3]` (float, 0..255) and returns what
`evaluation.make_detector` returns: `boxes` in input pixels, `scores`, contiguous `classes`,
box-relative `masks` and `num_detections`. The artifacts receive the images as uint8, as a
client would send them.
"""

import os

import numpy as np
import tensorflow as tf

from centermask_tf.errors import MissingError


def _from_exported(outputs, input_size, category_ids):
    """Object Detection API outputs (boxes normalised to an `N x N` input, the dataset's own
    category ids) -> the decoded-detections dict of `make_detector`."""
    outputs = {k: np.asarray(v) for k, v in outputs.items()}
    num = outputs["num_detections"].astype(np.int32)
    index_of = {int(cid): i for i, cid in enumerate(category_ids)}
    classes = np.vectorize(lambda cid: index_of.get(int(cid), 0), otypes=[np.int32])(
        outputs["detection_classes"]
    )
    return {
        "boxes": outputs["detection_boxes"] * float(input_size),
        "scores": outputs["detection_scores"],
        "classes": classes,
        "masks": outputs["detection_masks"],
        "num_detections": num,
    }


def as_uint8(images):
    """Float images in 0..255 -> the uint8 an exported model takes (rounded, clipped)."""
    return tf.cast(tf.clip_by_value(tf.round(images), 0.0, 255.0), tf.uint8)


def saved_model_detector(path, input_size, category_ids):
    """A detector running the `image_tensor` signature of an exported SavedModel version folder
    (`saved_models/NAME/1`). A letterboxed `N x N` canvas passes the export's own letterbox
    unchanged, so its normalised boxes are in canvas units."""
    if not os.path.isfile(os.path.join(path, "saved_model.pb")):
        raise MissingError(
            f"--saved-model '{path}' holds no saved_model.pb; pass the version folder, "
            "e.g. saved_models/NAME/1."
        )
    signature = tf.saved_model.load(path).signatures["image_tensor"]

    def detect(images):
        return _from_exported(signature(image_tensor=as_uint8(images)), input_size, category_ids)

    return detect


def tflite_detector(path, input_size, category_ids):
    """A detector running a `.tflite` export (any quantisation) with LiteRT, one image at a time
    (the file's input is `[1, N, N, 3]` uint8)."""
    from ai_edge_litert.interpreter import Interpreter

    from centermask_tf.config import ConfigError

    if not os.path.isfile(path):
        raise MissingError(f"--tflite '{path}' does not exist.")
    runner = Interpreter(model_path=path).get_signature_runner()
    expected = [1, input_size, input_size, 3]
    shape = [int(v) for v in runner.get_input_details()["image"]["shape"]]
    if shape != expected:
        raise ConfigError(
            f"'{path}' takes images of shape {shape} but the workdir's config has "
            f"model.input_size={input_size}; pass the workdir that produced this file."
        )

    def detect(images):
        per_image = [runner(image=as_uint8(image[None]).numpy()) for image in images]
        stacked = {k: np.concatenate([out[k] for out in per_image]) for k in per_image[0]}
        return _from_exported(stacked, input_size, category_ids)

    return detect
