"""Ray Data pipeline for VOC-format folders: image decoding and box-aware augmentation
inside ``map_batches``, over the annotation rows of :mod:`detexp.data.annotations`.

Rows never hold ragged tensors (ray#31779, #50229): per-image boxes travel as flat Arrow
``list<float32>`` columns and pixels as raw ``uint8`` bytes plus a shape column, so Ray
never has to infer a variable-shaped tensor type. The worker turns them back into tensors
with :func:`batch_to_tensors`.

Nothing that runs in Ray Data imports torch: Ray unpickles a dataset's plan (which names
:func:`decode_batch`) in Ray Train's DatasetManager and SplitCoordinator actors, by
importing this module, and the decode tasks run :func:`decode_batch` itself. A torch import
cost each of those processes 4-6 CPU seconds before the first batch (see
:mod:`detexp.distributed.controller`); only :func:`batch_to_tensors`, on the worker, imports it.
"""

from __future__ import annotations

import itertools
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import ray.data
from PIL import Image
from ray.data.expressions import col

from detexp.data.files import DataRoot, as_root

if TYPE_CHECKING:
    import torch


def decode_batch(
    batch: pa.Table, root: DataRoot | str, hflip_prob: float = 0.0, augment: str = "hflip", size: int | None = None,
    seed: int | None = None,
) -> pa.Table:
    """``map_batches`` step: read each row's ``image_file`` (relative to ``root``, a folder
    or a URI), convert to RGB and, for training, put it with its boxes through the
    ``augment`` preset (:mod:`detexp.data.augment`; ``size`` is the model's ``min_size``,
    which ``lsj`` crops to). Output pixels are uint8 CHW bytes; the float conversion
    happens on the worker's device, which keeps the object store 4x smaller.

    With a ``seed`` (training), each row's draws come from the seed, the epoch (Ray Data's
    count of the dataset's executions) and the row's image id: a run repeats them whatever
    task a row lands in, and the next epoch draws new ones. Without one (validation) they
    come from seed 0, which with ``hflip_prob=0`` and ``hflip`` changes nothing.

    The ``hflip`` and ``multiscale`` presets use only PIL and numpy here, because importing
    torchvision costs each decode process about 6 CPU seconds (it imports ``torch._dynamo``),
    on the way to a run's first batch."""
    from detexp.data.augment import augment as augment_image

    root = as_root(root)
    if seed is not None:
        epoch = _execution_index()
        rngs = (_row_rng(seed, epoch, image_id) for image_id in batch.column("image_id").to_pylist())
    else:
        rngs = itertools.repeat(np.random.default_rng(0))
    kept_rows: dict[int, np.ndarray] = {}  # row -> the boxes a crop kept, where it dropped some
    images, shapes, boxes_out = [], [], []
    for n, (image, flat_boxes, rng) in enumerate(zip(
        batch.column("image_file").to_pylist(), batch.column("boxes").to_pylist(), rngs, strict=False
    )):
        with Image.open(root.open(image)) as img:
            pixels = np.asarray(img.convert("RGB")).transpose(2, 0, 1)  # HWC -> CHW
        boxes = np.asarray(flat_boxes, dtype=np.float32).reshape(-1, 4)
        pixels, boxes, kept = augment_image(pixels, boxes, rng, augment, hflip_prob, size)
        if kept is not None and len(kept) < len(flat_boxes) // 4:
            kept_rows[n] = kept
        images.append(np.ascontiguousarray(pixels).tobytes())
        shapes.append(list(pixels.shape))
        boxes_out.append(boxes.reshape(-1).tolist())
    out = batch.drop_columns(["boxes"])
    for name in ("labels", "difficult") if kept_rows else ():  # boxes left outside a crop: their labels go too
        values = out.column(name).to_pylist()
        for n, kept in kept_rows.items():
            values[n] = [values[n][k] for k in kept]
        field = out.schema.field(name)
        out = out.set_column(out.schema.get_field_index(name), field, pa.array(values, type=field.type))
    return (
        out.append_column("boxes", pa.array(boxes_out, type=pa.list_(pa.float32())))
        .append_column("image", pa.array(images, type=pa.binary()))
        .append_column("image_shape", pa.array(shapes, type=pa.list_(pa.int32())))
    )


def _row_rng(seed: int, epoch: int, image_id: str) -> np.random.Generator:
    return np.random.default_rng([zlib.crc32(image_id.encode()), epoch, seed])


def _execution_index() -> int:
    """Which execution of the dataset this task decodes for: Ray Data's own count, kept in
    the context a dataset shares with those it derives from (the annotations'
    ``materialize`` counts one), one more each epoch, the same numbers in every run of one
    config. Ray Data's seeded ``random()`` and ``random_shuffle`` draw anew each epoch by
    it; their draws also depend on the index of the task, which follows the order blocks
    arrive in, so a row's draw would change from one run to the next."""
    from ray.data import DataContext

    return int(DataContext.get_current()._execution_idx)


def decode_images(
    annotations: ray.data.Dataset, root: DataRoot | str | Path, hflip_prob: float = 0.0, seed: int = 0,
    augment: str | None = None, size: int | None = None,
) -> ray.data.Dataset:
    """Usable images only (``ok``), decoded; pixels are read lazily, never on the driver.
    With ``augment`` (training), each row's draws come from ``seed``, the epoch and its
    image id: the same for the same seed, new every epoch."""
    usable = annotations.filter(expr=col("ok"))
    return usable.map_batches(
        decode_batch,
        fn_kwargs={"root": as_root(root), "hflip_prob": hflip_prob, "augment": augment or "hflip", "size": size,
                   "seed": seed if augment is not None else None},
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

