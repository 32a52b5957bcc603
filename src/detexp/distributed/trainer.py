"""The Ray Train trainer of one training run, with each epoch's report, each worker failure
and rank 0's live progress streamed back to the driver while it runs.

It is Ray's ``DataParallelTrainer`` with the torch process group of
:class:`~detexp.distributed.controller.ProcessGroupConfig`: what ``TorchTrainer`` is, without
its torch import on the driver (a Tune trial's actor is one), which pays seconds of CPU for
it before the first training step on a small machine (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import ray
import ray.train
from ray.train import UserCallback
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
from ray.util.queue import Empty, Queue
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from detexp.checkpoint.storage import RunStorage
from detexp.distributed.cluster import data_cpus_kept
from detexp.distributed.controller import (
    ForwardReports,
    ProcessGroupConfig,
    ValidationNotDropped,
    run_worker,
)
from detexp.distributed.plan import WorkerPlan
from detexp.distributed.watchdog import STALL_KEY
from detexp.errors import WorkerStalledError

log = logging.getLogger(__name__)

# How long Ray Train waits for its worker group to be placed before it tries again (its
# RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, 60 s by default).
PLACEMENT_WAIT_S = float(os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", 60))


@dataclass(frozen=True)
class DriverCallbacks:
    """What the driver is called with while the trainer runs (from a thread of its own)."""

    on_report: Callable[[dict[str, Any], ray.train.Checkpoint | None], None]  # every epoch, as it ends
    # A worker failed (Ray Train then restarts the workers from the last checkpoint, up to
    # scaling.max_failures times): its rank and one line about the error.
    on_failure: Callable[[int, str], None] | None = None
    # Every few seconds during an epoch: rank 0's step, total, images/s, running loss. None:
    # rank 0 sends no progress.
    on_step: Callable[[dict[str, Any]], None] | None = None


def fit(
    plan: WorkerPlan,
    datasets: dict[str, ray.data.Dataset],
    scaling: Any,
    storage: RunStorage,
    driver: DriverCallbacks,
    *,
    keep: int,
    callbacks: Sequence[UserCallback] = (),
) -> ray.train.Result:
    """Run the trainer on ``scaling``'s workers, keeping the last ``keep`` checkpoints
    in ``storage``; re-using a ``storage`` resumes from the last checkpoint of that run.
    ``callbacks``: more Ray Train callbacks (a Tune trial passes ``TuneReportCallback``)."""
    # On the driver's node, as Ray Train's controller: losing another node must not lose the reports.
    queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(
        ray.get_runtime_context().get_node_id(), soft=False)})
    # rank 0 puts its progress into the same queue, and a stalled worker its last word
    plan = dataclasses.replace(plan, events=queue, live_steps=driver.on_step is not None)
    trainer = data_parallel_trainer(plan, datasets, scaling, storage, keep=keep, callbacks=[ForwardReports(queue), *callbacks])
    stop = threading.Event()
    pump = _Pump(queue, stop, driver)
    thread = threading.Thread(target=pump.run, name="detexp-progress", daemon=True)
    thread.start()
    try:
        with data_cpus_kept(storage.name) if scaling.min_workers else contextlib.nullcontext():
            result = trainer.fit()
    except BaseException as exc:
        stop.set()
        thread.join(timeout=30)  # what arrived before the failure, but never a wait for ever
        if pump.stalled is not None and isinstance(exc, ray.train.TrainingFailedError):
            raise WorkerStalledError(pump.stalled) from exc
        raise
    else:  # every report is in the queue by now: hand them all over before the driver reads them
        stop.set()
        thread.join()
        return result
    finally:
        ray.kill(queue.actor)


def data_parallel_trainer(plan: WorkerPlan, datasets: dict[str, ray.data.Dataset], scaling: Any,
                          storage: RunStorage, *, keep: int,
                          callbacks: Sequence[UserCallback] = ()) -> DataParallelTrainer:
    """The trainer of :func:`fit`: neither the driver nor the controller imports torch for
    it (``controller.run_worker``, ``plan.WorkerPlan``, ``controller.ProcessGroupConfig``)."""
    return DataParallelTrainer(
        run_worker,
        train_loop_config=plan,
        backend_config=ProcessGroupConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            # (min, max) is Ray Train's elastic mode: it restarts on the workers it can place
            num_workers=(scaling.min_workers, scaling.num_workers) if scaling.min_workers else scaling.num_workers,
            use_gpu=scaling.use_gpu,
            placement_strategy=str(scaling.placement_strategy),
            resources_per_worker={"CPU": scaling.cpus_per_worker, **({"GPU": 1} if scaling.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=storage.name,
            storage_path=storage.path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep),
            failure_config=ray.train.FailureConfig(
                max_failures=scaling.max_failures,
                controller_failure_limit=placement_tries(plan.cfg["trainer"].get("stall_timeout_s")),
            ),
            callbacks=list(callbacks),
        ),
        datasets=datasets,
        dataset_config=ValidationNotDropped(),
    )


def placement_tries(stall_timeout_s: float | None) -> int:
    """Ray Train's ``controller_failure_limit``: how many times it tries to place the worker
    group (each try waits :data:`PLACEMENT_WAIT_S`) before the run fails; -1 (for ever)
    when the stall timeout is off."""
    if not stall_timeout_s:
        return -1
    return max(math.ceil(stall_timeout_s / PLACEMENT_WAIT_S), 1)


class _Pump:
    """Hands what the controller and the workers put into ``queue`` to the driver's
    callbacks, until ``stop`` is set and the queue is empty; keeps a stalled worker's
    message, which then stands for the failure Ray Train reports (a killed process)."""

    def __init__(self, queue: Queue, stop: threading.Event, driver: DriverCallbacks):
        self.queue, self.stop, self.driver = queue, stop, driver
        self.stalled: str | None = None  # "worker N: ...", the last stall
        self._unreported: tuple[int, str] | None = None  # a stall whose failure has not come yet

    def run(self) -> None:
        driver = self.driver
        while not (self.stop.is_set() and self.queue.empty()):
            try:
                item = self.queue.get(timeout=0.5)
            except Empty:
                continue
            try:
                if "step" in item:
                    if driver.on_step is not None:
                        driver.on_step(item["step"])
                elif STALL_KEY in item:
                    stall = item[STALL_KEY]
                    self.stalled = f"worker {stall['rank']}: {stall['message']}"
                    self._unreported = (stall["rank"], stall["message"])
                elif "failure" in item:
                    rank, error = item["failure"]["rank"], item["failure"]["error"]
                    if self._unreported is not None:  # the killed process Ray reports: say why
                        (rank, error), self._unreported = self._unreported, None
                    if driver.on_failure is not None:
                        driver.on_failure(rank, error)
                else:
                    self.stalled = None  # trained on after it: a later failure is another one
                    driver.on_report(item["metrics"], item["checkpoint"])
            except Exception:  # noqa: BLE001 - a logging failure must not kill training
                log.exception("could not record epoch results")
