import os

# Quiet TF's C++ start-up chatter; must be set before TensorFlow is imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng():
    return np.random.default_rng(0)


TINY_RUN = [
    "model.width_multiplier=0.125", "model.input_size=64", "model.head_conv=8",
    "model.shape_size=8", "model.mask_size=8", "data.max_instances=8",
    "train.batch_size=4", "train.epochs=2", "train.steps_per_epoch=3", "train.warmup_steps=1",
    "eval.every_epochs=0", "eval.batch_size=4",
]


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    """A 16/4-image shapes set, its TFDS dataset built once (so concurrent worker processes never
    race to build it), and the overrides that train a tiny model on it in seconds."""
    from centermask_tf.config import load_config
    from centermask_tf.data.shapes import make_shapes
    from centermask_tf.data.tfds_builder import prepare_dataset

    root = tmp_path_factory.mktemp("shapes")
    make_shapes(str(root), train=16, val=4, seed=1)
    overrides = [
        f"data.train.annotations={root}/annotations/instances_train.json",
        f"data.train.images={root}/train",
        f"data.val.annotations={root}/annotations/instances_val.json",
        f"data.val.images={root}/val",
        f"data.tfds_data_dir={root}/tfds",
        *TINY_RUN,
    ]
    prepare_dataset(load_config("configs/shapes_tiny.yaml", overrides).data)
    return root, overrides


@pytest.fixture(scope="module")
def untrained_workdir(shapes, tmp_path_factory):
    """A workdir with randomly initialised weights and a low mask threshold (masks non-empty)."""
    from centermask_tf.arch import build_network
    from centermask_tf.config import load_config
    from centermask_tf.data.tfds_builder import prepare_dataset
    from centermask_tf.workdir import save_run_files

    _, overrides = shapes
    overrides = overrides + ["model.mask_threshold=0.1"]
    config = load_config("configs/shapes_tiny.yaml", overrides)
    workdir = tmp_path_factory.mktemp("workdir")
    builder = prepare_dataset(config.data)
    save_run_files(config, str(workdir), builder.info.metadata["categories"])
    network = build_network(config.model)
    # Random heads predict near-zero sizes; 6 output pixels gives boxes (and masks) real extent.
    network.get_layer("size").out.bias.assign([6.0, 6.0])
    (workdir / "checkpoints").mkdir()
    network.save_weights(str(workdir / "checkpoints" / "last.weights.h5"))
    return workdir, overrides
