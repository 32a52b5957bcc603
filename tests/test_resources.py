"""Asking for more than the cluster has fails at once with both numbers, where Ray
would otherwise wait forever."""

from __future__ import annotations

import time

import pytest

from detexp.commands.train import train
from detexp.errors import ResourceError


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["scaling.num_workers=8"], ["scaling.num_workers=8", "the Ray cluster has", "or reserve scaling.cpus_per_worker=0."]),
        (["scaling.use_gpu=true"], ["GPU workers", "has 0 GPUs"]),
    ],
)
def test_impossible_request_fails_fast_saying_what_was_asked(ray_cluster, smoke_cfg, tmp_path, overrides, words):
    started = time.perf_counter()
    with pytest.raises(ResourceError) as info:
        train(smoke_cfg(*overrides), tmp_path / "run")
    assert time.perf_counter() - started < 60
    for word in words:
        assert word in str(info.value)


def test_a_local_rays_workers_get_the_malloc_settings(ray_cluster):
    """The processes of a Ray that detexp starts keep freed memory for the next step instead
    of faulting it in again (detexp.distributed.cluster.MALLOC_ENV); what the worker process itself was
    started with is what counts, since glibc reads it once."""
    from detexp.distributed.cluster import MALLOC_ENV

    @ray_cluster.remote(num_cpus=0)
    def started_with() -> dict[str, str]:
        import os
        from pathlib import Path

        environ = Path(f"/proc/{os.getpid()}/environ").read_bytes().split(b"\0")
        pairs = dict(item.decode().split("=", 1) for item in environ if b"=" in item)
        return {key: pairs.get(key) for key in MALLOC_ENV}

    assert ray_cluster.get(started_with.remote()) == MALLOC_ENV
