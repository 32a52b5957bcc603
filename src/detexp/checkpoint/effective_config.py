"""The config eval and predict run with: a checkpoint's stored ``model`` and ``dataset``
config, with the keys given on the command line applied over it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from detexp.checkpoint.files import CheckpointInfo, find_checkpoint, load_state, read_checkpoint
from detexp.config import DatasetConfig, ModelConfig, fit_schema, plain
from detexp.errors import ConfigError


def _given(overrides: Sequence[str], group: str) -> tuple[bool, list[str]]:
    """Whether ``group=option`` was given, and the ``group.key`` paths set on the command line."""
    chosen, keys = False, []
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0].split("@", 1)[0].strip()
        if key == group:
            chosen = True
        elif key.startswith(group + "."):
            keys.append(key[len(group) + 1 :])
    return chosen, keys


def _section(cfg: DictConfig, stored: dict[str, Any], group: str, schema: type, overrides: Sequence[str]):
    """``cfg[group]`` if the group was chosen on the command line, else the checkpoint's
    ``group`` config with the command line's ``group.*`` keys applied."""
    chosen, keys = _given(overrides, group)
    if chosen or group not in stored:
        return cfg[group]
    try:
        base = fit_schema(schema, stored[group], f"the checkpoint's {group} config")
    except Exception as exc:  # noqa: BLE001 - a value of the wrong type
        raise ConfigError(f"the checkpoint's {group} config does not fit this detexp: {exc}") from None
    for key in keys:
        OmegaConf.update(base, key, OmegaConf.select(cfg[group], key), merge=False)
    return base


def effective_config(cfg: DictConfig, ckpt: CheckpointInfo, overrides: Sequence[str]) -> DictConfig:
    """``cfg`` with ``model`` and ``dataset`` taken from the checkpoint except for the keys
    given in ``overrides``, and the checkpoint's class names unless ``dataset.classes`` was given."""
    out = cfg.copy()
    model = _section(cfg, ckpt.config, "model", ModelConfig, overrides)
    dataset = _section(cfg, ckpt.config, "dataset", DatasetConfig, overrides)
    if "classes" not in _given(overrides, "dataset")[1]:
        dataset = dataset.copy()
        dataset.classes = list(ckpt.classes)
    with_sections = plain(out)
    with_sections["model"] = plain(model)
    with_sections["dataset"] = plain(dataset)
    # Eval loads the checkpoint's weights itself; a starting point must not be loaded first.
    with_sections["model"]["checkpoint"] = None
    return OmegaConf.create(with_sections)


def check_scaling(scaling: DictConfig) -> None:
    """The worker counts of train, eval and predict, before Ray starts."""
    if scaling.num_workers < 1:
        raise ConfigError(f"scaling.num_workers={scaling.num_workers} must be at least 1")
    if scaling.cpus_per_worker <= 0:
        raise ConfigError(f"scaling.cpus_per_worker={scaling.cpus_per_worker} must be more than 0 (0.5 shares a core)")
    threads = scaling.get("threads_per_worker")
    if threads is not None and threads < 1:
        raise ConfigError(f"scaling.threads_per_worker={threads} must be at least 1 (or null: from scaling.cpus_per_worker)")


def prepare_inference(cfg: DictConfig, overrides: Sequence[str] | None):
    """Checks shared by eval, predict, export and serve, all before Ray or MLflow start: the
    checkpoint, the effective config and weights that fit it. Returns ``(info, config, state)``."""
    from detexp.modeling.detector import check_model_config

    if cfg.get("batch_size", 1) < 1:
        raise ConfigError(f"batch_size={cfg.batch_size} must be at least 1")
    if "scaling" in cfg:
        check_scaling(cfg.scaling)
    if str(cfg.checkpoint or "").startswith("models:/"):  # a version of the MLflow model registry
        from detexp.tracking.mlflow_runs import download_model

        path, run_id = download_model(cfg.checkpoint, cfg.tracking.uri)
        ckpt = read_checkpoint(path)
        ckpt.train_run_id = ckpt.train_run_id or run_id
    else:
        ckpt = read_checkpoint(find_checkpoint(cfg.checkpoint))
    eff = effective_config(cfg, ckpt, list(overrides or []))
    check_model_config(eff.model)
    state = load_state(ckpt.path, eff.model, len(eff.dataset.classes) + 1)
    return ckpt, eff, state
