"""tf.data service: a dispatcher and two workers in-process on localhost prepare the training
batches; they are the in-process pipeline's batches, and training runs on them."""

import csv

import numpy as np
import pytest

from centermask_tf.cli import main
from centermask_tf.config import load_config
from centermask_tf.data.service import local_service
from centermask_tf.data.tfds_builder import prepare_dataset
from centermask_tf.training.setup import config_train_dataset
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


def test_an_address_where_nothing_listens_is_refused_within_the_connect_timeout(shapes, tmp_path, capsys):
    import time

    from centermask_tf.data.service import CONNECT_TIMEOUT, _free_port

    start = time.monotonic()
    assert main(train_args(shapes, tmp_path, f"data.service=grpc://localhost:{_free_port()}")) == 2
    assert time.monotonic() - start < CONNECT_TIMEOUT + 20
    assert "no tf.data service dispatcher answers at localhost:" in capsys.readouterr().err


@pytest.mark.parametrize("address", ["grpc://localhost:99999999", "grpc://localhost:0", "grpc://a b:5050"])
def test_service_ports_out_of_range_are_refused(address):
    from centermask_tf.config import ConfigError

    with pytest.raises(ConfigError, match="port in 1-65535"):
        load_config("configs/shapes_tiny.yaml", [f"data.service={address}"])


def test_dispatcher_prints_the_port_it_took_and_a_busy_port_is_refused():
    """`--port 0` takes a free port and prints it; a second dispatcher on that port is refused
    (gRPC would let both listen); a worker's malformed --dispatcher is refused at once."""
    import socket
    import subprocess
    import sys

    command = [sys.executable, "-m", "centermask_tf.cli", "data-service", "dispatcher", "--workers", "localhost:1"]
    first = subprocess.Popen([*command, "--port", "0"], stdout=subprocess.PIPE, text=True)
    try:
        line = first.stdout.readline()
        port = int(line.split("dispatcher on port ")[1].split()[0])
        assert port > 0 and f"grpc://{socket.gethostname()}:{port}" in line
        socket.create_connection(("localhost", port), timeout=5).close()
        second = subprocess.run([*command, "--port", str(port)], capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and f"port {port} is already in use" in second.stderr
    finally:
        first.kill()
    worker = subprocess.run([sys.executable, "-m", "centermask_tf.cli", "data-service", "worker",
                             "--dispatcher", "not a host:::", "--port", "5051"],
                            capture_output=True, text=True, timeout=120)
    assert worker.returncode == 2 and "--dispatcher must be host:port" in worker.stderr
