"""torchvision's detection transform with the resized size computed as eager PyTorch computes
it, also when scripted or traced (:mod:`detexp.modeling.export`).

No ``from __future__ import annotations`` here: TorchScript compiles this class and cannot
resolve its annotations when they are strings.
"""

import math

import torch
import torchvision
from torch import Tensor
from torchvision.models.detection.transform import GeneralizedRCNNTransform


class ExportTransform(GeneralizedRCNNTransform):
    """torchvision's transform (normalise, resize, batch, and boxes back to the input's
    pixels) for inference, with the resized size computed as eager PyTorch computes it:
    the scale in float64, the size ``floor(side * scale)``, also when scripted or traced."""

    def resize(
        self, image: Tensor, target: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, dict[str, Tensor] | None]:
        if torchvision._is_tracing():
            return self._traced_resize(image), target
        height, width = image.shape[-2], image.shape[-1]
        scale = min(float(self.min_size[-1]) / float(min(height, width)), float(self.max_size) / float(max(height, width)))
        size = [int(math.floor(height * scale)), int(math.floor(width * scale))]
        return torch.nn.functional.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0], target

    @torch.jit.unused
    def _traced_resize(self, image: Tensor) -> Tensor:
        # ONNX: the size from the input's shape at run time, in float64 as above
        from torch.onnx import operators

        shape = operators.shape_as_tensor(image)[-2:].to(torch.float64)
        # 1-d float64 tensors throughout: the exporter turns Python floats and 0-d tensors
        # into float32 ones
        limits = torch.tensor([float(self.min_size[-1]), float(self.max_size)], dtype=torch.float64)
        sides = torch.stack([shape.min(), shape.max()])
        scale = (limits / sides).min(dim=0, keepdim=True).values
        size = (shape * scale).floor().to(torch.int64)
        return torch.nn.functional.interpolate(image[None], size=[size[0], size[1]], mode="bilinear", align_corners=False)[0]
