"""The inference detector as one file another runtime loads: TorchScript (``model.pt``)
or ONNX (``model.onnx``), and a loader that runs either one image at a time the way the
PyTorch model runs, for the parity check.

Both take what torchvision's detectors take: an RGB float image in [0, 1], channels first
(3 x H x W, any size); the model resizes it (``min_size`` / ``max_size``) and normalises it
(``image_mean`` / ``image_std``) itself and returns boxes in the input's pixels.

- TorchScript: ``torch.jit.script`` of the torchvision ``FasterRCNN``. A scripted detector
  always returns ``(losses, detections)``; in eval mode ``losses`` is empty and
  ``detections`` is one dict (``boxes``, ``labels``, ``scores``) per image of the list.
- ONNX: torch 2.14's default exporter (``dynamo=True``, through ``torch.export``) stops at
  torchvision's batched NMS, whose output size depends on the data ("Could not guard on
  data-dependent expression"); the TorchScript-based exporter (``dynamo=False``) exports
  the model as torchvision's own ONNX tests do, with the image's height and width dynamic.
  The graph takes one image (``image``: 3 x H x W) and returns ``boxes`` (N x 4), ``labels``
  (N, int64) and ``scores`` (N).

Two parts of the model are swapped for the export, each computing what it replaces:

- detexp's CPU RoIAlign (:mod:`detexp.modeling.roi_align`) is neither scriptable nor
  traceable into ONNX: torchvision's ``MultiScaleRoIAlign`` with the same feature maps,
  output size and sampling ratio takes its place.
- torchvision's resize, scripted or traced, computes the scale in float32 where eager
  PyTorch computes it in float64, so an image whose long side meets ``max_size`` comes out
  a pixel short (122 x 107 px at max_size 128: 127 px wide instead of 128) and every box
  moves by up to a pixel. :class:`ExportTransform` computes the size as eager PyTorch does.

The parity check compares the export with the model as eval runs it, so it shows that the
swaps change nothing.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign as TorchvisionMultiScaleRoIAlign

from detexp.errors import MissingDependencyError
from detexp.modeling.export_transform import ExportTransform

ONNX_INPUT = "image"
ONNX_OUTPUTS = ("boxes", "labels", "scores")
# The ONNX extra, and what installing it says (pyproject.toml [project.optional-dependencies]).
ONNX_MODULES = ("onnx", "onnxruntime")
INSTALL_EXPORT = "pip install 'detexp[export]'"

Detections = dict[str, torch.Tensor]


def check_onnx_installed() -> None:
    """Fail in one line, naming the extra, when onnx or onnxruntime is missing."""
    import importlib.util

    missing = [m for m in ONNX_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependencyError(f"format=onnx needs {' and '.join(missing)}: {INSTALL_EXPORT}")


def exportable(model: FasterRCNN) -> FasterRCNN:
    """``model`` (an :func:`detexp.modeling.detector.inference_model`) made scriptable and
    traceable, in place: torchvision's RoIAlign module in the box head, :class:`ExportTransform`,
    weights in the default memory format, no gradients."""
    pool = model.roi_heads.box_roi_pool
    if type(pool) is not TorchvisionMultiScaleRoIAlign:
        model.roi_heads.box_roi_pool = TorchvisionMultiScaleRoIAlign(
            featmap_names=list(pool.featmap_names), output_size=pool.output_size, sampling_ratio=pool.sampling_ratio,
        )
    t = model.transform
    if t.fixed_size is None and type(t) is GeneralizedRCNNTransform:  # the builders' (fixed_size: SSD's)
        model.transform = ExportTransform(t.min_size, t.max_size, t.image_mean, t.image_std, size_divisible=t.size_divisible)
    model.to(memory_format=torch.contiguous_format).eval()
    model.requires_grad_(False)  # outputs without autograd history, for whoever calls the export
    return model


@contextlib.contextmanager
def _quiet_exporters() -> Iterator[None]:
    # torch.jit's deprecation notice, the tracer's warnings about torchvision's shape
    # arithmetic (which torchvision writes to be traced) and the legacy exporter's notice:
    # none is something the user can act on; the parity check is what says the export works.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def to_torchscript(model: FasterRCNN, path: Path) -> Path:
    """Script ``model`` (see :func:`exportable`) and save it at ``path``."""
    with _quiet_exporters():
        torch.jit.script(exportable(model)).save(str(path))
    return path


def to_onnx(model: FasterRCNN, path: Path, sample: torch.Tensor, opset: int) -> Path:
    """Export ``model`` (see :func:`exportable`) to ONNX at ``path``, traced on ``sample``
    (one 3 x H x W image) with the image's height and width and the detections' count dynamic."""
    dynamic = {ONNX_INPUT: {1: "height", 2: "width"}, **{name: {0: "detections"} for name in ONNX_OUTPUTS}}
    with _quiet_exporters(), torch.no_grad():
        torch.onnx.export(
            exportable(model), ([sample],), str(path), dynamo=False, opset_version=opset,
            input_names=[ONNX_INPUT], output_names=list(ONNX_OUTPUTS), dynamic_axes=dynamic,
        )
    return path


def load_exported(path: Path, fmt: str, threads: int | None = None) -> Callable[[torch.Tensor], Detections]:
    """A function of one image (3 x H x W float in [0, 1]) to its detections, running the
    exported file at ``path`` (``fmt`` torchscript or onnx) as its users would: TorchScript
    with torch, ONNX with onnxruntime on the CPU."""
    if fmt == "torchscript":
        with _quiet_exporters():
            scripted = torch.jit.load(str(path), map_location="cpu")
        scripted.eval()

        def run_torchscript(image: torch.Tensor) -> Detections:
            # torchvision's scripted forward warns at every call that it returns (losses,
            # detections): read that way here, so not the user's concern
            with torch.inference_mode(), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="RCNN always returns a")
                _, detections = scripted([image])
            return detections[0]

        return run_torchscript
    check_onnx_installed()
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run_onnx(image: torch.Tensor) -> Detections:
        outputs = session.run(list(ONNX_OUTPUTS), {ONNX_INPUT: image.numpy()})
        return {name: torch.from_numpy(value) for name, value in zip(ONNX_OUTPUTS, outputs, strict=True)}

    return run_onnx


def model_card(model: FasterRCNN) -> dict:
    """What a user of the export must know of ``model``: the resize and normalisation it
    does itself, and the thresholds its detections have passed."""
    transform, heads = model.transform, model.roi_heads
    return {
        "min_size": int(transform.min_size[0]),
        "max_size": int(transform.max_size),
        "image_mean": [float(v) for v in transform.image_mean],
        "image_std": [float(v) for v in transform.image_std],
        "box_score_thresh": float(heads.score_thresh),
        "box_nms_thresh": float(heads.nms_thresh),
        "detections_per_img": int(heads.detections_per_img),
    }
