"""Starting from trained weights: layers load by name and shape, class heads of another class
count are re-initialised (their prior kept), bad sources are refused before anything is
written, and a frozen backbone stays frozen through kills and resumes."""

import os

import keras
import numpy as np
import pytest

from centermask_tf import files
from centermask_tf.arch import build_network
from centermask_tf.config import ConfigError, load_config
from centermask_tf.detector import CenterMask
from centermask_tf.errors import UserError
from centermask_tf.model.backbones import backbone_layers
from centermask_tf.model.heads import HEATMAP_BIAS
from centermask_tf.training.train import train
from centermask_tf.transfer import layer_weights
from centermask_tf.workdir import Workdir, WorkdirError

CONFIG = "configs/shapes_tiny.yaml"
FCOS = "configs/shapes_fcos_tiny.yaml"
TINY = ["model.width_multiplier=0.125", "model.input_size=64", "model.head_conv=8", "model.shape_size=8",
        "model.mask_size=8"]


def tiny(*extra):
    return load_config(CONFIG, [*TINY, *extra])


def randomised(network, seed):
    """`network` with every weight drawn anew, so a copied layer is told from a fresh one."""
    rng = np.random.default_rng(seed)
    for variable in network.weights:
        variable.assign(rng.normal(size=variable.shape).astype(variable.dtype) * 0.1 + 0.5)
    return network


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A 3-class network with random weights, saved as a bare `.weights.h5`, a `.keras` file
    and a preset folder."""
    folder = tmp_path_factory.mktemp("source")
    network = randomised(build_network(tiny().model), 1)
    network.save_weights(str(folder / "bare.weights.h5"))
    network.save(str(folder / "model.keras"))
    CenterMask(tiny(), network=network).save_to_preset(str(folder / "preset"))
    return folder, layer_weights(network)


def assert_loaded(detector, expected, loaded):
    got = layer_weights(detector.network)
    for path in loaded:
        for a, b in zip(got[path], expected[path], strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("form", ["bare.weights.h5", "model.keras", "preset"])
def test_other_classes_load_everything_but_the_heatmap_which_keeps_its_prior(source, form):
    folder, expected = source
    detector = CenterMask(tiny("model.num_classes=2"))
    report = detector.load_matching_weights(folder / form)
    assert sorted(report.loaded) == sorted(set(expected) - {"heatmap"})
    assert_loaded(detector, expected, report.loaded)
    heatmap_bias = detector.network.get_layer("heatmap").get_weights()[-1]
    np.testing.assert_allclose(heatmap_bias, [HEATMAP_BIAS] * 2, rtol=1e-6)
    if form == "bare.weights.h5":  # layers named by position: one of another shape is not found
        assert report.reinitialised == {"heatmap": "not in the source"}
        assert report.summary() == (
            f"init_from {folder / form} (read by position with this config's layout): loaded "
            f"{len(expected) - 1} of {len(expected)} layers; re-initialised 1 not in the source (heatmap).")
    else:
        assert report.reinitialised == {"heatmap": "3 -> 2 classes"}
        assert report.summary() == (f"init_from {folder / form}: loaded {len(expected) - 1} of {len(expected)} "
                                    "layers; re-initialised heatmap: 3 -> 2 classes.")


def test_class_specific_saliency_and_a_wider_head_are_named_with_their_shapes(source):
    folder, expected = source
    detector = CenterMask(tiny("model.num_classes=2", "model.saliency=specific", "model.shape_size=4"))
    report = detector.load_matching_weights(folder / "model.keras")
    assert report.reinitialised == {
        "heatmap": "3 -> 2 classes", "saliency": "1 -> 2 classes",
        "shape": "weights [(3, 3, 8, 8), (8,), (1, 1, 8, 64), (64,)] -> [(3, 3, 8, 8), (8,), (1, 1, 8, 16), (16,)]",
    }
    assert_loaded(detector, expected, report.loaded)


def test_a_workdir_loads_its_best_checkpoint_and_a_checkpoint_file_is_read_with_its_runs_config(shapes, tmp_path):
    _, overrides = shapes
    workdir = tmp_path / "run"
    train(load_config(CONFIG, overrides), str(workdir))
    last = str(workdir / "checkpoints" / "last.weights.h5")
    for source, weights in ((workdir, None), (last, last)):
        trained = layer_weights(CenterMask.from_workdir(str(workdir), weights).network)
        # Another head width: a checkpoint read with this config's layout would load no head.
        detector = CenterMask(load_config(CONFIG, [*overrides, "model.num_classes=1", "model.head_conv=16"]))
        report = detector.load_matching_weights(source)
        assert set(report.reinitialised) == {"heatmap", "offset", "size", "shape", "saliency"}
        assert len(report.loaded) == len(trained) - 5
        assert_loaded(detector, trained, report.loaded)


def test_fcos_onto_other_classes_reinitialises_its_classification_head(tmp_path):
    source = randomised(build_network(load_config(FCOS, ["model.width_multiplier=0.125"]).model), 3)
    source.save(str(tmp_path / "fcos.keras"))
    detector = CenterMask(load_config(FCOS, ["model.width_multiplier=0.125", "model.num_classes=5"]))
    report = detector.load_matching_weights(tmp_path / "fcos.keras")
    assert report.reinitialised == {"classification": "3 -> 5 classes"}
    assert_loaded(detector, layer_weights(source), report.loaded)


def test_a_model_of_the_other_architecture_is_refused_and_a_partial_match_is_said(source, tmp_path):
    folder, _ = source
    fcos = load_config(FCOS, ["model.width_multiplier=0.125", "model.num_classes=2"])
    with pytest.raises(UserError, match=r"none of this network's \d+ layers matches one of its \d+ by name"):
        CenterMask(fcos).load_matching_weights(folder / "model.keras")
    # Separable heads: the backbone loads, every head is re-initialised, named with its shapes.
    report = CenterMask(tiny("model.head_type=separable")).load_matching_weights(folder / "model.keras")
    assert set(report.reinitialised) == {"heatmap", "offset", "size", "shape", "saliency"}
    assert report.loaded and all(path.startswith("resnet18_backbone/") for path in report.loaded)
    assert "re-initialised heatmap: weights [(3, 3, 8, 8)" in report.summary()


def damaged_sources(folder, tmp_path):
    image = tmp_path / "photo.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    truncated_h5 = tmp_path / "cut.weights.h5"
    truncated_h5.write_bytes((folder / "bare.weights.h5").read_bytes()[:5000])
    truncated_keras = tmp_path / "cut.keras"
    truncated_keras.write_bytes((folder / "model.keras").read_bytes()[:3000])
    return {
        str(tmp_path / "nowhere"): "does not exist",
        str(image): "is not a model",
        str(truncated_h5): "cannot read .*is the file complete",
        str(truncated_keras): "cannot read .*is the file complete",
        str(tmp_path): "is not a training workdir",
    }


def test_bad_sources_stop_training_in_one_line_before_anything_is_written(shapes, source, tmp_path):
    folder, _ = source
    _, overrides = shapes
    for path, message in damaged_sources(folder, tmp_path).items():
        workdir = tmp_path / "run"
        with pytest.raises(UserError, match=message) as refused:
            train(load_config(CONFIG, [*overrides, f"train.init_from={path}"]), str(workdir))
        assert "\n" not in str(refused.value)
        assert not workdir.exists()
    with pytest.raises(UserError, match="none of this network"):
        # (head_conv 16: at the source's 8, the saliency heads of both would match.)
        train(load_config(FCOS, [*overrides, f"train.init_from={folder / 'model.keras'}", "model.head_conv=16"]),
              str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_freeze_longer_than_the_run_is_refused():
    with pytest.raises(ConfigError, match=r"train.freeze_backbone_epochs=5 is more than train.epochs=4"):
        tiny("train.epochs=4", "train.freeze_backbone_epochs=5")


class BackboneRecorder(keras.callbacks.Callback):
    """The backbone's weights (BatchNorm statistics included) at each epoch's end."""

    def __init__(self, record):
        super().__init__()
        self.record = record

    def on_epoch_end(self, epoch, logs=None):
        self.record[epoch + 1] = [np.array(w) for layer in backbone_layers(self.model.network) for w in layer.weights]


@pytest.mark.parametrize("crash, committed", [("raise:state:3", 1), ("raise:state:4", 2)])
def test_a_frozen_backbone_stays_frozen_across_a_crash_and_trains_after(shapes, tmp_path, monkeypatch, crash,
                                                                        committed):
    """Epochs 1-2 frozen, epoch 3 not; a crash in (state write 3: one epoch committed) or
    after (write 4: two) the frozen epochs, then the same command again."""
    folder = tmp_path / "source"
    _, overrides = shapes
    config = load_config(CONFIG, [*overrides, "train.epochs=3", "train.freeze_backbone_epochs=2",
                                  f"train.init_from={folder / 'net.weights.h5'}"])
    network = randomised(build_network(config.model), 2)
    folder.mkdir()
    network.save_weights(str(folder / "net.weights.h5"))
    start = [np.array(w) for layer in backbone_layers(network) for w in layer.weights]
    workdir, record = tmp_path / "run", {}
    monkeypatch.setattr(files, "_fault_hits", files.collections.Counter())
    monkeypatch.setenv(files.FAULT_ENV, crash)
    with pytest.raises(files.InjectedFault):
        train(config, str(workdir), extra_callbacks=[BackboneRecorder(record)])
    assert Workdir(str(workdir)).load_state().epochs_done == committed
    # The rerun resumes from its own checkpoint: a changed init_from file is not read again.
    randomised(build_network(config.model), 3).save_weights(str(folder / "net.weights.h5"))
    monkeypatch.setenv(files.FAULT_ENV, "none:none")
    other = load_config(CONFIG, [*overrides, "train.epochs=3", "train.freeze_backbone_epochs=2",
                                 f"train.init_from={tmp_path}"])
    with pytest.raises(WorkdirError, match=r"different config \(train\.init_from: .*net\.weights\.h5' -> "):
        train(other, str(workdir))
    train(config, str(workdir), extra_callbacks=[BackboneRecorder(record)])
    assert sorted(record) == [1, 2, 3]
    for epoch in (1, 2):  # weights and BatchNorm statistics exactly as loaded
        for a, b in zip(record[epoch], start, strict=True):
            np.testing.assert_array_equal(a, b)
    assert max(float(np.abs(a - b).max()) for a, b in zip(record[3], start)) > 1e-4
    # The neck and heads trained from the first epoch on.
    heads = CenterMask.from_workdir(str(workdir)).network.get_layer("heatmap").get_weights()[0]
    assert np.abs(heads - network.get_layer("heatmap").get_weights()[0]).max() > 1e-4
    assert os.path.isfile(workdir / "model.keras")
