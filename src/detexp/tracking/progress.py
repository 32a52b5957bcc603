"""The driver's view of a training run: one line per epoch for people, the same numbers
into MLflow (each epoch once, also across resumes), rank 0's progress within an epoch,
what worker failures mean, and the summary at the end."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from detexp.epoch_report import (
    BEST_EPOCH,
    BEST_VALUE,
    DIVERGED,
    EPOCH,
    FIRST_STEP_AT,
    IMPROVED,
    STOPPED_EARLY,
)

log = logging.getLogger("detexp")

EPOCH_KEY = "epoch"  # MLflow metric logged with every epoch (step = the 0-based epoch)
# MLflow metric (step 0): seconds from the run's start (the command, a sweep's job, a Tune
# trial) to the end of its first training step; what every run pays before it trains
FIRST_STEP_KEY = "time/first_step_s"
WAIT_NOTED = 0.1  # the epoch line says how long steps waited for data from this share on


class EpochProgress:
    """Per-epoch lines for people, and the same numbers into MLflow, each epoch once:
    an epoch the MLflow run already holds (a resumed run) is not logged again."""

    SHORT = {"loss_classifier": "cls", "loss_box_reg": "box", "loss_objectness": "obj", "loss_rpn_box_reg": "rpn"}

    def __init__(
        self,
        tracker,
        *,
        epochs: int,
        max_failures: int,
        logged: set[int],
        previous: dict[str, Any] | None,
        callbacks: Sequence[Callable[[dict[str, Any]], None]] = (),
        monitor: str = "val/map_50",
        progress_every_s: float = 10.0,
        record_reports: bool = True,
        started_at: float | None = None,
    ):
        """``logged``: the epochs the MLflow run holds already; ``previous``: the report of
        the checkpoint a resumed run continues from (None: a new run). ``record_reports``
        False: another process logs each report into the MLflow run (a Tune trial's: the
        tune driver, from the result Tune hands it); the kept checkpoints' reports of a
        resumed run (:meth:`backfill`) are still logged here. ``started_at``: when the run
        started (``time.time()``), to say how long its first step took to come."""
        self.record_reports = record_reports
        self.started_at = started_at
        self.first_step_s: float | None = None
        self.train_s = 0.0  # seconds in training steps (data waits included), epochs of this process
        self.epochs = epochs
        self.max_failures = max_failures
        self.tracker = tracker
        self.logged = set(logged)
        self.started = time.perf_counter()
        self.done = 0
        self.failures = 0
        self.last: dict[str, Any] = dict(previous or {})
        self.last_epoch = int(previous[EPOCH]) if previous else None
        self.diverged: tuple[int, dict[str, Any]] | None = None
        self.callbacks = list(callbacks)
        self.monitor = monitor
        self.best_metrics: dict[str, Any] = {}  # the report of the best epoch so far
        self.live = LiveProgress(epochs, every_s=progress_every_s)

    def backfill(self, kept: Sequence[dict[str, Any]]) -> None:
        """Log the reports of kept checkpoints (oldest first) whose metrics never reached
        MLflow (the previous process died between the two)."""
        for metrics in kept:
            epoch = int(metrics[EPOCH])
            if epoch not in self.logged:
                self._log(epoch, metrics)
                log.info("recorded epoch %d/%d from its checkpoint (the previous process stopped first)",
                         epoch + 1, self.epochs)
            self._keep_best(metrics)

    def on_step(self, info: dict[str, Any]) -> None:
        self.live.update(info)

    def on_report(self, metrics: dict[str, Any]) -> None:
        self.live.close()
        epoch = int(metrics[EPOCH])
        if DIVERGED in metrics:
            self.diverged = (epoch, metrics[DIVERGED])
            return
        self.last, self.last_epoch = metrics, epoch
        self._keep_best(metrics)
        self.train_s += float(metrics.get("train/epoch_s", 0.0))
        self._note_first_step(metrics)
        if epoch in self.logged:
            log.warning("epoch %d/%d was trained again after a restart; MLflow keeps its first record",
                        epoch + 1, self.epochs)
            return
        if self.record_reports:
            self._log(epoch, metrics)
        else:
            self.logged.add(epoch)
        self.done += 1
        per_epoch = (time.perf_counter() - self.started) / self.done
        eta = per_epoch * (self.epochs - epoch - 1)
        parts = " ".join(f"{short} {metrics.get('train/' + k, float('nan')):.3f}" for k, short in self.SHORT.items())
        workers = int(metrics.get("train/workers", 1))
        waited = metrics.get("train/data_wait_s", 0.0) / max(metrics.get("train/epoch_s", 0.0), 1e-9)
        log.info(
            "epoch %d/%d  loss %.3f (%s)  lr %.4g  %.2f steps/s%s%s  val map %.3f map_50 %.3f%s  ETA %s",
            epoch + 1, self.epochs, metrics.get("train/loss", float("nan")), parts, metrics.get("train/lr", 0.0),
            metrics.get("train/steps_per_s", 0.0),
            # The input pipeline is the bottleneck when steps wait for their batches.
            f" ({waited:.0%} waiting for data)" if waited >= WAIT_NOTED else "",
            f" on {workers} workers" + (f", {int(metrics['train/nodes'])} nodes" if metrics.get("train/nodes", 1) > 1 else "")
            if workers > 1 else "",
            metrics.get("val/map", float("nan")),
            metrics.get("val/map_50", float("nan")), " (best)" if metrics.get(IMPROVED) else "",
            duration(0 if metrics.get(STOPPED_EARLY) else eta),
        )
        for callback in self.callbacks:
            callback(metrics)

    def _note_first_step(self, metrics: dict[str, Any]) -> None:
        """The run's start-up, from its first report: said, and logged as :data:`FIRST_STEP_KEY`."""
        if self.first_step_s is not None:
            return
        self.first_step_s = first_step_seconds(metrics, self.started_at)
        if self.first_step_s is None:
            return
        log.info("the first training step ended %.1f s after the start", self.first_step_s)
        if self.record_reports:
            self.tracker.log_metrics({FIRST_STEP_KEY: self.first_step_s}, step=0)

    def _keep_best(self, metrics: dict[str, Any]) -> None:
        if metrics.get(IMPROVED):
            self.best_metrics = metrics

    def _log(self, epoch: int, metrics: dict[str, Any]) -> None:
        self.tracker.log_metrics(epoch_values(metrics, self.monitor), step=epoch)
        self.logged.add(epoch)

    def stop_reason(self, patience: int | None) -> str:
        """Why the run ended, in words, from its last report."""
        last = self.last
        if last.get(STOPPED_EARLY):
            return (
                f"early stop: {self.monitor} did not improve for {patience} epoch(s) after epoch "
                f"{int(last[BEST_EPOCH]) + 1} ({last[BEST_VALUE]:.4f}); trained {int(last[EPOCH]) + 1} "
                f"of {self.epochs} epochs"
            )
        return f"completed {self.epochs} epoch{'s' if self.epochs != 1 else ''}"

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


def best_key(monitor: str) -> str:
    """The metric key of the best value of ``monitor`` so far (``best/val_map_50``)."""
    return "best/" + monitor.replace("/", "_")


def first_step_seconds(report: dict[str, Any], started_at: float | None) -> float | None:
    """Seconds from ``started_at`` (``time.time()``) to the end of the first training step
    of the epoch ``report`` is of; None when either is unknown."""
    at = report.get(FIRST_STEP_AT)
    if at is None or started_at is None:
        return None
    return max(0.0, float(at) - started_at)


def epoch_values(report: dict[str, Any], monitor: str) -> dict[str, Any]:
    """An epoch's report as its MLflow run records it: the ``train/`` and ``val/`` metrics,
    the epoch, and the best epoch so far with its ``monitor`` value."""
    values = {k: v for k, v in report.items() if k.startswith(("train/", "val/"))} | {EPOCH_KEY: int(report[EPOCH])}
    if report.get(BEST_VALUE) is not None:
        values[BEST_EPOCH] = report[BEST_EPOCH]
        values[best_key(monitor)] = report[BEST_VALUE]
    return values


class LiveProgress:
    """Rank 0's progress during an epoch: a tqdm bar on a terminal, else (CI, a log file)
    a plain line at most every ``every_s`` seconds (``progress_every_s``)."""

    def __init__(self, epochs: int, tty: bool | None = None, every_s: float = 10.0):
        self.epochs, self.every_s = epochs, every_s
        self.tty = sys.stdout.isatty() if tty is None else tty
        self.bar = None
        self.bar_epoch: int | None = None
        self.last_line = time.perf_counter()

    def update(self, info: dict[str, Any]) -> None:
        step, total, epoch = int(info["step"]), info.get("total"), int(info["epoch"])
        rate = step / max(info["elapsed_s"], 1e-9)  # steps/s so far this epoch
        eta = (total - step) / rate if total else None
        if self.tty:
            self._bar(epoch, total).update(step - self.bar.n)
            self.bar.set_postfix_str(f"loss {info['loss']:.3f}, {info['images_per_s']:.1f} images/s", refresh=True)
            return
        now = time.perf_counter()
        if now - self.last_line < self.every_s:
            return
        self.last_line = now
        log.info(
            "  epoch %d/%d  step %d/%s  loss %.3f  %.1f images/s  epoch ETA %s", epoch + 1, self.epochs, step,
            total if total else "?", info["loss"], info["images_per_s"], duration(eta) if eta is not None else "?",
        )

    def _bar(self, epoch: int, total: int | None):
        if self.bar is None or self.bar_epoch != epoch:
            from tqdm import tqdm

            self.close()
            self.bar = tqdm(total=total, desc=f"epoch {epoch + 1}/{self.epochs}", unit="step", leave=False,
                            file=sys.stdout, dynamic_ncols=True)
            self.bar_epoch = epoch
        return self.bar

    def close(self) -> None:
        """Clear the bar before an epoch's line is printed."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.last_line = time.perf_counter()


def summary_table(
    progress: EpochProgress, reason: str, *, final: Path | None, best: Path | None,
    tracker: Any, registered: tuple[str, str] | None,
) -> str:
    """The lines a user reads when ``train`` ends: why it stopped, the best epoch and its
    validation mAPs, where the checkpoints are, the MLflow run and how to browse it."""
    rows = [("stopped", reason)]
    chosen = progress.best_metrics or progress.last
    if progress.best_metrics:
        rows.append(("best epoch", f"{int(chosen['epoch']) + 1} of {progress.epochs} by {progress.monitor}"))
    if "val/map" in chosen:
        rows.append(("val mAP", "  ".join(
            f"{k} {chosen[f'val/{k}']:.4f}" for k in ("map", "map_50", "voc07_map", "voc12_map") if f"val/{k}" in chosen
        ) + ("" if progress.best_metrics else "  (last epoch)")))
    if best is not None:
        rows.append(("best model", str(best)))
    if final is not None:
        rows.append(("last model", str(final)))
    rows.append(("MLflow run", f"{tracker.run_name()} ({tracker.run_id})"))
    if registered:
        rows.append(("registered", f"models:/{registered[0]}/{registered[1]}  (eval/predict checkpoint=...)"))
    rows.append(("browse", tracker.ui_command()))
    width = max(len(name) for name, _ in rows)
    return "\n".join(["done:"] + [f"  {name.ljust(width)}  {value}" for name, value in rows])


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
