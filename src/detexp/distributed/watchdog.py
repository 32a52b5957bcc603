"""``trainer.stall_timeout_s``: a Train worker that makes no progress for that long fails,
saying what it was waiting for, instead of waiting for ever.

What stalls a distributed run is rarely the worker itself: its data pipeline has no CPU
to decode on (every CPU of the cluster taken by workers), another rank stopped and the
gradient all-reduce waits for it, a checkpoint upload hangs on storage. A thread of each
worker notes what the training loop is doing (:meth:`Watchdog.doing`, at each batch, step
and report) and, when the loop has not moved on for the timeout, sends one line about it
to the driver and kills its own process: Ray Train sees a failed worker, which counts
under ``scaling.max_failures`` like any other failure (a restart from the last checkpoint,
or the run ends). Killing is the one way out of a wait inside C++ (gloo, a Ray get).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

log = logging.getLogger("detexp")

STALL_KEY = "stall"  # the driver's queue item: {"stall": {"rank": ..., "message": ...}}


class Watchdog:
    """One per worker process, started by :meth:`start`; ``timeout_s`` None: off."""

    def __init__(self, timeout_s: float | None, rank: int, queue: Any = None):
        self.timeout_s, self.rank, self.queue = timeout_s, rank, queue
        self.what = "starting (building the model, restoring the checkpoint)"
        self.data_wait = False  # waiting for a batch from Ray Data
        self.since = time.monotonic()
        self._stop = threading.Event()

    def start(self) -> Watchdog:
        if self.timeout_s:
            threading.Thread(target=self._watch, name="detexp-watchdog", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def doing(self, what: str, *, data_wait: bool = False) -> None:
        """The loop moved on: to ``what`` (words for the message), waiting for data or not."""
        self.what, self.data_wait, self.since = what, data_wait, time.monotonic()

    def batches(self, tables: Iterable, what: str) -> Iterator:
        """``tables`` (a shard's batches), noting each wait for a batch and each step on it;
        ``what``: the loop, e.g. ``"training epoch 3/12"``."""
        it = iter(tables)
        for step in range(1, 1 << 62):
            self.doing(f"waiting for batch {step} of {what} from the data pipeline", data_wait=True)
            try:
                table = next(it)
            except StopIteration:
                return
            self.doing(f"on batch {step} of {what} (the forward and backward pass, the gradient "
                       "all-reduce that waits for every rank)")
            yield table

    def _watch(self) -> None:
        interval = min(max(self.timeout_s / 10, 0.5), 10.0)
        while not self._stop.wait(interval):
            stalled = time.monotonic() - self.since
            if stalled >= self.timeout_s:
                self._fail(stalled)

    def _fail(self, stalled: float) -> None:
        message = (f"no progress for {stalled:.0f} s (trainer.stall_timeout_s={self.timeout_s:g}) while "
                   f"{self.what}" + (f"; {_data_cpus()}" if self.data_wait else ""))
        print(f"detexp: worker {self.rank}: {message}; ending this worker", file=sys.stderr, flush=True)
        if self.queue is not None:
            with contextlib.suppress(Exception):  # the driver may be gone too; the kill still counts
                self.queue.put({STALL_KEY: {"rank": self.rank, "message": message}}, timeout=10)
        os.kill(os.getpid(), signal.SIGKILL)


def _data_cpus() -> str:
    """What the data pipeline had to run on, for the message."""
    try:
        import ray

        free, total = ray.available_resources().get("CPU", 0.0), ray.cluster_resources().get("CPU", 0.0)
    except Exception:  # noqa: BLE001 - the message goes out without it
        return "Ray Data decodes the images in tasks that need a CPU no worker holds"
    return (f"Ray Data decodes the images in tasks that need a CPU no worker holds, and {free:g} of the "
            f"cluster's {total:g} CPUs are free")
