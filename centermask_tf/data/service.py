"""tf.data service processes: a dispatcher and the workers that prepare training batches.

    centermask data-service dispatcher --port 5050 --workers hostA:5051,hostB:5051
    centermask data-service worker --dispatcher hostD:5050 --port 5051   # on hostA and hostB
    centermask train ... --set data.service=grpc://hostD:5050

The trainer sends the pipeline's graph to the dispatcher; each worker runs it (reading the
TFDS files at the same paths, so they must be on a shared filesystem) and the trainer reads the
batches. The dispatcher lists its workers up front: the training pipeline shards by file, or
by batch when there are fewer files than workers, which needs a fixed worker list.
"""

import contextlib
import socket

import tensorflow as tf

_SERVICE = tf.data.experimental.service


def start_dispatcher(port, workers):
    """A started dispatcher on `port` (0: any free port) for the `workers` ("host:port")."""
    return _SERVICE.DispatchServer(_SERVICE.DispatcherConfig(port=port, worker_addresses=list(workers)))


def start_worker(dispatcher, port, address=None):
    """A started worker on `port` registered with `dispatcher` ("host:port") as `address`
    (default: this host's name and `port`, which must be one of the dispatcher's workers)."""
    address = address or f"{socket.gethostname()}:{port}"
    return _SERVICE.WorkerServer(
        _SERVICE.WorkerConfig(dispatcher_address=dispatcher, worker_address=address, port=port)
    )


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_service(workers):
    """A dispatcher and `workers` workers in this process on localhost; yields the
    dispatcher's `grpc://` address (None for 0 workers: no service)."""
    if not workers:
        yield None
        return
    ports = [_free_port() for _ in range(workers)]
    dispatcher = start_dispatcher(0, [f"localhost:{p}" for p in ports])
    address = dispatcher.target.split("://")[1]
    servers = [start_worker(address, p, f"localhost:{p}") for p in ports]
    try:
        yield dispatcher.target
    finally:
        for server in (*servers, dispatcher):
            server.stop()
