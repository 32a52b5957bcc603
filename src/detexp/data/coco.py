"""COCO JSON exports: where the JSON of each split is, and its images as entries.

:func:`find_coco_layout` recognises, in this order:

* ``dataset.train_annotations`` / ``dataset.val_annotations``: JSON files relative to the
  root, images in ``dataset.images_dir`` (else beside the JSON);
* Roboflow's export: ``<root>/<split>/_annotations.coco.json`` with the images beside it
  (``dataset.val_split=val`` finds ``valid/`` too);
* the official layout: ``<root>/annotations/instances_<split>.json`` (or ``<split>.json``)
  with the images in ``<root>/<split>/`` (or ``dataset.images_dir``).

Each JSON is parsed once, on the driver; an image's entry carries its objects as small
tuples (:class:`~detexp.data.voc.ImageEntry`), and the images themselves are read later by
Ray Data tasks. Category ids are mapped to names; the classes read from the data are the
categories that have boxes in the train split (Roboflow writes a supercategory with none:
it is not a class). ``iscrowd`` boxes are kept as "difficult": ignored by the metrics, as
VOC's. Nothing here imports torch or Ray.
"""

from __future__ import annotations

import json
import logging
import posixpath
from collections import Counter
from dataclasses import dataclass
from typing import Any

from detexp.data.files import DataRoot, first_line, inside, join
from detexp.data.layouts import Layout, describe_root, pick, split_folder
from detexp.data.voc import ImageEntry, seeded_split
from detexp.errors import DatasetError

log = logging.getLogger("detexp")

ROBOFLOW_FILE = "_annotations.coco.json"


@dataclass
class CocoSplit:
    """One JSON's images as entries, and the category names that have boxes, in id order."""

    entries: list[ImageEntry]
    class_names: list[str]
    skipped: Counter  # what could not be attached to an image, by reason


def _require(doc: Any, key: str, rel: str) -> list:
    value = doc.get(key) if isinstance(doc, dict) else None
    if not isinstance(value, list):
        raise DatasetError(f"{rel}: not a COCO detection file: no {key!r} list at the top level")
    return value


def read_coco(root: DataRoot, rel: str, images_dir: str) -> CocoSplit:
    """Parse the COCO JSON ``rel`` (relative to ``root``); images are ``images_dir/<file_name>``."""
    try:
        doc = json.loads(root.read_bytes(rel))
    except FileNotFoundError:
        raise DatasetError(f"COCO file {root.display(rel)} does not exist") from None
    except (ValueError, OSError) as exc:
        raise DatasetError(f"COCO file {root.display(rel)} cannot be read: {first_line(exc)}") from None
    categories: dict[Any, str] = {}
    for cat in _require(doc, "categories", rel):
        if isinstance(cat, dict) and "id" in cat and isinstance(cat.get("name"), str):
            categories[cat["id"]] = cat["name"].strip()
    skipped: Counter = Counter()
    objects: dict[Any, list[tuple]] = {}
    used: Counter = Counter()
    for ann in _require(doc, "annotations", rel):
        if not isinstance(ann, dict) or "image_id" not in ann:
            skipped["annotations without an image_id"] += 1
            continue
        name = categories.get(ann.get("category_id"))
        bbox = ann.get("bbox")
        coords = tuple(bbox) if isinstance(bbox, list) and len(bbox) == 4 else (None,) * 4
        ref = f"annotation id {ann.get('id', '?')}" + (f" {name!r}" if name else f" (category_id {ann.get('category_id')!r})")
        objects.setdefault(ann["image_id"], []).append((ref, name, *coords, bool(ann.get("iscrowd"))))
        if name is not None:
            used[ann.get("category_id")] += 1
    entries, ids = [], set()
    for image in _require(doc, "images", rel):
        entry = _entry(image, objects.pop(image.get("id") if isinstance(image, dict) else None, []), rel, images_dir)
        if entry.image_id in ids:
            entry = ImageEntry(entry.image_id, entry.image, rel, error=f"image {entry.image_id!r} is listed twice")
        ids.add(entry.image_id)
        entries.append(entry)
    if objects:
        skipped["annotations whose image_id is not in 'images'"] += sum(map(len, objects.values()))
    names = [categories[c] for c in sorted(used, key=_sort_key)]
    return CocoSplit(entries, list(dict.fromkeys(names)), skipped)


def _sort_key(category_id: Any) -> tuple:
    return (0, category_id, "") if isinstance(category_id, int) else (1, 0, str(category_id))


def _entry(image: Any, objects: list[tuple], rel: str, images_dir: str) -> ImageEntry:
    """One image of the JSON; a file name that is missing or leaves the root is an error."""
    if not isinstance(image, dict):
        return ImageEntry(str(image)[:40], rel, rel, error="entry of 'images' is not an object")
    file_name = image.get("file_name")
    if not isinstance(file_name, str) or not file_name.strip():
        return ImageEntry(f"id {image.get('id')}", rel, rel, error=f"image id {image.get('id')!r} has no file_name")
    file_name = file_name.strip().replace("\\", "/")
    path = join(images_dir, file_name)
    image_id = posixpath.splitext(file_name)[0]
    if not inside(path) or not inside(file_name):
        return ImageEntry(image_id, rel, rel, error=f"file_name {file_name!r} points outside the dataset root")
    size = None
    if isinstance(image.get("width"), int | float) and isinstance(image.get("height"), int | float):
        size = (int(image["width"]), int(image["height"]))
    return ImageEntry(image_id, path, rel, objects=tuple(objects), size=size)


# --------------------------------------------------------------------------- finding the files


def _split_files(root: DataRoot, dirs: list[str], cfg: Any, key: str) -> tuple[str, str] | None:
    """(JSON, images folder) of ``dataset.<key>_split`` (key: "train" or "val"), or None;
    ``dirs``: the root's folders."""
    explicit = cfg.get(f"{key}_annotations")
    if explicit:
        if not root.is_file(explicit):
            raise DatasetError(f"dataset.{key}_annotations={explicit}: no such file in {root}")
        return explicit, cfg.get("images_dir") or posixpath.dirname(explicit)
    split = cfg.get(f"{key}_split")
    if not split:
        return None
    folder = split_folder(dirs, split)
    if folder and root.is_file(join(folder, ROBOFLOW_FILE)):
        return join(folder, ROBOFLOW_FILE), cfg.get("images_dir") or folder
    annotations = pick(dirs, ("annotations", "Annotations"))
    if annotations:
        names = root.listdir(annotations)[0]
        for candidate in (split, *[a for a in (folder,) if a and a != split]):
            found = pick(names, (f"instances_{candidate}.json", f"{candidate}.json"))
            if found:
                images = cfg.get("images_dir") or folder or _images_of(root, dirs, split)
                return join(annotations, found), images or ""
    return None


def _images_of(root: DataRoot, dirs: list[str], split: str) -> str | None:
    """``images/<split>/`` or ``images/`` for the official layout's images."""
    images = pick(dirs, ("images",))
    if images is None:
        return None
    sub = split_folder(root.listdir(images)[1], split)
    return join(images, sub) if sub else images


def _holds_coco(root: DataRoot, rel: str) -> bool:
    """Does the folder ``rel`` look like a COCO export's root (Roboflow's split folders, or
    an annotations/ folder of JSON files)?"""
    files, dirs = root.listdir(rel)
    annotations = pick(dirs, ("annotations", "Annotations"))
    if annotations and any(n.lower().endswith(".json") for n in root.listdir(join(rel, annotations))[0]):
        return True
    return any(root.is_file(join(rel, d, ROBOFLOW_FILE)) for d in dirs[:20])


def _hint(root: DataRoot, files: list[str], dirs: list[str]) -> str:
    """Where the export more likely is: the folder above a split folder, or the one
    subfolder that holds an export."""
    if ROBOFLOW_FILE in files:
        above = f"dataset.root={root.local_path().parent} (the export's root) or " if not root.remote else ""
        return f" (this is one split folder of a Roboflow export: set {above}dataset.train_annotations={ROBOFLOW_FILE})"
    nested = [d for d in dirs[:20] if _holds_coco(root, d)]
    return f" (did you mean dataset.root={root.display(nested[0])}?)" if len(nested) == 1 else ""


def find_coco_layout(root: DataRoot, cfg: Any, *, read_train: bool = True) -> Layout:
    """The train and val entries of the COCO export in ``root``; ``read_train=False`` (eval)
    leaves the train JSON unread."""
    files, dirs = root.listdir()
    if not files and not dirs and not root.is_dir():
        raise DatasetError(f"dataset.root={root} does not exist or is not a folder")
    train_files = _split_files(root, dirs, cfg, "train")
    val_files = _split_files(root, dirs, cfg, "val")
    read_train = read_train or val_files is None  # a seeded val split is cut from the train JSON
    if train_files is None and read_train:
        raise DatasetError(
            f"dataset.root={root}: no COCO JSON found for dataset.train_split={cfg.train_split!r}{_hint(root, files, dirs)}. "
            f"It holds {describe_root(root, files, dirs)}. detexp reads Roboflow's <split>/{ROBOFLOW_FILE}, "
            "annotations/instances_<split>.json with the images in <split>/, or the files "
            "dataset.train_annotations / dataset.val_annotations (relative to the root) with dataset.images_dir"
        )
    train = read_coco(root, *train_files) if read_train else CocoSplit([], [], Counter())
    val = read_coco(root, *val_files) if val_files else None
    notes = [f"{n} {reason} in {files_[0]}: ignored" for split, files_ in ((train, train_files), (val, val_files))
             if split and files_ for reason, n in split.skipped.items()]
    if val is None:
        train_entries, val_entries = train.entries, []
        what = f"COCO JSON {train_files[0]} (images in {train_files[1] or '.'}/)"
        if cfg.get("val_split"):
            train_ids, val_ids = seeded_split([e.image_id for e in train.entries], cfg.val_fraction, cfg.split_seed)
            by_id = {e.image_id: e for e in train.entries}
            train_entries, val_entries = [by_id[i] for i in train_ids], [by_id[i] for i in val_ids]
            what += f", no {cfg.val_split} JSON: split by dataset.val_fraction={cfg.val_fraction}"
    else:
        train_entries, val_entries = train.entries, val.entries
        what = "COCO JSON " + " and ".join(f"{f[0]} (images in {f[1] or '.'}/)" for f in (train_files, val_files) if f)
    return Layout(what, train_entries, val_entries, class_names=train.class_names or None, notes=notes)
