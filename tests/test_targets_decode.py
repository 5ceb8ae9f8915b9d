import numpy as np
import pytest
import tensorflow as tf

from centermask_tf.arch.centernet.decoder import decode_detections
from centermask_tf.arch.centernet.targets import encode_targets, gaussian_radius, target_spec
from centermask_tf.model.assembly import paste_masks

SIZE, STRIDE, CLASSES, SLOTS, P = 128, 4, 3, 16, 32
OUT = SIZE // STRIDE


def ellipse_masks(boxes, size=SIZE):
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    masks = []
    for ymin, xmin, ymax, xmax in boxes:
        cy, cx, ry, rx = (ymin + ymax) / 2, (xmin + xmax) / 2, (ymax - ymin) / 2, (xmax - xmin) / 2
        masks.append((((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).astype(np.uint8))
    return np.stack(masks)


def random_objects(rng, count):
    """Boxes >= 16 px whose centres fall in distinct output cells."""
    boxes, cells = [], set()
    while len(boxes) < count:
        h, w = rng.uniform(16, 60, 2)
        y, x = rng.uniform(0, SIZE - h), rng.uniform(0, SIZE - w)
        cell = (int((y + h / 2) / STRIDE), int((x + w / 2) / STRIDE))
        if cell not in cells:
            cells.add(cell)
            boxes.append([y, x, y + h, x + w])
    boxes = np.array(boxes, np.float32)
    return boxes, rng.integers(0, CLASSES, count).astype(np.int32), ellipse_masks(boxes)


def encode(boxes, classes, masks, crowd=None, **kwargs):
    crowd = np.zeros(len(boxes), bool) if crowd is None else crowd
    options = dict(input_size=SIZE, num_classes=CLASSES, max_instances=SLOTS, mask_size=P)
    options.update(kwargs)
    return {k: v.numpy() for k, v in encode_targets(boxes, classes, masks, crowd, **options).items()}


def perfect_outputs(targets, masks):
    """Head outputs that a perfect network would produce for these targets."""
    n = int(targets["valid"].sum())
    idx = targets["indices"][:n]
    heat = np.clip(targets["heatmap"], 1e-6, 1 - 1e-6)
    flat = lambda channels: np.zeros((OUT * OUT, channels), np.float32)  # noqa: E731
    offset, size, shape = flat(2), flat(2), flat(P * P)
    offset[idx], size[idx] = targets["offset"][:n], targets["size"][:n]
    shape[idx] = np.where(targets["masks"][:n].reshape(n, -1) > 0, 10.0, -10.0)
    union = masks.max(0).reshape(OUT, STRIDE, OUT, STRIDE).max((1, 3))
    outputs = {
        "heatmap": np.log(heat / (1 - heat)),
        "offset": offset.reshape(OUT, OUT, 2),
        "size": size.reshape(OUT, OUT, 2),
        "shape": shape.reshape(OUT, OUT, P * P),
        "saliency": np.where(union > 0, 10.0, -10.0)[..., None],
    }
    return {k: tf.constant(v[None], tf.float32) for k, v in outputs.items()}


def test_round_trip_recovers_boxes_classes_and_masks(rng):
    boxes, classes, masks = random_objects(rng, 8)
    targets = encode(boxes, classes, masks)
    detections = decode_detections(
        perfect_outputs(targets, masks), max_detections=20, score_threshold=0.5, mask_size=P
    )
    n = int(detections["num_detections"][0])
    assert n == len(boxes)
    found = detections["boxes"][0, :n].numpy()
    pasted = paste_masks(detections["masks"][:, :n], detections["boxes"][:, :n], SIZE, SIZE)
    pasted = pasted.numpy()[0] >= 0.4
    for box, cls, mask in zip(boxes, classes, masks):
        match = np.argmin(np.abs(found - box).sum(1))
        np.testing.assert_allclose(found[match] / STRIDE, box / STRIDE, atol=1.0)
        assert int(detections["classes"][0, match]) == cls
        iou = (pasted[match] & (mask > 0)).sum() / (pasted[match] | (mask > 0)).sum()
        assert iou >= 0.9, iou


def test_crowd_and_zero_area_never_positive_and_overflow_counted(rng):
    boxes, classes, masks = random_objects(rng, 5)
    boxes[1, 2] = boxes[1, 0]  # zero height
    crowd = np.array([False, False, True, False, False])
    targets = encode(boxes, classes, masks, crowd)
    assert targets["valid"].sum() == 3 and targets["dropped"] == 0
    assert (targets["heatmap"] == 1.0).sum() == 3
    crowd_centre = ((boxes[2, :2] + boxes[2, 2:]) / 2 / STRIDE).astype(int)
    assert targets["heatmap"][crowd_centre[0], crowd_centre[1], classes[2]] < 1.0

    many_boxes, many_classes, many_masks = random_objects(rng, SLOTS + 4)
    overflow = encode(many_boxes, many_classes, many_masks)
    assert overflow["valid"].sum() == SLOTS and overflow["dropped"] == 4


def test_heatmap_is_centernet_gaussian():
    box = np.array([[40.0, 40.0, 80.0, 72.0]], np.float32)  # 10 x 8 output pixels
    targets = encode(box, np.array([1]), ellipse_masks(box))
    radius = max(0, int(gaussian_radius(10.0, 8.0, 0.7)))
    sigma = (2 * radius + 1) / 6
    cy, cx = 15, 14
    heat = targets["heatmap"][..., 1]
    assert heat[cy, cx] == 1.0
    np.testing.assert_allclose(heat[cy, cx + 1], np.exp(-1 / (2 * sigma**2)), rtol=1e-6)
    assert heat[cy, cx + radius + 1] == 0.0 and heat[cy + radius, cx] > 0.0
    np.testing.assert_allclose(targets["offset"][0], [0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(targets["size"][0], [10.0, 8.0], atol=1e-6)
    assert targets["heatmap"][..., [0, 2]].max() == 0.0


def test_gaussian_radius_reference_values():
    # CenterNet's gaussian_radius((h, w), 0.7) for a few sizes, evaluated by hand from its
    # three roots: min(r1, r2, r3).
    for h, w in [(10, 8), (40, 40), (3, 50)]:
        mo = 0.7
        r1 = ((h + w) + np.sqrt((h + w) ** 2 - 4 * w * h * (1 - mo) / (1 + mo))) / 2
        r2 = (2 * (h + w) + np.sqrt((2 * (h + w)) ** 2 - 16 * (1 - mo) * w * h)) / 2
        r3 = (-2 * mo * (h + w) + np.sqrt((2 * mo * (h + w)) ** 2 - 16 * mo * (mo - 1) * w * h)) / 2
        np.testing.assert_allclose(gaussian_radius(h, w, mo), min(r1, r2, r3), rtol=1e-5)


def test_encode_in_tf_data_equals_eager_and_matches_spec(rng):
    boxes, classes, masks = random_objects(rng, 4)
    crowd = np.zeros(4, bool)
    eager = encode(boxes, classes, masks)
    options = dict(input_size=SIZE, num_classes=CLASSES, max_instances=SLOTS, mask_size=P)
    dataset = tf.data.Dataset.from_tensors((boxes, classes, masks, crowd)).map(
        lambda b, c, m, k: encode_targets(b, c, m, k, **options)
    )
    spec = target_spec(SIZE, CLASSES, SLOTS, P)
    assert {k: (v.shape, v.dtype) for k, v in dataset.element_spec.items()} == {
        k: (v.shape, v.dtype) for k, v in spec.items()
    }
    graph = next(iter(dataset))
    for key in eager:
        np.testing.assert_array_equal(graph[key].numpy(), eager[key])


def test_no_objects_gives_empty_targets():
    targets = encode(np.zeros((0, 4), np.float32), np.zeros(0, np.int32), np.zeros((0, SIZE, SIZE), np.uint8))
    assert targets["heatmap"].max() == 0.0 and targets["valid"].sum() == 0


@pytest.mark.parametrize("mode, mask_shape", [("box", (1, 5, P, P)), ("full", (1, 5, OUT, OUT))])
def test_decode_shapes(mode, mask_shape):
    outputs = {
        "heatmap": tf.random.normal([1, OUT, OUT, CLASSES]),
        "offset": tf.random.uniform([1, OUT, OUT, 2]),
        "size": tf.random.uniform([1, OUT, OUT, 2], 0, 10),
        "shape": tf.random.normal([1, OUT, OUT, P * P]),
        "saliency": tf.random.normal([1, OUT, OUT, CLASSES]),
    }
    detections = decode_detections(
        outputs, max_detections=5, score_threshold=0.0, mask_mode=mode, mask_size=P
    )
    assert tuple(detections["masks"].shape) == mask_shape
    scores = detections["scores"].numpy()[0]
    assert (np.diff(scores) <= 0).all() and int(detections["num_detections"][0]) == 5


def test_map_mask_targets_are_masks_at_output_resolution(rng):
    """`map_masks` (native assembly): each kept instance's mask, 4 x 4 blocks at least half
    covered, in the slot order of the other targets."""
    boxes, classes, masks = random_objects(rng, 5)
    targets = encode(boxes, classes, masks, map_masks=True)
    blocks = masks.reshape(5, OUT, STRIDE, OUT, STRIDE).mean((2, 4)) >= 0.5
    np.testing.assert_array_equal(targets["map_masks"][:5], blocks)
    assert targets["map_masks"][5:].max() == 0 and targets["map_masks"].shape == (SLOTS, OUT, OUT)
    assert "map_masks" not in encode(boxes, classes, masks)


def test_native_windows_hold_the_whole_native_mask(rng):
    """`native` decoding cuts from each full-map mask the window around its box, one cell of
    margin all round (edge cells repeated past the map): put back at `mask_boxes`, the
    windows rebuild the full maps exactly, and nothing of a mask is lost."""
    boxes, classes, masks = random_objects(rng, 6)
    boxes[0, :2] = 0.0  # a box at the map's corner: its margin repeats the edge cells
    outputs = perfect_outputs(encode(boxes, classes, masks), masks)
    outputs["shape"] += tf.constant(rng.normal(0, 1, outputs["shape"].shape), tf.float32)
    options = dict(max_detections=10, score_threshold=0.5, mask_size=P)
    full = decode_detections(outputs, mask_mode="full", **options)
    native = decode_detections(outputs, mask_mode="native", **options)
    n = int(native["num_detections"][0])
    windows, corners = native["masks"].numpy()[0], native["mask_boxes"].numpy()[0] / STRIDE
    size = windows.shape[-1]
    cy, cx, h, w = native["centres"].numpy()[0, :n].T
    top, left = np.clip(np.floor(cy - h / 2), 0, OUT - 1), np.clip(np.floor(cx - w / 2), 0, OUT - 1)
    assert n == 6 and size == np.maximum(np.ceil(cy + h / 2) - top, np.ceil(cx + w / 2) - left).max() + 2
    for k in range(n):
        np.testing.assert_allclose(corners[k, 2:] - corners[k, :2], [size, size])
        mask = full["masks"].numpy()[0, k]
        assert mask.sum() > 0
        rows = np.clip(np.arange(size) + int(corners[k, 0]), 0, OUT - 1)
        cols = np.clip(np.arange(size) + int(corners[k, 1]), 0, OUT - 1)
        np.testing.assert_array_equal(windows[k], mask[np.ix_(rows, cols)])
        rebuilt = np.zeros((OUT, OUT), np.float32)
        rebuilt[np.ix_(rows, cols)] = windows[k]
        np.testing.assert_array_equal(rebuilt, mask)
    for key in ("boxes", "scores", "classes"):
        np.testing.assert_array_equal(native[key], full[key])
