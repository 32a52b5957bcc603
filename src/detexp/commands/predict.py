"""``detexp predict``: draw and list a checkpoint's detections on a folder of images."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from detexp.checkpoint.effective_config import prepare_inference
from detexp.distributed.batch_inference import (
    BATCHES_PER_BLOCK,
    decode_files,
    prediction_records,
    run_predictor,
    write_jsonl,
)
from detexp.errors import ConfigError

log = logging.getLogger("detexp")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def list_images(input_path: str | None) -> tuple[Path, list[str]]:
    """The folder and the image files (relative to it, sorted) that ``input`` names."""
    if not input_path:
        raise ConfigError("input is not set: pass input=DIR or input=IMAGE")
    path = Path(input_path).expanduser().resolve()
    if path.is_file():
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise ConfigError(f"input={input_path}: not an image file ({', '.join(IMAGE_SUFFIXES)})")
        return path.parent, [path.name]
    if not path.is_dir():
        raise ConfigError(f"input={input_path}: no such file or folder")
    files = sorted(
        str(p.relative_to(path)) for p in path.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith(".")
    )
    if not files:
        raise ConfigError(f"input={input_path}: a folder with no images ({', '.join(IMAGE_SUFFIXES)})")
    return path, files


def predict(cfg: DictConfig, run_dir: str | Path, overrides: Sequence[str] | None = None) -> dict[str, Any]:
    """``detexp predict``: detections (score >= ``score_threshold``) of ``cfg.checkpoint``
    on the images of ``cfg.input``, drawn into ``run_dir/annotated/`` (same relative paths
    and formats as the inputs) and listed in ``run_dir/predictions.jsonl`` (``image_id`` =
    the file's path relative to the input folder, without its suffix)."""
    import ray

    from detexp.commands.inference_run import open_inference_run

    ckpt, eff, state = prepare_inference(cfg, overrides)
    folder, files = list_images(cfg.input)
    run_dir = Path(run_dir).resolve()
    tracker, run_id = open_inference_run("predict", eff, ckpt, run_dir, overrides)
    annotated = run_dir / "annotated"
    annotated.mkdir(parents=True, exist_ok=True)
    classes = list(eff.dataset.classes)
    log.info("predicting %d image(s) from %s with %s", len(files), folder, ckpt.path)

    items = [{"image_id": f, "path": str(folder / f)} for f in files]
    blocks = math.ceil(len(items) / (eff.batch_size * BATCHES_PER_BLOCK))
    images = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
        decode_files, batch_format="pyarrow", batch_size=eff.batch_size
    )
    try:
        stream = run_predictor(
            images, eff.model, classes, state, eff.scaling, batch_size=eff.batch_size,
            min_score=eff.score_threshold, draw=True, draw_threshold=eff.score_threshold,
            total=len(files), ray_log=None if eff.ray.verbose else run_dir / "ray.log",
        )
        written, detections, failed = _write_outputs(stream, classes, run_dir / "predictions.jsonl", annotated)
        if failed:
            log.warning("could not read %d image(s):\n  %s", len(failed), "\n  ".join(failed[:20]))
        tracker.log_metrics({"predict/images": written, "predict/detections": detections, "predict/unreadable": len(failed)}, step=0)
        tracker.log_artifact(run_dir / "predictions.jsonl")
    except BaseException as exc:
        tracker.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    tracker.end("FINISHED")
    log.info("wrote %d annotated image(s) to %s and %d detection(s) to %s", written, annotated, detections, run_dir / "predictions.jsonl")
    return {
        "images": written, "detections": detections, "unreadable": len(failed), "run_id": run_id,
        "run_dir": str(run_dir), "annotated": str(annotated), "predictions": str(run_dir / "predictions.jsonl"),
    }


def _write_outputs(stream, classes: list[str], predictions: Path, annotated: Path) -> tuple[int, int, list[str]]:
    """Each batch's detections into ``predictions`` (jsonl) and its drawn images under
    ``annotated``; returns the images written, the detections and the unreadable images."""
    written, detections, failed = 0, 0, []
    with predictions.open("w") as out, contextlib.closing(stream):
        for batch in stream:
            preds, _ = prediction_records(batch)
            names = batch.column("image_id").to_pylist()
            ids = [str(Path(f).with_suffix("")) for f in names]
            detections += write_jsonl(out, ids, preds, classes)
            columns = (names, batch.column("drawn").to_pylist(), batch.column("error").to_pylist())
            for name, drawn, error in zip(*columns, strict=True):
                if error:
                    failed.append(f"{name}: {error}")
                    continue
                target = annotated / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(drawn)
                written += 1
    return written, detections, failed
