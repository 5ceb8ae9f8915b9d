"""CenterMask-FCOS pieces against numpy references and hand computations (issue 14)."""

import numpy as np
import pytest

from centermask_tf.data.fcos_targets import CENTRE_RADIUS, FCOS_RANGES, FCOS_STRIDES, fcos_locations, fcos_targets
from centermask_tf.losses import giou_loss

SIZE = 256


def reference_targets(boxes, classes, valid, size):
    """FCOS assignment one location and one box at a time."""
    points, strides, ranges = fcos_locations(size)
    labels = np.full(len(points), -1)
    ltrb = np.zeros((len(points), 4), np.float32)
    for k, ((y, x), stride, (low, high)) in enumerate(zip(points, strides, ranges)):
        best_area = np.inf
        for m, ((ymin, xmin, ymax, xmax), cls, ok) in enumerate(zip(boxes, classes, valid)):
            distances = np.array([x - xmin, y - ymin, xmax - x, ymax - y])
            cy, cx, reach = (ymin + ymax) / 2, (xmin + xmax) / 2, CENTRE_RADIUS * stride
            in_centre = (max(cy - reach, ymin) < y < min(cy + reach, ymax)
                         and max(cx - reach, xmin) < x < min(cx + reach, xmax))
            area = (ymax - ymin) * (xmax - xmin)
            if ok and in_centre and low <= distances.max() <= high and area < best_area:
                best_area, labels[k], ltrb[k] = area, cls, distances
    left, top, right, bottom = ltrb.T
    with np.errstate(invalid="ignore", divide="ignore"):
        centerness = np.sqrt(np.minimum(left, right) / np.maximum(left, right)
                             * np.minimum(top, bottom) / np.maximum(top, bottom))
    return labels, ltrb, np.where(labels >= 0, centerness, 0.0)


def test_locations_cover_each_level_row_major():
    points, strides, ranges = fcos_locations(SIZE)
    sides = [SIZE // s for s in FCOS_STRIDES]  # 32, 16, 8, 4, 2
    assert len(points) == sum(n * n for n in sides)
    np.testing.assert_array_equal(points[:3], [[4, 4], [4, 12], [4, 20]])  # P3: stride 8, from 4
    assert tuple(np.unique(strides)) == FCOS_STRIDES
    first_p7 = len(points) - 4
    np.testing.assert_array_equal(points[first_p7:], [[64, 64], [64, 192], [192, 64], [192, 192]])
    np.testing.assert_array_equal(ranges[first_p7], FCOS_RANGES[-1])


def test_targets_equal_the_per_location_reference(rng):
    """Random boxes of all sizes, overlapping, with padded slots: labels, distances and
    centerness equal a one-location-at-a-time reference."""
    n = 12
    centre = rng.uniform(0, SIZE, (n, 2))
    half = np.exp(rng.uniform(np.log(4), np.log(200), (n, 2)))
    boxes = np.clip(np.concatenate([centre - half, centre + half], -1), 0, SIZE).astype(np.float32)
    classes = rng.integers(0, 5, n).astype(np.int32)
    valid = (np.arange(n) < 10).astype(np.float32)  # two padded slots
    got = fcos_targets(boxes, classes, valid, SIZE)
    labels, ltrb, centerness = reference_targets(boxes, classes, valid, SIZE)
    assert (labels >= 0).sum() > 20  # a meaningful number of positives
    np.testing.assert_array_equal(got["labels"].numpy(), labels)
    np.testing.assert_allclose(got["ltrb"].numpy(), ltrb, atol=1e-4)
    np.testing.assert_allclose(got["centerness"].numpy(), centerness, atol=1e-5)
    matched = got["matched"].numpy()
    assert ((matched >= 0) == (labels >= 0)).all() and (matched < 10).all()


@pytest.mark.parametrize("side, level", [(100, 0), (180, 1), (360, 2)])
def test_level_assignment_follows_the_size_ranges(side, level):
    """A box centred on the canvas is positive only on the level whose range holds its
    half-extent (50 -> P3, 90 -> P4, 180 -> P5, at the canvas centre)."""
    size = 512
    c = size / 2
    boxes = np.array([[c - side / 2, c - side / 2, c + side / 2, c + side / 2]], np.float32)
    labels = fcos_targets(boxes, np.array([2], np.int32), np.ones(1, np.float32), size)["labels"].numpy()
    _, strides, _ = fcos_locations(size)
    positive_strides = set(strides[labels == 2].tolist())
    assert positive_strides == {FCOS_STRIDES[level]}


def test_centre_sampling_keeps_locations_near_the_centre():
    """A large box on P5 (stride 32, locations at 16 + 32 i): only the locations within 1.5
    strides of its centre, 3 x 3 of them, are positive, not every location inside the box;
    centerness is 1 at the centre and sqrt(128 / 192) one stride above it."""
    size = 512
    boxes = np.array([[80.0, 80.0, 400.0, 400.0]], np.float32)  # centre 240, half-extent 160
    got = fcos_targets(boxes, np.array([0], np.int32), np.ones(1, np.float32), size)
    points, strides, _ = fcos_locations(size)
    positive = got["labels"].numpy() == 0
    assert set(strides[positive].tolist()) == {32.0}
    assert positive.sum() == 9 and np.abs(points[positive] - 240).max() == 32
    centerness = got["centerness"].numpy()
    at = {tuple(p): c for p, c in zip(points[positive].tolist(), centerness[positive])}
    np.testing.assert_allclose([at[(240.0, 240.0)], at[(208.0, 240.0)]], [1.0, np.sqrt(128 / 192)], rtol=1e-6)


def test_giou_loss_equals_hand_computation():
    """Distances (l, t, r, b) from one location. Overlapping halves: I 2, U 6, C 6 -> GIoU 1/3.
    Corner overlap: I 1, U 7, C 9 -> GIoU 1/7 - 2/9. Identical boxes: loss 0."""
    predicted = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [2, 3, 4, 5]], np.float32)
    target = np.array([[2, 1, 0, 1], [0, 0, 2, 2], [2, 3, 4, 5]], np.float32)
    np.testing.assert_allclose(giou_loss(predicted, target).numpy(), [2 / 3, 1 - (1 / 7 - 2 / 9), 0.0], atol=1e-6)
