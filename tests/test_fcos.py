"""CenterMask-FCOS pieces against numpy references and hand computations (issue 14)."""

import json

import numpy as np
import pytest
import tensorflow as tf

from centermask_tf.arch import architecture, build_network
from centermask_tf.arch.fcos.decoder import (
    FcosDecoder,
    class_wise_nms,
    fcos_flip_averaged,
)
from centermask_tf.arch.fcos.losses import (
    compute_fcos_losses,
    giou_loss,
    sigmoid_focal_loss,
)
from centermask_tf.arch.fcos.network import LevelScale
from centermask_tf.arch.fcos.targets import (
    CENTRE_RADIUS,
    FCOS_RANGES,
    FCOS_STRIDES,
    encode_fcos_targets,
    fcos_locations,
    fcos_target_spec,
    fcos_targets,
    num_locations,
)
from centermask_tf.config import load_config
from centermask_tf.detector import CenterMask
from centermask_tf.model.assembly import assemble_box_masks
from centermask_tf.model.heads import network_factors
from tests.helpers import run_layer_test

CONFIG = "configs/shapes_fcos_tiny.yaml"

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


def reference_nms(boxes, scores, classes, max_output, iou_threshold, score_threshold):
    """Greedy class-wise NMS of one image, one box at a time: kept indices, best first."""
    def iou(a, b):
        inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        return inter / union

    kept = []
    for i in np.argsort(-scores, kind="stable"):
        if scores[i] <= score_threshold or len(kept) == max_output:
            break
        if all(classes[j] != classes[i] or iou(boxes[i], boxes[j]) <= iou_threshold for j in kept):
            kept.append(i)
    return kept


def test_class_wise_nms_equals_the_numpy_reference(rng):
    """Two images of 300 clustered, heavily overlapping boxes in 3 classes."""
    batch, count, size = 2, 300, 128.0
    centres = rng.uniform(20, 108, (batch, 12, 2))[:, rng.integers(0, 12, count)] + rng.normal(0, 3, (batch, count, 2))
    half = rng.uniform(4, 20, (batch, count, 2))
    boxes = np.clip(np.concatenate([centres - half, centres + half], -1), 0, size).astype(np.float32)
    scores = rng.uniform(0, 1, (batch, count)).astype(np.float32)
    classes = rng.integers(0, 3, (batch, count)).astype(np.int32)
    selected, counts = class_wise_nms(boxes, scores, classes, 50, 0.6, 0.05, size)
    for b in range(batch):
        expected = reference_nms(boxes[b], scores[b], classes[b], 50, 0.6, 0.05)
        assert 10 < len(expected) < 50 or len(expected) == 50
        assert int(counts[b]) == len(expected)
        np.testing.assert_array_equal(selected[b, : len(expected)].numpy(), expected)


def test_nms_suppresses_within_a_class_only():
    box = [10.0, 10.0, 40.0, 40.0]
    boxes = np.array([[box, [11.0, 10.0, 41.0, 40.0], box]], np.float32)  # IoU 0.94 with the first
    scores = np.array([[0.9, 0.8, 0.7]], np.float32)
    selected, count = class_wise_nms(boxes, scores, np.array([[0, 0, 1]], np.int32), 3, 0.6, 0.05, 64.0)
    assert int(count[0]) == 2 and selected[0, :2].numpy().tolist() == [0, 2]


def planted_outputs(size=64, classes=3, cells=4):
    """Outputs of a 64-px network with detections planted on P3: location (row 3, col 4) (point
    (28, 36)) class 1, and beside it (3, 5) the same class with a box IoU ~0.9 and a lower score,
    and (4, 4) class 2 with the first's box. Everything else scores sigmoid(-8)."""
    total = num_locations(size)
    logits = np.full((1, total, classes), -8.0, np.float32)
    centerness = np.zeros((1, total, 1), np.float32)
    box = np.full((1, total, 4), 2.0, np.float32)
    shape = np.random.default_rng(1).normal(0, 2, (1, total, cells * cells)).astype(np.float32)
    side = size // 8
    first, beside, below = 3 * side + 4, 3 * side + 5, 4 * side + 4
    logits[0, first, 1], logits[0, beside, 1], logits[0, below, 2] = 4.0, 3.0, 2.0
    box[0, first] = [10.0, 6.0, 14.0, 18.0]  # (l, t, r, b) -> (22, 26, 46, 50) around (28, 36)
    box[0, beside] = [19.0, 6.0, 5.0, 18.0]  # x 44: (22, 25, 46, 49)
    box[0, below] = [10.0, 14.0, 14.0, 10.0]  # y 36: the first's box
    saliency = np.random.default_rng(2).normal(0, 1, (1, size // 4, size // 4, 1)).astype(np.float32)
    outputs = {"classification": logits, "centerness": centerness, "box": box, "shape": shape, "saliency": saliency}
    return {k: tf.constant(v) for k, v in outputs.items()}, (first, below)


def test_decoder_boxes_scores_and_masks_of_planted_detections():
    outputs, (first, below) = planted_outputs()
    decoder = FcosDecoder(input_size=64, max_detections=5, score_threshold=0.05, mask_size=8)
    got = decoder(outputs)
    assert int(got["num_detections"][0]) == 2  # the neighbour of the same class is suppressed
    np.testing.assert_allclose(got["boxes"][0, :2], [[22, 26, 46, 50], [22, 26, 46, 50]], atol=1e-5)
    assert got["classes"][0, :2].numpy().tolist() == [1, 2]
    half = 1 / (1 + np.exp(-0.0))
    expected_scores = np.sqrt(1 / (1 + np.exp(-np.array([4.0, 2.0]))) * half)
    np.testing.assert_allclose(got["scores"][0, :2], expected_scores, rtol=1e-6)
    assert np.all(got["scores"][0, 2:].numpy() == 0) and np.all(got["masks"][0, 2:].numpy() == 0)
    # Each mask: its own location's Shape vector, the box in saliency pixels (stride 4).
    centre = tf.constant([[[34 / 4, 38 / 4, 24 / 4, 24 / 4]] * 2])
    shapes = tf.gather(outputs["shape"], [[first, below]], batch_dims=1)
    expected = assemble_box_masks(shapes, centre, outputs["saliency"], 8)
    np.testing.assert_allclose(got["masks"][0, :2], expected[0], atol=1e-6)
    np.testing.assert_allclose(got["centres"][0, :2], centre[0], atol=1e-6)
    clone = FcosDecoder.from_config(json.loads(json.dumps(decoder.get_config())))
    assert clone.get_config() == decoder.get_config()
    for key, value in clone(outputs).items():
        np.testing.assert_array_equal(value, got[key])


@pytest.mark.parametrize("size", [64, 96])
def test_flip_average_of_an_equivariant_network_equals_its_plain_outputs(size, rng):
    """What a flip-equivariant network gives on the mirror image, built from geometry: each
    location's box reflected (x -> N - x) and written as distances from the location that
    mirrors it (at 64 and 96 px P6/P7 overhang the canvas, so that location is not at N - x).
    Averaging it with the plain outputs gives the plain outputs back."""
    points, _, _ = fcos_locations(size)
    total = len(points)
    outputs = {
        "classification": rng.normal(0, 2, (1, total, 3)), "centerness": rng.normal(0, 1, (1, total, 1)),
        "box": rng.uniform(1, 40, (1, total, 4)), "shape": rng.normal(0, 1, (1, total, 16)),
        "saliency": rng.normal(0, 1, (1, size // 4, size // 4, 1)),
    }
    # The mirror image's location j holds what location i's mirror twin would: j mirrors i.
    mirror_of = np.empty(total, int)
    start = 0
    for stride in FCOS_STRIDES:
        side = -(-size // stride)
        index = np.arange(side * side).reshape(side, side)
        mirror_of[start + index[:, ::-1].ravel()] = start + index.ravel()
        start += side * side
    mirrored = {k: v.copy() for k, v in outputs.items()}
    for key in ("classification", "centerness", "shape", "box"):
        mirrored[key][0, mirror_of] = outputs[key][0]
    shape_grids = mirrored["shape"].reshape(1, total, 4, 4)
    mirrored["shape"] = shape_grids[..., ::-1].reshape(1, total, 16)
    left, top, right, bottom = np.moveaxis(outputs["box"][0], -1, 0)
    xmin, xmax = size - (points[:, 1] + right), size - (points[:, 1] - left)  # the reflected box
    x_mirror = points[mirror_of, 1]
    mirrored["box"][0, mirror_of] = np.stack([x_mirror - xmin, top, xmax - x_mirror, bottom], -1)
    mirrored["saliency"] = outputs["saliency"][:, :, ::-1]
    as_tensors = lambda d: {k: tf.constant(v, tf.float32) for k, v in d.items()}  # noqa: E731
    averaged = fcos_flip_averaged(as_tensors(outputs), as_tensors(mirrored), size)
    for key, value in outputs.items():
        np.testing.assert_allclose(averaged[key], value, atol=1e-4, err_msg=key)


def test_mask_samples_are_the_best_centred_positives():
    size = 128
    boxes = np.array([[10, 10, 50, 60], [60, 60, 120, 100], [0, 0, 0, 9]], np.float32)  # the last: no area
    masks = np.zeros((3, size, size), np.uint8)
    masks[0, 10:50, 10:60] = masks[1, 60:120, 60:100] = 1
    got = encode_fcos_targets(boxes, [0, 2, 1], masks, [False, False, False], input_size=size, max_instances=4,
                              mask_size=8, mask_samples=32)
    spec = fcos_target_spec(size, 4, 8, 32)
    assert {k: (tuple(v.shape), v.dtype) for k, v in got.items()} == {k: (tuple(v.shape), v.dtype) for k, v in spec.items()}
    located = fcos_targets(got["boxes"], got["classes"], got["valid"], size)
    labels, centerness, matched = (located[k].numpy() for k in ("labels", "centerness", "matched"))
    positives = int((labels >= 0).sum())
    count = int(got["sample_valid"].numpy().sum())
    assert count == min(32, positives) and positives > 10
    chosen = got["sample_locations"].numpy()[:count]
    assert (labels[chosen] >= 0).all()
    assert np.all(np.diff(centerness[chosen]) <= 0)  # best-centred first
    assert centerness[chosen].min() >= np.sort(centerness[labels >= 0])[::-1][count - 1]
    np.testing.assert_array_equal(got["sample_slots"].numpy()[:count], matched[chosen])
    assert got["valid"].numpy().tolist() == [1, 1, 0, 0] and int(got["dropped"]) == 0
    np.testing.assert_array_equal(got["masks"][0].numpy(), np.ones((8, 8)))  # a full rectangle in its box


def test_sigmoid_focal_loss_equals_hand_computation():
    """Logits (0, 2) for a class-1 location: class 0 negative at p 0.5 -> 0.75 * 0.5^2 * ln 2;
    class 1 positive at p = sigmoid(2) -> 0.25 * (1 - p)^2 * -ln p; a background location
    with logits (0, 0) -> 2 * 0.75 * 0.25 * ln 2."""
    p = 1 / (1 + np.exp(-2.0))
    expected = 0.75 * 0.25 * np.log(2) + 0.25 * (1 - p) ** 2 * -np.log(p) + 2 * 0.75 * 0.25 * np.log(2)
    got = sigmoid_focal_loss(tf.constant([[0.0, 2.0], [0.0, 0.0]]), tf.constant([1, -1]))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)


def test_losses_of_exact_boxes_and_centerness_are_their_minima():
    """Box outputs equal to the distance targets give GIoU loss 0; the centerness BCE equals its
    hand computation (logit 0 -> ln 2 per positive, whatever the target)."""
    size = 64
    boxes = np.array([[8, 8, 40, 30]], np.float32)
    masks = np.zeros((1, size, size), np.uint8)
    masks[0, 8:40, 8:30] = 1
    targets = encode_fcos_targets(boxes, [1], masks, [False], input_size=size, max_instances=2, mask_size=8,
                                  mask_samples=8)
    batch = {k: v[None] for k, v in targets.items()}
    total = num_locations(size)
    outputs = {
        "classification": tf.zeros([1, total, 3]), "centerness": tf.zeros([1, total, 1]),
        "box": batch["ltrb"], "shape": tf.zeros([1, total, 16]), "saliency": tf.zeros([1, 16, 16, 1]),
    }
    losses = compute_fcos_losses(outputs, batch)
    assert float(losses["box"]) == pytest.approx(0.0, abs=1e-6)
    assert float(losses["centerness"]) == pytest.approx(np.log(2), rel=1e-6)
    # Shape and saliency logits 0: every mask pixel 0.25; BCE against the full rectangle -ln 0.25.
    assert float(losses["mask"]) == pytest.approx(-np.log(0.25), rel=1e-4)
    worse = compute_fcos_losses({**outputs, "box": batch["ltrb"] * 1.5}, batch)
    assert float(worse["box"]) > 0.1
    # Saliency supervision: the box (8, 8, 40, 30) is (2, 2, 10, 7.5) at stride 4, so the target
    # is rows 2-9, columns 2-7; logits +-5 that match it everywhere cost log(1 + e^-5) per pixel.
    truth = np.zeros((1, 16, 16, 1), np.float32)
    truth[0, 2:10, 2:8] = 1
    supervised = compute_fcos_losses({**outputs, "saliency": tf.constant(10 * truth - 5)}, batch, {"saliency": 1.0})
    assert float(supervised["saliency"]) == pytest.approx(np.log1p(np.exp(-5)), rel=1e-4)


def test_network_outputs_cover_every_location_and_level_scale_round_trips(tmp_path):
    config = load_config(CONFIG, ["model.input_size=64", "model.head_conv=8", "model.width_multiplier=0.125"])
    network = build_network(config)
    outputs = network(np.zeros((2, 64, 64, 3), np.float32))
    total = num_locations(64)
    assert {k: tuple(v.shape) for k, v in outputs.items()} == {
        "classification": (2, total, 3), "centerness": (2, total, 1), "box": (2, total, 4),
        "shape": (2, total, 256), "saliency": (2, 16, 16, 1),
    }
    assert network_factors(network) == "both"
    assert network_factors(build_network(load_config(CONFIG, ["model.mask_factors=shape"]))) == "shape"
    layer = LevelScale(stride=16)
    run_layer_test(layer, [np.linspace(-1, 1, 32, dtype=np.float32).reshape(1, 2, 4, 4)], tmp_path)
    np.testing.assert_allclose(layer(tf.constant([[-1.0, 0.5]])), [[0.0, 8.0]])


@pytest.mark.parametrize("flip_test", [False, True])
def test_shape_conv_at_the_kept_detections_equals_the_dense_shape_head(flip_test):
    """Decoding runs the 1x1 Shape conv at the kept detections only (`inference_network` hands
    over the box tower's features): the same boxes, scores and masks as decoding the dense
    `[B, L, S*S]` Shape output, with and without the flip test, and no dense Shape in the graph."""
    config = load_config(CONFIG, ["model.input_size=64", "model.head_conv=8", "model.width_multiplier=0.125",
                                  f"eval.flip_test={str(flip_test).lower()}", "model.score_threshold=0.0"])
    tf.keras.utils.set_random_seed(0)
    detector = CenterMask(config)
    # Random Shape weights, so every location's grid differs and a wrong gather shows.
    conv = detector.network.get_layer("shape")
    conv.kernel.assign(np.random.default_rng(0).normal(0, 0.5, conv.kernel.shape))
    canvases = tf.constant(np.random.default_rng(1).uniform(0, 255, (2, 64, 64, 3)), tf.float32)
    assert "shape_features" in detector.inference_network.output and detector.shape_head is conv
    sparse = detector.decode(canvases)
    decoder = FcosDecoder.from_model_config(config.model)
    if flip_test:
        both = detector.network(tf.concat([canvases, tf.reverse(canvases, axis=[2])], axis=0))
        dense = decoder({k: v[:2] for k, v in both.items()}, mirrored={k: v[2:] for k, v in both.items()})
    else:
        dense = decoder(detector.network(canvases))
    assert int(tf.reduce_min(sparse["num_detections"])) == config.model.max_detections
    for key in ("boxes", "scores", "classes", "num_detections"):
        np.testing.assert_array_equal(sparse[key], dense[key], err_msg=key)
    masks = sparse["masks"].numpy()
    np.testing.assert_allclose(masks, dense["masks"], atol=1e-5)
    assert masks.std(axis=(2, 3)).mean() > 0.01  # masks with structure, not constant blobs

    def shapes_in_graph(function):
        graph = tf.function(function).get_concrete_function(tf.TensorSpec([1, 64, 64, 3])).graph
        return {tuple(t.shape.as_list()[1:]) for op in graph.get_operations() for t in op.outputs if t.shape.rank == 3}

    dense_shape = (num_locations(64), 256)
    assert dense_shape in shapes_in_graph(detector.network) and dense_shape not in shapes_in_graph(detector.decode)


def upsample2_bilinear(maps):
    """x2 bilinear upsampling of `[B, H, W, C]` with half-pixel centres, one axis at a time:
    output i samples input (i + 0.5) / 2 - 0.5, clamped to the map."""
    for axis in (1, 2):
        n = maps.shape[axis]
        source = np.clip((np.arange(2 * n) + 0.5) / 2 - 0.5, 0, n - 1)
        low = np.floor(source).astype(int)
        high, weight = np.minimum(low + 1, n - 1), source - low
        shape = [1, 1, 1, 1]
        shape[axis] = 2 * n
        weight = weight.reshape(shape)
        maps = np.take(maps, low, axis=axis) * (1 - weight) + np.take(maps, high, axis=axis) * weight
    return maps


def test_saliency_head_on_p3_upsamples_its_logits_at_a_quarter_of_the_work():
    """`model.saliency_stride=8`: the saliency output is the head's logits on P3, bilinearly
    upsampled x2 (a numpy reference), and the network costs three quarters of the stride-4 head
    less (counted on the graph against the head's conv sizes); CenterNet refuses the setting."""
    import keras

    from centermask_tf.tools.flops import model_flops

    size, channels, classes = 64, 16, 3
    base = ["model.input_size=64", f"model.head_conv={channels}", "model.width_multiplier=0.125",
            "model.saliency=specific"]
    dense = build_network(load_config(CONFIG, base))
    p3 = build_network(load_config(CONFIG, [*base, "model.saliency_stride=8"]))
    head = p3.get_layer("saliency")
    images = np.random.default_rng(0).uniform(0, 255, (2, size, size, 3)).astype(np.float32)
    features = keras.Model(p3.input, head.input)(images)
    assert features.shape == (2, size // 8, size // 8, channels)
    got = p3(images)["saliency"].numpy()
    assert got.shape == (2, size // 4, size // 4, classes)
    np.testing.assert_allclose(got, upsample2_bilinear(head(features).numpy()), atol=1e-5)
    # Per output pixel the head is a 3x3 conv C -> C (with bias) and a 1x1 conv C -> classes.
    per_pixel = 2 * (9 * channels * channels + channels * classes) + channels + classes
    saved = per_pixel * ((size // 4) ** 2 - (size // 8) ** 2)
    assert model_flops(dense) - model_flops(p3) == pytest.approx(saved, rel=0.02)
    with pytest.raises(ValueError, match="model.saliency_stride applies to model.type=fcos"):
        architecture(load_config("configs/shapes_tiny.yaml", ["model.saliency_stride=8"]).model)


@pytest.mark.parametrize("override, message", [
    ("model.backbone=dla34", "resnet18, resnet50, resnet101 or keras_hub"),
    ("model.assembly=native", "model.assembly"),
    ("model.neck=skip", "model.neck"),
])
def test_fcos_settings_it_does_not_support_are_refused(override, message):
    config = load_config(CONFIG, [override])
    with pytest.raises(ValueError, match=message):
        architecture(config.model)
    with pytest.raises(ValueError, match=message):
        CenterMask(config)


def test_pipeline_yields_fcos_targets(shapes):
    from centermask_tf.data.tfds_builder import prepare_dataset
    from centermask_tf.training.setup import config_train_dataset

    _, overrides = shapes
    config = load_config(CONFIG, overrides + ["model.mask_samples=16"])
    images, targets = next(iter(config_train_dataset(config, prepare_dataset(config.data))))
    spec = fcos_target_spec(64, 8, 8, 16)
    assert {k: (v.shape.as_list(), v.dtype) for k, v in targets.items()} == {
        k: ([4, *v.shape], v.dtype) for k, v in spec.items()
    }
    assert images.shape == (4, 64, 64, 3)
    assert (targets["labels"].numpy() >= 0).sum() > 0 and targets["sample_valid"].numpy().sum() > 0


@pytest.mark.slow
def test_train_evaluate_and_ablate_an_fcos_model(shapes, tmp_path, capsys):
    """`train` (falling loss), `evaluate` (bbox and segm AP), `ablate` (three mask modes)."""
    import csv

    from centermask_tf.cli import main
    from tests.helpers import train_args

    _, overrides = shapes
    args = train_args(shapes, tmp_path, "train.epochs=4", "train.steps_per_epoch=6", config=CONFIG)
    assert main(args) == 0
    with open(tmp_path / "history.csv") as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f)]
    assert {"classification_loss", "centerness_loss", "box_loss", "mask_loss"} <= set(
        json.loads((tmp_path / "state.json").read_text())["history"][0])
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    evaluate = ["evaluate", "--config", CONFIG, "--workdir", str(tmp_path)]
    for override in overrides + ["model.score_threshold=0.0"]:
        evaluate += ["--set", override]
    assert main(evaluate) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(metrics) == {"bbox", "segm", "best_f1_score_threshold"}
    assert all(0 <= metrics[t]["AP"] <= 1 for t in ("bbox", "segm"))
    assert "segm  AP" in capsys.readouterr().out
    assert main(["ablate", "--workdir", str(tmp_path), "--images", "1"]) == 0
    assert set(json.loads((tmp_path / "ablate" / "ablation.json").read_text())["metrics"]) == {"shape", "saliency", "both"}
