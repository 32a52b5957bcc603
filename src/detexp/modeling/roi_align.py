"""RoIAlign for CPU training: torchvision's ``MultiScaleRoIAlign`` with the same results,
computed as one weighted gather instead of torchvision's CPU kernel.

torchvision's CPU ``roi_align`` loops over every RoI, channel and sample point in one
thread, and its backward scatters one float at a time: about a quarter of the default's
training step on 2 cores (benchmarks/RESULTS.md). Each output bin of RoIAlign
is a weighted sum of a few feature-map positions: ``sampling_ratio``² sample points, each
a bilinear mix of its 4 neighbours. With the maps laid out as rows of channels (one row
per position, which channels-last memory already is), that is ``F.embedding_bag`` with
per-sample weights: a vectorised, multi-threaded sum of whole rows, and its backward adds
whole rows: about 10x faster, forward and backward.

The sample points, bilinear weights and boundary rules are torchvision's
(``aligned=False``, as its Faster R-CNN builders use): a point more than one pixel outside
the map contributes 0, a point between -1 and 0 is read at 0, and a point past the last
row or column is read there. Results equal torchvision's op up to float rounding
(``tests/test_models.py`` compares both, and their gradients). Anything else (a GPU, the
adaptive ``sampling_ratio=0``, TorchScript or FX tracing, levels of different dtypes) goes
to torchvision's own code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign as _TorchvisionMultiScaleRoIAlign
from torchvision.ops.poolers import LevelMapper

# How many neighbours a sample point mixes (bilinear: 2 rows x 2 columns).
_CORNERS = 2


class MultiScaleRoIAlign(_TorchvisionMultiScaleRoIAlign):
    """torchvision's ``MultiScaleRoIAlign`` (same constructor, no parameters, same state
    dict) that pools CPU feature maps with :func:`multiscale_roi_align_rows`."""

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        features = [v for k, v in x.items() if k in self.featmap_names]
        if not _fast_path_applies(features, self.sampling_ratio):
            return super().forward(x, boxes, image_shapes)
        if self.scales is None or self.map_levels is None:  # from the first batch, as torchvision does
            self.scales, self.map_levels = _scales_and_levels(
                features, image_shapes, self.canonical_scale, self.canonical_level
            )
        levels = self.map_levels(boxes) if len(features) > 1 else None
        return multiscale_roi_align_rows(
            features, _rois(boxes), levels, self.scales, output_size=self.output_size, sampling_ratio=self.sampling_ratio
        )


def _rois(boxes: list[Tensor]) -> Tensor:
    """Each image's boxes (x1, y1, x2, y2) behind the image's index: one K x 5 tensor."""
    joined = torch.cat(boxes)
    index = torch.cat([torch.full((len(b), 1), i, dtype=joined.dtype, device=joined.device) for i, b in enumerate(boxes)])
    return torch.cat([index, joined], dim=1)


def _scales_and_levels(
    features: list[Tensor], image_shapes: list[tuple[int, int]], canonical_scale: int, canonical_level: int
) -> tuple[list[float], LevelMapper]:
    """Each feature map's scale against the batch's largest image, a power of 2 as
    torchvision infers it (from the height), and the FPN level mapper between the first
    and last map's levels (torchvision's LevelMapper: level of a box by its size)."""
    height = max(shape[0] for shape in image_shapes)
    scales = [2.0 ** round(math.log2(f.shape[-2] / height)) for f in features]
    first, last = (int(-math.log2(scale)) for scale in (scales[0], scales[-1]))
    return scales, LevelMapper(first, last, canonical_scale=canonical_scale, canonical_level=canonical_level)


def _fast_path_applies(features: list[Tensor], sampling_ratio: int) -> bool:
    if torch.jit.is_scripting() or torch.jit.is_tracing() or isinstance(features, torch.fx.Proxy):
        return False
    return (
        sampling_ratio > 0
        and bool(features)
        and all(f.device.type == "cpu" and f.dtype == features[0].dtype for f in features)
    )


def multiscale_roi_align_rows(
    features: list[Tensor],
    rois: Tensor,
    levels: Tensor | None,
    scales: list[float],
    output_size: tuple[int, int],
    sampling_ratio: int,
) -> Tensor:
    """Pool ``rois`` (K x 5: image index, x1, y1, x2, y2 in input pixels), each from the
    feature level ``levels`` assigns it (all from the first when None), into
    K x C x output_size maps, as torchvision's ``roi_align(aligned=False)`` does."""
    num_channels = features[0].shape[1]
    # every level's map as rows of channels, one row per (image, y, x), levels one after another
    rows = torch.cat([f.permute(0, 2, 3, 1).reshape(-1, num_channels) for f in features])
    with torch.no_grad():
        index, weight = _sample_rows(features, rois, levels, scales, output_size=output_size, ratio=sampling_ratio)
    pooled = F.embedding_bag(index, rows, per_sample_weights=weight.to(rows.dtype), mode="sum")
    height, width = output_size
    return pooled.view(-1, height, width, num_channels).permute(0, 3, 1, 2)


def _sample_rows(
    features: list[Tensor],
    rois: Tensor,
    levels: Tensor | None,
    scales: list[float],
    output_size: tuple[int, int],
    ratio: int,
) -> tuple[Tensor, Tensor]:
    """For every output bin of every RoI, the rows it sums and their weights: two
    (K * bins) x (ratio\u00b2 * 4) tensors."""
    device = rois.device
    count = rois.shape[0]
    if levels is None:
        levels = torch.zeros(count, dtype=torch.int64, device=device)
    heights = torch.tensor([f.shape[2] for f in features], device=device)
    widths = torch.tensor([f.shape[3] for f in features], device=device)
    sizes = torch.tensor([f.shape[0] * f.shape[2] * f.shape[3] for f in features], device=device)
    first_row = torch.cumsum(sizes, 0) - sizes
    scale = torch.tensor(scales, dtype=rois.dtype, device=device)[levels]
    height, width = heights[levels], widths[levels]

    image = rois[:, 0].to(torch.int64)
    x1, y1, x2, y2 = (rois[:, i] * scale for i in range(1, 5))
    out_h, out_w = output_size
    y_index, y_weight = _axis(y1, y2, height, out_h, ratio)
    x_index, x_weight = _axis(x1, x2, width, out_w, ratio)
    # dims: roi, bin row, bin column, sample row, its corner, sample column, its corner
    base = first_row[levels] + image * height * width
    index = (
        base.view(-1, 1, 1, 1, 1, 1, 1)
        + (y_index * width.view(-1, 1, 1)).view(count, out_h, 1, ratio, _CORNERS, 1, 1)
        + x_index.view(count, 1, out_w, 1, 1, ratio, _CORNERS)
    )
    weight = y_weight.view(count, out_h, 1, ratio, _CORNERS, 1, 1) * x_weight.view(
        count, 1, out_w, 1, 1, ratio, _CORNERS
    )
    per_bin = ratio * ratio * _CORNERS * _CORNERS
    return index.reshape(-1, per_bin), weight.reshape(-1, per_bin) / (ratio * ratio)


def _axis(start: Tensor, end: Tensor, size: Tensor, bins: int, ratio: int) -> tuple[Tensor, Tensor]:
    """Along one axis, every RoI's sample points (``bins * ratio``, at the centres of equal
    steps over the RoI, at least 1 pixel long) as the two map positions each reads and
    their bilinear weights: K x (bins * ratio) x 2 each."""
    length = (end - start).clamp(min=1.0)
    steps = (torch.arange(bins * ratio, dtype=start.dtype, device=start.device) + 0.5) / ratio
    point = start[:, None] + (length / bins)[:, None] * steps
    size = size[:, None]
    inside = (point >= -1.0) & (point <= size)
    point = point.clamp(min=0.0)
    low = point.floor().to(torch.int64)
    past_end = low >= size - 1
    low = torch.where(past_end, size - 1, low)
    high = torch.where(past_end, size - 1, low + 1)
    frac = torch.where(past_end, torch.zeros_like(point), point - low)
    weights = torch.stack([1.0 - frac, frac], -1) * inside[..., None]
    return torch.stack([low, high], -1), weights
