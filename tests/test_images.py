"""The one image reader: every mode and format gives the pixels that were written, the training
pipeline decodes the same pixels as `predict`/`detect`, and EXIF orientations are applied as
PIL's reference transposition does."""

import json

import numpy as np
import pytest
from PIL import Image, ImageOps

from centermask_tf.config import DataConfig, SplitConfig
from centermask_tf.data import tfds_builder
from centermask_tf.data.pipeline import decode_example
from centermask_tf.images import ImageError, load_image, orient

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (20, 30, 3), dtype=np.uint8)
GREY = RGB[..., 0]
# A palette of 4 colours, so the palette files hold exactly these pixels.
PALETTE = np.array([[0, 0, 0], [255, 0, 0], [0, 128, 255], [200, 200, 50]], np.uint8)
INDICES = RNG.integers(0, 4, (20, 30)).astype(np.uint8)


def _palette_image(indices):
    image = Image.fromarray(indices, "P")
    image.putpalette(PALETTE.flatten().tolist())
    return image


def _rgb16_png(path):
    import tensorflow as tf

    tf.io.write_file(path, tf.io.encode_png(RGB.astype(np.uint16) * 257))


# name -> (writer, the RGB pixels a correct reader returns)
LOSSLESS = {
    "grey.png": (lambda p: Image.fromarray(GREY).save(p), np.dstack([GREY] * 3)),
    # 16-bit: value * 257 holds the 8-bit value in its high byte; PIL's convert("RGB") clips it.
    "grey16.png": (lambda p: Image.fromarray(GREY.astype(np.uint16) * 257).save(p), np.dstack([GREY] * 3)),
    "rgb.png": (lambda p: Image.fromarray(RGB).save(p), RGB),
    "rgb16.png": (_rgb16_png, RGB),
    "rgba.png": (lambda p: Image.fromarray(np.dstack([RGB, GREY])).save(p), RGB),  # alpha dropped
    "grey_alpha.png": (lambda p: Image.fromarray(np.dstack([GREY, RGB[..., 1]]), "LA").save(p), np.dstack([GREY] * 3)),
    "palette.png": (lambda p: _palette_image(INDICES).save(p), PALETTE[INDICES]),
    "palette.gif": (lambda p: _palette_image(INDICES).save(p), PALETTE[INDICES]),
    "rgb.bmp": (lambda p: Image.fromarray(RGB).save(p), RGB),
    "rgb.webp": (lambda p: Image.fromarray(RGB).save(p, lossless=True), RGB),
}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("modes")
    for name, (write, _) in LOSSLESS.items():
        write(str(folder / name))
    Image.fromarray(RGB).save(folder / "rgb.jpg", quality=95)
    return folder


@pytest.mark.parametrize("name", sorted(LOSSLESS))
def test_every_mode_reads_as_the_pixels_written(image_folder, name):
    np.testing.assert_array_equal(load_image(str(image_folder / name)), LOSSLESS[name][1])


def test_training_decodes_the_pixels_predict_and_detect_read(image_folder, tmp_path):
    """Every file of the mode folder as a training image: `decode_example` (the pipeline) gives
    exactly `load_image`'s pixels, JPEG included (two decoders differ there by a few levels)."""
    names = [*sorted(LOSSLESS), "rgb.jpg"]
    polygon = [2, 2, 12, 2, 12, 10, 2, 10]
    data = {
        "images": [{"id": i + 1, "file_name": n, "height": 20, "width": 30} for i, n in enumerate(names)],
        "annotations": [{"id": i + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 0, "area": 80.0,
                         "bbox": [2, 2, 10, 8], "segmentation": [polygon]} for i in range(len(names))],
        "categories": [{"id": 1, "name": "box"}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(data))
    config = DataConfig(train=SplitConfig(str(tmp_path / "ann.json"), str(image_folder)),
                        tfds_data_dir=str(tmp_path / "tfds"))
    builder = tfds_builder.prepare_dataset(config)
    decoded = {int(ex["image_id"]): decode_example(ex)["image"].numpy() for ex in builder.as_dataset(split="train")}
    assert len(decoded) == len(names)
    for i, name in enumerate(names):
        np.testing.assert_array_equal(decoded[i + 1], load_image(str(image_folder / name)), err_msg=name)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientations_match_pils_transposition(tmp_path, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(RGB).save(tmp_path / "photo.png", exif=exif.tobytes())
    with Image.open(tmp_path / "photo.png") as stored:
        displayed = np.asarray(ImageOps.exif_transpose(stored).convert("RGB"))
    np.testing.assert_array_equal(load_image(str(tmp_path / "photo.png")), displayed)
    np.testing.assert_array_equal(orient(RGB, orientation), displayed)


def test_files_that_do_not_decode_are_named(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    png = (tmp_path / "cut.png")
    Image.fromarray(RGB).save(png)
    png.write_bytes(png.read_bytes()[:60])
    for name, reason in (("empty.png", "is empty"), ("text.png", "not a readable image"), ("cut.png", "cut.png")):
        with pytest.raises(ImageError, match=reason):
            load_image(str(tmp_path / name))
    Image.fromarray(RGB).save(tmp_path / "big.png")
    with pytest.raises(ImageError, match=r"30x20 = 0 megapixels, over the 0 megapixel limit \(--max-pixels\)"):
        load_image(str(tmp_path / "big.png"), max_pixels=100)
