"""Mosaic, copy-paste and large-scale jitter: pixels, masks, boxes and flags after mixing."""

import dataclasses
import functools

import numpy as np
import pytest
import tensorflow as tf

from centermask_tf.arch.centernet.targets import encode_targets
from centermask_tf.config import load_config
from centermask_tf.data.mixing import MIN_VISIBLE, copy_paste, mix_groups, mosaic, tightened_boxes
from centermask_tf.data.pipeline import LARGE_SCALE_JITTER, augment, decode_example
from centermask_tf.data.tfds_builder import prepare_dataset
from centermask_tf.training.setup import config_train_dataset

N = 64


def sample(boxes, value, crowd=(), seed=0):
    """A canvas sample: a constant image of `value` and one rectangle object per integer box."""
    masks = np.zeros((len(boxes), N, N), np.uint8)
    for mask, (y1, x1, y2, x2) in zip(masks, boxes):
        mask[y1:y2, x1:x2] = 1
    count = len(boxes)
    return {
        "image": tf.fill([N, N, 3], float(value)),
        "boxes": tf.constant(np.reshape(boxes, [-1, 4]), tf.float32),
        "classes": tf.range(count, dtype=tf.int32) % 3,
        "is_crowd": tf.constant([i in crowd for i in range(count)], tf.bool),
        "masks": tf.constant(masks),
        "surplus": tf.constant(0),
        "seed": tf.constant([seed, 0]),
        "valid": tf.ones([count], tf.bool),
    }


def test_tightened_boxes_shrink_cut_sides_only():
    masks = np.zeros((2, N, N), np.uint8)
    masks[0, 10:20, 5:15] = 1
    masks[1, 30:40, 30:40] = 1
    boxes = tf.constant([[9.6, 4.7, 25.2, 15.3], [29.5, 29.5, 40.5, 40.5]])
    out = tightened_boxes(boxes, tf.constant(masks), tf.constant([True, False])).numpy()
    # The cut object's bottom side moves to its mask (20), its sub-pixel sides inside stay.
    np.testing.assert_allclose(out, [[10.0, 5.0, 20.0, 15.0], [29.5, 29.5, 40.5, 40.5]])


def test_copy_paste_pixels_masks_boxes_and_occlusion():
    # Target: A (rows 10-30, cols 10-30), B (40-50, 40-50), F (50-60, 0-20).
    target = sample([[10, 10, 30, 30], [40, 40, 50, 50], [50, 0, 60, 20]], 50.0)
    # Source: C covers A's corner (100 of 400 px), D covers 80 % of B, G the right half of F;
    # the last object is a crowd region.
    source = sample([[20, 20, 40, 40], [38, 38, 60, 48], [45, 10, 64, 30], [0, 50, 10, 60]], 200.0, crowd=(3,))
    pasted_seen = set()
    for seed in range(16):
        out = {k: v.numpy() for k, v in copy_paste(target, source, tf.constant([seed, 1])).items()}
        chosen = out["valid"][3:]
        assert not chosen[3], "a crowd region was pasted"
        pasted_seen.update(np.flatnonzero(chosen))
        covered = np.zeros((N, N), bool)
        for mask in source["masks"].numpy()[chosen]:
            covered |= mask > 0
        # The pasted objects' pixels are the source's, everything else the target's.
        np.testing.assert_array_equal(out["image"][..., 0], np.where(covered, 200.0, 50.0))
        for i in range(3):
            before = target["masks"].numpy()[i] > 0
            np.testing.assert_array_equal(out["masks"][i] > 0, before & ~covered)  # exactly the covered pixels
            assert out["valid"][i] == ((before & ~covered).sum() >= MIN_VISIBLE * before.sum())
        # The pasted objects keep their masks and boxes, and come after the target's.
        np.testing.assert_array_equal(out["masks"][3:], source["masks"].numpy())
        np.testing.assert_array_equal(out["boxes"][3:], source["boxes"].numpy())
        # A loses a corner: 300 px left, its box unchanged. B keeps 20 of 100 px: dropped.
        # F keeps its left half, and its box is re-tightened to it.
        assert out["masks"][0].sum() == (300 if chosen[0] else 400) and out["valid"][0]
        np.testing.assert_allclose(out["boxes"][0], [10, 10, 30, 30])
        assert out["valid"][1] == (not chosen[1])
        np.testing.assert_allclose(out["boxes"][2], [50, 0, 60, 10] if chosen[2] else [50, 0, 60, 20])
    assert pasted_seen == {0, 1, 2}


def test_crowd_regions_stay_crowd_and_never_become_positives():
    target = sample([[10, 10, 30, 30], [40, 40, 60, 60]], 50.0, crowd=(1,))
    source = sample([[0, 0, 8, 8], [20, 40, 36, 56]], 200.0, crowd=(0,))
    encode = functools.partial(encode_targets, input_size=N, num_classes=3, max_instances=8, mask_size=8)
    for seed in range(8):
        out = copy_paste(target, source, tf.constant([seed, 0]))
        valid = out["valid"].numpy()
        np.testing.assert_array_equal(out["is_crowd"].numpy(), [False, True, True, False])
        keep = tf.constant(valid)
        targets = encode(*(tf.boolean_mask(out[k], keep) for k in ("boxes", "classes", "masks", "is_crowd")))
        expected = int((valid & ~out["is_crowd"].numpy()).sum())
        assert int(targets["valid"].numpy().sum()) == expected


def test_mosaic_quadrants_show_each_images_corner():
    # Four constant images (10, 20, 30, 40), one 16 x 16 object in each image's bottom-right area.
    samples = [sample([[40, 40, 56, 56]], 10.0 * (k + 1)) for k in range(4)]
    cy, cx = 24, 40
    out = {k: v.numpy() for k, v in mosaic(samples, [0, 1, 2, 3], tf.constant([cy, cx])).items()}
    expected = np.zeros((N, N))
    expected[:cy, :cx], expected[:cy, cx:], expected[cy:, :cx], expected[cy:, cx:] = 10, 20, 30, 40
    np.testing.assert_array_equal(out["image"][..., 0], expected)
    # Canvas = sample rolled by (cy, cx): the object at rows 40-56 moves to 64-80 -> 0-16 (wrapped)
    # and cols 40-56 -> 80-96 -> 16-32; each quadrant keeps only its part.
    rolled = np.zeros((N, N), bool)
    rolled[0:16, 16:32] = True
    regions = [(slice(0, cy), slice(0, cx)), (slice(0, cy), slice(cx, N)),
               (slice(cy, N), slice(0, cx)), (slice(cy, N), slice(cx, N))]
    for k, (rows, cols) in enumerate(regions):
        visible = np.zeros((N, N), bool)
        visible[rows, cols] = rolled[rows, cols]
        np.testing.assert_array_equal(out["masks"][k] > 0, visible)
        assert out["valid"][k] == (visible.sum() >= MIN_VISIBLE * 256)
    # Top-left: the object is whole (rows 0-16, cols 16-32 inside rows < 24, cols < 40).
    np.testing.assert_allclose(out["boxes"][0], [0, 16, 16, 32])
    assert out["valid"].tolist() == [True, False, False, False]


def test_mosaic_boxes_follow_their_objects():
    # Quadrant k shows the corner of sample order[k] that touches the centre: q0 its
    # bottom-right, q1 its bottom-left, q2 its top-right, q3 its top-left.
    samples = [sample([[4, 20, 20, 50]], 1.0),  # in q2, 18 of its 30 columns visible
               sample([[2, 50, 12, 62]], 2.0),  # in q3 but outside its top-left corner: gone
               sample([[40, 36, 60, 56]], 3.0),  # in q0, whole
               sample([[36, 10, 60, 36]], 4.0)]  # in q1, 22 of its 26 columns visible
    out = {k: v.numpy() for k, v in mosaic(samples, [2, 3, 0, 1], tf.constant([32, 32])).items()}
    # Objects come in quadrant order: samples 2, 3, 0, 1.
    assert out["valid"].tolist() == [True, True, True, False]
    np.testing.assert_allclose(out["boxes"][:3], [[8, 4, 28, 24], [4, 42, 28, 64], [36, 0, 52, 18]])
    for mask, box in zip(out["masks"][:3], out["boxes"][:3]):
        ys, xs = np.nonzero(mask)
        np.testing.assert_allclose(box, [ys.min(), xs.min(), ys.max() + 1, xs.max() + 1])
    np.testing.assert_array_equal(out["classes"], [0, 0, 0, 0])


@pytest.fixture(scope="module")
def mixed_config(shapes):
    _, overrides = shapes
    return load_config("configs/shapes_tiny.yaml", overrides + [
        "data.mosaic=0.5", "data.copy_paste=0.5", "data.large_scale_jitter=0.5", "data.deterministic=true",
    ])


def _scale_factors(decoded, data_config, size, seeds):
    """The scale factor (relative to the letterbox) augment drew for each seed, read from the
    boxes that the canvas does not clip (boxes are scaled exactly, masks are resampled)."""
    base = size / float(tf.reduce_max(decoded["original_size"]))
    heights = (decoded["boxes"][:, 2] - decoded["boxes"][:, 0]).numpy()
    factors = []
    for seed in seeds:
        out = augment(dict(decoded), size, data_config, tf.constant([seed, 0]))
        boxes = out["boxes"].numpy()
        inside = (boxes[:, :2] > 0.01).all(1) & (boxes[:, 2:] < size - 0.01).all(1)
        if inside.any() and len(boxes) == len(heights):
            factors.append((boxes[inside, 2] - boxes[inside, 0]) / (heights[inside] * base))
    return np.concatenate(factors)


def test_large_scale_jitter_draws_scales_from_its_range(mixed_config):
    builder = prepare_dataset(mixed_config.data)
    decoded = next(iter(builder.as_dataset(split="train").map(decode_example).filter(
        lambda d: tf.shape(d["boxes"])[0] > 0).take(1)))
    size = mixed_config.model.input_size
    plain = _scale_factors(decoded, dataclasses.replace(mixed_config.data, large_scale_jitter=0.0), size, range(30))
    low, high = mixed_config.data.scale_range
    assert plain.min() >= low - 1e-4 and plain.max() <= high + 1e-4
    jittered = _scale_factors(decoded, dataclasses.replace(mixed_config.data, large_scale_jitter=1.0), size, range(30))
    low, high = LARGE_SCALE_JITTER
    assert jittered.min() >= low - 1e-4 and jittered.max() <= high + 1e-4
    assert (jittered < 0.5).sum() >= 3 and (jittered > 1.3).sum() >= 1  # beyond data.scale_range both ways


def test_mixed_pipeline_is_deterministic_and_keeps_targets_consistent(mixed_config):
    config = mixed_config
    builder = prepare_dataset(config.data)
    runs = [list(config_train_dataset(config, builder).take(3)) for _ in range(2)]
    for (images_a, targets_a), (images_b, targets_b) in zip(*runs):
        np.testing.assert_array_equal(images_a.numpy(), images_b.numpy())
        for key in targets_a:
            np.testing.assert_array_equal(targets_a[key].numpy(), targets_b[key].numpy())
        assert float(tf.reduce_sum(targets_a["valid"])) > 0


@pytest.mark.parametrize("kind", ["mosaic", "copy_paste"])
def test_groups_of_images_without_objects_pass_through(kind):
    # `unbatch` of a zero-size tensor segfaults in TF 2.21: mixing must never hand it one.
    empty = {key: value for key, value in sample(np.zeros((0, 4), int), 7.0).items() if key != "valid"}
    dataset = mix_groups(tf.data.Dataset.from_tensors(empty).repeat(8), kind, 1.0, deterministic=True)
    outputs = list(dataset)
    assert len(outputs) == 8
    for out in outputs:
        assert out["masks"].shape == (0, N, N) and out["boxes"].shape == (0, 4)
        np.testing.assert_array_equal(out["image"].numpy(), 7.0)
