"""Worker processes for CPU-bound work, started so that they never outlive their parent.

A process pool's workers block on its task queue; when the parent is killed (SIGKILL, OOM),
nothing tells them, and they would sit there holding their memory for good. Each worker here
watches its parent and exits when it is gone.
"""

import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor


def _exit_with_parent(parent, interval=1.0):
    def watch():
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def process_pool(workers):
    """A `ProcessPoolExecutor` of `workers` spawned processes that exit when this one dies.
    spawn, not fork: a parent with TensorFlow's threads running cannot be forked safely."""
    return ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"), initializer=_exit_with_parent,
        initargs=(os.getpid(),),
    )
