"""Detector construction over torchvision's Faster R-CNN builders.

``build_detector(cfg, num_classes)`` maps ``model.name`` to a builder and
``model.weights`` / ``model.weights_backbone`` to torchvision's weight enums. With COCO
weights the builder must keep its 91-class head, so the box predictor is replaced by a
fresh one for ``num_classes`` afterwards: the usual fine-tuning recipe.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torchvision.models import MobileNet_V3_Large_Weights, ResNet50_Weights
from torchvision.models import detection as tvd
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

from detexp.config import AUTO, is_auto
from detexp.errors import ConfigError
from detexp.modeling.roi_align import MultiScaleRoIAlign
from detexp.modeling.spec import MOBILENET_STAGES, RESNET_FPN_BUILDERS
from detexp.modeling.spec import check_model_config as check_model_spec
from detexp.modeling.weights import load_model_state

# name -> (builder, detector weight enum, backbone weight enum), for each of spec.MODEL_NAMES
BUILDERS: dict[str, tuple[Callable[..., tvd.FasterRCNN], Any, Any]] = {
    "fasterrcnn_resnet50_fpn": (
        tvd.fasterrcnn_resnet50_fpn, tvd.FasterRCNN_ResNet50_FPN_Weights, ResNet50_Weights,
    ),
    "fasterrcnn_resnet50_fpn_v2": (
        tvd.fasterrcnn_resnet50_fpn_v2, tvd.FasterRCNN_ResNet50_FPN_V2_Weights, ResNet50_Weights,
    ),
    "fasterrcnn_mobilenet_v3_large_fpn": (
        tvd.fasterrcnn_mobilenet_v3_large_fpn,
        tvd.FasterRCNN_MobileNet_V3_Large_FPN_Weights,
        MobileNet_V3_Large_Weights,
    ),
    "fasterrcnn_mobilenet_v3_large_320_fpn": (
        tvd.fasterrcnn_mobilenet_v3_large_320_fpn,
        tvd.FasterRCNN_MobileNet_V3_Large_320_FPN_Weights,
        MobileNet_V3_Large_Weights,
    ),
}


def _weight(enum: Any, name: str | None, key: str) -> Any:
    if name is None:
        return None
    member = name.rsplit(".", 1)[-1]  # accept "COCO_V1" and "FasterRCNN_..._Weights.COCO_V1"
    try:
        return enum[member]
    except KeyError:
        choices = ", ".join(["DEFAULT", *enum.__members__])
        raise ConfigError(f"{key}={name!r} is not a weight of {enum.__name__}; choose one of: {choices}") from None


def check_model_config(cfg: Any) -> None:
    """Fail on an unknown model name or weight, or a model key out of range, before any
    work starts: :func:`detexp.modeling.spec.check_model_config` and the weight names."""
    check_model_spec(cfg)
    check_weight_names(cfg)


def check_weight_names(cfg: Any) -> None:
    """``model.weights`` and ``model.weights_backbone`` name members of the builder's
    torchvision weight enums (``DEFAULT``, ``COCO_V1``, ...)."""
    _, weights_enum, backbone_enum = BUILDERS[cfg.name]
    _weight(weights_enum, cfg.weights, "model.weights")
    _weight(backbone_enum, cfg.weights_backbone, "model.weights_backbone")


def _set_returned_layers(model: tvd.FasterRCNN, cfg: Any) -> None:
    """A MobileNet backbone whose FPN reads ``model.returned_layers``: the builder's backbone
    weights (and which of them train) are kept, and the FPN is fresh (``_set_anchors`` gives
    the anchor generator one level per feature map)."""
    from torchvision.models.detection.backbone_utils import mobilenet_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d

    if cfg.returned_layers is None:
        return
    body = model.backbone.body
    frozen_norms = any(isinstance(m, FrozenBatchNorm2d) for m in body.modules())
    backbone = mobilenet_backbone(
        backbone_name="mobilenet_v3_large", weights=None, fpn=True,
        norm_layer=FrozenBatchNorm2d if frozen_norms else torch.nn.BatchNorm2d,
        trainable_layers=MOBILENET_STAGES, returned_layers=list(cfg.returned_layers),
    )
    # The new body is the builder's blocks up to the last returned stage.
    wanted = backbone.body.state_dict().keys()
    backbone.body.load_state_dict({k: v for k, v in body.state_dict().items() if k in wanted})
    trains = dict(body.named_parameters())
    for name, parameter in backbone.body.named_parameters():
        parameter.requires_grad_(trains[name].requires_grad)
    model.backbone = backbone


def _set_anchors(model: tvd.FasterRCNN, cfg: Any) -> None:
    """An anchor generator with one level per feature map (``model.returned_layers`` and the
    FPN's max-pooled level, else the builder's levels) and ``model.anchor_sizes`` /
    ``model.anchor_ratios`` where given, else the builder's. The RPN head keeps its shared
    convolution and gets fresh output layers when the number of anchors per location changes."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.rpn import RPNHead

    if cfg.anchor_sizes is None and cfg.anchor_ratios is None and cfg.returned_layers is None:
        return
    if is_auto(cfg.anchor_sizes) or is_auto(cfg.anchor_ratios):  # train fits them first (commands.train.find_data)
        raise ConfigError(
            f"model.anchor_sizes={cfg.anchor_sizes}, model.anchor_ratios={cfg.anchor_ratios}: {AUTO} is fitted to the "
            "train split by `train` and `tune`, which store the numbers in the checkpoint; give numbers here"
        )
    old = model.rpn.anchor_generator
    levels = len(old.sizes) if cfg.returned_layers is None else len(cfg.returned_layers) + 1
    if cfg.name in RESNET_FPN_BUILDERS:  # one size per level (returned_layers is refused)
        sizes = old.sizes if cfg.anchor_sizes is None else tuple((int(size),) for size in cfg.anchor_sizes)
    else:  # every size on every level
        sizes = (old.sizes[0] if cfg.anchor_sizes is None else tuple(int(size) for size in cfg.anchor_sizes),) * levels
    # every builder has the same ratios on every level
    ratios = (old.aspect_ratios[0] if cfg.anchor_ratios is None else tuple(float(r) for r in cfg.anchor_ratios),) * levels
    model.rpn.anchor_generator = AnchorGenerator(sizes, ratios)
    per_location = model.rpn.anchor_generator.num_anchors_per_location()[0]
    head = model.rpn.head
    if per_location != head.cls_logits.out_channels:
        fresh = RPNHead(head.cls_logits.in_channels, per_location)
        fresh.conv = head.conv
        model.rpn.head = fresh


def weight_files(cfg: Any) -> list[Path]:
    """The torchvision weight files ``cfg`` needs, each in the torch hub cache
    (``$TORCH_HOME/hub/checkpoints``): downloaded there now when missing, or refused with
    the file's name and where to put it. Runs on the driver, before Ray starts, so a
    machine without internet fails in seconds rather than inside a worker."""
    check_model_config(cfg)
    _, weights_enum, backbone_enum = BUILDERS[cfg.name]
    wanted = [
        (key, name, _weight(enum, name, key))
        for key, name, enum in (("model.weights", cfg.weights, weights_enum),
                                ("model.weights_backbone", cfg.weights_backbone, backbone_enum))
    ]
    files = []
    for key, name, weights in wanted:
        if weights is None or (key == "model.weights_backbone" and cfg.weights is not None):
            continue  # the detector's weights include its backbone's
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        if not path.is_file():
            try:
                torch.hub.load_state_dict_from_url(weights.url, progress=False, map_location="cpu")
            except Exception as exc:  # noqa: BLE001 - no network, a proxy, a full disk
                reason = getattr(exc, "reason", exc)
                raise ConfigError(
                    f"{key}={name}: {path.name} is not in the torch hub cache and cannot be downloaded "
                    f"({reason}); download {weights.url} on a machine with internet access and put it at "
                    f"{path} (or set TORCH_HOME to a folder whose hub/checkpoints holds it)"
                ) from None
        files.append(path)
    return files


def build_detector(cfg: Any, num_classes: int) -> tvd.FasterRCNN:
    """A Faster R-CNN for ``num_classes`` (background included) as ``cfg`` describes.

    Weights are read from the TORCH_HOME cache (torchvision downloads them when missing,
    which needs network access). ``cfg.checkpoint`` then overrides them with a saved
    detexp checkpoint or plain state dict of the same architecture; one with another class
    count gives every weight but the box predictor's, which stays fresh for ``num_classes``.
    """
    check_model_config(cfg)
    builder, weights_enum, backbone_enum = BUILDERS[cfg.name]
    weights = _weight(weights_enum, cfg.weights, "model.weights")
    kwargs: dict[str, Any] = {
        "weights": weights,
        "weights_backbone": _weight(backbone_enum, cfg.weights_backbone, "model.weights_backbone"),
        "min_size": cfg.min_size,
        "max_size": cfg.max_size,
        "box_batch_size_per_image": cfg.box_batch_size_per_image,
        "rpn_pre_nms_top_n_train": cfg.rpn_pre_nms_top_n_train,
        "rpn_post_nms_top_n_train": cfg.rpn_post_nms_top_n_train,
        "box_positive_fraction": cfg.box_positive_fraction,
    }
    if cfg.trainable_backbone_layers is not None:
        kwargs["trainable_backbone_layers"] = cfg.trainable_backbone_layers
    # FasterRCNN's default pooler (model.roi_sampling_ratio; 2 is the builders' own), with a
    # CPU path about 10x faster than torchvision's CPU kernel, same results (detexp.modeling.roi_align).
    kwargs["box_roi_pool"] = MultiScaleRoIAlign(
        featmap_names=["0", "1", "2", "3"], output_size=7, sampling_ratio=cfg.roi_sampling_ratio
    )
    if weights is None:
        kwargs["num_classes"] = num_classes
    model = builder(progress=False, **kwargs)
    if weights is not None and len(weights.meta["categories"]) != num_classes:
        in_features = model.roi_heads.box_predictor.cls_score.in_features
        model.roi_heads.box_predictor = FastRCNNPredictor(in_features, num_classes)
    if cfg.box_head_size is not None:
        _resize_box_head(model, cfg, num_classes)
    _set_returned_layers(model, cfg)
    _set_anchors(model, cfg)
    if cfg.checkpoint is not None:
        state = load_model_state(cfg.checkpoint)
        if state[PREDICTOR_WEIGHT].shape[0] != num_classes:  # another run's classes: a fresh predictor
            state = {k: v for k, v in state.items() if not k.startswith(PREDICTOR)}
            model.load_state_dict(state, strict=False)
        else:
            model.load_state_dict(state)
    return model


PREDICTOR = "roi_heads.box_predictor."
PREDICTOR_WEIGHT = PREDICTOR + "cls_score.weight"


def checkpoint_classes(path: str | Path) -> int:
    """Classes (background included) the box predictor of a checkpoint file predicts."""
    return int(load_model_state(path)[PREDICTOR_WEIGHT].shape[0])


def _resize_box_head(model: tvd.FasterRCNN, cfg: Any, num_classes: int) -> None:
    """A fresh two-layer box head of ``model.box_head_size`` features (and a predictor to
    match) in place of the builder's: its first layer, pooled RoI features (256 x 7 x 7) to
    1024, is the largest matrix of the model (12.8M weights, four times the MobileNet
    backbone) and multiplies every RoI of every step."""
    head = model.roi_heads.box_head
    if head.fc7.out_features != cfg.box_head_size:
        model.roi_heads.box_head = TwoMLPHead(head.fc6.in_features, cfg.box_head_size)
        model.roi_heads.box_predictor = FastRCNNPredictor(cfg.box_head_size, num_classes)


def build_inference_model(model_cfg: Any, num_classes: int) -> torch.nn.Module:
    """The architecture training used for ``model_cfg``, with random weights: the
    checkpoint supplies all of them, so torchvision's pretrained weights are never read
    (or downloaded) here."""
    from omegaconf import OmegaConf

    from detexp.config import ModelConfig, fit_schema

    # On the schema: a checkpoint of an older detexp lacks keys that build_detector reads.
    cfg = fit_schema(ModelConfig, model_cfg)
    model = build_detector(OmegaConf.merge(cfg, {"weights": None, "weights_backbone": None, "checkpoint": None}), num_classes)
    _norms_as_trained(model, cfg)
    return model


def inference_model(
    model_cfg: Any, num_classes: int, state: dict[str, torch.Tensor], device: torch.device | str = "cpu"
) -> tvd.FasterRCNN:
    """The detector eval, predict, export and serve run: :func:`build_inference_model` with
    ``state`` loaded, in eval mode on ``device``, its BatchNorms folded into the convolutions
    and, on a CPU, channels-last (oneDNN's convolutions are faster on NHWC)."""
    from detexp.modeling.batchnorm import fold_batch_norms
    from detexp.modeling.weights import load_weights

    device = torch.device(device)
    model = build_inference_model(model_cfg, num_classes)
    load_weights(model, state)
    fold_batch_norms(model.to(device).eval())
    if device.type == "cpu":
        model.to(memory_format=torch.channels_last)
    return model


def _norms_as_trained(model: torch.nn.Module, cfg: Any) -> None:
    """Given pretrained weights, torchvision's v1 builders make the backbone's norms
    FrozenBatchNorm2d, with eps 0 for fasterrcnn_resnet50_fpn's COCO_V1 weights; built
    without weights they are BatchNorm2d (eps 1e-5). Redo what the builder did, so that
    the numbers are those of the model that was trained."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    if cfg.name == "fasterrcnn_resnet50_fpn_v2" or (cfg.weights is None and cfg.weights_backbone is None):
        return
    weights = _weight(BUILDERS[cfg.name][1], cfg.weights, "model.weights")
    eps = 0.0 if weights == tvd.FasterRCNN_ResNet50_FPN_Weights.COCO_V1 else 1e-5
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, torch.nn.BatchNorm2d):
                setattr(parent, name, FrozenBatchNorm2d(child.num_features, eps=eps))
