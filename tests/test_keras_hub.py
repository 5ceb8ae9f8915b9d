"""A keras-hub backbone as the CenterMask backbone, loaded from a local preset folder (the path a
hub handle takes once downloaded): its weights and its image converter's normalisation arrive,
both architectures build on its pyramid, and the exports stay builtins-only and equal Keras."""

import numpy as np
import pytest
import tensorflow as tf

from centermask_tf.config import ConfigError, load_config
from centermask_tf.detector import CenterMask
from centermask_tf.export.serving import export_saved_model
from centermask_tf.export.tflite import export_tflite, non_builtin_ops, run_tflite
from centermask_tf.model.backbones import BackboneWeightsError, ImageNormalization
from centermask_tf.transfer import layer_weights
from tests.helpers import run_layer_test

keras_hub = pytest.importorskip("keras_hub")

TINY = ["model.backbone=keras_hub", "model.input_size=64", "model.width_multiplier=0.125", "model.head_conv=16",
        "model.shape_size=8", "model.mask_size=8", "model.max_detections=10"]
SCALE, OFFSET = [1 / 58.0, 1 / 57.0, 1 / 57.5], [-2.1, -2.0, -1.8]


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    """A tiny ResNetBackbone with random weights and an image converter, saved as a preset."""
    folder = tmp_path_factory.mktemp("hub") / "tiny_resnet"
    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[7], stackwise_num_filters=[64, 32, 32, 32],
        stackwise_num_blocks=[1, 1, 1, 1], stackwise_num_strides=[1, 2, 2, 2], block_type="basic_block",
        use_pre_activation=False,
    )
    backbone.save_to_preset(str(folder))
    keras_hub.layers.ResNetImageConverter(scale=SCALE, offset=OFFSET).save_to_preset(str(folder))
    return folder, {name: arrays for name, arrays in layer_weights(backbone).items()}


def config_for(folder, *extra, base="configs/shapes_tiny.yaml"):
    return load_config(base, [*TINY, f"model.backbone_preset={folder}", *extra])


def hub_layers(detector):
    return {path.rsplit("/", 1)[-1]: arrays for path, arrays in layer_weights(detector.network).items()
            if "/keras_hub_features/" in path}


def test_the_presets_weights_and_normalisation_arrive(preset):
    folder, expected = preset
    loaded = hub_layers(CenterMask(config_for(folder, "model.weights=preset")))
    assert set(loaded) == set(expected)
    for name, arrays in expected.items():
        for a, b in zip(loaded[name], arrays, strict=True):
            np.testing.assert_array_equal(a, b)
    fresh = hub_layers(CenterMask(config_for(folder)))  # weights null: the architecture only
    assert any(np.abs(fresh[n][0] - expected[n][0]).max() > 1e-3 for n in expected)
    network = CenterMask(config_for(folder)).network
    normalize = network.get_layer("keras_hub_backbone").get_layer("normalize")
    image = np.random.default_rng(0).uniform(0, 255, (1, 8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(normalize(image), image * np.array(SCALE) + np.array(OFFSET), rtol=1e-5)


def test_affine_normalization_round_trips(tmp_path):
    layer = ImageNormalization("affine", SCALE, OFFSET)
    run_layer_test(layer, [np.full((1, 4, 4, 3), 200.0, np.float32)], tmp_path, expected_shape=(1, 4, 4, 3))


def test_fcos_builds_on_the_pyramid_and_freezing_reaches_the_hub_layers(preset):
    from centermask_tf.model.backbones import backbone_layers

    folder, _ = preset
    detector = CenterMask(config_for(folder, "model.weights=preset", base="configs/shapes_fcos_tiny.yaml"))
    outputs = detector.network(np.zeros((1, 64, 64, 3), np.float32))
    assert outputs["classification"].shape[-1] == 3 and outputs["saliency"].shape[1:3] == (16, 16)
    frozen = backbone_layers(detector.network)
    assert [layer.name for layer in frozen if layer.weights] == ["keras_hub_features"]


def test_configs_that_cannot_build_are_refused(preset, tmp_path):
    folder, _ = preset
    with pytest.raises(ConfigError, match="model.backbone_preset names the keras-hub preset"):
        load_config("configs/shapes_tiny.yaml", ["model.backbone=keras_hub"])
    with pytest.raises(ConfigError, match="a keras_hub backbone takes null .* or preset"):
        config_for(folder, "model.weights=imagenet")
    with pytest.raises(ConfigError, match="'preset' applies to keras_hub only"):
        load_config("configs/shapes_tiny.yaml", ["model.weights=preset"])
    with pytest.raises(BackboneWeightsError, match=r"model.backbone_preset=.*nowhere.*cannot load it"):
        CenterMask(config_for(tmp_path / "nowhere"))


def test_saved_model_and_builtins_only_tflite_equal_keras(preset, tmp_path):
    folder, _ = preset
    config = config_for(folder, "model.weights=preset")
    detector = CenterMask(config)
    canvas = np.random.default_rng(5).integers(0, 255, (1, 64, 64, 3), dtype=np.uint8)
    reference = {k: np.asarray(v) for k, v in detector.detect_canvases(tf.cast(canvas, tf.float32)).items()}
    scores = np.sort(reference["scores"][0])[::-1]
    assert scores[0] > config.model.score_threshold

    content_size = export_tflite(detector, str(tmp_path / "hub.tflite"))
    content = (tmp_path / "hub.tflite").read_bytes()
    assert len(content) == content_size and non_builtin_ops(content) == set()
    got = run_tflite(content, {"image": canvas})
    np.testing.assert_allclose(np.sort(got["detection_scores"][0])[::-1], scores, atol=1e-4)

    loaded = tf.saved_model.load(export_saved_model(detector, str(tmp_path / "sm")))
    served = loaded.signatures["image_tensor"](image_tensor=tf.constant(canvas))
    np.testing.assert_allclose(np.sort(served["detection_scores"].numpy()[0])[::-1], scores, atol=1e-4)
