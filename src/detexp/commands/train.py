"""``detexp train``: the orchestration of one training run, as a plain function.

:func:`train` takes a composed config, a run directory and optional callbacks; it knows
nothing of Hydra or the command line, so the CLI, a Ray Tune trial and the tests call it
alike. In order: value checks, the MLflow store, Ray, the resource check, the annotation
read and the error policy (all before any training), then the Ray Train fit with per-epoch
results streamed to the driver, and at the end the evaluation report of the final model.

Data flows one way: config -> data -> trainer/workers -> checkpoint -> tracking.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from detexp.checkpoint.effective_config import check_scaling
from detexp.checkpoint.files import FINAL_FILE, RUN_ID_FILE, BestModelFile, copy_checkpoint_file
from detexp.checkpoint.storage import (
    RunStorage,
    SavedCheckpoint,
    latest_checkpoint,
    storage_location,
)
from detexp.config import is_auto, plain
from detexp.data.parsing import object_name_images
from detexp.data.problems import (
    class_names_summary,
    has_unknown_classes,
    problems_table,
    write_problems_csv,
)
from detexp.data.source import DataSource, resolve
from detexp.data.voc import Problem
from detexp.epoch_report import BEST_EPOCH, EPOCHS_DONE, STOPPED_EARLY
from detexp.errors import ConfigError, DetexpError, TrainingDivergedError, WorkerStalledError
from detexp.tracking.progress import EPOCH_KEY, EpochProgress, summary_table

if TYPE_CHECKING:
    from detexp.distributed.plan import WorkerPlan
    from detexp.tracking.mlflow_runs import Tracker

log = logging.getLogger("detexp")


def check_train_config(cfg: DictConfig) -> None:
    """Value checks the schema's types cannot express; all run before Ray starts."""
    from detexp.engine.solver import check_optim_config
    from detexp.modeling.spec import check_model_config, names_pretrained_weights

    check_model_config(cfg.model)
    if names_pretrained_weights(cfg.model):  # torchvision's weight enums tell the names
        from detexp.modeling.detector import check_weight_names

        check_weight_names(cfg.model)
    check_optim_config(cfg.optimizer, cfg.schedule)
    if cfg.dataset.batch_size < 1:
        raise ConfigError(f"dataset.batch_size={cfg.dataset.batch_size} must be at least 1")
    check_scaling(cfg.scaling)
    min_workers = cfg.scaling.min_workers
    if min_workers is not None and not 1 <= min_workers <= cfg.scaling.num_workers:
        raise ConfigError(
            f"scaling.min_workers={min_workers} must be between 1 and scaling.num_workers={cfg.scaling.num_workers}"
        )
    if cfg.trainer.amp == "fp16" and not cfg.scaling.use_gpu:
        raise ConfigError("trainer.amp=fp16 needs scaling.use_gpu=true; on a CPU use trainer.amp=bf16")
    stall = cfg.trainer.stall_timeout_s
    if stall is not None and stall <= 0:
        raise ConfigError(f"trainer.stall_timeout_s={stall} must be more than 0 (or null: wait for ever)")
    if cfg.trainer.prefetch_batches < 0:
        raise ConfigError(f"trainer.prefetch_batches={cfg.trainer.prefetch_batches} must be 0 or more")
    name = cfg.tracking.register_model
    if name is not None and (not name.strip() or any(c in name for c in "/:@")):
        raise ConfigError(f"tracking.register_model={name!r}: a registry name without '/', ':' or '@'")
    schedule = cfg.schedule
    if not schedule.monitor.startswith("val/"):
        raise ConfigError(f"schedule.monitor={schedule.monitor!r}: the best epoch is chosen on a validation metric, e.g. val/map_50")
    if schedule.patience is not None and schedule.patience < 1:
        raise ConfigError(f"schedule.patience={schedule.patience} must be at least 1 (or null: no early stop)")


EpochCallback = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class TrainRun:
    """One train run as settled before Ray starts: where it writes, what it continues, and
    the config its workers train with."""

    cfg: DictConfig
    dir: Path
    storage: RunStorage  # Ray Train's checkpoints of the run
    previous: SavedCheckpoint | None  # the checkpoint a resumed run continues from
    tracker: Tracker
    params: dict[str, Any]  # logged as MLflow params: the resolved config and the scaled lr
    worker_cfg: dict[str, Any]  # what the workers (and the checkpoints' stored config) train with
    tags: dict[str, str]
    overrides: list[str]
    weights: list[Path]  # torchvision weight files the workers load

    @property
    def finished(self) -> bool:
        """All epochs trained, or stopped early, already: nothing to train."""
        last = self.previous
        return last is not None and (last.epoch + 1 >= self.cfg.schedule.epochs or bool(last.metrics.get(STOPPED_EARLY)))


def train(
    cfg: DictConfig,
    run_dir: str | Path,
    overrides: Sequence[str] = (),
    *,
    callbacks: Sequence[EpochCallback] = (),
    ray_callbacks: Sequence[Any] = (),
    tags: Mapping[str, str] | None = None,
    live_progress: bool = True,
    record_reports: bool = True,
    started_at: float | None = None,
) -> dict[str, Any]:
    """Train as ``cfg`` says, writing checkpoints and the resolved config into
    ``run_dir`` and everything into one MLflow run. Returns the last epoch's metrics
    plus ``run_id`` and ``checkpoint`` (the final checkpoint file).

    ``overrides``: the command line's, recorded with the run. ``callbacks`` are called on
    the driver with each epoch's metrics once they are logged; ``ray_callbacks`` go to Ray
    Train's ``RunConfig`` (a Tune trial passes ``TuneReportCallback``); ``tags`` are added
    to the MLflow run (``mlflow.parentRunId`` for a run of a sweep); ``live_progress``
    shows rank 0's steps during each epoch (a Tune trial turns it off); ``record_reports``
    False leaves each epoch's metrics for the caller to log into the run (a Tune trial's
    are logged by the tune driver, which outlives the trial). ``started_at``
    (``time.time()``): when the run started, for its ``time/first_step_s`` (None: now).

    With ``cfg.resume`` and a ``run_dir`` that holds checkpoints, training continues
    after the last checkpoint (model, optimizer, schedule) in the same MLflow run;
    without it such a ``run_dir`` is refused rather than overwritten. Raises
    :class:`TrainingDivergedError` when the loss becomes NaN/inf (the MLflow run is then
    FAILED and the last good checkpoint stays)."""
    started_at = time.time() if started_at is None else started_at
    check_train_config(cfg)
    fits_anchors = _fits_anchors(cfg.model)
    if fits_anchors and cfg.resume:
        _keep_resumed_anchors(cfg, Path(run_dir).resolve())
    source = find_data(cfg)
    _say_where_the_weights_start(cfg, fits_anchors, train_images=len(source.train))
    run = _plan_run(cfg, Path(run_dir).resolve(), list(overrides), tags)
    if run.finished:  # nothing to train: no Ray
        return _report_finished(run, callbacks)
    if cfg.schedule.patience is not None and not source.val_ids:
        raise ConfigError(f"schedule.patience={cfg.schedule.patience} needs a validation split (dataset.val_split)")
    datasets, counts = _start_ray_and_read(run, source)
    run_id = _open_tracking(run, counts)
    progress, best_model = _driver_views(run, callbacks, record_reports=record_reports, started_at=started_at)
    if run.previous is not None:
        log.info(
            "resuming from the checkpoint of epoch %d/%d (%s): training continues with epoch %d/%d "
            "in MLflow run %s", run.previous.epoch + 1, cfg.schedule.epochs, run.previous.checkpoint.path,
            run.previous.epoch + 2, cfg.schedule.epochs, run_id,
        )
    elif cfg.resume:
        log.info("resume=true, but %s holds no checkpoint yet: starting at epoch 1", run.dir)
    result = _fit(run, _worker_plan(run, source, counts), datasets, progress, best_model,
                  ray_callbacks=ray_callbacks, live_progress=live_progress)
    if progress.diverged is not None:
        run.tracker.end("FAILED")
        raise _diverged(progress.diverged, result.checkpoint, cfg.schedule.epochs, run.storage.experiment)
    if source.val_ids and cfg.eval_at_end:  # per-class AP, PR curves, image grid of the best model
        from detexp.commands.evaluate import report_training

        report_training(cfg, best_model.existing() or result.checkpoint, run.dir, run.tracker, best_model.predictions,
                        source=source)
    return _finish(run, run_id, result.checkpoint, progress)


def find_data(cfg: DictConfig) -> DataSource:
    """The dataset's layout and splits, said in a few lines; classes read from the data, and
    the ``auto`` anchors and schedule fitted to its train split, are written into ``cfg`` (and
    so into the run's config, params and checkpoints)."""
    from detexp.engine.solver import resolve_auto_schedule

    source = resolve(cfg.dataset)
    log.info("%s", source.summary())
    if list(cfg.dataset.classes) != source.classes:
        cfg.dataset.classes = source.classes
    fit_auto_anchors(cfg, source)
    resolve_auto_schedule(cfg.schedule, len(source.train))
    return source


def _fits_anchors(model: Any) -> bool:
    return is_auto(model.anchor_sizes) or is_auto(model.anchor_ratios)


def _say_where_the_weights_start(cfg: DictConfig, fits_anchors: bool = False, train_images: int = 0) -> None:
    """One line before Ray starts when the start is not what the user may think: random
    weights on data that is not the generated shapes (with the epochs a small split needs),
    or a checkpoint of other classes."""
    model, classes = cfg.model, len(cfg.dataset.classes) + 1
    if model.checkpoint is not None:
        from detexp.modeling.detector import checkpoint_classes

        found = checkpoint_classes(model.checkpoint)
        if found != classes:
            log.info(
                "model.checkpoint=%s predicts %d classes + background: its box predictor is replaced by a "
                "fresh one for the %d of this run, every other weight is kept", model.checkpoint, found - 1, classes - 1,
            )
    elif model.weights is None and model.weights_backbone is None and cfg.dataset.name != "shapes":
        log.warning(
            "%s starts from random weights: the CPU demo recipe, made for the generated shapes. On your own "
            "data start from pretrained weights: +experiment=finetune (torchvision's COCO weights from "
            "$TORCH_HOME; docs/recipes.md), or model.checkpoint=<an earlier run>. The keys that matter most: "
            "%sschedule.epochs%s, optimizer.lr, dataset.augment (multiscale for photos)", model.name,
            "" if fits_anchors else "model.anchor_sizes=auto model.anchor_ratios=auto, ",
            _epochs_advice(cfg.schedule, train_images),
        )


def _epochs_advice(schedule: Any, train_images: int) -> str:
    """`` (4 epochs of 160 train images show 640 ...: e.g. schedule.epochs=10 'schedule.lr_steps=[8]')``
    when given epochs show fewer images than the recipe's ``schedule.min_images``, else ""."""
    from detexp.engine.solver import auto_epochs, last_quarter_steps

    seen = schedule.epochs * train_images
    if not train_images or seen >= schedule.min_images:
        return ""
    epochs = auto_epochs(schedule, train_images)
    steps = last_quarter_steps(epochs)
    shown = f" 'schedule.lr_steps=[{','.join(map(str, steps))}]'" if schedule.name == "multistep" and steps else ""
    return (
        f" ({schedule.epochs} epochs of {train_images} train images show {seen}, the recipe was fitted seeing "
        f"{schedule.min_images}: e.g. schedule.epochs={epochs}{shown}, or auto)"
    )


def _keep_resumed_anchors(cfg: DictConfig, run_dir: Path) -> None:
    """``auto`` anchors of a run that continues checkpoints: the numbers those were trained
    with (fitted when the run began), not a new fit, which data changed since would make
    another shape of RPN than the checkpoint's."""
    from detexp.checkpoint.files import CHECKPOINT_FILE, read_checkpoint

    previous = latest_checkpoint(storage_location(cfg.scaling.storage_path, run_dir).experiment)
    if previous is None:
        return
    with previous.checkpoint.as_directory() as folder:
        stored = read_checkpoint(Path(folder) / CHECKPOINT_FILE).config.get("model", {})
    cfg.model.anchor_sizes, cfg.model.anchor_ratios = stored.get("anchor_sizes"), stored.get("anchor_ratios")
    log.info("anchors of the checkpoint this run continues: sizes %s, ratios %s",
             cfg.model.anchor_sizes, cfg.model.anchor_ratios)


ANCHOR_FIT_IMAGES = 2000  # train images whose boxes the anchors are fitted to, at most (a seeded sample)


def fit_auto_anchors(cfg: DictConfig, source: DataSource) -> None:
    """``model.anchor_sizes=auto`` / ``model.anchor_ratios=auto``: fitted to the train split's
    boxes (:mod:`detexp.modeling.anchors`), said in one line, and written into ``cfg`` as
    numbers, so the params, the checkpoints and every eval or predict hold the same anchors."""
    import random

    from detexp.data.label_stats import read_records
    from detexp.modeling.anchors import fit_model_anchors
    from detexp.modeling.spec import RESNET_FPN_BUILDERS

    model = cfg.model
    if not _fits_anchors(model):
        return
    entries = list(source.train)
    if len(entries) > ANCHOR_FIT_IMAGES:
        entries = random.Random(cfg.seed).sample(entries, ANCHOR_FIT_IMAGES)
    records, _ = read_records(source.root, entries, source.classes)
    if not any(len(r.boxes) for r in records):
        raise ConfigError("model.anchor_sizes / model.anchor_ratios=auto: the train split has no usable boxes to fit them to")
    fit = fit_model_anchors(model, records, ladder=model.name in RESNET_FPN_BUILDERS)
    log.info("%s", fit.summary(model.min_size, model.max_size))
    model.anchor_sizes, model.anchor_ratios = fit.sizes, fit.ratios


def weight_files(model: Any) -> list[Path]:
    """The torchvision weight files ``model`` names, in the torch hub cache (downloaded
    there when missing, or refused: never in a worker); none, and no torch import on the
    driver, for a model that names none (:func:`detexp.modeling.detector.weight_files`)."""
    from detexp.modeling.spec import names_pretrained_weights

    if not names_pretrained_weights(model):
        return []
    from detexp.modeling.detector import weight_files as cached_weight_files

    return cached_weight_files(model)


def _plan_run(cfg: DictConfig, run_dir: Path, overrides: list[str], tags: Mapping[str, str] | None) -> TrainRun:
    """Where the run writes and what it continues; the weights and the MLflow store
    checked. Refuses a run directory that holds checkpoints unless ``resume`` is set."""
    from detexp.engine.solver import scaled_lr
    from detexp.tracking.mlflow_runs import Tracker, default_tags

    storage = storage_location(cfg.scaling.storage_path, run_dir)
    previous = latest_checkpoint(storage.experiment)
    if previous is not None and not cfg.resume:
        raise ConfigError(
            f"{run_dir} already holds a run's checkpoints (last: epoch {previous.epoch + 1}); "
            "pass resume=true to continue it, or choose another hydra.run.dir"
        )
    weights = weight_files(cfg.model)
    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment)  # refuses a dead server early
    resolved = plain(cfg)
    lr = scaled_lr(cfg.optimizer, cfg.scaling.num_workers, cfg.dataset.batch_size)
    if cfg.optimizer.reference_batch is not None:
        log.info(
            "lr %g is for %d images a step (optimizer.reference_batch); %d worker(s) x %d images: lr %g",
            cfg.optimizer.lr, cfg.optimizer.reference_batch, cfg.scaling.num_workers, cfg.dataset.batch_size, lr,
        )
    return TrainRun(
        cfg=cfg, dir=run_dir, storage=storage, previous=previous, tracker=tracker,
        params={**resolved, "optimizer": {**resolved["optimizer"], "scaled_lr": lr}},
        worker_cfg={**resolved, "optimizer": {**resolved["optimizer"], "lr": lr, "reference_batch": None}},
        tags={**default_tags("train", overrides), **(tags or {})}, overrides=overrides, weights=weights,
    )


def _report_finished(run: TrainRun, callbacks: Sequence[EpochCallback]) -> dict[str, Any]:
    """A resumed run that has nothing left to train: its MLflow run completed and ended."""
    previous, epochs = run.previous, run.cfg.schedule.epochs
    run_id = _start_or_resume_run(run)
    progress, _ = _driver_views(run, callbacks)
    if previous.metrics.get(STOPPED_EARLY):
        log.info("the run in %s stopped early after epoch %d/%d (schedule.patience); nothing to train.",
                 run.dir, previous.epoch + 1, epochs)
    else:
        log.info(
            "the run in %s has finished all %d epochs already (its last checkpoint is of epoch %d); "
            "nothing to train. Raise schedule.epochs to train it longer.", run.dir, epochs, previous.epoch + 1,
        )
    return _finish(run, run_id, previous.checkpoint, progress)


def _start_ray_and_read(run: TrainRun, source: DataSource) -> tuple[dict[str, Any], dict[str, int]]:
    """Ray started and checked, the annotations read and the error policy applied: the
    train/val datasets and their image counts (all before any training)."""
    from detexp.distributed import cluster

    cfg = run.cfg
    cluster.start_ray(cfg.scaling, cfg.ray.address, cfg.ray.verbose)
    cluster.check_storage(run.storage.path, source.root)  # every node that may host a worker reaches both
    datasets, counts, problems = _load_datasets(cfg, source)
    _apply_error_policy(cfg, problems, run.dir, source)
    if counts["data/train_images"] // cfg.scaling.num_workers == 0:
        raise ConfigError(
            f"{counts['data/train_images']} usable training images cannot feed "
            f"scaling.num_workers={cfg.scaling.num_workers} workers"
        )
    return datasets, counts


def _open_tracking(run: TrainRun, counts: dict[str, int]) -> str:
    """The resolved config written, the MLflow run started (or resumed) with the data
    counts and the run's files; returns its id."""
    run.dir.mkdir(parents=True, exist_ok=True)
    (run.dir / "config.yaml").write_text(OmegaConf.to_yaml(run.cfg, resolve=True))
    run_id = _start_or_resume_run(run)
    tracker = run.tracker
    if run.cfg.tracking.system_metrics:
        tracker.monitor_system()
    if not tracker.logged_steps("data/train_images"):  # once per run, not per resume
        tracker.log_metrics(counts, step=0)
    for name in ("config.yaml", "data/skipped.csv"):
        if (run.dir / name).exists():
            tracker.log_artifact(run.dir / name, str(Path(name).parent) if "/" in name else None)
    return run_id


def _driver_views(run: TrainRun, callbacks: Sequence[EpochCallback], *, record_reports: bool = True,
                  started_at: float | None = None) -> tuple[EpochProgress, BestModelFile]:
    """The console/MLflow progress and the run's ``model_best.pt``, both brought up to date
    with the checkpoints a resumed run keeps. Call after the MLflow run has started."""
    cfg = run.cfg
    progress = EpochProgress(
        run.tracker, epochs=cfg.schedule.epochs, max_failures=cfg.scaling.max_failures,
        logged=run.tracker.logged_steps(EPOCH_KEY), previous=run.previous.metrics if run.previous else None,
        callbacks=callbacks, monitor=cfg.schedule.monitor, progress_every_s=cfg.progress_every_s,
        record_reports=record_reports, started_at=started_at,
    )
    best_model = BestModelFile(run.dir)
    if run.previous is not None:
        progress.backfill([metrics for _, metrics in run.previous.kept])
        for checkpoint, metrics in run.previous.kept:
            best_model.update(metrics, checkpoint)
    return progress, best_model


def _worker_plan(run: TrainRun, source: DataSource, counts: dict[str, int]) -> WorkerPlan:
    from detexp.commands.evaluate import GRID_IMAGES
    from detexp.distributed.cluster import share_files
    from detexp.distributed.plan import WorkerPlan

    cfg = run.cfg
    rows_per_worker = counts["data/train_images"] // cfg.scaling.num_workers
    plan = WorkerPlan(
        cfg=run.worker_cfg,
        steps_per_epoch=math.ceil(rows_per_worker / cfg.dataset.batch_size),
        shown=tuple(sorted(source.val_ids)[:GRID_IMAGES]) if cfg.eval_at_end else (),  # drawn in the report's grid
        weights=share_files(run.weights),  # nodes without them get them from the object store
        # like the torchvision weights: a node that does not see the file gets its bytes
        start_weights=share_files([cfg.model.checkpoint]).get(Path(cfg.model.checkpoint).name)
        if cfg.model.checkpoint else None,
    )
    log.info(
        "training %s on %d images (%d val) with %d worker(s), %d epochs; run dir %s",
        cfg.model.name, counts["data/train_images"], counts["data/val_images"],
        cfg.scaling.num_workers, cfg.schedule.epochs, run.dir,
    )
    return plan


def _fit(run: TrainRun, plan: WorkerPlan, datasets: dict[str, Any], progress: EpochProgress,
         best_model: BestModelFile, *, ray_callbacks: Sequence[Any], live_progress: bool):
    """The Ray Train fit, each report handed to ``best_model`` and ``progress`` as it comes;
    a failure ends the MLflow run and is explained in one line."""
    from detexp.distributed.trainer import DriverCallbacks, fit

    cfg = run.cfg

    def on_report(metrics: dict[str, Any], checkpoint: Any) -> None:
        try:
            best_model.update(metrics, checkpoint)  # before Ray Train may delete that checkpoint
        finally:  # whatever happened to the copy, the epoch's metrics are recorded
            progress.on_report(metrics)

    driver = DriverCallbacks(on_report, progress.on_failure, progress.on_step if live_progress else None)
    try:
        return fit(plan, datasets, cfg.scaling, run.storage, driver, keep=cfg.checkpoints_to_keep, callbacks=ray_callbacks)
    except BaseException as exc:
        run.tracker.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise _explain(exc, run.dir, run.storage.experiment) from None


def _finish(run: TrainRun, run_id: str, checkpoint, progress: EpochProgress) -> dict[str, Any]:
    """Copy and log the final (and best) checkpoint, say why the run stopped, end the MLflow run."""
    cfg, tracker = run.cfg, run.tracker
    final = copy_checkpoint_file(checkpoint, run.dir / FINAL_FILE) if checkpoint is not None else None
    best = BestModelFile(run.dir).existing()
    for path in (final, best):
        if path is not None:
            tracker.log_artifact(path, "checkpoints")
    metrics = progress.last
    reason = progress.stop_reason(cfg.schedule.patience)
    tags = {"detexp.stop_reason": reason}
    if metrics.get(BEST_EPOCH) is not None:
        tags["detexp.best_epoch"] = str(int(metrics[BEST_EPOCH]) + 1)
    tracker.set_tags(tags)
    registered = _register(tracker, cfg, best or final)
    tracker.end("FINISHED")
    log.info("%s", summary_table(progress, reason, final=final, best=best, tracker=tracker, registered=registered))
    return {
        **metrics, "run_id": run_id, "checkpoint": str(final) if final else None,
        "best_checkpoint": str(best) if best else None, "epochs_trained": int(metrics.get(EPOCHS_DONE, 0)),
        "stop_reason": reason, "registered_model": "models:/{}/{}".format(*registered) if registered else None,
        "first_step_s": progress.first_step_s, "train_s": progress.train_s,
    }


def _register(tracker, cfg: DictConfig, checkpoint: Path | None) -> tuple[str, str] | None:
    """``tracking.register_model``: the best (else final) model as a new registry version.
    The model is trained and kept on disk by then, so a failure here is logged, not raised."""
    name = cfg.tracking.register_model
    if not name or checkpoint is None:
        return None
    from detexp.modeling.detector import build_inference_model
    from detexp.modeling.weights import load_model_state, load_weights

    try:
        num_classes = len(cfg.dataset.classes) + 1
        model = build_inference_model(cfg.model, num_classes)
        load_weights(model, load_model_state(checkpoint, num_classes), checkpoint)
        return tracker.register_model(model.eval(), checkpoint, name)
    except Exception as exc:  # noqa: BLE001 - the checkpoint files are intact
        log.warning("could not register the model as %r: %s: %s (the checkpoint %s is intact)",
                    name, type(exc).__name__, exc, checkpoint)
        return None


def _load_datasets(cfg: DictConfig, source: DataSource):
    from ray.data import RandomSeedConfig

    from detexp.data.annotations import problems_of, read_annotations
    from detexp.data.pipeline import decode_images

    started = time.perf_counter()
    train_ann = read_annotations(source.root, source.train, source.classes).materialize()
    val_ann = read_annotations(source.root, source.val, source.classes).materialize()
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
    # A full shuffle of the annotation rows (a few hundred bytes each) before decoding, with
    # a new order every epoch (each epoch executes the dataset again) that the seed repeats.
    # A local buffer after decoding would mix only neighbours: a folder of sorted ids would
    # give nearly the same batches every epoch.
    shuffled = train_ann.random_shuffle(seed=RandomSeedConfig(seed=cfg.seed, reseed_after_execution=True))
    datasets = {"train": decode_images(
        shuffled, source.root, cfg.dataset.hflip_prob, cfg.seed, augment=str(cfg.dataset.augment), size=cfg.model.min_size,
    )}
    if source.val_ids:
        datasets["val"] = decode_images(val_ann, source.root, 0.0)
    return datasets, counts, problems


def _apply_error_policy(cfg: DictConfig, problems: list[Problem], run_dir: Path, source: DataSource) -> None:
    errors = [p for p in problems if p.severity == "error"]
    if not errors:
        return
    skipped_csv = run_dir / "data" / "skipped.csv"
    write_problems_csv(errors, skipped_csv)
    table = problems_table(errors, skipped_csv)
    if has_unknown_classes(errors):  # the names and the override first, not one row per object
        names = object_name_images(source.root, source.train + source.val)
        table = f"{class_names_summary(names, source.classes)}\n{table}"
    if cfg.dataset.on_error == "raise":
        raise DetexpError(f"the dataset has errors (dataset.on_error=raise):\n{table}")
    log.warning(
        "skipping %d image(s) with broken annotations or images (dataset.on_error=skip; list in %s):\n%s",
        len({p.image_id for p in errors}), skipped_csv, table,
    )


def _start_or_resume_run(run: TrainRun) -> str:
    from detexp.tracking.mlflow_runs import command_line, default_run_name

    id_file = run.dir / RUN_ID_FILE
    if run.cfg.resume and id_file.exists():
        run_id = run.tracker.resume(id_file.read_text().strip())
        log.info("resuming MLflow run %s", run_id)
        return run_id
    if run.cfg.resume and (run.dir / "checkpoints").exists():
        log.warning("no %s in %s: the resumed training goes into a new MLflow run", RUN_ID_FILE, run.dir)
    run_id = run.tracker.start(
        default_run_name(run.cfg), run.params, run.tags, description=command_line("train", run.overrides)
    )
    id_file.write_text(run_id)
    return run_id


def _explain(exc: BaseException, run_dir: Path, experiment: str) -> BaseException:
    """Turn a Ray Train failure into one line that says what happened and what was kept."""
    from ray.train import TrainingFailedError

    from detexp.distributed.controller import describe_failure

    if isinstance(exc, WorkerStalledError):
        error, text = WorkerStalledError, str(exc)
    elif isinstance(exc, TrainingFailedError):
        failures = getattr(exc, "worker_failures", {}) or {}
        # the controller's own failure: the workers could not be placed (trainer.stall_timeout_s)
        error = DetexpError
        text = describe_failure(next(iter(failures.values()), getattr(exc, "controller_failure", None) or exc))
    else:
        return exc
    return error(
        f"training failed: {text}; checkpoints so far are in {experiment} "
        f"(continue with resume=true hydra.run.dir={run_dir})"
    )


def _diverged(diverged: tuple[int, dict[str, Any]], checkpoint, epochs: int, experiment: str) -> DetexpError:
    epoch, info = diverged
    losses = ", ".join(f"{k}={v:.4g}" for k, v in info["losses"].items())
    where = f" on worker {info['rank']}" if info.get("rank") else ""
    if checkpoint is not None:
        from ray.train import Result

        good = Result.from_path(experiment).metrics["epoch"] + 1
        kept = f"the last good checkpoint (epoch {good}/{epochs}) is in {checkpoint.path}"
    else:
        kept = "no checkpoint was written before it"
    return TrainingDivergedError(
        f"training diverged: non-finite loss in epoch {epoch + 1}/{epochs} at step {info['step'] + 1}{where} "
        f"({losses}); {kept}; lower optimizer.lr or set schedule.grad_clip_norm"
    )
