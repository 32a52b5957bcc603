"""Optimizer, warm-up and learning-rate schedule.

The default recipe follows torchvision's detection references (and the Ray tutorial):
SGD with momentum, a linear warm-up over the first ``warmup_iters`` steps of epoch 0,
then MultiStepLR stepped once per epoch. torchvision's references (and Detectron2's
REFERENCE_WORLD_SIZE) scale lr linearly with the global batch: 0.02 belongs to 16 images
a step. ``optimizer.reference_batch`` says which global batch ``optimizer.lr`` belongs
to; :func:`scaled_lr` gives the lr for the run's ``num_workers * batch_size``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from detexp.config import is_auto
from detexp.errors import ConfigError

if TYPE_CHECKING:  # the config checks run on the driver, which imports no torch
    import torch

log = logging.getLogger("detexp")

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("multistep", "cosine")
# Devices torch's fused SGD and AdamW run on (CPU since torch 2.4).
FUSED_DEVICES = ("cpu", "cuda")


def check_optim_config(optimizer: Any, schedule: Any) -> None:
    if optimizer.lr <= 0:
        raise ConfigError(f"optimizer.lr={optimizer.lr} must be positive")
    if optimizer.reference_batch is not None and optimizer.reference_batch < 1:
        raise ConfigError(f"optimizer.reference_batch={optimizer.reference_batch} must be at least 1 (or null)")
    check_schedule(schedule)
    if not 0 < schedule.warmup_factor <= 1:
        raise ConfigError(f"schedule.warmup_factor={schedule.warmup_factor} must be in (0, 1]")
    low, high, source = USUAL_LR[str(optimizer.name)]
    if not low <= optimizer.lr <= high:
        log.warning(
            "optimizer.lr=%g is far %s what %s trains a detector with (%g to %g: %s); is optimizer=%s the one you meant?",
            optimizer.lr, "above" if optimizer.lr > high else "below", optimizer.name, low, high, source, optimizer.name,
        )


def check_schedule(schedule: Any) -> None:
    """Refuse epochs and lr steps that cannot be trained, naming the key; warn about lr
    steps that never apply. ``auto`` values are checked once they are numbers
    (:func:`resolve_auto_schedule`)."""
    if is_auto(schedule.epochs):
        if schedule.min_epochs < 1 or schedule.min_images < 0:
            raise ConfigError(
                f"schedule.epochs=auto needs schedule.min_epochs >= 1 and schedule.min_images >= 0 "
                f"(given {schedule.min_epochs} and {schedule.min_images})"
            )
    elif isinstance(schedule.epochs, bool) or not isinstance(schedule.epochs, int):
        raise ConfigError(f"schedule.epochs={schedule.epochs!r} must be a whole number of epochs or auto")
    elif schedule.epochs < 1:
        raise ConfigError(f"schedule.epochs={schedule.epochs} must be at least 1")
    steps = schedule.lr_steps
    if is_auto(steps):
        return
    if not isinstance(steps, Sequence) or isinstance(steps, str) or not all(
        isinstance(s, int) and not isinstance(s, bool) for s in steps
    ):
        raise ConfigError(f"schedule.lr_steps={steps!r} must be a list of epochs, e.g. [8, 11], or auto")
    if list(steps) != sorted(steps):
        raise ConfigError(f"schedule.lr_steps={list(steps)} must be increasing")
    if is_auto(schedule.epochs):
        return
    late = [s for s in schedule.lr_steps if s >= schedule.epochs]
    if schedule.name == "multistep" and late:
        log.warning(
            "schedule.lr_steps=%s: step(s) %s at or past schedule.epochs=%d never apply (a step s lowers the lr "
            "from epoch s+1 on)", list(schedule.lr_steps),
            ", ".join(map(str, late)), schedule.epochs,
        )


def auto_epochs(schedule: Any, train_images: int) -> int:
    """``schedule.epochs=auto``: the fewest epochs, at least ``min_epochs``, whose passes over
    ``train_images`` images show at least ``min_images``."""
    return max(int(schedule.min_epochs), math.ceil(schedule.min_images / max(train_images, 1)))


def last_quarter_steps(epochs: int) -> list[int]:
    """``schedule.lr_steps=auto``: one step, the lr lowered for the last quarter of the epochs
    (none for a run of one epoch)."""
    return [epochs - max(1, round(epochs / 4))] if epochs >= 2 else []


def resolve_auto_schedule(schedule: Any, train_images: int) -> None:
    """``auto`` epochs and lr steps as numbers, in ``schedule`` itself (and so in the params
    and checkpoints), said in one line; then checked as given numbers are."""
    said = []
    if is_auto(schedule.epochs):
        schedule.epochs = auto_epochs(schedule, train_images)
        said.append(
            f"{schedule.epochs} epochs (schedule.epochs=auto: at least {schedule.min_epochs}, and at least "
            f"{schedule.min_images} images shown from a train split of {train_images})"
        )
    if is_auto(schedule.lr_steps):
        schedule.lr_steps = last_quarter_steps(schedule.epochs)
        said.append(f"the lr x {schedule.lr_gamma} after epoch(s) {schedule.lr_steps} (schedule.lr_steps=auto)")
    if said:
        log.info("schedule: %s", "; ".join(said))
        check_schedule(schedule)


# The learning rates detection recipes train each optimizer with, widened a few times each
# way: outside them a run diverges or barely moves (a warning names it, nothing is refused).
USUAL_LR = {
    "sgd": (1e-4, 0.1, "torchvision's references 0.02 for 16 images a step, its fine-tuning tutorial 0.005 for 2"),
    "adamw": (1e-5, 5e-3, "detexp's CPU demo 1e-3 from random weights, 1e-4 to fine-tune"),
}


def scaled_lr(cfg: Any, num_workers: int, batch_size: int) -> float:
    """``cfg.lr`` scaled linearly from ``cfg.reference_batch`` images a step to
    ``num_workers * batch_size`` (the linear scaling rule); ``cfg.lr`` when no reference is set."""
    if cfg.reference_batch is None:
        return float(cfg.lr)
    return float(cfg.lr) * num_workers * batch_size / cfg.reference_batch


def build_optimizer(cfg: Any, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """``cfg``'s optimizer over the parameters that train, fused where torch has a fused
    kernel for their device: one vectorised pass over all parameters instead of a few
    tensor operations per parameter: the same update up to float rounding, several times
    faster on a CPU (benchmarks/RESULTS.md)."""
    import torch

    params = [p for p in params if p.requires_grad]
    fused = bool(params) and all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=fused)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    raise ConfigError(f"optimizer.name={cfg.name!r} is unknown; choose one of: {', '.join(OPTIMIZERS)}")


def build_scheduler(cfg: Any, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """The per-epoch schedule (stepped once at the end of every epoch)."""
    import torch

    if cfg.name == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(cfg.lr_steps), gamma=cfg.lr_gamma)
    if cfg.name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    raise ConfigError(f"schedule.name={cfg.name!r} is unknown; choose one of: {', '.join(SCHEDULES)}")


def build_warmup(cfg: Any, optimizer: torch.optim.Optimizer, steps_in_epoch: int | None):
    """Linear warm-up for epoch 0, stepped every iteration; None when disabled.

    Like torchvision's references it never outlasts the first epoch, so a short epoch
    ends warm-up early rather than dragging it into epoch 1.
    """
    import torch

    iters = cfg.warmup_iters if steps_in_epoch is None else min(cfg.warmup_iters, steps_in_epoch - 1)
    if iters <= 0:
        return None
    return torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=cfg.warmup_factor, total_iters=iters)
