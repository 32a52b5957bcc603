"""Ray Train's worker group as detexp configures it (``DataParallelTrainer`` with
``controller.ProcessGroupConfig``):
two or more workers get the torch process group DDP trains with; one worker gets none,
so that Ray Train's controller never imports torch for it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import ray.cloudpickle
import ray.train
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

from detexp.distributed.controller import ProcessGroupConfig


def _write_process_group(folder: str) -> None:
    """Each rank writes what it sees of its process group into ``folder``/RANK.json."""
    import torch
    import torch.distributed as dist

    grouped = dist.is_initialized()
    total = torch.ones(1)
    if grouped:
        dist.all_reduce(total)  # every rank takes part, or this never returns
    context = ray.train.get_context()
    (Path(folder) / f"{context.get_world_rank()}.json").write_text(json.dumps({
        "grouped": grouped, "world": dist.get_world_size() if grouped else 1,
        "backend": dist.get_backend() if grouped else None, "sum": float(total[0]),
        "workers": context.get_world_size(),
    }))


# the workers cannot import this test module: they get the function itself
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.mark.parametrize(("workers", "want"), [
    (1, {"grouped": False, "world": 1, "backend": None, "sum": 1.0, "workers": 1}),
    (2, {"grouped": True, "world": 2, "backend": "gloo", "sum": 2.0, "workers": 2}),
])
def test_two_workers_share_a_gloo_process_group_and_one_worker_has_none(ray_cluster, tmp_path, workers, want):
    trainer = DataParallelTrainer(  # as detexp.distributed.trainer makes it, on the CPU
        _write_process_group, train_loop_config=str(tmp_path), backend_config=ProcessGroupConfig(backend="gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name="group", storage_path=str(tmp_path)),
    )
    trainer.fit()
    seen = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(workers)]
    assert seen == [want] * workers
