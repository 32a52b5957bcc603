"""The TorchTrainer of one training run, with each epoch's report, each worker failure and
rank 0's live progress streamed back to the driver while it runs.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import ray
import ray.train
from ray.train import UserCallback
from ray.train.torch import TorchTrainer
from ray.util.queue import Empty, Queue
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from detexp.checkpoint.storage import RunStorage
from detexp.distributed.controller import ForwardReports, ValidationNotDropped
from detexp.distributed.worker_loop import WorkerPlan, train_loop_per_worker

log = logging.getLogger(__name__)


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
    """Run the TorchTrainer on ``scaling``'s workers, keeping the last ``keep`` checkpoints
    in ``storage``; re-using a ``storage`` resumes from the last checkpoint of that run.
    ``callbacks``: more Ray Train callbacks (a Tune trial passes ``TuneReportCallback``)."""
    # On the driver's node, as Ray Train's controller: losing another node must not lose the reports.
    queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(
        ray.get_runtime_context().get_node_id(), soft=False)})
    if driver.on_step is not None:  # rank 0 puts its progress into the same queue
        plan = dataclasses.replace(plan, progress=queue)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=plan,
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
            failure_config=ray.train.FailureConfig(max_failures=scaling.max_failures),
            callbacks=[ForwardReports(queue), *callbacks],
        ),
        datasets=datasets,
        dataset_config=ValidationNotDropped(datasets_to_split=["train"]),
    )
    stop = threading.Event()
    thread = threading.Thread(target=_pump, args=(queue, stop, driver), name="detexp-progress", daemon=True)
    thread.start()
    try:
        return trainer.fit()
    finally:
        stop.set()
        thread.join(timeout=30)
        ray.kill(queue.actor)


def _pump(queue: Queue, stop: threading.Event, driver: DriverCallbacks) -> None:
    """Hand what the controller and rank 0 put into ``queue`` to the driver's callbacks,
    until ``stop`` is set and the queue is empty."""
    while not (stop.is_set() and queue.empty()):
        try:
            item = queue.get(timeout=0.5)
        except Empty:
            continue
        try:
            if "step" in item:
                if driver.on_step is not None:
                    driver.on_step(item["step"])
            elif "failure" in item:
                if driver.on_failure is not None:
                    driver.on_failure(item["failure"]["rank"], item["failure"]["error"])
            else:
                driver.on_report(item["metrics"], item["checkpoint"])
        except Exception:  # noqa: BLE001 - a logging failure must not kill training
            log.exception("could not record epoch results")
