import functools
import json
import logging
import os
import socket
import sys

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from pycocotools.coco import COCO

from centermask_tf.arch.centernet.targets import encode_targets, target_spec
from centermask_tf.config import ConfigError, DataConfig, SplitConfig
from centermask_tf.data import tfds_builder
from centermask_tf.data.coco import DataError, FaultReport, read_coco
from centermask_tf.data.pipeline import augment, decode_example, decode_rle, eval_dataset, train_dataset
from centermask_tf.data.shapes import make_shapes
from tests.messy_coco import CATEGORY_IDS, GOOD_IMAGES, PLANTED_FAULTS, write_messy_coco

SIZE, CLASSES, P, SLOTS = 128, 3, 16, 16


def encoder(num_classes):
    """CenterMask's target encoder for these tests' canvas, classes, slots and mask size."""
    return functools.partial(encode_targets, input_size=SIZE, num_classes=num_classes, max_instances=SLOTS, mask_size=P)


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    make_shapes(str(root), train=24, val=6, seed=3)
    return root


def data_config(root, tfds_dir, train="train", val=None, **kwargs):
    splits = {"train": SplitConfig(str(root / "annotations" / f"instances_{train}.json"), str(root / train))}
    if val:
        splits["val"] = SplitConfig(str(root / "annotations" / f"instances_{val}.json"), str(root / val))
    return DataConfig(**splits, tfds_data_dir=str(tfds_dir), max_instances=SLOTS, **kwargs)


@pytest.fixture(scope="module")
def shapes_builder(shapes_dir, tmp_path_factory):
    config = data_config(shapes_dir, tmp_path_factory.mktemp("tfds"), val="val")
    return tfds_builder.prepare_dataset(config), config


def test_shapes_json_loads_and_every_mask_decodes(shapes_dir):
    kinds = set()
    for split in ("train", "val"):
        coco = COCO(str(shapes_dir / "annotations" / f"instances_{split}.json"))
        for ann in coco.dataset["annotations"]:
            mask = coco.annToMask(ann)
            assert mask.sum() == ann["area"] > 0
            x, y, w, h = ann["bbox"]
            ys, xs = np.nonzero(mask)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x, y, x + w, y + h)
            seg = ann["segmentation"]
            kinds.add("polygon" if isinstance(seg, list) else type(seg["counts"]).__name__)
        empty = [i for i in coco.imgs if not coco.imgToAnns.get(i)]
        assert split == "val" or empty, "some training images have no objects"
        assert {c["name"] for c in coco.dataset["categories"]} == {"circle", "rectangle", "triangle"}
    assert kinds == {"polygon", "str", "list"}  # polygons, compressed and uncompressed RLE


def test_shapes_are_deterministic_for_a_seed(tmp_path):
    make_shapes(str(tmp_path / "a"), train=3, val=1, seed=11)
    make_shapes(str(tmp_path / "b"), train=3, val=1, seed=11)
    for rel in ("annotations/instances_train.json", "train/000001.jpg", "train/000003.jpg"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


def test_classes_pick_other_shapes_that_keep_their_ids(tmp_path, capsys):
    from centermask_tf.cli import main

    assert main(["make-shapes", "--output", str(tmp_path / "s"), "--train", "12", "--val", "2", "--classes",
                 "star,hexagon"]) == 0
    coco = COCO(str(tmp_path / "s" / "annotations" / "instances_train.json"))
    assert [(c["id"], c["name"]) for c in coco.dataset["categories"]] == [(4, "star"), (5, "hexagon")]
    assert {a["category_id"] for a in coco.dataset["annotations"]} == {4, 5}
    # A star is not convex: its mask fills well under its box (a hexagon about 3/4 of it).
    fill = {4: [], 5: []}
    for a in coco.dataset["annotations"]:
        if isinstance(a["segmentation"], list):  # unoccluded
            fill[a["category_id"]].append(a["area"] / (a["bbox"][2] * a["bbox"][3]))
    assert np.median(fill[4]) < 0.5 < 0.65 < np.median(fill[5]) < 0.85, fill
    assert main(["make-shapes", "--output", str(tmp_path / "t"), "--classes", "star,pentagon"]) == 2
    assert "--classes must name distinct shapes of circle, rectangle, triangle, star, hexagon" in capsys.readouterr().err


def test_occlusion_controls_overlap_and_masks_are_the_visible_parts(tmp_path):
    """--occlusion 0 keeps objects apart where there is room; 0.9 stacks most of them, and the
    annotated masks never overlap (each pixel belongs to the object drawn on top)."""
    occluded = {}
    for p in (0.0, 0.9):
        counts = make_shapes(str(tmp_path / str(p)), train=40, val=1, seed=5, occlusion=p)
        images, annotations, occluded[p] = counts["train"]
        assert images == 40 and annotations > 60
        occluded[p] /= annotations
        coco = COCO(str(tmp_path / str(p) / "annotations" / "instances_train.json"))
        for image_id in coco.getImgIds():
            masks = [coco.annToMask(a) for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id))]
            if masks:
                assert np.sum(masks, axis=0).max() <= 1
    assert occluded[0.0] < 0.25 and occluded[0.9] > 0.45, occluded  # uniform positions: ~0.36
    with pytest.raises(Exception, match="--occlusion must be a fraction"):
        make_shapes(str(tmp_path / "bad"), train=1, val=1, occlusion=1.5)


def test_coco_val_preset_has_cocos_shape(tmp_path):
    """`--preset coco-val` (here 120 images): 640-px long sides, about 7 objects per image,
    COCO's small/medium/large mix, polygons and RLE, crowd regions as uncompressed RLE."""
    from centermask_tf.data.shapes import COCO_VAL, make_preset

    root = make_preset(str(tmp_path), "coco-val", seed=2, val=120)
    assert not os.path.exists(os.path.join(root, "annotations", "instances_train.json"))
    coco = COCO(os.path.join(root, "annotations", "instances_val.json"))
    images, annotations = coco.dataset["images"], coco.dataset["annotations"]
    assert len(images) == 120 and all(max(i["height"], i["width"]) == COCO_VAL["image_size"] for i in images)
    assert 5.5 < len(annotations) / len(images) < 9
    areas = np.array([a["area"] for a in annotations])
    assert 0.3 < np.mean(areas < 32**2) < 0.55 and 0.15 < np.mean(areas >= 96**2) < 0.35
    crowd = [a for a in annotations if a["iscrowd"]]
    assert crowd and all(isinstance(a["segmentation"]["counts"], list) for a in crowd)
    assert any(isinstance(a["segmentation"], list) for a in annotations)
    for ann in annotations:  # every mask decodes to its area
        assert coco.annToMask(ann).sum() == ann["area"]
    before = os.stat(os.path.join(root, "val", "100001.jpg")).st_mtime_ns
    assert make_preset(str(tmp_path), "coco-val", seed=2, val=120) == root  # made once: reused
    assert os.stat(os.path.join(root, "val", "100001.jpg")).st_mtime_ns == before


def test_decode_rle_equals_pycocotools(rng):
    from centermask_tf.data.coco import uncompressed_counts

    masks = (rng.uniform(size=(3, 9, 7)) > 0.6).astype(np.uint8)
    masks[1, 0, 0] = 1  # a mask starting with a foreground pixel
    counts = [uncompressed_counts(m) for m in masks]
    for m, c in zip(masks, counts):
        rle = mask_utils.frPyObjects({"size": [9, 7], "counts": c.tolist()}, 9, 7)
        np.testing.assert_array_equal(mask_utils.decode(rle), m)
    decoded = decode_rle(np.concatenate(counts).astype(np.int32), [len(c) for c in counts], 9, 7)
    np.testing.assert_array_equal(decoded.numpy(), masks)


def test_batch_has_documented_keys_shapes_and_dtypes(shapes_builder):
    builder, config = shapes_builder
    dataset = train_dataset(builder, config, input_size=SIZE, batch_size=4, encode=encoder(CLASSES))
    images_spec, targets_spec = dataset.element_spec
    assert images_spec.shape == (4, SIZE, SIZE, 3) and images_spec.dtype == tf.float32
    expected = target_spec(SIZE, CLASSES, SLOTS, P)
    assert {k: (tuple(v.shape), v.dtype) for k, v in targets_spec.items()} == {
        k: ((4, *v.shape), v.dtype) for k, v in expected.items()
    }
    images, targets = next(iter(dataset))
    assert 0.0 <= float(tf.reduce_min(images)) and float(tf.reduce_max(images)) <= 255.0
    assert float(tf.reduce_sum(targets["valid"])) > 0


def test_augmented_boxes_bound_their_masks_within_one_pixel(shapes_builder):
    builder, config = shapes_builder
    checked = 0
    for index, example in enumerate(builder.as_dataset(split="train").take(12)):
        sample = decode_example(example)
        for seed in range(4):
            out = augment(sample, SIZE, config, tf.constant([seed, index]))
            for box, mask, label in zip(out["boxes"].numpy(), out["masks"].numpy(), out["classes"].numpy()):
                ys, xs = np.nonzero(mask)
                if len(ys) == 0:
                    continue
                tight = np.array([ys.min(), xs.min(), ys.max() + 1, xs.max() + 1])
                # The box bounds the mask: no mask pixel lies more than 1 px outside it.
                assert (box[:2] <= tight[:2] + 1.0).all() and (tight[2:] <= box[2:] + 1.0).all()
                # And is tight within 2 px for circles and rectangles: a sliver thinner than one
                # output pixel (a circle's extreme, an occluded edge) can fall between the
                # nearest-neighbour samples of a downscaled mask (1.57 px seen); a triangle's
                # apex is a longer spike, so triangles are not checked for tightness.
                if label != 2:
                    np.testing.assert_allclose(box, tight, atol=2.0)
                checked += 1
    assert checked > 50


def test_augment_in_tf_data_equals_eager(shapes_builder):
    builder, config = shapes_builder
    example = next(iter(builder.as_dataset(split="train").take(1)))
    eager = augment(decode_example(example), SIZE, config, tf.constant([5, 9]))
    mapped = tf.data.Dataset.from_tensors(example).map(
        lambda ex: augment(decode_example(ex), SIZE, config, tf.constant([5, 9]))
    )
    graph = next(iter(mapped))
    for key in ("image", "boxes", "masks", "classes"):
        np.testing.assert_allclose(graph[key].numpy(), eager[key].numpy(), atol=1e-3)


def test_deterministic_option_reproduces_batches(shapes_builder):
    builder, config = shapes_builder
    config = DataConfig(**{**config.__dict__, "deterministic": True})
    runs = [
        next(iter(train_dataset(builder, config, input_size=SIZE, batch_size=4, encode=encoder(CLASSES))))
        for _ in range(2)
    ]
    np.testing.assert_array_equal(runs[0][0].numpy(), runs[1][0].numpy())


def test_eval_dataset_keeps_id_and_original_size(shapes_builder, shapes_dir):
    builder, _ = shapes_builder
    images, info = next(iter(eval_dataset(builder, input_size=SIZE, batch_size=6)))
    coco = COCO(str(shapes_dir / "annotations" / "instances_val.json"))
    for image_id, size, scale in zip(info["image_id"].numpy(), info["original_size"].numpy(), info["scale"].numpy()):
        meta = coco.imgs[int(image_id)]
        assert tuple(size) == (meta["height"], meta["width"])
        assert scale == pytest.approx(SIZE / max(size))


def test_tfds_builds_offline_and_second_load_does_not_rebuild(shapes_dir, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket, "create_connection", refuse)
    config = data_config(shapes_dir, tmp_path, val="val")
    builder = tfds_builder.prepare_dataset(config)
    assert builder.info.splits["train"].num_examples == 24
    assert builder.info.metadata["categories"][0] == {"id": 1, "name": "circle"}

    def must_not_run(*args, **kwargs):
        raise AssertionError("rebuilt an already prepared dataset")

    monkeypatch.setattr(tfds_builder.CocoFolder, "_generate_examples", must_not_run)
    again = tfds_builder.prepare_dataset(config)
    assert again.data_dir == builder.data_dir
    assert again.info.splits["val"].num_examples == 6


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    root = tmp_path_factory.mktemp("messy")
    write_messy_coco(str(root))
    return root


def test_every_fault_is_skipped_counted_and_an_epoch_runs(messy, tmp_path, caplog):
    config = data_config(messy, tmp_path)
    with caplog.at_level(logging.WARNING, logger="centermask_tf.data"):
        builder = tfds_builder.prepare_dataset(config)
    assert builder.info.metadata["train_faults"] == PLANTED_FAULTS
    assert builder.info.splits["train"].num_examples == GOOD_IMAGES
    text = caplog.text
    assert "truncated.jpg" in text and "does_not_exist.jpg" in text and "annotation id" in text
    assert "skipped 17 bad samples" in text
    dataset = train_dataset(builder, config, input_size=SIZE, batch_size=2, encode=encoder(3))
    batches = list(dataset.take(GOOD_IMAGES // 2))
    assert len(batches) == GOOD_IMAGES // 2
    # Reloading reports the stored counts again.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="centermask_tf.data"):
        tfds_builder.prepare_dataset(config)
    assert "skipped 17 bad samples" in caplog.text


def _examples(builder, split="train"):
    """Every example of a split as flat {feature: numpy value}, in reading order."""
    return [
        {**{k: v for k, v in example.items() if k != "objects"}, **{f"objects/{k}": v for k, v in example["objects"].items()}}
        for example in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))
    ]


@pytest.mark.parametrize("how", [{"build_workers": 2}, {"beam_options": ["--runner=DirectRunner"]}],
                         ids=["process_pool", "beam_direct_runner"])
def test_parallel_builds_write_the_same_examples_and_faults(messy, tmp_path, how):
    """Two worker processes, or Beam's DirectRunner, build the messy set: the same examples in
    the same order, and the same fault counts, as the single-process build."""
    single = tfds_builder.prepare_dataset(data_config(messy, tmp_path / "single"))
    parallel = tfds_builder.prepare_dataset(data_config(messy, tmp_path / "parallel", **how))
    assert parallel.info.metadata["train_faults"] == single.info.metadata["train_faults"] == PLANTED_FAULTS
    expected, built = _examples(single), _examples(parallel)
    assert len(built) == len(expected) == GOOD_IMAGES
    for ours, theirs in zip(built, expected):
        assert ours.keys() == theirs.keys()
        for key in ours:
            np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


def test_build_after_a_killed_one_removes_its_scratch_folder(messy, tmp_path):
    """A killed build leaves TFDS's `incomplete.*` folder; the next build (holding the lock)
    removes it and builds every example."""
    config = data_config(messy, tmp_path)
    key = tfds_builder._content_key(
        {"train": (os.path.abspath(config.train.annotations), os.path.abspath(config.train.images))}, False
    )
    stale = tmp_path / "coco_folder" / key / "incomplete.ABC123_1.1.0"
    stale.mkdir(parents=True)
    (stale / "coco_folder-train.tfrecord-00000-of-00001").write_bytes(b"half")
    assert tfds_builder.prepare_dataset(config).info.splits["train"].num_examples == GOOD_IMAGES
    assert not stale.exists()


def test_unguarded_script_with_build_workers_fails_with_the_fix(messy, tmp_path):
    """Build workers import the user's script (spawn); a script that builds at import would
    hang on the parent's lock. It stops with a message naming the `__main__` guard instead."""
    import subprocess

    script = tmp_path / "unguarded.py"
    script.write_text(
        "from centermask_tf.config import DataConfig, SplitConfig\n"
        "from centermask_tf.data.tfds_builder import prepare_dataset\n"
        f"prepare_dataset(DataConfig(train=SplitConfig({str(messy / 'annotations' / 'instances_train.json')!r}, "
        f"{str(messy / 'train')!r}), tfds_data_dir={str(tmp_path / 'tfds')!r}, build_workers=2))\n"
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=os.getcwd())
    assert result.returncode != 0
    assert 'if __name__ == "__main__":' in result.stderr and "data.build_workers" in result.stderr


def test_beam_build_that_loses_examples_is_refused(messy, tmp_path, monkeypatch):
    """Workers produced more examples than were written (as Beam's multi-worker DirectRunner
    does at scale): the build raises and leaves no dataset to reuse."""
    read = tfds_builder._beam_read

    def lose_one(image_id, split, **kwargs):
        examples = list(read(image_id, split, **kwargs))
        return examples[:-1] if image_id == 5000 else examples

    monkeypatch.setattr(tfds_builder, "_beam_read", lose_one)
    config = data_config(messy, tmp_path, beam_options=["--runner=DirectRunner"])
    with pytest.raises(DataError, match=rf"wrote {GOOD_IMAGES - 1} of the {GOOD_IMAGES} examples.*not kept"):
        tfds_builder.prepare_dataset(config)
    monkeypatch.setattr(tfds_builder, "_beam_read", read)
    assert tfds_builder.prepare_dataset(config).info.splits["train"].num_examples == GOOD_IMAGES


def test_beam_build_without_beam_names_the_extra(messy, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "apache_beam.options.pipeline_options", None)  # import fails
    with pytest.raises(ConfigError, match=r"data\.beam_options.*pip install -e '\.\[beam\]'"):
        tfds_builder.prepare_dataset(data_config(messy, tmp_path, beam_options=["--runner=DirectRunner"]))


def test_evaluation_ground_truth_is_what_the_build_kept(messy, tmp_path):
    """The ids stored per object are the evaluation's ground truth: every kept annotation and
    no skipped one, with no mask decoded at evaluation. Detections equal to that ground truth
    score AP 1; the whole file (with its malformed annotations) would not."""
    from centermask_tf.evaluation import coco_metrics

    builder = tfds_builder.prepare_dataset(data_config(messy, tmp_path, val="train"))
    ids, image_ids = [], []
    for _, info in eval_dataset(builder, input_size=SIZE, batch_size=4):
        ids += info["annotation_ids"].flat_values.numpy().tolist()
        image_ids += info["image_id"].numpy().tolist()
    assert len(image_ids) == GOOD_IMAGES
    objects = sum(int(e["objects"]["id"].shape[0]) for e in builder.as_dataset(split="val"))
    assert len(ids) == len(set(ids)) == objects > 0
    annotations = str(messy / "annotations" / "instances_train.json")
    coco = COCO(annotations)
    planted = {a["id"] for a in coco.dataset["annotations"] if a["image_id"] in image_ids} - set(ids)
    assert planted  # the good images also hold annotations the build skipped
    detections = []
    for i in ids:
        ann = coco.anns[i]
        if not ann.get("iscrowd"):
            rle = mask_utils.encode(np.asfortranarray(coco.annToMask(ann)))
            detections.append({"image_id": ann["image_id"], "category_id": ann["category_id"], "bbox": ann["bbox"],
                               "score": 1.0, "segmentation": {**rle, "counts": rle["counts"].decode()}})
    metrics = coco_metrics(annotations, detections, image_ids, annotation_ids=ids)
    assert metrics["bbox"]["AP"] == pytest.approx(1.0) and metrics["segm"]["AP"] == pytest.approx(1.0)


def test_strict_raises_naming_the_first_bad_sample(messy, tmp_path):
    config = data_config(messy, tmp_path, strict=True)
    with pytest.raises(DataError, match=r"images entry.*id '9100' is not an integer.*data\.strict"):
        tfds_builder.prepare_dataset(config)


def test_parent_path_file_name_is_refused(messy):
    report = FaultReport()
    records = list(read_coco(str(messy / "annotations" / "instances_train.json"), str(messy / "train"), report=report))
    assert report.counts["unsafe_path"] == 1
    assert not any(r["path"].endswith("outside.png") for r in records)
    # With strict: true the same file name stops reading with an error that names it.
    data = json.loads((messy / "annotations" / "instances_train.json").read_text())
    data["images"] = [i for i in data["images"] if i["file_name"] == "../outside.png"]
    data["annotations"] = []
    only = messy / "annotations" / "only_unsafe.json"
    only.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"\.\./outside\.png.*outside the image root"):
        list(read_coco(str(only), str(messy / "train"), report=FaultReport(strict=True)))


def test_non_contiguous_ids_and_mixed_images_go_through_the_pipeline(messy, tmp_path):
    config = data_config(messy, tmp_path)
    builder = tfds_builder.prepare_dataset(config)
    assert [c["id"] for c in builder.info.metadata["categories"]] == list(CATEGORY_IDS)
    labels, shapes = set(), []
    for example in builder.as_dataset(split="train"):
        sample = decode_example(example)
        shapes.append(tuple(sample["image"].shape))
        labels.update(sample["classes"].numpy().tolist())
        crowd = sample["is_crowd"].numpy()
        assert crowd.sum() <= 1
    assert labels == {0, 1, 2}
    assert all(s[-1] == 3 for s in shapes)
    images, targets = next(iter(train_dataset(builder, config, input_size=SIZE, batch_size=3, encode=encoder(3))))
    assert images.shape == (3, SIZE, SIZE, 3)


def test_folded_colour_jitter_equals_sequential_adjustments(rng):
    from centermask_tf.data.pipeline import _jitter_colour

    image = rng.uniform(0, 255, (8, 8, 3)).astype(np.float32)
    seeds = tf.constant([3, 4])
    b, c, s = 1.0 + tf.random.stateless_uniform([3], seeds, -0.4, 0.4).numpy()
    gray = lambda x: (x @ np.array([0.2989, 0.587, 0.114]))[..., None]  # noqa: E731
    x = image * b
    x = x * c + gray(x).mean() * (1 - c)
    x = x * s + gray(x) * (1 - s)
    np.testing.assert_allclose(_jitter_colour(image, 0.4, seeds), np.clip(x, 0, 255), atol=1e-2)


def test_letterbox_images_equals_the_validation_letterbox(shapes_builder):
    from centermask_tf.data.pipeline import letterbox, letterbox_images

    builder, _ = shapes_builder
    sample = decode_example(next(iter(builder.as_dataset(split="val").take(1))))
    expected = letterbox(sample, SIZE)
    canvases, scale = letterbox_images(sample["image"][None], SIZE)
    np.testing.assert_array_equal(canvases[0].numpy(), expected["image"].numpy())
    assert float(scale) == float(expected["scale"])


# === Caches that cannot lie, EXIF orientation, typed records ===


def test_cache_rebuilds_when_an_image_appears_and_keys_cover_root_and_strict(shapes_dir, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(shapes_dir, root)
    first = sorted((root / "train").iterdir())[0]
    held = first.read_bytes()
    first.unlink()
    config = data_config(root, tmp_path / "tfds")
    builder = tfds_builder.prepare_dataset(config)
    assert builder.info.splits["train"].num_examples == 23
    assert builder.info.metadata["train_faults"] == {"missing_image": 1}

    first.write_bytes(held)  # the missing image is added: the cached build must not be reused
    rebuilt = tfds_builder.prepare_dataset(config)
    assert rebuilt.data_dir != builder.data_dir
    assert rebuilt.info.splits["train"].num_examples == 24 and not rebuilt.info.metadata["train_faults"]

    strict = tfds_builder.prepare_dataset(data_config(root, tmp_path / "tfds", strict=True))
    elsewhere = tmp_path / "moved"
    shutil.copytree(root, elsewhere)
    moved = tfds_builder.prepare_dataset(data_config(elsewhere, tmp_path / "tfds"))
    assert len({rebuilt.data_dir, strict.data_dir, moved.data_dir}) == 3


@pytest.mark.slow
def test_two_processes_building_one_new_dataset_both_succeed(shapes_dir, tmp_path):
    import subprocess
    import sys

    script = (
        "import sys; from centermask_tf.config import DataConfig, SplitConfig\n"
        "from centermask_tf.data.tfds_builder import prepare_dataset\n"
        f"train = SplitConfig({str(shapes_dir / 'annotations' / 'instances_train.json')!r}, {str(shapes_dir / 'train')!r})\n"
        f"builder = prepare_dataset(DataConfig(train=train, tfds_data_dir={str(tmp_path / 'tfds')!r}))\n"
        "print('EXAMPLES', builder.info.splits['train'].num_examples, builder.data_dir)\n"
    )
    runs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outputs = [run.communicate(timeout=600) for run in runs]
    for run, (out, err) in zip(runs, outputs):
        assert run.returncode == 0, err[-2000:]
    lines = [[line for line in out.splitlines() if line.startswith("EXAMPLES")][0] for out, _ in outputs]
    assert lines[0] == lines[1] and lines[0].split()[1] == "24"


def _exif_rotated_jpeg(path, displayed, orientation=6):
    """Stores `displayed` as a phone would with orientation 6: pixels turned, plus the tag that
    turns them back."""
    from PIL import Image, ImageOps

    stored = Image.fromarray(displayed).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(path, quality=95, exif=exif.tobytes())
    with Image.open(path) as check:  # the file displays as intended
        assert np.abs(np.asarray(ImageOps.exif_transpose(check), float) - displayed).mean() < 3


@pytest.mark.parametrize("height, width", [(40, 60), (48, 48)])
def test_exif_rotated_training_image_has_its_mask_on_its_object(tmp_path, height, width):
    from centermask_tf.images import load_image

    displayed = np.zeros((height, width, 3), np.uint8)
    displayed[5:15, width - 25 : width - 5] = 255  # a white box near the top-right corner
    (tmp_path / "images").mkdir()
    _exif_rotated_jpeg(str(tmp_path / "images" / "phone.jpg"), displayed)
    polygon = [width - 25, 5, width - 5, 5, width - 5, 15, width - 25, 15]
    data = {
        "images": [{"id": 1, "file_name": "phone.jpg", "height": height, "width": width},
                   {"id": 2, "file_name": "phone.jpg", "height": height + 7, "width": width}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 200.0,
                         "bbox": [width - 25, 5, 20, 10], "segmentation": [polygon]}],
        "categories": [{"id": 1, "name": "box"}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(data))
    config = DataConfig(train=SplitConfig(str(tmp_path / "ann.json"), str(tmp_path / "images")),
                        tfds_data_dir=str(tmp_path / "tfds"))
    builder = tfds_builder.prepare_dataset(config)
    assert builder.info.metadata["train_faults"] == {"size_mismatch": 1}  # JSON fits neither size
    (example,) = list(builder.as_dataset(split="train"))
    sample = decode_example(example)
    image, mask = sample["image"].numpy().mean(-1), sample["masks"].numpy()[0].astype(bool)
    assert image.shape == (height, width)
    assert image[mask].mean() > 200 and image[~mask].mean() < 30
    # predict and detect read the same file upright too.
    assert np.abs(load_image(str(tmp_path / "images" / "phone.jpg")).astype(float) - displayed).mean() < 3


def test_records_with_wrong_types_are_skipped_and_named(messy, caplog):
    report = FaultReport()
    with caplog.at_level(logging.WARNING, logger="centermask_tf.data"):
        list(read_coco(str(messy / "annotations" / "instances_train.json"), str(messy / "train"), report=report))
    assert report.counts["bad_annotation_record"] == 3 and report.counts["bad_image_record"] == 2
    assert "bbox ['1', '1', '4', '4'] is not a list of 4 numbers" in caplog.text
    assert "category_id '7' is not an integer" in caplog.text
    assert "id '9100' is not an integer" in caplog.text and "height '30' is not a positive integer" in caplog.text


def _one_image_coco(root, objects, size=64, crowd=()):
    """A COCO folder with one grey `size` image holding `objects` (x, y, w, h) rectangles; the
    indices in `crowd` are crowd regions. Returns the DataConfig of its train split."""
    from PIL import Image

    (root / "images").mkdir(parents=True)
    Image.fromarray(np.full((size, size, 3), 90, np.uint8)).save(root / "images" / "a.png")
    annotations = [
        {"id": i + 1, "image_id": 1, "category_id": 1, "iscrowd": int(i in crowd), "area": float(w * h),
         "bbox": [x, y, w, h], "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]}
        for i, (x, y, w, h) in enumerate(objects)
    ]
    data = {"images": [{"id": 1, "file_name": "a.png", "height": size, "width": size}],
            "annotations": annotations, "categories": [{"id": 1, "name": "box"}]}
    (root / "ann.json").write_text(json.dumps(data))
    return DataConfig(train=SplitConfig(str(root / "ann.json"), str(root / "images")),
                      tfds_data_dir=str(root / "tfds"))


def test_decoding_keeps_only_the_objects_that_get_target_slots(tmp_path):
    """`decode_example(example, n)` decodes the masks of the first n non-crowd objects only (the
    others are counted in `surplus`), and they equal those of a full decode."""
    objects = [(2, 2, 20, 20), (5, 5, 10, 12), (30, 8, 14, 9), (10, 40, 20, 15), (40, 40, 8, 8)]
    builder = tfds_builder.prepare_dataset(_one_image_coco(tmp_path, objects, crowd=(0,)))
    (example,) = list(builder.as_dataset(split="train"))
    full, cut = decode_example(example), decode_example(example, 2)
    assert cut["masks"].shape[0] == 2 and int(cut["surplus"]) == 2  # 4 qualify, 2 kept
    for key in ("boxes", "classes", "is_crowd", "masks"):
        np.testing.assert_array_equal(cut[key].numpy(), tf.gather(full[key], [1, 2]).numpy(), err_msg=key)
    none = decode_example(example, 0)
    assert none["masks"].shape[0] == 0 and int(none["surplus"]) == 4


@pytest.mark.slow
def test_images_with_100000_annotations_train_within_normal_memory(tmp_path):
    """All masks used to be decoded before `data.max_instances` applied: 100,000 of them, and
    training aborted with std::bad_alloc. Now a training step reads 8 of them. (A second image
    for a batch of 2: at batch 1, oneDNN's Conv2DBackpropFilter crashes on the 1x1 stride-2
    8 -> 16 channel conv of this 0.125-width ResNet-18; TF_ENABLE_ONEDNN_OPTS=0 avoids it.)"""
    import subprocess

    rng = np.random.default_rng(0)
    xy = rng.integers(0, 60, (100_000, 2))
    objects = [(int(x), int(y), 3, 3) for x, y in xy]
    config = _one_image_coco(tmp_path / "many", objects, size=64)
    with open(config.train.annotations) as f:
        data = json.load(f)
    data["images"].append(dict(data["images"][0], id=2))  # a second image, with one object
    data["annotations"].append(dict(data["annotations"][0], id=100_001, image_id=2))
    with open(config.train.annotations, "w") as f:
        json.dump(data, f)
    tfds_builder.prepare_dataset(config)  # built here, so the child's peak is training's alone
    command = [sys.executable, "-m", "centermask_tf.cli", "train", "--config", "configs/shapes_tiny.yaml",
               "--workdir", str(tmp_path / "run")]
    for override in (f"data.train.annotations={config.train.annotations}", f"data.train.images={config.train.images}",
                     f"data.tfds_data_dir={config.tfds_data_dir}", "model.width_multiplier=0.125",
                     "model.input_size=64", "model.head_conv=8", "model.shape_size=8", "model.mask_size=8", "model.num_classes=1",
                     "data.max_instances=8", "train.batch_size=2", "train.epochs=1", "train.steps_per_epoch=3",
                     "eval.every_epochs=0", "data.val.annotations=null", "data.val.images=null"):
        command += ["--set", override]
    # Through a fresh parent: its RUSAGE_CHILDREN is this training process's peak alone.
    measure = ("import resource, subprocess, sys; run = subprocess.run(sys.argv[1:]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(run.returncode)")
    run = subprocess.run([sys.executable, "-c", measure, *command], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    peak_gb = int(run.stdout.split()[-1]) / 1e6  # kilobytes on Linux
    assert peak_gb < 3.0, peak_gb
    print(f"peak RSS of the training process: {peak_gb:.2f} GB")
