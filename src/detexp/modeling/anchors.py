"""Anchors fitted to a dataset: ``model.anchor_sizes=auto`` and ``model.anchor_ratios=auto``.

The fit runs on the driver before Ray starts, over the train split's boxes as the model
sees them: each image resized as torchvision's ``GeneralizedRCNNTransform`` resizes it
(the shorter side to ``min_size``, the longer at most ``max_size``). Its result is written
into the run's config, so the params, the checkpoints and every later ``eval`` /
``predict`` hold plain numbers and rebuild the same model.

How, and why this way:

- **What an anchor is here.** torchvision's ``AnchorGenerator`` takes sizes and ratios
  and forms every size x ratio pair (area ``size**2``, ``height / width = ratio``). So the
  fit chooses a set of sizes and a set of ratios, not free (width, height) pairs as YOLO's
  autoanchor does (its k-means over box shapes would give pairs this generator cannot hold).
- **Clustering.** Lloyd's k-means in one dimension, separately over ``log(sqrt(w * h))``
  (scale) and ``log(h / w)`` (aspect), started at the quantiles, so the result is the same
  for the same boxes. Logarithms because the IoU of two shapes depends on their ratio, not
  their difference: 20 px against 40 px is as far as 200 against 400.
- **On what.** The train boxes and the same boxes at :data:`SCORED_SCALES` of their
  size: they are a sample, and the val and test boxes (and those of a small export above
  all) vary around them. Without it, 16 faces of one size get one anchor size that fits
  them alone.
- **How many.** The fitness is YOLO's idea, the IoU of each box with its best-matching
  anchor of the same centre (shape IoU), averaged over the boxes. Every count from 1 to
  the builder's (5 sizes, 3 ratios) is fitted; the run takes the fewest anchors whose
  fitness is within :data:`TOLERANCE` of the best, since each anchor a location costs the
  RPN head and its loss on every feature cell.
- **The ResNet-50 FPN builders** put one size on each of their 5 levels (strides 4 to 64),
  so their sizes stay an octave ladder (``s, 2s, 4s, 8s, 16s``, the builder's is 32 to 512)
  and the fit chooses its first rung ``s``.

What the shape IoU leaves out: an anchor sits on a grid of its feature map's stride, so a
box far smaller than the stride matches worse than its shape says.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from detexp.config import is_auto
from detexp.data.voc import VOCRecord

TOLERANCE = 0.02  # of mean best IoU: a fit this close to the best with fewer anchors wins
SCORED_SCALES = (0.8, 1.0, 1.25)  # the fit sees the boxes at these multiples of their size
MATCH_IOU = 0.5  # the share of boxes with a best anchor at least this good is reported
MAX_SIZES, MAX_RATIOS = 5, 3  # the builders' own counts
LADDER_LEVELS = 5  # the ResNet-50 FPN builders: one size per level, each level's stride twice the last
# torchvision's builders: sizes and ratios of every level (MobileNet) / the ladder (ResNet-50 FPN)
BUILDER_SIZES = (32, 64, 128, 256, 512)
BUILDER_RATIOS = (0.5, 1.0, 2.0)


@dataclass(frozen=True)
class AnchorFit:
    """What ``auto`` chose, and how well it and the builder's anchors match the boxes."""

    sizes: list[int]
    ratios: list[float]
    boxes: int  # train boxes the fit saw
    images: int
    mean_iou: float  # mean over the boxes of the best anchor's shape IoU
    matched: float  # share of boxes whose best anchor has a shape IoU >= MATCH_IOU
    builder_mean_iou: float
    builder_matched: float

    def summary(self, min_size: int, max_size: int) -> str:
        return (
            f"anchors fitted to {self.boxes} train boxes of {self.images} images at the model's "
            f"{min_size}-{max_size} px: sizes {self.sizes}, ratios (h/w) {self.ratios}; the best anchor's "
            f"IoU with a box (also at {SCORED_SCALES[0]}x and {SCORED_SCALES[-1]}x its size) is "
            f"{self.mean_iou:.2f} on average, >= {MATCH_IOU} for {self.matched:.0%} of them "
            f"(torchvision's anchors: {self.builder_mean_iou:.2f}, {self.builder_matched:.0%})"
        )


def resized_shapes(records: Sequence[VOCRecord], min_size: int, max_size: int) -> np.ndarray:
    """(width, height) of every box, float64 [N, 2], in the pixels of the image the model
    sees: the scale of torchvision's GeneralizedRCNNTransform, min(min_size / shorter side,
    max_size / longer side)."""
    shapes = []
    for record in records:
        if not len(record.boxes):
            continue
        scale = min(min_size / min(record.width, record.height), max_size / max(record.width, record.height))
        boxes = record.boxes.astype(np.float64)
        shapes.append(np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], axis=1) * scale)
    wh = np.concatenate(shapes) if shapes else np.zeros((0, 2))
    return wh[(wh[:, 0] > 0) & (wh[:, 1] > 0)]


def anchor_shapes(sizes: Sequence[float], ratios: Sequence[float]) -> np.ndarray:
    """(width, height) of every size x ratio anchor, as torchvision's AnchorGenerator makes
    them: height = size * sqrt(ratio), width = size / sqrt(ratio)."""
    size = np.asarray(sizes, dtype=np.float64)[:, None]
    root = np.sqrt(np.asarray(ratios, dtype=np.float64))[None, :]
    return np.stack([(size / root).ravel(), (size * root).ravel()], axis=1)


def best_iou(wh: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """Each box's IoU with its best anchor, both centred on the same point."""
    inter = np.minimum(wh[:, None, 0], anchors[None, :, 0]) * np.minimum(wh[:, None, 1], anchors[None, :, 1])
    union = (wh[:, 0] * wh[:, 1])[:, None] + (anchors[:, 0] * anchors[:, 1])[None, :] - inter
    return (inter / union).max(axis=1)


def _fitness(wh: np.ndarray, sizes: Sequence[float], ratios: Sequence[float]) -> float:
    return float(best_iou(wh, anchor_shapes(sizes, ratios)).mean())


def kmeans_1d(values: np.ndarray, k: int, iterations: int = 100) -> np.ndarray:
    """Lloyd's k-means of 1-D ``values``, started at the quantiles (deterministic);
    the centres sorted. Fewer distinct values than ``k`` give fewer centres."""
    distinct = np.unique(values)
    if len(distinct) <= k:
        return distinct
    centres = np.quantile(values, (np.arange(k) + 0.5) / k)
    for _ in range(iterations):
        nearest = np.abs(values[:, None] - centres[None, :]).argmin(axis=1)
        moved = np.array([values[nearest == i].mean() if np.any(nearest == i) else centres[i] for i in range(k)])
        if np.allclose(moved, centres):
            break
        centres = moved
    return np.unique(centres)


def _sizes(wh: np.ndarray, k: int) -> list[int]:
    scale = np.log(np.sqrt(wh[:, 0] * wh[:, 1]))
    return sorted({max(int(round(math.exp(c))), 1) for c in kmeans_1d(scale, k)})


def _ratios(wh: np.ndarray, k: int) -> list[float]:
    aspect = np.log(wh[:, 1] / wh[:, 0])
    return sorted({round(math.exp(c), 2) for c in kmeans_1d(aspect, k)})


def _fewest(candidates: list[tuple[list[int], list[float]]], wh: np.ndarray) -> tuple[list[int], list[float]]:
    """The candidate with the fewest anchors whose fitness is within TOLERANCE of the best
    (ties: the better fitness)."""
    scored = [(_fitness(wh, sizes, ratios), sizes, ratios) for sizes, ratios in candidates]
    best = max(score for score, _, _ in scored)
    _, sizes, ratios = min(
        (item for item in scored if item[0] >= best - TOLERANCE),
        key=lambda item: (len(item[1]) * len(item[2]), -item[0]),
    )
    return sizes, ratios


def fit_anchors(
    wh: np.ndarray, *, sizes: Sequence[int] | None = None, ratios: Sequence[float] | None = None, ladder: bool = False
) -> tuple[list[int], list[float]]:
    """Sizes and ratios for boxes of shapes ``wh`` (pixels of the resized image). A given
    ``sizes`` or ``ratios`` is kept and the other fitted. ``ladder``: the sizes are an octave
    ladder of :data:`LADDER_LEVELS` rungs (the ResNet-50 FPN builders) and only its first
    rung is fitted."""
    if not len(wh):
        raise ValueError("no boxes to fit anchors to")
    ratio_options = [list(ratios)] if ratios is not None else [_ratios(wh, k) for k in range(1, MAX_RATIOS + 1)]
    if sizes is not None:
        size_options = [list(sizes)]
    elif ladder:
        # first rungs 8 to 256 px a quarter octave apart; the 5 rungs then reach 128 to 4096
        size_options = [[round(2 ** (q / 4) * 2**i) for i in range(LADDER_LEVELS)] for q in range(12, 33)]
    else:
        size_options = [_sizes(wh, k) for k in range(1, MAX_SIZES + 1)]
    if ladder and sizes is None:  # a ladder is not fewer anchors for a smaller first rung: pick the best one
        best = max(((_fitness(wh, s, r), s, r) for s in size_options for r in ratio_options), key=lambda item: item[0])
        return _fewest([(best[1], r) for r in ratio_options], wh)
    return _fewest([(s, r) for s in size_options for r in ratio_options], wh)


def fit_model_anchors(model_cfg: Any, records: Sequence[VOCRecord], *, ladder: bool) -> AnchorFit:
    """Fit the ``auto`` keys of ``model_cfg`` (anchor_sizes, anchor_ratios) to ``records``;
    a key given as numbers is kept, a null one is the builder's."""
    boxes = resized_shapes(records, model_cfg.min_size, model_cfg.max_size)
    wh = np.concatenate([boxes * scale for scale in SCORED_SCALES])
    given_sizes, given_ratios = model_cfg.anchor_sizes, model_cfg.anchor_ratios
    keep_sizes = None if is_auto(given_sizes) else list(given_sizes or BUILDER_SIZES)
    keep_ratios = None if is_auto(given_ratios) else list(given_ratios or BUILDER_RATIOS)
    sizes, ratios = fit_anchors(wh, sizes=keep_sizes, ratios=keep_ratios, ladder=ladder)
    fitted = best_iou(wh, anchor_shapes(sizes, ratios))
    builder = best_iou(wh, anchor_shapes(BUILDER_SIZES, BUILDER_RATIOS))
    return AnchorFit(
        sizes=sizes, ratios=ratios, boxes=len(boxes), images=len(records),
        mean_iou=float(fitted.mean()), matched=float((fitted >= MATCH_IOU).mean()),
        builder_mean_iou=float(builder.mean()), builder_matched=float((builder >= MATCH_IOU).mean()),
    )
