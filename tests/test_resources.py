"""Asking for more than the cluster has fails at once with both numbers, where Ray
would otherwise wait forever."""

from __future__ import annotations

import time

import pytest

from detexp.errors import ResourceError
from detexp.train import train


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["scaling.num_workers=8"], ["scaling.num_workers=8", "the Ray cluster has"]),
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
