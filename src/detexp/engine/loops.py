"""The training and inference loops: plain PyTorch on objects, no Ray, Hydra or MLflow.

``train_one_epoch`` and ``predict_batch`` take a model (and an optimizer) and batches of
images, so they run the same under Ray Train, in a notebook or in a test.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training cannot continue from this state.

    ``epoch`` and ``step`` are 0-based (``step`` = optimizer steps completed in the epoch);
    ``losses`` are the components on the rank that saw it, ``rank`` that rank."""

    def __init__(self, epoch: int, step: int, losses: dict[str, float], rank: int = 0):
        parts = ", ".join(f"{k}={v:.4g}" for k, v in losses.items())
        super().__init__(f"non-finite loss at epoch {epoch}, step {step}: {parts}")
        self.epoch, self.step, self.losses, self.rank = epoch, step, losses, rank


class InvalidTargetError(ValueError):
    """A box that would make torchvision assert (zero or negative size, NaN, inf)."""


@dataclass
class EpochStats:
    steps: int = 0
    images: int = 0
    seconds: float = 0.0
    data_seconds: float = 0.0  # of `seconds`, spent waiting for the next batch
    losses: dict[str, float] = field(default_factory=dict)  # mean over the epoch's steps
    lr: float = 0.0  # at the end of the epoch (before the epoch-level scheduler steps)
    first_step_at: float | None = None  # time.time() when the first step ended

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
    amp: str | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> EpochStats:
    """One pass over ``batches``. Raises :class:`NonFiniteLossError` before stepping the
    optimizer on a NaN/inf loss, so the weights stay those of the last good step.

    ``amp``: ``bf16`` or ``fp16`` runs the forward pass under autocast; fp16 needs
    ``scaler`` (a ``GradScaler``), which scales the loss so small gradients survive."""
    model.train()
    if scaler is None:  # a disabled scaler passes the loss and the step through unchanged
        scaler = torch.amp.GradScaler("cpu", enabled=False)
    sums: dict[str, float] = defaultdict(float)
    stats = EpochStats()
    start = time.perf_counter()
    batch_iter = iter(batches)
    while True:
        wait_start = time.perf_counter()
        try:
            images, targets = next(batch_iter)
        except StopIteration:
            break
        stats.data_seconds += time.perf_counter() - wait_start
        check_targets(targets)
        targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
        with autocast(images[0].device if images else torch.device("cpu"), amp):
            loss_dict = model(images, targets)
        loss = sum(loss_dict.values())
        values = {k: v.item() for k, v in loss_dict.items()}
        values["loss"] = loss.item()
        _raise_if_any_rank_diverged(values, loss.device, epoch, stats.steps)

        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if grad_clip_norm is not None:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
        scaler.step(optimizer)
        scaler.update()
        if warmup is not None:
            warmup.step()

        for k, v in values.items():
            sums[k] += v
        stats.steps += 1
        stats.images += len(images)
        if stats.first_step_at is None:
            stats.first_step_at = time.time()
        if on_step is not None:
            on_step(stats.steps, values)
    stats.seconds = time.perf_counter() - start
    stats.losses = {k: v / max(stats.steps, 1) for k, v in sums.items()}
    stats.lr = optimizer.param_groups[0]["lr"]
    return stats


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, amp: str | None):
    """Mixed precision for a forward pass (``amp`` one of :data:`AMP_DTYPES`), or nothing."""
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


def check_targets(targets: Iterable[dict]) -> None:
    """Refuse boxes torchvision cannot take, naming the image (the data pipeline's
    validation should have dropped them already; this is the last line before the model)."""
    for t in targets:
        boxes = t["boxes"]
        if boxes.numel() == 0:
            continue
        bad = ~torch.isfinite(boxes).all(dim=1) | (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            box = [round(float(v), 2) for v in boxes[i]]
            raise InvalidTargetError(
                f"image {t.get('image_id', '?')!r}: box {i + 1} {box} has no area or is not finite; "
                "run `python -m detexp data check` on the dataset"
            )


def is_distributed() -> bool:
    """Whether this process is one of several DDP ranks."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_ranks(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is true on every rank (one scalar all-reduce; the flag itself
    without DDP). Every rank must call it at the same point."""
    if not is_distributed():
        return flag
    value = torch.tensor(1.0 if flag else 0.0, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return value.item() == 1.0


def _raise_if_any_rank_diverged(values: dict[str, float], device: torch.device, epoch: int, step: int) -> None:
    """Raise NonFiniteLossError on every rank together when the loss is NaN/inf on any.

    With DDP a rank that stopped alone would leave the others waiting in backward's
    all-reduce forever, so the ranks agree on one flag each step (one scalar all-reduce,
    cheap next to DDP's gradient all-reduce), and share the offending rank's losses.
    """
    if all_ranks(math.isfinite(values["loss"]), device):
        return
    if not is_distributed():
        raise NonFiniteLossError(epoch, step, values)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, values)
    rank = next(r for r, v in enumerate(gathered) if not math.isfinite(v["loss"]))
    raise NonFiniteLossError(epoch, step, gathered[rank], rank=rank)


@torch.no_grad()
def predict_batch(model: torch.nn.Module, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Detections for ``images`` (boxes in the input's pixel coordinates), moved to CPU."""
    model.eval()
    outputs = model(images)
    return [{k: v.detach().cpu() for k, v in out.items()} for out in outputs]
