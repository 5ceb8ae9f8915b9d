import glob

import pytest

from centermask_tf.config import ConfigError, config_from_dict, load_config


@pytest.mark.parametrize("path", sorted(glob.glob("configs/*.yaml")))
def test_shipped_configs_load(path):
    config = load_config(path)
    assert config.model.input_size % 32 == 0


def test_shipped_configs_exist():
    names = {p.split("/")[-1] for p in glob.glob("configs/*.yaml")}
    assert {
        "shapes_tiny.yaml",
        "coco_resnet18.yaml",
        "coco_resnet50.yaml",
        "coco_dla34.yaml",
        "coco_hourglass104.yaml",
        "edge_mobilenetv3.yaml",
        "shapes_fcos_tiny.yaml",
        "coco_fcos_r50.yaml",
    } <= names


def test_override_sets_typed_values():
    config = config_from_dict(
        {"model": {"backbone": "resnet18"}},
        ["model.backbone=resnet50", "train.learning_rate=1e-3", "data.scale_range=[0.5, 1.5]"],
    )
    assert config.model.backbone == "resnet50"
    assert config.train.learning_rate == pytest.approx(1e-3)
    assert config.data.scale_range == [0.5, 1.5]


def test_override_typo_names_key_and_suggests():
    with pytest.raises(ConfigError) as err:
        load_config("configs/shapes_tiny.yaml", ["model.backbnoe=x"])
    assert "backbnoe" in str(err.value) and "'backbone'" in str(err.value)


def test_unknown_section_key_in_yaml_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  learnig_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"train\.learnig_rate.*'learning_rate'"):
        load_config(path)


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.input_size=abc", r"model\.input_size.*int"),
        ("train.epochs=1.5", r"train\.epochs.*int"),
        ("data.flip=3", r"data\.flip.*true or false"),
        ("model.backbone=resnet05", r"model\.backbone.*'resnet50'"),
        ("model.input_size=100", r"multiple of 32"),
    ],
)
def test_wrong_type_or_value_is_named(override, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({}, [override])


def test_int_is_accepted_for_float():
    assert config_from_dict({}, ["train.learning_rate=1"]).train.learning_rate == 1.0


def test_override_keeps_string_values_verbatim():
    """YAML would read `shapes/train #old copy` as `shapes/train` (a comment) and `a: b` as a
    mapping; a string field takes the text as given, and null/~/nothing unset an optional one."""
    config = load_config("configs/shapes_tiny.yaml", [
        "data.train.images=shapes/train #old copy", "data.val.images=a: b", "model.weights=null",
        "data.service=", "model.input_size=64", "eval.flip_test=true", "data.scale_range=[0.5, 1]",
        "data.beam_options=[--runner=DirectRunner, --direct_num_workers=2]",
    ])
    assert config.data.beam_options == ["--runner=DirectRunner", "--direct_num_workers=2"]
    assert config.data.train.images == "shapes/train #old copy" and config.data.val.images == "a: b"
    assert config.model.weights is None and config.data.service is None
    assert config.model.input_size == 64 and config.eval.flip_test is True and config.data.scale_range == [0.5, 1.0]
    with pytest.raises(ConfigError, match=r"got 'resnet18 #x'"):
        load_config("configs/shapes_tiny.yaml", ["model.backbone=resnet18 #x"])
