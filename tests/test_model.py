import dataclasses
import socket
import tempfile
import time

import numpy as np
import pytest

from centermask_tf.arch import build_network
from centermask_tf.config import ModelConfig
from centermask_tf.model.backbones import BackboneWeightsError, ImageNormalization, build_backbone
from centermask_tf.model.heads import HEATMAP_BIAS, Head, network_factors
from tests.helpers import run_layer_test, run_model_saving_test

TINY = {
    "resnet18": 0.125,
    "resnet50": 0.125,
    "resnet101": 0.125,
    "dla34": 0.125,
    "mobilenetv3_large": 0.25,
    "mobilenetv3_large_minimalistic": 0.25,
    "mobilenetv3_small": 0.25,
}


def tiny_config(**overrides):
    options = dict(
        backbone="resnet18", width_multiplier=0.125, num_classes=3, input_size=64,
        head_conv=8, shape_size=8, mask_size=8,
    )
    options.update(overrides)
    return ModelConfig(**options)


@pytest.mark.parametrize("name", sorted(TINY))
def test_backbone_gives_stride4_features(name):
    backbone = build_backbone(name, 128, TINY[name], weights=None)
    features = backbone(np.zeros((1, 128, 128, 3), np.float32))
    assert features.shape[:3] == (1, 32, 32)


@pytest.mark.parametrize("name", ["mobilenetv3_large_minimalistic", "resnet50", "resnet18"])
def test_inference_statistics_catch_up_within_a_short_schedule(name):
    """Every BatchNormalization, keras.applications' too (MobileNetV3's momentum is 0.999), keeps
    moving statistics with CenterNet's momentum 0.9: after 150 training-mode passes over one
    batch the inference-mode features equal the training-mode ones (0.999 left them far off:
    the edge config trained 750 steps detected nothing)."""
    import tensorflow as tf

    backbone = build_backbone(name, 64, TINY[name], weights=None)
    images = tf.constant(np.random.default_rng(0).uniform(0, 255, (4, 64, 64, 3)), tf.float32)
    update = tf.function(lambda: backbone(images, training=True))
    for _ in range(150):
        trained = update()
    inference = backbone(images, training=False)
    assert float(tf.reduce_max(tf.abs(trained))) > 0.1
    np.testing.assert_allclose(inference, trained, atol=0.05 * float(tf.reduce_max(tf.abs(trained))))


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_skip_neck_carries_fine_stage_positions(name):
    """With neck=skip the stride-4 features see the stride-4 stage directly: a one-pixel change
    moves the features mostly near that pixel, where CenterNet's neck (from the 4x4 stride-32
    map) spreads it over the whole 32x32 map."""
    x = np.zeros((1, 128, 128, 3), np.float32)
    poked = x.copy()
    poked[0, 64:68, 64:68] = 255.0
    spread = {}
    for neck in ("deconv", "skip"):
        backbone = build_backbone(name, 128, TINY[name], weights=None, neck=neck)
        names = [layer.name for layer in backbone.layers]
        assert ("neck_add2" in names) == (neck == "skip")
        change = np.abs(np.asarray(backbone(poked)) - np.asarray(backbone(x)))[0].sum(-1)  # [32, 32]
        spread[neck] = change[14:19, 14:19].sum() / change.sum()  # share within 2 cells
    assert spread["skip"] > 2 * spread["deconv"], spread


def test_skip_neck_is_refused_for_backbones_with_their_own_neck():
    from centermask_tf.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="model.neck=skip"):
        load_config("configs/shapes_tiny.yaml", overrides=["model.backbone=dla34", "model.neck=skip"])


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and an empty Keras cache, whatever machine runs the test."""
    def refuse(*args, **kwargs):
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))


@pytest.mark.parametrize("name", ["resnet50", "mobilenetv3_small", "resnet18", "dla34"])
def test_imagenet_weights_offline_fail_fast_with_instructions(offline, name):
    start = time.monotonic()
    with pytest.raises(BackboneWeightsError, match=r"model\.weights") as err:
        build_backbone(name, 128, 1.0, weights="imagenet")
    assert time.monotonic() - start < 30
    assert "weights" in str(err.value) and ("/path/to" in str(err.value) or ".weights.h5" in str(err.value))


def test_missing_weights_file_is_named():
    with pytest.raises(BackboneWeightsError, match="nowhere.h5"):
        build_backbone("resnet18", 64, 0.125, weights="nowhere.h5")


def test_native_backbone_loads_local_weights_file(tmp_path):
    source = build_backbone("resnet18", 64, 0.125)
    path = tmp_path / "backbone.weights.h5"
    source.save_weights(path)
    loaded = build_backbone("resnet18", 64, 0.125, weights=str(path))
    x = np.random.default_rng(0).uniform(0, 255, (1, 64, 64, 3)).astype(np.float32)
    np.testing.assert_allclose(loaded(x), source(x), atol=1e-6)


@pytest.mark.parametrize("saliency, channels", [("agnostic", 1), ("specific", 3)])
def test_model_outputs_and_heads(saliency, channels):
    model = build_network(tiny_config(saliency=saliency))
    outputs = model(np.zeros((2, 64, 64, 3), np.float32))
    assert {k: tuple(v.shape) for k, v in outputs.items()} == {
        "heatmap": (2, 16, 16, 3),
        "offset": (2, 16, 16, 2),
        "size": (2, 16, 16, 2),
        "shape": (2, 16, 16, 64),
        "saliency": (2, 16, 16, channels),
    }
    np.testing.assert_allclose(model.get_layer("heatmap").out.bias.numpy(), HEATMAP_BIAS)
    assert abs(HEATMAP_BIAS + 2.19) < 0.01


@pytest.mark.parametrize("factors, heads", [
    ("both", {"heatmap", "offset", "size", "shape", "saliency"}),
    ("shape", {"heatmap", "offset", "size", "shape"}),
    ("saliency", {"heatmap", "offset", "size", "saliency"}),
])
def test_mask_factors_pick_the_mask_heads(factors, heads):
    """A Local Shape-only network has no Saliency head (no layer, no weights) and a
    saliency-only one no Shape head."""
    model = build_network(tiny_config(mask_factors=factors))
    assert set(model(np.zeros((1, 64, 64, 3), np.float32))) == heads
    assert {layer.name for layer in model.layers} & {"shape", "saliency"} == heads & {"shape", "saliency"}
    assert network_factors(model) == factors
    full = build_network(tiny_config()).count_params()
    assert model.count_params() == full - sum(
        build_network(tiny_config()).get_layer(name).count_params() for name in {"shape", "saliency"} - heads
    )


def test_model_config_and_keras_round_trip(tmp_path):
    model = build_network(tiny_config(backbone="dla34"))
    x = np.random.default_rng(0).uniform(0, 255, (1, 64, 64, 3)).astype(np.float32)
    run_model_saving_test(model, [x], tmp_path, atol=1e-5)


@pytest.mark.parametrize("separable", [False, True])
def test_head_layer(tmp_path, separable):
    x = np.random.default_rng(0).normal(size=(1, 8, 8, 4)).astype(np.float32)
    head = Head(5, head_conv=6, bias_init=-2.19, separable=separable)
    run_layer_test(head, [x], tmp_path, (1, 8, 8, 5), atol=1e-5)


@pytest.mark.parametrize("mode", ["torch", "caffe", "tf"])
def test_image_normalization_layer(tmp_path, mode):
    x = np.array([[[[0.0, 127.5, 255.0]]]], np.float32)
    out = run_layer_test(ImageNormalization(mode), [x], tmp_path, (1, 1, 1, 3))
    expected = {
        "torch": (np.array([0.0, 127.5, 255.0]) / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225],
        "caffe": np.array([255.0, 127.5, 0.0]) - [103.939, 116.779, 123.68],
        "tf": np.array([-1.0, 0.0, 1.0]),
    }[mode]
    np.testing.assert_allclose(np.asarray(out)[0, 0, 0], expected, atol=1e-4)


@pytest.mark.parametrize("separable", [False, True])
def test_head_call_at_equals_dense_head_at_those_locations(rng, separable):
    head = Head(filters=20, head_conv=6, separable=separable)
    features = rng.normal(size=(2, 7, 9, 5)).astype(np.float32)
    dense = head(features).numpy().reshape(2, 63, 20)
    # Corners and edges (where the zero padding matters) and interior points.
    pixels = np.array([[0, 8, 54, 62, 31], [4, 9, 17, 40, 0]], np.int32)
    sparse = head.call_at(features, pixels).numpy()
    expected = np.take_along_axis(dense, pixels[..., None], axis=1)
    np.testing.assert_allclose(sparse, expected, atol=1e-5)
    assert np.abs(expected).max() > 0.1  # not trivially equal


@pytest.mark.parametrize("saliency", ["agnostic", "specific"])
def test_sparse_shape_detection_equals_dense(rng, saliency):
    from centermask_tf.config import Config
    from centermask_tf.detector import CenterMask

    config = ModelConfig(
        backbone="resnet18", weights=None, width_multiplier=0.125, num_classes=3, input_size=64,
        head_conv=8, shape_size=8, mask_size=8, saliency=saliency, max_detections=10, score_threshold=0.0,
    )
    detector = CenterMask(Config(model=config))
    images = rng.uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    sparse = detector.decode(images)
    dense = detector.decoder(detector.network(images))
    assert int(dense["num_detections"][0]) == 10
    for key in ("boxes", "scores", "classes", "masks"):
        np.testing.assert_allclose(sparse[key].numpy(), dense[key].numpy(), atol=1e-5)
    assert float(np.std(dense["masks"])) > 1e-4  # masks vary, so equality says something


# === Hourglass-104 ===


def centernet_hourglass_parameters():
    """Trainable parameters of CenterNet's `large_hourglass` backbone (pre, two kp_modules,
    cnvs, inters, inters_, cnvs_; PyTorch counts BatchNorm as weight + bias), counted by hand
    from its module structure: convolutions have no bias before a BatchNorm."""
    def conv(k, i, o):
        return k * k * i * o + 2 * o

    def residual(i, o, stride=1):
        return conv(3, i, o) + conv(3, o, o) + (conv(1, i, o) if stride != 1 or i != o else 0)

    def kp_module(dims, modules):
        (c, n), (cm, nm) = dims[:2], modules[:2]
        inner = kp_module(dims[1:], modules[1:]) if len(dims) > 2 else nm * residual(n, n)
        return (cm * residual(c, c) + residual(c, n, 2) + (cm - 1) * residual(n, n) + inner
                + (cm - 1) * residual(n, n) + residual(n, c))

    dims, modules = [256, 256, 384, 384, 384, 512], [2, 2, 2, 2, 2, 4]
    return (conv(7, 3, 128) + residual(128, 256, 2) + 2 * kp_module(dims, modules) + 2 * conv(3, 256, 256)
            + residual(256, 256) + 2 * conv(1, 256, 256))


def trainable_count(layer):
    return sum(int(np.prod(w.shape)) for w in layer.trainable_weights)


def test_hourglass104_has_centernets_parameter_count():
    backbone = build_backbone("hourglass104", 128)
    assert trainable_count(backbone) == centernet_hourglass_parameters() == 187_700_352


def test_hourglass_intermediate_heads_train_and_are_left_out_of_inference():
    """Both stacks carry the heads in training (their losses summed); decoding, and so every
    export, runs the last stack only."""
    from centermask_tf.arch.centernet.losses import compute_losses
    from centermask_tf.arch.centernet.network import inference_network
    from centermask_tf.config import Config
    from centermask_tf.detector import CenterMask
    from centermask_tf.export.serving import export_tflite_saved_model
    from centermask_tf.export.tflite import saved_model_to_tflite
    from tests.test_losses import batch, encode, random_objects

    model = build_network(tiny_config(backbone="hourglass104", input_size=128))
    outputs = model(np.zeros((1, 128, 128, 3), np.float32), training=True)
    (intermediate,) = outputs["intermediate"]
    assert set(intermediate) == {"heatmap", "offset", "size", "shape", "saliency"}
    assert outputs["heatmap"].shape == (1, 32, 32, 3)  # stride 4
    first = {name: model.get_layer(f"stack0_{name}") for name in intermediate}

    rng = np.random.default_rng(0)
    targets = batch(encode(*random_objects(rng, 3)))
    stacked = {k: v for k, v in outputs.items()}
    stacked["intermediate"] = [{k: v + 0.5 for k, v in outputs.items() if k != "intermediate"}]
    last = compute_losses({k: v for k, v in outputs.items() if k != "intermediate"}, targets)
    other = compute_losses(stacked["intermediate"][0], targets)
    both = compute_losses(stacked, targets)
    for name in ("heatmap", "mask", "total"):
        np.testing.assert_allclose(both[name], last[name] + other[name], rtol=1e-5)

    inference = inference_network(model)
    assert not {layer.name for layer in inference.layers} & {layer.name for layer in first.values()}
    # Everything but the first stack's heads and the dense Shape output (run at the peaks only).
    left_out = sum(h.count_params() for h in first.values()) + model.get_layer("shape").count_params()
    assert inference.count_params() == model.count_params() - left_out
    # The TFLite export (what `centermask export` writes): no op of the first stack's heads.
    detector = CenterMask(Config(model=tiny_config(backbone="hourglass104", input_size=128)), network=model)
    with tempfile.TemporaryDirectory() as tmp:
        content = saved_model_to_tflite(export_tflite_saved_model(detector, tmp))
    assert b"stack0_" not in content and b"hg1_out" in content and b"hg0_out" in content


@pytest.mark.slow
def test_hourglass104_builds_at_512_with_stride_4_outputs():
    from centermask_tf.config import load_config

    model = build_network(load_config("configs/coco_hourglass104.yaml").model)
    outputs = model(np.zeros((1, 512, 512, 3), np.float32))
    assert outputs["heatmap"].shape == (1, 128, 128, 80) and outputs["shape"].shape == (1, 128, 128, 1024)
    assert [o["saliency"].shape for o in outputs["intermediate"]] == [(1, 128, 128, 80)]
    print(f"Hourglass-104 CenterMask parameters: {model.count_params():,}")
    assert 190e6 < model.count_params() < 200e6


# Relative tolerance per policy: float16 keeps 11 bits of mantissa, bfloat16 8.
@pytest.mark.parametrize("policy, tolerance", [("mixed_float16", 0.02), ("mixed_bfloat16", 0.08)])
@pytest.mark.parametrize("model_type", ["centernet", "fcos"])
def test_mixed_precision_network_matches_float32_with_float32_outputs(model_type, policy, tolerance):
    """`train.mixed_precision` (mixed_float16: the COCO configs' GPU setting; mixed_bfloat16:
    CPUs with AVX-512 BF16 / AMX): the network builds, computes in the low precision and returns
    float32 outputs within that precision's error of the float32 network with the same weights."""
    import keras

    images = np.random.default_rng(0).uniform(0, 255, (1, 64, 64, 3)).astype(np.float32)
    # Fixed weights: with whatever the tests before left in the global generator, an unlucky
    # draw of the FCOS towers once put one output just past the float16 tolerance.
    keras.utils.set_random_seed(0)
    reference = build_network(tiny_config(type=model_type))
    keras.mixed_precision.set_global_policy(policy)
    try:
        mixed = build_network(tiny_config(type=model_type))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    mixed.set_weights(reference.get_weights())
    assert any(layer.compute_dtype == policy.split("_")[1] for layer in mixed.layers)
    expected, got = reference(images), mixed(images)
    for name, value in got.items():
        assert value.dtype == "float32", name
        scale = float(np.abs(expected[name]).max()) + 1.0
        np.testing.assert_allclose(value, expected[name], atol=tolerance * scale, err_msg=name)


def test_the_config_offers_exactly_the_backbones_and_architectures_of_the_tables():
    from centermask_tf import config
    from centermask_tf.arch import ARCHS
    from centermask_tf.model import backbones

    fields = {f.name: f for f in dataclasses.fields(config.ModelConfig)}
    assert fields["backbone"].metadata["choices"] == tuple(backbones.BACKBONES)
    assert fields["type"].metadata["choices"] == tuple(ARCHS)
    assert backbones.PYRAMID_BACKBONES == ("resnet18", "resnet50", "resnet101", "keras_hub")
