"""The one image reader: every path that reads an image file (training data, evaluation,
`predict`, `CenterMask.detect`) decodes it here, with `tf.io.decode_image`, the decoder the
SavedModel's `image_bytes` endpoint runs too. Two decoders disagree somewhere: PIL's
`convert("RGB")` clips a 16-bit grayscale PNG to white and its JPEG IDCT differs by a few
levels. PIL only reads headers here: the size (checked before any pixel is decoded) and the EXIF
orientation, which tf.io ignores and which is applied to the decoded pixels, so an image is
read as a photo viewer shows it.
"""

import glob
import os
import re
import warnings

import numpy as np
import tensorflow as tf
from PIL import Image

from centermask_tf.data.pipeline import letterbox_images
from centermask_tf.errors import MissingError, UserError

# The formats tf.io.decode_image reads, and TIFF, which PIL decodes.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_PIL_ONLY = (".tif", ".tiff")
# Containers `predict` reads as video (PyAV, the `video` extra).
VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v")
# PIL's own decompression-bomb limit (about 89.5 megapixels, 268 MB as RGB).
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS
DEFAULT_MAX_MEGABYTES = 200
# `predict`'s overlay of `a.jpg` is `a.jpg.overlay.png`, of `clip.mp4` `clip.overlay.mp4`, and
# its instance masks `a.jpg.mask003.png`; what predict writes is never read as an input.
OVERLAY_SUFFIX = ".overlay.png"
_OUTPUT_NAME = re.compile(r"(\.overlay\.(png|mp4)|\.mask\d+\.png)$")
_ORIENTATION_TAG = 0x0112


class ImageError(UserError):
    """An input image that cannot be used; the message says why."""


def _header(path):
    """`(width, height, EXIF orientation)` from the file's header (no pixel is decoded)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the caller's limit applies
        with Image.open(path) as image:
            orientation = image.getexif().get(_ORIENTATION_TAG, 1)
            return image.size[0], image.size[1], orientation if orientation in range(1, 9) else 1


def exif_orientation(path):
    """The EXIF Orientation tag of an image file (1, upright, when absent or unreadable)."""
    try:
        return _header(path)[2]
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return 1


def orient(image, orientation):
    """`[H, W, C]` pixels as stored -> as displayed under an EXIF `orientation` (1-8)."""
    if orientation in (5, 6, 7, 8):  # the stored image is turned by 90 degrees
        image = np.swapaxes(image, 0, 1)
    flip_rows = orientation in (3, 4, 7, 8)
    flip_columns = orientation in (2, 3, 6, 7)
    return np.ascontiguousarray(image[::-1 if flip_rows else 1, ::-1 if flip_columns else 1])


def decode_image(data):
    """Encoded JPEG/PNG/GIF/BMP/WebP bytes -> uint8 RGB `[H, W, 3]` as stored (grey, palette and
    alpha converted, 16-bit scaled to 8), exactly as training and the SavedModel decode them."""
    return tf.io.decode_image(data, channels=3, expand_animations=False).numpy()


def load_image(path, max_pixels=DEFAULT_MAX_PIXELS, max_megabytes=DEFAULT_MAX_MEGABYTES):
    """RGB uint8 `[H, W, 3]` of an image file as displayed (EXIF orientation applied).

    Raises:
        ImageError: the file is empty, larger than `max_megabytes`, declares more than
            `max_pixels` pixels (checked from its header, before decoding), or does not decode.
    """
    path = os.fspath(path)  # tf.io takes no pathlib.Path
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise ImageError(f"'{path}': {e.strerror}") from None
    if size == 0:
        raise ImageError(f"'{path}' is empty (0 bytes)")
    if size > max_megabytes * 1e6:
        raise ImageError(f"'{path}' is {size / 1e6:.0f} MB, over the {max_megabytes} MB limit (--max-megabytes)")
    try:
        width, height, orientation = _header(path)
    except Image.DecompressionBombError:  # PIL's own hard limit, 2x its default, hit while opening
        raise ImageError(
            f"'{path}' declares more than {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} megapixels, over the "
            f"{min(max_pixels, 2 * Image.MAX_IMAGE_PIXELS) / 1e6:.0f} megapixel limit (--max-pixels)"
        ) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"'{path}' is not a readable image ({' '.join(str(e).split())[:120]})") from None
    if width * height > max_pixels:
        raise ImageError(
            f"'{path}' declares {width}x{height} = {width * height / 1e6:.0f} megapixels, over "
            f"the {max_pixels / 1e6:.0f} megapixel limit (--max-pixels)"
        )
    if path.lower().endswith(_PIL_ONLY):
        return orient(_decode_with_pil(path), orientation)
    try:
        image = decode_image(tf.io.read_file(path))
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ImageError(f"'{path}' does not decode ({' '.join(first.split())[:120]})") from None
    return orient(image, orientation)


def _decode_with_pil(path):
    """A TIFF's first page as uint8 RGB: 16-bit grey scaled to 8 bits as tf.io does (the high
    byte), other modes converted by PIL."""
    try:
        with Image.open(path) as image:
            if image.mode.startswith("I;16") or image.mode == "I":
                grey = np.asarray(image).astype(np.uint32)
                grey = (grey >> 8 if grey.max() > 255 else grey).astype(np.uint8)
                return np.repeat(grey[..., None], 3, axis=-1)
            if image.mode == "F":
                raise ImageError(f"'{path}' holds floating-point pixels; save it as 8- or 16-bit")
            return np.asarray(image.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"'{path}' does not decode ({' '.join(str(e).split())[:120]})") from None


def is_output(name):
    """Whether a file name is one `predict` writes (overlays, instance masks)."""
    return bool(_OUTPUT_NAME.search(name))


def _is_input(name, extensions):
    return name.lower().endswith(extensions) and not is_output(name)


def input_files(inputs, recursive=False, extensions=IMAGE_EXTENSIONS + VIDEO_EXTENSIONS):
    """The files named by `inputs` (a path or a list of them): files as given, the image and
    video files in folders (and their sub-folders with `recursive`), and glob patterns (`**`
    crosses folders with `recursive`). Sorted per input, each file once; what `predict` wrote is
    left out.

    Raises:
        MissingError: an input that does not exist or matches nothing.
    """
    files = []
    for entry in [inputs] if isinstance(inputs, (str, os.PathLike)) else inputs:
        entry = os.fspath(entry)
        if os.path.isdir(entry):
            walk = os.walk(entry) if recursive else [(entry, [], os.listdir(entry))]
            found = sorted(os.path.join(d, n) for d, _, names in walk for n in names if _is_input(n, extensions))
            if not found:
                raise MissingError(f"No image or video files ({', '.join(extensions)}) in '{entry}'.")
        elif os.path.isfile(entry):
            found = [entry]
        elif glob.has_magic(entry):
            found = sorted(p for p in glob.glob(entry, recursive=recursive)
                           if os.path.isfile(p) and _is_input(os.path.basename(p), extensions))
            if not found:
                raise MissingError(f"--input '{entry}' matches no image or video file.")
        else:
            raise MissingError(f"--input '{entry}' does not exist.")
        files.extend(found)
    return list(dict.fromkeys(files))


def image_files(path):
    """The image files of one folder (sorted), or `[path]` for a file."""
    return input_files(path, extensions=IMAGE_EXTENSIONS)


def letterbox_image(image, size):
    """`(canvas float32 [size, size, 3], scale)` exactly as the validation pipeline places it."""
    canvases, scale = letterbox_images(tf.convert_to_tensor(image)[None], size)
    return canvases[0], float(scale)
