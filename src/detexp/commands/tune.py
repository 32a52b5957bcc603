"""``detexp tune``: a Ray Tune search over train config keys, each trial a full train run.

The Train V2 pattern: the Tune trainable is a function (:func:`_run_trial`) that applies
the sampled values to the train config and calls :func:`detexp.commands.train.train` inside the
trial, with Ray Train's ``TuneReportCallback`` so that every epoch's report reaches Tune
(and ASHA) as one result. Each trial is its own train run: its run directory is
``<tune dir>/trials/<trial id>`` and its MLflow run is a child of the tune's parent run.

Resources: a trial's actor reserves no CPU (it only waits on its Train run) and is placed
on the driver's node (:func:`trial_placement`), so that every MLflow write and run directory
of a trial is on the driver's node: a store only the driver reaches (the default
SQLite file) works on any cluster. Its Train workers reserve theirs separately
(``num_workers x cpus_per_worker`` CPUs, and GPUs), and the data pipeline needs spare CPUs;
:func:`max_concurrent_trials` does that arithmetic, so trials never wait forever for
workers that cannot be placed.

Resume: a trial's Train run has a stable name and storage (its run directory), so a
restored trial (``Tuner.restore``) continues from its last checkpoint in the same MLflow run.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from detexp.commands.search_space import apply_sample, check_search_space, param_space, search_space
from detexp.config import TrainConfig, plain
from detexp.data.files import is_uri
from detexp.epoch_report import DIVERGED, EPOCH
from detexp.errors import ConfigError, ResourceError
from detexp.tracking.progress import (
    EPOCH_KEY,
    FIRST_STEP_KEY,
    best_key,
    epoch_values,
    first_step_seconds,
)

log = logging.getLogger("detexp")


# The trial actor only waits on its Train run (and logs to MLflow), so it reserves no CPU:
# Tune also places trials that wait for their turn, and a CPU each would take the one the
# data pipeline needs, stalling the running trial. A placement group's bundle cannot be
# empty, so it holds this much of Ray's logical memory instead.
TRIAL_MEMORY = 64 << 20
EXPERIMENT = "tune"  # Tune's experiment folder inside the run directory
TIME_ATTR = "epochs_done"  # what ASHA counts: epochs trained, also across a resume


def trial_resources(scaling: Any) -> tuple[float, int]:
    """CPUs and GPUs one trial holds: its Train workers' (its actor holds none)."""
    cpus = scaling.num_workers * scaling.cpus_per_worker
    gpus = scaling.num_workers if scaling.use_gpu else 0
    return cpus, gpus


def trial_placement(node_id: str):
    """What a trial actor reserves (no CPU), on the node ``node_id`` (the driver's) by
    its ``ray.io/node-id`` label."""
    from ray import tune as ray_tune

    return ray_tune.PlacementGroupFactory(
        [{"memory": TRIAL_MEMORY}], bundle_label_selector=[{"ray.io/node-id": node_id}],
    )


def max_concurrent_trials(scaling: Any, cluster: Mapping[str, float], data_cpus: int) -> int:
    """How many trials the cluster can run at once, keeping ``data_cpus`` free for each
    trial's own data pipeline (two trials sharing one spare CPU stalled both, measured on
    a two-node cluster); raises :class:`ResourceError` when not even one fits."""
    cpus, gpus = trial_resources(scaling)
    have_cpus, have_gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    by_cpu = int(have_cpus // (cpus + data_cpus))
    by_gpu = int(have_gpus // gpus) if gpus else by_cpu
    fits = min(by_cpu, by_gpu)
    if fits < 1:
        raise ResourceError(
            f"one trial needs {cpus:g} CPUs (scaling.num_workers="
            f"{scaling.num_workers} x scaling.cpus_per_worker={scaling.cpus_per_worker}) and {gpus} GPUs, "
            f"plus {data_cpus} CPU for its data loading, but the Ray cluster has {have_cpus:g} CPUs and "
            f"{have_gpus:g} GPUs; lower scaling.num_workers or scaling.cpus_per_worker"
        )
    return fits


def _run_trial(sample: dict[str, Any], *, base: dict, space: dict, tune_dir: str, parent_run_id: str) -> None:
    """The Tune trainable: one train run with the sampled values (runs in the trial actor)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from detexp.commands.train import train
    from detexp.tracking.mlflow_runs import short_overrides

    trial_id = tune.get_context().get_trial_id()
    cfg, overrides = apply_sample(base, sample, space)
    cfg.resume = True  # a restored trial continues its own checkpoints, in its own MLflow run
    cfg.tracking.run_name = short_overrides(overrides)  # as the MLflow UI lists the trials
    # One machine monitor (the parent run's), and no registry version per trial: the best
    # config is trained again with `train ... tracking.register_model=NAME`.
    cfg.tracking.system_metrics, cfg.tracking.register_model = False, None
    tags = {"mlflow.parentRunId": parent_run_id, "detexp.trial_id": trial_id, "detexp.trial_overrides": " ".join(overrides)}
    train(
        cfg, Path(tune_dir) / "trials" / trial_id, overrides,
        ray_callbacks=[TuneReportCallback()], tags=tags, live_progress=False,
        record_reports=False,  # TrialWatcher logs each result, however the trial ends
    )


def absolute_paths(cfg: DictConfig) -> DictConfig:
    """``cfg`` with every relative path made absolute against this process's directory:
    trials run in other processes (and on other nodes), which must find the same files."""
    from detexp.tracking.mlflow_runs import resolve_uri

    cfg = cfg.copy()
    cfg.tracking.uri = resolve_uri(cfg.tracking.uri)
    for key in ("dataset.root", "dataset.cache_dir", "model.checkpoint"):
        value = OmegaConf.select(cfg, key)
        if value is not None and not is_uri(value):  # s3://... stays as it is
            OmegaConf.update(cfg, key, str(Path(value).expanduser().resolve()), merge=False)
    return cfg


def check_tune_config(cfg: DictConfig) -> DictConfig:
    """Everything that can be refused before the data is read; returns the train part of the
    config (absolute paths). The search space is checked by :func:`check_search` once the
    data has made the ``auto`` values numbers."""
    from detexp.commands.train import check_train_config

    t = cfg.tune
    if not t.metric.startswith("val/"):
        raise ConfigError(f"tune.metric={t.metric!r}: trials are compared on a validation metric, e.g. val/map_50")
    if t.num_samples < 1 or t.grace_period < 1 or t.reduction_factor < 2:
        raise ConfigError("tune.num_samples and tune.grace_period must be at least 1, tune.reduction_factor at least 2")
    if t.max_concurrent_trials is not None and t.max_concurrent_trials < 1:
        raise ConfigError(f"tune.max_concurrent_trials={t.max_concurrent_trials} must be at least 1 (or null: computed)")
    if t.search == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError("tune.search=optuna needs the optuna package: pip install optuna") from None
    base = OmegaConf.merge(OmegaConf.structured(TrainConfig), {k: v for k, v in cfg.items() if k != "tune"})
    check_train_config(base)
    return absolute_paths(base)


def check_search(t: Any, base: DictConfig) -> dict[str, Any]:
    """The search space (``tune.search_space``, or the default around ``base``'s recipe),
    refused naming the key where it cannot be applied; ``base`` has its ``auto`` schedule
    resolved (:func:`detexp.commands.train.find_data`)."""
    if t.scheduler == "asha" and t.grace_period > base.schedule.epochs:
        raise ConfigError(f"tune.grace_period={t.grace_period} is longer than schedule.epochs={base.schedule.epochs}")
    space = search_space(t, base)
    check_search_space(space, base, t.search)
    return space


@dataclass(frozen=True)
class TuneRun:
    """One search as settled before its first trial: the train config every trial starts
    from, the search space and settings, where it writes and its MLflow parent run."""

    base: DictConfig  # the train part of the config, paths absolute
    space: dict[str, Any]
    settings: Any  # cfg.tune
    dir: Path
    tracker: Any  # detexp.tracking.mlflow_runs.Tracker
    parent_run_id: str
    concurrent: int  # trials at a time

    @property
    def experiment_dir(self) -> Path:
        return self.dir / EXPERIMENT


def tune(cfg: DictConfig, run_dir: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """``detexp tune``: run the search, each trial a child MLflow run of one parent run;
    write ``best_config.yaml`` into ``run_dir``. Returns the best trial's id, value and
    config path, the parent ``run_id`` and the trial counts. ``resume=true`` with the same
    ``run_dir`` continues an interrupted search."""
    from ray import tune as ray_tune

    from detexp.commands.train import find_data

    base = check_tune_config(cfg)
    find_data(base)  # found and said once: every trial trains on the same classes, anchors and epochs
    space = check_search(cfg.tune, base)
    run_dir = Path(run_dir).resolve()
    restoring = cfg.resume and ray_tune.Tuner.can_restore(str(run_dir / EXPERIMENT))
    if (run_dir / EXPERIMENT).exists() and not restoring:
        raise ConfigError(
            f"{run_dir} already holds a tune run; pass resume=true to continue it, or choose another hydra.run.dir"
        )
    run = _start_search(cfg.tune, base, space, run_dir, restoring=restoring, overrides=list(overrides or []))
    watcher = TrialWatcher(
        run.tracker, run.dir, metric=run.settings.metric, mode=run.settings.mode,
        epochs=base.schedule.epochs, num_samples=run.settings.num_samples, monitor=base.schedule.monitor,
    )
    started = time.perf_counter()
    try:
        with trial_environment(run.concurrent, verbose=base.ray.verbose):
            grid = _tuner(run, watcher, restoring).fit()
    except BaseException as exc:
        run.tracker.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    return _finish(run, grid, watcher, time.perf_counter() - started)


def _start_search(t: Any, base: DictConfig, space: dict[str, Any], run_dir: Path, *, restoring: bool,
                  overrides: list[str]) -> TuneRun:
    """Weights, MLflow store and Ray checked, how many trials fit at once, the resolved
    config written and the parent run started (or resumed)."""

    from detexp.checkpoint.files import RUN_ID_FILE
    from detexp.commands.train import weight_files
    from detexp.distributed import cluster
    from detexp.tracking.mlflow_runs import Tracker, default_tags, sweep_run_name

    weight_files(base.model)  # in the cache (or downloaded) before any trial starts
    tracker = Tracker(base.tracking.uri, base.tracking.experiment)
    cluster.start_ray(base.scaling, base.ray.address, base.ray.verbose)
    fits = max_concurrent_trials(base.scaling, cluster.usable_resources()[0], cluster.DATA_CPUS)
    concurrent = min(t.max_concurrent_trials or fits, fits)

    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = {**plain(base), "tune": {**plain(t), "search_space": space}}
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(resolved)))
    id_file = run_dir / RUN_ID_FILE
    if restoring and id_file.exists():
        parent = tracker.resume(id_file.read_text().strip())
    else:
        name = base.tracking.run_name or sweep_run_name("tune", list(space))
        parent = tracker.start(name, resolved, default_tags("tune", overrides))
        id_file.write_text(parent)
    if base.tracking.system_metrics:
        tracker.monitor_system()
    tracker.log_artifact(run_dir / "config.yaml")
    log.info(
        "tune: %d trial(s), %s search, %s scheduler on %s (%s), %d at a time; MLflow parent run %s",
        t.num_samples, t.search, t.scheduler, t.metric, t.mode, concurrent, parent,
    )
    for key, spec in space.items():
        log.info("  %s: %s", key, spec)
    return TuneRun(
        base=base, space=space, settings=t, dir=run_dir, tracker=tracker, parent_run_id=parent, concurrent=concurrent,
    )


@contextlib.contextmanager
def trial_environment(concurrent: int, verbose: bool) -> Iterator[None]:
    """Ray Tune's settings for this search, as the environment variables Tune reads on
    the driver and hands to each trial actor it creates; the previous values come back
    when the search ends. Trials must not change directory (relative paths would break),
    nor flood the console."""
    settings = {
        "RAY_CHDIR_TO_TRIAL_DIR": "0",
        "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1",  # a diverged epoch reports no metric
        "TUNE_MAX_PENDING_TRIALS_PG": str(concurrent),  # trials placed ahead of their turn
        **({} if verbose else {"RAY_AIR_NEW_OUTPUT": "0"}),
    }
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _tuner(run: TuneRun, watcher: TrialWatcher, restoring: bool):
    """A new Tuner over :func:`_run_trial`, or the interrupted one restored."""
    import ray
    from ray import tune as ray_tune

    trainable = ray_tune.with_resources(
        ray_tune.with_parameters(
            _run_trial, base=plain(run.base), space=run.space, tune_dir=str(run.dir), parent_run_id=run.parent_run_id,
        ),
        trial_placement(ray.get_runtime_context().get_node_id()),
    )
    if restoring:
        log.info("resuming the search in %s: finished trials are kept, the others continue", run.experiment_dir)
        return ray_tune.Tuner.restore(str(run.experiment_dir), trainable, resume_unfinished=True, resume_errored=True)
    run_config = ray_tune.RunConfig(
        name=EXPERIMENT, storage_path=str(run.dir), verbose=2 if run.base.ray.verbose else 0, callbacks=[watcher],
    )
    return ray_tune.Tuner(
        trainable, param_space=param_space(run.space, run.settings.search), run_config=run_config,
        tune_config=_tune_config(run.settings, run.base, run.concurrent),
    )


def _tune_config(t: Any, base: DictConfig, concurrent: int):
    from ray import tune as ray_tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    scheduler = (
        LastEpochsEnd(
            time_attr=TIME_ATTR, max_t=base.schedule.epochs, grace_period=t.grace_period,
            reduction_factor=t.reduction_factor,
            stop_last_trials=False,
        )
        if t.scheduler == "asha"
        else FIFOScheduler()
    )
    if t.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return ray_tune.TuneConfig(
            metric=t.metric, mode=str(t.mode), num_samples=t.num_samples, scheduler=scheduler,
            search_alg=OptunaSearch(seed=base.seed), max_concurrent_trials=concurrent,
        )
    return ray_tune.TuneConfig(
        metric=t.metric, mode=str(t.mode), num_samples=t.num_samples, scheduler=scheduler,
        search_alg=BasicVariantGenerator(random_state=base.seed, max_concurrent=concurrent),
    )


class LastEpochsEnd(ASHAScheduler):
    """Ray Tune's ASHA, but a trial at its last epoch is never stopped: ASHA's last rung may
    fall on it (grace 1 and 4 epochs: rungs at 1, 2 and 4; grace 1 and 1 epoch: at 1), and
    a trial below the cutoff there would be stopped while it ends (its final report,
    ``model_final.pt``, its MLflow run, its Train run's release of its CPUs), though
    nothing is left to save by then."""

    def on_trial_result(self, tune_controller, trial, result):
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision == TrialScheduler.STOP and result.get(self._time_attr, 0) >= self._max_t:
            return TrialScheduler.CONTINUE
        return decision


def _trial_run_id(run_dir: Path, trial_id: str) -> str | None:
    from detexp.checkpoint.files import RUN_ID_FILE

    path = run_dir / "trials" / trial_id / RUN_ID_FILE
    return path.read_text().strip() if path.is_file() else None


class TrialWatcher(Callback):
    """Runs on the tune driver: each trial result into the trial's MLflow child run as
    Tune hands it over (before a scheduler's decision can stop the trial, so a trial
    stopped at that result keeps it), one console line per result (instead of Tune's
    tables), and the child run of a trial the scheduler stopped marked as such (its
    process is stopped mid-run and cannot do it)."""

    def __init__(self, tracker, run_dir: Path, *, metric: str, mode: str, epochs: int, num_samples: int,
                 monitor: str = "val/map_50"):
        self.tracker, self.run_dir, self.metric, self.mode = tracker, run_dir, metric, mode
        self.monitor = monitor  # the trials' schedule.monitor, for their best/ metrics
        self.logged: dict[str, set[int]] = {}  # trial id -> epochs its MLflow run holds
        self.epochs, self.num_samples = epochs, num_samples
        self.best: tuple[float, str, int] | None = None  # value, trial id, epoch (0-based)
        self.history: dict[str, list[tuple[int, float]]] = {}  # trial id -> (epoch, metric value)
        self.stopped: set[str] = set()
        self.order: dict[str, int] = {}
        self.started_at: dict[str, float] = {}  # trial id -> time.time() when Tune (last) started it
        self.first_step_s: dict[str, float] = {}  # trial id -> its start-up: start to first step's end
        self.train_s = 0.0  # seconds all trials spent in training steps

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started_at[trial.trial_id] = time.time()
        self.order.setdefault(trial.trial_id, len(self.order) + 1)
        log.info("trial %s (%d/%d) started: %s", trial.trial_id, self.order[trial.trial_id], self.num_samples,
                 " ".join(f"{k}={v}" for k, v in trial.config.items()))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if EPOCH in result and DIVERGED not in result:
            self._record(trial.trial_id, result)
            self.train_s += float(result.get("train/epoch_s", 0.0))
            self._note_first_step(trial.trial_id, result)
        value = result.get(self.metric)
        if value is None or EPOCH not in result:
            return
        epoch = int(result[EPOCH])
        self.history.setdefault(trial.trial_id, []).append((epoch, float(value)))
        better = self.best is None or (value > self.best[0] if self.mode == "max" else value < self.best[0])
        if better and not math.isnan(value):
            self.best = (float(value), trial.trial_id, epoch)
            # the parent's row in the MLflow UI shows the best so far, in the trials' column
            with contextlib.suppress(Exception):  # a store hiccup must not stop the search
                self.tracker.log_metrics({self.metric: float(value), best_key(self.metric): float(value)},
                                         step=self.results_seen - 1)
        best = f"best {self.best[0]:.4f} (trial {self.best[1]}, epoch {self.best[2] + 1})" if self.best else ""
        log.info("trial %s  epoch %d/%d  %s %.4f  %s", trial.trial_id, epoch + 1, self.epochs, self.metric, value, best)
        if result.get("done") and int(result.get(TIME_ATTR, epoch + 1)) < self.epochs:
            self.stopped.add(trial.trial_id)

    @property
    def results_seen(self) -> int:
        """Results with the metric so far, of all trials: the parent run's step for its best so far."""
        return sum(len(h) for h in self.history.values())

    def _note_first_step(self, trial_id: str, result: Mapping[str, Any]) -> None:
        """The trial's start-up (from Tune starting it to its first step's end) into its run."""
        if trial_id in self.first_step_s:
            return
        seconds = first_step_seconds(result, self.started_at.get(trial_id))
        if seconds is None:
            return
        self.first_step_s[trial_id] = seconds
        log.info("trial %s: its first training step ended %.1f s after it started", trial_id, seconds)
        run_id = _trial_run_id(self.run_dir, trial_id)
        if run_id is not None:
            with contextlib.suppress(Exception):  # a store hiccup must not stop the search
                self.tracker.log_metrics({FIRST_STEP_KEY: seconds}, step=0, run_id=run_id)

    def _record(self, trial_id: str, result: Mapping[str, Any]) -> None:
        """The result's epoch into the trial's child run, once (a restored search skips
        what the run holds)."""
        run_id = _trial_run_id(self.run_dir, trial_id)
        if run_id is None:
            log.warning("trial %s reported before its MLflow run exists; epoch %d not recorded",
                        trial_id, int(result[EPOCH]) + 1)
            return
        if trial_id not in self.logged:
            self.logged[trial_id] = self.tracker.logged_steps(EPOCH_KEY, run_id=run_id)
        epoch = int(result[EPOCH])
        if epoch in self.logged[trial_id]:
            return
        self.tracker.log_metrics(epoch_values(dict(result), self.monitor), step=epoch, run_id=run_id)
        self.logged[trial_id].add(epoch)

    def on_trial_complete(self, iteration, trials, trial, **info):
        if trial.trial_id not in self.stopped:
            return
        done = len(self.history.get(trial.trial_id, []))
        log.info("trial %s stopped by the scheduler after %d/%d epochs", trial.trial_id, done, self.epochs)
        run_id = _trial_run_id(self.run_dir, trial.trial_id)
        if run_id is not None:
            self.tracker.end_run(run_id, "KILLED", {"detexp.stopped_by": "asha", "detexp.stop_reason":
                                 f"stopped by ASHA after {done} of {self.epochs} epochs"})

    def on_trial_error(self, iteration, trials, trial, **info):
        error = getattr(trial, "error_file", None)
        log.error("trial %s failed%s", trial.trial_id, f" (details in {error})" if error else "")
        run_id = _trial_run_id(self.run_dir, trial.trial_id)
        if run_id is not None:
            self.tracker.end_run(run_id, "FAILED", {})


def _summary_rows(run: TuneRun, grid, watcher: TrialWatcher) -> list[dict[str, Any]]:
    """One row per trial for the sweep summary: overrides, status, best value and epoch."""
    t, base = run.settings, plain(run.base)
    pick = max if t.mode == "max" else min
    rows = []
    for result in grid:
        trial_id = result.metrics.get("trial_id") or Path(result.path).name.rsplit("_", 2)[-2]
        history = watcher.history.get(trial_id) or _history(result, t.metric)
        best = pick(history, key=lambda item: item[1]) if history else None
        _, overrides = apply_sample(base, result.config, run.space)
        status = "ERROR" if result.error else ("STOPPED" if trial_id in watcher.stopped else "FINISHED")
        rows.append({
            "job": trial_id, "overrides": " ".join(overrides), "status": status,
            "best_value": best[1] if best else None, "best_epoch": best[0] if best else None,
            "epochs": len(history), "run_id": _trial_run_id(run.dir, trial_id),
            "error": str(result.error).splitlines()[0][:300] if result.error else None,
        })
    return rows


def _finish(run: TuneRun, grid, watcher: TrialWatcher, seconds: float) -> dict[str, Any]:
    """The summary tables, ``best_config.yaml`` and the parent run's tags and metrics; the
    parent run ends (FAILED when no trial reported the metric)."""
    from detexp.commands.multirun import sweep_efficiency, write_summary

    t, tracker = run.settings, run.tracker
    rows = _summary_rows(run, grid, watcher)
    for path in write_summary(rows, t.metric, run.dir):
        tracker.log_artifact(path)
    scored = [r for r in rows if r["best_value"] is not None and not math.isnan(r["best_value"])]
    if not scored:
        tracker.end("FAILED")
        raise ConfigError(f"no trial reported {t.metric}; see the trials in {run.dir / 'trials'}")
    best = (max if t.mode == "max" else min)(scored, key=lambda r: r["best_value"])
    samples = {" ".join(apply_sample(plain(run.base), r.config, run.space)[1]): r.config for r in grid}
    best_cfg, _ = apply_sample(plain(run.base), samples[best["overrides"]], run.space)
    best_path = write_best_config(best_cfg, run.dir, best, t.metric)
    tracker.log_artifact(best_path)
    tracker.set_tags({"detexp.best_trial": best["job"], "detexp.best_child": best["run_id"] or "",
                      "detexp.best_overrides": best["overrides"]})
    efficiency = sweep_efficiency(watcher.train_s, seconds, list(watcher.first_step_s.values()), "trial")
    tracker.log_metrics({"tune/trials": len(rows), "tune/stopped_early": len(watcher.stopped), "tune/seconds": seconds,
                         **{f"tune/{k}": v for k, v in efficiency.items()}}, step=0)
    # after every best-so-far the watcher logged: the latest value is the search's best
    tracker.log_metrics({best_key(t.metric): best["best_value"], t.metric: best["best_value"]},
                        step=watcher.results_seen)
    tracker.end("FINISHED")
    command = f"python -m detexp train -cd {best_path.parent} -cn {best_path.stem}"
    log.info("best trial %s: %s %.4f at epoch %d with %s", best["job"], t.metric, best["best_value"],
             best["best_epoch"] + 1, best["overrides"])
    log.info("its config: %s; train it again with:  %s", best_path, command)
    log.info("browse the trials with:  %s", tracker.ui_command())
    return {"best_trial": best["job"], "best_value": best["best_value"], "best_config": str(best_path),
            "run_id": run.parent_run_id, "trials": len(rows), "stopped_early": len(watcher.stopped),
            "command": command}


def _history(result, metric: str) -> list[tuple[int, float]]:
    frame = result.metrics_dataframe
    if frame is None or metric not in frame or "epoch" not in frame:
        return []
    return [(int(e), float(v)) for e, v in zip(frame["epoch"], frame[metric], strict=True) if v == v]


def write_best_config(cfg: DictConfig, run_dir: Path, best: Mapping[str, Any], metric: str) -> Path:
    """``best_config.yaml``: a primary config that extends the packaged ``train.yaml`` with
    every value of the best trial, so ``train -cd RUN_DIR -cn best_config`` trains it again."""
    cfg = cfg.copy()
    cfg.resume = False
    body = OmegaConf.to_yaml(OmegaConf.merge({"defaults": ["train", "_self_"]}, cfg))
    header = (
        f"# The best trial ({best['job']}) of the tune run in {run_dir}:\n"
        f"#   {metric} {best['best_value']:.4f} at epoch {best['best_epoch'] + 1}, with {best['overrides']}\n"
        f"# Train it again:  python -m detexp train -cd {run_dir} -cn best_config\n"
    )
    path = run_dir / "best_config.yaml"
    path.write_text(header + body)
    return path
