"""The driver's view of a training run: one line per epoch for people, the same numbers
into MLflow (each epoch once, also across resumes), and what worker failures mean."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from detexp.checkpoints import SavedCheckpoint

log = logging.getLogger("detexp")

EPOCH_KEY = "epoch"  # MLflow metric logged with every epoch (step = the 0-based epoch)


class EpochProgress:
    """Per-epoch lines for people, and the same numbers into MLflow, each epoch once:
    an epoch the MLflow run already holds (a resumed run) is not logged again."""

    SHORT = {"loss_classifier": "cls", "loss_box_reg": "box", "loss_objectness": "obj", "loss_rpn_box_reg": "rpn"}

    def __init__(
        self,
        epochs: int,
        max_failures: int,
        tracker,
        logged: set[int],
        previous: SavedCheckpoint | None,
        callbacks: Sequence[Callable[[dict[str, Any]], None]] = (),
    ):
        self.epochs = epochs
        self.max_failures = max_failures
        self.tracker = tracker
        self.logged = set(logged)
        self.started = time.perf_counter()
        self.done = 0
        self.failures = 0
        self.last: dict[str, Any] = {}
        self.last_epoch = previous.epoch if previous is not None else None
        self.diverged: tuple[int, dict[str, Any]] | None = None
        self.callbacks = list(callbacks)

    def backfill(self, previous: SavedCheckpoint) -> None:
        """Log the epochs whose checkpoint Ray kept but whose metrics never reached MLflow
        (the previous process died between the two)."""
        for _, metrics in previous.kept:
            epoch = int(metrics["epoch"])
            if epoch not in self.logged:
                self._log(epoch, metrics)
                log.info("recorded epoch %d/%d from its checkpoint (the previous process stopped first)",
                         epoch + 1, self.epochs)

    def on_report(self, metrics: dict[str, Any], checkpoint: str | None) -> None:
        from detexp.worker import DIVERGED

        epoch = int(metrics["epoch"])
        if DIVERGED in metrics:
            self.diverged = (epoch, metrics[DIVERGED])
            return
        self.last, self.last_epoch = metrics, epoch
        if epoch in self.logged:
            log.warning("epoch %d/%d was trained again after a restart; MLflow keeps its first record",
                        epoch + 1, self.epochs)
            return
        self._log(epoch, metrics)
        self.done += 1
        per_epoch = (time.perf_counter() - self.started) / self.done
        eta = per_epoch * (self.epochs - epoch - 1)
        parts = " ".join(f"{short} {metrics.get('train/' + k, float('nan')):.3f}" for k, short in self.SHORT.items())
        log.info(
            "epoch %d/%d  loss %.3f (%s)  lr %.4g  %.2f steps/s  val map %.3f map_50 %.3f  ETA %s",
            epoch + 1, self.epochs, metrics.get("train/loss", float("nan")), parts, metrics.get("train/lr", 0.0),
            metrics.get("train/steps_per_s", 0.0), metrics.get("val/map", float("nan")),
            metrics.get("val/map_50", float("nan")), duration(eta),
        )
        for callback in self.callbacks:
            callback(metrics)

    def _log(self, epoch: int, metrics: dict[str, Any]) -> None:
        self.tracker.log_metrics({k: v for k, v in metrics.items() if k != "epoch"} | {EPOCH_KEY: epoch}, step=epoch)
        self.logged.add(epoch)

    def on_failure(self, rank: int, error: str) -> None:
        self.failures += 1
        if self.failures > self.max_failures:
            log.error("worker %d failed: %s (scaling.max_failures=%d used up)", rank, error, self.max_failures)
            return
        start = "the start" if self.last_epoch is None else f"the checkpoint of epoch {self.last_epoch + 1}/{self.epochs}"
        log.warning(
            "worker %d failed: %s; restarting the workers from %s (failure %d of scaling.max_failures=%d)",
            rank, error, start, self.failures, self.max_failures,
        )


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
