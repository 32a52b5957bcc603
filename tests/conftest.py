"""Shared fixtures: one local Ray for the whole test run, composed configs, and a
private cache / MLflow store per test so nothing touches the user's home."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import ray
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import detexp
from detexp.config import register_configs

CONF_DIR = str(Path(detexp.__file__).parent / "conf")


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray, started once: 2 cores + 1 logical CPU for the data pipeline,
    like ``detexp train`` starts it."""
    from detexp.launch import init_ray

    if not ray.is_initialized():
        init_ray(None)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def shapes_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def compose_train(overrides: list[str] | None = None, config_name: str = "train") -> DictConfig:
    """Compose a config exactly as ``python -m detexp <command>`` would."""
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides or [])


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


@pytest.fixture(autouse=True)
def _quiet_logs():
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
