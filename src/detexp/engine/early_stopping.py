"""The best epoch by a monitored value, and early stopping: plain Python, state in checkpoints."""

from __future__ import annotations

import math


class BestEpoch:
    """The best epoch by a monitored value, and early stopping after ``patience`` epochs
    without a strict improvement (None = never). State travels in checkpoints, so a
    resumed run keeps counting where it stopped."""

    def __init__(self, mode: str = "max", patience: int | None = None):
        self.mode, self.patience = mode, patience
        self.epoch: int | None = None  # 0-based
        self.value: float | None = None
        self.bad_epochs = 0

    def update(self, epoch: int, value: float | None) -> bool:
        """Record ``epoch``'s value; True when it is the new best. A missing or NaN value
        is never the best (and counts as an epoch without improvement)."""
        finite = value is not None and math.isfinite(value)
        if finite and (self.value is None or (value > self.value if self.mode == "max" else value < self.value)):
            self.epoch, self.value, self.bad_epochs = epoch, float(value), 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "value": self.value, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict | None) -> None:
        if state:
            self.epoch, self.value, self.bad_epochs = state["epoch"], state["value"], state["bad_epochs"]
