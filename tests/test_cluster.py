"""The same commands on a multi-node Ray cluster: two nodes on this machine
(``ray.cluster_utils.Cluster``), one or two CPUs each. Slow: `nox -s slow`."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import torch
from mlflow.tracking import MlflowClient
from ray.cluster_utils import Cluster

from conftest import compose_train
from detexp.commands.train import train
from detexp.commands.tune import tune
from detexp.errors import ResourceError

pytestmark = pytest.mark.slow

# Ray's dashboard (it serves `ray job submit`) comes with ray[default]: the cluster extra,
# which `nox -s slow` installs.
HAS_DASHBOARD = importlib.util.find_spec("aiohttp_cors") is not None


@pytest.fixture(scope="module")
def two_nodes():
    if ray.is_initialized():
        ray.shutdown()  # the session's local Ray; this module needs its own cluster
    # No spare CPU on the head: after the elastic test removes the other node, its two
    # 1-CPU workers would take both, and the data pipeline must still get one.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": HAS_DASHBOARD})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    cluster.dashboard_url = ray.init(address=cluster.address, log_to_driver=False).dashboard_url
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def _cfg(tmp_path, shapes_cache, *overrides, config_name="train"):
    return compose_train(
        [
            "+experiment=smoke", f"dataset.cache_dir={shapes_cache}",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", *overrides,
        ],
        config_name=config_name,
    )


def test_two_workers_train_on_two_nodes_with_shared_storage(two_nodes, tmp_path, shapes_cache):
    storage = tmp_path / "shared"
    cfg = _cfg(tmp_path, shapes_cache, "scaling.num_workers=2", "scaling.placement_strategy=SPREAD",
               f"scaling.storage_path={storage}")
    result = train(cfg, tmp_path / "run")

    assert result["train/nodes"] == 2 and result["train/workers"] == 2
    runs = list(storage.iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("run-")  # one folder per run dir
    assert list(runs[0].glob("checkpoint_*/checkpoint.pt"))
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    assert len(client.search_runs([client.get_experiment_by_name("detexp").experiment_id])) == 1
    assert Path(result["checkpoint"]).is_file()


def test_storage_the_nodes_cannot_write_is_refused_before_training(two_nodes, tmp_path, shapes_cache):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the storage folder should be")
    cfg = _cfg(tmp_path, shapes_cache, f"scaling.storage_path={blocker / 'ckpt'}")
    with pytest.raises(ResourceError, match=r"cannot write scaling.storage_path=.*not_a_folder/ckpt"):
        train(cfg, tmp_path / "run")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    assert not client.search_runs([client.get_experiment_by_name("detexp").experiment_id])


def _alive_nodes() -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


def _wait_for(condition, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f} s for {what}")
        time.sleep(0.5)


def _can_unshare_mounts() -> bool:
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True, check=False)
    return probe.returncode == 0


@contextlib.contextmanager
def _node_without(cluster, folder: Path) -> Iterator[str]:
    """A node (1 CPU) joining ``cluster`` from its own mount namespace, in which ``folder`` is
    an empty private tmpfs: the same path, another disk, as on a cluster whose nodes do not
    share it. Yields its node id; it leaves at the end."""
    before = _alive_nodes()
    ray_cli = Path(sys.executable).parent / "ray"
    node = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         f"mount -t tmpfs tmpfs {folder} && exec {ray_cli} start --address={cluster.address} "
         "--num-cpus=1 --block --disable-usage-stats"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        _wait_for(lambda: len(_alive_nodes() - before) == 1, "the private node to join")
        (node_id,) = _alive_nodes() - before
        yield node_id
    finally:
        os.killpg(node.pid, signal.SIGTERM)
        node.wait(timeout=60)
        _wait_for(lambda: _alive_nodes() == before, "the private node to leave")


@pytest.mark.skipif(sys.platform != "linux" or not _can_unshare_mounts(), reason="needs mount namespaces (root on Linux)")
def test_a_node_whose_storage_path_is_its_own_disk_is_named_before_training(two_nodes, tmp_path, shapes_cache):
    """A third node joins the cluster from its own mount namespace, in which the storage
    path is a private tmpfs: the same path, another disk, as on a cluster whose nodes do
    not share it."""
    storage = tmp_path / "ckpt"
    storage.mkdir()
    before = _alive_nodes()
    with _node_without(two_nodes, storage) as private_node:
        cfg = _cfg(tmp_path, shapes_cache, f"scaling.storage_path={storage}")
        with pytest.raises(ResourceError) as refused:
            train(cfg, tmp_path / "run")
        message = str(refused.value)
        assert f"({private_node[:12]}): cannot use scaling.storage_path={storage}" in message
        assert all(n[:12] not in message for n in before)  # the nodes that share the disk pass
        assert not list(storage.iterdir())  # the check cleaned up after itself; nothing trained


@pytest.mark.skipif(not HAS_DASHBOARD, reason='needs ray[default]: pip install -e ".[dev,cluster]"')
def test_ray_job_submit_runs_the_training_on_the_cluster(two_nodes, tmp_path, shapes_cache):
    """docs/distributed.md's command, with smoke overrides: the driver runs as a Ray job on
    the head node, MLFLOW_TRACKING_URI comes through the runtime env."""
    dashboard = f"http://{two_nodes.dashboard_url}"
    run_dir, store = tmp_path / "job-run", f"sqlite:///{tmp_path}/mlflow.db"
    repo = Path(__file__).resolve().parents[1]
    submitted = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", dashboard, "--working-dir", str(repo),
         "--runtime-env-json", json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": store}}), "--",
         sys.executable, "-m", "detexp", "train", "+experiment=smoke", f"dataset.cache_dir={shapes_cache}",
         "scaling.num_workers=2", f"scaling.storage_path={tmp_path / 'shared'}", "ray.address=auto",
         f"hydra.run.dir={run_dir}", "eval_at_end=false", "tracking.system_metrics=false"],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    assert "succeeded" in submitted.stdout
    assert (run_dir / "model_final.pt").is_file()
    assert list((tmp_path / "shared").glob("*/checkpoint_*/checkpoint.pt"))
    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("detexp").experiment_id])
    assert run.info.status == "FINISHED" and "val/map_50" in run.data.metrics


def test_tune_two_trials_on_the_cluster(two_nodes, tmp_path, shapes_cache):
    cfg = _cfg(tmp_path, shapes_cache, "tune.num_samples=2", "schedule.epochs=1", config_name="tune")
    result = tune(cfg, tmp_path / "tune")
    assert result["trials"] == 2
    assert Path(result["best_config"]).is_file()


@pytest.fixture
def private_node(two_nodes, tmp_path_factory):
    """A third node (1 CPU) in its own mount namespace, where the folder ``driver_only`` is an
    empty tmpfs: a node that does not see the driver's disk, as on a cluster whose nodes
    share only what is meant to be shared (here the rest of the test's folders)."""
    if sys.platform != "linux" or not _can_unshare_mounts():
        pytest.skip("needs mount namespaces (root on Linux)")
    driver_only = tmp_path_factory.mktemp("driver_only")
    with _node_without(two_nodes, driver_only):
        yield driver_only


def test_start_weights_only_the_driver_sees_reach_every_node(private_node, tmp_path, shapes_cache):
    """model.checkpoint on the driver's disk only: the workers on the other nodes (one of
    them cannot see that disk) get its bytes, as they get torchvision weights."""
    from detexp.modeling.detector import build_detector

    anchors = ["model.anchor_sizes=[32,64,128]", "model.anchor_ratios=[1.0]"]  # built before any data is read
    base = _cfg(tmp_path, shapes_cache, *anchors)
    start = private_node / "start.pt"
    torch.save(build_detector(base.model, len(base.dataset.classes) + 1).state_dict(), start)
    cfg = _cfg(tmp_path, shapes_cache, *anchors, "scaling.num_workers=3", "scaling.placement_strategy=SPREAD",
               f"scaling.storage_path={tmp_path / 'shared'}", f"model.checkpoint={start}", "schedule.epochs=1",
               "eval_at_end=false")
    result = train(cfg, private_node / "run")
    assert result["train/nodes"] == 3 and result["train/workers"] == 3  # the private node trained too
    assert Path(result["checkpoint"]).is_file()


def test_tune_logs_every_trial_to_the_drivers_sqlite_store(private_node, tmp_path, shapes_cache):
    """Three trials at once (5 CPUs, 1.5 a trial), the MLflow store and the tune's folder on
    the driver's disk only: every trial runs its actor on the driver's node, so all of them,
    with every epoch, reach that one SQLite file, written by three trials at once."""
    store = f"sqlite:///{private_node}/mlflow.db"
    cfg = _cfg(tmp_path, shapes_cache, "tune.num_samples=3", "schedule.epochs=2", "tune.scheduler=fifo",
               f"tracking.uri={store}", f"scaling.storage_path={tmp_path / 'shared'}", "eval_at_end=false",
               config_name="tune")
    result = tune(cfg, private_node / "tune")
    assert result["trials"] == 3
    client = MlflowClient(tracking_uri=store)
    children = client.search_runs(
        [client.get_experiment_by_name("detexp").experiment_id], f"tags.mlflow.parentRunId = '{result['run_id']}'"
    )
    assert len(children) == 3
    for child in children:
        assert child.info.status == "FINISHED"
        for key in ("train/loss", "val/map_50", "epoch"):
            assert sorted(m.step for m in client.get_metric_history(child.info.run_id, key)) == [0, 1], key
        assert (private_node / "tune" / "trials" / child.data.tags["detexp.trial_id"] / "model_final.pt").is_file()


def test_elastic_run_finishes_after_losing_a_node(two_nodes, tmp_path, shapes_cache):
    """scaling.min_workers=1: the second node goes away after the first epoch; Ray Train
    restarts from that epoch's checkpoint on the workers the head can hold while a CPU stays
    free for the data pipeline (the head's 2 CPUs would hold both 1-CPU workers, whose first
    batch would then never come), and the run ends with all its epochs. Last in this
    module: it takes a node away (and adds one back)."""
    (worker_node,) = two_nodes.worker_nodes
    cfg = _cfg(tmp_path, shapes_cache, "scaling.num_workers=2", "scaling.cpus_per_worker=1", "scaling.min_workers=1",
               "scaling.max_failures=2", "scaling.placement_strategy=SPREAD", "schedule.epochs=3",
               f"scaling.storage_path={tmp_path / 'shared'}")
    epochs: list[dict] = []

    def lose_a_node_after_the_first_epoch(metrics) -> None:
        epochs.append(dict(metrics))
        if len(epochs) == 1:
            two_nodes.remove_node(worker_node)

    try:
        result = train(cfg, tmp_path / "run", callbacks=[lose_a_node_after_the_first_epoch])
    finally:
        if worker_node in two_nodes.worker_nodes:
            two_nodes.remove_node(worker_node)
        two_nodes.add_node(num_cpus=2)
        two_nodes.wait_for_nodes()

    assert [int(m["epoch"]) for m in epochs] == [0, 1, 2]  # none repeated, none missing
    assert epochs[0]["train/workers"] == 2 and epochs[0]["train/nodes"] == 2
    assert [m["train/nodes"] for m in epochs[1:]] == [1, 1]  # the head, alone
    assert [m["train/workers"] for m in epochs[1:]] == [1, 1]  # one CPU of two: the other decodes
    assert result["epochs_done"] == 3
    assert Path(result["checkpoint"]).is_file()
