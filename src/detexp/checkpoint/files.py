"""Checkpoint files: what ``train`` writes and how ``resume``, ``eval`` and ``predict`` find
and read them.

A train run directory holds ``model_final.pt`` (the last epoch), ``model_best.pt`` (the
best epoch by ``schedule.monitor``, when validation ran), ``mlflow_run_id``, and Ray
Train's own ``checkpoints/train/checkpoint_<time>/checkpoint.pt``. Every such file is one
``torch.save`` dict: ``format``, ``model``, ``optimizer``, ``lr_scheduler``, ``config``
(the resolved train config), ``epoch`` (0-based), ``best`` (the best epoch so far and
the patience count) and ``classes``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from detexp.epoch_report import EPOCH, IMPROVED
from detexp.errors import ConfigError

if TYPE_CHECKING:
    import torch

log = logging.getLogger("detexp")

CHECKPOINT_FILE = "checkpoint.pt"  # inside each of Ray Train's checkpoint folders
CHECKPOINT_FORMAT = "detexp-checkpoint-v1"
# Next to it in a new best epoch's folder: that epoch's val predictions (Arrow IPC, rows of
# detexp.evaluation.records.PREDICTION_SCHEMA), from which the end-of-training report is made.
PREDICTIONS_FILE = "val_predictions.arrow"
FINAL_FILE = "model_final.pt"
BEST_FILE = "model_best.pt"
RUN_ID_FILE = "mlflow_run_id"  # a training run directory's MLflow run id
# File names a run directory of `train` may hold, in the order eval prefers them.
CHECKPOINT_NAMES = (BEST_FILE, FINAL_FILE, CHECKPOINT_FILE)


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
    import torch  # here: the driver of a run that reads no checkpoint never imports torch

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
    from detexp.modeling.detector import build_inference_model
    from detexp.modeling.weights import load_model_state, load_weights

    state = load_model_state(path, num_classes)
    load_weights(build_inference_model(model_cfg, num_classes), state, path)
    return state


def copy_checkpoint_file(checkpoint: Any, target: Path) -> Path:
    """Copy the ``checkpoint.pt`` of a Ray checkpoint (or a path to its folder) to ``target``,
    atomically: into a temporary file beside it, then renamed, so that ``target`` is always
    a whole checkpoint (the previous one until the copy is complete)."""
    with contextlib.ExitStack() as stack:
        folder = Path(checkpoint) if isinstance(checkpoint, str | Path) else Path(stack.enter_context(checkpoint.as_directory()))
        partial = target.with_name(f".{target.name}.{os.getpid()}.part")
        try:
            shutil.copyfile(folder / CHECKPOINT_FILE, partial)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
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


class BestModelFile:
    """``model_best.pt`` of a run directory: each new best epoch's checkpoint is copied there
    as soon as it is reported, and its val predictions are read, because Ray Train may
    delete the checkpoint folder later (``checkpoints_to_keep``)."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / BEST_FILE
        self.predictions: Any = None  # the best epoch's val predictions (a pyarrow Table), when seen

    def update(self, report: dict[str, Any], checkpoint: Any) -> None:
        """Called with every epoch's report and checkpoint (a Ray checkpoint, a path, or None)."""
        if not report.get(IMPROVED):
            return
        self.predictions = read_predictions(checkpoint) if checkpoint is not None else None
        if checkpoint is None:
            return
        try:
            copy_checkpoint_file(checkpoint, self.path)
        except OSError as exc:  # a full disk, say: the epoch's metrics are still recorded
            epoch = report.get(EPOCH)
            log.warning("could not write %s for the new best epoch%s: %s; it is left out (the "
                        "checkpoint itself is in Ray Train's storage)", self.path,
                        f" {int(epoch) + 1}" if epoch is not None else "", exc)
            self.predictions = None
            with contextlib.suppress(OSError):  # never a file of an older best epoch under that name
                self.path.unlink(missing_ok=True)

    def existing(self) -> Path | None:
        return self.path if self.path.is_file() else None
