"""detexp commands on a machine where a Ray already runs (a `ray start --head`, a notebook's):
each command starts a Ray of its own beside it, or joins it when told to (RAY_ADDRESS) and
checks what it asks for against what that Ray has free. Slow: `nox -s slow`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import ray
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

RAY_CLI = Path(sys.executable).parent / "ray"
# `ray start` turns on Ray's token authentication; a process that joins sends the token
# (~/.ray/auth_token) when this is set, as the docs tell users to.
JOINING = {"RAY_AUTH_MODE": "token"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def running_head():
    """A `ray start --head` of 1 CPU, in its own process group (stopped with it, so that no
    other Ray on the machine is touched); its address."""
    port = _free_port()
    head = subprocess.Popen(
        [str(RAY_CLI), "start", "--head", f"--port={port}", "--num-cpus=1",
         "--include-dashboard=false", "--disable-usage-stats", "--block",
         f"--temp-dir={tempfile.mkdtemp(prefix='rh', dir='/tmp')}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"{ray.util.get_node_ip_address()}:{port}"
    try:
        deadline = time.monotonic() + 120
        while _cluster_cpus(address) is None:
            assert time.monotonic() < deadline, "the head did not start"
            assert head.poll() is None, "ray start --head exited"
            time.sleep(1)
        yield address
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)


def _cluster_cpus(address: str) -> tuple[float, float] | None:
    """(free, total) CPUs of the Ray at ``address``, asked from another process; None while
    it does not answer."""
    code = (f"import ray; ray.init(address={address!r}, log_to_driver=False); "
            "print(ray.available_resources().get('CPU', 0), ray.cluster_resources().get('CPU', 0))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **JOINING})
    if out.returncode:
        return None
    free, total = out.stdout.split()[-2:]
    return float(free), float(total)


def _detexp(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "detexp", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_two_commands_at_once_beside_a_running_ray(running_head, tmp_path, shapes_cache):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    smoke = ["train", "+experiment=smoke", f"dataset.cache_dir={shapes_cache}", "schedule.epochs=1",
             "dataset.synth.num_train=16", "dataset.synth.num_val=8", "eval_at_end=false",
             "tracking.system_metrics=false"]
    jobs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        jobs.append(_detexp(smoke, tmp_path / name, {**env, "RAY_TMPDIR": tempfile.mkdtemp(prefix="rj", dir="/tmp")}))
    outputs = [job.communicate(timeout=900)[0] for job in jobs]
    for name, job, text in zip(("a", "b"), jobs, outputs, strict=True):
        assert job.returncode == 0, text[-3000:]
        assert "Traceback" not in text and "joined the Ray cluster" not in text  # a Ray of its own
        client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / name}/mlflow.db")
        (run,) = client.search_runs([client.get_experiment_by_name("detexp").experiment_id])
        assert run.info.status == "FINISHED" and "val/map_50" in run.data.metrics
    assert _cluster_cpus(running_head) == (1.0, 1.0)  # the running Ray was left alone


def test_a_command_joins_the_ray_that_ray_address_names_and_counts_what_it_has_free(running_head, tmp_path, shapes_cache):
    job = _detexp(["train", "+experiment=smoke", f"dataset.cache_dir={shapes_cache}"], tmp_path, {**os.environ, **JOINING, "RAY_ADDRESS": running_head})
    text = job.communicate(timeout=300)[0]
    assert job.returncode != 0
    assert f"joining the Ray cluster at RAY_ADDRESS={running_head}" in text
    assert "joined the Ray cluster" in text and "1 of 1 CPUs" in text
    assert "= 1.5 CPUs, but the Ray cluster has 1 CPUs free" in text
    assert "Traceback" not in text
