"""SavedModel export for TF Serving, and the in-graph detection functions exports share.

    centermask export --workdir work/demo --format saved_model --output saved_models/shapes
    centermask export --workdir work/demo --format tflite --output saved_models/shapes.tflite

The SavedModel holds the whole pipeline (decode, letterbox, network, peaks, masks) in standard
TF ops, under the TF Object Detection API's output names, so existing clients work:

- `serving_default(image_bytes: string [B])`: JPEG/PNG bytes, any sizes.
- `image_tensor(image_tensor: uint8 [B, H, W, 3])`: any H and W.

Outputs: `num_detections [B]`, `detection_boxes [B, K, 4]` (ymin, xmin, ymax, xmax normalised
to the original image), `detection_scores [B, K]`, `detection_classes [B, K]` (the dataset's own
category ids; float32 as in the Object Detection API), `detection_masks [B, K, M, M]`
(box-relative mask probabilities). Entries past `num_detections` are zero.

The version folder also holds `assets.extra/categories.json` (ids and names; TF Serving's place
for extra files), which `evaluate/predict --saved-model` check against the workdir.

Export goes through `keras.export.ExportArchive`, which keeps the network's weights attached
(a bare `tf.Module` around a Keras 3 model converts to a weightless TFLite file).
"""

import os
import shutil

import keras
import tensorflow as tf

from centermask_tf.data.pipeline import letterbox_images
from centermask_tf.errors import UserError
from centermask_tf.files import (
    DiskFullError,
    disk_full,
    ensure_space,
    remove_stale_temporaries,
    write_json,
)

CATEGORIES_FILE = os.path.join("assets.extra", "categories.json")


# File signatures of the formats tf.io.decode_image reads.
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM", b"RIFF")


def _is_image(encoded):
    """Whether a scalar string starts like a JPEG, PNG, GIF, BMP or WebP file."""
    return tf.reduce_any(
        [tf.equal(tf.strings.substr(encoded, 0, len(magic)), magic) for magic in _IMAGE_MAGIC]
    )


def detection_outputs(detector, canvases, extents):
    """Runs a `CenterMask` detector's network and decoding; boxes are normalised by `extents`
    `[B, 2]` (the original image's size in input pixels: h * scale, w * scale)."""
    detections = detector.decode(canvases)
    normaliser = tf.tile(extents, [1, 2])[:, None, :]  # [B, 1, 4]
    valid = tf.cast(detections["scores"] > 0, tf.float32)
    ids = tf.constant(detector.category_ids, tf.float32)
    return {
        "num_detections": tf.cast(detections["num_detections"], tf.float32),
        "detection_boxes": tf.clip_by_value(detections["boxes"] / normaliser, 0.0, 1.0),
        "detection_scores": detections["scores"],
        "detection_classes": tf.gather(ids, detections["classes"]) * valid,
        "detection_masks": detections["masks"],
    }


def letterbox_with_extents(image_tensor, size):
    """uint8 `[B, H, W, 3]` -> (letterboxed canvases `[B, size, size, 3]`, extents `[B, 2]`, the
    images' size in input pixels, as `detection_outputs` takes them)."""
    canvases, scale = letterbox_images(image_tensor, size)
    original = tf.cast(tf.shape(image_tensor)[1:3], tf.float32)
    return canvases, tf.tile((original * scale)[None], [tf.shape(image_tensor)[0], 1])


def image_detector(detector):
    """The `image_tensor` endpoint's function: uint8 `[B, H, W, 3]` (any H, W) -> outputs."""

    def detect_images(image_tensor):
        canvases, extents = letterbox_with_extents(image_tensor, detector.input_size)
        return detection_outputs(detector, canvases, extents)

    return detect_images


def export_saved_model(detector, output, version=1):
    """Writes a `CenterMask` detector in the TF Serving layout `output/<version>/` (with its
    categories in `assets.extra/categories.json`) and returns that path."""
    size = detector.input_size
    detect_images = image_detector(detector)

    def decode_one(encoded):
        # Named here: decode_image's own error does not say which input was wrong.
        check = tf.debugging.Assert(
            _is_image(encoded),
            ["Input 'image_bytes' must hold JPEG, PNG, GIF, BMP or WebP file bytes; got a string starting",
             tf.strings.substr(encoded, 0, 16)],
        )
        with tf.control_dependencies([check]):
            image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        canvases, scale = letterbox_images(image[None], size)
        return canvases[0], tf.cast(tf.shape(image)[:2], tf.float32) * scale

    def detect_bytes(image_bytes):
        canvases, extents = tf.map_fn(
            decode_one,
            image_bytes,
            fn_output_signature=(
                tf.TensorSpec([size, size, 3], tf.float32),
                tf.TensorSpec([2], tf.float32),
            ),
        )
        return detection_outputs(detector, canvases, extents)

    if os.path.exists(output) and not os.path.isdir(output):
        raise UserError(f"'{output}' is a file; a SavedModel goes into a folder (saved_models/NAME/<version>).")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise UserError(f"the SavedModel version must be an integer >= 1 (TF Serving's), got {version!r}.")
    path = os.path.join(output, str(version))
    if os.path.exists(path):
        raise UserError(
            f"'{path}' exists: TF Serving treats a version as immutable. Export as a new version "
            f"(--version {next_version(output)}) or to another --output."
        )
    os.makedirs(output, exist_ok=True)
    remove_stale_temporaries(output)  # versions half-written by killed exports
    # Twice the weights: the variables plus the graph's constants, with the usual margin.
    ensure_space(output, 2 * sum(w.nbytes for w in detector.network.get_weights()))
    # Written beside the target and renamed: TF Serving never sees a half-written version.
    partial = os.path.join(output, f".tmp-{os.getpid()}-{version}")
    try:
        _write_archive(
            detector,
            {
                "serving_default": (detect_bytes, tf.TensorSpec([None], tf.string, name="image_bytes")),
                "image_tensor": (
                    detect_images,
                    tf.TensorSpec([None, None, None, 3], tf.uint8, name="image_tensor"),
                ),
            },
            partial,
        )
        write_json(os.path.join(partial, CATEGORIES_FILE), detector.categories)
        os.rename(partial, path)
    except BaseException as e:
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(e, (OSError, tf.errors.OpError)) and disk_full(e):
            raise DiskFullError(
                f"disk full while exporting to '{output}'; nothing was left behind. Free some space and "
                "rerun the same command."
            ) from None
        raise
    return path


def next_version(output):
    """The version number after the highest in a TF Serving model folder (1 for a new one)."""
    if not os.path.isdir(output):
        return 1
    versions = [int(name) for name in os.listdir(output) if name.isdigit()]
    return max(versions, default=0) + 1


def export_tflite_saved_model(detector, output):
    """A SavedModel for TFLite conversion: fixed uint8 `[1, N, N, 3]` input (already letterboxed
    by the client), boxes normalised to that input; everything else as `image_tensor`."""
    size = detector.input_size

    def detect_canvas(image):
        canvases = tf.cast(image, tf.float32)
        extents = tf.constant([[size, size]], tf.float32)
        return detection_outputs(detector, canvases, extents)

    spec = tf.TensorSpec([1, size, size, 3], tf.uint8, name="image")
    _write_archive(detector, {"serving_default": (detect_canvas, spec)}, output)
    return output


def network_scope(detector):
    """The name scope of the network's own ops in the exported graph (the rest is decoding and
    mask assembly): the part int8 export quantises."""
    return detector.inference_network.name


def _write_archive(detector, endpoints, path):
    """Writes a SavedModel with the network's weights tracked and one endpoint per
    `name: (function, input TensorSpec)`."""
    if detector.config.model.assembly != "box":
        raise UserError(
            "exports carry fixed-size box masks: export a detector with model.assembly=box "
            "(a network trained with native assembly decodes with box masks as well)."
        )
    archive = keras.export.ExportArchive()
    archive.track(detector.network)
    for name, (function, spec) in endpoints.items():
        archive.add_endpoint(name, function, input_signature=[spec])
    archive.write_out(path, verbose=False)
