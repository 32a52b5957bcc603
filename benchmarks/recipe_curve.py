"""Learning curve of a training recipe on the embedded default's data, in one process.

The default run's question is how much a recipe learns per step, and a real run answers
it slowly (Ray's start-up, minutes per epoch, an image order that changes between runs).
This trains the composed config (``python -m detexp train``'s, plus the overrides given)
in this process on the same generated shapes (400 train / 100 val, 192 px), with the
trainer's own pieces: ``decode_batch`` (flip included), ``engine.train_one_epoch``,
the optimizer, warm-up and schedule builders, ``trainer.channels_last``, and
``DetectionEvaluator`` on the val images after every epoch. The image order comes from
``seed`` alone, so two recipes see the same batches and differ only by the recipe.

    .venv/bin/python benchmarks/recipe_curve.py schedule.epochs=4 schedule.lr_steps=[3]
    .venv/bin/python benchmarks/recipe_curve.py optimizer=sgd seed=1

Prints one line per epoch (val map_50, map, mean loss, steps/s) and the curve at the end.
Not a test: nothing here fails on a number.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import compose  # benchmarks/, first on sys.path when run as a script

from detexp.data.annotations import _read_annotations
from detexp.data.pipeline import batch_to_tensors, decode_batch
from detexp.data.shapes import SHAPES_CLASSES, ensure_shapes
from detexp.engine.loops import predict_batch, train_one_epoch
from detexp.engine.solver import (
    build_optimizer,
    build_scheduler,
    build_warmup,
    resolve_auto_schedule,
)
from detexp.evaluation.metrics import DetectionEvaluator
from detexp.modeling.detector import build_detector

NUM_TRAIN, NUM_VAL = 400, 100


def _fit_anchors(model_cfg, root: Path) -> None:
    """``auto`` anchors fitted to the train images' boxes, as ``train`` fits them."""
    from detexp.config import is_auto
    from detexp.data.label_stats import read_records
    from detexp.modeling.anchors import fit_model_anchors
    from detexp.modeling.spec import RESNET_FPN_BUILDERS

    if is_auto(model_cfg.anchor_sizes) or is_auto(model_cfg.anchor_ratios):
        records, _ = read_records(root, [f"{i + 1:06d}" for i in range(NUM_TRAIN)], SHAPES_CLASSES)
        fit = fit_model_anchors(model_cfg, records, ladder=model_cfg.name in RESNET_FPN_BUILDERS)
        model_cfg.anchor_sizes, model_cfg.anchor_ratios = fit.sizes, fit.ratios


def main(overrides: list[str]) -> list[float]:
    torch.set_num_threads(2)
    cfg = compose(overrides)
    classes = list(SHAPES_CLASSES)
    with tempfile.TemporaryDirectory() as cache:
        root = ensure_shapes(Path(cache), num_train=NUM_TRAIN, num_val=NUM_VAL, image_size=192, seed=0)
        table = _read_annotations(str(root), [f"{i + 1:06d}" for i in range(NUM_TRAIN + NUM_VAL)], SHAPES_CLASSES)
        train_rows = table.slice(0, NUM_TRAIN)
        val_images, val_targets = batch_to_tensors(decode_batch(table.slice(NUM_TRAIN), str(root)))
        _fit_anchors(cfg.model, root)
        resolve_auto_schedule(cfg.schedule, NUM_TRAIN)  # `auto` epochs and lr steps, as train resolves them
        torch.manual_seed(cfg.seed)
        order_rng = random.Random(cfg.seed)
        model = build_detector(cfg.model, len(classes) + 1)
        if cfg.trainer.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(cfg.optimizer, model.parameters())
        scheduler = build_scheduler(cfg.schedule, optimizer)
        batch = cfg.dataset.batch_size
        curve: list[float] = []
        started = time.perf_counter()
        for epoch in range(cfg.schedule.epochs):
            order = list(range(NUM_TRAIN))
            order_rng.shuffle(order)
            batches = (
                batch_to_tensors(decode_batch(train_rows.take(order[i : i + batch]), str(root), cfg.dataset.hflip_prob))
                for i in range(0, NUM_TRAIN, batch)
            )
            warmup = build_warmup(cfg.schedule, optimizer, -(-NUM_TRAIN // batch)) if epoch == 0 else None
            stats = train_one_epoch(model, optimizer, batches, epoch, warmup=warmup, grad_clip_norm=cfg.schedule.grad_clip_norm)
            scheduler.step()
            evaluator = DetectionEvaluator(classes)
            for i in range(0, NUM_VAL, batch):
                evaluator.update(predict_batch(model, val_images[i : i + batch]), val_targets[i : i + batch])
            metrics = evaluator.compute()
            curve.append(round(metrics["map_50"], 3))
            print(
                f"epoch {epoch + 1}/{cfg.schedule.epochs}  val map_50 {metrics['map_50']:.3f}  map {metrics['map']:.3f}  "
                f"loss {stats.losses['loss']:.3f}  {stats.steps_per_second:.2f} steps/s  "
                f"{time.perf_counter() - started:.0f} s",
                flush=True,
            )
    print("curve (val map_50 by epoch):", json.dumps(curve), " overrides:", " ".join(overrides) or "(none)")
    return curve


if __name__ == "__main__":
    main(sys.argv[1:])
