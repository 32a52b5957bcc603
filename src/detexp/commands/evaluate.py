"""``detexp eval`` and the report at the end of ``detexp train``: predict a split with
a checkpoint on Ray Data (:mod:`detexp.distributed.batch_inference`), and write what people read.

The driver streams the predictor's rows: it feeds :class:`DetectionEvaluator` and appends
to ``predictions.jsonl`` as they arrive, so its memory holds the per-image detection
records (a few KB per image) and never an image. ``benchmarks/eval_memory.py`` measures
that over 5,000 images.

Which model and data: a training checkpoint stores its resolved config and class names.
``eval`` starts from the checkpoint's ``model`` and ``dataset`` config and replaces only
the keys given on the command line (``dataset.val_split=test``, or a whole group:
``dataset=voc dataset.root=...``); class names always come from the checkpoint unless
``dataset.classes`` is given. So ``eval checkpoint=PATH`` alone evaluates the split the
model was validated on during training (see :func:`detexp.checkpoint.effective_config.effective_config`).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from omegaconf import DictConfig
from PIL import Image

from detexp.checkpoint.effective_config import prepare_inference
from detexp.checkpoint.files import CHECKPOINT_FILE, load_state
from detexp.data.files import DataRoot
from detexp.data.problems import format_problems, write_problems_csv
from detexp.distributed.batch_inference import (
    BATCHES_PER_BLOCK,
    prediction_records,
    run_predictor,
    write_jsonl,
)
from detexp.errors import ConfigError, DetexpError
from detexp.evaluation.diagnostics import (
    DetectionDiagnostics,
    ImageErrors,
    Summary,
    caption_tiles,
    write_confusion_matrix,
    write_threshold_curves,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger("detexp")
WORST_IMAGES = 8  # images in worst_images.jpg
GRID_IMAGES = 8  # the val split's first images (by id), drawn in predictions_grid.jpg


def evaluate_split(
    cfg: Any,
    state: dict[str, torch.Tensor] | None,
    out_dir: Path,
    *,
    batch_size: int,
    score_threshold: float = 0.5,
    grid_images: int = GRID_IMAGES,
    predictions: Any = None,
    source: Any = None,
) -> tuple[dict[str, Any], list[Path], Summary]:
    """Predict ``cfg.dataset``'s val split with ``cfg.model`` and ``state`` on the running
    Ray, and write ``metrics.json``, ``predictions.jsonl``, ``per_class_ap.csv/.md``,
    ``pr_curves/pr_<class>.png``, ``predictions_grid.jpg`` and the diagnostics at
    ``score_threshold`` (``confusion_matrix.csv/.png``, ``threshold_curves.csv/.png``,
    ``worst_images.jpg``) into ``out_dir``. ``predictions``: the rows a train worker kept
    of this model's validation (a pyarrow Table of PREDICTION_SCHEMA rows, the first
    ``grid_images`` images drawn), written up instead of predicting again; with them,
    ``source`` is the training's :class:`~detexp.data.source.DataSource`, whose val split
    they are (its annotations are then not read again). Returns the metrics
    (``DetectionEvaluator.compute()``), the files written and the diagnostics' totals."""
    from detexp.data.pipeline import decode_images
    from detexp.evaluation.metrics import DetectionEvaluator

    out_dir = Path(out_dir)
    if predictions is not None and source is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        split = _Split(source.root, source.classes, {e.image_id: e.image for e in source.val}, None, predictions.num_rows)
    else:
        split = _read_split(cfg, out_dir, batch_size)
    classes = split.classes
    if predictions is None:
        log.info("evaluating %d images of %s (%s) with %d actor(s)", split.usable, split.root,
                 cfg.dataset.val_split, cfg.scaling.num_workers)
        stream = run_predictor(
            decode_images(split.annotations, split.root, 0.0), cfg.model, classes, state, cfg.scaling,
            batch_size=batch_size, draw=sorted(split.images)[: max(grid_images, 0)], draw_threshold=score_threshold,
            total=split.usable, ray_log=None if cfg.ray.verbose else out_dir / "ray.log",
        )
    else:
        log.info("report on %d images of %s (%s) from the validation the model had in training",
                 predictions.num_rows, split.root, cfg.dataset.val_split)
        stream = (pa.Table.from_batches([b]) for b in predictions.to_batches(max_chunksize=batch_size))
    evaluator = DetectionEvaluator(classes)
    diagnostics = DetectionDiagnostics(classes, score_threshold, worst=WORST_IMAGES)
    started = time.perf_counter()
    drawn = _score(stream, evaluator, diagnostics, classes, out_dir / "predictions.jsonl")
    seconds = time.perf_counter() - started
    if predictions is None:
        log.info("predicted %d images in %.1fs (%.1f images/s)", len(evaluator), seconds, len(evaluator) / max(seconds, 1e-9))
    # faster_coco_eval logs its own summary table at INFO; ours follows in one line.
    logging.getLogger("faster_coco_eval").setLevel(logging.WARNING)
    metrics = evaluator.compute()
    files = [out_dir / "predictions.jsonl", *_write_metric_files(metrics, evaluator, drawn, out_dir)]
    files += write_confusion_matrix(diagnostics.confusion_matrix(), classes, score_threshold, out_dir)
    files += write_threshold_curves(diagnostics.threshold_curves(), out_dir)
    files += _write_worst_images(diagnostics.worst_images(), split, out_dir / "worst_images.jpg")
    return metrics, files, diagnostics.summary()


@dataclass(frozen=True)
class _Split:
    """The split an evaluation reads: its annotations (read and checked on Ray Data)."""

    root: DataRoot
    classes: list[str]
    images: dict[str, str]  # image id -> image file, relative to the root
    annotations: Any  # ray.data.Dataset of annotation rows, in blocks of a few batches (None: not read)
    usable: int  # images left after the error policy


def _read_split(cfg: Any, out_dir: Path, batch_size: int) -> _Split:
    """The entries of ``dataset.val_split`` (the same rule as training's validation split:
    the split folder, split file or JSON it names, else the seeded ``val_fraction`` share),
    their annotations read and the error policy applied."""
    from detexp.data.annotations import problems_of, read_annotations
    from detexp.data.source import resolve

    if not cfg.dataset.val_split:
        raise ConfigError("dataset.val_split is null: name the split to evaluate (dataset.val_split=val)")
    source = resolve(cfg.dataset, read_train=False)
    log.info("%s", source.summary())
    if not source.val:
        raise ConfigError(f"dataset.val_split={cfg.dataset.val_split!r} in {source.root} lists no images")
    out_dir.mkdir(parents=True, exist_ok=True)
    annotations = read_annotations(source.root, source.val, source.classes).materialize()
    usable = _apply_error_policy(cfg.dataset.on_error, problems_of(annotations), len(source.val), out_dir)
    annotations = annotations.repartition(target_num_rows_per_block=batch_size * BATCHES_PER_BLOCK)
    return _Split(source.root, source.classes, {e.image_id: e.image for e in source.val}, annotations, usable)


def _score(stream, evaluator, diagnostics: DetectionDiagnostics, classes: list[str], path: Path) -> dict[str, bytes]:
    """Feed every batch of prediction rows to the metrics and diagnostics, writing each
    detection to ``path`` (predictions.jsonl); returns the drawn images by image id."""
    drawn: dict[str, bytes] = {}
    with path.open("w") as out, contextlib.closing(stream):
        for batch in stream:
            ids = batch.column("image_id").to_pylist()
            preds, targets = prediction_records(batch)
            evaluator.update(preds, targets)
            diagnostics.update(preds, targets, ids)
            write_jsonl(out, ids, preds, classes)
            drawn.update({i: d for i, d in zip(ids, batch.column("drawn").to_pylist(), strict=True) if d})
    return drawn


def _write_metric_files(metrics: dict[str, Any], evaluator, drawn: dict[str, bytes], out_dir: Path) -> list[Path]:
    """metrics.json, the per-class tables, the PR curves and predictions_grid.jpg."""
    from detexp.evaluation.figures import image_grid, plot_pr_curves, write_per_class_table

    files = [out_dir / "metrics.json"]
    files[0].write_text(json.dumps(_json_safe(metrics), indent=2) + "\n")
    files += write_per_class_table(metrics, out_dir)
    files += plot_pr_curves(evaluator.pr_curves(), out_dir / "pr_curves")
    if drawn:
        grid = image_grid([Image.open(io.BytesIO(drawn[i])) for i in sorted(drawn)], cols=4)
        files.append(out_dir / "predictions_grid.jpg")
        grid.save(files[-1], quality=90)
    return files


def _write_worst_images(worst: list[ImageErrors], split: _Split, path: Path) -> list[Path]:
    """The images with the most errors, drawn as on predictions_grid.jpg and captioned with
    their counts; read from the dataset on the driver (a handful of images)."""
    from detexp.evaluation.figures import draw_detections, image_grid

    if not worst:
        return []
    drawn = []
    for image in worst:
        with Image.open(split.root.open(split.images[image.image_id])) as pixels:
            drawn.append(draw_detections(
                pixels, image.det_boxes, image.det_labels, image.det_scores, split.classes,
                gt_boxes=image.gt_boxes, gt_labels=image.gt_labels,
            ))
    cols, tile = 4, 320
    grid = caption_tiles(image_grid(drawn, cols, tile), [image.caption for image in worst], cols, tile)
    grid.save(path, quality=90)
    return [path]


def _apply_error_policy(on_error: str, problems, total: int, out_dir: Path) -> int:
    """Skip (and list) or refuse images with broken annotations; returns the usable count."""
    errors = [p for p in problems if p.severity == "error"]
    bad = {p.image_id for p in errors}
    if errors:
        write_problems_csv(errors, out_dir / "skipped.csv")
        if on_error == "raise":
            raise DetexpError(f"the dataset has errors (dataset.on_error=raise):\n{format_problems(errors)}")
        if len(bad) == total:
            raise DetexpError(
                f"none of the {total} images can be used (do the checkpoint's classes match the "
                f"dataset's?); first problem: {errors[0].file}: {errors[0].message}"
            )
        log.warning("skipping %d image(s) with broken annotations or images (listed in %s)", len(bad), out_dir / "skipped.csv")
    return total - len(bad)


def _json_safe(value: Any) -> Any:
    """NaN (a class without ground truth has no VOC AP) as null: JSON has no NaN."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _headline(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    return {f"{prefix}{k}": v for k, v in metrics.items() if isinstance(v, int | float)}


def evaluate(cfg: DictConfig, run_dir: str | Path, overrides: Sequence[str] | None = None) -> dict[str, Any]:
    """``detexp eval``: metrics of ``cfg.checkpoint`` on the dataset's val split, written to
    ``run_dir`` and logged to an MLflow run tagged ``detexp.train_run_id``. Returns the
    metrics plus ``run_id`` and ``run_dir``. ``overrides`` are the command line's (which
    model/dataset keys replace the checkpoint's)."""
    from detexp.commands.inference_run import open_inference_run

    ckpt, eff, state = prepare_inference(cfg, overrides)
    run_dir = Path(run_dir).resolve()
    tracker, run_id = open_inference_run("eval", eff, ckpt, run_dir, overrides)
    log.info("eval of %s (training run %s); MLflow run %s", ckpt.path, ckpt.train_run_id or "unknown", run_id)
    try:
        metrics, files, totals = evaluate_split(
            eff, state, run_dir, batch_size=eff.batch_size, score_threshold=eff.score_threshold,
            grid_images=eff.grid_images,
        )
        tracker.log_metrics(_headline(metrics, "eval/"), step=0)
        tracker.log_artifact(run_dir / "config.yaml")
        for path in files:
            tracker.log_artifact(path, "pr_curves" if path.parent.name == "pr_curves" else None)
        if (run_dir / "skipped.csv").exists():
            tracker.log_artifact(run_dir / "skipped.csv")
    except BaseException as exc:
        tracker.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    tracker.end("FINISHED")
    log.info(
        "map %.4f  map_50 %.4f  voc07_map %.4f  voc12_map %.4f; wrote %s",
        metrics["map"], metrics["map_50"], metrics["voc07_map"], metrics["voc12_map"], run_dir / "metrics.json",
    )
    log.info(
        "at score >= %.2f: %d of %d objects found, %d false detections; confusion matrix in %s",
        totals.score_threshold, totals.found, totals.objects, totals.false, run_dir / "confusion_matrix.png",
    )
    log.info("browse it with:  %s", tracker.ui_command())
    return {**metrics, "run_id": run_id, "run_dir": str(run_dir)}


def report_training(
    cfg: DictConfig, checkpoint: Any, run_dir: str | Path, tracker, predictions: Any = None, source: Any = None,
) -> dict[str, Any] | None:
    """The end of ``detexp train``: the same files as ``eval`` for the final checkpoint
    (a ``ray.train.Checkpoint`` or a file) on the val split, written to ``run_dir/eval``
    and logged as the training run's ``eval/`` artifacts. Ray must be running.
    ``predictions``: that checkpoint's validation rows, kept by the workers; the report is
    then made from them, with no new pass over the images, and ``source`` (the training's
    data) spares reading the val annotations again.

    Training has succeeded by then, so a failure here is logged, not raised; returns the
    metrics, or None when there was nothing to report."""
    if checkpoint is None:
        return None
    try:
        if predictions is not None:
            state = None
        elif hasattr(checkpoint, "as_directory"):
            with checkpoint.as_directory() as d:
                state = load_state(Path(d) / CHECKPOINT_FILE, cfg.model, len(cfg.dataset.classes) + 1)
        else:
            state = load_state(Path(checkpoint), cfg.model, len(cfg.dataset.classes) + 1)
        metrics, files, _ = evaluate_split(
            cfg, state, Path(run_dir) / "eval", batch_size=cfg.dataset.batch_size, predictions=predictions,
            source=source,
        )
        for path in files:
            tracker.log_artifact(path, "eval/pr_curves" if path.parent.name == "pr_curves" else "eval")
    except Exception as exc:  # noqa: BLE001 - the trained model and its run are fine
        log.warning("could not write the final evaluation report: %s: %s", type(exc).__name__, exc)
        return None
    return metrics
