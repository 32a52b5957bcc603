"""``detexp export``: the detector eval and predict run, written as one file another runtime
loads (TorchScript ``model.pt`` or ONNX ``model.onnx``), described in ``model.json``, and
checked against the PyTorch model on val images (``parity.json``) before it is called done.

The checkpoint and its effective ``model`` / ``dataset`` config are resolved as for eval
(:func:`detexp.checkpoint.effective_config.prepare_inference`). The export runs in this
process, without Ray; the files are logged to an MLflow run tagged with the training run.
"""

from __future__ import annotations

import copy
import json
import logging
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from PIL import Image

from detexp.checkpoint.effective_config import prepare_inference
from detexp.errors import ConfigError, ParityError
from detexp.evaluation.parity import Parity, compare
from detexp.modeling.detector import inference_model
from detexp.modeling.export import (
    ONNX_INPUT,
    ONNX_OUTPUTS,
    check_onnx_installed,
    load_exported,
    model_card,
    to_onnx,
    to_torchscript,
)

log = logging.getLogger("detexp")

FILES = {"torchscript": "model.pt", "onnx": "model.onnx"}
CARD_FILE = "model.json"
PARITY_FILE = "parity.json"


def export(cfg: DictConfig, run_dir: str | Path, overrides: Sequence[str] | None = None) -> dict[str, Any]:
    """``detexp export``: ``run_dir/model.pt`` (``format=torchscript``) or ``model.onnx``
    (``format=onnx``), ``model.json`` and ``parity.json``, logged to an MLflow run tagged
    ``detexp.train_run_id``. Raises :class:`ParityError` when the exported model predicts
    the val images differently from the PyTorch model beyond ``export.tolerance_*``.
    Returns the files, the parity figures and the MLflow run id."""
    from detexp.commands.inference_run import open_inference_run

    fmt = str(cfg.format)
    if fmt == "onnx":
        check_onnx_installed()
    _check_settings(cfg.export)
    ckpt, eff, state = prepare_inference(cfg, overrides)
    classes = list(eff.dataset.classes)
    images = parity_images(eff.dataset, eff.export.parity_images)
    run_dir = Path(run_dir).resolve()
    tracker, run_id = open_inference_run("export", eff, ckpt, run_dir, overrides, start_ray=False)
    log.info("export of %s (training run %s) to %s; MLflow run %s", ckpt.path, ckpt.train_run_id or "unknown", fmt, run_id)
    try:
        reference = inference_model(eff.model, len(classes) + 1, state)  # what eval and predict run
        path = run_dir / FILES[fmt]
        exported = copy.deepcopy(reference)  # made exportable in place
        if fmt == "onnx":
            sample = images[0][1] if images else torch.rand(
                3, eff.model.min_size, eff.model.min_size, generator=torch.Generator().manual_seed(0)
            )
            to_onnx(exported, path, sample, eff.export.opset)
        else:
            to_torchscript(exported, path)
        card = write_model_card(run_dir / CARD_FILE, reference, fmt, path, eff, classes, cfg.checkpoint, ckpt)
        tracker.log_artifact(path)
        tracker.log_artifact(card)
        tracker.log_artifact(run_dir / "config.yaml")
        try:
            parity = check_parity(path, fmt, reference, images, eff.export, run_dir / PARITY_FILE)
        finally:
            if (run_dir / PARITY_FILE).exists():
                tracker.log_artifact(run_dir / PARITY_FILE)
        tracker.log_metrics({f"export/{k}": v for k, v in parity.as_dict().items()}, step=0)
    except BaseException as exc:
        tracker.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    tracker.end("FINISHED")
    log.info("wrote %s, %s and %s", path, run_dir / CARD_FILE, run_dir / PARITY_FILE)
    return {
        "format": fmt, "model": str(path), "card": str(card), "parity": parity.as_dict(),
        "run_id": run_id, "run_dir": str(run_dir),
    }


def _check_settings(settings: Any) -> None:
    if settings.parity_images < 0:
        raise ConfigError(f"export.parity_images={settings.parity_images} must be 0 (no check) or more")
    if settings.tolerance_px < 0 or settings.tolerance_score < 0:
        raise ConfigError(
            f"export.tolerance_px={settings.tolerance_px}, export.tolerance_score={settings.tolerance_score}: "
            "tolerances are 0 or more"
        )
    if not 11 <= settings.opset <= 20:
        raise ConfigError(
            f"export.opset={settings.opset} must be 11 to 20: torchvision's NMS and RoIAlign export from opset 11, "
            "and the exporter writes up to 20"
        )


def parity_images(dataset: Any, count: int) -> list[tuple[str, torch.Tensor]]:
    """The first ``count`` images (by id) of the dataset's val split, read as eval reads the
    split, decoded as the detector takes them: RGB float in [0, 1], 3 x H x W."""
    from detexp.data.source import resolve

    if count == 0:
        return []
    if not dataset.val_split:
        raise ConfigError("dataset.val_split is null: the parity check predicts val images (or export.parity_images=0)")
    source = resolve(dataset, read_train=False)
    entries = sorted((e for e in source.val if not e.error), key=lambda e: e.image_id)
    images, unreadable = [], []
    for entry in entries:
        if len(images) == count:
            break
        try:
            with Image.open(source.root.open(entry.image)) as img:
                pixels = torch.from_numpy(_rgb(img)).permute(2, 0, 1).float().div_(255.0)
        except Exception as exc:  # noqa: BLE001 - one broken image does not stop the check
            unreadable.append(f"{entry.image}: {type(exc).__name__}")
            continue
        images.append((entry.image_id, pixels))
    if unreadable:
        log.warning("parity check: skipped %d unreadable image(s): %s", len(unreadable), ", ".join(unreadable[:5]))
    if not images:
        raise ConfigError(
            f"dataset.val_split={dataset.val_split!r} in {source.root} has no readable images for the parity check "
            "(or export.parity_images=0)"
        )
    return images


def _rgb(img: Image.Image):
    import numpy as np

    return np.array(img.convert("RGB"))  # a copy: writable, as torch.from_numpy wants


def check_parity(
    path: Path, fmt: str, reference: torch.nn.Module, images: list[tuple[str, torch.Tensor]],
    settings: Any, out: Path,
) -> Parity:
    """Predict ``images`` with the exported file at ``path`` and with ``reference`` (the
    PyTorch model), compare them (:func:`detexp.evaluation.parity.compare`), write the
    figures and the tolerances to ``out`` (parity.json) and print them in one line; raise
    :class:`ParityError` when they exceed ``settings.tolerance_px`` / ``tolerance_score``
    or a detection is in one model only."""
    if not images:
        out.write_text(json.dumps({"checked": False, "reason": "export.parity_images=0"}, indent=2) + "\n")
        log.warning("parity check skipped (export.parity_images=0): nothing says %s predicts as the checkpoint does", path.name)
        return Parity(0, 0, 0.0, 0.0, 0, 0, float(settings.parity_min_score))
    run = load_exported(path, fmt)
    ours, theirs = [], []
    with torch.inference_mode():
        for _, image in images:
            ours.append(reference([image])[0])
            theirs.append(run(image))
    heads = reference.roi_heads
    parity = compare(
        ours, theirs, min_score=settings.parity_min_score, score_thresh=heads.score_thresh,
        per_image=heads.detections_per_img, score_tolerance=settings.tolerance_score,
    )
    passed = (
        parity.max_box_px <= settings.tolerance_px and parity.max_score <= settings.tolerance_score and parity.missing == 0
    )
    figures = (
        f"{parity.compared} detection(s) of {parity.images} val image(s) (score >= {parity.min_score:g}): "
        f"boxes within {parity.max_box_px:.4g} px (tolerance {settings.tolerance_px:g}), scores within "
        f"{parity.max_score:.3g} (tolerance {settings.tolerance_score:g}), {parity.only_reference} only in "
        f"PyTorch, {parity.only_exported} only in the export"
    )
    out.write_text(json.dumps({
        "checked": True, "passed": passed, "format": fmt, "file": path.name,
        **parity.as_dict(), "image_ids": [image_id for image_id, _ in images],
        "tolerance_px": settings.tolerance_px, "tolerance_score": settings.tolerance_score,
    }, indent=2) + "\n")
    if not passed:
        raise ParityError(f"parity check failed: {path.name} against the PyTorch model: {figures}; see {out}")
    log.info("parity: %s", figures)
    if parity.compared == 0:
        log.warning("parity check: no detection scored above export.parity_min_score=%g on these images, so "
                    "nothing was compared (a model that finds nothing here, or export.parity_min_score too high)",
                    parity.min_score)
    return parity


def write_model_card(
    out: Path, model: torch.nn.Module, fmt: str, path: Path, eff: Any, classes: list[str], source: Any, ckpt: Any,
) -> Path:
    """model.json: what a user needs to run the export without detexp."""
    import torchvision

    card = {
        "format": fmt,
        "file": path.name,
        "classes": classes,
        "labels": "label i is classes[i - 1]; 0 is the background and never returned",
        "input": {
            "layout": "CHW", "dtype": "float32", "channels": "RGB", "range": [0.0, 1.0], "size": "any",
            "resize_and_normalise": "done by the model (transform below); boxes come back in the input's pixels",
            **({"name": ONNX_INPUT, "images_per_call": 1} if fmt == "onnx" else {"images_per_call": "a list of any length"}),
        },
        "outputs": (
            {"names": list(ONNX_OUTPUTS), "boxes": "N x 4 float32, xmin ymin xmax ymax", "labels": "N int64", "scores": "N float32"}
            if fmt == "onnx" else
            {"returns": "(losses, detections): losses is empty in eval mode; detections one dict (boxes, labels, scores) per image"}
        ),
        "transform": model_card(model),
        "model": eff.model.name,
        "opset": int(eff.export.opset) if fmt == "onnx" else None,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "checkpoint": str(source),
        "checkpoint_file": str(ckpt.path),
        "train_run_id": ckpt.train_run_id,
    }
    if fmt == "onnx":
        import onnx
        import onnxruntime

        card.update(onnx=onnx.__version__, onnxruntime=onnxruntime.__version__)
    out.write_text(json.dumps(card, indent=2) + "\n")
    return out

