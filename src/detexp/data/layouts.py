"""The folder layouts labelling tools write for Pascal VOC XML, found by looking at a root.

:func:`find_voc_layout` recognises, in this order:

* **explicit folders**: ``dataset.images_dir`` / ``dataset.annotations_dir`` (relative to
  the root), for names it cannot guess;
* **image and annotation folders** side by side in the root: the VOCdevkit
  (``JPEGImages/`` + ``Annotations/``, split by ``ImageSets/Main/<split>.txt``), Label
  Studio (``images/`` + ``Annotations/``), FiftyOne (``data/`` + ``labels/``), with split
  subfolders inside them when both have one named after the split;
* **one flat folder** of images with their XMLs beside them (LabelImg);
* **split folders** ``<root>/<split>/`` with each image's XML beside it (Roboflow's
  ``train/ valid/ test/``); ``dataset.val_split=val`` finds ``valid/`` too.

A layout without its own split is split by the seeded ``dataset.val_fraction``. An image
is paired with its XML by file stem, whatever its extension (``.jpg .jpeg .png .bmp`` in any
letter case); an XML whose stem names no image names its image with ``<filename>``. A root
that is none of these fails with what it holds and the keys to set. Nothing here imports
torch or Ray: it runs on the driver before Ray starts, with only folder listings (and the
XMLs of images it cannot pair by name).
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from detexp.data.files import DataRoot, join
from detexp.data.parsing import load_annotation
from detexp.data.voc import SPLITS_DIR, ImageEntry, read_split_ids, seeded_split
from detexp.errors import DatasetError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
IMAGE_DIR_NAMES = ("JPEGImages", "images", "data", "imgs", "img")
ANNOTATION_DIR_NAMES = ("Annotations", "annotations", "annots", "labels", "label", "xml", "xmls")
# dataset.val_split names a folder; Roboflow calls its validation split "valid"
SPLIT_ALIASES = {"val": ("valid", "validation"), "valid": ("val", "validation"), "validation": ("val", "valid")}
LABELMAP_FILE = "labelmap.txt"  # CVAT's Pascal VOC export: one "name:color:parts:actions" line a class


@dataclass
class Layout:
    """What :func:`find_voc_layout` (or :func:`detexp.data.coco.find_coco_layout`) found:
    the entries of each split, the one line that says so, and the class names the export
    lists itself (CVAT's labelmap.txt, COCO's categories), if any."""

    description: str
    train: list[ImageEntry]
    val: list[ImageEntry]
    class_names: list[str] | None = None
    notes: list[str] = field(default_factory=list)  # things the user should know (left-out images)


def pick(names: Sequence[str], wanted: Sequence[str]) -> str | None:
    """The first of ``wanted`` in ``names``, exactly, else ignoring letter case."""
    for want in wanted:
        if want in names:
            return want
    folded = {n.casefold(): n for n in names}
    return next((folded[w.casefold()] for w in wanted if w.casefold() in folded), None)


def split_folder(names: Sequence[str], split: str | None) -> str | None:
    """The folder among ``names`` that ``dataset.<x>_split=split`` means (``valid`` for ``val``)."""
    if not split:
        return None
    return pick(names, (split, *SPLIT_ALIASES.get(split, ())))


def is_image(name: str) -> bool:
    return posixpath.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def describe_root(root: DataRoot, files: list[str], dirs: list[str]) -> str:
    """What a root holds, for an error message: its folders and its kinds of files."""
    n_xml = sum(f.lower().endswith(".xml") for f in files)
    n_img = sum(is_image(f) for f in files)
    n_json = sum(f.lower().endswith(".json") for f in files)
    shown = ", ".join(f"{d}/" for d in dirs[:12]) + (f", ... ({len(dirs)} folders)" if len(dirs) > 12 else "")
    parts = [f"folders: {shown or 'none'}", f"{n_img} images, {n_xml} XML, {n_json} JSON and {len(files) - n_img - n_xml - n_json} other files"]
    return "; ".join(parts)


# --------------------------------------------------------------------------- pairing


@dataclass
class _Folder:
    """Images and XMLs of one split: where they are and how they pair."""

    images_dir: str
    annotations_dir: str

    def label(self) -> str:
        if self.images_dir == self.annotations_dir:
            return f"{self.images_dir or '.'}/ (images with their XMLs)"
        return f"{self.images_dir}/ + {self.annotations_dir}/"


def _image_index(root: DataRoot, images_dir: str) -> tuple[dict[str, str], dict[str, str]]:
    """(stem -> file name, lower-case file name -> file name) of the images in a folder. A
    stem with several images keeps the first of IMAGE_EXTENSIONS (then the name's order)."""
    names = [n for n in root.listdir(images_dir)[0] if is_image(n)]
    rank = {ext: i for i, ext in enumerate(IMAGE_EXTENSIONS)}
    by_stem: dict[str, str] = {}
    for name in sorted(names, key=lambda n: (rank[posixpath.splitext(n)[1].lower()], n)):
        by_stem.setdefault(posixpath.splitext(name)[0], name)
    return by_stem, {n.casefold(): n for n in names}


def _named_in_xml(root: DataRoot, annotation: str) -> str | None:
    """The base name the XML's ``<filename>`` gives (tools write a bare name, a Windows path
    or a path of the labelling machine: only its last part can name a file here)."""
    ann, _ = load_annotation(root, annotation)  # an unreadable XML: the parse reports it
    name = (ann or {}).get("filename")
    if not isinstance(name, str) or not name.strip():
        return None
    return posixpath.basename(name.strip().replace("\\", "/"))


def _image_for(root: DataRoot, stem: str, annotation: str, images: tuple[dict[str, str], dict[str, str]]) -> str | None:
    """The image file (a name in the folder) of the XML ``annotation`` whose stem is ``stem``."""
    by_stem, by_name = images
    if stem in by_stem:
        return by_stem[stem]
    named = _named_in_xml(root, annotation)
    if named is not None:
        return by_name.get(named.casefold())
    return None


def pair_folder(root: DataRoot, folder: _Folder) -> tuple[list[ImageEntry], int]:
    """Entries of every XML in the folder, paired with its image, and the number of images
    that no XML names (unlabelled: left out). An XML without an image still gets an entry,
    which the parse reports as a missing image."""
    images = _image_index(root, folder.images_dir)
    xmls = [n for n in root.listdir(folder.annotations_dir)[0] if n.lower().endswith(".xml")]
    entries, used = [], set()
    for xml in xmls:
        stem = xml[:-4]
        annotation = join(folder.annotations_dir, xml)
        name = _image_for(root, stem, annotation, images)
        used.add(name)
        entries.append(ImageEntry(stem, join(folder.images_dir, name or f"{stem}.jpg"), annotation))
    return entries, len(set(images[0].values()) - used)


def devkit_entries(root: DataRoot, ids: Sequence[str], folder: _Folder) -> list[ImageEntry]:
    """Entries of the ids a split file lists: ``Annotations/<id>.xml`` and the image of that
    stem in ``JPEGImages/`` (any extension), or the one its XML's ``<filename>`` names."""
    images = _image_index(root, folder.images_dir)
    entries = []
    for image_id in ids:
        entry = ImageEntry.devkit(image_id)
        if entry.error is None:
            annotation = join(folder.annotations_dir, f"{image_id}.xml")
            name = _image_for(root, image_id, annotation, images)
            entry = ImageEntry(image_id, join(folder.images_dir, name or f"{image_id}.jpg"), annotation)
        entries.append(entry)
    return entries


# --------------------------------------------------------------------------- finding the layout


def _explicit_folder(root: DataRoot, cfg: Any, dirs: list[str]) -> _Folder | None:
    images_dir, annotations_dir = cfg.get("images_dir"), cfg.get("annotations_dir")
    if not images_dir and not annotations_dir:
        return None
    for key, rel in (("images_dir", images_dir), ("annotations_dir", annotations_dir)):
        if rel and not root.is_dir(rel):
            raise DatasetError(f"dataset.{key}={rel}: no such folder in {root} ({describe_root(root, *root.listdir())})")
    if not annotations_dir:  # XMLs beside the images, or in a folder found by its name
        has_xml = any(n.lower().endswith(".xml") for n in root.listdir(images_dir)[0])
        annotations_dir = images_dir if has_xml else pick(dirs, ANNOTATION_DIR_NAMES) or images_dir
    if not images_dir:
        has_images = any(is_image(n) for n in root.listdir(annotations_dir)[0])
        images_dir = annotations_dir if has_images else pick(dirs, IMAGE_DIR_NAMES) or annotations_dir
    return _Folder(join(images_dir), join(annotations_dir))


def _folder_of(root: DataRoot, rel: str) -> _Folder | None:
    """How the folder ``rel`` holds images and XMLs: side by side, or in two subfolders."""
    files, dirs = root.listdir(rel)
    if any(f.lower().endswith(".xml") for f in files) and any(is_image(f) for f in files):
        return _Folder(rel, rel)
    images, annotations = pick(dirs, IMAGE_DIR_NAMES), pick(dirs, ANNOTATION_DIR_NAMES)
    if images and annotations:
        return _Folder(join(rel, images), join(rel, annotations))
    return None


def find_voc_layout(root: DataRoot, cfg: Any) -> Layout:
    """The layout of the VOC-XML export in ``root`` and its train and val entries."""
    files, dirs = root.listdir()
    if not files and not dirs and not root.is_dir():
        raise DatasetError(f"dataset.root={root} does not exist or is not a folder")
    folder = _explicit_folder(root, cfg, dirs) or _folder_of(root, "")
    if folder is not None:
        layout = _one_folder(root, folder, cfg)
    elif split_folder(dirs, cfg.train_split) and _folder_of(root, split_folder(dirs, cfg.train_split)):
        layout = _split_folders(root, dirs, cfg)
    else:
        raise DatasetError(_not_a_layout(root, files, dirs, cfg))
    labelmap = _labelmap(root, files)
    if labelmap:
        layout.class_names = labelmap
        layout.notes.append(f"class names from {LABELMAP_FILE}")
    return layout


def _one_folder(root: DataRoot, folder: _Folder, cfg: Any) -> Layout:
    """The root's images and XMLs in one place: split by ImageSets/Main, by split subfolders
    of both folders, or by the seed."""
    what = folder.label()
    split_files = [n[:-4] for n in root.listdir(SPLITS_DIR)[0] if n.endswith(".txt")]
    if cfg.train_split and cfg.train_split in split_files:
        return _devkit_splits(root, folder, split_files, cfg)
    image_dirs, annotation_dirs = root.listdir(folder.images_dir)[1], root.listdir(folder.annotations_dir)[1]
    train_name = split_folder(image_dirs, cfg.train_split)
    if folder.images_dir != folder.annotations_dir and train_name and split_folder(annotation_dirs, cfg.train_split):
        return _split_subfolders(root, folder, image_dirs, annotation_dirs, cfg)
    entries, unlabelled = pair_folder(root, folder)
    train, val = _seeded(entries, cfg)
    layout = Layout(f"{what}, split by dataset.val_fraction={cfg.val_fraction} (seed {cfg.split_seed})", train, val)
    if split_files:  # CVAT writes ImageSets/Main/default.txt only
        shown = ", ".join(f"{n}.txt" for n in sorted(split_files)[:8])
        layout.notes.append(
            f"{SPLITS_DIR}/ has no {cfg.train_split}.txt (it has {shown}): every annotated image is split by the seed; "
            f"set dataset.train_split / dataset.val_split to use its files"
        )
    _note_unlabelled(layout, unlabelled, f"{folder.images_dir}/" if folder.images_dir else "the root folder")
    return layout


def _devkit_splits(root: DataRoot, folder: _Folder, split_files: list[str], cfg: Any) -> Layout:
    """The VOCdevkit's ``ImageSets/Main/<split>.txt``; without a val file, val is cut from
    the train file's ids by the seed."""
    what = f"{folder.label()}, split by {SPLITS_DIR}/{cfg.train_split}.txt"
    train = devkit_entries(root, read_split_ids(root, cfg.train_split), folder)
    notes = []
    if cfg.val_split and cfg.val_split in split_files:
        val = devkit_entries(root, read_split_ids(root, cfg.val_split), folder)
        what += f", {cfg.val_split}.txt"
        if cfg.val_split == cfg.train_split:
            notes.append(f"dataset.train_split and dataset.val_split are both {cfg.train_split!r}: validation scores the training images")
    elif cfg.val_split:
        train, val = _seeded(train, cfg)
        what += f" (no {cfg.val_split}.txt: val cut from it by dataset.val_fraction={cfg.val_fraction})"
    else:
        val = []
    return Layout(what, train, val, notes=notes)


def _split_subfolders(root: DataRoot, folder: _Folder, image_dirs: list[str], annotation_dirs: list[str], cfg: Any) -> Layout:
    """``images/<split>/`` with ``annotations/<split>/``."""
    splits = {}
    for key in ("train_split", "val_split"):
        name = split_folder(image_dirs, cfg[key])
        if name and split_folder(annotation_dirs, cfg[key]):
            sub = _Folder(join(folder.images_dir, name), join(folder.annotations_dir, split_folder(annotation_dirs, cfg[key])))
            splits[key] = (sub, *pair_folder(root, sub))
    train_folder, train, unlabelled = splits["train_split"]
    if "val_split" in splits:
        val_folder, val, val_unlabelled = splits["val_split"]
        what = f"{train_folder.label()} and {val_folder.label()}"
    else:
        train, val = _seeded(train, cfg)
        val_unlabelled, what = 0, f"{train_folder.label()}, split by dataset.val_fraction={cfg.val_fraction}"
    layout = Layout(what, train, val)
    _note_unlabelled(layout, unlabelled + val_unlabelled, folder.images_dir)
    return layout


def _split_folders(root: DataRoot, dirs: list[str], cfg: Any) -> Layout:
    """Roboflow's ``train/ valid/ test/``, each image's XML beside it."""
    train_name = split_folder(dirs, cfg.train_split)
    train_folder = _folder_of(root, train_name)
    train, unlabelled = pair_folder(root, train_folder)
    val_name = split_folder(dirs, cfg.val_split)
    val_folder = _folder_of(root, val_name) if val_name else None
    if val_folder is not None:
        val, val_unlabelled = pair_folder(root, val_folder)
        what = f"split folders {train_name}/ and {val_name}/" + (
            f" ({val_name}/ for dataset.val_split={cfg.val_split})" if val_name != cfg.val_split else "")
    else:
        train, val = _seeded(train, cfg)
        val_unlabelled = 0
        what = f"split folder {train_name}/ (no {cfg.val_split}/ folder: split by dataset.val_fraction={cfg.val_fraction})" \
            if cfg.val_split else f"split folder {train_name}/"
    layout = Layout(what, train, val)
    _note_unlabelled(layout, unlabelled + val_unlabelled, "the split folders")
    return layout


def _seeded(entries: list[ImageEntry], cfg: Any) -> tuple[list[ImageEntry], list[ImageEntry]]:
    by_id = {e.image_id: e for e in entries}
    train_ids, val_ids = seeded_split(list(by_id), cfg.val_fraction, cfg.split_seed)
    return [by_id[i] for i in train_ids], [by_id[i] for i in val_ids]


def _note_unlabelled(layout: Layout, count: int, where: str) -> None:
    if count:
        layout.notes.append(f"{count} image(s) in {where} have no XML: left out (unlabelled)")


def _labelmap(root: DataRoot, files: list[str]) -> list[str] | None:
    """Class names of CVAT's labelmap.txt in its order, background left out."""
    name = pick(files, (LABELMAP_FILE,))
    if name is None:
        return None
    text = root.read_bytes(name).decode("utf-8-sig", errors="replace")
    names = [line.split(":")[0].strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return [n for n in names if n and n.lower() != "background"] or None


def _not_a_layout(root: DataRoot, files: list[str], dirs: list[str], cfg: Any) -> str:
    nested = [d for d in dirs if _folder_of(root, d) is not None and not split_folder([d], cfg.train_split)]
    hint = f" (did you mean dataset.root={root.display(nested[0])}?)" if len(nested) == 1 else ""
    return (
        f"dataset.root={root}: no VOC-XML layout found{hint}. It holds {describe_root(root, files, dirs)}. "
        "detexp reads: a folder of images with their XMLs; images/ (or JPEGImages/, data/) with "
        "Annotations/ (or annotations/, labels/); split folders train/ valid/ with XMLs beside the images. "
        "Set dataset.images_dir and dataset.annotations_dir (relative to the root) for other folder "
        "names, dataset.train_split / dataset.val_split for other split names, or use dataset=coco for COCO JSON"
    )
