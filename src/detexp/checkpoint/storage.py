"""Where Ray Train keeps a run's checkpoints, and the newest one it registered: what a
resumed run continues from.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detexp.errors import ConfigError

TRAIN_NAME = "train"  # RunConfig(name) with the default storage: <run dir>/checkpoints/train


@dataclass(frozen=True)
class RunStorage:
    """Where Ray Train keeps one run's checkpoints: ``RunConfig(name=name, storage_path=path)``."""

    path: str
    name: str

    @property
    def experiment(self) -> str:
        """The run's own folder (or URI) inside ``path``."""
        return f"{self.path}/{self.name}"


def storage_location(storage_path: str | None, run_dir: Path) -> RunStorage:
    """By default ``<run dir>/checkpoints`` and ``train``; with ``scaling.storage_path``
    (shared by many runs) that path or URI and a name unique to the run directory, so a
    resumed run finds its own checkpoints."""
    if not storage_path:
        return RunStorage(str(run_dir / "checkpoints"), TRAIN_NAME)
    name = f"{run_dir.name}-{hashlib.sha1(str(run_dir).encode()).hexdigest()[:8]}"
    if "://" in storage_path:
        return RunStorage(storage_path.rstrip("/"), name)
    return RunStorage(str(Path(storage_path).expanduser().resolve()), name)


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
