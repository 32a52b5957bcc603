"""Typed configuration: one dataclass per Hydra group, registered in Hydra's ConfigStore.

The YAML files under ``conf/`` extend these schemas, so a misspelt key
(``optimizer.lrr=0.1``) or a wrong type (``schedule.lr_gamma=ten``) fails while Hydra
composes the config, in a second, naming the key - long before Ray starts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

log = logging.getLogger("detexp")


class Choice(str, Enum):
    """A config value chosen from a few names: Hydra refuses any other name while composing
    and lists the valid ones. Members are strings (``cfg.optimizer.name == "sgd"``) that print
    as their name; :func:`plain` turns a config holding them into plain Python."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


def _choice(name: str, *values: str) -> type[Choice]:
    # The functional form, for names that are Python keywords (raise).
    return Choice(name, [(v, v) for v in values], module=__name__, qualname=name)


OnError = _choice("OnError", "skip", "raise")  # an image whose annotation or file is broken

# A value computed from the data before Ray starts (model.anchor_sizes / anchor_ratios,
# schedule.epochs / lr_steps), then stored as numbers in the run's config.
AUTO = "auto"


def is_auto(value: Any) -> bool:
    return isinstance(value, str) and value == AUTO


class OptimizerName(Choice):
    sgd = "sgd"
    adamw = "adamw"


class ScheduleName(Choice):
    multistep = "multistep"
    cosine = "cosine"


class Mode(Choice):
    """Whether a larger or a smaller value of a metric is better."""

    max = "max"
    min = "min"


class Placement(Choice):
    """Ray's placement strategies for the workers' bundles."""

    PACK = "PACK"  # fill a node before the next
    SPREAD = "SPREAD"  # one worker per node first
    STRICT_PACK = "STRICT_PACK"
    STRICT_SPREAD = "STRICT_SPREAD"


class Amp(Choice):
    bf16 = "bf16"
    fp16 = "fp16"  # with a gradient scaler; GPU only


class Search(Choice):
    random = "random"
    grid = "grid"
    optuna = "optuna"  # Optuna's TPE through Ray Tune


class TuneScheduler(Choice):
    asha = "asha"
    fifo = "fifo"


class Augment(Choice):
    hflip = "hflip"
    ssd = "ssd"
    lsj = "lsj"
    multiscale = "multiscale"


class ExportFormat(Choice):
    torchscript = "torchscript"  # model.pt: torch.jit.script of the detector
    onnx = "onnx"  # model.onnx: the legacy (TorchScript-tracing) ONNX exporter, for onnxruntime


class DataFormat(str, Enum):
    voc = "voc"
    coco = "coco"


@dataclass
class SynthConfig:
    """Parameters of the generated ``shapes`` dataset (ignored for real data)."""

    num_train: int = 400
    num_val: int = 100
    image_size: int = 256
    seed: int = 0


@dataclass
class DatasetConfig:
    name: str = "shapes"
    format: DataFormat = DataFormat.voc  # voc: Pascal VOC XML files | coco: COCO JSON
    # The export's folder, or a URI pyarrow opens (s3://bucket/prefix, gs://...). Its layout
    # is found by looking (docs/datasets.md). null for `shapes`, generated under `cache_dir`.
    root: str | None = None
    # Class names; empty = read from the train split (the export's class list, else the
    # names its annotations use, sorted).
    classes: list[str] = field(default_factory=list)
    # Splits: ImageSets/Main/<split>.txt, a split folder (<root>/<split>/; `val` finds
    # `valid/` too) or COCO's <split> JSON. A layout without splits gets a seeded
    # `val_fraction` split instead.
    train_split: str | None = "train"
    val_split: str | None = "val"
    # Folders relative to the root, for names the layout search cannot guess (VOC: the
    # images and the XMLs; COCO: the images of the JSON files below).
    images_dir: str | None = None
    annotations_dir: str | None = None
    # COCO JSON files relative to the root, instead of finding them by split name.
    train_annotations: str | None = None
    val_annotations: str | None = None
    val_fraction: float = 0.2
    split_seed: int = 0
    batch_size: int = 2  # images per worker per step
    hflip_prob: float = 0.5
    # Training augmentation (detexp.data.augment): hflip | ssd (photometric distortion, zoom
    # out, IoU crop, flip) | lsj (scale jitter 0.1-2x, crop to min_size, flip) | multiscale
    # (shorter side 0.6-1x model.min_size, flip). All flip with hflip_prob.
    augment: Augment = Augment.hflip
    on_error: OnError = OnError.skip  # skip | raise: what to do with images whose annotation is broken
    cache_dir: str = "~/.cache/detexp"
    synth: SynthConfig = field(default_factory=SynthConfig)


@dataclass
class ModelConfig:
    name: str = "fasterrcnn_mobilenet_v3_large_320_fpn"
    # torchvision weight enum member names (e.g. DEFAULT, COCO_V1, IMAGENET1K_V1);
    # null = random init. Weights come from the TORCH_HOME cache or are downloaded.
    weights: str | None = None
    weights_backbone: str | None = None
    # A detexp checkpoint or a plain state dict to start from (fine-tune your own weights).
    checkpoint: str | None = None
    min_size: int = 320
    max_size: int = 320
    trainable_backbone_layers: int | None = None
    # RoIs sampled per image for the box head's loss (torchvision: 512). Fewer is much
    # cheaper on a CPU and enough for images with a handful of objects.
    box_batch_size_per_image: int = 512
    # Region proposals kept per image while training, before and after NMS (torchvision:
    # 2000 each); evaluation keeps the builder's own values.
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 2000
    # Sampling points per RoIAlign bin side in the box head (torchvision: 2, i.e. 2x2 per
    # bin; 0 = adaptive). 1 reads a quarter of the points: RoIAlign's backward is the
    # dearest part of a CPU training step.
    roi_sampling_ratio: int = 2
    # Features of the box head's two fully connected layers (torchvision: 1024; null = the
    # builder's). Another size gives a freshly initialised head, also over loaded weights.
    box_head_size: int | None = None
    # Largest fraction of the sampled RoIs that may be objects (torchvision: 0.25). With few
    # objects an image and few RoIs sampled, more positives teach the box head faster.
    box_positive_fraction: float = 0.25
    # MobileNet builders: the backbone stages (0-5) whose outputs the FPN reads, torchvision's
    # returned_layers (null = the builder's [4, 5]: both at stride 32). [3, 4] reads stride 16
    # and 32, so small objects cover more feature cells; the FPN then starts from fresh weights.
    returned_layers: list[int] | None = None
    # The RPN's anchors, in pixels of the resized image (null = the builder's). The MobileNet
    # builders put every size on each of their feature maps; the ResNet-50 FPN builders
    # put one size on each of their 5 levels (give 5). Ratios (height / width) apply on
    # every level. Other anchors than the builder's give the RPN fresh output layers.
    # `auto`: fitted to the train split's boxes before Ray starts (detexp.modeling.anchors),
    # printed, and stored as numbers in the run's config and checkpoints.
    anchor_sizes: Any = None  # list[int] | "auto" | None
    anchor_ratios: Any = None  # list[float] | "auto" | None


@dataclass
class OptimizerConfig:
    name: OptimizerName = OptimizerName.sgd
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    # The global batch (workers x dataset.batch_size) that `lr` belongs to; when set, the
    # lr used is scaled linearly to the run's global batch (null = lr as given).
    reference_batch: int | None = None


@dataclass
class ScheduleConfig:
    name: ScheduleName = ScheduleName.multistep
    # int, or `auto` (schedule=shapes_cpu): the fewest epochs, at least `min_epochs`, that show
    # the model at least `min_images` train images (epochs x the train split), computed
    # before Ray starts (detexp.engine.solver.resolve_auto_schedule) and stored as a number.
    epochs: Any = 26  # int | "auto"
    min_epochs: int = 1
    min_images: int = 0
    # Epochs after which the lr is multiplied by lr_gamma (multistep); `auto`: one step,
    # for the last quarter of the epochs (4 -> [3], 10 -> [8], 13 -> [10]).
    lr_steps: Any = field(default_factory=lambda: [16, 22])  # list[int] | "auto"
    lr_gamma: float = 0.1
    # Linear warm-up over the first iterations of epoch 0, from lr * warmup_factor to lr.
    warmup_iters: int = 250
    warmup_factor: float = 0.001
    grad_clip_norm: float | None = None
    # Best epoch: every run keeps model_best.pt, the epoch with the best `monitor` (a val/
    # metric; `monitor_mode` max or min). patience: stop after this many epochs without
    # improvement (null = train all epochs).
    monitor: str = "val/map_50"
    monitor_mode: Mode = Mode.max
    patience: int | None = None


@dataclass
class ScalingConfig:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1  # CPUs Ray reserves for each worker (0.5: two share a core)
    # torch threads of each worker (null = its cpus_per_worker). More than it reserves lets
    # its steps use a core the data pipeline leaves idle part of the time (conf/scaling/local.yaml).
    threads_per_worker: int | None = None
    max_failures: int = 0  # Ray Train FailureConfig: worker failures to recover from
    # Where Ray Train keeps checkpoints: null = <run dir>/checkpoints; on a cluster of
    # several nodes a shared filesystem path or a URI (s3://, gs://) every node reaches.
    storage_path: str | None = None
    # Elastic training: train on as few as min_workers (up to num_workers) when nodes are
    # lost, growing back when they return (null = always num_workers).
    min_workers: int | None = None
    placement_strategy: Placement = Placement.PACK


@dataclass
class TrackingConfig:
    # MLFLOW_TRACKING_URI when set (a Ray job's runtime env, say), else ./mlflow.db
    uri: str = "${oc.env:MLFLOW_TRACKING_URI,sqlite:///mlflow.db}"
    experiment: str = "detexp"
    run_name: str | None = None  # null = <model>-<dataset>-<yyyymmdd-hhmmss>
    # train: log the best (else final) model with mlflow.pytorch and register a new version
    # of this name; eval/predict then take checkpoint=models:/NAME/VERSION
    register_model: str | None = None
    system_metrics: bool = True  # system/* metrics (CPU, memory, disk, network, GPU) every 10 s


@dataclass
class RayConfig:
    address: str | None = None  # null = start a local Ray; "auto" or "ray://host:10001" to connect
    verbose: bool = False  # show Ray's own logs (workers, controller) for debugging


@dataclass
class TrainerConfig:
    """How each worker runs its steps; none of it changes what is learned on a CPU."""

    # Mixed precision for the training steps: bf16 | fp16 (with a gradient scaler; GPU only)
    # | null (fp32). Validation and inference stay in fp32, so the metrics do not move.
    amp: Amp | None = None
    cudnn_benchmark: bool = True  # GPU: let cuDNN pick the fastest kernels for the shapes seen
    # Batches of images of one orientation (wide or tall), as torchvision's references group
    # them, so less of each padded batch is padding. Square images are unaffected.
    group_aspect_ratio: bool = True
    prefetch_batches: int = 2  # batches Ray Data prepares ahead of the step
    # Keep the model's weights (and so its activations) channels-last (NHWC): oneDNN's CPU
    # convolutions, the backward pass above all, run faster that way (a default-size step
    # 1.14x faster side by side, benchmarks/RESULTS.md). Numerically the same model.
    channels_last: bool = True
    # Keep each worker's decoded val images in its memory after the first validation when
    # they fit in this many MiB on every worker (uint8: height x width x 3 bytes an image;
    # the generated shapes' 100 are 11 MiB, VOC07 test's 4952 about 2.7 GiB over all
    # workers): later epochs validate without Ray Data. 0 = decode them every epoch.
    keep_val_mib: float = 1024
    # A worker that makes no progress (no batch, step or report) for this many seconds fails,
    # saying what it waited for (the data pipeline and the CPUs free for it, the other ranks, the
    # checkpoint storage); it counts under scaling.max_failures. Workers that cannot be placed
    # are given as long before the run fails. null = wait for ever.
    stall_timeout_s: float | None = 300


@dataclass
class TrainConfig:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    # Initial weights, the train rows' order and each image's flip, every epoch: one seed,
    # the same losses (docs/configuration.md).
    seed: int = 0
    resume: bool = False
    checkpoints_to_keep: int = 2
    # At the end, evaluate the best model on the val split as `detexp eval` does (per-class
    # AP, PR curves, image grid in <run dir>/eval and MLflow); false saves its time in sweeps.
    eval_at_end: bool = True
    # During an epoch: a progress bar on a terminal; otherwise (CI, a log file) a line with
    # step, images/s, running loss and ETA at most every this many seconds.
    progress_every_s: float = 10.0


@dataclass
class TuneSettings:
    """`detexp tune`: a Ray Tune search over train keys (see detexp.commands.tune)."""

    # {dotted train key: {loguniform|uniform: [low, high]} or {choice|grid: [values...]}}.
    # null = around the recipe: optimizer.lr from lr/4 to lr*4, schedule.lr_steps among the
    # recipe's, [epochs-1], [epochs//2, epochs-1] (detexp.commands.search_space)
    search_space: Any = None
    num_samples: int = 4  # trials (with grid: repeats of every combination)
    search: Search = Search.random
    scheduler: TuneScheduler = TuneScheduler.asha
    grace_period: int = 1  # ASHA: epochs every trial trains before it may be stopped
    reduction_factor: int = 2  # ASHA: keep the best 1/reduction_factor at each rung
    metric: str = "val/map_50"
    mode: Mode = Mode.max
    max_concurrent_trials: int | None = None  # null = as many as the cluster fits


@dataclass
class TuneCommandConfig(TrainConfig):
    """`detexp tune`: the train config every trial starts from, plus the search."""

    tune: TuneSettings = field(default_factory=TuneSettings)


@dataclass
class EvalConfig:
    """`detexp eval checkpoint=PATH`: metrics of a trained checkpoint on a dataset split.

    ``model`` and ``dataset`` start from the checkpoint's own config; only the keys given
    on the command line replace them (see detexp.checkpoint.effective_config.effective_config)."""

    checkpoint: str | None = None  # a model_final.pt / checkpoint.pt, or a train run dir
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    batch_size: int = 4  # images per inference call on each actor
    # Boxes drawn on the image grid, and where the confusion matrix and worst images are
    # counted. The mAPs, the threshold curves and predictions.jsonl use every detection.
    score_threshold: float = 0.5
    grid_images: int = 8  # val images drawn into predictions_grid.jpg (0 = none)


@dataclass
class PredictConfig:
    """`detexp predict checkpoint=PATH input=DIR_OR_IMAGE`: draw and list detections."""

    checkpoint: str | None = None
    input: str | None = None  # an image file, or a folder searched recursively for images
    dataset: DatasetConfig = field(default_factory=DatasetConfig)  # only dataset.classes is used
    model: ModelConfig = field(default_factory=ModelConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    batch_size: int = 4
    score_threshold: float = 0.5  # detections below it are neither drawn nor written


@dataclass
class ExportSettings:
    """`detexp export`: the ONNX opset and the parity check against the PyTorch model."""

    # ONNX opset (format=onnx), 11 to 20: torchvision's NMS and RoIAlign export from 11,
    # the exporter writes up to 20; 17 is one that onnxruntime, TensorRT and OpenVINO all read.
    opset: int = 17
    # Val images both models predict (the first by id); 0 skips the check (not advised).
    parity_images: int = 32
    # Detections scored below this are left out of the comparison. Those at the model's
    # own cuts (box_score_thresh, the 100th detection), which a rounding of the score keeps
    # in one model and drops in the other, are left out anyway (detexp.evaluation.parity).
    parity_min_score: float = 0.05
    # The export fails when a matched box moves more than tolerance_px (in the image's
    # pixels) or a score more than tolerance_score, or when a detection scored above
    # parity_min_score is in one model and not in the other. Float rounding between two
    # runtimes moves boxes by ~1e-5 px and scores by ~1e-7; half a pixel is below any
    # annotation's precision and 0.01 of score moves no threshold a user sets, while a
    # wrong weight or a different resize moves boxes by pixels (docs/deploy.md).
    tolerance_px: float = 0.5
    tolerance_score: float = 0.01


@dataclass
class ExportConfig:
    """`detexp export checkpoint=PATH format=torchscript|onnx`: the detector eval and
    predict run, as one file another runtime loads, checked against the PyTorch model.

    ``model`` and ``dataset`` come from the checkpoint as for eval; the dataset's val split
    is what the parity check predicts."""

    checkpoint: str | None = None  # a train run dir, a model file or models:/NAME/VERSION
    format: ExportFormat = ExportFormat.torchscript
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    export: ExportSettings = field(default_factory=ExportSettings)


@dataclass
class ServeSettings:
    """`detexp serve`: the HTTP endpoint and its Ray Serve replicas."""

    host: str = "127.0.0.1"  # 0.0.0.0 to take requests from other machines
    port: int = 8000
    num_replicas: int = 1
    # Requests one replica runs through the model together (Ray Serve's @serve.batch), and
    # how long the first of them waits for the others.
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.01
    # GPUs a replica reserves (null = 1 with scaling.use_gpu, else 0); its CPUs and torch
    # threads are scaling.cpus_per_worker and scaling.threads_per_worker.
    gpus_per_replica: float | None = None
    max_bytes: int = 20 * 2**20  # a larger request body is refused (413)
    # A larger image is refused (413): its float tensor alone takes 12 bytes a pixel.
    max_pixels: int = 25_000_000


@dataclass
class ServeConfig:
    """`detexp serve checkpoint=PATH`: the detector eval and predict run, behind HTTP
    (POST an image, get its detections as JSON) on Ray Serve."""

    checkpoint: str | None = None
    dataset: DatasetConfig = field(default_factory=DatasetConfig)  # only dataset.classes is used
    model: ModelConfig = field(default_factory=ModelConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # for checkpoint=models:/...
    ray: RayConfig = field(default_factory=RayConfig)
    score_threshold: float = 0.5  # detections below it are not returned, as in predict
    serve: ServeSettings = field(default_factory=ServeSettings)


@dataclass
class SynthCommandConfig:
    """`detexp data synth`: write the shapes dataset wherever the user asks."""

    out: str = MISSING
    synth: SynthConfig = field(default_factory=SynthConfig)


@dataclass
class DataShowConfig(TrainConfig):
    """`detexp data show`: the train config, so that a train command line works unchanged
    (only ``dataset`` is read), plus the size of the grid of ground-truth boxes."""

    grid_images: int = 16  # images drawn into gt_grid.jpg (0 = none)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="synth_schema", node=SynthCommandConfig)
    cs.store(name="tune_schema", node=TuneCommandConfig)
    cs.store(name="eval_schema", node=EvalConfig)
    cs.store(name="predict_schema", node=PredictConfig)
    cs.store(name="data_show_schema", node=DataShowConfig)
    cs.store(name="export_schema", node=ExportConfig)
    cs.store(name="serve_schema", node=ServeConfig)


def plain(cfg: Any) -> Any:
    """``cfg`` as plain dicts, lists and strings (choices by their names), interpolations
    resolved: what MLflow params, checkpoints and Ray's workers take."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def fit_schema(schema: type, stored: Any, what: str | None = None) -> DictConfig:
    """``stored`` (a config of another detexp version, say) on ``schema``: keys the schema
    has and ``stored`` lacks get their defaults; keys it no longer has are dropped (and
    named in a warning when ``what`` says what the config is)."""
    values = plain(OmegaConf.create(stored)) if not isinstance(stored, dict) else stored
    known = schema.__dataclass_fields__
    dropped = sorted(k for k in values if k not in known)
    if dropped and what:
        log.warning("%s has keys this detexp does not know, ignored: %s", what, ", ".join(dropped))
    return OmegaConf.merge(OmegaConf.structured(schema), {k: v for k, v in values.items() if k in known})
