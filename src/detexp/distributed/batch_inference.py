"""Batch inference on Ray Data, shared by ``detexp eval``, ``detexp predict`` and the
report at the end of ``detexp train``.

The pipeline is the current replacement for Ray AIR's ``BatchPredictor``: Ray Data tasks
read and decode the images, a pool of :class:`Predictor` actors
(``map_batches(Predictor, compute=ActorPoolStrategy(size=scaling.num_workers))``, one GPU
each with ``scaling.use_gpu``) runs the detector, and every actor returns one small row per
image: its detections and ground truth as flat Arrow ``list<float32>`` columns (never ragged
tensors, ray#31779) plus a drawn image for the few images someone will look at.

The driver streams those rows with :func:`run_predictor`; :func:`prediction_records` turns
a batch of them into the per-image arrays the metrics take, without Python floats.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from omegaconf import OmegaConf
from PIL import Image

from detexp.config import plain
from detexp.evaluation.records import prediction_table

if TYPE_CHECKING:  # torch is imported where a model runs: the driver reads rows only
    import torch

log = logging.getLogger("detexp")

PROGRESS_EVERY_S = 30.0
# Images per Ray Data block, in inference batches. A block is one predictor task, and its
# results reach the driver when the task ends: small blocks keep every actor of the pool
# busy and the results streaming. (The annotation reader makes blocks of hundreds of
# images: with 5,000 images, 6 tasks of ~830 images each, results in bulk, 6 actors at most.)
BATCHES_PER_BLOCK = 4
# Decimals of a box coordinate in every output: 0.01 px is far below any annotation's
# precision; the same rounded boxes go to the metrics and to predictions.jsonl, so the file
# reproduces the numbers exactly.
BOX_DECIMALS = 2


class Predictor:
    """``map_batches`` callable class: one detector per actor, loaded once.

    Input rows are those of :func:`detexp.data.pipeline.decode_images` (plus an optional
    ``error`` column); output rows follow :data:`PREDICTION_SCHEMA`. Detections below
    ``min_score`` are dropped; ``draw`` (True, or a list of image ids) asks for the image
    with its boxes (score >= ``draw_threshold``) and ground truth drawn.
    """

    def __init__(
        self,
        model_cfg: dict[str, Any],
        classes: list[str],
        state: Any,
        use_gpu: bool = False,
        min_score: float = 0.0,
        draw: bool | list[str] = False,
        draw_threshold: float = 0.5,
        threads: int | None = None,
        sharing: int = 1,
    ):
        import ray
        import torch

        from detexp.distributed.cluster import torch_threads
        from detexp.modeling.detector import inference_model

        threads = torch_threads(threads, sharing)
        if threads:  # torch would otherwise start one thread per core of the machine
            torch.set_num_threads(threads)
        if isinstance(state, list):  # [ObjectRef]: kept wrapped so that Ray passes the ref
            state = state[0]
        if isinstance(state, ray.ObjectRef):
            state = ray.get(state)
        self.classes = list(classes)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = inference_model(model_cfg, len(self.classes) + 1, state, self.device)
        self.min_score = min_score
        self.draw = draw if isinstance(draw, bool) else set(draw)
        self.draw_threshold = draw_threshold

    def __call__(self, batch: pa.Table) -> pa.Table:
        from detexp.data.pipeline import batch_to_tensors
        from detexp.engine.loops import predict_batch

        rows = batch.to_pydict()
        n = len(rows["image_id"])
        errors = rows.get("error") or [None] * n
        usable = [i for i in range(n) if not errors[i]]
        outputs: dict[int, dict[str, torch.Tensor]] = {}
        if usable:
            keys = ("image", "image_shape", "boxes", "labels", "difficult", "image_id")
            images, _ = batch_to_tensors({k: [rows[k][i] for i in usable] for k in keys}, self.device)
            for i, out in zip(usable, predict_batch(self.model, images), strict=True):
                keep = out["scores"] >= self.min_score
                outputs[i] = {k: v[keep] for k, v in out.items()}
        return prediction_table(
            rows, outputs, self.classes, draw=self.draw, draw_threshold=self.draw_threshold, errors=errors,
        )


def decode_files(batch: pa.Table) -> pa.Table:
    """``map_batches`` step for ``predict``: read each ``path`` into the columns that
    :func:`detexp.data.pipeline.decode_batch` produces, with no ground truth. An image
    that cannot be read gets an ``error`` instead of pixels, so one bad file does not stop
    the run."""
    images, shapes, errors = [], [], []
    for path in batch.column("path").to_pylist():
        try:
            with Image.open(path) as img:
                pixels = np.ascontiguousarray(np.asarray(img.convert("RGB")).transpose(2, 0, 1))
            images.append(pixels.tobytes())
            shapes.append(list(pixels.shape))
            errors.append(None)
        except Exception as exc:  # noqa: BLE001 - reported per image on the driver
            images.append(b"")
            shapes.append([3, 0, 0])
            errors.append(f"cannot read image: {type(exc).__name__}: {exc}")
    n = batch.num_rows
    empty = pa.array([[]] * n, type=pa.list_(pa.float32()))
    return pa.table(
        {
            "image_id": batch.column("image_id"),
            "boxes": empty,
            "labels": pa.array([[]] * n, type=pa.list_(pa.int64())),
            "difficult": pa.array([[]] * n, type=pa.list_(pa.bool_())),
            "image": pa.array(images, type=pa.binary()),
            "image_shape": pa.array(shapes, type=pa.list_(pa.int32())),
            "error": pa.array(errors, type=pa.string()),
        }
    )


def run_predictor(
    dataset,
    model_cfg: Any,
    classes: Sequence[str],
    state: dict[str, torch.Tensor],
    scaling: Any,
    batch_size: int,
    min_score: float = 0.0,
    draw: bool | list[str] = False,
    draw_threshold: float = 0.5,
    total: int | None = None,
    ray_log: Path | None = None,
) -> Iterator[pa.Table]:
    """Run the actor pool over ``dataset`` (rows of decoded images) and yield the output
    rows (:data:`PREDICTION_SCHEMA`) batch by batch on the driver; progress is logged every
    30 s. Close the generator (``contextlib.closing``) when not running it to the end.
    ``ray_log``: where Ray's noise goes instead of the console (see :func:`ray_noise_to`)."""
    import ray

    state_ref = ray.put(state)
    predictions = dataset.map_batches(
        Predictor,
        fn_constructor_kwargs={
            "model_cfg": plain(OmegaConf.create(model_cfg)),
            "classes": list(classes),
            "state": [state_ref],
            "use_gpu": bool(scaling.use_gpu),
            "min_score": float(min_score),
            "draw": draw,
            "draw_threshold": float(draw_threshold),
            "threads": scaling.get("threads_per_worker"),
            "sharing": scaling.num_workers,  # at most; Ray may spread them over nodes
        },
        compute=ray.data.ActorPoolStrategy(size=scaling.num_workers),
        num_cpus=scaling.cpus_per_worker,
        num_gpus=1 if scaling.use_gpu else 0,
        batch_size=batch_size,
        batch_format="pyarrow",
    )
    done, started, last_log = 0, time.perf_counter(), time.perf_counter()
    with ray_noise_to(ray_log):
        for batch in predictions.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
            done += batch.num_rows
            yield batch
            now = time.perf_counter()
            if now - last_log >= PROGRESS_EVERY_S:
                log.info("  %d/%s images (%.1f images/s)", done, total or "?", done / (now - started))
                last_log = now
    del state_ref


# What Ray's C++ core prints, straight to file descriptor 2, whenever a Ray Data actor pool
# starts (ray#57733): an error-looking line about Ray Data's own internals, harmless here.
RAY_NOISE = (b"has constructor arguments in the object store",)


@contextlib.contextmanager
def ray_noise_to(path: Path | None):
    """While inside, lines written to file descriptor 2 that match :data:`RAY_NOISE` go to
    ``path`` instead of the console; everything else still reaches the console, in order.
    (Python's logging cannot filter them: they come from C++, below it.) None: no filter.
    """
    if path is None:
        yield
        return
    sys.stderr.flush()
    console = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        with os.fdopen(read_end, "rb") as lines:
            for line in lines:  # until fd 2 is restored and the pipe closes
                try:
                    if any(mark in line for mark in RAY_NOISE):
                        with open(path, "ab") as noise:
                            noise.write(line)
                    else:
                        os.write(console, line)
                except OSError:  # the console went away; keep draining the pipe
                    pass

    thread = threading.Thread(target=pump, name="detexp-stderr", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(console, 2)  # closes the pipe's write end: the pump sees EOF
        thread.join(timeout=5)
        os.close(console)


def prediction_records(batch: pa.Table) -> tuple[list[dict], list[dict]]:
    """Per-image numpy arrays (views into one array per column and batch, straight from
    Arrow: no Python float objects) in the form DetectionEvaluator.update takes."""
    det_boxes = _per_row(batch, "det_boxes", np.float64, 4, decimals=BOX_DECIMALS)
    det_scores = _per_row(batch, "det_scores", np.float64)
    det_labels = _per_row(batch, "det_labels", np.int64)
    gt_boxes = _per_row(batch, "gt_boxes", np.float64, 4)
    gt_labels = _per_row(batch, "gt_labels", np.int64)
    gt_difficult = _per_row(batch, "gt_difficult", bool)
    preds, targets = [], []
    for i, image_id in enumerate(batch.column("image_id").to_pylist()):
        preds.append({"boxes": det_boxes[i], "scores": det_scores[i], "labels": det_labels[i]})
        targets.append(
            {"boxes": gt_boxes[i], "labels": gt_labels[i], "difficult": gt_difficult[i], "image_id": image_id}
        )
    return preds, targets


def _per_row(batch: pa.Table, name: str, dtype, width: int = 1, decimals: int | None = None) -> list[np.ndarray]:
    column = batch.column(name).combine_chunks()
    offsets = column.offsets.to_numpy()
    offsets = offsets - offsets[0]  # a sliced list array keeps its parent's offsets
    values = column.flatten().to_numpy(zero_copy_only=False).astype(dtype)
    if decimals is not None:
        values = np.round(values, decimals)
    shape = (-1, width) if width > 1 else (-1,)
    return [values[offsets[i] : offsets[i + 1]].reshape(shape) for i in range(len(column))]


def output_arrays(output: dict[str, torch.Tensor], min_score: float = 0.0) -> dict[str, np.ndarray]:
    """One image's detector output (score >= ``min_score``) as the arrays
    :func:`prediction_records` gives for it: float64 boxes rounded as there, float64
    scores (exactly the model's float32 values), int64 labels."""
    keep = output["scores"] >= min_score
    boxes = output["boxes"][keep].detach().cpu().numpy().astype(np.float64).reshape(-1, 4)
    return {
        "boxes": np.round(boxes, BOX_DECIMALS),
        "scores": output["scores"][keep].detach().cpu().numpy().astype(np.float64),
        "labels": output["labels"][keep].detach().cpu().numpy().astype(np.int64),
    }


def detection_records(pred: dict[str, np.ndarray], classes: Sequence[str]) -> list[dict[str, Any]]:
    """One image's detections as predictions.jsonl and ``detexp serve`` write them: the
    class name, the box [xmin, ymin, xmax, ymax] in the image's pixels, the score."""
    return [
        {"label": classes[label - 1], "box": box, "score": score}
        for box, score, label in zip(pred["boxes"].tolist(), pred["scores"].tolist(), pred["labels"].tolist(), strict=True)
    ]


def write_jsonl(out, image_ids: Sequence[str], preds: Sequence[dict], classes: Sequence[str]) -> int:
    count = 0
    for image_id, pred in zip(image_ids, preds, strict=True):
        for record in detection_records(pred, classes):
            out.write(json.dumps({"image_id": image_id, **record}) + "\n")
            count += 1
    return count
