"""Shared fixtures: one local Ray for the whole test run, composed configs, and a
private cache / MLflow store per test so nothing touches the user's home."""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import detexp
from detexp.config import register_configs

CONF_DIR = str(Path(detexp.__file__).parent / "conf")

# Fake credentials for the S3 endpoint of tests/s3_server.py, set before Ray starts so that
# its workers inherit them as a user's would; and never a real account's by mistake.
os.environ.update({
    "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
})
os.environ.pop("AWS_SESSION_TOKEN", None)
os.environ.pop("AWS_PROFILE", None)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray, started once, as ``detexp train`` starts it: the CPUs Ray detects
    (2 on CI)."""
    from detexp.distributed.cluster import init_ray

    if not ray.is_initialized():
        init_ray(None)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3 endpoint on 127.0.0.1 (moto's server), for the whole run."""
    from s3_server import S3Server

    server = S3Server(tmp_path_factory.mktemp("s3") / "moto.log")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def shapes_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def compose_train(overrides: list[str] | None = None, config_name: str = "train") -> DictConfig:
    """Compose a config exactly as ``python -m detexp <command>`` would."""
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides or [])


@pytest.fixture(scope="session")
def trained_smoke(ray_cluster, shapes_cache, tmp_path_factory) -> SimpleNamespace:
    """ONE smoke training run (about a minute) with its own SQLite store, shared by
    test_eval and test_ui: ``root``, ``uri``, ``cfg``, ``result`` (what ``train`` returned),
    ``first_epoch`` (the first epoch's checkpoint) and ``seconds`` (the call's)."""
    from detexp.commands.train import train

    root = tmp_path_factory.mktemp("trained")
    uri = f"sqlite:///{root}/mlflow.db"
    overrides = [
        "+experiment=smoke", "dataset.synth.num_train=16", "dataset.synth.num_val=8",  # half the smoke data
        f"dataset.cache_dir={shapes_cache}", f"tracking.uri={uri}",
        "tracking.register_model=shapes",  # test_tracking predicts with models:/shapes/1
        "progress_every_s=0",  # every live progress message rank 0 sends becomes a line
    ]
    cfg = compose_train(overrides)
    lines, logger = _Lines(), logging.getLogger("detexp")
    level = logger.level
    logger.addHandler(lines)
    logger.setLevel(logging.INFO)
    started = time.perf_counter()
    try:
        result = train(cfg, root / "train", overrides)
    finally:
        logger.removeHandler(lines)
        logger.setLevel(level)
    first_epoch = sorted((root / "train" / "checkpoints" / "train").glob("checkpoint_*"))[0]
    return SimpleNamespace(
        root=root, uri=uri, cfg=cfg, overrides=overrides, result=result, first_epoch=first_epoch, log=lines.messages,
        seconds=time.perf_counter() - started,
    )


class _Lines(logging.Handler):
    """The console lines of a run made in-process (what a user would have read)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def smoke_cfg(tmp_path, shapes_cache):
    def make(*overrides: str) -> DictConfig:
        return compose_train(
            [
                "+experiment=smoke",
                f"dataset.cache_dir={shapes_cache}",
                f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                *overrides,
            ]
        )

    return make


@pytest.fixture(scope="session")
def _mlflow_schema(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store with MLflow's whole schema, made once."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-schema") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()  # creates the tables and migrates them
    return path


@pytest.fixture(autouse=True)
def _migrated_mlflow_store(request):
    """``<tmp_path>/mlflow.db``, the store most tests name, starts as a copy of an empty
    migrated store: MLflow creates a new SQLite store by running every schema migration,
    2.5-4.5 s each time on a 2-core machine. The shared ``trained_smoke`` run (and
    test_docs' module store) still let MLflow create theirs; so do tests marked
    ``no_mlflow_store``, which check that a refused command never made one."""
    if "tmp_path" in request.fixturenames and not request.node.get_closest_marker("no_mlflow_store"):
        store = request.getfixturevalue("tmp_path") / "mlflow.db"
        if not store.exists():
            shutil.copyfile(request.getfixturevalue("_mlflow_schema"), store)


@pytest.fixture(autouse=True)
def _quiet_logs():
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
