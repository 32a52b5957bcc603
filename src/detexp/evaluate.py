"""Batch inference on Ray Data: ``detexp eval``, ``detexp predict`` and the report at the
end of ``detexp train``.

The pipeline is the current replacement for Ray AIR's ``BatchPredictor``: Ray Data tasks
read and decode the images, a pool of :class:`Predictor` actors
(``map_batches(Predictor, compute=ActorPoolStrategy(size=scaling.num_workers))``, one GPU
each with ``scaling.use_gpu``) runs the detector, and every actor returns one small row per
image: its detections and ground truth as flat Arrow ``list<float32>`` columns (never ragged
tensors, ray#31779) plus a drawn image for the few images someone will look at.

The driver streams those rows with ``iter_batches``: it feeds :class:`DetectionEvaluator`
and appends to ``predictions.jsonl`` as they arrive, so its memory holds the per-image
detection records (a few KB per image) and never an image. ``benchmarks/eval_memory.py``
measures that over 5,000 images.

Which model and data: a training checkpoint stores its resolved config and class names.
``eval`` and ``predict`` start from the checkpoint's ``model`` and ``dataset`` config and
replace only the keys given on the command line (``dataset.val_split=test``, or a whole
group: ``dataset=voc dataset.root=...``); class names always come from the checkpoint
unless ``dataset.classes`` is given. So ``eval checkpoint=PATH`` alone evaluates the split
the model was validated on during training.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from detexp.commands import RUN_ID_FILE  # a training run directory's MLflow run id
from detexp.config import DatasetConfig, ModelConfig
from detexp.data.voc import (
    SPLITS_DIR,
    DatasetError,
    format_problems,
    list_annotation_ids,
    read_split_ids,
    seeded_split,
    write_problems_csv,
)
from detexp.errors import ConfigError, DetexpError
from detexp.worker import CHECKPOINT_FILE, CHECKPOINT_FORMAT  # what training writes

log = logging.getLogger("detexp")

# File names a run directory of `train` may hold; eval accepts the directory itself.
CHECKPOINT_NAMES = ("model_final.pt", "checkpoint.pt")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
PROGRESS_EVERY_S = 30.0
# Images per Ray Data block, in inference batches. A block is one predictor task, and its
# results reach the driver when the task ends: small blocks keep every actor of the pool
# busy and the results streaming. (The annotation reader makes blocks of hundreds of
# images: with 5,000 images, 6 tasks of ~830 images each, results in bulk, 6 actors at most.)
BATCHES_PER_BLOCK = 4

PREDICTION_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("det_boxes", pa.list_(pa.float32())),  # flat xmin, ymin, xmax, ymax, ...
        ("det_scores", pa.list_(pa.float32())),
        ("det_labels", pa.list_(pa.int64())),
        ("gt_boxes", pa.list_(pa.float32())),
        ("gt_labels", pa.list_(pa.int64())),
        ("gt_difficult", pa.list_(pa.bool_())),
        ("drawn", pa.binary()),  # the image with its boxes drawn, encoded; empty if not asked for
        ("error", pa.string()),  # why an image could not be read (predict); null when fine
    ]
)

# -- checkpoints ---------------------------------------------------------------------------


@dataclass
class CheckpointInfo:
    """What eval needs from a training checkpoint, without its tensors."""

    path: Path
    config: dict[str, Any]
    classes: list[str]
    train_run_id: str | None


def find_checkpoint(path: str | None, key: str = "checkpoint") -> Path:
    """The checkpoint file ``path`` names: a file, or a train run directory holding
    ``model_final.pt`` (or a Ray checkpoint directory holding ``checkpoint.pt``)."""
    if not path:
        raise ConfigError(f"{key} is not set: pass {key}=PATH to a model_final.pt written by `detexp train`")
    p = Path(path).expanduser()
    if p.is_dir():
        found = next((p / n for n in CHECKPOINT_NAMES if (p / n).is_file()), None)
        if found is None:
            raise ConfigError(f"{key}={path}: a folder without {' or '.join(CHECKPOINT_NAMES)}")
        return found.resolve()
    if not p.is_file():
        raise ConfigError(f"{key}={path}: checkpoint not found")
    return p.resolve()


def read_checkpoint(path: Path) -> CheckpointInfo:
    """Config, class names and training run of a detexp checkpoint; refuses anything else.

    Loaded with ``weights_only=True`` and memory-mapped, so the tensors are not read here.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - old (non-zip) files cannot be mapped; try plainly
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not a checkpoint"
            raise ConfigError(f"checkpoint={path}: not a PyTorch checkpoint ({type(exc).__name__})") from None
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT or "model" not in obj:
        raise ConfigError(
            f"checkpoint={path}: not a detexp checkpoint (a model_final.pt or checkpoint.pt "
            "written by `detexp train`, which also stores the model config and class names)"
        )
    config = obj.get("config") or {}
    classes = [str(c) for c in obj.get("classes") or config.get("dataset", {}).get("classes", [])]
    if not classes:
        raise ConfigError(f"checkpoint={path}: stores no class names")
    run_id = obj.get("mlflow_run_id") or _run_id_near(path)
    return CheckpointInfo(path, config, classes, run_id)


def _run_id_near(path: Path) -> str | None:
    # A train run dir holds mlflow_run_id beside model_final.pt; Ray's own checkpoints sit
    # three levels below it (checkpoints/<name>/checkpoint_<time>/checkpoint.pt).
    for parent in list(path.parents)[:4]:
        id_file = parent / RUN_ID_FILE
        if id_file.is_file():
            return id_file.read_text().strip() or None
    return None


def _given(overrides: Sequence[str], group: str) -> tuple[bool, list[str]]:
    """Whether ``group=option`` was given, and the ``group.key`` paths set on the command line."""
    chosen, keys = False, []
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0].split("@", 1)[0].strip()
        if key == group:
            chosen = True
        elif key.startswith(group + "."):
            keys.append(key[len(group) + 1 :])
    return chosen, keys


def _section(cfg: DictConfig, stored: dict[str, Any], group: str, schema: type, overrides: Sequence[str]):
    """``cfg[group]`` if the group was chosen on the command line, else the checkpoint's
    ``group`` config with the command line's ``group.*`` keys applied."""
    chosen, keys = _given(overrides, group)
    if chosen or group not in stored:
        return cfg[group]
    try:
        base = fit_schema(schema, stored[group], f"the checkpoint's {group} config")
    except Exception as exc:  # noqa: BLE001 - a value of the wrong type
        raise ConfigError(f"the checkpoint's {group} config does not fit this detexp: {exc}") from None
    for key in keys:
        OmegaConf.update(base, key, OmegaConf.select(cfg[group], key), merge=False)
    return base


def fit_schema(schema: type, stored: Any, what: str | None = None) -> DictConfig:
    """``stored`` (a config of another detexp version, say) on ``schema``: keys the schema
    has and ``stored`` lacks get their defaults; keys it no longer has are dropped (and
    named in a warning when ``what`` says what the config is)."""
    values = OmegaConf.to_container(OmegaConf.create(stored), resolve=True) if not isinstance(stored, dict) else stored
    known = schema.__dataclass_fields__
    dropped = sorted(k for k in values if k not in known)
    if dropped and what:
        log.warning("%s has keys this detexp does not know, ignored: %s", what, ", ".join(dropped))
    return OmegaConf.merge(OmegaConf.structured(schema), {k: v for k, v in values.items() if k in known})


def effective_config(cfg: DictConfig, ckpt: CheckpointInfo, overrides: Sequence[str]) -> DictConfig:
    """``cfg`` with ``model`` and ``dataset`` taken from the checkpoint except for the keys
    given in ``overrides``, and the checkpoint's class names unless ``dataset.classes`` was given."""
    out = cfg.copy()
    model = _section(cfg, ckpt.config, "model", ModelConfig, overrides)
    dataset = _section(cfg, ckpt.config, "dataset", DatasetConfig, overrides)
    if "classes" not in _given(overrides, "dataset")[1]:
        dataset = dataset.copy()
        dataset.classes = list(ckpt.classes)
    with_sections = OmegaConf.to_container(out, resolve=True)
    with_sections["model"] = OmegaConf.to_container(model, resolve=True)
    with_sections["dataset"] = OmegaConf.to_container(dataset, resolve=True)
    # Eval loads the checkpoint's weights itself; a starting point must not be loaded first.
    with_sections["model"]["checkpoint"] = None
    return OmegaConf.create(with_sections)


def load_state(path: Path, model_cfg: Any, num_classes: int) -> dict[str, torch.Tensor]:
    """The checkpoint's model weights, checked against ``model_cfg`` and the class count
    on the driver, so that a mismatch is one line rather than a failed actor pool."""
    from detexp.models import load_model_state

    state = load_model_state(path, num_classes)
    load_weights(build_inference_model(model_cfg, num_classes), state, path)
    return state


def build_inference_model(model_cfg: Any, num_classes: int) -> torch.nn.Module:
    """The architecture training used for ``model_cfg``, with random weights: the
    checkpoint supplies all of them, so torchvision's pretrained weights are never read
    (or downloaded) here."""
    from detexp.models import build_detector

    # On the schema: a checkpoint of an older detexp lacks keys that build_detector reads.
    cfg = fit_schema(ModelConfig, model_cfg)
    model = build_detector(OmegaConf.merge(cfg, {"weights": None, "weights_backbone": None, "checkpoint": None}), num_classes)
    _norms_as_trained(model, cfg)
    return model


def _norms_as_trained(model: torch.nn.Module, cfg: Any) -> None:
    """Given pretrained weights, torchvision's v1 builders make the backbone's norms
    FrozenBatchNorm2d, with eps 0 for fasterrcnn_resnet50_fpn's COCO_V1 weights; built
    without weights they are BatchNorm2d (eps 1e-5). Redo what the builder did, so that
    the numbers are those of the model that was trained."""
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights
    from torchvision.ops.misc import FrozenBatchNorm2d

    from detexp.models import BUILDERS, _weight

    if cfg.name == "fasterrcnn_resnet50_fpn_v2" or (cfg.weights is None and cfg.weights_backbone is None):
        return
    weights = _weight(BUILDERS[cfg.name][1], cfg.weights, "model.weights")
    eps = 0.0 if weights == FasterRCNN_ResNet50_FPN_Weights.COCO_V1 else 1e-5
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, torch.nn.BatchNorm2d):
                setattr(parent, name, FrozenBatchNorm2d(child.num_features, eps=eps))


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Any = "checkpoint") -> None:
    # A plain state dict (model.checkpoint) may come from a BatchNorm2d model and carry
    # num_batches_tracked counters, or lack them: neither matters in eval mode.
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes that differ
        detail = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), str(exc))
        raise ConfigError(f"checkpoint={path} does not fit this model config: {detail}; is model.name right?") from None
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    unexpected = [k for k in unexpected if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise ConfigError(
            f"checkpoint={path} does not fit this model config: {len(missing)} missing and "
            f"{len(unexpected)} unexpected weights (e.g. {example}); is model.name right?"
        )


# -- the Ray Data side ---------------------------------------------------------------------


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
    ):
        import ray

        threads = os.environ.get("OMP_NUM_THREADS")
        if threads:  # Ray sets it to the actor's CPU share; make torch honour it
            torch.set_num_threads(int(threads))
        if isinstance(state, list):  # [ObjectRef]: kept wrapped so that Ray passes the ref
            state = state[0]
        if isinstance(state, ray.ObjectRef):
            state = ray.get(state)
        self.classes = list(classes)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = build_inference_model(model_cfg, len(self.classes) + 1)
        load_weights(self.model, state)
        self.model.to(self.device).eval()
        self.min_score = min_score
        self.draw = draw if isinstance(draw, bool) else set(draw)
        self.draw_threshold = draw_threshold

    def __call__(self, batch: pa.Table) -> pa.Table:
        from detexp.data.pipeline import batch_to_tensors
        from detexp.engine import predict

        rows = batch.to_pydict()
        n = len(rows["image_id"])
        errors = rows.get("error") or [None] * n
        usable = [i for i in range(n) if not errors[i]]
        outputs: dict[int, dict[str, torch.Tensor]] = {}
        if usable:
            keys = ("image", "image_shape", "boxes", "labels", "difficult", "image_id")
            images, _ = batch_to_tensors({k: [rows[k][i] for i in usable] for k in keys}, self.device)
            for i, out in zip(usable, predict(self.model, images), strict=True):
                keep = out["scores"] >= self.min_score
                outputs[i] = {k: v[keep] for k, v in out.items()}
        columns: dict[str, list] = {name: [] for name in PREDICTION_SCHEMA.names}
        for i in range(n):
            shape = rows["image_shape"][i] or [3, 0, 0]
            out = outputs.get(i)
            columns["image_id"].append(rows["image_id"][i])
            columns["height"].append(int(shape[1]))
            columns["width"].append(int(shape[2]))
            columns["det_boxes"].append(out["boxes"].reshape(-1).tolist() if out else [])
            columns["det_scores"].append(out["scores"].tolist() if out else [])
            columns["det_labels"].append(out["labels"].tolist() if out else [])
            columns["gt_boxes"].append(rows["boxes"][i])
            columns["gt_labels"].append(rows["labels"][i])
            columns["gt_difficult"].append(rows["difficult"][i])
            wanted = self.draw is True or (self.draw and rows["image_id"][i] in self.draw)
            columns["drawn"].append(self._draw(rows, i, out) if out is not None and wanted else b"")
            columns["error"].append(errors[i] or None)
        return pa.Table.from_pydict(columns, schema=PREDICTION_SCHEMA)

    def _draw(self, rows: dict[str, list], i: int, out: dict[str, torch.Tensor]) -> bytes:
        from detexp.reports import draw_detections

        c, h, w = rows["image_shape"][i]
        pixels = np.frombuffer(rows["image"][i], dtype=np.uint8).reshape(c, h, w).transpose(1, 2, 0)
        shown = out["scores"] >= self.draw_threshold
        image = draw_detections(
            pixels, out["boxes"][shown], out["labels"][shown], out["scores"][shown], self.classes,
            gt_boxes=np.asarray(rows["boxes"][i], dtype=np.float32).reshape(-1, 4),
            gt_labels=rows["labels"][i],
        )
        return encode_image(image, rows["image_id"][i])


def encode_image(image: Image.Image, name: str) -> bytes:
    """``image`` in the format of ``name``'s suffix (JPEG when it has none we know)."""
    fmt = Image.registered_extensions().get(Path(name).suffix.lower(), "JPEG")
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


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
    ``ray_log``: where Ray's noise goes instead of the console (see :func:`_ray_noise_to`)."""
    import ray

    state_ref = ray.put(state)
    predictions = dataset.map_batches(
        Predictor,
        fn_constructor_kwargs={
            "model_cfg": OmegaConf.to_container(OmegaConf.create(model_cfg), resolve=True),
            "classes": list(classes),
            "state": [state_ref],
            "use_gpu": bool(scaling.use_gpu),
            "min_score": float(min_score),
            "draw": draw,
            "draw_threshold": float(draw_threshold),
        },
        compute=ray.data.ActorPoolStrategy(size=scaling.num_workers),
        num_cpus=scaling.cpus_per_worker,
        num_gpus=1 if scaling.use_gpu else 0,
        batch_size=batch_size,
        batch_format="pyarrow",
    )
    done, started, last_log = 0, time.perf_counter(), time.perf_counter()
    with _ray_noise_to(ray_log):
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
def _ray_noise_to(path: Path | None):
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


# -- eval ------------------------------------------------------------------------------------


def split_ids(dataset_cfg: Any, root: Path) -> list[str]:
    """The ids ``dataset.val_split`` names; the same rule as training's validation split
    (a seeded ``val_fraction`` of the annotations for a folder without ImageSets/Main)."""
    if (root / SPLITS_DIR).is_dir() and dataset_cfg.train_split:
        if not dataset_cfg.val_split:
            raise ConfigError("dataset.val_split is null: name the split to evaluate (dataset.val_split=val)")
        ids = read_split_ids(root, dataset_cfg.val_split)
    else:
        _, ids = seeded_split(list_annotation_ids(root), dataset_cfg.val_fraction, dataset_cfg.split_seed)
    if not ids:
        raise ConfigError(f"dataset.val_split={dataset_cfg.val_split!r} in {root} lists no images")
    return ids


def evaluate_split(
    cfg: Any,
    state: dict[str, torch.Tensor],
    out_dir: Path,
    batch_size: int,
    score_threshold: float = 0.5,
    grid_images: int = 8,
) -> tuple[dict[str, Any], list[Path]]:
    """Predict ``cfg.dataset``'s val split with ``cfg.model`` and ``state`` on the running
    Ray, and write ``metrics.json``, ``predictions.jsonl``, ``per_class_ap.csv/.md``,
    ``pr_curves/pr_<class>.png`` and ``predictions_grid.jpg`` into ``out_dir``.
    Returns the metrics (``DetectionEvaluator.compute()``) and the files written."""
    from detexp.data.annotations import problems_of, read_annotations
    from detexp.data.pipeline import decode_images
    from detexp.data.source import dataset_root
    from detexp.metrics import DetectionEvaluator
    from detexp.reports import image_grid, plot_pr_curves, write_per_class_table

    classes = list(cfg.dataset.classes)
    if not classes:
        raise DatasetError("dataset.classes is empty: list the class names (background is implicit)")
    root = dataset_root(cfg.dataset)
    ids = split_ids(cfg.dataset, root)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    annotations = read_annotations(root, ids, classes).materialize()
    usable = _apply_error_policy(cfg.dataset.on_error, problems_of(annotations), len(ids), out_dir)
    annotations = annotations.repartition(target_num_rows_per_block=batch_size * BATCHES_PER_BLOCK)
    log.info("evaluating %d images of %s (%s) with %d actor(s)", usable, root, cfg.dataset.val_split, cfg.scaling.num_workers)

    evaluator = DetectionEvaluator(classes)
    shown = sorted(ids)[: max(grid_images, 0)]
    drawn: dict[str, bytes] = {}
    predictions_path = out_dir / "predictions.jsonl"
    started = time.perf_counter()
    stream = run_predictor(
        decode_images(annotations, root, 0.0), cfg.model, classes, state, cfg.scaling,
        batch_size, draw=shown, draw_threshold=score_threshold, total=usable,
        ray_log=None if cfg.ray.verbose else out_dir / "ray.log",
    )
    with predictions_path.open("w") as out, contextlib.closing(stream):
        for batch in stream:
            ids = batch.column("image_id").to_pylist()
            preds, targets = _records(batch)
            evaluator.update(preds, targets)
            _write_jsonl(out, ids, preds, classes)
            drawn.update({i: d for i, d in zip(ids, batch.column("drawn").to_pylist(), strict=True) if d})
    seconds = time.perf_counter() - started
    log.info("predicted %d images in %.1fs (%.1f images/s)", len(evaluator), seconds, len(evaluator) / max(seconds, 1e-9))

    # faster_coco_eval logs its own summary table at INFO; ours follows in one line.
    logging.getLogger("faster_coco_eval").setLevel(logging.WARNING)
    metrics = evaluator.compute()
    files = [predictions_path, out_dir / "metrics.json"]
    files[1].write_text(json.dumps(_json_safe(metrics), indent=2) + "\n")
    files += write_per_class_table(metrics, out_dir)
    files += plot_pr_curves(evaluator.pr_curves(), out_dir / "pr_curves")
    if drawn:
        grid = image_grid([Image.open(io.BytesIO(drawn[i])) for i in sorted(drawn)], cols=4)
        files.append(out_dir / "predictions_grid.jpg")
        grid.save(files[-1], quality=90)
    return metrics, files


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


def _records(batch: pa.Table) -> tuple[list[dict], list[dict]]:
    """Per-image numpy arrays (views into one array per column and batch, straight from
    Arrow: no Python float objects) in the form DetectionEvaluator.update takes."""
    # 0.01 px is far below any annotation's precision; the same rounded boxes go to the
    # metrics and to predictions.jsonl, so the file reproduces the numbers exactly.
    det_boxes = _per_row(batch, "det_boxes", np.float64, 4, decimals=2)
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


def _write_jsonl(out, image_ids: Sequence[str], preds: Sequence[dict], classes: Sequence[str]) -> int:
    count = 0
    for image_id, pred in zip(image_ids, preds, strict=True):
        for box, score, label in zip(pred["boxes"].tolist(), pred["scores"].tolist(), pred["labels"].tolist(), strict=True):
            out.write(json.dumps({"image_id": image_id, "label": classes[label - 1], "box": box, "score": score}) + "\n")
            count += 1
    return count


def _json_safe(value: Any) -> Any:
    """NaN (a class without ground truth has no VOC AP) as null: JSON has no NaN."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _headline(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    return {f"{prefix}{k}": v for k, v in metrics.items() if isinstance(v, int | float)}


def _prepare(cfg: DictConfig, overrides: Sequence[str] | None):
    """Checks shared by eval and predict, all before Ray or MLflow start: the checkpoint,
    the effective config and weights that fit it."""
    from detexp.models import check_model_config

    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size={cfg.batch_size} must be at least 1")
    if cfg.scaling.num_workers < 1 or cfg.scaling.cpus_per_worker < 1:
        raise ConfigError("scaling.num_workers and scaling.cpus_per_worker must be at least 1")
    ckpt = read_checkpoint(find_checkpoint(cfg.checkpoint))
    eff = effective_config(cfg, ckpt, list(overrides or []))
    check_model_config(eff.model)
    state = load_state(ckpt.path, eff.model, len(eff.dataset.classes) + 1)
    return ckpt, eff, state


def _start_run(tracker, cfg: DictConfig, ckpt: CheckpointInfo, command: str, overrides: Sequence[str] | None) -> str:
    from detexp.tracking import default_tags

    tags = {**default_tags(command, list(overrides or [])), "detexp.checkpoint": str(ckpt.path)}
    if ckpt.train_run_id:
        tags["detexp.train_run_id"] = ckpt.train_run_id
    return tracker.start(cfg.tracking.run_name, OmegaConf.to_container(cfg, resolve=True), tags)


def evaluate(cfg: DictConfig, run_dir: str | Path, overrides: Sequence[str] | None = None) -> dict[str, Any]:
    """``detexp eval``: metrics of ``cfg.checkpoint`` on the dataset's val split, written to
    ``run_dir`` and logged to an MLflow run tagged ``detexp.train_run_id``. Returns the
    metrics plus ``run_id`` and ``run_dir``. ``overrides`` are the command line's (which
    model/dataset keys replace the checkpoint's)."""
    from detexp import launch
    from detexp.tracking import Tracker

    ckpt, eff, state = _prepare(cfg, overrides)
    if eff.dataset.on_error not in ("skip", "raise"):
        raise ConfigError(f"dataset.on_error={eff.dataset.on_error!r}: choose one of skip, raise")
    tracker = Tracker(eff.tracking.uri, eff.tracking.experiment)  # refuses a dead server early
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(eff))
    launch.init_ray(eff.ray.address, eff.ray.verbose)
    launch.check_resources(eff.scaling)
    run_id = _start_run(tracker, eff, ckpt, "eval", overrides)
    log.info("eval of %s (training run %s); MLflow run %s", ckpt.path, ckpt.train_run_id or "unknown", run_id)
    try:
        metrics, files = evaluate_split(eff, state, run_dir, eff.batch_size, eff.score_threshold, eff.grid_images)
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
    log.info("browse it with:  %s", tracker.ui_command())
    return {**metrics, "run_id": run_id, "run_dir": str(run_dir)}


def report_training(cfg: DictConfig, checkpoint: Any, run_dir: str | Path, tracker) -> dict[str, Any] | None:
    """The end of ``detexp train``: the same files as ``eval`` for the final checkpoint
    (a ``ray.train.Checkpoint`` or a file) on the val split, written to ``run_dir/eval``
    and logged as the training run's ``eval/`` artifacts. Ray must be running.

    Training has succeeded by then, so a failure here is logged, not raised; returns the
    metrics, or None when there was nothing to report."""
    if checkpoint is None:
        return None
    try:
        if hasattr(checkpoint, "as_directory"):
            with checkpoint.as_directory() as d:
                state = load_state(Path(d) / CHECKPOINT_FILE, cfg.model, len(cfg.dataset.classes) + 1)
        else:
            state = load_state(Path(checkpoint), cfg.model, len(cfg.dataset.classes) + 1)
        metrics, files = evaluate_split(cfg, state, Path(run_dir) / "eval", cfg.dataset.batch_size)
        for path in files:
            tracker.log_artifact(path, "eval/pr_curves" if path.parent.name == "pr_curves" else "eval")
    except Exception as exc:  # noqa: BLE001 - the trained model and its run are fine
        log.warning("could not write the final evaluation report: %s: %s", type(exc).__name__, exc)
        return None
    return metrics


# -- predict ---------------------------------------------------------------------------------


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

    from detexp import launch
    from detexp.tracking import Tracker

    ckpt, eff, state = _prepare(cfg, overrides)
    folder, files = list_images(cfg.input)
    tracker = Tracker(eff.tracking.uri, eff.tracking.experiment)
    run_dir = Path(run_dir).resolve()
    annotated = run_dir / "annotated"
    annotated.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(eff))
    launch.init_ray(eff.ray.address, eff.ray.verbose)
    launch.check_resources(eff.scaling)
    run_id = _start_run(tracker, eff, ckpt, "predict", overrides)
    classes = list(eff.dataset.classes)
    log.info("predicting %d image(s) from %s with %s", len(files), folder, ckpt.path)

    items = [{"image_id": f, "path": str(folder / f)} for f in files]
    blocks = math.ceil(len(items) / (eff.batch_size * BATCHES_PER_BLOCK))
    images = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
        decode_files, batch_format="pyarrow", batch_size=eff.batch_size
    )
    written, detections, failed = 0, 0, []
    try:
        stream = run_predictor(
            images, eff.model, classes, state, eff.scaling, eff.batch_size,
            min_score=eff.score_threshold, draw=True, draw_threshold=eff.score_threshold,
            total=len(files), ray_log=None if eff.ray.verbose else run_dir / "ray.log",
        )
        with (run_dir / "predictions.jsonl").open("w") as out, contextlib.closing(stream):
            for batch in stream:
                preds, _ = _records(batch)
                names = batch.column("image_id").to_pylist()
                ids = [str(Path(f).with_suffix("")) for f in names]
                detections += _write_jsonl(out, ids, preds, classes)
                columns = (names, batch.column("drawn").to_pylist(), batch.column("error").to_pylist())
                for name, drawn, error in zip(*columns, strict=True):
                    if error:
                        failed.append(f"{name}: {error}")
                        continue
                    target = annotated / name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(drawn)
                    written += 1
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
