"""Training augmentation presets (``dataset.augment``), as torchvision's detection
references name them, applied in the decode tasks to one image and its boxes at a time.

- ``hflip`` (the default): a horizontal flip with ``dataset.hflip_prob``, in numpy. Decode
  tasks then never import torch (importing torchvision costs each decode process about
  6 CPU seconds, on the way to a run's first batch).
- ``ssd``: torchvision v2's ``RandomPhotometricDistort``, ``RandomZoomOut`` (filled with
  the ImageNet mean), ``RandomIoUCrop`` and the flip: SSD's recipe, for few photos with
  objects at one scale.
- ``lsj``: large-scale jitter: ``ScaleJitter`` to 0.1-2x of a square of the model's
  ``min_size``, a crop (or padding) to that square, the flip.
- ``multiscale``: the flip here; the scale is the model's own: every training image goes in
  at a shorter side drawn from 0.6x to 1x ``model.min_size`` in steps of 32 px
  (``GeneralizedRCNNTransform`` draws it), evaluation at ``model.min_size``.

``ssd`` and ``lsj`` import torchvision in each decode process (once; the cost is stated in
docs/recipes.md). After them every box is clamped to the image and boxes narrower than 1 px
are dropped, with their labels.

Every draw comes from the row's generator (the run's seed, the epoch and the image id:
:func:`detexp.data.pipeline.decode_batch`), so a run repeats its augmentation and the next
epoch draws anew.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

# detexp.config.Augment's names (not imported: config imports Hydra, which a decode task
# would then load)
PRESETS = ("hflip", "ssd", "lsj", "multiscale")
MEAN_FILL = (123, 117, 104)  # the ImageNet mean in uint8: what zoom-out and padding fill with
MULTISCALE_LOW, MULTISCALE_STEP = 0.6, 32


def multiscale_sizes(min_size: int) -> tuple[int, ...]:
    """The shorter sides ``multiscale`` trains at: 0.6x to 1x ``min_size`` in 32 px steps,
    ``min_size`` last (torchvision's transform evaluates at the last). 800 gives
    torchvision's references' 480, 512, ..., 800."""
    start = max(MULTISCALE_STEP, round(MULTISCALE_LOW * min_size / MULTISCALE_STEP) * MULTISCALE_STEP)
    return (*range(start, min_size, MULTISCALE_STEP), min_size)


def hflip(pixels: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """torchvision v2's ``RandomHorizontalFlip`` rule for CHW pixels and XYXY boxes
    (x -> width - x; tests/test_pipeline.py checks it against v2)."""
    width = pixels.shape[2]
    flipped = np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], axis=1)
    return pixels[:, :, ::-1], flipped.reshape(-1, 4)


def augment(
    pixels: np.ndarray, boxes: np.ndarray, rng: np.random.Generator, preset: str, hflip_prob: float, size: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One training image (uint8 CHW) and its XYXY boxes through ``preset``: (pixels, boxes,
    the indices of the boxes kept, or None when all are)."""
    if preset in ("hflip", "multiscale"):
        if hflip_prob > 0 and rng.random() < hflip_prob:
            pixels, boxes = hflip(pixels, boxes)
        return pixels, boxes, None
    return _torchvision(pixels, boxes, int(rng.integers(2**62)), preset, hflip_prob, size)


def _torchvision(pixels: np.ndarray, boxes: np.ndarray, seed: int, preset: str, hflip_prob: float, size: int | None):
    import torch
    from torchvision import tv_tensors

    height, width = pixels.shape[1:]
    sample = {
        "image": tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(pixels))),
        "boxes": tv_tensors.BoundingBoxes(torch.from_numpy(boxes), format="XYXY", canvas_size=(height, width)),
        "labels": torch.arange(len(boxes)),  # which boxes SanitizeBoundingBoxes keeps
    }
    torch.manual_seed(seed)
    out = _pipeline(preset, hflip_prob, size)(sample)
    return out["image"].numpy(), out["boxes"].numpy().astype(np.float32).reshape(-1, 4), out["labels"].numpy()


@functools.lru_cache(maxsize=4)
def _pipeline(preset: str, hflip_prob: float, size: int | None) -> Any:
    from torchvision import tv_tensors
    from torchvision.transforms import v2 as T

    fill = {tv_tensors.Image: MEAN_FILL, "others": 0}
    if preset == "ssd":
        steps = [T.RandomPhotometricDistort(), T.RandomZoomOut(fill=fill), T.RandomIoUCrop()]
    elif preset == "lsj":
        if size is None:
            raise ValueError("dataset.augment=lsj needs the model's min_size")
        steps = [T.ScaleJitter(target_size=(size, size), antialias=True), T.RandomCrop((size, size), pad_if_needed=True, fill=fill)]
    else:
        raise ValueError(f"unknown augmentation preset {preset!r}; one of {', '.join(PRESETS)}")
    return T.Compose([*steps, T.RandomHorizontalFlip(p=hflip_prob), T.ClampBoundingBoxes(), T.SanitizeBoundingBoxes()])
