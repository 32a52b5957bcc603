"""The commands behind ``python -m detexp``: plain functions of a composed config that
return their results, so tests and notebooks call them directly.

Data flows one way: config -> data -> trainer/workers -> checkpoint -> tracking.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from detexp.data.source import DataSource, resolve
from detexp.data.voc import Problem, check_dataset, format_problems, write_problems_csv
from detexp.errors import ConfigError, DetexpError
from detexp.models import check_model_config
from detexp.optim import check_optim_config

log = logging.getLogger("detexp")

ON_ERROR = ("skip", "raise")
RUN_ID_FILE = "mlflow_run_id"


def check_train_config(cfg: DictConfig) -> None:
    """Value checks the schema's types cannot express; all run before Ray starts."""
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
    plus ``run_id`` and ``checkpoint`` (the final checkpoint file)."""
    from detexp import launch
    from detexp.tracking import Tracker

    check_train_config(cfg)
    run_dir = Path(run_dir).resolve()
    ckpt_root = run_dir / "checkpoints"
    if ckpt_root.exists() and any(ckpt_root.iterdir()) and not cfg.resume:
        raise ConfigError(
            f"{run_dir} already holds a run's checkpoints; pass resume=true to continue it, "
            "or choose another hydra.run.dir"
        )
    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment)  # refuses a dead server early
    source = resolve(cfg.dataset)

    launch.init_ray(cfg.ray.address, cfg.ray.verbose)
    launch.check_resources(cfg.scaling)
    datasets, counts, problems = _load_datasets(cfg, source)
    _apply_error_policy(cfg, problems, run_dir)

    resolved = OmegaConf.to_container(cfg, resolve=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    run_id = _start_or_resume_run(tracker, cfg, resolved, run_dir, overrides or [])
    tracker.log_metrics(counts, step=0)
    for name in ("config.yaml", "data/skipped.csv"):
        if (run_dir / name).exists():
            tracker.log_artifact(run_dir / name, str(Path(name).parent) if "/" in name else None)

    progress = _Progress(cfg.schedule.epochs, tracker)
    rows_per_worker = counts["data/train_images"] // cfg.scaling.num_workers
    if rows_per_worker == 0:
        raise ConfigError(
            f"{counts['data/train_images']} usable training images cannot feed "
            f"scaling.num_workers={cfg.scaling.num_workers} workers"
        )
    loop_config = {"cfg": resolved, "steps_per_epoch": math.ceil(rows_per_worker / cfg.dataset.batch_size)}
    log.info(
        "training %s on %d images (%d val) with %d worker(s), %d epochs; run dir %s",
        cfg.model.name, counts["data/train_images"], counts["data/val_images"],
        cfg.scaling.num_workers, cfg.schedule.epochs, run_dir,
    )
    try:
        result = launch.fit(
            loop_config, datasets, cfg.scaling, str(ckpt_root), "train", cfg.checkpoints_to_keep,
            progress.on_report,
        )
    except BaseException as exc:
        tracker.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise _explain(exc, run_dir) from None

    if source.val_ids:  # per-class AP, PR curves, image grid of the final model, as `detexp eval`
        from detexp.evaluate import report_training

        report_training(cfg, result.checkpoint, run_dir, tracker)
    final = _final_checkpoint(result, run_dir)
    if final is not None:
        tracker.log_artifact(final, "checkpoints")
    tracker.end("FINISHED")
    log.info("done: run %s, last checkpoint %s", run_id, final)
    log.info("browse it with:  %s", tracker.ui_command())
    return {**progress.last, "run_id": run_id, "checkpoint": str(final) if final else None}


def _load_datasets(cfg: DictConfig, source: DataSource):
    from detexp.data.pipeline import decode_images, problems_of, read_annotations

    started = time.perf_counter()
    train_ann = read_annotations(source.root, source.train_ids, source.classes).materialize()
    val_ann = read_annotations(source.root, source.val_ids, source.classes).materialize()
    problems = problems_of(train_ann) + (problems_of(val_ann) if source.val_ids else [])
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
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "data").mkdir(exist_ok=True)
    write_problems_csv(errors, run_dir / "data" / "skipped.csv")
    table = format_problems(errors)
    if cfg.dataset.on_error == "raise":
        raise DetexpError(f"the dataset has errors (dataset.on_error=raise):\n{table}")
    log.warning("skipping %d image(s) with broken annotations or images:\n%s", len({p.image_id for p in errors}), table)


def _start_or_resume_run(tracker, cfg, resolved, run_dir: Path, overrides: list[str]) -> str:
    from detexp.tracking import default_tags

    id_file = run_dir / RUN_ID_FILE
    if cfg.resume and id_file.exists():
        run_id = tracker.resume(id_file.read_text().strip())
        log.info("resuming MLflow run %s", run_id)
        return run_id
    run_id = tracker.start(cfg.tracking.run_name, resolved, default_tags("train", overrides))
    id_file.write_text(run_id)
    return run_id


def _final_checkpoint(result, run_dir: Path) -> Path | None:
    from detexp.worker import CHECKPOINT_FILE

    if result.checkpoint is None:
        return None
    final = run_dir / "model_final.pt"
    with result.checkpoint.as_directory() as d:
        shutil.copyfile(Path(d) / CHECKPOINT_FILE, final)
    return final


def _explain(exc: BaseException, run_dir: Path) -> BaseException:
    """Turn a Ray Train failure into one line that says what happened and what was kept."""
    from ray.train import TrainingFailedError

    if not isinstance(exc, TrainingFailedError):
        return exc
    failures = getattr(exc, "worker_failures", {}) or {}
    first = next(iter(failures.values()), exc)
    cause = getattr(first, "cause", None) or first
    text = str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
    return DetexpError(f"training failed: {text}; checkpoints so far are in {run_dir / 'checkpoints'}")


class _Progress:
    """Per-epoch lines for people, and the same numbers into MLflow."""

    SHORT = {"loss_classifier": "cls", "loss_box_reg": "box", "loss_objectness": "obj", "loss_rpn_box_reg": "rpn"}

    def __init__(self, epochs: int, tracker):
        self.epochs = epochs
        self.tracker = tracker
        self.started = time.perf_counter()
        self.done = 0
        self.last: dict[str, Any] = {}

    def on_report(self, metrics: dict[str, Any], checkpoint: str | None) -> None:
        epoch = int(metrics["epoch"])
        self.tracker.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)
        self.done += 1
        self.last = metrics
        per_epoch = (time.perf_counter() - self.started) / self.done
        eta = per_epoch * (self.epochs - epoch - 1)
        parts = " ".join(f"{short} {metrics.get('train/' + k, float('nan')):.3f}" for k, short in self.SHORT.items())
        log.info(
            "epoch %d/%d  loss %.3f (%s)  lr %.4g  %.2f steps/s  val map %.3f map_50 %.3f  ETA %s",
            epoch + 1, self.epochs, metrics.get("train/loss", float("nan")), parts, metrics.get("train/lr", 0.0),
            metrics.get("train/steps_per_s", 0.0), metrics.get("val/map", float("nan")),
            metrics.get("val/map_50", float("nan")), _duration(eta),
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
