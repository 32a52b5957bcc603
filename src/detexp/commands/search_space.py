"""``tune.search_space``: a mapping from dotted train keys to one distribution each
(``loguniform``, ``uniform``, ``choice``, ``grid``), checked against the train schema
before Ray starts, turned into Ray Tune's ``param_space``, and applied to a trial's config.

Ray Tune and Optuna take scalar choices, so list values (``schedule.lr_steps``) travel
as JSON strings and are decoded in the trial.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from detexp.config import TrainConfig
from detexp.errors import ConfigError

log = logging.getLogger("detexp")

DISTRIBUTIONS = ("loguniform", "uniform", "choice", "grid")
LR_SPAN = 4.0  # the default space: the recipe's lr / 4 to lr x 4, log-uniform


def default_search_space(train_cfg: Any) -> dict[str, dict[str, list]]:
    """The search ``tune`` runs when ``tune.search_space`` is null, around the recipe it
    trains: ``optimizer.lr`` log-uniform from a quarter to four times the recipe's, and for
    a multistep schedule of 3 epochs or more ``schedule.lr_steps`` among the recipe's own
    steps, one drop before the last epoch, and two (at half-way and before the last), all
    inside ``schedule.epochs``. A dimension with one value would not change a trial: left out."""
    lr = float(train_cfg.optimizer.lr)
    space: dict[str, dict[str, list]] = {
        "optimizer.lr": {"loguniform": [float(f"{lr / LR_SPAN:.2g}"), float(f"{lr * LR_SPAN:.2g}")]},
    }
    schedule = train_cfg.schedule
    epochs = int(schedule.epochs)
    if schedule.name == "multistep" and epochs >= 3:
        options = [[s for s in schedule.lr_steps if s < epochs], [epochs - 1], [epochs // 2, epochs - 1]]
        steps = list({tuple(o): o for o in options if o}.values())
        if len(steps) > 1:
            space["schedule.lr_steps"] = {"choice": steps}
    return space


def search_space(tune_cfg: Any, train_cfg: Any) -> dict[str, dict[str, list]]:
    """``tune.search_space`` as a plain dict, or :func:`default_search_space` when it is null."""
    space = tune_cfg.search_space
    if space is None:
        return default_search_space(train_cfg)
    return OmegaConf.to_container(space, resolve=True) if isinstance(space, DictConfig) else dict(space)


def check_search_space(space: Mapping[str, Any], train_cfg: DictConfig, search: str) -> None:
    """Refuse, naming the key, a search space that cannot be applied to the train config:
    unknown keys, groups instead of values, malformed distributions, and values of the
    wrong type for the key. Runs before Ray starts."""
    if not isinstance(space, Mapping) or not space:
        raise ConfigError("tune.search_space is empty: give at least one key, e.g. {optimizer.lr: {loguniform: [1e-3, 1e-1]}}")
    for key, spec in space.items():
        where = f"tune.search_space.{key}"
        if key.split(".")[0] in ("tune", "hydra") or OmegaConf.select(train_cfg, key, default="__missing__") == "__missing__":
            raise ConfigError(f"{where}: {key!r} is not a key of the train config (see `python -m detexp train --cfg job`)")
        if isinstance(OmegaConf.select(train_cfg, key), DictConfig):
            raise ConfigError(f"{where}: {key!r} is a group of keys; search one of its values, e.g. {key}.<name>")
        if not isinstance(spec, Mapping) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise ConfigError(f"{where}: give one distribution, one of {', '.join(DISTRIBUTIONS)}: e.g. {{choice: [a, b]}}")
        kind, values = next(iter(spec.items()))
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.{kind}: a non-empty list of values, got {values!r}")
        if kind in ("loguniform", "uniform"):
            _check_range(where, kind, values, train_cfg, key=key, search=search)
        elif kind == "grid" and search == "optuna":
            raise ConfigError(f"{where}: grid is not supported with tune.search=optuna; use choice")
        for value in values if kind in ("choice", "grid") else []:
            _check_value(where, train_cfg, key, value)
        idle = _does_nothing(key, kind, values, train_cfg)
        if idle:
            log.warning("%s: %s; every trial trains alike on this key", where, idle)


def _does_nothing(key: str, kind: str, values: list, train_cfg: DictConfig) -> str | None:
    """Why searching ``key`` cannot change a trial of ``train_cfg``, or None."""
    optimizer, schedule = train_cfg.optimizer, train_cfg.schedule
    if key == "optimizer.momentum" and optimizer.name != "sgd":
        return f"optimizer={optimizer.name} has no momentum (SGD's)"
    if key in ("schedule.lr_steps", "schedule.lr_gamma") and schedule.name != "multistep":
        return f"schedule.name={schedule.name} has no steps (multistep's)"
    if key == "schedule.lr_steps" and kind in ("choice", "grid"):
        applied = {tuple(s for s in steps if s < schedule.epochs) for steps in values if isinstance(steps, list)}
        if len(applied) == 1:
            return f"every choice drops the lr at the same epochs within schedule.epochs={schedule.epochs}"
    if key == "schedule.lr_gamma" and not [s for s in schedule.lr_steps if s < schedule.epochs]:
        return f"schedule.lr_steps={list(schedule.lr_steps)} never apply within schedule.epochs={schedule.epochs}"
    if key.startswith("trainer.") and key not in ("trainer.amp",) and not train_cfg.scaling.use_gpu:
        return "a trainer.* key changes how fast a CPU trains, not what it learns"
    return None


def _check_range(where: str, kind: str, values: list, train_cfg: DictConfig, key: str, search: str) -> None:
    if search == "grid":
        raise ConfigError(f"{where}: tune.search=grid needs grid or choice values, not {kind}")
    if len(values) != 2 or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"{where}.{kind}: two numbers [low, high], got {values!r}")
    low, high = values
    if not low < high or (kind == "loguniform" and low <= 0):
        raise ConfigError(f"{where}.{kind}: needs {'0 < ' if kind == 'loguniform' else ''}low < high, got {values!r}")
    _check_value(where, train_cfg, key, float(low))


def _check_value(where: str, train_cfg: DictConfig, key: str, value: Any) -> None:
    trial = train_cfg.copy()
    try:
        OmegaConf.update(trial, key, value, merge=False)
    except Exception as exc:  # noqa: BLE001 - OmegaConf's validation errors, several types
        reason = str(exc).splitlines()[0]
        raise ConfigError(f"{where}: {value!r} does not fit {key} ({reason})") from None


def _encode(value: Any) -> Any:
    # Tune (and Optuna's categorical distributions) take scalars; lists travel as JSON.
    return json.dumps(value) if isinstance(value, list | dict) else value


def param_space(space: Mapping[str, Any], search: str) -> dict[str, Any]:
    """Ray Tune's ``param_space`` for ``space`` (keys stay dotted train keys)."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, spec in space.items():
        kind, values = next(iter(spec.items()))
        if kind == "loguniform":
            out[key] = tune.loguniform(float(values[0]), float(values[1]))
        elif kind == "uniform":
            out[key] = tune.uniform(float(values[0]), float(values[1]))
        elif kind == "grid" or search == "grid":
            out[key] = tune.grid_search([_encode(v) for v in values])
        else:
            out[key] = tune.choice([_encode(v) for v in values])
    return out


def apply_sample(base: Mapping[str, Any], sample: Mapping[str, Any], space: Mapping[str, Any]) -> tuple[DictConfig, list[str]]:
    """The train config of one trial: ``base`` with the sampled values; and the samples
    as ``key=value`` overrides (for MLflow and the best trial's command)."""
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), base)
    overrides = []
    for key, spec in space.items():
        decoded = {_encode(v): v for v in next(iter(spec.values())) if isinstance(v, list | dict)}
        value = sample[key]
        value = decoded.get(value, value) if isinstance(value, str) else value
        OmegaConf.update(cfg, key, value, merge=False)
        shown = json.dumps(value, separators=(",", ":")) if isinstance(value, list | dict) else value
        overrides.append(f"{key}={shown}")
    return cfg, overrides
