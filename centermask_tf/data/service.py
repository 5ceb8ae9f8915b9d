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
import errno
import socket
import time

import tensorflow as tf

from centermask_tf.errors import UserError

_SERVICE = tf.data.experimental.service
# How long a trainer or worker waits for the dispatcher to accept a connection: a tf.data
# service client pointed where nothing listens waits forever without a word.
CONNECT_TIMEOUT = 15.0


class ServiceError(UserError):
    """A tf.data service address that is malformed, unreachable or already taken."""


def parse_address(address, what):
    """`(host, port)` of "host:port" or "grpc://host:port"; `what` names the setting in errors."""
    text = address.split("://", 1)[1] if address.startswith("grpc://") else address
    host, _, port = text.rpartition(":")
    if not host or any(c in host for c in ":/ ") or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ServiceError(f"{what} must be host:port with a port in 1-65535, got {address!r}.")
    return host, int(port)


def wait_reachable(address, what, timeout=CONNECT_TIMEOUT):
    """Returns once something accepts TCP connections at `address`; raises `ServiceError` after
    `timeout` seconds of refused or unanswered connections."""
    host, port = parse_address(address, what)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(2.0, timeout)):
                return
        except OSError as e:
            if time.monotonic() + 0.5 > deadline:
                reason = e.strerror or type(e).__name__
                raise ServiceError(
                    f"no tf.data service dispatcher answers at {host}:{port} ({what}; {reason} for "
                    f"{timeout:.0f} s). Start one with `centermask data-service dispatcher --port {port} "
                    "--workers ...` or fix the address."
                ) from None
            time.sleep(0.5)


def _refuse_busy(port):
    """gRPC lets two servers share a port (SO_REUSEPORT), so a busy port is found out here."""
    with socket.socket(socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("::" if socket.has_ipv6 else "", port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ServiceError(f"port {port} is already in use; stop what listens there or pick another --port.") from None
            # Any other failure (no IPv6 on this host, say) leaves the check to gRPC.


def start_dispatcher(port, workers):
    """A started dispatcher on `port` (0: any free port; its `target` names the one taken) for
    the `workers` ("host:port")."""
    for worker in workers:
        parse_address(worker, "--workers")
    if port:
        _refuse_busy(port)
    return _SERVICE.DispatchServer(_SERVICE.DispatcherConfig(port=port, worker_addresses=list(workers)))


def start_worker(dispatcher, port, address=None):
    """A started worker on `port` registered with `dispatcher` ("host:port") as `address`
    (default: this host's name and `port`, which must be one of the dispatcher's workers)."""
    wait_reachable(dispatcher, "--dispatcher")
    _refuse_busy(port)
    address = address or f"{socket.gethostname()}:{port}"
    parse_address(address, "--address")
    return _SERVICE.WorkerServer(
        _SERVICE.WorkerConfig(dispatcher_address=dispatcher, worker_address=address, port=port)
    )


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def bound_port(server):
    """The port a started dispatcher listens on (the one gRPC picked for port 0)."""
    return parse_address(server.target, "dispatcher")[1]


@contextlib.contextmanager
def local_service(workers):
    """A dispatcher and `workers` workers in this process on localhost; yields the
    dispatcher's `grpc://` address (None for 0 workers: no service)."""
    if not workers:
        yield None
        return
    ports = [_free_port() for _ in range(workers)]
    dispatcher = start_dispatcher(0, [f"localhost:{p}" for p in ports])
    address = f"localhost:{bound_port(dispatcher)}"
    servers = [start_worker(address, p, f"localhost:{p}") for p in ports]
    try:
        yield f"grpc://{address}"
    finally:
        for server in (*servers, dispatcher):
            server.stop()
