"""Model weights from files: the state dict inside a detexp checkpoint (or a plain state
dict file), and loading it into a model with one clear line when it does not fit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from detexp.errors import ConfigError


def load_model_state(path: str | Path, num_classes: int | None = None) -> dict[str, torch.Tensor]:
    """The model state dict inside a detexp checkpoint file (or a plain state dict file),
    loaded with ``weights_only=True``; a class-count mismatch is reported plainly."""
    path = Path(path).expanduser()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not a checkpoint"
        raise ConfigError(f"{path}: not a PyTorch checkpoint ({type(exc).__name__}: {exc})") from None
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or "roi_heads.box_predictor.cls_score.weight" not in state:
        raise ConfigError(f"{path}: not a detexp checkpoint or Faster R-CNN state dict")
    found = state["roi_heads.box_predictor.cls_score.weight"].shape[0]
    if num_classes is not None and found != num_classes:
        raise ConfigError(
            f"{path}: the checkpoint predicts {found - 1} classes + background, "
            f"the dataset has {num_classes - 1}"
        )
    return state


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Any = "checkpoint") -> None:
    """Load ``state`` into ``model``, refusing weights that do not fit with one line that
    names ``path``."""
    # A plain state dict (model.checkpoint) may come from a BatchNorm2d model and carry
    # num_batches_tracked counters, or lack them: neither matters in eval mode.
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes that differ
        detail = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), str(exc))
        raise ConfigError(f"checkpoint={path} does not fit this model config: {detail}; is model.name right?") from None
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    unexpected = [k for k in unexpected if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise ConfigError(
            f"checkpoint={path} does not fit this model config: {len(missing)} missing and "
            f"{len(unexpected)} unexpected weights (e.g. {example}); is model.name right?"
        )
