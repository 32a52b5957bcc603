"""The records every reader produces: :class:`ImageEntry` (where one image and its boxes
are), :class:`VOCRecord` (its parsed boxes) and :class:`Problem` (what is wrong with it);
and the Pascal VOC devkit layout's paths and split files.

A devkit root holds ``Annotations/<id>.xml``, ``JPEGImages/<id>.jpg`` and
``ImageSets/Main/<split>.txt``; :mod:`detexp.data.layouts` finds it and the other layouts
labelling tools write. Nothing here imports torch, Ray, Hydra or MLflow.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from detexp.data.files import DataRoot, as_root
from detexp.errors import DatasetError

__all__ = ["DatasetError"]  # re-exported: raised by the readers of this layout

ANNOTATIONS_DIR = "Annotations"
IMAGES_DIR = "JPEGImages"
SPLITS_DIR = "ImageSets/Main"

@dataclass(frozen=True)
class ImageEntry:
    """One image of a split and where its boxes are, as a layout lists it; paths are
    relative to the dataset root, ``/``-separated (:mod:`detexp.data.files`).

    ``objects`` is None for a VOC entry (its boxes are in the XML ``annotation``); a COCO
    entry carries its objects as read from the JSON ``annotation``: one
    ``(reference, class name or None for an unknown category, x, y, w, h, iscrowd)`` tuple
    each, ``size`` the (width, height) the JSON gives. ``error`` is a problem found while
    listing (an id that leaves the root, say): the image is unusable."""

    image_id: str
    image: str
    annotation: str
    objects: tuple[tuple, ...] | None = None
    size: tuple[int, int] | None = None
    error: str | None = None

    @classmethod
    def devkit(cls, image_id: str) -> ImageEntry:
        """The devkit's paths of ``image_id``: ``JPEGImages/<id>.jpg`` and ``Annotations/<id>.xml``."""
        try:
            _inside_root(Path("."), IMAGES_DIR, image_id, ".jpg")
        except DatasetError as exc:
            return cls(str(image_id), str(image_id), str(image_id), error=str(exc))
        return cls(image_id, image_relpath(image_id), annotation_relpath(image_id))


@dataclass(frozen=True)
class Problem:
    """One finding about one image: an ``"error"`` (the image is unusable) or a ``"warning"``.

    ``unknown_class`` is set only on an "unknown class" error: the object name that is not
    in the class list, so summaries need not read it back out of the message."""

    image_id: str
    file: str  # relative to the dataset root, with "/" separators, e.g. "Annotations/0001.xml"
    problem: str
    severity: str  # "error" or "warning"
    unknown_class: str | None = None


@dataclass
class VOCRecord:
    """A parsed annotation. ``labels`` are 1-based indices into the class list (0 = background)."""

    image_id: str
    width: int
    height: int
    image: str  # the image file, relative to the dataset root
    boxes: np.ndarray  # float32 [N, 4] xmin, ymin, xmax, ymax, clipped to the image
    labels: np.ndarray  # int64 [N]
    difficult: np.ndarray  # bool [N]


# --------------------------------------------------------------------------- paths and splits


def _inside_root(root: Path, subdir: str, image_id: str, suffix: str, what: str = "image id") -> Path:
    """``root/subdir/<image_id><suffix>``, or DatasetError if it lexically leaves ``root/subdir``.

    The check is lexical (normpath), not ``resolve()``: datasets are often
    assembled from symlinked folders, and following those links is legitimate.
    What must not happen is an id such as ``../../etc/x`` or ``/abs`` steering
    reads outside the dataset.
    """
    if not isinstance(image_id, str) or not image_id.strip() or "\x00" in image_id:
        raise DatasetError(f"invalid {what} {image_id!r} in dataset {root}")
    base = os.path.normpath(os.path.join(root, subdir))
    path = os.path.normpath(os.path.join(base, image_id + suffix))
    try:
        inside = os.path.commonpath([base, path]) == base
    except ValueError:  # an absolute id joined to a relative root
        inside = False
    if not inside:
        raise DatasetError(
            f"{what} {image_id!r} points outside {base}; {what}s must be plain file stems"
        )
    return Path(path)


def annotation_relpath(image_id: str) -> str:
    return f"{ANNOTATIONS_DIR}/{image_id}.xml"


def image_relpath(image_id: str) -> str:
    return f"{IMAGES_DIR}/{image_id}.jpg"


def read_split_ids(root: DataRoot | Path | str, split: str) -> list[str]:
    """Ids listed in ``ImageSets/Main/<split>.txt``, in file order, duplicates dropped.

    Accepts both the plain format (one id a line) and VOC's per-class files
    (``"2008_000008 -1"``): the first token of each non-blank line is the id.
    Raises DatasetError naming the file when it is missing (listing the splits
    that do exist) or lists no ids.
    """
    root = as_root(root)
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist or is not a folder")
    _inside_root(Path("."), SPLITS_DIR, split, ".txt", what="split name")
    rel = f"{SPLITS_DIR}/{split}.txt"
    try:
        data = root.read_bytes(rel)
    except (FileNotFoundError, IsADirectoryError):
        raise DatasetError(f"split file {rel} not found in {root}; {_describe_splits(root)}") from None
    # utf-8-sig: files saved by Windows editors start with a BOM that would
    # otherwise become part of the first id.
    text = data.decode("utf-8-sig")
    ids = list(dict.fromkeys(line.split()[0] for line in text.splitlines() if line.strip()))
    if not ids:
        raise DatasetError(f"split file {rel} in {root} lists no image ids")
    return ids


def _describe_splits(root: DataRoot) -> str:
    if not root.is_dir(SPLITS_DIR):
        return f"there is no {SPLITS_DIR} folder"
    names = sorted(name[:-4] for name in root.listdir(SPLITS_DIR)[0] if name.endswith(".txt"))
    if not names:
        return f"{SPLITS_DIR} holds no .txt files"
    shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
    return f"splits that exist: {shown}"


def seeded_split(ids: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split ids into (train, val), both sorted, reproducibly for a given seed.

    The ids are sorted before shuffling so the result does not depend on the
    order they were listed in (e.g. filesystem order). ``val`` gets
    ``round(len(ids) * val_fraction)`` ids, at least one when the fraction is
    positive and there are two or more ids, and never all of them.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DatasetError(f"val_fraction must be in [0, 1), got {val_fraction}")
    shuffled = sorted(set(ids))
    random.Random(seed).shuffle(shuffled)
    n_val = round(len(shuffled) * val_fraction)
    if val_fraction > 0 and len(shuffled) > 1:
        n_val = min(max(n_val, 1), len(shuffled) - 1)
    return sorted(shuffled[n_val:]), sorted(shuffled[:n_val])
