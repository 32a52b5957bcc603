"""``train_loop_per_worker``: the only code that calls ``ray.train`` inside a worker.

Every Ray Train worker runs :func:`train_loop_per_worker` with a :class:`WorkerPlan` (the
resolved config and what the driver decided). It reads its own shard of the train and val
datasets, trains with DDP when there are several workers, validates every epoch, and
reports once per epoch with a checkpoint (rank 0 writes it) holding the unwrapped model,
optimizer, lr_scheduler, config and epoch.
"""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from detexp.checkpoint.files import CHECKPOINT_FILE, CHECKPOINT_FORMAT, PREDICTIONS_FILE
from detexp.data.augment import multiscale_sizes
from detexp.data.pipeline import batch_to_tensors
from detexp.distributed.cluster import torch_threads
from detexp.distributed.plan import WorkerPlan
from detexp.distributed.watchdog import Watchdog
from detexp.engine.early_stopping import BestEpoch
from detexp.engine.loops import (
    EpochStats,
    NonFiniteLossError,
    all_ranks,
    is_distributed,
    predict_batch,
    train_one_epoch,
)
from detexp.engine.solver import build_optimizer, build_scheduler, build_warmup
from detexp.epoch_report import (
    BEST_EPOCH,
    BEST_VALUE,
    DIVERGED,
    EPOCH,
    EPOCHS_DONE,
    FIRST_STEP_AT,
    IMPROVED,
    STOPPED_EARLY,
)
from detexp.evaluation.metrics import DetectionEvaluator
from detexp.evaluation.records import prediction_table
from detexp.modeling.batchnorm import fold_batch_norms
from detexp.modeling.detector import build_detector


@dataclass
class Training:
    """What a worker trains and its checkpoints hold: the model (DDP-wrapped with several
    workers), its optimizer, schedule, gradient scaler (fp16 only) and best epoch so far."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None
    best: BestEpoch
    device: torch.device

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["lr_scheduler"])
        self.best.load_state_dict(state.get("best"))
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def checkpoint(self, config: dict[str, Any], epoch: int) -> dict[str, Any]:
        """The ``checkpoint.pt`` dict (detexp.checkpoint.files describes it)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.scheduler.state_dict(),
            "config": config,
            "epoch": epoch,
            "best": self.best.state_dict(),
            "classes": list(config["dataset"]["classes"]),
            **({"scaler": self.scaler.state_dict()} if self.scaler is not None else {}),
        }


def train_loop_per_worker(plan: WorkerPlan) -> None:
    """Train from the last checkpoint (if any) to ``schedule.epochs``, validating and
    reporting once per epoch; return early when the loss diverged or patience ran out."""
    cfg = OmegaConf.create(plan.cfg)
    device = _set_up_process(cfg)
    watchdog = Watchdog(cfg.trainer.stall_timeout_s, ray.train.get_context().get_world_rank(), plan.events).start()
    try:
        _train(cfg, plan, device, watchdog)
    finally:
        watchdog.stop()


def _train(cfg: Any, plan: WorkerPlan, device: torch.device, watchdog: Watchdog) -> None:
    state = _restored_state()
    start_epoch = 0 if state is None else state["epoch"] + 1
    shards = _Shards(cfg, device)
    # Ray Data's first batch takes seconds (its read and decode tasks start up): ask for it
    # now, so that the wait overlaps with building the model.
    next_tables = StartedEarly(shards.train_tables()) if start_epoch < cfg.schedule.epochs else None
    _place_weight_files(plan.weights)
    with _start_weights_here(cfg, plan.start_weights):
        training = _build_training(cfg, device)
    if state is not None:
        training.load_state_dict(state)
        del state
    # The val images drawn in the report's grid; None: no report, so no report rows.
    shown = set(plan.shown) if cfg.eval_at_end else None
    for epoch in range(start_epoch, cfg.schedule.epochs):
        where = f"epoch {epoch + 1}/{cfg.schedule.epochs}"
        stats = _train_epoch(training, cfg, plan, epoch, watchdog.batches(next_tables, f"training {where}"))
        if stats is None:
            return
        if epoch + 1 < cfg.schedule.epochs:
            next_tables = StartedEarly(shards.train_tables())
        val_start = time.perf_counter()
        val_metrics, val_rows = (
            _validate(training.model, watchdog.batches(shards.val, f"validating {where}"), device,
                      list(cfg.dataset.classes), shown, watchdog)
            if shards.val is not None else ({}, None)
        )
        metrics = _epoch_metrics(epoch, stats, val_metrics, time.perf_counter() - val_start)
        # Validation metrics are gathered, so every rank takes the same decision here.
        if shards.val is not None:
            metrics[IMPROVED] = training.best.update(epoch, metrics.get(cfg.schedule.monitor))
            metrics[BEST_EPOCH], metrics[BEST_VALUE] = training.best.epoch, training.best.value
            metrics[STOPPED_EARLY] = training.best.should_stop
        # A new best epoch's checkpoint keeps its val predictions: the report at the end of
        # training (eval_at_end) is made from them instead of predicting again.
        watchdog.doing(f"reporting {where}: its checkpoint is saved to scaling.storage_path, and the "
                       "report waits for every rank")
        predictions = _gather_rows(val_rows) if metrics.get(IMPROVED) and shown is not None else None
        _report(metrics, training, plan.cfg, epoch=epoch, predictions=predictions)
        if training.best.should_stop:
            return


def _set_up_process(cfg: Any) -> torch.device:
    """Seed and threads of this worker (its process group, with two or more workers, is
    Ray Train's: controller.ProcessGroupConfig); returns its device."""
    torch.manual_seed(cfg.seed + ray.train.get_context().get_world_rank())
    device = ray.train.torch.get_device()
    threads = torch_threads(cfg.scaling.threads_per_worker, ray.train.get_context().get_local_world_size())
    if threads:  # torch would otherwise start one thread per core of the machine
        torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.trainer.cudnn_benchmark
    return device


def _restored_state() -> dict[str, Any] | None:
    """The checkpoint Ray Train hands a resumed (or restarted) run, loaded; None for a new run."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as ckpt_dir:
        return torch.load(Path(ckpt_dir) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


class _Shards:
    """This worker's shards: the train shard as a new pass of batches each epoch, and the
    val shard (None without a val split), kept in memory after its first pass when it fits."""

    def __init__(self, cfg: Any, device: torch.device):
        self.train = ray.train.get_dataset_shard("train")
        self.batch_size, self.trainer = cfg.dataset.batch_size, cfg.trainer
        try:
            val = ray.train.get_dataset_shard("val")
        except KeyError:  # no val split (dataset.val_split=null, or val_fraction=0)
            self.val = None
        else:
            self.val = KeptShard(val, cfg.dataset.batch_size, cfg.trainer.keep_val_mib, device)

    def train_tables(self):
        # The rows come shuffled, every epoch differently (commands.train): no local buffer.
        tables = self.train.iter_batches(
            batch_size=self.batch_size, batch_format="pyarrow", prefetch_batches=self.trainer.prefetch_batches,
        )
        return group_by_orientation(tables, self.batch_size) if self.trainer.group_aspect_ratio else tables


def _build_training(cfg: Any, device: torch.device) -> Training:
    model = build_detector(cfg.model, len(cfg.dataset.classes) + 1)
    if cfg.dataset.augment == "multiscale":  # the transform draws a size per training image
        model.transform.min_size = multiscale_sizes(cfg.model.min_size)
    if cfg.trainer.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    optimizer = build_optimizer(cfg.optimizer, model.parameters())
    return Training(
        model=model,
        optimizer=optimizer,
        scheduler=build_scheduler(cfg.schedule, optimizer),
        scaler=torch.amp.GradScaler(device.type) if cfg.trainer.amp == "fp16" else None,
        best=BestEpoch(cfg.schedule.monitor_mode, cfg.schedule.patience),
        device=device,
    )


def _train_epoch(training: Training, cfg: Any, plan: WorkerPlan, epoch: int, tables) -> EpochStats | None:
    """One epoch of training and its schedule step; None when the loss diverged (reported)."""
    warmup = build_warmup(cfg.schedule, training.optimizer, plan.steps_per_epoch) if epoch == 0 else None
    # Tensors are made here, on the training thread: see StartedEarly.
    batches = (batch_to_tensors(table, training.device) for table in tables)
    # (`is not None`: an empty Ray Queue has len 0 and is falsy)
    live = plan.live_steps and plan.events is not None and ray.train.get_context().get_world_rank() == 0
    images_per_step = cfg.dataset.batch_size * _world_size()
    try:
        stats = train_one_epoch(
            training.model, training.optimizer, batches, epoch, warmup=warmup,
            grad_clip_norm=cfg.schedule.grad_clip_norm, amp=cfg.trainer.amp, scaler=training.scaler,
            on_step=LiveSteps(plan.events, epoch, plan.steps_per_epoch, images_per_step) if live else None,
        )
    except NonFiniteLossError as exc:
        # Every rank gets here at the same step (engine agrees on it). Report and
        # return instead of raising: an error would make Ray Train restart the workers
        # (scaling.max_failures) and diverge again. No checkpoint: the last good one stays.
        ray.train.report({EPOCH: epoch, DIVERGED: {"step": exc.step, "rank": exc.rank, "losses": exc.losses}})
        return None
    training.scheduler.step()
    return stats


def _epoch_metrics(epoch: int, stats: EpochStats, val_metrics: dict[str, Any], val_seconds: float) -> dict[str, Any]:
    """The epoch's report, by MLflow metric names (detexp.epoch_report has the other keys)."""
    world = _world_size()
    return {
        EPOCH: epoch,
        "train/loss": stats.losses.get("loss", float("nan")),
        **{f"train/{k}": v for k, v in stats.losses.items() if k != "loss"},
        "train/lr": stats.lr,
        "train/steps": stats.steps * world,
        "train/images": stats.images * world,  # train shards are equal in size
        "train/steps_per_s": stats.steps_per_second,
        "train/workers": world,  # fewer than scaling.num_workers after an elastic resize
        "train/nodes": _node_count(),
        "train/epoch_s": stats.seconds,
        "train/data_wait_s": stats.data_seconds,  # of epoch_s: the step waited for its batch
        "val/epoch_s": val_seconds,
        **{f"val/{k}": v for k, v in val_metrics.items() if not isinstance(v, dict)},
        EPOCHS_DONE: epoch + 1,
        **({FIRST_STEP_AT: stats.first_step_at} if stats.first_step_at is not None else {}),
    }


class LiveSteps:
    """Rank 0's progress within an epoch, sent to the driver at most every
    :attr:`INTERVAL_S` seconds (and at the last step) through the report queue."""

    INTERVAL_S = 2.0

    def __init__(self, queue: Any, epoch: int, total: int | None, images_per_step: int):
        self.queue, self.epoch, self.total, self.images_per_step = queue, epoch, total, images_per_step
        self.started = self.sent = time.perf_counter()
        self.loss_sum = 0.0

    def __call__(self, step: int, values: dict[str, float]) -> None:
        self.loss_sum += values["loss"]
        now = time.perf_counter()
        if now - self.sent < self.INTERVAL_S and step != self.total:
            return
        self.sent = now
        elapsed = now - self.started
        item = {"step": {
            "epoch": self.epoch, "step": step, "total": self.total, "elapsed_s": elapsed,
            "images_per_s": step * self.images_per_step / elapsed, "loss": self.loss_sum / step,
        }}
        with contextlib.suppress(Exception):  # progress is best effort; training goes on
            self.queue.put_nowait(item)


class StartedEarly:
    """An iterator of batches whose first batch is asked for at once, in a thread.

    Ray Data needs a second or more to deliver an epoch's first batch (the shard's
    execution restarts and shuffles the rows; the first epoch's, many seconds while
    its tasks start up). Started while the model is built, or while the previous epoch
    validates and checkpoints, that wait overlaps with work instead of stalling the first
    training step. Iterate it once.

    Give it Arrow batches and make tensors on the training thread: torch ops in this
    thread would start a second OpenMP thread team, and while libgomp manages more threads
    than there are cores it sleeps at every barrier instead of spinning (on 2 cores, steps
    in a second thread beside a first one that had its own team ran 1.25 s against 1.09 s)."""

    def __init__(self, batches: Iterator):
        self._batches = batches
        self._first: list = []
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._pull, name="next-epoch-batches", daemon=True)
        self._thread.start()

    def _pull(self) -> None:
        try:
            self._first.append(next(self._batches))
        except StopIteration:
            pass
        except BaseException as exc:  # raised again in the training thread
            self._error = exc

    def __iter__(self) -> Iterator:
        self._thread.join()
        if self._error is not None:
            raise self._error
        yield from self._first
        yield from self._batches


def _place_weight_files(files: dict[str, Any]) -> None:
    """Put the torchvision weight files the driver shipped into this node's torch hub cache
    (once per node; the driver checked them, so no worker ever downloads)."""
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    for name, (ref,) in files.items():
        target = folder / name
        if not target.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            partial = target.with_suffix(f".{os.getpid()}.part")
            partial.write_bytes(ray.get(ref))
            partial.replace(target)  # atomic: workers of one node may race here


@contextlib.contextmanager
def _start_weights_here(cfg: Any, shipped: list[Any] | None) -> Iterator[None]:
    """``model.checkpoint`` readable on this node while the model is built: the driver's
    file where this node sees it, else the bytes the driver shipped, in a temporary file of
    this worker's own (removed afterwards)."""
    path = cfg.model.checkpoint
    if shipped is None or path is None or Path(path).expanduser().is_file():
        yield
        return
    with tempfile.TemporaryDirectory(prefix="detexp-start-") as tmp:
        local = Path(tmp) / Path(path).name
        local.write_bytes(ray.get(shipped[0]))
        cfg.model.checkpoint = str(local)
        try:
            yield
        finally:
            cfg.model.checkpoint = path  # what the checkpoints' config says


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model under DDP (which ``prepare_model`` applies only with >1 worker)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _node_count() -> int:
    """How many machines the workers of this epoch ran on."""
    node = ray.get_runtime_context().get_node_id()
    if not is_distributed():
        return 1
    nodes: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, node)
    return len(set(nodes))


def _world_size() -> int:
    return ray.train.get_context().get_world_size()


def group_by_orientation(tables, batch_size: int):
    """Re-batch a stream of row batches so that each batch holds images of one orientation
    (wide: width >= height, or tall), as torchvision's ``GroupedBatchSampler`` does. Fewer
    than ``batch_size`` rows of each orientation are held back; what is left at the end
    goes out mixed, so a shard of n rows still gives ceil(n / batch_size) batches and the
    DDP ranks stay in step."""
    import pyarrow as pa
    import pyarrow.compute as pc

    held: dict[bool, pa.Table | None] = {True: None, False: None}
    for table in tables:
        wide = pa.array([w >= h for _, h, w in table.column("image_shape").to_pylist()])
        for key, mask in ((True, wide), (False, pc.invert(wide))):
            part = table.filter(mask)
            rows = part if held[key] is None else pa.concat_tables([held[key], part])
            while rows.num_rows >= batch_size:
                yield rows.slice(0, batch_size)
                rows = rows.slice(batch_size)
            held[key] = rows
    rest = [t for t in held.values() if t is not None and t.num_rows]
    if rest:
        rows = pa.concat_tables(rest)
        for start in range(0, rows.num_rows, batch_size):
            yield rows.slice(start, batch_size)


class KeptShard:
    """A val shard's decoded batches, kept in this worker's memory after the first full
    pass when they fit in ``limit_mib`` on every rank, so later validations skip Ray Data
    (whose per-epoch restart of the read and decode tasks costs more than predicting a
    small val split on a CPU). Otherwise every pass streams the shard again."""

    def __init__(self, shard, batch_size: int, limit_mib: float, device: torch.device | str = "cpu"):
        self.shard, self.batch_size, self.limit = shard, batch_size, limit_mib * 2**20
        self.device = torch.device(device)  # of the ranks' agreement (a CUDA tensor under NCCL)
        self.tables: list | None = None

    def __iter__(self) -> Iterator:
        if self.tables is not None:
            yield from self.tables
            return
        kept: list | None = [] if self.limit > 0 else None
        size = 0
        for table in self.shard.iter_batches(batch_size=self.batch_size, batch_format="pyarrow"):
            if kept is not None:
                size += table.nbytes
                if size <= self.limit:
                    kept.append(table)
                else:
                    kept = None
            yield table
        # The ranks' shards differ in size: keep only if all fit, so that every rank stops
        # (or goes on) reading its shard together, as streaming_split requires.
        if self.limit > 0 and all_ranks(kept is not None, self.device):
            self.tables = kept


def _validate(model, tables, device, classes, shown, watchdog: Watchdog) -> tuple[dict[str, Any], pa.Table | None]:
    """Predict this worker's val shard (``tables``: its batches), gather the per-image
    records on every rank and compute the metrics (identical on all ranks; only rank 0's
    are logged). Also returns this rank's predictions as report rows (the ``shown`` image
    ids drawn; None when ``shown`` is None), which the best epoch's checkpoint keeps for
    the report at the end."""
    evaluator = DetectionEvaluator(classes)
    # a copy with its BatchNorms folded into the convolutions: the same detections, sooner
    net = fold_batch_norms(copy.deepcopy(unwrap(model)).eval())
    rows = []
    for table in tables:
        images, targets = batch_to_tensors(table, device)
        outputs = predict_batch(net, images)
        evaluator.update(outputs, targets)
        if shown is not None:
            rows.append(_report_rows(table, outputs, classes, shown))
    watchdog.doing("gathering the validation results of every rank")
    if is_distributed():
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, evaluator.state())
        evaluator.reset()
        for state in gathered:
            evaluator.merge(state)
    metrics = {**evaluator.compute(), "images": len(evaluator)}  # -> val/images: none dropped
    return metrics, pa.concat_tables(rows) if rows else None


def _report_rows(table: pa.Table, outputs: list[dict], classes: list[str], shown: set[str]) -> pa.Table:
    """A val batch's predictions as :data:`~detexp.evaluation.records.PREDICTION_SCHEMA` rows; only the
    ``shown`` images' pixels leave Arrow (to be drawn)."""
    columns = table.drop_columns(["image"]).to_pydict()
    pixels = table.column("image")
    columns["image"] = [pixels[i].as_py() if image_id in shown else b"" for i, image_id in enumerate(columns["image_id"])]
    return prediction_table(columns, dict(enumerate(outputs)), classes, draw=shown)


def _gather_rows(rows: pa.Table | None) -> pa.Table | None:
    """Every rank's report rows on rank 0 (None elsewhere)."""
    if not is_distributed():
        return rows
    rank = dist.get_rank()
    gathered: list[Any] | None = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(rows, gathered, dst=0)
    if rank != 0:
        return None
    parts = [part for part in gathered if part is not None]
    return pa.concat_tables(parts) if parts else None


def _report(
    metrics: dict[str, Any], training: Training, config: dict[str, Any], *, epoch: int,
    predictions: pa.Table | None = None,
) -> None:
    """Report the epoch's metrics, with a checkpoint from rank 0 only (the other ranks
    build none): ``training``'s state as :data:`CHECKPOINT_FILE`, and ``predictions``
    (the val report rows of a new best epoch) beside it as :data:`PREDICTIONS_FILE`."""
    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(training.checkpoint(config, epoch), Path(tmp) / CHECKPOINT_FILE)
        if predictions is not None:
            with pa.ipc.new_file(str(Path(tmp) / PREDICTIONS_FILE), predictions.schema) as out:
                out.write_table(predictions)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
