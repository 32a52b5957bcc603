"""What runs inside Ray Train's controller process: the train function it hands the
workers, the dataset split, the process group of the workers and the callback that hands
reports and worker failures to the driver.

Ray unpickles these objects in the controller (with the run's
:class:`~detexp.distributed.plan.WorkerPlan`), and their dataset plan in its DatasetManager
and SplitCoordinator actors, by importing the modules that define them. This module, like
:mod:`detexp.data.pipeline`, must not import torch at module level: in those three
processes a torch import costs seconds of CPU each, while nothing else can start, and the
first training step waits for them (benchmarks/RESULTS.md). ``tests/test_pipeline.py``
unpickles what the controller of a real trainer gets in a fresh process and checks that no
torch was loaded.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from ray.train import DataConfig, UserCallback
from ray.train.backend import Backend, BackendConfig
from ray.train.v2._internal.util import TrainingFramework
from ray.util.queue import Queue

from detexp.distributed.plan import WorkerPlan


@dataclass
class ProcessGroupConfig(BackendConfig):
    """Ray's ``TorchConfig`` (the same fields), without its module's torch import in the
    controller: a worker group of two or more gets the torch process group Ray's torch
    backend sets up (imported then), a group of one gets none, as it has no one to talk to
    (Ray's would start a gloo group whose TCP thread wakes 100 times a second). Elastic
    training decides again at every restart, by the size of the new group."""

    backend: str | None = None  # nccl with GPUs, else gloo (trainer.data_parallel_trainer says which)
    init_method: str = "env"
    timeout_s: int = 1800

    @property
    def backend_cls(self):
        return _ProcessGroup

    @property
    def train_func_context(self):  # read on the driver, entered in the workers
        return _WorkerDevice

    @property
    def framework(self):
        return TrainingFramework.TORCH

    def torch_config(self):
        from ray.train.torch.config import TorchConfig

        return TorchConfig(backend=self.backend, init_method=self.init_method, timeout_s=self.timeout_s)


def run_worker(plan: WorkerPlan) -> None:
    """What every Train worker runs: :func:`detexp.distributed.worker_loop.train_loop_per_worker`,
    imported in the worker. Ray pickles this function by its module's name, so the driver
    that hands it to the trainer and the controller that unpickles it import no torch."""
    from detexp.distributed.worker_loop import train_loop_per_worker

    train_loop_per_worker(plan)


class _WorkerDevice:
    """Ray's ``TorchConfigContextManager`` (a worker's default CUDA device is its own),
    imported in the worker: the driver that wraps the train function imports no torch."""

    def __enter__(self):
        from ray.train.torch.config import TorchConfigContextManager

        self._device = TorchConfigContextManager()
        return self._device.__enter__()

    def __exit__(self, *exc_info):
        return self._device.__exit__(*exc_info)


class _ProcessGroup(Backend):
    """Ray's torch backend, called for worker groups of two or more only."""

    share_cuda_visible_devices = True  # as Ray's torch backend: NCCL between GPUs of one node

    @staticmethod
    def _torch_backend():
        from ray.train.torch.config import _TorchBackend

        return _TorchBackend()

    def on_start(self, worker_group, backend_config: ProcessGroupConfig):
        if len(worker_group) > 1:
            self._torch_backend().on_start(worker_group, backend_config.torch_config())

    def on_training_start(self, worker_group, backend_config: ProcessGroupConfig):
        if len(worker_group) > 1:
            self._torch_backend().on_training_start(worker_group, backend_config.torch_config())

    def on_shutdown(self, worker_group, backend_config: ProcessGroupConfig):
        if len(worker_group) > 1:
            self._torch_backend().on_shutdown(worker_group, backend_config.torch_config())


class ValidationNotDropped(DataConfig):
    """Train shards are equal, since DDP needs the same number of steps on every worker;
    val shards are not, so that no image is dropped from the metrics. The train rows reach
    the workers in the seeded shuffle's order, not in the order their decode tasks finish,
    so that a run with the same seed trains on the same batches (the same losses)."""

    def __init__(self):
        from ray.data import DataContext

        # the driver's options, as Ray Train's default takes them (a copy: no deprecation warning)
        options = copy.deepcopy(DataContext.get_current().execution_options)
        options.preserve_order = True
        super().__init__(datasets_to_split=["train"], execution_options={"train": options})

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        splits = {k: v for k, v in datasets.items() if k != "val"}
        output = super().configure(splits, world_size, worker_handles, worker_node_ids, **kwargs)
        if "val" in datasets:
            val = datasets["val"]
            # One worker reads it all from its own process (it is not training then): no
            # SplitCoordinator actor to start, a second of CPU a run on a small machine.
            shards = [val.iterator()] if world_size == 1 else val.streaming_split(world_size, equal=False)
            for rank, it in enumerate(shards):
                output[rank]["val"] = it
        return output


class ForwardReports(UserCallback):
    """Runs in the Ray Train controller: hands each epoch's report, and each worker
    failure, to the driver."""

    def __init__(self, queue: Queue):
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint):
        self.queue.put({"metrics": metrics[0], "checkpoint": checkpoint})

    def after_exception(self, run_context, worker_exceptions):
        rank, exc = min(worker_exceptions.items(), key=lambda item: item[0])
        self.queue.put({"failure": {"rank": rank, "error": describe_failure(exc)}})


def describe_failure(exc: BaseException, limit: int = 160) -> str:
    """One line about a worker failure: ``Type: first line`` of an exception raised by our
    code (Ray Train hands it over wrapped, with its traceback as the text), otherwise the
    telling line of Ray's message, cut after its first sentence when it runs on."""
    base = getattr(exc, "_base_exc", None)  # ray.train's UserExceptionWithTraceback
    if isinstance(base, BaseException):
        lines = [line.strip() for line in str(base).strip().splitlines() if line.strip()]
        line = f"{type(base).__name__}: {lines[0]}" if lines else type(base).__name__
    else:
        cause = getattr(exc, "cause", None) or exc
        lines = [line.strip() for line in str(cause).strip().splitlines() if line.strip()]
        line = lines[-1] if lines else type(cause).__name__
    if len(line) > limit:
        cut = line.find(". ", 20, limit)
        line = (line[: cut + 1] if cut > 0 else line[: limit - 4]) + " ..."
    return line
