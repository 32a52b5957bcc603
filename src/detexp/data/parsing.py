"""Parsing and validating one image's annotation (a VOC XML, or its objects from a COCO
JSON) and the image itself.

:func:`parse_record` turns one :class:`~detexp.data.voc.ImageEntry` into a
:class:`~detexp.data.voc.VOCRecord` (boxes, labels, difficult flags, the image's real size)
or into a list of :class:`~detexp.data.voc.Problem` s that name the file and say what is
wrong. COCO objects are put into the shape of a parsed XML first, so both formats meet one
policy. It never imports Ray, Hydra or MLflow, so the datasource, ``data check`` and the
tests share it.

Conventions kept from the VOC devkit:

* Box coordinates are returned exactly as written in the XML (1-based pixel
  indices in VOC itself), only clipped to ``[0, width] x [0, height]``. Converting
  to another convention is the caller's business.
* The image size comes from the image header, not from the XML ``<size>``.
* COCO ``[x, y, w, h]`` boxes become ``[x, y, x + w, y + h]``; ``iscrowd`` boxes are
  ignored in evaluation as VOC's difficult ones are.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

import numpy as np
import xmltodict
from PIL import Image, ImageFile

from detexp.data.files import DataRoot, as_root, first_line
from detexp.data.voc import ImageEntry, Problem, VOCRecord
from detexp.errors import DatasetError

T = TypeVar("T")
R = TypeVar("R")

# Coordinates may stray this far outside the image before it counts as an error;
# many tools write xmax = width + 1 or xmin = 0 for boxes touching the border.
OUTSIDE_TOLERANCE_PX = 1.0

_COORD_KEYS = ("xmin", "ymin", "xmax", "ymax")
_MODE_NAMES = {
    "1": "black-and-white",
    "L": "grayscale",
    "LA": "grayscale with alpha",
    "P": "palette",
    "CMYK": "CMYK",
    "YCbCr": "YCbCr",
    "RGBA": "RGBA",
    "I;16": "16-bit grayscale",
    "I": "32-bit integer",
    "F": "32-bit float",
}
_EXIF_ORIENTATION_TAG = 0x0112


# --------------------------------------------------------------------------- parsing


@lru_cache(maxsize=32)
def _class_index(classes: tuple[str, ...]) -> dict[str, int]:
    """Name -> 1-based label. Bad class lists are configuration errors, so this raises."""
    if not classes:
        raise DatasetError("the class list is empty")
    index: dict[str, int] = {}
    for i, name in enumerate(classes, start=1):
        if not isinstance(name, str) or not name.strip():
            raise DatasetError(f"class {i} has an empty or non-string name: {name!r}")
        if name in index:
            raise DatasetError(f"class {name!r} appears twice in the class list")
        index[name] = i
    return index


def _text(node: object) -> str | None:
    """Stripped text of an xmltodict node (plain string or {'#text': ...}); None if absent."""
    if isinstance(node, dict):
        node = node.get("#text")
    if isinstance(node, str):
        return node.strip()
    if isinstance(node, int | float) and not isinstance(node, bool):  # a COCO number
        return repr(node)
    return None


def _unknown_class_message(name: str, index: dict[str, int]) -> str:
    lowered = {c.lower(): c for c in index}
    hint = lowered.get(name.lower())
    if hint is not None:
        return f"unknown class {name!r} (did you mean {hint!r}?)"
    return f"unknown class {name!r}"


class _ImageInfo:
    """What parse_record needs from the image file; ``error`` set when it is unusable."""

    __slots__ = ("width", "height", "mode", "orientation", "error")

    def __init__(self) -> None:
        self.width = self.height = 0
        self.mode = ""
        self.orientation = 1
        self.error: str | None = None


def _inspect_image(root: DataRoot, rel: str, verify: bool) -> _ImageInfo:
    """Open the image header (and decode it fully when ``verify``); never raises."""
    info = _ImageInfo()
    try:
        with Image.open(root.open(rel)) as img:
            info.width, info.height = img.size
            info.mode = img.mode
            if "exif" in img.info:
                info.orientation = int(img.getexif().get(_EXIF_ORIENTATION_TAG, 1) or 1)
            if verify:
                _decode_fully(img)
    except (FileNotFoundError, IsADirectoryError):
        info.error = "image file is missing"
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
        info.error = f"image cannot be read: {_describe_image_error(exc)}"
    return info


def _decode_fully(img: Image.Image) -> None:
    """Decode every pixel, so truncated files fail here rather than mid-training.

    Pillow's LOAD_TRUNCATED_IMAGES is a process-wide switch other code may have
    turned on; a check that silently accepts truncated files is worse than useless,
    so force it off for the duration of this call.
    """
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        img.load()
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _describe_image_error(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    # Pillow's "cannot identify image file '/abs/path'" repeats the path we already name.
    if "cannot identify image file" in text:
        return "not a recognised image format"
    return text


def load_annotation(root: DataRoot, rel: str) -> tuple[dict | None, str | None]:
    """(the <annotation> dict, None) or (None, what is wrong)."""
    try:
        data = root.read_bytes(rel)
    except (FileNotFoundError, IsADirectoryError):
        return None, "annotation file is missing"
    except OSError as exc:
        return None, f"annotation file cannot be read: {first_line(exc)}"
    if not data.strip():
        return None, "annotation file is empty"
    try:
        # force_list: one <object> must come back as a one-element list, not a dict.
        doc = xmltodict.parse(data, force_list=("object",))
    except Exception as exc:  # noqa: BLE001 - ExpatError, or entity declarations rejected
        return None, f"XML does not parse: {exc}"
    ann = doc.get("annotation") if isinstance(doc, dict) else None
    if not isinstance(ann, dict):
        root_tag = next(iter(doc), "?") if isinstance(doc, dict) else "?"
        if root_tag == "annotation":  # <annotation/> with nothing inside
            return {}, None
        return None, f"root element is <{root_tag}>, expected <annotation>"
    return ann, None


def _parse_difficult(node: object) -> bool | None:
    """VOC writes 0/1, some export tools true/false; absent or empty means 0. None for
    anything else."""
    text = _text(node)
    if text is None or text.lower() in ("", "0", "false"):
        return False
    if text.lower() in ("1", "true"):
        return True
    return None


def _parse_coords(bndbox: dict) -> tuple[list[float] | None, str | None]:
    """([xmin, ymin, xmax, ymax], None) or (None, what is wrong)."""
    coords: list[float] = []
    for key in _COORD_KEYS:
        text = _text(bndbox.get(key))
        if text is None or text == "":
            return None, f"missing <{key}>"
        try:
            value = float(text)
        except ValueError:
            return None, f"non-numeric <{key}> {text!r}"
        if not math.isfinite(value):
            return None, f"non-numeric <{key}> {text!r}"
        coords.append(value)
    return coords, None


def _fmt(value: float) -> str:
    return str(int(value)) if value == int(value) else f"{value:g}"


def _box_shape_problem(xmin: float, ymin: float, xmax: float, ymax: float) -> str | None:
    """Inverted or zero-size box (torchvision asserts on both)."""
    issues = []
    for lo_key, lo, hi_key, hi, what in (
        ("xmin", xmin, "xmax", xmax, "width"),
        ("ymin", ymin, "ymax", ymax, "height"),
    ):
        if hi < lo:
            issues.append(f"{hi_key} {_fmt(hi)} < {lo_key} {_fmt(lo)} (inverted box)")
        elif hi == lo:
            issues.append(f"{hi_key} {_fmt(hi)} == {lo_key} {_fmt(lo)} (zero {what})")
    return "; ".join(issues) or None


def _box_bounds_problem(coords: Sequence[float], width: int, height: int) -> str | None:
    """Coordinates more than OUTSIDE_TOLERANCE_PX outside the image."""
    issues = []
    for key, value in zip(_COORD_KEYS, coords, strict=True):
        limit = width if key[0] == "x" else height
        if value < -OUTSIDE_TOLERANCE_PX or value > limit + OUTSIDE_TOLERANCE_PX:
            side = "width" if key[0] == "x" else "height"
            issues.append(f"{key} {_fmt(value)} outside image {side} {limit}")
    return "; ".join(issues) or None


def _size_mismatch(ann: dict, width: int, height: int, what: str = "XML <size>") -> str | None:
    """A <size> that disagrees with the JPEG usually means images were resized after labelling."""
    size = ann.get("size")
    if not isinstance(size, dict):
        return None
    try:
        xml_w, xml_h = int(float(_text(size.get("width")))), int(float(_text(size.get("height"))))
    except (TypeError, ValueError):
        return None
    if xml_w <= 0 or xml_h <= 0 or (xml_w, xml_h) == (width, height):
        return None  # absent/zero sizes are common in exports and harmless
    return (
        f"{what} {xml_w}x{xml_h} differs from the image's {width}x{height}; "
        "using the image size (were the images resized after labelling?)"
    )


def parse_record(
    root: DataRoot | Path | str, entry: ImageEntry | str, classes: Sequence[str], verify_image: bool = False
) -> tuple[VOCRecord | None, list[Problem]]:
    """Parse one image's annotation and check it against its image.

    ``entry`` is an :class:`ImageEntry` (a plain id means the devkit's paths of that id).
    Returns ``(record, warnings)`` when the image is usable and ``(None, problems)``
    as soon as any problem is an error. Never raises for bad data (a malformed id
    becomes an error Problem too); raises DatasetError only for a bad class list.
    With ``verify_image`` the image is fully decoded (slow; ``data check``),
    otherwise only its header is read for the size (one XML parse, one header open).
    """
    index = _class_index(tuple(classes))
    root = as_root(root)
    if isinstance(entry, str):
        entry = ImageEntry.devkit(entry)
    image_id, ann_rel, img_rel = entry.image_id, entry.annotation, entry.image
    if entry.error is not None:
        return None, [Problem(image_id, ann_rel, entry.error, "error")]

    problems: list[Problem] = []

    def report(file: str, message: str, severity: str = "error", unknown_class: str | None = None) -> None:
        problems.append(Problem(image_id, file, message, severity, unknown_class))

    image = _inspect_image(root, img_rel, verify_image)
    if image.error:
        report(img_rel, image.error)
    else:
        _report_image_warnings(image, img_rel, report)

    if entry.objects is not None:
        ann, ann_error = _coco_annotation(entry), None
    else:
        ann, ann_error = load_annotation(root, ann_rel)
    if ann is None:
        report(ann_rel, ann_error or "annotation cannot be read")
        return None, problems

    if not image.error:
        mismatch = _size_mismatch(ann, image.width, image.height, "COCO width/height" if entry.objects is not None else "XML <size>")
        if mismatch:
            report(ann_rel, mismatch, "warning")

    boxes, labels, difficult = _parse_objects(
        ann.get("object") or [], index, image, report, ann_rel, integer_pixels=entry.objects is None,
    )
    if any(p.severity == "error" for p in problems):
        return None, problems

    box_array = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    # Inside the tolerance clip silently; errors above caught anything further out.
    np.clip(box_array, 0, [image.width, image.height, image.width, image.height], out=box_array)
    record = VOCRecord(
        image_id=image_id,
        width=image.width,
        height=image.height,
        image=img_rel,
        boxes=box_array,
        labels=np.asarray(labels, dtype=np.int64),
        difficult=np.asarray(difficult, dtype=bool),
    )
    return record, problems


def _coco_annotation(entry: ImageEntry) -> dict:
    """A COCO image's objects in the shape of a parsed VOC XML, for the same checks."""
    objects = []
    for ref, name, x, y, w, h, iscrowd in entry.objects:
        obj: dict = {"_ref": ref, "difficult": "1" if iscrowd else "0"}
        if name is None:
            obj["_error"] = "unknown category id"
        else:
            obj["name"] = name
        if None not in (x, y, w, h):
            obj["bndbox"] = {"xmin": x, "ymin": y, "xmax": x + w, "ymax": y + h}
        objects.append(obj)
    size = {"width": entry.size[0], "height": entry.size[1]} if entry.size else None
    return {"object": objects, "size": size}


def _parse_objects(objects: list, index, image: _ImageInfo, report, ann_rel: str, integer_pixels: bool = True):
    """The usable objects' boxes, labels and difficult flags; each problem goes to
    ``report``, and so do the annotation-wide warnings (no objects; fractional boxes where
    ``integer_pixels``, as VOC XML has them: COCO's boxes are fractional by definition)."""
    boxes: list[list[float]] = []
    labels: list[int] = []
    difficult: list[bool] = []
    n_fractional = 0
    for number, obj in enumerate(objects, start=1):
        parsed = _parse_object(number, obj, index, image, report=report, ann_rel=ann_rel)
        if parsed is None:
            continue
        coords, label, is_difficult = parsed
        n_fractional += any(c != int(c) for c in coords)
        boxes.append(coords)
        labels.append(label)
        difficult.append(is_difficult)
    if not objects:
        report(ann_rel, "no objects (used as a negative image)", "warning")
    if n_fractional and integer_pixels:
        report(
            ann_rel,
            f"non-integer box coordinates in {n_fractional} of {len(objects)} objects "
            "(VOC uses integer pixel indices; kept as written)",
            "warning",
        )
    return boxes, labels, difficult


def _report_image_warnings(image: _ImageInfo, img_rel: str, report) -> None:
    if image.mode != "RGB":
        kind = _MODE_NAMES.get(image.mode, image.mode)
        report(img_rel, f"{kind} image (mode {image.mode}); training converts it to RGB", "warning")
    if image.orientation not in (0, 1):
        # Training reads pixels as stored; tools that honour EXIF rotation would
        # have drawn the boxes on a rotated picture.
        report(
            img_rel,
            f"EXIF orientation {image.orientation}: pixels are used as stored, not rotated; "
            "check that the boxes were drawn on the unrotated image",
            "warning",
        )


def _parse_object(
    number: int, obj: object, index: dict[str, int], image: _ImageInfo, report, ann_rel: str
) -> tuple[list[float], int, bool] | None:
    """(coords, label, difficult) for one <object>, or None after reporting its errors."""
    if not isinstance(obj, dict):
        report(ann_rel, f"object {number} is empty")
        return None
    name = _text(obj.get("name"))
    where = obj.get("_ref") or f"object {number}" + (f" {name!r}" if name else "")
    ok = True
    if obj.get("_error"):
        report(ann_rel, f"{obj['_error']} in {where}")
        ok = False
    elif not name:
        report(ann_rel, f"missing <name> in {where}")
        ok = False
    elif name not in index:
        report(ann_rel, f"{_unknown_class_message(name, index)} in {where}", unknown_class=name)
        ok = False

    is_difficult = _parse_difficult(obj.get("difficult"))
    if is_difficult is None:
        report(ann_rel, f"<difficult> {_text(obj.get('difficult'))!r} is not 0 or 1 in {where}")
        ok = False

    bndbox = obj.get("bndbox")
    if isinstance(bndbox, list):
        report(ann_rel, f"{len(bndbox)} <bndbox> elements in {where}; expected one")
        return None
    if not isinstance(bndbox, dict):
        report(ann_rel, f"no <bndbox> in {where}")
        return None
    coords, coord_error = _parse_coords(bndbox)
    if coords is None:
        report(ann_rel, f"{coord_error} in {where}")
        return None
    shape_error = _box_shape_problem(*coords)
    if shape_error:
        report(ann_rel, f"{shape_error} in {where}")
        return None
    if not image.error:
        bounds_error = _box_bounds_problem(coords, image.width, image.height)
        if bounds_error:
            report(ann_rel, f"{bounds_error} (more than 1 px) in {where}")
            return None
        # A box lying entirely in the tolerance margin collapses when clipped.
        xmin, ymin, xmax, ymax = coords
        if min(xmax, image.width) <= max(xmin, 0) or min(ymax, image.height) <= max(ymin, 0):
            report(ann_rel, f"box has zero size after clipping to the image in {where}")
            return None
    if not ok:
        return None
    return coords, index[name], bool(is_difficult)


# --------------------------------------------------------------------------- whole datasets


def check_dataset(
    root: DataRoot | Path | str, entries: Sequence[ImageEntry | str], classes: Sequence[str]
) -> tuple[list[VOCRecord], list[Problem]]:
    """Parse and fully decode every listed image: (usable records, all problems in entry order)."""
    records: list[VOCRecord] = []
    problems: list[Problem] = []
    for entry in entries:
        record, found = parse_record(root, entry, classes, verify_image=True)
        problems.extend(found)
        if record is not None:
            records.append(record)
    return records, problems


def object_names(root: DataRoot, entry: ImageEntry) -> set[str]:
    """The object names one image's annotation uses (stripped, as :func:`parse_record` reads
    them); empty when it cannot be read (:func:`parse_record` reports that)."""
    if entry.error is not None:
        return set()
    if entry.objects is not None:
        return {name for _, name, *_ in entry.objects if name}
    ann, _ = load_annotation(root, entry.annotation)
    objects = (ann or {}).get("object") or []
    return {name for obj in objects if isinstance(obj, dict) and (name := _text(obj.get("name")))}


def object_name_images(root: DataRoot | Path | str, entries: Sequence[ImageEntry | str]) -> dict[str, int]:
    """Object name -> number of the listed images whose annotation uses it, for every name
    (in ``dataset.classes`` or not).

    Only the annotations are read, by a few threads (a remote root answers each read after a
    round trip). This is what a summary of unknown class names, and classes read from the
    data, need that the problems cannot tell.
    """
    root = as_root(root)
    items = [ImageEntry.devkit(e) if isinstance(e, str) else e for e in entries]
    counts: Counter[str] = Counter()
    for names in read_each(root, lambda e: object_names(root, e), items):
        counts.update(names)
    return dict(counts)


REMOTE_READERS = 16  # threads that read a remote root's files: each read is a round trip


def read_each(root: DataRoot, read: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``read`` of every item, in order: by :data:`REMOTE_READERS` threads where ``root``
    is remote, one after the other where it is a local folder."""
    if not root.remote:
        return [read(item) for item in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(REMOTE_READERS) as pool:
        return list(pool.map(read, items))
