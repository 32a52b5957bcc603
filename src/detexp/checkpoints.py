"""Checkpoints on disk: what ``train`` writes, how ``resume``, ``eval`` and ``predict``
find and read them, and how a checkpoint's stored config meets the command line.

A train run directory holds ``model_final.pt`` (the last epoch), ``model_best.pt`` (the
best epoch by ``schedule.monitor``, when validation ran), ``mlflow_run_id``, and Ray
Train's own ``checkpoints/train/checkpoint_<time>/checkpoint.pt``. Every such file is one
``torch.save`` dict: ``format``, ``model``, ``optimizer``, ``lr_scheduler``, ``config``
(the resolved train config), ``epoch`` (0-based), ``best`` (the best epoch so far and
the patience count) and ``classes``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from detexp.config import DatasetConfig, ModelConfig, fit_schema
from detexp.errors import ConfigError

log = logging.getLogger("detexp")

CHECKPOINT_FILE = "checkpoint.pt"  # inside each of Ray Train's checkpoint folders
CHECKPOINT_FORMAT = "detexp-checkpoint-v1"
# Next to it in a new best epoch's folder: that epoch's val predictions (Arrow IPC, rows of
# detexp.reports.PREDICTION_SCHEMA), from which the end-of-training report is made.
PREDICTIONS_FILE = "val_predictions.arrow"
FINAL_FILE = "model_final.pt"
BEST_FILE = "model_best.pt"
RUN_ID_FILE = "mlflow_run_id"  # a training run directory's MLflow run id
TRAIN_NAME = "train"  # RunConfig(name) with the default storage: <run dir>/checkpoints/train
# File names a run directory of `train` may hold, in the order eval prefers them.
CHECKPOINT_NAMES = (BEST_FILE, FINAL_FILE, CHECKPOINT_FILE)


# -- reading a checkpoint file ----------------------------------------------------------------


@dataclass
class CheckpointInfo:
    """What eval needs from a training checkpoint, without its tensors."""

    path: Path
    config: dict[str, Any]
    classes: list[str]
    train_run_id: str | None


def find_checkpoint(path: str | None, key: str = "checkpoint") -> Path:
    """The checkpoint file ``path`` names: a file, or a train run directory (its
    ``model_best.pt``, else ``model_final.pt``), or a Ray checkpoint directory holding
    ``checkpoint.pt``. (``models:/NAME/VERSION`` is read by :func:`prepare_inference`.)"""
    if not path:
        raise ConfigError(f"{key} is not set: pass {key}=PATH to a model_final.pt written by `detexp train`")
    p = Path(path).expanduser()
    if p.is_dir():
        found = next((p / n for n in CHECKPOINT_NAMES if (p / n).is_file()), None)
        if found is None:
            raise ConfigError(f"{key}={path}: a folder without {' or '.join(CHECKPOINT_NAMES)}")
        return found.resolve()
    if not p.is_file():
        raise ConfigError(f"{key}={path}: checkpoint not found")
    return p.resolve()


def read_checkpoint(path: Path) -> CheckpointInfo:
    """Config, class names and training run of a detexp checkpoint; refuses anything else.

    Loaded with ``weights_only=True`` and memory-mapped, so the tensors are not read here.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - old (non-zip) files cannot be mapped; try plainly
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not a checkpoint"
            raise ConfigError(f"checkpoint={path}: not a PyTorch checkpoint ({type(exc).__name__})") from None
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT or "model" not in obj:
        raise ConfigError(
            f"checkpoint={path}: not a detexp checkpoint (a model_final.pt or checkpoint.pt "
            "written by `detexp train`, which also stores the model config and class names)"
        )
    config = obj.get("config") or {}
    classes = [str(c) for c in obj.get("classes") or config.get("dataset", {}).get("classes", [])]
    if not classes:
        raise ConfigError(f"checkpoint={path}: stores no class names")
    run_id = obj.get("mlflow_run_id") or _run_id_near(path)
    return CheckpointInfo(path, config, classes, run_id)


def _run_id_near(path: Path) -> str | None:
    # A train run dir holds mlflow_run_id beside model_final.pt; Ray's own checkpoints sit
    # three levels below it (checkpoints/<name>/checkpoint_<time>/checkpoint.pt).
    for parent in list(path.parents)[:4]:
        id_file = parent / RUN_ID_FILE
        if id_file.is_file():
            return id_file.read_text().strip() or None
    return None


def load_state(path: Path, model_cfg: Any, num_classes: int) -> dict[str, torch.Tensor]:
    """The checkpoint's model weights, checked against ``model_cfg`` and the class count
    on the driver, so that a mismatch is one line rather than a failed actor pool."""
    from detexp.models import build_inference_model, load_model_state, load_weights

    state = load_model_state(path, num_classes)
    load_weights(build_inference_model(model_cfg, num_classes), state, path)
    return state


# -- the stored config and the command line ---------------------------------------------------


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
    with_sections = OmegaConf.to_container(out, resolve=True)
    with_sections["model"] = OmegaConf.to_container(model, resolve=True)
    with_sections["dataset"] = OmegaConf.to_container(dataset, resolve=True)
    # Eval loads the checkpoint's weights itself; a starting point must not be loaded first.
    with_sections["model"]["checkpoint"] = None
    return OmegaConf.create(with_sections)


def prepare_inference(cfg: DictConfig, overrides: Sequence[str] | None):
    """Checks shared by eval and predict, all before Ray or MLflow start: the checkpoint,
    the effective config and weights that fit it. Returns ``(info, config, state)``."""
    from detexp.models import check_model_config

    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size={cfg.batch_size} must be at least 1")
    if cfg.scaling.num_workers < 1 or cfg.scaling.cpus_per_worker < 1:
        raise ConfigError("scaling.num_workers and scaling.cpus_per_worker must be at least 1")
    if str(cfg.checkpoint or "").startswith("models:/"):  # a version of the MLflow model registry
        from detexp.tracking import download_model

        path, run_id = download_model(cfg.checkpoint, cfg.tracking.uri)
        ckpt = read_checkpoint(path)
        ckpt.train_run_id = ckpt.train_run_id or run_id
    else:
        ckpt = read_checkpoint(find_checkpoint(cfg.checkpoint))
    eff = effective_config(cfg, ckpt, list(overrides or []))
    check_model_config(eff.model)
    state = load_state(ckpt.path, eff.model, len(eff.dataset.classes) + 1)
    return ckpt, eff, state


# -- Ray Train's checkpoints of a run ---------------------------------------------------------


def storage_location(storage_path: str | None, run_dir: Path) -> tuple[str, str]:
    """``(storage, name)`` for Ray Train's ``RunConfig``: by default ``<run dir>/checkpoints``
    and ``train``; with ``scaling.storage_path`` (shared by many runs) that path or URI and
    a name unique to the run directory, so a resumed run finds its own checkpoints."""
    if not storage_path:
        return str(run_dir / "checkpoints"), TRAIN_NAME
    name = f"{run_dir.name}-{hashlib.sha1(str(run_dir).encode()).hexdigest()[:8]}"
    if "://" in storage_path:
        return storage_path.rstrip("/"), name
    return str(Path(storage_path).expanduser().resolve()), name


def _exists(path: str) -> bool:
    if "://" not in path:
        return Path(path).is_file()
    import pyarrow.fs

    fs, inner = pyarrow.fs.FileSystem.from_uri(path)
    return fs.get_file_info(inner).type == pyarrow.fs.FileType.File


@dataclass
class SavedCheckpoint:
    """The newest checkpoint Ray Train registered for a run, and the ones it still keeps."""

    epoch: int  # 0-based
    checkpoint: Any  # ray.train.Checkpoint
    metrics: dict[str, Any]
    kept: list[tuple[Any, dict[str, Any]]]  # (checkpoint, metrics), oldest first


def latest_checkpoint(experiment_dir: str | Path) -> SavedCheckpoint | None:
    """What ``ray.train.get_checkpoint()`` will hand the workers when a run re-uses
    ``RunConfig(name, storage_path)``: read from Ray Train's snapshot of the run, so a
    half-written checkpoint folder (a crash mid-upload) never counts."""
    from ray.train import Result

    if not _exists(f"{experiment_dir}/checkpoint_manager_snapshot.json"):
        return None
    ray_train_log = logging.getLogger("ray.train")
    level = ray_train_log.level
    ray_train_log.setLevel(logging.WARNING)  # not Ray's paragraph about finding a snapshot
    try:
        result = Result.from_path(str(experiment_dir))
    except Exception as exc:  # noqa: BLE001 - a corrupt or foreign snapshot
        raise ConfigError(f"cannot read the checkpoints in {experiment_dir}: {exc}") from None
    finally:
        ray_train_log.setLevel(level)
    if result.checkpoint is None:
        return None
    kept = sorted(result.best_checkpoints or [], key=lambda item: int(item[1]["epoch"]))
    return SavedCheckpoint(int(result.metrics["epoch"]), result.checkpoint, dict(result.metrics), kept)


def copy_checkpoint_file(checkpoint: Any, target: Path) -> Path:
    """Copy the ``checkpoint.pt`` of a Ray checkpoint (or a path to its folder) to ``target``."""
    if isinstance(checkpoint, str | Path):
        shutil.copyfile(Path(checkpoint) / CHECKPOINT_FILE, target)
        return target
    with checkpoint.as_directory() as d:
        shutil.copyfile(Path(d) / CHECKPOINT_FILE, target)
    return target


def read_predictions(checkpoint: Any) -> Any:
    """The val predictions a Ray checkpoint (or a path to its folder) holds, as a pyarrow
    Table, or None when it holds none."""
    import pyarrow as pa

    with contextlib.ExitStack() as stack:
        folder = Path(checkpoint) if isinstance(checkpoint, str | Path) else Path(stack.enter_context(checkpoint.as_directory()))
        path = folder / PREDICTIONS_FILE
        if not path.is_file():
            return None
        with pa.OSFile(str(path)) as source:  # read into memory: the folder may be a temporary copy
            return pa.ipc.open_file(source).read_all()
