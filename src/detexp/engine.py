"""The training and inference loops: plain PyTorch on objects, no Ray, Hydra or MLflow.

``train_one_epoch`` and ``predict`` take a model, an optimizer and an iterable of
``(images, targets)`` batches, so they run the same under Ray Train, in a notebook or in
a test.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training cannot continue from this state."""

    def __init__(self, epoch: int, step: int, losses: dict[str, float]):
        parts = ", ".join(f"{k}={v:.4g}" for k, v in losses.items())
        super().__init__(f"non-finite loss at epoch {epoch}, step {step}: {parts}")
        self.epoch, self.step, self.losses = epoch, step, losses


@dataclass
class EpochStats:
    steps: int = 0
    images: int = 0
    seconds: float = 0.0
    losses: dict[str, float] = field(default_factory=dict)  # mean over the epoch's steps
    lr: float = 0.0  # at the end of the epoch (before the epoch-level scheduler steps)

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.seconds if self.seconds > 0 else 0.0


def train_one_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[tuple[list[torch.Tensor], list[dict]]],
    epoch: int,
    warmup: torch.optim.lr_scheduler.LRScheduler | None = None,
    grad_clip_norm: float | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> EpochStats:
    """One pass over ``batches``. Raises :class:`NonFiniteLossError` before stepping the
    optimizer on a NaN/inf loss, so the weights stay those of the last good step."""
    model.train()
    sums: dict[str, float] = defaultdict(float)
    stats = EpochStats()
    start = time.perf_counter()
    for images, targets in batches:
        targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
        loss_dict = model(images, targets)
        loss = sum(loss_dict.values())
        values = {k: v.item() for k, v in loss_dict.items()}
        values["loss"] = loss.item()
        if not math.isfinite(values["loss"]):
            raise NonFiniteLossError(epoch, stats.steps, values)

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
        optimizer.step()
        if warmup is not None:
            warmup.step()

        for k, v in values.items():
            sums[k] += v
        stats.steps += 1
        stats.images += len(images)
        if on_step is not None:
            on_step(stats.steps, values)
    stats.seconds = time.perf_counter() - start
    stats.losses = {k: v / max(stats.steps, 1) for k, v in sums.items()}
    stats.lr = optimizer.param_groups[0]["lr"]
    return stats


@torch.no_grad()
def predict(model: torch.nn.Module, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Detections for ``images`` (boxes in the input's pixel coordinates), moved to CPU."""
    model.eval()
    outputs = model(images)
    return [{k: v.detach().cpu() for k, v in out.items()} for out in outputs]
