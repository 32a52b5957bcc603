"""Ray Data pipeline for VOC-format folders: image decoding and box-aware augmentation
inside ``map_batches``, over the annotation rows of :mod:`detexp.data.annotations`.

Rows never hold ragged tensors (ray#31779, #50229): per-image boxes travel as flat Arrow
``list<float32>`` columns and pixels as raw ``uint8`` bytes plus a shape column, so Ray
never has to infer a variable-shaped tensor type. The worker turns them back into tensors
with :func:`batch_to_tensors`.

torch and torchvision are imported inside the functions that use them. Ray unpickles a
dataset's plan (which names :func:`decode_batch`) in Ray Train's DatasetManager and
SplitCoordinator actors, by importing this module, and those never decode: a module-level
torch import cost each of them 4-5 CPU seconds before the first batch (see
:mod:`detexp.controller`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import ray.data
from PIL import Image
from ray.data.expressions import col

from detexp.data.voc import image_path

if TYPE_CHECKING:
    import torch
    from torchvision.transforms import v2


def decode_batch(batch: pa.Table, root: str, hflip_prob: float = 0.0) -> pa.Table:
    """``map_batches`` step: read JPEGImages/<id>.jpg, convert to RGB and, for training,
    apply the box-aware augmentation. Output pixels are uint8 CHW bytes; the float
    conversion happens on the worker's device, which keeps the object store 4x smaller."""
    import torch
    from torchvision.transforms import v2

    flip = v2.RandomHorizontalFlip(p=hflip_prob) if hflip_prob > 0 else None
    images, shapes, boxes_out = [], [], []
    for image_id, flat_boxes in zip(
        batch.column("image_id").to_pylist(), batch.column("boxes").to_pylist(), strict=True
    ):
        with Image.open(image_path(Path(root), image_id)) as img:
            pixels = torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)
        boxes = torch.tensor(flat_boxes, dtype=torch.float32).reshape(-1, 4)
        if flip is not None:
            pixels, boxes = _augment(flip, pixels, boxes)
        pixels = pixels.contiguous()
        images.append(pixels.numpy().tobytes())
        shapes.append(list(pixels.shape))
        boxes_out.append(boxes.reshape(-1).tolist())
    return (
        batch.drop_columns(["boxes"])
        .append_column("boxes", pa.array(boxes_out, type=pa.list_(pa.float32())))
        .append_column("image", pa.array(images, type=pa.binary()))
        .append_column("image_shape", pa.array(shapes, type=pa.list_(pa.int32())))
    )


def _augment(transform: v2.Transform, pixels: torch.Tensor, boxes: torch.Tensor):
    import torch
    from torchvision import tv_tensors

    # tv_tensors tell v2 which inputs are boxes, so a flip mirrors the boxes with the pixels.
    image = tv_tensors.Image(pixels)
    bboxes = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=tuple(pixels.shape[-2:]))
    image, bboxes = transform(image, bboxes)
    return image.as_subclass(torch.Tensor), bboxes.as_subclass(torch.Tensor)


def decode_images(
    annotations: ray.data.Dataset, root: str | Path, hflip_prob: float = 0.0
) -> ray.data.Dataset:
    """Usable images only (``ok``), decoded; pixels are read lazily, never on the driver."""
    return annotations.filter(expr=col("ok")).map_batches(
        decode_batch,
        fn_kwargs={"root": str(root), "hflip_prob": hflip_prob},
        batch_format="pyarrow",
        batch_size=16,
    )


def batch_to_tensors(
    batch: pa.Table | dict, device: torch.device | str = "cpu"
) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Rebuild the model's inputs from a pipeline batch: float images in [0, 1] on
    ``device`` and torchvision-style targets (boxes, labels, difficult, image_id)."""
    import torch

    if isinstance(batch, pa.Table):
        batch = batch.to_pydict()
    # Page-locked host memory makes the copy to a GPU asynchronous (non_blocking below).
    pin = torch.device(device).type == "cuda"
    images, targets = [], []
    for raw, shape, boxes, labels, difficult, image_id in zip(
        batch["image"], batch["image_shape"], batch["boxes"], batch["labels"],
        batch["difficult"], batch["image_id"], strict=True,
    ):
        pixels = torch.frombuffer(bytearray(raw), dtype=torch.uint8).reshape(tuple(shape))
        if pin:
            pixels = pixels.pin_memory()
        images.append(pixels.to(device, non_blocking=True).float().div_(255.0))
        targets.append(
            {
                "boxes": torch.tensor(boxes, dtype=torch.float32, device=device).reshape(-1, 4),
                "labels": torch.tensor(labels, dtype=torch.int64, device=device),
                "difficult": torch.tensor(difficult, dtype=torch.bool),
                "image_id": image_id,
            }
        )
    return images, targets

