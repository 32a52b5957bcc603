"""Which folder and which ids a ``dataset`` config means."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detexp.data.shapes import ensure_shapes
from detexp.data.voc import DatasetError, list_annotation_ids, read_split_ids, seeded_split


@dataclass
class DataSource:
    root: Path
    classes: list[str]
    train_ids: list[str]
    val_ids: list[str]


def dataset_root(cfg: Any) -> Path:
    """The VOC folder: ``cfg.root``, or for ``shapes`` the generated copy in the cache."""
    if cfg.name == "shapes" and cfg.root is None:
        s = cfg.synth
        return ensure_shapes(
            Path(cfg.cache_dir).expanduser(),
            num_train=s.num_train, num_val=s.num_val, image_size=s.image_size, seed=s.seed,
        )
    if cfg.root is None:
        raise DatasetError("dataset.root is not set: point it at a VOC-style folder")
    root = Path(cfg.root).expanduser().resolve()
    if not (root / "Annotations").is_dir():
        raise DatasetError(
            f"dataset.root={cfg.root}: no Annotations/ folder there; expected a VOC-style "
            "folder with Annotations/, JPEGImages/ and ImageSets/Main/"
        )
    return root


def resolve(cfg: Any) -> DataSource:
    """Train and val ids from ImageSets/Main/<split>.txt; a folder without ImageSets/Main
    gets a seeded ``val_fraction`` split of its annotations instead."""
    if not cfg.classes:
        raise DatasetError("dataset.classes is empty: list the class names (background is implicit)")
    root = dataset_root(cfg)
    if (root / "ImageSets" / "Main").is_dir() and cfg.train_split:
        train_ids = read_split_ids(root, cfg.train_split)
        val_ids = read_split_ids(root, cfg.val_split) if cfg.val_split else []
    else:
        train_ids, val_ids = seeded_split(list_annotation_ids(root), cfg.val_fraction, cfg.split_seed)
    if not train_ids:
        raise DatasetError(f"dataset.train_split={cfg.train_split!r} in {root} lists no images")
    return DataSource(root, list(cfg.classes), train_ids, val_ids)
