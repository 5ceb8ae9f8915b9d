import keras
import numpy as np
import pytest

from centermask_tf.export.tflite import keras_to_tflite, non_builtin_ops, run_tflite
from centermask_tf.model.assembly import MaskAssembly, assemble_box_masks, assemble_masks, paste_masks
from tests.helpers import run_layer_test

B, K, S, H, W, M = 2, 6, 8, 24, 20, 12


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def bilinear(grid, u, v):
    """Bilinear sample of a 2-D numpy grid at cell coordinates (u, v), edges clamped."""
    u = np.clip(u, 0, grid.shape[0] - 1)
    v = np.clip(v, 0, grid.shape[1] - 1)
    u0, v0 = int(np.floor(u)), int(np.floor(v))
    u1, v1 = min(u0 + 1, grid.shape[0] - 1), min(v0 + 1, grid.shape[1] - 1)
    fu, fv = u - u0, v - v0
    return (
        (1 - fu) * (1 - fv) * grid[u0, v0]
        + (1 - fu) * fv * grid[u0, v1]
        + fu * (1 - fv) * grid[u1, v0]
        + fu * fv * grid[u1, v1]
    )


def resize_onto_box(grid, box, height, width):
    """Per-pixel bilinear resize of a square numpy grid onto a (cy, cx, h, w) box; NaN outside."""
    cells = grid.shape[0]
    cy, cx, h, w = box
    out = np.full((height, width), np.nan)
    for i in range(height):
        ry = (i + 0.5 - (cy - h / 2)) / h
        for j in range(width):
            rx = (j + 0.5 - (cx - w / 2)) / w
            if 0 <= ry <= 1 and 0 <= rx <= 1:
                out[i, j] = bilinear(grid, ry * cells - 0.5, rx * cells - 0.5)
    return out


def reference_full(shape, box, saliency, factors="both"):
    """Independent reference: resize of the S x S logits onto the box, x saliency, 0 outside
    (one of the two alone for `factors` shape / saliency)."""
    cells = int(np.sqrt(shape.size))
    local = resize_onto_box(shape.reshape(cells, cells), box, *saliency.shape)
    inside = np.where(np.isnan(local), 0.0, 1.0)
    local = sigmoid(np.nan_to_num(local)) if factors != "saliency" else 1.0
    return inside * local * (sigmoid(saliency) if factors != "shape" else 1.0)


def reference_box(shape, box, saliency, size, factors="both"):
    cells = int(np.sqrt(shape.size))
    grid = shape.reshape(cells, cells)
    cy, cx, h, w = box
    out = np.zeros((size, size))
    for m in range(size):
        for n in range(size):
            local = bilinear(grid, (m + 0.5) * cells / size - 0.5, (n + 0.5) * cells / size - 0.5)
            y = cy - h / 2 + (m + 0.5) / size * h
            x = cx - w / 2 + (n + 0.5) / size * w
            crop = bilinear(saliency, y - 0.5, x - 0.5)
            out[m, n] = {"both": sigmoid(local) * sigmoid(crop), "shape": sigmoid(local), "saliency": sigmoid(crop)}[factors]
    return out


def leave_out(shape, saliency, factors):
    """The Shape / saliency inputs of an assembly with `factors` (None: not a factor)."""
    return (None if factors == "saliency" else shape), (None if factors == "shape" else saliency)


@pytest.fixture
def case(rng):
    shape = rng.normal(0, 2, (B, K, S * S)).astype(np.float32)
    boxes = np.stack(
        [
            rng.uniform(-2, H + 2, (B, K)),
            rng.uniform(-2, W + 2, (B, K)),
            rng.uniform(0.5, 18, (B, K)),
            rng.uniform(0.5, 18, (B, K)),
        ],
        axis=-1,
    ).astype(np.float32)
    saliency = rng.normal(0, 2, (B, H, W, 1)).astype(np.float32)
    return shape, boxes, saliency


FACTORS = ["both", "shape", "saliency"]


@pytest.mark.parametrize("factors", FACTORS)
def test_full_masks_match_reference(case, factors):
    """`full` is the native assembly: each mask at output-map resolution inside its box."""
    shape, boxes, saliency = case
    shape_in, saliency_in = leave_out(shape, saliency, factors)
    masks = assemble_masks(shape_in, boxes, saliency_in, map_size=(H, W)).numpy()
    assert masks.shape == (B, K, H, W)
    for b in range(B):
        for k in range(K):
            expected = reference_full(shape[b, k], boxes[b, k], saliency[b, :, :, 0], factors)
            np.testing.assert_allclose(masks[b, k], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("factors", FACTORS)
def test_box_masks_match_reference(case, factors):
    """`shape`: sigmoid of the resized Local Shape alone; `saliency`: sigmoid of the crop alone."""
    shape, boxes, saliency = case
    shape_in, saliency_in = leave_out(shape, saliency, factors)
    masks = assemble_box_masks(shape_in, boxes, saliency_in, M).numpy()
    for b in range(B):
        for k in range(K):
            expected = reference_box(shape[b, k], boxes[b, k], saliency[b, :, :, 0], M, factors)
            np.testing.assert_allclose(masks[b, k], expected, atol=1e-5, rtol=0)


def test_a_mask_needs_a_factor(case):
    with pytest.raises(ValueError, match="at least one factor"):
        assemble_box_masks(None, case[1], None, M)


@pytest.mark.parametrize("mode", ["full", "box"])
def test_k_at_once_equals_k_single_runs(case, mode):
    shape, boxes, saliency = case
    layer = MaskAssembly(mode=mode, mask_size=M)
    together = layer(shape, boxes, saliency).numpy()
    for k in range(K):
        single = layer(shape[:, k : k + 1], boxes[:, k : k + 1], saliency).numpy()
        np.testing.assert_allclose(together[:, k : k + 1], single, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["full", "box"])
def test_class_specific_saliency_uses_each_instance_channel(case, rng, mode):
    shape, boxes, _ = case
    saliency = rng.normal(0, 2, (B, H, W, 3)).astype(np.float32)
    classes = rng.integers(0, 3, (B, K)).astype(np.int32)
    layer = MaskAssembly(mode=mode, mask_size=M)
    masks = layer(shape, boxes, saliency, classes).numpy()
    for b in range(B):
        for k in range(K):
            channel = saliency[b : b + 1, :, :, classes[b, k] : classes[b, k] + 1]
            single = layer(shape[b : b + 1, k : k + 1], boxes[b : b + 1, k : k + 1], channel)
            np.testing.assert_allclose(masks[b, k], single.numpy()[0, 0], atol=1e-6, rtol=0)


def test_zero_size_box_gives_empty_mask(case):
    shape, boxes, saliency = case
    boxes = boxes.copy()
    boxes[:, :, 2:] = 0.0
    masks = assemble_masks(shape, boxes, saliency).numpy()
    assert np.isfinite(masks).all() and masks.max() == 0.0


@pytest.mark.parametrize("mode, shape_out", [("full", (B, K, H, W)), ("box", (B, K, M, M))])
def test_layer_config_xla_and_saving(case, tmp_path, mode, shape_out):
    run_layer_test(MaskAssembly(mode=mode, mask_size=M), list(case), tmp_path, shape_out, atol=1e-5)


def test_tflite_builtins_only_matches_keras(case):
    shape, boxes, saliency = case
    inputs = [
        keras.Input((K, S * S), batch_size=1, name="shape"),
        keras.Input((K, 4), batch_size=1, name="boxes"),
        keras.Input((H, W, 1), batch_size=1, name="saliency"),
    ]
    outputs = {
        "full": MaskAssembly(mode="full")(*inputs),
        "box": MaskAssembly(mode="box", mask_size=M)(*inputs),
    }
    model = keras.Model(inputs, outputs)
    content = keras_to_tflite(model)
    assert non_builtin_ops(content) == set()
    got = run_tflite(content, {"shape": shape[:1], "boxes": boxes[:1], "saliency": saliency[:1]})
    expected = model([shape[:1], boxes[:1], saliency[:1]])
    by_shape = {v.shape: v for v in got.values()}
    for name in ("full", "box"):
        np.testing.assert_allclose(by_shape[tuple(expected[name].shape)], expected[name], atol=1e-5)


def test_paste_masks_matches_reference(case):
    """With M = S and saturated saliency the box mask is exactly sigmoid(shape); pasting it is a
    bilinear resize of those probabilities onto the box."""
    shape, boxes, _ = case
    box_masks = assemble_box_masks(shape, boxes, np.full((B, H, W, 1), 50.0, np.float32), S)
    np.testing.assert_allclose(box_masks, sigmoid(shape).reshape(B, K, S, S), atol=1e-6)
    cy, cx, h, w = np.moveaxis(boxes, -1, 0)
    corners = np.stack([cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2], -1)
    pasted = paste_masks(box_masks, corners, H, W).numpy()
    for b in range(B):
        for k in range(K):
            expected = resize_onto_box(box_masks[b, k].numpy(), boxes[b, k], H, W)
            np.testing.assert_allclose(pasted[b, k], np.nan_to_num(expected, nan=0.0), atol=1e-5)


def test_paste_instances_equals_paste_masks_on_the_image(rng):
    """Evaluation pastes each mask on its box's pixels only (numpy, per detection); the result
    is `paste_masks` on the whole image, thresholded, also for boxes partly outside it."""
    from centermask_tf.postprocess import paste_instances

    height, width, n = 37, 53, 9
    box_masks = rng.uniform(0, 1, (n, M, M)).astype(np.float32)
    ymin, xmin = rng.uniform(-10, height, n), rng.uniform(-10, width, n)
    boxes = np.stack([ymin, xmin, ymin + rng.uniform(0, 30, n), xmin + rng.uniform(0, 40, n)], -1).astype(np.float32)
    boxes[0] = [5.0, 5.0, 5.0, 20.0]  # zero height
    expected = paste_masks(box_masks[None], boxes[None], height, width).numpy()[0] >= 0.5
    got = paste_instances(box_masks, boxes, height, width, 0.5)
    assert len(got) == n and sum(e.sum() for e in expected) > 100
    for mask, want in zip(got, expected):
        assert (mask.full(height, width).astype(bool) != want).sum() <= 1  # float rounding at 0.5



def test_box_mask_rles_equal_pasting_then_encoding(rng):
    """Evaluation's RLEs come straight from the box masks (the threshold crossings down each
    column): equal to pasting every pixel and encoding, over random boxes partly outside the
    image, boxes smaller than the mask (several cells per pixel), zero-height boxes, full-height
    boxes (runs joining across columns), masks reaching the last pixel, thresholds of 0 and 1
    and masks of 1, 2 and 16 cells."""
    import pycocotools.mask as mask_utils

    from centermask_tf.postprocess import box_mask_rles, encode_instances, paste_instances

    checked = 0
    for trial in range(150):
        height, width = (int(v) for v in rng.integers(5, 60, 2))
        n, cells = int(rng.integers(1, 10)), int(rng.choice([1, 2, 16]))
        box_masks = rng.uniform(0, 1, (n, cells, cells)).astype(np.float32)
        if trial % 3 == 0:  # flat tops and zeros, as trained masks have
            box_masks = np.clip(1.5 - rng.uniform(0, 3, (n, cells, cells)), 0, 1).astype(np.float32)
        ymin, xmin = rng.uniform(-10, height, n), rng.uniform(-10, width, n)
        boxes = np.stack([ymin, xmin, ymin + rng.uniform(0, 50, n), xmin + rng.uniform(0, 50, n)], -1)
        if trial % 4 == 0:
            boxes[0], box_masks[0] = [-3, -2, height + 5, width + 4], 1.0
        if trial % 5 == 0:
            boxes[-1] = [0, 3, height, 9] if trial % 10 else [4, 4, 4, 20]
        threshold = float(rng.choice([0.5, 0.0, 0.3, 1.0]))
        expected = encode_instances(paste_instances(box_masks, boxes, height, width, threshold), height, width)
        got = box_mask_rles(box_masks, boxes, height, width, threshold)
        assert got == expected, trial
        checked += int((mask_utils.area(got) > 0).sum())
    assert checked > 300 and box_mask_rles(np.zeros((0, 4, 4)), np.zeros((0, 4)), 9, 9, 0.5) == []


def test_encode_instances_equals_pycocotools_on_full_masks(rng):
    """RLE from the crops alone equals pycocotools' encoding of the full-size masks, also for
    empty crops, crops spanning the full height (runs joining across columns) and crops
    reaching the last pixel."""
    import pycocotools.mask as mask_utils

    from centermask_tf.postprocess import InstanceMask, encode_instances

    height, width = 37, 29
    masks = []
    for k in range(200):
        top, left = int(rng.integers(0, height)), int(rng.integers(0, width))
        rows, cols = int(rng.integers(0, height - top + 1)), int(rng.integers(0, width - left + 1))
        if k % 5 == 0:
            top, rows = 0, height
        crop = rng.uniform(size=(rows, cols)) > rng.uniform(0.2, 0.9)
        if k % 7 == 0:
            crop[:] = True
        masks.append(InstanceMask(top, left, crop))
    masks.append(InstanceMask(0, 0, np.ones((height, width), bool)))
    got = encode_instances(masks, height, width)
    assert len(got) == len(masks)
    for mask, rle in zip(masks, got):
        assert rle == mask_utils.encode(mask.full(height, width))
