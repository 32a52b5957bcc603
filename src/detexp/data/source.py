"""Which files and which classes a ``dataset`` config means: the layout found in the root
(:mod:`detexp.data.layouts`, :mod:`detexp.data.coco`), the entries of each split, and the
class names (given, or read from the train split)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from detexp.data.coco import find_coco_layout
from detexp.data.files import DataRoot
from detexp.data.layouts import Layout, find_voc_layout
from detexp.data.parsing import object_name_images
from detexp.data.shapes import ensure_shapes
from detexp.data.voc import DatasetError, ImageEntry

log = logging.getLogger("detexp")


@dataclass
class DataSource:
    root: DataRoot
    classes: list[str]
    train: list[ImageEntry]
    val: list[ImageEntry]
    description: str = ""  # the layout found, in one line
    notes: list[str] = field(default_factory=list)  # lines the user should read before training

    @property
    def train_ids(self) -> list[str]:
        return [e.image_id for e in self.train]

    @property
    def val_ids(self) -> list[str]:
        return [e.image_id for e in self.val]

    def images(self) -> dict[str, str]:
        """Image id -> image file (relative to the root), of both splits."""
        return {e.image_id: e.image for e in self.train + self.val}

    def summary(self) -> str:
        """The lines a command prints before it reads the data."""
        counts = f"{len(self.train)} train, {len(self.val)} val images" if self.train else f"{len(self.val)} val images"
        lines = [f"dataset {self.root}: {self.description}: {counts}"]
        return "\n".join(lines + self.notes)


def dataset_root(cfg: Any) -> DataRoot:
    """The dataset's root: ``cfg.root`` (a folder or a URI), or for ``shapes`` the
    generated copy in the cache."""
    if cfg.name == "shapes" and cfg.root is None:
        s = cfg.synth
        return DataRoot(ensure_shapes(
            DataRoot(cfg.cache_dir).local_path(),
            num_train=s.num_train, num_val=s.num_val, image_size=s.image_size, seed=s.seed,
        ))
    if cfg.root is None:
        raise DatasetError("dataset.root is not set: point it at your export's folder (or a URI such as s3://bucket/data)")
    return DataRoot(cfg.root)


def find_layout(cfg: Any, root: DataRoot, *, read_train: bool = True) -> Layout:
    if cfg.get("format", "voc") == "coco":
        return find_coco_layout(root, cfg, read_train=read_train)
    return find_voc_layout(root, cfg)


def resolve(cfg: Any, *, read_train: bool = True) -> DataSource:
    """The layout, split entries and classes of ``cfg`` (a ``dataset`` config). With
    ``dataset.classes`` empty the names are read from the train split: the export's own list
    (CVAT's labelmap.txt, COCO's categories that have boxes), else the sorted object names
    of its XMLs. ``read_train=False`` (eval, with the classes of a checkpoint) leaves the
    train split unread where the layout allows it."""
    root = dataset_root(cfg)
    layout = find_layout(cfg, root, read_train=read_train)
    if not layout.train and read_train:
        raise DatasetError(f"dataset.root={root}: {layout.description}: the train split holds no annotated images")
    notes = list(layout.notes)
    classes = list(cfg.classes or [])
    if not classes:
        if not read_train:
            raise DatasetError("dataset.classes is empty: list the class names (background is implicit)")
        classes = _classes_from_data(root, layout, notes)
    return DataSource(root, classes, layout.train, layout.val, layout.description, notes)


def _classes_from_data(root: DataRoot, layout: Layout, notes: list[str]) -> list[str]:
    if layout.class_names:
        classes, source = list(layout.class_names), "the export's class list"
    else:
        train_names = object_name_images(root, layout.train)
        classes, source = sorted(train_names, key=lambda n: (n.casefold(), n)), "the train split"
    if not classes:
        raise DatasetError(
            f"dataset.classes is empty and the train split of {root} has no labelled objects to read "
            "the class names from: list them with dataset.classes=[...]"
        )
    notes.append(f"classes read from {source} ({len(classes)}): {', '.join(classes)}")
    if layout.val:
        val_only = sorted(set(object_name_images(root, layout.val)) - set(classes))
        if val_only:
            notes.append(
                f"class name(s) {', '.join(map(repr, val_only))} appear in the val split and not in the train "
                "split: their val images are skipped as unknown classes (add them to dataset.classes to keep them)"
            )
    return classes
