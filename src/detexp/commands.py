"""The commands behind ``python -m detexp``: plain functions of a composed config that
return their results, so tests and notebooks call them directly.

Data flows one way: config -> data -> trainer/workers -> checkpoint -> tracking.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from detexp.data.source import DataSource, resolve
from detexp.data.voc import (
    Problem,
    check_dataset,
    format_problems,
    summarize_problems,
    write_problems_csv,
)
from detexp.errors import ConfigError, DetexpError

log = logging.getLogger("detexp")

ON_ERROR = ("skip", "raise")
RUN_ID_FILE = "mlflow_run_id"
TRAIN_NAME = "train"  # RunConfig(name): checkpoints live in <run dir>/checkpoints/train
EPOCH_KEY = "epoch"  # MLflow metric logged with every epoch (step = the 0-based epoch)
MAX_TABLE_ROWS = 30  # problems shown on the console; data/skipped.csv lists them all


def check_train_config(cfg: DictConfig) -> None:
    """Value checks the schema's types cannot express; all run before Ray starts."""
    from detexp.models import check_model_config  # torch: not needed by `data check`
    from detexp.optim import check_optim_config

    check_model_config(cfg.model)
    check_optim_config(cfg.optimizer, cfg.schedule)
    if cfg.dataset.on_error not in ON_ERROR:
        raise ConfigError(f"dataset.on_error={cfg.dataset.on_error!r}: choose one of {', '.join(ON_ERROR)}")
    if cfg.dataset.batch_size < 1:
        raise ConfigError(f"dataset.batch_size={cfg.dataset.batch_size} must be at least 1")
    if cfg.scaling.num_workers < 1 or cfg.scaling.cpus_per_worker < 1:
        raise ConfigError("scaling.num_workers and scaling.cpus_per_worker must be at least 1")


def train(cfg: DictConfig, run_dir: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Train as ``cfg`` says, writing checkpoints and the resolved config into
    ``run_dir`` and everything into one MLflow run. Returns the last epoch's metrics
    plus ``run_id`` and ``checkpoint`` (the final checkpoint file).

    With ``cfg.resume`` and a ``run_dir`` that holds checkpoints, training continues
    after the last checkpoint (model, optimizer, schedule) in the same MLflow run;
    without it such a ``run_dir`` is refused rather than overwritten. Raises
    :class:`TrainingDivergedError` when the loss becomes NaN/inf (the MLflow run is then
    FAILED and the last good checkpoint stays)."""
    from detexp import launch
    from detexp.tracking import Tracker

    check_train_config(cfg)
    run_dir = Path(run_dir).resolve()
    ckpt_root = run_dir / "checkpoints"
    previous = latest_checkpoint(ckpt_root / TRAIN_NAME)
    if previous is not None and not cfg.resume:
        raise ConfigError(
            f"{run_dir} already holds a run's checkpoints (last: epoch {previous.epoch + 1}); "
            "pass resume=true to continue it, or choose another hydra.run.dir"
        )
    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment)  # refuses a dead server early
    resolved = OmegaConf.to_container(cfg, resolve=True)
    epochs = cfg.schedule.epochs
    if previous is not None and previous.epoch + 1 >= epochs:  # nothing to train: no Ray, no data
        run_id = _start_or_resume_run(tracker, cfg, resolved, run_dir, overrides or [])
        _Progress(epochs, cfg.scaling.max_failures, tracker, tracker.logged_steps(EPOCH_KEY), previous).backfill(previous)
        log.info(
            "the run in %s has finished all %d epochs already (its last checkpoint is of epoch %d); "
            "nothing to train. Raise schedule.epochs to train it longer.", run_dir, epochs, previous.epoch + 1,
        )
        return _finish(tracker, run_id, previous.checkpoint, run_dir, previous.metrics)
    source = resolve(cfg.dataset)

    launch.init_ray(cfg.ray.address, cfg.ray.verbose)
    launch.check_resources(cfg.scaling)
    datasets, counts, problems = _load_datasets(cfg, source)
    _apply_error_policy(cfg, problems, run_dir)
    rows_per_worker = counts["data/train_images"] // cfg.scaling.num_workers
    if rows_per_worker == 0:
        raise ConfigError(
            f"{counts['data/train_images']} usable training images cannot feed "
            f"scaling.num_workers={cfg.scaling.num_workers} workers"
        )

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    run_id = _start_or_resume_run(tracker, cfg, resolved, run_dir, overrides or [])
    if not tracker.logged_steps("data/train_images"):  # once per run, not per resume
        tracker.log_metrics(counts, step=0)
    for name in ("config.yaml", "data/skipped.csv"):
        if (run_dir / name).exists():
            tracker.log_artifact(run_dir / name, str(Path(name).parent) if "/" in name else None)

    progress = _Progress(epochs, cfg.scaling.max_failures, tracker, tracker.logged_steps(EPOCH_KEY), previous)
    if previous is not None:
        progress.backfill(previous)
        log.info(
            "resuming from the checkpoint of epoch %d/%d (%s): training continues with epoch %d/%d "
            "in MLflow run %s", previous.epoch + 1, epochs, previous.checkpoint.path,
            previous.epoch + 2, epochs, run_id,
        )
    elif cfg.resume:
        log.info("resume=true, but %s holds no checkpoint yet: starting at epoch 1", run_dir)

    loop_config = {"cfg": resolved, "steps_per_epoch": math.ceil(rows_per_worker / cfg.dataset.batch_size)}
    log.info(
        "training %s on %d images (%d val) with %d worker(s), %d epochs; run dir %s",
        cfg.model.name, counts["data/train_images"], counts["data/val_images"],
        cfg.scaling.num_workers, epochs, run_dir,
    )
    try:
        result = launch.fit(
            loop_config, datasets, cfg.scaling, str(ckpt_root), TRAIN_NAME, cfg.checkpoints_to_keep,
            progress.on_report, progress.on_failure,
        )
    except BaseException as exc:
        tracker.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise _explain(exc, run_dir) from None

    if progress.diverged is not None:
        tracker.end("FAILED")
        raise _diverged(progress.diverged, result.checkpoint, epochs, run_dir)
    if source.val_ids:  # per-class AP, PR curves, image grid of the final model, as `detexp eval`
        from detexp.evaluate import report_training

        report_training(cfg, result.checkpoint, run_dir, tracker)
    return _finish(tracker, run_id, result.checkpoint, run_dir, progress.last)


def _finish(tracker, run_id: str, checkpoint, run_dir: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    final = _final_checkpoint(checkpoint, run_dir)
    if final is not None:
        tracker.log_artifact(final, "checkpoints")
    tracker.end("FINISHED")
    log.info("done: run %s, last checkpoint %s", run_id, final)
    log.info("browse it with:  %s", tracker.ui_command())
    return {**metrics, "run_id": run_id, "checkpoint": str(final) if final else None}


@dataclass
class SavedCheckpoint:
    """The newest checkpoint Ray Train registered for a run, and the ones it still keeps."""

    epoch: int  # 0-based
    checkpoint: Any  # ray.train.Checkpoint
    metrics: dict[str, Any]
    kept: list[tuple[Any, dict[str, Any]]]  # (checkpoint, metrics), oldest first


def latest_checkpoint(experiment_dir: Path) -> SavedCheckpoint | None:
    """What ``ray.train.get_checkpoint()`` will hand the workers when a run re-uses
    ``RunConfig(name, storage_path)``: read from Ray Train's snapshot of the run, so a
    half-written checkpoint folder (a crash mid-upload) never counts."""
    from ray.train import Result

    from detexp.errors import ConfigError

    if not (experiment_dir / "checkpoint_manager_snapshot.json").is_file():
        return None
    ray_train_log = logging.getLogger("ray.train")
    level = ray_train_log.level
    ray_train_log.setLevel(logging.WARNING)  # not Ray's paragraph about finding a snapshot
    try:
        result = Result.from_path(str(experiment_dir))
    except Exception as exc:  # noqa: BLE001 - a corrupt or foreign snapshot
        raise ConfigError(f"cannot read the checkpoints in {experiment_dir}: {exc}") from None
    finally:
        ray_train_log.setLevel(level)
    if result.checkpoint is None:
        return None
    kept = sorted(result.best_checkpoints or [], key=lambda item: int(item[1]["epoch"]))
    return SavedCheckpoint(int(result.metrics["epoch"]), result.checkpoint, dict(result.metrics), kept)


def _load_datasets(cfg: DictConfig, source: DataSource):
    from detexp.data.annotations import problems_of, read_annotations
    from detexp.data.pipeline import decode_images

    started = time.perf_counter()
    train_ann = read_annotations(source.root, source.train_ids, source.classes).materialize()
    val_ann = read_annotations(source.root, source.val_ids, source.classes).materialize()
    problems = problems_of(train_ann) + (problems_of(val_ann) if source.val_ids else [])
    order = {image_id: n for n, image_id in enumerate(source.train_ids + source.val_ids)}
    problems.sort(key=lambda p: order.get(p.image_id, len(order)))  # split order, not block order
    bad = {p.image_id for p in problems if p.severity == "error"}
    counts = {
        "data/train_images": sum(1 for i in source.train_ids if i not in bad),
        "data/val_images": sum(1 for i in source.val_ids if i not in bad),
        "data/skipped": len(bad),
        "data/warnings": sum(1 for p in problems if p.severity == "warning"),
    }
    log.info(
        "read annotations of %d images in %.1fs from %s",
        len(source.train_ids) + len(source.val_ids), time.perf_counter() - started, source.root,
    )
    datasets = {"train": decode_images(train_ann, source.root, cfg.dataset.hflip_prob)}
    if source.val_ids:
        datasets["val"] = decode_images(val_ann, source.root, 0.0)
    return datasets, counts, problems


def _apply_error_policy(cfg: DictConfig, problems: list[Problem], run_dir: Path) -> None:
    errors = [p for p in problems if p.severity == "error"]
    if not errors:
        return
    skipped_csv = run_dir / "data" / "skipped.csv"
    write_problems_csv(errors, skipped_csv)
    table = _table(errors, skipped_csv)
    if cfg.dataset.on_error == "raise":
        raise DetexpError(f"the dataset has errors (dataset.on_error=raise):\n{table}")
    log.warning(
        "skipping %d image(s) with broken annotations or images (dataset.on_error=skip; list in %s):\n%s",
        len({p.image_id for p in errors}), skipped_csv, table,
    )


def _table(errors: list[Problem], csv_path: Path) -> str:
    """The problems table, cut to a screenful (the CSV has every row)."""
    if len(errors) <= MAX_TABLE_ROWS:
        return format_problems(errors)
    lines = format_problems(errors[:MAX_TABLE_ROWS]).splitlines()[:-1]
    lines.append(f"... and {len(errors) - MAX_TABLE_ROWS} more rows in {csv_path}")
    lines.append(summarize_problems(errors))
    return "\n".join(lines)


def _start_or_resume_run(tracker, cfg, resolved, run_dir: Path, overrides: list[str]) -> str:
    from detexp.tracking import default_tags

    id_file = run_dir / RUN_ID_FILE
    if cfg.resume and id_file.exists():
        run_id = tracker.resume(id_file.read_text().strip())
        log.info("resuming MLflow run %s", run_id)
        return run_id
    if cfg.resume and (run_dir / "checkpoints").exists():
        log.warning("no %s in %s: the resumed training goes into a new MLflow run", RUN_ID_FILE, run_dir)
    run_id = tracker.start(cfg.tracking.run_name, resolved, default_tags("train", overrides))
    id_file.write_text(run_id)
    return run_id


def _final_checkpoint(checkpoint, run_dir: Path) -> Path | None:
    from detexp.worker import CHECKPOINT_FILE

    if checkpoint is None:
        return None
    final = run_dir / "model_final.pt"
    with checkpoint.as_directory() as d:
        shutil.copyfile(Path(d) / CHECKPOINT_FILE, final)
    return final


def _explain(exc: BaseException, run_dir: Path) -> BaseException:
    """Turn a Ray Train failure into one line that says what happened and what was kept."""
    from ray.train import TrainingFailedError

    from detexp.launch import _last_line

    if not isinstance(exc, TrainingFailedError):
        return exc
    failures = getattr(exc, "worker_failures", {}) or {}
    text = _last_line(next(iter(failures.values()), exc))
    return DetexpError(
        f"training failed: {text}; checkpoints so far are in {run_dir / 'checkpoints'} "
        f"(continue with resume=true hydra.run.dir={run_dir})"
    )


class TrainingDivergedError(DetexpError):
    """The loss became NaN or infinite."""


def _diverged(diverged: tuple[int, dict[str, Any]], checkpoint, epochs: int, run_dir: Path) -> DetexpError:
    epoch, info = diverged
    losses = ", ".join(f"{k}={v:.4g}" for k, v in info["losses"].items())
    where = f" on worker {info['rank']}" if info.get("rank") else ""
    if checkpoint is not None:
        from ray.train import Result

        good = Result.from_path(str(run_dir / "checkpoints" / TRAIN_NAME)).metrics["epoch"] + 1
        kept = f"the last good checkpoint (epoch {good}/{epochs}) is in {checkpoint.path}"
    else:
        kept = "no checkpoint was written before it"
    return TrainingDivergedError(
        f"training diverged: non-finite loss in epoch {epoch + 1}/{epochs} at step {info['step'] + 1}{where} "
        f"({losses}); {kept}; lower optimizer.lr or set schedule.grad_clip_norm"
    )


class _Progress:
    """Per-epoch lines for people, and the same numbers into MLflow, each epoch once:
    an epoch the MLflow run already holds (a resumed run) is not logged again."""

    SHORT = {"loss_classifier": "cls", "loss_box_reg": "box", "loss_objectness": "obj", "loss_rpn_box_reg": "rpn"}

    def __init__(self, epochs: int, max_failures: int, tracker, logged: set[int], previous: SavedCheckpoint | None):
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
            metrics.get("val/map_50", float("nan")), _duration(eta),
        )

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


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def data_check(cfg: DictConfig) -> int:
    """Scan the dataset's splits; print the problems table; return the number of errors."""
    source = resolve(cfg.dataset)
    ids = list(dict.fromkeys(source.train_ids + source.val_ids))
    _, problems = check_dataset(source.root, ids, source.classes)
    errors = sum(1 for p in problems if p.severity == "error")
    if problems:
        print(format_problems(problems))
    print(f"checked {len(ids)} images in {source.root}: {errors} error(s), {len(problems) - errors} warning(s)")
    return errors


def data_synth(cfg: DictConfig) -> Path:
    from detexp.data.shapes import generate_shapes

    out = Path(cfg.out).expanduser().resolve()
    s = cfg.synth
    generate_shapes(out, num_train=s.num_train, num_val=s.num_val, image_size=s.image_size, seed=s.seed)
    print(f"wrote {s.num_train} train + {s.num_val} val images to {out}")
    print(f"train on it with:  python -m detexp train dataset=voc dataset.root={out} "
          "'dataset.classes=[circle,square,triangle,cross]'")
    return out
