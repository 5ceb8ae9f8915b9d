"""`centermask predict` inputs (several paths, folders, globs, TIFF and WebP) and outputs (a COCO
file that trains again, one PNG per instance), all from the public CLI."""

import json
import os
import shutil

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image

from centermask_tf.cli import main
from centermask_tf.data.coco import FaultReport, read_coco
from centermask_tf.errors import MissingError
from centermask_tf.images import input_files, load_image

RGB = (np.arange(20 * 30 * 3) % 251).astype(np.uint8).reshape(20, 30, 3)


def test_inputs_are_files_folders_and_globs_and_never_predicts_outputs(tmp_path):
    for name in ["a.jpg", "b.webp", "c.tif", "sub/d.png", "sub/deeper/e.bmp", "notes.txt", "a.jpg.overlay.png",
                 "sub/masks/d.png.mask000.png", "clip.mp4", "clip.overlay.mp4"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    names = lambda files: [os.path.relpath(f, tmp_path) for f in files]  # noqa: E731
    assert names(input_files(str(tmp_path))) == ["a.jpg", "b.webp", "c.tif", "clip.mp4"]
    assert names(input_files(tmp_path, recursive=True)) == [
        "a.jpg", "b.webp", "c.tif", "clip.mp4", "sub/d.png", "sub/deeper/e.bmp"]
    assert names(input_files([str(tmp_path / "*.jpg"), str(tmp_path / "sub" / "d.png"), str(tmp_path / "a.jpg")])) == [
        "a.jpg", "sub/d.png"]  # each file once
    assert names(input_files(str(tmp_path / "**" / "*.bmp"), recursive=True)) == ["sub/deeper/e.bmp"]
    with pytest.raises(MissingError, match="matches no image or video file"):
        input_files(str(tmp_path / "*.gif"))
    with pytest.raises(MissingError, match="does not exist"):
        input_files(str(tmp_path / "missing.jpg"))


def test_tiff_and_webp_read_as_the_pixels_written(tmp_path):
    Image.fromarray(RGB).save(tmp_path / "rgb.tif")
    Image.fromarray(RGB).save(tmp_path / "rgb.webp", lossless=True)
    deep = (np.arange(20 * 30) * 97 % 65536).astype(np.uint16).reshape(20, 30)
    Image.fromarray(deep).save(tmp_path / "grey16.tif")
    np.testing.assert_array_equal(load_image(str(tmp_path / "rgb.tif")), RGB)
    np.testing.assert_array_equal(load_image(str(tmp_path / "rgb.webp")), RGB)
    np.testing.assert_array_equal(load_image(str(tmp_path / "grey16.tif")), np.repeat((deep >> 8)[..., None], 3, -1))


def test_predict_writes_coco_and_masks_that_read_back_as_a_training_set(shapes, untrained_workdir, tmp_path, capsys):
    root, _ = shapes
    workdir, _ = untrained_workdir
    photos = tmp_path / "photos"
    shutil.copytree(root / "val", photos / "val")
    first = sorted(os.listdir(photos / "val"))[0]
    Image.open(photos / "val" / first).save(photos / "extra.tif")  # another folder, another format
    out = tmp_path / "out"
    args = ["predict", "--workdir", str(workdir), "--input", str(photos / "val" / "*"), str(photos / "extra.tif"),
            "--output", str(out), "--score", "0.05", "--save", "overlays,coco,masks"]
    assert main(args) == 0
    assert "predictions_coco.json, instance masks (masks/) for 5 images" in capsys.readouterr().out
    predictions = json.loads((out / "predictions.json").read_text())
    coco = json.loads((out / "predictions_coco.json").read_text())
    val = sorted(os.listdir(photos / "val"))
    assert [p["file"] for p in predictions] == [str(photos / "val" / n) for n in val] + [str(photos / "extra.tif")]
    assert [i["file_name"] for i in coco["images"]] == [os.path.join("val", n) for n in val] + ["extra.tif"]
    assert coco["info"]["images_root"] == str(photos)
    assert (out / "val" / (first + ".overlay.png")).is_file() and (out / "extra.tif.overlay.png").is_file()
    detections = sum(len(p["detections"]) for p in predictions)
    assert len(coco["annotations"]) == detections > 0
    # Each instance PNG is the mask of predictions.json's RLE; the COCO polygons give it back.
    by_image = {i["id"]: i for i in coco["images"]}
    ious = []
    for p, image in zip(predictions, coco["images"]):
        annotations = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        assert len(p["masks"]) == len(p["detections"]) == len(annotations)
        for png, detection, annotation in zip(p["masks"], p["detections"], annotations):
            rle = {**detection["segmentation"], "counts": detection["segmentation"]["counts"].encode()}
            mask = mask_utils.decode(rle).astype(bool)
            np.testing.assert_array_equal(np.asarray(Image.open(png)) > 0, mask)
            info = by_image[annotation["image_id"]]
            flat = mask_utils.frPyObjects(annotation["segmentation"], info["height"], info["width"])
            back = mask_utils.decode(mask_utils.merge(flat)).astype(bool)
            ious.append((back & mask).sum() / (back | mask).sum())
            assert annotation["area"] == mask.sum() and annotation["score"] == detection["score"]
    assert min(ious) >= 0.95, min(ious)
    # The training reader takes the file as it is (TIFF aside, which the dataset builder does not
    # decode): every record, every annotation, no fault.
    usable = dict(coco, images=coco["images"][:-1],
                  annotations=[a for a in coco["annotations"] if a["image_id"] != coco["images"][-1]["id"]])
    (tmp_path / "usable.json").write_text(json.dumps(usable))
    report = FaultReport(strict=True)
    records = list(read_coco(str(tmp_path / "usable.json"), coco["info"]["images_root"], report=report))
    assert len(records) == len(usable["images"]) and sum(report.counts.values()) == 0
    assert sum(len(r["objects"]) for r in records) == len(usable["annotations"])
    # A rerun writes the same files again; the inputs are untouched.
    before = (out / "predictions_coco.json").read_bytes()
    assert main(args) == 0
    assert (out / "predictions_coco.json").read_bytes() == before
    assert sorted(os.listdir(photos)) == ["extra.tif", "val"]


def test_bad_save_and_tile_options_are_one_line(untrained_workdir, tmp_path, capsys):
    workdir, _ = untrained_workdir
    base = ["predict", "--workdir", str(workdir), "--input", str(tmp_path), "--output", str(tmp_path / "o")]
    for extra, message in [(["--save", "overlays,pdf"], "choose from overlays, coco, masks"),
                           (["--tile-overlap", "0.95"], "must be in [0, 0.9]")]:
        with pytest.raises(SystemExit) as exit_:
            main(base + extra)
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert main(base + ["--tile", "32"]) == 2  # known once the workdir's input size is
    assert "at least the network input (model.input_size=64)" in capsys.readouterr().err
