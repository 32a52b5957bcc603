"""What a ``model`` config may say, checked without torch.

The driver of ``train`` and ``tune`` (and a Tune trial's actor) checks the model keys and
fits anchors before Ray starts, but never builds a model: importing torch and torchvision
there costs seconds of CPU that the first training step waits for on a small machine
(benchmarks/RESULTS.md, "Start-up and sweeps"). :mod:`detexp.modeling.detector` builds the
models these names stand for and adds the check of torchvision's weight names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from detexp.config import AUTO, is_auto
from detexp.errors import ConfigError

# torchvision's Faster R-CNN builders (detexp.modeling.detector.BUILDERS builds them)
MODEL_NAMES = (
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_resnet50_fpn_v2",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
)

# Builders whose box head is not torchvision's TwoMLPHead (model.box_head_size cannot apply).
CONV_BOX_HEADS = ("fasterrcnn_resnet50_fpn_v2",)

# The ResNet-50 FPN builders: their FPN reads strides 4 to 32 and their anchor generator
# has one size per level (5 levels). The others (the MobileNet ones) put all their anchor
# sizes on each of their feature maps.
RESNET_FPN_BUILDERS = ("fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2")
RESNET_FPN_LEVELS = 5
MOBILENET_STAGES = 6  # torchvision's MobileNetV3-Large extractor: stages 0 (stem) to 5 (last conv)


def names_pretrained_weights(cfg: Any) -> bool:
    """``model.weights`` or ``model.weights_backbone`` is set: torchvision's weight files
    (and their enums, which tell the valid names) are needed."""
    return cfg.weights is not None or cfg.weights_backbone is not None


def check_model_config(cfg: Any) -> None:
    """Fail on an unknown model name or a model key out of range before any work starts.
    The weight names are checked by :func:`detexp.modeling.detector.check_weight_names`."""
    if cfg.name not in MODEL_NAMES:
        raise ConfigError(f"model.name={cfg.name!r} is unknown; choose one of: {', '.join(MODEL_NAMES)}")
    if cfg.roi_sampling_ratio < 0:
        raise ConfigError(
            f"model.roi_sampling_ratio={cfg.roi_sampling_ratio} must be 0 (adaptive) or more "
            "(points per RoIAlign bin side; torchvision uses 2)"
        )
    if cfg.box_head_size is not None and cfg.box_head_size < 1:
        raise ConfigError(f"model.box_head_size={cfg.box_head_size} must be at least 1 (torchvision: 1024)")
    if cfg.box_head_size is not None and cfg.name in CONV_BOX_HEADS:
        raise ConfigError(
            f"model.box_head_size={cfg.box_head_size}: {cfg.name}'s box head has convolutions, "
            "not the two fully connected layers it sizes; leave it null"
        )
    if not 0.0 < cfg.box_positive_fraction <= 1.0:
        raise ConfigError(
            f"model.box_positive_fraction={cfg.box_positive_fraction} must be above 0 and at most 1 "
            "(the largest share of sampled RoIs that are objects; torchvision: 0.25)"
        )
    _check_anchors(cfg)
    _check_returned_layers(cfg)
    if cfg.checkpoint is not None and not Path(cfg.checkpoint).expanduser().is_file():
        raise ConfigError(f"model.checkpoint={cfg.checkpoint!r}: no such file")


def _check_returned_layers(cfg: Any) -> None:
    layers = cfg.returned_layers
    if layers is None:
        return
    if cfg.name in RESNET_FPN_BUILDERS:
        raise ConfigError(
            f"model.returned_layers={list(layers)}: only for the MobileNet builders ({cfg.name} "
            "already reads strides 4 to 32); leave it null"
        )
    if len(layers) == 0 or list(layers) != sorted(set(layers)) or not 0 <= layers[0] <= layers[-1] < MOBILENET_STAGES:
        raise ConfigError(
            f"model.returned_layers={list(layers)} must be distinct stages in increasing order, "
            f"each 0 to {MOBILENET_STAGES - 1} (the builder's: [4, 5])"
        )


def _check_anchors(cfg: Any) -> None:
    for key, values in (("model.anchor_sizes", cfg.anchor_sizes), ("model.anchor_ratios", cfg.anchor_ratios)):
        if values is None or is_auto(values):
            continue
        if isinstance(values, str) or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values) \
                or len(values) == 0 or min(values) <= 0:
            raise ConfigError(
                f"{key}={values if isinstance(values, str) else list(values)} must be a non-empty list of positive "
                f"numbers, {AUTO} (fitted to the train split's boxes) or null (the builder's)"
            )
    sizes = cfg.anchor_sizes
    if sizes is not None and not is_auto(sizes) and cfg.name in RESNET_FPN_BUILDERS and len(sizes) != RESNET_FPN_LEVELS:
        raise ConfigError(
            f"model.anchor_sizes={list(sizes)}: {cfg.name} has one anchor size per FPN level, "
            f"so it needs {RESNET_FPN_LEVELS} sizes, smallest first (the builder's: [32, 64, 128, 256, 512])"
        )
