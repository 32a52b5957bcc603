"""detexp on one GPU: training and inference images/s of the torchvision Faster R-CNN
builders, bare and under Ray Train, in one command of at most 8 minutes.

    .venv/bin/python benchmarks/gpu.py --json OUT.json               # one GPU, <= 8 min
    .venv/bin/python benchmarks/gpu.py --cpu-smoke --json OUT.json   # the same code on the CPU, < 1 min

For the first time a GPU is lent: nothing is downloaded (every model has random weights,
``weights=None``), the data are written here. Sections, in the order they run:

``dataset``    500x375 JPEGs with 1-4 boxes each and Pascal VOC XML, in the devkit layout
               (``JPEGImages/``, ``Annotations/``, ``ImageSets/Main/train.txt``, ``val.txt``).
``train``      fasterrcnn_resnet50_fpn at torchvision's 800/1333 px, bare training loop,
               batch 2 and 8 x fp32, bf16, fp16 x ``cudnn.benchmark`` on and off.
``ray_train``  the same step under ``detexp.commands.train.train`` (Ray Train, one GPU
               worker, the Ray Data pipeline feeding it): images/s, its ratio to the bare
               loop's, and the share of each step spent waiting for data.
``inference``  the eval/predict path of the same model, batch 1 and 8: fp32, fp32 with
               its BatchNorms folded, and folded under bf16 and fp16 autocast.
``mobilenet``  the MobileNetV3 FPN builders (800/1333 and the 320 one at 320/640),
               training and inference at batch 8, fp32 and bf16.

Each measurement's function below says exactly what its clock covers. Prints a table and,
with ``--json``, writes ``meta`` (versions, device, CPUs, date, commit, command), ``anchors``
(published figures to compare against) and one entry per configuration with its
``status``: ``ok``, ``skipped (...)`` (``--budget-s`` ran out; fp16 on a CPU) or
``error: ...``. The JSON is rewritten after every configuration, so an interrupted run
keeps what it measured.

``--cpu-smoke`` runs every code path above on the CPU with 64x48 px images and a tiny
model (32/48 px, 16 RoIs, 32 proposals, a 64-wide box head: ``SMOKE`` below), one
configuration per path (batch 2 for training, 1 for inference, the 320 MobileNet builder
only), 1 + 1 steps each on one torch thread, and a 1-epoch Ray run of 2 steps: its numbers
only show that the script works (tests/test_gpu_benchmark.py runs it). There fp16 is
skipped (it needs CUDA) and ``cudnn.benchmark`` is no setting, so each configuration runs
once. Most of its time is the Ray run's start-up (a local Ray, Ray Train, Ray Data).

Not a test: nothing here fails on a number (the exit status is 1 only when a
configuration raised). Timings mean something only on a quiet machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import io
import json
import logging
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import VOC_CLASSES, compose, cpu_count, rss_mib

log = logging.getLogger("bench")

RESNET = "fasterrcnn_resnet50_fpn"
MOBILENETS = ("fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn_mobilenet_v3_large_320_fpn")
NUM_CLASSES = len(VOC_CLASSES) + 1  # VOC's 20 and the background
PRECISIONS = ("fp32", "bf16", "fp16")  # fp32: no autocast; else trainer.amp / autocast dtype
# SGD, momentum 0.9, at torchvision's fine-tuning tutorial's lr for 2 images a step: the
# weights are random and there is no warm-up in the bare loops, so 0.02 could diverge in
# the few steps timed. The lr does not change what a step costs.
LR = 0.005

# Published figures to read the results against (training images/s per GPU).
ANCHORS: dict[str, dict[str, Any]] = {
    "torchvision_reference": {
        "images_per_s": 8.7, "gpu": "V100", "precision": "fp32", "batch": 2,
        "what": "torchvision's detection reference recipe, fasterrcnn_resnet50_fpn, per GPU",
    },
    "detectron2": {
        "images_per_s": 9.5, "gpu": "V100", "precision": "fp32", "batch": 2,
        "what": "Detectron2's R50-FPN 1x Faster R-CNN (0.210 s/iter, 16 images on 8 GPUs), per GPU",
    },
    "goal": {
        "images_per_s": 40.0, "gpu": "H100-class", "precision": "bf16 or fp16",
        "what": "detexp's goal: fasterrcnn_resnet50_fpn training per GPU with AMP",
    },
}


@dataclasses.dataclass(frozen=True)
class Sizes:
    image_size: tuple[int, int]  # (width, height) of the JPEGs written
    train_images: int  # written to the train split: one Ray epoch
    val_images: int  # written to the val split (the layout's; nothing validates)
    held_images: int  # decoded once and held on the device for the bare loops (cycled)
    model_overrides: tuple[str, ...]  # for every model (the smoke's tiny ones); none: each builder's own
    test_proposals: int | None  # RPN proposals kept at inference, before and after NMS (None: the builder's)
    warmup_steps: int  # untimed steps before each timed configuration
    timed_steps: int
    train_batches: tuple[int, ...]
    infer_batches: tuple[int, ...]
    mobilenets: tuple[str, ...]
    mobilenet_batch: int
    ray_batch: int
    ray_precision: str
    ray_epochs: int  # the last one is timed
    ray_needs_s: float  # the Ray run is skipped when less than this is left of --budget-s
    budget_s: float  # the default --budget-s


GPU = Sizes(
    image_size=(500, 375), train_images=160, val_images=8, held_images=32, model_overrides=(),
    test_proposals=None, warmup_steps=5, timed_steps=15, train_batches=(2, 8), infer_batches=(1, 8),
    mobilenets=MOBILENETS, mobilenet_batch=8, ray_batch=8, ray_precision="bf16", ray_epochs=2,
    ray_needs_s=150, budget_s=420,
)
# Only that the code runs: a tiny input, few RoIs and proposals and a narrow box head (so
# that a step of the 41M-weight ResNet-50 FPN costs about a CPU second; bf16 a few, as a CPU
# without AVX-512 runs bf16 convolutions on torch's slow path), one configuration per code
# path (the first batch size of each list, one MobileNet builder), 1 + 1 steps, torch on
# SMOKE_THREADS threads.
SMOKE = Sizes(
    image_size=(64, 48), train_images=4, val_images=1, held_images=4,
    model_overrides=("model.min_size=32", "model.max_size=48", "model.box_batch_size_per_image=16",
                     "model.rpn_pre_nms_top_n_train=64", "model.rpn_post_nms_top_n_train=32",
                     "model.box_head_size=64"),
    test_proposals=32, warmup_steps=1, timed_steps=1, train_batches=(2,), infer_batches=(1,),
    mobilenets=MOBILENETS[1:], mobilenet_batch=2, ray_batch=2, ray_precision="fp32", ray_epochs=1,
    ray_needs_s=20, budget_s=300,
)


# On a 2-core machine shared with other work, 2 torch threads made a smoke step 10x slower
# than 1 (each parallel region waits for the thread that is not running).
SMOKE_THREADS = 1


class Budget:
    """``--budget-s`` seconds from the start of the run: configurations that find it spent
    (or, for the Ray run, fewer seconds left than it needs) are skipped and recorded so."""

    def __init__(self, seconds: float):
        self.seconds, self.started = seconds, time.perf_counter()

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.started)

    def allows(self, needs_s: float = 0.0) -> bool:
        return self.left() > needs_s


class Bench:
    """What the measurements share: the sizes, device, work folder, data and budget."""

    def __init__(self, work: Path, sizes: Sizes, smoke: bool, budget: Budget, ray_cpus: int | None):
        import torch

        self.work, self.sizes, self.smoke, self.budget = work, sizes, smoke, budget
        self.device = torch.device("cpu" if smoke else "cuda")
        self.ray_cpus = ray_cpus
        self.root = work / "voc"
        self.held: tuple[list, list] | None = None  # (images, targets) on self.device
        self._cfgs: dict[str, Any] = {}
        self._built: dict[tuple[str, str], Any] = {}

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def overrides(self, model: str) -> list[str]:
        """What every config of this run is composed with: the written VOC folder and its
        classes, ``model`` (and ``model_overrides``), SGD at :data:`LR`, a private MLflow store."""
        return [
            "dataset=voc", f"dataset.root={self.root}", f"dataset.classes=[{','.join(VOC_CLASSES)}]",
            f"model={model}", *self.sizes.model_overrides, "optimizer=sgd", f"optimizer.lr={LR}",
            f"dataset.cache_dir={self.work / 'cache'}", f"tracking.uri=sqlite:///{self.work / 'mlflow.db'}",
            "tracking.experiment=bench-gpu", "tracking.system_metrics=false", "eval_at_end=false",
        ]

    def cfg(self, model: str):
        """The composed config of ``model`` (composed once)."""
        if model not in self._cfgs:
            self._cfgs[model] = compose(self.overrides(model))
        return self._cfgs[model]

    def model(self, kind: str, name: str):
        """A fresh copy, on the device, of ``name`` built once on the CPU after
        ``torch.manual_seed(0)``: ``build_detector(cfg.model, 21)`` for ``kind`` "train",
        ``build_inference_model(cfg.model, 21)`` for "inference" (random weights either way).
        Copying is the same model as building it again, without the seconds of random
        initialisation."""
        import copy

        import torch

        from detexp.modeling.detector import build_detector, build_inference_model

        if (kind, name) not in self._built:
            self._built.clear()  # one kept at a time
            torch.manual_seed(0)
            build = build_detector if kind == "train" else build_inference_model
            self._built[(kind, name)] = build(self.cfg(name).model, NUM_CLASSES)
        return copy.deepcopy(self._built[(kind, name)]).to(self.device)


Row = dict[str, Any]


def _sync(b: Bench) -> None:
    import torch

    if b.cuda:
        torch.cuda.synchronize()


def _release(b: Bench) -> None:
    import torch

    gc.collect()
    if b.cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _gpu_mib(b: Bench) -> dict[str, float | None]:
    import torch

    if not b.cuda:
        return {"peak_gpu_mib": None, "peak_gpu_reserved_mib": None}
    return {"peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20,
            "peak_gpu_reserved_mib": torch.cuda.max_memory_reserved() / 2**20}


def _cycled(held: tuple[list, list], batch: int, steps: int, start: int) -> list[tuple[list, list]]:
    """``steps`` batches of ``batch`` held images, going round them from step ``start`` on."""
    images, targets = held
    n = len(images)
    picks = [[(k * batch + j) % n for j in range(batch)] for k in range(start, start + steps)]
    return [([images[i] for i in p], [targets[i] for i in p]) for p in picks]


# --------------------------------------------------------------------------- data


def write_voc_dataset(root: Path, num_train: int, num_val: int, size: tuple[int, int], seed: int = 0) -> list[str]:
    """Write ``num_train + num_val`` JPEGs of ``size`` (width, height; quality 90) with 1-4
    filled rectangles and ellipses of VOC's classes over a smooth noisy background (about
    50 KiB at 500x375: half a typical VOC photo's bytes), their Pascal VOC XML (folder, filename,
    source, size, segmented; per object name, pose, truncated, occluded, difficult,
    bndbox in 1-based pixels) and ``ImageSets/Main/{train,val,trainval}.txt``. Ids are
    ``000001``..., the first ``num_train`` in train. Returns the train ids."""
    import numpy as np
    from PIL import Image, ImageDraw

    w, h = size
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ids = [f"{i + 1:06d}" for i in range(num_train + num_val)]
    for index, image_id in enumerate(ids):
        rng = np.random.default_rng([seed, index])
        small = rng.integers(0, 255, (max(h // 16, 2), max(w // 16, 2), 3), dtype=np.uint8)
        pixels = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), dtype=np.float32)
        pixels = np.clip(pixels + rng.normal(0, 6, pixels.shape), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        draw = ImageDraw.Draw(image)
        objects = []
        for _ in range(int(rng.integers(1, 5))):
            bw = int(rng.integers(max(w // 8, 8), w // 2 + 1))
            bh = int(rng.integers(max(h // 8, 8), h // 2 + 1))
            x0, y0 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
            colour = tuple(int(c) for c in rng.integers(0, 255, 3))
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape((x0, y0, x0 + bw - 1, y0 + bh - 1), fill=colour)
            name = VOC_CLASSES[int(rng.integers(len(VOC_CLASSES)))]
            objects.append(
                f"\t<object>\n\t\t<name>{name}</name>\n\t\t<pose>Unspecified</pose>\n"
                f"\t\t<truncated>0</truncated>\n\t\t<occluded>0</occluded>\n\t\t<difficult>0</difficult>\n"
                f"\t\t<bndbox>\n\t\t\t<xmin>{x0 + 1}</xmin>\n\t\t\t<ymin>{y0 + 1}</ymin>\n"
                f"\t\t\t<xmax>{x0 + bw}</xmax>\n\t\t\t<ymax>{y0 + bh}</ymax>\n\t\t</bndbox>\n\t</object>\n"
            )
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        (root / "JPEGImages" / f"{image_id}.jpg").write_bytes(buffer.getvalue())
        xml = (
            f"<annotation>\n\t<folder>VOC2012</folder>\n\t<filename>{image_id}.jpg</filename>\n"
            "\t<source>\n\t\t<database>detexp benchmarks/gpu.py</database>\n\t</source>\n"
            f"\t<size>\n\t\t<width>{w}</width>\n\t\t<height>{h}</height>\n\t\t<depth>3</depth>\n\t</size>\n"
            f"\t<segmented>0</segmented>\n{''.join(objects)}</annotation>\n"
        )
        (root / "Annotations" / f"{image_id}.xml").write_text(xml, encoding="utf-8")
    splits = {"train": ids[:num_train], "val": ids[num_train:], "trainval": ids}
    for split, split_ids in splits.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in split_ids))
    return ids[:num_train]


def measure_dataset(b: Bench) -> dict[str, Any]:
    """Writes the VOC folder (:func:`write_voc_dataset`), then decodes the first
    ``held_images`` train images ONCE as the training pipeline does (``_read_annotations``:
    XML parse and full image decode check; ``decode_batch`` with the training flip
    probability; ``batch_to_tensors`` onto the device: float in [0, 1]) and holds them
    there for every bare loop below, which goes round them. Timed: the writing, and the
    decoding to tensors (each once, outside every other timing)."""
    from detexp.data.annotations import _read_annotations
    from detexp.data.pipeline import batch_to_tensors, decode_batch

    s = b.sizes
    started = time.perf_counter()
    ids = write_voc_dataset(b.root, s.train_images, s.val_images, s.image_size)
    write_s = time.perf_counter() - started
    started = time.perf_counter()
    table = _read_annotations(str(b.root), ids[: s.held_images], VOC_CLASSES)
    b.held = batch_to_tensors(decode_batch(table, str(b.root), hflip_prob=0.5), b.device)
    _sync(b)
    decode_s = time.perf_counter() - started
    jpeg_bytes = sum((b.root / "JPEGImages" / f"{i}.jpg").stat().st_size for i in ids)
    return {
        "status": "ok", "root": str(b.root), "image_size": list(s.image_size),
        "train_images": s.train_images, "val_images": s.val_images, "held_images": len(b.held[0]),
        "objects_held": sum(len(t["labels"]) for t in b.held[1]),
        "mean_jpeg_kib": jpeg_bytes / len(ids) / 1024,
        "write_s": write_s, "decode_to_tensors_s": decode_s,
    }


# --------------------------------------------------------------------------- training


def time_training(b: Bench, model: str, batch: int, precision: str, cudnn_benchmark: bool | None) -> Row:
    """Training images/s of one configuration, bare (no Ray): the config composed as
    ``detexp train`` would (:meth:`Bench.overrides`); ``build_detector(cfg.model, 21)``
    (:meth:`Bench.model`) on the device, channels-last when
    ``trainer.channels_last`` (as the Ray worker does), ``build_optimizer(cfg.optimizer)``
    (fused SGD), a ``torch.amp.GradScaler`` for fp16; ``torch.backends.cudnn.benchmark =
    cudnn_benchmark`` (GPU). ``engine.train_one_epoch`` (forward under ``trainer.amp``'s autocast,
    backward, optimizer step, one ``loss.item()`` a step) over ``warmup_steps`` held
    batches, untimed (cuDNN's autotuning happens there), then over ``timed_steps`` more:
    the clock runs from a ``torch.cuda.synchronize()`` before that call to one after it.
    ``images_per_s`` = timed images / those seconds. ``peak_gpu_mib``:
    ``torch.cuda.max_memory_allocated()`` over warm-up and timed steps (the held images
    included: ``held_gpu_mib``)."""
    import torch

    from detexp.engine.loops import train_one_epoch
    from detexp.engine.solver import build_optimizer

    s = b.sizes
    cfg = b.cfg(model)
    if b.cuda:
        torch.backends.cudnn.benchmark = bool(cudnn_benchmark)
    _release(b)
    held_mib = torch.cuda.memory_allocated() / 2**20 if b.cuda else None
    net = b.model("train", model)
    if cfg.trainer.channels_last:
        net = net.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg.optimizer, net.parameters())
    scaler = torch.amp.GradScaler(b.device.type) if precision == "fp16" else None
    amp = None if precision == "fp32" else precision
    warm = _cycled(b.held, batch, s.warmup_steps, 0)
    timed = _cycled(b.held, batch, s.timed_steps, s.warmup_steps)
    try:
        train_one_epoch(net, optimizer, warm, epoch=0, amp=amp, scaler=scaler)
        _sync(b)
        started = time.perf_counter()
        stats = train_one_epoch(net, optimizer, timed, epoch=1, amp=amp, scaler=scaler)
        _sync(b)
        seconds = time.perf_counter() - started
        memory = _gpu_mib(b)
    finally:
        del net, optimizer, scaler
        _release(b)
    return {
        "min_size": int(cfg.model.min_size), "max_size": int(cfg.model.max_size),
        "channels_last": bool(cfg.trainer.channels_last), "steps": stats.steps, "images": stats.images,
        "seconds": seconds, "images_per_s": stats.images / seconds, "loss": stats.losses.get("loss"),
        **memory, "held_gpu_mib": held_mib, "rss_mib": rss_mib(),
    }


def train_matrix(b: Bench) -> list[Row]:
    """The configurations of ``train``, most wanted first: cuDNN benchmark on before off,
    then batch, then precision (on a CPU: one pass, cudnn ``None``)."""
    cudnns: tuple[bool | None, ...] = (True, False) if b.cuda else (None,)
    return [
        {"model": RESNET, "batch": batch, "precision": precision, "cudnn_benchmark": cudnn}
        for cudnn in cudnns for batch in b.sizes.train_batches for precision in PRECISIONS
    ]


# --------------------------------------------------------------------------- Ray Train


def measure_ray_train(b: Bench, bare: list[Row]) -> Row:
    """The same training step under Ray Train: ``detexp.commands.train.train(cfg, run_dir)``
    in-process (it starts a local Ray through ``cluster.start_ray`` as ``detexp train``
    does), on the written VOC folder, model ``fasterrcnn_resnet50_fpn``, batch
    ``ray_batch``, ``trainer.amp=ray_precision``, cuDNN benchmark on (the default), one
    worker: on a GPU ``scaling=gpu`` with ``num_workers=1``, ``cpus_per_worker`` = the
    CPUs less 2 (``--ray-cpus-per-worker``), the rest for the Ray Data tasks that read and
    decode the JPEGs; in the smoke the local scaling (1 CPU worker) on SMOKE_THREADS threads. No val
    split, no end report, no system metrics; ``ray_epochs`` epochs of all train images.

    Its figures are the LAST epoch's, from the worker's own ``engine.train_one_epoch``
    clock (every step, the wait for each batch from the Ray Data shard and its copy to the
    device included): ``images_per_s`` = ``train/images / train/epoch_s``,
    ``data_wait_share`` = ``train/data_wait_s / train/epoch_s``. ``ratio_to_bare`` divides
    by the bare ``train`` row of the same model, batch, precision and cuDNN setting
    (``None`` when that row did not run). Ray is shut down afterwards."""
    import ray

    from detexp.commands.train import train

    s = b.sizes
    overrides = [
        *b.overrides(RESNET), f"dataset.batch_size={s.ray_batch}", "dataset.val_split=null",
        f"trainer.amp={'null' if s.ray_precision == 'fp32' else s.ray_precision}",
        f"schedule.epochs={s.ray_epochs}", "schedule.lr_steps=[]", "progress_every_s=0",
    ]
    if b.cuda:
        cpus = b.ray_cpus if b.ray_cpus is not None else max(cpu_count() - 2, 1)
        overrides += ["scaling=gpu", "scaling.num_workers=1", f"scaling.cpus_per_worker={cpus}",
                      "scaling.max_failures=0"]
    else:
        overrides += [f"scaling.threads_per_worker={SMOKE_THREADS}"]
    cfg = compose(overrides)
    _release(b)
    epochs: list[dict[str, Any]] = []
    started = time.perf_counter()
    try:
        train(cfg, b.work / "runs" / "ray", overrides, callbacks=[lambda m: epochs.append(dict(m))])
    finally:
        call_s = time.perf_counter() - started
        if ray.is_initialized():
            ray.shutdown()
    last = epochs[-1]
    ray_ips = last["train/images"] / last["train/epoch_s"]
    cudnn = True if b.cuda else None
    same = [r for r in bare if r["status"] == "ok" and (r["batch"], r["precision"], r["cudnn_benchmark"])
            == (s.ray_batch, s.ray_precision, cudnn)]
    bare_ips = same[0]["images_per_s"] if same else None
    return {
        "status": "ok", "model": RESNET, "batch": s.ray_batch, "precision": s.ray_precision,
        "cudnn_benchmark": cudnn, "workers": int(last["train/workers"]),
        "cpus_per_worker": float(cfg.scaling.cpus_per_worker), "use_gpu": bool(cfg.scaling.use_gpu),
        "images_per_s": ray_ips, "bare_images_per_s": bare_ips,
        "ratio_to_bare": ray_ips / bare_ips if bare_ips else None,
        "data_wait_share": last["train/data_wait_s"] / last["train/epoch_s"],
        "timed_epoch": int(last["epoch"]) + 1,
        "epochs": [
            {"epoch": int(m["epoch"]) + 1, "images": m["train/images"], "steps": m["train/steps"],
             "epoch_s": m["train/epoch_s"], "data_wait_s": m["train/data_wait_s"],
             "images_per_s": m["train/images"] / m["train/epoch_s"]}
            for m in epochs
        ],
        "train_call_s": call_s,
    }


# --------------------------------------------------------------------------- inference


def time_inference(b: Bench, model: str, batch: int, precision: str, folded: bool) -> Row:
    """Inference images/s of the eval/predict path: ``build_inference_model(cfg.model, 21)``
    (random weights; :meth:`Bench.model`) on the device in eval mode, ``fold_batch_norms``
    when ``folded`` (as ``predict`` and validation do), channels-last on a CPU only (as
    ``predict`` does); cuDNN benchmark on (GPU). Under ``torch.inference_mode()`` and, for bf16/fp16,
    ``torch.autocast``: ``engine.predict_batch`` (the model's resize, backbone, RPN, box
    head and post-processing, the detections moved to the CPU) over ``warmup_steps``
    held batches, untimed, then ``timed_steps`` more between two
    ``torch.cuda.synchronize()``. ``batchnorms_folded`` / ``batchnorms``: how many of the
    model's BatchNorms the folding removed, of how many."""
    import torch

    from detexp.engine.loops import autocast, predict_batch
    from detexp.modeling.batchnorm import fold_batch_norms

    s = b.sizes
    cfg = b.cfg(model)
    if b.cuda:
        torch.backends.cudnn.benchmark = True
    _release(b)
    net = b.model("inference", model).eval()
    if s.test_proposals is not None:  # the smoke's: torchvision keeps 1000 (2000 before NMS)
        net.rpn._pre_nms_top_n["testing"] = net.rpn._post_nms_top_n["testing"] = s.test_proposals

    def norms(module: torch.nn.Module) -> int:
        return sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules())

    before = norms(net)
    if folded:
        fold_batch_norms(net)
    if not b.cuda:
        net = net.to(memory_format=torch.channels_last)
    amp = None if precision == "fp32" else precision
    warm = _cycled(b.held, batch, s.warmup_steps, 0)
    timed = _cycled(b.held, batch, s.timed_steps, s.warmup_steps)
    detections = 0
    try:
        with torch.inference_mode(), autocast(b.device, amp):
            for images, _ in warm:
                predict_batch(net, images)
            _sync(b)
            started = time.perf_counter()
            for images, _ in timed:
                detections += sum(len(out["boxes"]) for out in predict_batch(net, images))
            _sync(b)
            seconds = time.perf_counter() - started
        memory = _gpu_mib(b)
        after = norms(net)
    finally:
        del net
        _release(b)
    images = batch * s.timed_steps
    return {
        "min_size": int(cfg.model.min_size), "max_size": int(cfg.model.max_size),
        "batchnorms": before, "batchnorms_folded": before - after, "steps": s.timed_steps, "images": images,
        "seconds": seconds, "images_per_s": images / seconds, "detections_per_image": detections / images,
        **memory, "rss_mib": rss_mib(),
    }


def inference_matrix(b: Bench) -> list[Row]:
    """fp32 as built, then folded in fp32, bf16 and fp16 (skipped on a CPU), per batch."""
    variants = [("fp32", False), ("fp32", True), ("bf16", True), ("fp16", True)]
    return [
        {"model": RESNET, "batch": batch, "precision": precision, "folded": folded}
        for batch in b.sizes.infer_batches for precision, folded in variants
    ]


def mobilenet_matrices(b: Bench) -> tuple[list[Row], list[Row]]:
    """Training (cuDNN benchmark on) and folded inference of each MobileNetV3 builder at
    its own sizes (conf/model/<name>.yaml), batch ``mobilenet_batch``, fp32 and bf16
    (``mobilenets``: the smoke runs only the 320 one)."""
    batch = b.sizes.mobilenet_batch
    cudnn = True if b.cuda else None
    train_rows = [{"model": m, "batch": batch, "precision": p, "cudnn_benchmark": cudnn}
                  for m in b.sizes.mobilenets for p in ("fp32", "bf16")]
    infer_rows = [{"model": m, "batch": batch, "precision": p, "folded": True}
                  for m in b.sizes.mobilenets for p in ("fp32", "bf16")]
    return train_rows, infer_rows


# --------------------------------------------------------------------------- running


def _run_row(b: Bench, row: Row, function: Callable[..., Row], save: Callable[[], None]) -> bool:
    """Fill ``row`` (its keys are ``function``'s arguments) with the measurement or why it
    has none; returns False when it raised."""
    args = {k: v for k, v in row.items() if k != "status"}
    label = ", ".join(f"{k}={v}" for k, v in args.items())
    ok = True
    if row["precision"] == "fp16" and not b.cuda:
        row["status"] = "skipped (fp16 needs CUDA)"
    elif not b.budget.allows():
        row["status"] = "skipped (--budget-s spent)"
    else:
        print(f"-- {function.__name__}: {label} ...", flush=True)
        started = time.perf_counter()
        try:
            row.update(function(b, **args))
            row["status"] = "ok"
            print(f"   {row['images_per_s']:.2f} images/s"
                  + (f", peak {row['peak_gpu_mib']:.0f} MiB" if row.get("peak_gpu_mib") else "")
                  + f"  ({time.perf_counter() - started:.0f} s)", flush=True)
        except Exception as exc:  # noqa: BLE001 - recorded, and the others go on
            ok = False
            traceback.print_exc()
            row["status"] = f"error: {type(exc).__name__}: {str(exc).strip()[:300]}"
    save()
    return ok


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "CPU: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU: " + (platform.processor() or platform.machine())


def meta(args: argparse.Namespace, b: Bench) -> dict[str, Any]:
    import ray
    import torch
    import torchvision

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    cuda = torch.cuda.is_available()
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(["python", *sys.argv]),
        "mode": "cpu-smoke" if b.smoke else "gpu",
        "device": str(b.device),
        "device_name": torch.cuda.get_device_name(0) if cuda and not b.smoke else _cpu_name(),
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "gpu_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None,
        "cpu_count": os.cpu_count(),
        "cpus_available": cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "ray": ray.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "git_commit": commit,
        "budget_s": b.budget.seconds,
        "sizes": dataclasses.asdict(b.sizes),
        "lr": LR,
        "load_average_start": list(os.getloadavg()),
    }


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if not math.isnan(value) else "nan"
    return str(value)


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The figures to read against :data:`ANCHORS`: ResNet-50 FPN training images/s in
    fp32 at batch 2, and the best with AMP (and whether it meets the goal)."""
    ok = [r for r in report["train"] if r["status"] == "ok"]
    fp32_2 = [r["images_per_s"] for r in ok if r["precision"] == "fp32" and r["batch"] == 2]
    amp = [r for r in ok if r["precision"] != "fp32"]
    best = max(amp, key=lambda r: r["images_per_s"], default=None)
    return {
        "resnet50_fp32_batch2_images_per_s": max(fp32_2, default=None),
        "resnet50_best_amp_images_per_s": best["images_per_s"] if best else None,
        "resnet50_best_amp_config": {k: best[k] for k in ("batch", "precision", "cudnn_benchmark")} if best else None,
        "goal_met": best["images_per_s"] >= ANCHORS["goal"]["images_per_s"]
        if best and report["meta"]["mode"] != "cpu-smoke" else None,
    }


def print_table(report: dict[str, Any]) -> None:
    rows = [("section", "model", "batch", "precision", "setting", "images/s", "peak MiB", "status")]
    short = {RESNET: "resnet50_fpn", MOBILENETS[0]: "mobilenet_v3_fpn", MOBILENETS[1]: "mobilenet_v3_320_fpn"}
    sections = [("train", report["train"]), ("inference", report["inference"]),
                ("mobilenet train", report["mobilenet"]["train"]),
                ("mobilenet infer", report["mobilenet"]["inference"])]
    for name, entries in sections:
        for r in entries:
            if "folded" in r:
                setting = "folded" if r["folded"] else "as built"
            else:
                setting = {True: "cudnn on", False: "cudnn off", None: "cpu"}[r["cudnn_benchmark"]]
            status = r["status"] if len(r["status"]) <= 40 else r["status"][:37] + "..."
            rows.append((name, short[r["model"]], str(r["batch"]), r["precision"], setting,
                         _fmt(r.get("images_per_s")), _fmt(r.get("peak_gpu_mib"), 0), status))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))
    ray_row = report["ray_train"]
    if ray_row.get("status") == "ok":
        print(f"\nray_train ({short[RESNET]}, batch {ray_row['batch']}, {ray_row['precision']}, epoch "
              f"{ray_row['timed_epoch']}): {ray_row['images_per_s']:.2f} images/s, "
              f"{_fmt(ray_row['ratio_to_bare'], 3)} x the bare loop's {_fmt(ray_row['bare_images_per_s'])}; "
              f"{100 * ray_row['data_wait_share']:.1f}% of the epoch waiting for data")
    else:
        print(f"\nray_train: {ray_row.get('status')}")
    inf = [r for r in report["inference"] if r["status"] == "ok" and r["folded"]]
    if inf:
        print(f"fold_batch_norms removed {inf[0]['batchnorms_folded']} of {inf[0]['batchnorms']} BatchNorms "
              f"of {short[RESNET]}")
    s = report["summary"]
    print("\nanchors (training images/s per GPU, fasterrcnn_resnet50_fpn):")
    for key, a in ANCHORS.items():
        print(f"  {key}: {a['images_per_s']:g} on {a['gpu']}, {a['precision']}: {a['what']}")
    print(f"  here: {_fmt(s['resnet50_fp32_batch2_images_per_s'])} images/s fp32 batch 2; best with AMP "
          f"{_fmt(s['resnet50_best_amp_images_per_s'])} ({s['resnet50_best_amp_config']}); goal met: "
          + ("n/a (CPU smoke)" if report["meta"]["mode"] == "cpu-smoke" else _fmt(s["goal_met"])))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="every code path on the CPU, tiny sizes, < 1 min: checks the script, not the machine")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--budget-s", type=float,
                        help=f"skip the configurations left after this many seconds (default {GPU.budget_s:g}; "
                             f"smoke {SMOKE.budget_s:g})")
    parser.add_argument("--ray-cpus-per-worker", type=int,
                        help="scaling.cpus_per_worker of the Ray run on a GPU (default: the CPUs less 2)")
    parser.add_argument("--workdir", type=Path, help="make the temp folder under here (default: the system's)")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (its path is printed)")
    parser.add_argument("--verbose", action="store_true", help="show detexp's own log lines")
    args = parser.parse_args()

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("detexp").setLevel(logging.INFO if args.verbose else logging.WARNING)
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)

    import torch

    sizes = SMOKE if args.cpu_smoke else GPU
    if not args.cpu_smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: run it where a GPU is, or with --cpu-smoke")
    if args.cpu_smoke:
        torch.set_num_threads(SMOKE_THREADS)
    budget = Budget(args.budget_s if args.budget_s is not None else sizes.budget_s)
    workdir = Path(tempfile.mkdtemp(prefix="detexp-gpu-bench-", dir=args.workdir))
    b = Bench(workdir, sizes, args.cpu_smoke, budget, args.ray_cpus_per_worker)
    mobilenet_train, mobilenet_infer = mobilenet_matrices(b)
    report: dict[str, Any] = {
        "meta": meta(args, b), "anchors": ANCHORS, "dataset": {"status": "not run"},
        "train": train_matrix(b), "ray_train": {"status": "not run"},
        "inference": inference_matrix(b), "mobilenet": {"train": mobilenet_train, "inference": mobilenet_infer},
    }
    for rows in (report["train"], report["inference"], mobilenet_train, mobilenet_infer):
        for row in rows:
            row["status"] = "not run"

    def save() -> None:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")

    print(f"work folder {workdir}; {report['meta']['mode']} on {report['meta']['device_name']}; "
          f"budget {budget.seconds:.0f} s", flush=True)
    errors = 0
    try:
        print("-- dataset ...", flush=True)
        report["dataset"] = measure_dataset(b)
        print(f"   {report['dataset']['train_images'] + report['dataset']['val_images']} images written in "
              f"{report['dataset']['write_s']:.1f} s", flush=True)
        save()
        for row in report["train"]:
            errors += not _run_row(b, row, time_training, save)
        if not budget.allows(sizes.ray_needs_s):
            left = f"{budget.left():.0f} s left, needs {sizes.ray_needs_s:g}"
            report["ray_train"] = {"status": f"skipped (--budget-s: {left})"}
        else:
            print("-- ray_train ...", flush=True)
            started = time.perf_counter()
            try:
                report["ray_train"] = measure_ray_train(b, report["train"])
                print(f"   {report['ray_train']['images_per_s']:.2f} images/s, ratio to bare "
                      f"{_fmt(report['ray_train']['ratio_to_bare'], 3)}  ({time.perf_counter() - started:.0f} s)",
                      flush=True)
            except Exception as exc:  # noqa: BLE001 - recorded, and the others go on
                errors += 1
                traceback.print_exc()
                report["ray_train"] = {"status": f"error: {type(exc).__name__}: {str(exc).strip()[:300]}"}
        save()
        for row in report["inference"]:
            errors += not _run_row(b, row, time_inference, save)
        for row in mobilenet_train:
            errors += not _run_row(b, row, time_training, save)
        for row in mobilenet_infer:
            errors += not _run_row(b, row, time_inference, save)
    except Exception:  # the dataset: nothing else can run without it
        errors += 1
        traceback.print_exc()
        report["dataset"]["status"] = "error"
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        report["summary"] = summary(report)
        report["meta"]["wall_s"] = time.perf_counter() - budget.started
        report["meta"]["load_average_end"] = list(os.getloadavg())
        report["meta"]["errors"] = errors
        save()
        if args.keep:
            print(f"kept {workdir}")
        else:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)

    print()
    print_table(report)
    print(f"\n{report['meta']['mode']} run, {report['meta']['wall_s']:.0f} s wall"
          + (f"; JSON in {args.json}" if args.json else ""))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
