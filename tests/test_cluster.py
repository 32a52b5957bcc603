"""The same commands on a multi-node Ray cluster: two nodes on this machine
(``ray.cluster_utils.Cluster``), one or two CPUs each. Slow: `nox -s slow`."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
from mlflow.tracking import MlflowClient
from ray.cluster_utils import Cluster

from conftest import compose_train
from detexp.errors import ResourceError
from detexp.train import train
from detexp.tune import tune

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_nodes():
    if ray.is_initialized():
        ray.shutdown()  # the session's local Ray; this module needs its own cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
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


def test_tune_two_trials_on_the_cluster(two_nodes, tmp_path, shapes_cache):
    cfg = _cfg(tmp_path, shapes_cache, "tune.num_samples=2", "schedule.epochs=1", config_name="tune")
    result = tune(cfg, tmp_path / "tune")
    assert result["trials"] == 2
    assert Path(result["best_config"]).is_file()
