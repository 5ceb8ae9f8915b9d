"""The `CenterMask` detector object: images in memory in, per-image results in their own pixels
out, equal to what `centermask evaluate` writes; `.keras` and preset round trips."""

import json
import os

import keras
import numpy as np
import pycocotools.mask as mask_utils
import pytest
import tensorflow as tf

from centermask_tf import CenterMask
from centermask_tf.cli import main
from centermask_tf.config import load_config
from centermask_tf.detector import PresetError
from centermask_tf.errors import UserError
from centermask_tf.workdir import save_run_files

CONFIG = "configs/shapes_tiny.yaml"
CONFIGS = {"centernet": CONFIG, "fcos": "configs/shapes_fcos_tiny.yaml"}
CATEGORIES = [{"id": 1, "name": "circle"}, {"id": 2, "name": "rectangle"}, {"id": 3, "name": "triangle"}]
# Tests marked with this run on both variants; the others on the CenterNet one.
BOTH_TYPES = pytest.mark.parametrize("workdir", sorted(CONFIGS), indirect=True)


@pytest.fixture(scope="module")
def workdir(shapes, tmp_path_factory, request):
    """Random weights whose boxes have real extent, and a mask threshold that keeps masks.
    Returns (workdir, overrides, config path)."""
    kind = getattr(request, "param", "centernet")
    _, overrides = shapes
    overrides = overrides + ["model.mask_threshold=0.1", "model.score_threshold=0.0"]
    config = load_config(CONFIGS[kind], overrides)
    workdir = tmp_path_factory.mktemp(f"detector_{kind}")
    save_run_files(config, str(workdir), CATEGORIES)
    detector = CenterMask(config, CATEGORIES)
    if kind == "fcos":  # distances of 3 strides from every location
        box = detector.network.get_layer("box")
        box.kernel.assign(np.zeros(box.kernel.shape, np.float32))
        box.bias.assign([3.0] * 4)
    else:
        detector.network.get_layer("size").out.bias.assign([6.0, 6.0])
    (workdir / "checkpoints").mkdir()
    detector.network.save_weights(str(workdir / "checkpoints" / "last.weights.h5"))
    return workdir, overrides, CONFIGS[kind]


def val_images(shapes):
    root, _ = shapes
    names = sorted(os.listdir(root / "val"))
    return names, [tf.io.decode_image(tf.io.read_file(str(root / "val" / n)), channels=3).numpy() for n in names]


def mask_iou(a, b):
    """IoU; 1 for two empty masks (identical)."""
    union = (a | b).sum()
    return (a & b).sum() / union if union else 1.0


@BOTH_TYPES
def test_detect_equals_what_evaluate_writes(shapes, workdir):
    root, _ = shapes
    directory, overrides, config = workdir
    names, images = val_images(shapes)
    assert len({image.shape for image in images}) >= 3  # different sizes
    detector = CenterMask.from_workdir(str(directory))
    results = detector.detect(images)
    args = ["evaluate", "--config", config, "--workdir", str(directory)]
    for override in overrides:
        args += ["--set", override]
    assert main(args) == 0
    written = json.loads((directory / "eval" / "detections.json").read_text())
    ids = {img["file_name"]: img["id"] for img in json.loads((root / "annotations" / "instances_val.json").read_text())["images"]}
    compared = filled = 0
    for name, image, result in zip(names, images, results):
        height, width = image.shape[:2]
        n = len(result["scores"])
        assert result["boxes"].shape == (n, 4) and result["masks"].shape == (n, height, width)
        assert result["masks"].dtype == bool and result["boxes"].dtype == np.float32
        assert (result["boxes"] >= 0).all() and (result["boxes"][:, [0, 2]] <= width).all()
        assert (result["boxes"][:, [1, 3]] <= height).all()
        assert set(result["class_names"]) <= {"circle", "rectangle", "triangle"}
        theirs = [d for d in written if d["image_id"] == ids[name]]
        assert len(theirs) == n > 0
        for i, d in enumerate(theirs):
            x, y, w, h = d["bbox"]
            np.testing.assert_allclose(result["boxes"][i], [x, y, x + w, y + h], atol=1e-3)
            assert result["class_ids"][i] == d["category_id"]
            assert result["scores"][i] == pytest.approx(d["score"], abs=1e-5)
            assert mask_iou(result["masks"][i], mask_utils.decode(d["segmentation"]).astype(bool)) >= 0.99
            compared += 1
            filled += int(result["masks"][i].any())
    assert compared >= 10 and filled >= 5


@BOTH_TYPES
def test_detect_takes_paths_one_array_and_thresholds(shapes, workdir):
    root, _ = shapes
    directory, _, _ = workdir
    detector = CenterMask.from_workdir(str(directory))
    names, images = val_images(shapes)
    png = [i for i, n in enumerate(names) if n.endswith(".png")][0]  # decodes identically everywhere
    (from_path,) = detector.detect(str(root / "val" / names[png]))
    (from_array,) = detector.detect(images[png])
    np.testing.assert_array_equal(from_path["boxes"], from_array["boxes"])
    (few,) = detector.detect(images[png], score_threshold=float(from_array["scores"][2]), max_detections=2)
    assert len(few["scores"]) == 2 and (few["scores"] >= from_array["scores"][2]).all()
    with pytest.raises(Exception, match=r"uint8 \[H, W, 3\]"):
        detector.detect([images[0].astype(np.float32)])


@BOTH_TYPES
def test_keras_file_and_preset_round_trips_detect_identically(shapes, workdir, tmp_path):
    directory, _, _ = workdir
    detector = CenterMask.from_workdir(str(directory))
    _, images = val_images(shapes)
    expected = detector.detect(images)

    detector.save(str(tmp_path / "detector.keras"))
    loaded = keras.saving.load_model(str(tmp_path / "detector.keras"), safe_mode=True)
    detector.save_to_preset(str(tmp_path / "preset"))
    preset = CenterMask.from_preset(str(tmp_path / "preset"))
    assert sorted(os.listdir(tmp_path / "preset")) == ["categories.json", "config.yaml", "digests.json", "model.weights.h5"]
    for other in (loaded, preset):
        assert isinstance(other, CenterMask) and other.categories == CATEGORIES
        for got, want in zip(other.detect(images), expected):
            for key in ("boxes", "scores", "class_ids", "masks"):
                np.testing.assert_array_equal(got[key], want[key])
            assert got["class_names"] == want["class_names"]


def test_a_damaged_preset_is_refused_and_one_without_digests_loads_with_a_warning(workdir, tmp_path, caplog):
    directory, _, _ = workdir
    CenterMask.from_workdir(str(directory)).save_to_preset(str(tmp_path / "preset"))
    weights = tmp_path / "preset" / "model.weights.h5"
    data = bytearray(weights.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 20000] = bytes(b ^ 0xFF for b in data[middle : middle + 20000])  # 20 KB flipped
    weights.write_bytes(bytes(data))
    with pytest.raises(PresetError, match=r"model\.weights\.h5' does not match its SHA-256 in digests\.json"):
        CenterMask.from_preset(str(tmp_path / "preset"))
    (tmp_path / "preset" / "categories.json").write_text("[{'id': 1")
    with pytest.raises(UserError, match=r"categories\.json' is not valid JSON"):
        CenterMask.from_preset(str(tmp_path / "preset"))
    (tmp_path / "preset" / "config.yaml").write_text("model: [not, a, mapping")
    with pytest.raises(UserError, match=r"config\.yaml' is not valid YAML"):
        CenterMask.from_preset(str(tmp_path / "preset"))
    with pytest.raises(UserError, match="is a file"):
        CenterMask.from_preset(str(weights))

    CenterMask.from_workdir(str(directory)).save_to_preset(str(tmp_path / "old"))
    os.remove(tmp_path / "old" / "digests.json")
    with caplog.at_level("WARNING"):
        assert isinstance(CenterMask.from_preset(str(tmp_path / "old")), CenterMask)
    assert "has no digests.json (saved by an older version)" in caplog.text


def test_detect_arguments_are_checked(workdir):
    directory, _, _ = workdir
    detector = CenterMask.from_workdir(str(directory))
    image = np.zeros((32, 48, 3), np.uint8)
    for kwargs, message in (
        ({"max_detections": -1}, r"max_detections must be an integer >= 0; got -1"),
        ({"max_detections": 2.5}, r"max_detections must be an integer"),
        ({"score_threshold": float("nan")}, r"score_threshold must be a number in \[0, 1\]"),
        ({"score_threshold": 1.5}, r"score_threshold must be a number in \[0, 1\]"),
        ({"batch_size": 0}, r"batch_size must be an integer >= 1; got 0"),
    ):
        with pytest.raises(UserError, match=message):
            detector.detect(image, **kwargs)
    for images, message in ((None, "got NoneType"), (np.zeros((0, 5, 3), np.uint8), r"H, W > 0"),
                            ([np.zeros((4, 4), np.uint8)], r"uint8 \[H, W, 3\]"), (3, "got int")):
        with pytest.raises(UserError, match=message):
            detector.detect(images)
    assert detector.detect([]) == []
    (none,) = detector.detect(image, max_detections=0)
    assert len(none["scores"]) == 0 and none["masks"].shape == (0, 32, 48)


def test_hub_handles_get_a_clear_error():
    with pytest.raises(PresetError, match="only local preset folders are supported"):
        CenterMask.from_preset("hf://someone/centermask")


# === Mask factors (the paper's Local Shape / Global Saliency ablation) ===


def test_one_network_assembles_masks_from_either_factor(shapes, workdir):
    """On a network trained with both factors, `model.mask_factors` changes only the masks:
    the same detections, and the `both` mask is the product of the two single-factor masks."""
    _, images = val_images(shapes)
    directory, _, _ = workdir
    size = CenterMask.from_workdir(str(directory)).input_size
    canvases = tf.stack([tf.image.resize_with_pad(tf.cast(i, tf.float32), size, size) for i in images[:2]])
    decoded = {
        factors: CenterMask.from_workdir(str(directory), overrides=[f"model.mask_factors={factors}"]).decode(canvases)
        for factors in ("both", "shape", "saliency")
    }
    for key in ("boxes", "scores", "classes"):
        np.testing.assert_array_equal(decoded["shape"][key], decoded["both"][key])
        np.testing.assert_array_equal(decoded["saliency"][key], decoded["both"][key])
    product = decoded["shape"]["masks"] * decoded["saliency"]["masks"]
    np.testing.assert_allclose(decoded["both"]["masks"], product, atol=1e-6)
    assert np.abs(decoded["shape"]["masks"] - decoded["saliency"]["masks"]).max() > 0.05


def test_evaluate_takes_any_mask_factors_on_a_both_network(shapes, workdir):
    directory, overrides, _ = workdir
    segm = {}
    for factors in ("shape", "saliency"):
        args = ["evaluate", "--config", CONFIG, "--workdir", str(directory), "--set", f"model.mask_factors={factors}",
                "--set", "eval.max_images=2"]
        for override in [*overrides, "model.mask_threshold=0.5"]:  # random logits sit near 0
            args += ["--set", override]
        assert main(args) == 0
        written = json.loads((directory / "eval" / "detections.json").read_text())
        segm[factors] = [d["segmentation"]["counts"] for d in written]
    assert len(segm["shape"]) == len(segm["saliency"]) > 0 and segm["shape"] != segm["saliency"]


def test_a_single_factor_network_refuses_the_factor_it_lacks(shapes, tmp_path):
    _, overrides = shapes
    config = load_config(CONFIG, overrides + ["model.mask_factors=shape"])
    detector = CenterMask(config, CATEGORIES)
    assert "saliency" not in {layer.name for layer in detector.network.layers}
    detector.save_to_preset(str(tmp_path / "shape_only"))
    with pytest.raises(Exception, match="needs the Saliency head.*mask_factors=shape"):
        CenterMask.from_preset(str(tmp_path / "shape_only"), overrides=["model.mask_factors=both"])
    # A preset of a both-network records both, whatever factors it was decoding with.
    both = CenterMask(load_config(CONFIG, overrides + ["model.mask_factors=saliency"]), CATEGORIES,
                      network=CenterMask(load_config(CONFIG, overrides), CATEGORIES).network)
    both.save_to_preset(str(tmp_path / "both"))
    assert CenterMask.from_preset(str(tmp_path / "both")).mask_factors == "both"


# === Flip test ===


def mirror_outputs(outputs):
    """What a flip-equivariant network outputs for the mirror image: every map mirrored, dx
    becomes 1 - dx, and every S x S Local Shape grid mirrored."""
    mirrored = {k: tf.reverse(v, axis=[2]) for k, v in outputs.items()}
    dy, dx = tf.unstack(mirrored["offset"], axis=-1)
    mirrored["offset"] = tf.stack([dy, 1.0 - dx], axis=-1)
    b, h, w, c = mirrored["shape"].shape
    cells = int(c**0.5)
    grids = tf.reshape(mirrored["shape"], [b, h, w, cells, cells])
    mirrored["shape"] = tf.reshape(tf.reverse(grids, axis=[-1]), [b, h, w, c])
    return mirrored


def test_flip_average_of_an_equivariant_network_equals_its_plain_outputs():
    """A left-right symmetric input to a flip-equivariant network: the mirror run gives the
    mirrored outputs, and averaging them (flipped back) gives the plain outputs again."""
    from centermask_tf.arch.centernet.decoder import flip_averaged

    rng = np.random.default_rng(0)
    outputs = {k: tf.constant(rng.normal(0, 2, (2, 8, 10, c)), tf.float32)
               for k, c in {"heatmap": 3, "offset": 2, "size": 2, "shape": 16, "saliency": 1}.items()}
    averaged = flip_averaged(outputs, mirror_outputs(outputs))
    for key, value in outputs.items():
        np.testing.assert_allclose(averaged[key], value, atol=1e-4 if key == "heatmap" else 1e-6)


@BOTH_TYPES
def test_flip_test_detections_are_exactly_mirror_symmetric(shapes, workdir):
    """Flip-averaged outputs are flip-equivariant for any network: the detections in the
    mirror image are the mirrored detections (boxes reflected, masks mirrored)."""
    directory, _, _ = workdir
    detector = CenterMask.from_workdir(str(directory), overrides=["eval.flip_test=true"])
    plain = CenterMask.from_workdir(str(directory), overrides=["eval.flip_test=false"])
    _, images = val_images(shapes)
    size = detector.input_size
    canvas = tf.image.resize_with_pad(tf.cast(images[0], tf.float32), size, size)[None]
    here, there = detector.decode(canvas), detector.decode(tf.reverse(canvas, axis=[2]))
    np.testing.assert_allclose(there["scores"], here["scores"], atol=1e-5)
    np.testing.assert_array_equal(there["classes"], here["classes"])
    ymin, xmin, ymax, xmax = np.moveaxis(here["boxes"].numpy(), -1, 0)
    np.testing.assert_allclose(there["boxes"], np.stack([ymin, size - xmax, ymax, size - xmin], -1), atol=1e-3)
    np.testing.assert_allclose(there["masks"], here["masks"].numpy()[..., ::-1], atol=1e-4)
    assert np.abs(plain.decode(canvas)["scores"] - here["scores"]).max() > 1e-4  # it does average


def test_native_assembly_pastes_the_output_map_masks(shapes, workdir):
    """`model.assembly=native`: each mask is the native (output-map) mask, upsampled to the
    image; pasting the decoder's windows equals pasting the whole output map."""
    from centermask_tf.arch.centernet.decoder import CenterMaskDecoder
    from centermask_tf.arch.centernet.network import inference_network
    from centermask_tf.images import letterbox_image
    from centermask_tf.model.assembly import paste_masks

    directory, _, _ = workdir
    detector = CenterMask.from_workdir(str(directory), overrides=["model.assembly=native", "eval.flip_test=false"])
    _, images = val_images(shapes)
    image = images[1]
    (result,) = detector.detect(image)
    canvas, scale = letterbox_image(image, detector.input_size)
    decoder = CenterMaskDecoder.from_model_config(detector.config.model)
    decoder.assembly = "full"  # whole output maps, 0 outside each box
    outputs = inference_network(detector.network)(canvas[None])
    full = decoder(outputs, shape_head=detector.network.get_layer("shape"))
    n = len(result["scores"])
    maps = full["masks"].numpy()[0, :n]
    extent = np.full((1, n, 4), [0, 0, detector.input_size, detector.input_size], np.float32) / scale
    expected = paste_masks(maps[None], extent, *image.shape[:2]).numpy()[0] >= detector.config.model.mask_threshold
    assert n > 5 and expected.any()
    for got, want in zip(result["masks"], expected):
        assert (got != want).sum() <= 2  # float rounding at the threshold, at most
