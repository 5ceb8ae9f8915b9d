import numpy as np
import tensorflow as tf

from centermask_tf.arch.centernet.losses import compute_losses, focal_loss
from centermask_tf.arch.shared_losses import saliency_target
from centermask_tf.model.assembly import assemble_box_masks, paste_masks
from tests.test_targets_decode import CLASSES, OUT, P, encode, perfect_outputs, random_objects


def numpy_focal(logits, target, num_objects):
    p = np.clip(1 / (1 + np.exp(-logits.astype(np.float64))), 1e-4, 1 - 1e-4)
    pos = target == 1
    pos_term = np.log(p) * (1 - p) ** 2 * pos
    neg_term = np.log(1 - p) * p**2 * (1 - target) ** 4 * ~pos
    return -(pos_term.sum() + neg_term.sum()) / max(num_objects, 1)


def batch(targets):
    return {k: tf.constant(v[None]) for k, v in targets.items()}


def random_outputs(rng, dtype=tf.float32):
    shapes = {"heatmap": CLASSES, "offset": 2, "size": 2, "shape": P * P, "saliency": 1}
    return {k: tf.constant(rng.normal(0, 3, (1, OUT, OUT, c)), dtype) for k, c in shapes.items()}


def test_focal_loss_equals_numpy_formula(rng):
    target = rng.uniform(0, 0.99, (2, 6, 7, 3)).astype(np.float32)
    target[0, 2, 3, 1] = target[1, 4, 4, 0] = target[1, 0, 6, 2] = 1.0
    logits = rng.normal(0, 3, target.shape).astype(np.float32)
    got = focal_loss(logits, target, 3.0).numpy()
    np.testing.assert_allclose(got, numpy_focal(logits, target, 3), rtol=1e-5)


def test_regression_and_mask_terms_equal_hand_computation(rng):
    boxes, classes, masks = random_objects(rng, 5)
    targets = encode(boxes, classes, masks)
    outputs = random_outputs(rng)
    losses = {k: v.numpy() for k, v in compute_losses(outputs, batch(targets)).items()}
    n = 5
    idx = targets["indices"][:n]
    flat = {k: v.numpy()[0].reshape(OUT * OUT, -1) for k, v in outputs.items()}
    np.testing.assert_allclose(
        losses["offset"], np.abs(flat["offset"][idx] - targets["offset"][:n]).sum() / n, rtol=1e-5
    )
    np.testing.assert_allclose(
        losses["size"], np.abs(flat["size"][idx] - targets["size"][:n]).sum() / n, rtol=1e-5
    )
    centres = np.stack([idx // OUT, idx % OUT], -1) + targets["offset"][:n]
    gt_boxes = np.concatenate([centres, targets["size"][:n]], -1)[None].astype(np.float32)
    prob = assemble_box_masks(flat["shape"][idx][None], gt_boxes, outputs["saliency"], P).numpy()
    prob = np.clip(prob[0], 1e-4, 1 - 1e-4)
    truth = targets["masks"][:n].astype(np.float64)
    bce = -(truth * np.log(prob) + (1 - truth) * np.log(1 - prob)).mean((1, 2)).sum() / n
    np.testing.assert_allclose(losses["mask"], bce, rtol=1e-4)
    weighted = losses["heatmap"] + losses["offset"] + 0.1 * losses["size"] + losses["mask"]
    np.testing.assert_allclose(losses["total"], weighted, rtol=1e-5)


def test_perfect_outputs_give_small_losses(rng):
    boxes, classes, masks = random_objects(rng, 5)
    targets = encode(boxes, classes, masks)
    losses = compute_losses(perfect_outputs(targets, masks), batch(targets))
    random_losses = compute_losses(random_outputs(rng), batch(targets))
    assert float(losses["offset"]) < 1e-6 and float(losses["size"]) < 1e-6
    assert float(losses["mask"]) < 0.1 < float(random_losses["mask"])
    assert float(losses["heatmap"]) < 0.1 * float(random_losses["heatmap"])


def test_losses_finite_with_zero_objects_and_in_float16(rng):
    empty = encode(np.zeros((0, 4), np.float32), np.zeros(0, np.int32), np.zeros((0, 128, 128)))
    for dtype in (tf.float32, tf.float16):
        losses = compute_losses(random_outputs(rng, dtype), batch(empty))
        assert all(np.isfinite(v.numpy()) for v in losses.values())
        assert float(losses["offset"]) == float(losses["size"]) == float(losses["mask"]) == 0.0
    boxes, classes, masks = random_objects(rng, 3)
    targets = batch(encode(boxes, classes, masks))
    outputs = random_outputs(rng)
    full = compute_losses(outputs, targets)
    half = compute_losses({k: tf.cast(v * 10, tf.float16) / 10 for k, v in outputs.items()}, targets)
    for name in full:
        assert np.isfinite(half[name].numpy())
        np.testing.assert_allclose(half[name], full[name], rtol=0.05)


def test_ops_index_and_box_helpers():
    from centermask_tf.ops import centre_to_corners, corners_to_centre, flat_index, gather_at, unflatten_index

    rows, cols = unflatten_index(tf.constant([0, 7, 23]), 5)
    assert rows.numpy().tolist() == [0, 1, 4] and cols.numpy().tolist() == [0, 2, 3]
    assert flat_index(rows, cols, 5).numpy().tolist() == [0, 7, 23]
    feature_map = tf.reshape(tf.range(2 * 4 * 5 * 3, dtype=tf.float32), [2, 4, 5, 3])
    gathered = gather_at(feature_map, tf.constant([[7, 0], [19, 3]]))
    np.testing.assert_array_equal(gathered.numpy()[1, 0], feature_map.numpy()[1, 3, 4])
    np.testing.assert_array_equal(gathered.numpy()[0, 0], feature_map.numpy()[0, 1, 2])
    corners = tf.constant([[2.0, 4.0, 10.0, 7.0]])
    np.testing.assert_allclose(corners_to_centre(corners).numpy(), [[6.0, 5.5, 8.0, 3.0]])
    np.testing.assert_allclose(centre_to_corners(corners_to_centre(corners)).numpy(), corners.numpy())


def numpy_bce(prob, truth):
    prob = np.clip(prob, 1e-4, 1 - 1e-4)
    return -(truth * np.log(prob) + (1 - truth) * np.log(1 - prob))


def test_mask_loss_uses_only_the_networks_factors(rng):
    """Without a Saliency head the mask is sigmoid(resized Local Shape) alone, and without a
    Shape head the sigmoid of the saliency crop alone."""
    boxes, classes, masks = random_objects(rng, 4)
    targets = encode(boxes, classes, masks)
    outputs = random_outputs(rng)
    idx = targets["indices"][:4]
    centres = np.stack([idx // OUT, idx % OUT], -1) + targets["offset"][:4]
    gt_boxes = np.concatenate([centres, targets["size"][:4]], -1)[None].astype(np.float32)
    shape_vectors = outputs["shape"].numpy()[0].reshape(OUT * OUT, -1)[idx][None]
    truth = targets["masks"][:4].astype(np.float64)
    for missing, factors in (("saliency", (shape_vectors, None)), ("shape", (None, outputs["saliency"]))):
        kept = {k: v for k, v in outputs.items() if k != missing}
        prob = assemble_box_masks(factors[0], gt_boxes, factors[1], P).numpy()[0]
        expected = numpy_bce(prob, truth).mean((1, 2)).sum() / 4
        np.testing.assert_allclose(compute_losses(kept, batch(targets))["mask"], expected, rtol=1e-4)


def test_saliency_supervision_is_bce_against_the_union_of_masks(rng):
    boxes, classes, masks = random_objects(rng, 5)
    targets = batch(encode(boxes, classes, masks))
    outputs = random_outputs(rng)
    # Hand computation: each box-relative target mask pasted on the output map, then the union.
    centres = tf.cast(tf.stack([targets["indices"] // OUT, targets["indices"] % OUT], -1), tf.float32)
    centres += targets["offset"]
    corners = tf.concat([centres - targets["size"] / 2, centres + targets["size"] / 2], -1)
    pasted = paste_masks(tf.cast(targets["masks"], tf.float32), corners, OUT, OUT).numpy()[0, :5] >= 0.5
    union = pasted.any(0)
    assert 0 < union.mean() < 1
    np.testing.assert_array_equal(saliency_target(targets, OUT, OUT, 1, corners).numpy()[0, ..., 0], union)
    per_class = saliency_target(targets, OUT, OUT, CLASSES, corners).numpy()[0]
    for c in range(CLASSES):
        np.testing.assert_array_equal(per_class[..., c], pasted[classes[:5] == c].any(0))

    native = batch(encode(boxes, classes, masks, map_masks=True))  # the output-resolution masks
    np.testing.assert_array_equal(saliency_target(native, OUT, OUT, 1).numpy()[0, ..., 0],
                                  native["map_masks"].numpy()[0, :5].any(0))

    losses = compute_losses(outputs, targets, {"saliency": 0.5})
    prob = 1 / (1 + np.exp(-outputs["saliency"].numpy()[0, ..., 0].astype(np.float64)))
    np.testing.assert_allclose(losses["saliency"], numpy_bce(prob, union).mean(), rtol=1e-5)
    without = compute_losses(outputs, targets)
    assert "saliency" not in without
    np.testing.assert_allclose(losses["total"], without["total"] + 0.5 * losses["saliency"], rtol=1e-5)


def test_native_mask_loss_is_per_pixel_bce_inside_each_box(rng):
    """`model.assembly: native`: the mask is assembled on the output map and compared with the
    output-resolution mask pixel by pixel, over the pixels inside the box, per instance."""
    from centermask_tf.model.assembly import assemble_masks, inside_boxes

    boxes, classes, masks = random_objects(rng, 4)
    targets = encode(boxes, classes, masks, map_masks=True)
    outputs = random_outputs(rng)
    idx = targets["indices"][:4]
    centres = np.stack([idx // OUT, idx % OUT], -1) + targets["offset"][:4]
    gt_boxes = np.concatenate([centres, targets["size"][:4]], -1)[None].astype(np.float32)
    shape_vectors = outputs["shape"].numpy()[0].reshape(OUT * OUT, -1)[idx][None]
    prob = assemble_masks(shape_vectors, gt_boxes, outputs["saliency"]).numpy()[0]
    inside = inside_boxes(gt_boxes, OUT, OUT).numpy()[0]
    assert 0 < inside.mean() < 1 and prob[inside == 0].max() == 0
    per_pixel = numpy_bce(prob, targets["map_masks"][:4].astype(np.float64))
    expected = ((per_pixel * inside).sum((1, 2)) / inside.sum((1, 2))).sum() / 4
    np.testing.assert_allclose(compute_losses(outputs, batch(targets))["mask"], expected, rtol=1e-4)
