"""tf.data service: a dispatcher and two workers in-process on localhost prepare the training
batches; they are the in-process pipeline's batches, and training runs on them."""

import csv

import numpy as np
import pytest

from centermask_tf.cli import main
from centermask_tf.config import load_config
from centermask_tf.data.service import local_service
from centermask_tf.data.tfds_builder import prepare_dataset
from centermask_tf.training import config_train_dataset
from tests.helpers import train_args


@pytest.fixture(scope="module")
def service():
    with local_service(2) as address:
        yield address


def test_service_batches_are_the_in_process_batches(shapes, service):
    """Deterministic mode: every batch the workers send is one of the local pipeline's, none twice."""
    _, overrides = shapes
    config = load_config("configs/shapes_tiny.yaml", overrides + ["data.deterministic=true"])
    local = [images.numpy() for images, _ in config_train_dataset(config, prepare_dataset(config.data)).take(16)]
    remote_config = load_config("configs/shapes_tiny.yaml", overrides + ["data.deterministic=true", f"data.service={service}"])
    matched = []
    for images, targets in config_train_dataset(remote_config, prepare_dataset(config.data)).take(8):
        same = [i for i, batch in enumerate(local) if np.array_equal(batch, images.numpy())]
        assert len(same) == 1, "a service batch that the local pipeline does not make"
        matched.append(same[0])
        assert set(targets) >= {"heatmap", "indices", "masks"}
    assert len(set(matched)) == 8, matched


def test_training_reads_batches_from_the_service(shapes, service, tmp_path):
    assert main(train_args(shapes, tmp_path, f"data.service={service}", "train.epochs=3")) == 0
    with open(tmp_path / "history.csv") as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f)]
    assert len(losses) == 3 and np.isfinite(losses).all() and losses[-1] < losses[0], losses


def test_service_address_is_checked():
    from centermask_tf.config import ConfigError

    with pytest.raises(ConfigError, match="grpc://host:port"):
        load_config("configs/shapes_tiny.yaml", ["data.service=localhost:5050"])
    assert main(["data-service", "dispatcher", "--port", "0"]) == 2
