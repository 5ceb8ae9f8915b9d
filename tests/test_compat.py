"""Workdirs, presets and `.keras` files saved before the `arch/` layout load and detect as they
did (`tests/fixtures/before_arch`, written by commit 7a8a1be)."""

import pathlib
import shutil

import keras
import numpy as np
import pytest

import centermask_tf.arch  # noqa: F401  (registers the network's layers for `load_model`)
from centermask_tf import CenterMask
from centermask_tf.images import load_image

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "before_arch"


@pytest.fixture(scope="module")
def saved():
    return np.load(FIXTURE / "detections.npz")


def check_same(result, saved, name):
    assert len(result["scores"]) == len(saved[f"{name}/scores"]) > 0
    np.testing.assert_allclose(result["scores"], saved[f"{name}/scores"], atol=1e-5)
    np.testing.assert_allclose(result["boxes"], saved[f"{name}/boxes"], atol=1e-3)
    np.testing.assert_array_equal(result["class_ids"], saved[f"{name}/class_ids"])
    # Pixels at exactly the mask threshold may flip with the float rounding of another CPU.
    assert np.mean(result["masks"] != saved[f"{name}/masks"]) <= 1e-3


def test_a_workdir_saved_before_the_move_detects_identically(saved, tmp_path):
    workdir = shutil.copytree(FIXTURE / "centernet_workdir", tmp_path / "run")
    detector = CenterMask.from_workdir(workdir)
    assert detector.arch.name == "centernet"
    check_same(detector.detect(load_image(FIXTURE / "image.png"))[0], saved, "centernet_workdir")
    check_same(detector.detect(FIXTURE / "image.png")[0], saved, "centernet_workdir")  # a pathlib.Path


def test_a_preset_saved_before_the_move_detects_identically(saved, tmp_path):
    preset = shutil.copytree(FIXTURE / "fcos_preset", tmp_path / "preset")
    detector = CenterMask.from_preset(preset)
    assert detector.arch.name == "fcos"
    check_same(detector.detect(str(FIXTURE / "image.png"))[0], saved, "fcos_preset")


def test_a_keras_file_saved_before_the_move_loads_with_its_weights(saved):
    network = keras.saving.load_model(FIXTURE / "centernet_workdir" / "model.keras")
    heatmap = network(np.zeros((1, 64, 64, 3), np.float32) + 100.0)["heatmap"]
    np.testing.assert_allclose(np.asarray(heatmap), saved["centernet_workdir/network_heatmap"], atol=1e-5)
