"""Hydra multirun (``detexp train -m ...``) as one MLflow parent run with a child per job.

:class:`MultirunTracking` is a Hydra callback (``hydra.callbacks`` in ``conf/train.yaml``).
When a sweep starts it opens the parent run: the sweep's overrides as params, the sweep
directory as a tag. Every job's train run becomes its child (MLflow's
``mlflow.parentRunId`` tag, which the UI nests under the parent). When the sweep ends the
parent gets ``sweep_summary.csv`` / ``.md`` (one row per job: overrides, best value of the
monitored metric and its epoch, epochs trained, status, run id) and a ``detexp.best_child``
tag, and it ends FAILED if any job failed.

In a single run (no ``-m``) the callback does nothing.
"""

from __future__ import annotations

import csv
import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

log = logging.getLogger("detexp")

SUMMARY_COLUMNS = ("job", "overrides", "status", "best_value", "best_epoch", "epochs", "run_id", "error")


@dataclass
class _Sweep:
    tracker: Any  # detexp.tracking.mlflow_runs.Tracker of the parent run
    run_id: str
    sweep_dir: Path
    metric: str
    mode: str
    swept: tuple[str, ...] = ()  # the keys the sweep varies, as Hydra parsed them
    rows: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False
    started: float = field(default_factory=time.perf_counter)


_current: _Sweep | None = None  # the sweep of this process, while one runs


def swept_keys(overrides: list[str]) -> tuple[str, ...]:
    """The keys of ``overrides`` that a multirun sweeps (``a=1,2``, ``choice(...)``, ``range(...)``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return tuple(o.key_or_group for o in parsed if o.is_sweep_override())


def child_run_name(job_overrides: list[str]) -> str | None:
    """The name of a sweep job's run: its values of the swept keys (``lr=0.02 lr_steps=[8,11]``);
    None outside a sweep."""
    from detexp.tracking.mlflow_runs import short_overrides

    if _current is None:
        return None
    mine = [o for o in job_overrides if o.partition("=")[0].lstrip("+~") in _current.swept]
    return short_overrides(mine) or None


def parent_tags() -> dict[str, str]:
    """Tags that make a train run of the running sweep its child; empty outside a sweep."""
    if _current is None:
        return {}
    return {"mlflow.parentRunId": _current.run_id, "detexp.sweep_dir": str(_current.sweep_dir)}


class MultirunTracking(Callback):
    """Hydra callback: see the module docstring. Hydra instantiates it from the config."""

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        global _current
        from omegaconf import OmegaConf

        from detexp.tracking.mlflow_runs import Tracker, default_tags, sweep_run_name

        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        overrides = list(config.hydra.overrides.task)
        tracker = Tracker(config.tracking.uri, config.tracking.experiment)
        params = {"sweep": {"overrides": " ".join(overrides), "dir": str(sweep_dir)}}
        tags = {**default_tags("train -m", overrides), "detexp.sweep_dir": str(sweep_dir)}
        swept = swept_keys(overrides)
        run_name = OmegaConf.select(config, "tracking.run_name") or sweep_run_name("sweep", swept)
        run_id = tracker.start(run_name, params, tags)
        schedule = config.schedule
        _current = _Sweep(tracker, run_id, sweep_dir, str(schedule.monitor), str(schedule.monitor_mode),
                          swept=tuple(k.lstrip("+~") for k in swept))
        log.info("sweep %s: MLflow parent run %s; each job is a child run", sweep_dir, run_id)

    def on_job_end(self, config: Any, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus

        if _current is None:
            return
        row: dict[str, Any] = {
            "job": config.hydra.job.num,
            "overrides": " ".join(job_return.overrides or []),
            "status": "FINISHED" if job_return.status == JobStatus.COMPLETED else "FAILED",
        }
        if job_return.status == JobStatus.COMPLETED:
            result = job_return._return_value or {}
            row.update(
                best_value=result.get("best/value"),
                best_epoch=result.get("best/epoch"),
                epochs=result.get("epochs_trained"),
                run_id=result.get("run_id"),
                first_step_s=result.get("first_step_s"),
                train_s=result.get("train_s"),
            )
        else:
            error = job_return._return_value
            row["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:300]
        _current.rows.append(row)
        _log_best(_current)  # the parent's row in the UI shows the best so far, also mid-sweep

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        finish_sweep()


def _best_row(rows: list[dict[str, Any]], mode: str) -> dict[str, Any] | None:
    scored = [r for r in rows if isinstance(r.get("best_value"), int | float) and not math.isnan(r["best_value"])]
    if not scored:
        return None
    pick = max if mode == "max" else min
    return pick(scored, key=lambda r: r["best_value"])


def _log_best(sweep: _Sweep) -> dict[str, Any] | None:
    """The best job so far into the parent run: tags naming it, and its best value both as
    the children's best key (``best/val_map_50``) and under the metric's own key, the column
    the children show it in."""
    from detexp.tracking.progress import best_key

    best = _best_row(sweep.rows, sweep.mode)
    if best is not None:
        sweep.tracker.set_tags({"detexp.best_child": best["run_id"], "detexp.best_overrides": best["overrides"]})
        sweep.tracker.log_metrics({best_key(sweep.metric): best["best_value"], sweep.metric: best["best_value"]},
                                  step=len(sweep.rows) - 1)
    return best


def write_summary(rows: list[dict[str, Any]], metric: str, out_dir: Path) -> list[Path]:
    """``sweep_summary.csv`` and ``sweep_summary.md`` in ``out_dir``: one row per job."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / "sweep_summary.csv", out_dir / "sweep_summary.md"
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(SUMMARY_COLUMNS)
        for row in rows:
            writer.writerow(["" if row.get(c) is None else row[c] for c in SUMMARY_COLUMNS])
    header = ["job", "overrides", "status", f"best {metric}", "best epoch", "epochs", "run id"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        value = row.get("best_value")
        cells = [
            str(row["job"]), f"`{row['overrides']}`", row["status"],
            f"{value:.4f}" if isinstance(value, float) else "",
            "" if row.get("best_epoch") is None else str(row["best_epoch"] + 1),
            str(row.get("epochs") or ""), row.get("run_id") or row.get("error") or "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    md_path.write_text("\n".join(lines) + "\n")
    return [csv_path, md_path]


def finish_sweep(interrupted: bool = False) -> None:
    """Write the summary into the parent run and end it (once; also when the sweep was
    cut short by an error or Ctrl-C, which skips Hydra's ``on_multirun_end``)."""
    global _current
    sweep = _current
    if sweep is None or sweep.finished:
        return
    sweep.finished = True
    _current = None
    for path in write_summary(sweep.rows, sweep.metric, sweep.sweep_dir):
        sweep.tracker.log_artifact(path)
    best = _log_best(sweep)
    efficiency = sweep_efficiency(
        sum(r.get("train_s") or 0.0 for r in sweep.rows), time.perf_counter() - sweep.started,
        [r["first_step_s"] for r in sweep.rows if r.get("first_step_s") is not None], "job",
    )
    sweep.tracker.log_metrics({f"sweep/{k}": v for k, v in efficiency.items()}, step=0)
    failed = sum(1 for r in sweep.rows if r["status"] != "FINISHED")
    status = "KILLED" if interrupted else ("FAILED" if failed else "FINISHED")
    sweep.tracker.end(status)
    log.info(
        "sweep done: %d job(s), %d failed; summary in %s%s",
        len(sweep.rows), failed, sweep.sweep_dir / "sweep_summary.md",
        f"; best {sweep.metric} {best['best_value']:.4f} with {best['overrides']} (run {best['run_id']})" if best else "",
    )


def sweep_efficiency(train_s: float, wall_s: float, first_steps: list[float], unit: str) -> dict[str, float]:
    """A sweep's use of its time, said in one line and returned as metrics: the seconds its
    runs spent in training steps, that share of the sweep's wall-clock time, and the median
    start-up of a run (``unit``: job or trial)."""
    values = {"train_s": train_s, "efficiency": train_s / wall_s if wall_s > 0 else 0.0}
    if first_steps:
        values[f"{unit}_first_step_s"] = statistics.median(first_steps)
    log.info(
        "the sweep trained for %.0f s of its %.0f s (efficiency %.2f)%s", train_s, wall_s, values["efficiency"],
        f"; median start-up of a {unit} (to its first step) {values[f'{unit}_first_step_s']:.1f} s" if first_steps else "",
    )
    return values
