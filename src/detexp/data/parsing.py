"""Parsing and validating one VOC annotation and its image.

:func:`parse_record` turns one id into a :class:`~detexp.data.voc.VOCRecord` (boxes,
labels, difficult flags, the image's real size) or into a list of
:class:`~detexp.data.voc.Problem` s that name the file and say what is wrong. It never
imports Ray, Hydra or MLflow, so the datasource, ``data check`` and the tests share it.

Conventions kept from the VOC devkit:

* Box coordinates are returned exactly as written in the XML (1-based pixel
  indices in VOC itself), only clipped to ``[0, width] x [0, height]``. Converting
  to another convention is the caller's business.
* The image size comes from the JPEG header, not from the XML ``<size>``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import xmltodict
from PIL import Image, ImageFile

from detexp.data.voc import (
    Problem,
    VOCRecord,
    annotation_path,
    annotation_relpath,
    image_path,
    image_relpath,
)
from detexp.errors import DatasetError

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


def _inspect_image(path: Path, verify: bool) -> _ImageInfo:
    """Open the image header (and decode it fully when ``verify``); never raises."""
    info = _ImageInfo()
    try:
        with Image.open(path) as img:
            info.width, info.height = img.size
            info.mode = img.mode
            if "exif" in img.info:
                info.orientation = int(img.getexif().get(_EXIF_ORIENTATION_TAG, 1) or 1)
            if verify:
                _decode_fully(img)
    except FileNotFoundError:
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


def _load_annotation(path: Path) -> tuple[dict | None, str | None]:
    """(the <annotation> dict, None) or (None, what is wrong)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, "annotation file is missing"
    except OSError as exc:
        return None, f"annotation file cannot be read: {exc}"
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


def _size_mismatch(ann: dict, width: int, height: int) -> str | None:
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
        f"XML <size> {xml_w}x{xml_h} differs from the image's {width}x{height}; "
        "using the image size (were the images resized after labelling?)"
    )


def parse_record(
    root: Path, image_id: str, classes: Sequence[str], verify_image: bool = False
) -> tuple[VOCRecord | None, list[Problem]]:
    """Parse one image's annotation and check it against its JPEG.

    Returns ``(record, warnings)`` when the image is usable and ``(None, problems)``
    as soon as any problem is an error. Never raises for bad data (a malformed id
    becomes an error Problem too); raises DatasetError only for a bad class list.
    With ``verify_image`` the JPEG is fully decoded (slow; ``data check``),
    otherwise only its header is read for the size (one XML parse, one header open).
    """
    index = _class_index(tuple(classes))
    root = Path(root)
    try:
        xml_file, jpg_file = annotation_path(root, image_id), image_path(root, image_id)
    except DatasetError as exc:
        return None, [Problem(str(image_id), str(image_id), str(exc), "error")]

    problems: list[Problem] = []
    ann_rel, img_rel = annotation_relpath(image_id), image_relpath(image_id)

    def report(file: str, message: str, severity: str = "error", unknown_class: str | None = None) -> None:
        problems.append(Problem(image_id, file, message, severity, unknown_class))

    image = _inspect_image(jpg_file, verify_image)
    if image.error:
        report(img_rel, image.error)
    else:
        _report_image_warnings(image, img_rel, report)

    ann, ann_error = _load_annotation(xml_file)
    if ann is None:
        report(ann_rel, ann_error or "annotation cannot be read")
        return None, problems

    if not image.error:
        mismatch = _size_mismatch(ann, image.width, image.height)
        if mismatch:
            report(ann_rel, mismatch, "warning")

    boxes, labels, difficult = _parse_objects(ann.get("object") or [], index, image, report, ann_rel)
    if any(p.severity == "error" for p in problems):
        return None, problems

    box_array = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    # Inside the tolerance clip silently; errors above caught anything further out.
    np.clip(box_array, 0, [image.width, image.height, image.width, image.height], out=box_array)
    record = VOCRecord(
        image_id=image_id,
        width=image.width,
        height=image.height,
        boxes=box_array,
        labels=np.asarray(labels, dtype=np.int64),
        difficult=np.asarray(difficult, dtype=bool),
    )
    return record, problems


def _parse_objects(objects: list, index, image: _ImageInfo, report, ann_rel: str):
    """The usable objects' boxes, labels and difficult flags; each problem goes to
    ``report``, and so do the annotation-wide warnings (no objects, fractional boxes)."""
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
    if n_fractional:
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
    where = f"object {number}" + (f" {name!r}" if name else "")
    ok = True
    if not name:
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
    root: Path, ids: Sequence[str], classes: Sequence[str]
) -> tuple[list[VOCRecord], list[Problem]]:
    """Parse and fully decode every listed image: (usable records, all problems in id order)."""
    records: list[VOCRecord] = []
    problems: list[Problem] = []
    for image_id in ids:
        record, found = parse_record(root, image_id, classes, verify_image=True)
        problems.extend(found)
        if record is not None:
            records.append(record)
    return records, problems


def object_name_images(root: Path, ids: Sequence[str]) -> dict[str, int]:
    """Object name -> number of the listed images whose annotation uses it, for every name
    (in ``dataset.classes`` or not), read as :func:`parse_record` reads it (stripped).

    Only the XML is read. Annotations that cannot be read and ids that leave the root count
    for nothing: :func:`parse_record` reports those. This is what a summary of unknown class
    names needs that the problems cannot tell: whether the configured classes appear at all.
    """
    counts: Counter[str] = Counter()
    for image_id in ids:
        try:
            ann, _ = _load_annotation(annotation_path(Path(root), image_id))
        except DatasetError:
            continue
        objects = (ann or {}).get("object") or []
        counts.update({name for obj in objects if isinstance(obj, dict) and (name := _text(obj.get("name")))})
    return dict(counts)
