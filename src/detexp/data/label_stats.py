"""What ``detexp data show`` counts: label statistics of a dataset's splits, as a plain dict
(:func:`label_stats`) and as a text table (:func:`format_label_stats`), and which images
go into its grid of ground-truth boxes (:func:`pick_grid_images`).

Everything here is a pure function of parsed records (:class:`~detexp.data.voc.VOCRecord`),
so the numbers are those of the images training would use: boxes as parsed and clipped,
images with errors left out (and counted as ``skipped``). Drawing is done by
:mod:`detexp.commands.data_show`, which may use :mod:`detexp.evaluation.figures`; the data layer may not.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from detexp.data.files import DataRoot, as_root
from detexp.data.parsing import parse_record, read_each
from detexp.data.voc import ImageEntry, Problem, VOCRecord

# Histogram edges come from the ladder 1, 1.5, 2, 3, 4, 6, 8, 12, ... (and 1/x below 1 for
# aspect ratios): round numbers, two bins an octave, and the COCO small/medium limits of
# 32 and 96 px fall on edges.
_LADDER = sorted({m * 2.0**k for k in range(-4, 16) for m in (1.0, 1.5)})
_ASPECT_LADDER = sorted({x for x in _LADDER if x >= 1} | {1.0 / x for x in _LADDER if x > 1})
_BAR_WIDTH = 30  # characters of the longest histogram bar on the console
OBJECTS_PER_IMAGE_CAP = 10  # the tables and plots show "10+"; label_stats.json every count


def read_records(root: DataRoot | Path, entries: Sequence[ImageEntry | str], classes: Sequence[str]) -> tuple[list[VOCRecord], list[Problem]]:
    """(usable records, all problems) of ``entries``, reading only the image headers: fast,
    so a truncated JPEG counts as usable here (``data check`` decodes every pixel). A remote
    root is read by a few threads (each read is a round trip)."""
    records: list[VOCRecord] = []
    problems: list[Problem] = []
    root = as_root(root)
    for record, found in read_each(root, lambda entry: parse_record(root, entry, classes), entries):
        problems.extend(found)
        if record is not None:
            records.append(record)
    return records, problems


# --------------------------------------------------------------------------- statistics


def _box_sizes(record: VOCRecord) -> np.ndarray:
    """sqrt(area) of each box in the image's own pixels (before the model's resize)."""
    boxes = record.boxes.astype(np.float64)
    return np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))


def _aspect_ratios(record: VOCRecord) -> np.ndarray:
    boxes = record.boxes.astype(np.float64)
    return (boxes[:, 2] - boxes[:, 0]) / (boxes[:, 3] - boxes[:, 1])


def _edges(values: np.ndarray, ladder: Sequence[float]) -> list[float]:
    """The ladder's rungs from the last one <= min(values) to the first one > max(values)
    (0 or twice the maximum where the values leave the ladder); [] for no values."""
    if not len(values):
        return []
    low, high = float(values.min()), float(values.max())
    below = [x for x in ladder if x <= low]
    above = [x for x in ladder if x > high]
    start = below[-1] if below else 0.0
    stop = above[0] if above else 2 * high
    return [start] + [x for x in ladder if start < x < stop] + [stop]


def _histogram(values: np.ndarray, edges: Sequence[float]) -> list[int]:
    """counts[i] = values with edges[i] <= v < edges[i + 1]."""
    if len(edges) < 2:
        return []
    index = np.searchsorted(np.asarray(edges), values, side="right") - 1
    return np.bincount(index, minlength=len(edges) - 1).tolist()[: len(edges) - 1]


def _split_counts(records: Sequence[VOCRecord], classes: Sequence[str], listed: int) -> dict:
    per_class = {name: {"images": 0, "objects": 0, "difficult": 0} for name in classes}
    for record in records:
        for label in np.unique(record.labels):
            per_class[classes[label - 1]]["images"] += 1
        for label, difficult in zip(record.labels.tolist(), record.difficult.tolist(), strict=True):
            per_class[classes[label - 1]]["objects"] += 1
            per_class[classes[label - 1]]["difficult"] += int(difficult)
    return {
        "listed": listed,
        "images": len(records),
        "skipped": listed - len(records),
        "empty": sum(1 for r in records if not len(r.labels)),
        "objects": sum(len(r.labels) for r in records),
        "difficult": sum(int(r.difficult.sum()) for r in records),
        "classes": per_class,
    }


def label_stats(
    records: Mapping[str, Sequence[VOCRecord]], listed: Mapping[str, int], classes: Sequence[str]
) -> dict:
    """Label statistics of each split: ``records`` maps a split name (train, val) to its
    usable records, ``listed`` to how many ids the split file lists (the difference is
    ``skipped``). ``labels`` are 1-based into ``classes``. JSON-ready:

    - ``splits.<split>``: ``listed``, ``images`` (usable), ``skipped``, ``empty`` (usable,
      no objects), ``objects``, ``difficult``, and ``classes.<name>``: ``images`` (that
      hold the class), ``objects``, ``difficult``.
    - ``objects_per_image.<split>``: ``counts[k]`` = images with k objects.
    - ``box_size`` (sqrt of the box area in the image's pixels) and ``aspect_ratio``
      (width / height): ``edges`` shared by the splits, and per split ``counts[i]`` = boxes
      with ``edges[i] <= value < edges[i + 1]``.
    """
    splits = list(records)
    sizes = {s: np.concatenate([_box_sizes(r) for r in records[s]] or [np.zeros(0)]) for s in splits}
    ratios = {s: np.concatenate([_aspect_ratios(r) for r in records[s]] or [np.zeros(0)]) for s in splits}
    size_edges = _edges(np.concatenate(list(sizes.values()) or [np.zeros(0)]), _LADDER)
    ratio_edges = _edges(np.concatenate(list(ratios.values()) or [np.zeros(0)]), _ASPECT_LADDER)
    most = max((len(r.labels) for s in splits for r in records[s]), default=0)
    return {
        "classes": list(classes),
        "splits": {s: _split_counts(records[s], classes, listed[s]) for s in splits},
        "objects_per_image": {
            s: np.bincount([len(r.labels) for r in records[s]], minlength=most + 1).tolist() for s in splits
        },
        "box_size": {"edges": size_edges, **{s: _histogram(sizes[s], size_edges) for s in splits}},
        "aspect_ratio": {"edges": ratio_edges, **{s: _histogram(ratios[s], ratio_edges) for s in splits}},
    }


# --------------------------------------------------------------------------- text


def edge_label(value: float) -> str:
    """1.5 -> "1.5", 0.5 -> "1/2", 0.6667 -> "1/1.5": ratios below 1 read as fractions."""
    if value == 0 or value >= 1:
        return f"{value:g}"
    return f"1/{1 / value:.3g}"


def _widths(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[int]:
    return [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], bar: bool = False) -> list[str]:
    """Aligned columns: the first left, the others right, and a last ``bar`` column left."""
    widths = _widths(header, rows)

    def line(row: Sequence[str]) -> str:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        if bar:
            cells[-1] = row[-1]
        return "  ".join(cells).rstrip()

    return [line(header)] + [line(row) for row in rows]


def _histogram_lines(title: str, bins: Sequence[str], counts: Mapping[str, Sequence[int]]) -> list[str]:
    """One row per bin: its count in each split and a bar of the splits' total."""
    totals = [sum(c[i] for c in counts.values()) for i in range(len(bins))]
    scale = _BAR_WIDTH / max(max(totals, default=0), 1)
    rows = [
        [f"  {name}", *(str(c[i]) for c in counts.values()), "#" * math.ceil(totals[i] * scale)]
        for i, name in enumerate(bins)
    ]
    return _table([title, *counts, ""], rows, bar=True) + ([] if bins else ["  (no objects)"])


_CLASS_COLUMNS = ("images", "objects", "difficult")


def _class_lines(stats: dict) -> list[str]:
    """Per class, for each split: images that hold the class, objects, difficult objects;
    then the split's totals, its images without objects and the images skipped."""
    splits = stats["splits"]
    rows = [
        [name, *(str(splits[s]["classes"][name][what]) for s in splits for what in _CLASS_COLUMNS)]
        for name in stats["classes"]
    ]
    rows.append(["all usable images", *(str(splits[s][what]) for s in splits for what in _CLASS_COLUMNS)])
    for key, title in (("empty", "  without objects"), ("skipped", "skipped (errors)")):
        rows.append([title, *(cell for s in splits for cell in (str(splits[s][key]), "", ""))])
    header = ["class", *(_CLASS_COLUMNS * len(splits))]
    widths = _widths(header, rows)
    # Above each split's three columns, its name centred in dashes.
    above = " " * widths[0]
    for k, split in enumerate(splits):
        span = sum(widths[1 + 3 * k: 4 + 3 * k]) + 4
        above += "  " + f" {split} ".center(span, "-")
    return [above, *_table(header, rows)]


def format_label_stats(stats: dict) -> str:
    """The console view of :func:`label_stats`: the class table, then the three histograms
    (counts per split and a bar of their total)."""
    splits = list(stats["splits"])
    lines = _class_lines(stats)
    lines += ["", *_histogram_lines("objects per image", *objects_per_image_bins(stats))]
    for key, title in (("box_size", "box size, sqrt(area) px"), ("aspect_ratio", "aspect ratio, w/h")):
        bins = bin_labels(stats[key]["edges"], ratio=key == "aspect_ratio")
        lines += ["", *_histogram_lines(title, bins, {s: stats[key][s] for s in splits})]
    return "\n".join(lines)


def objects_per_image_bins(stats: dict, cap: int = OBJECTS_PER_IMAGE_CAP) -> tuple[list[str], dict[str, list[int]]]:
    """(labels "0", "1", ..., "{cap}+", counts per split): images with ``cap`` or more
    objects in one bin, so a crowded image does not add fifty rows."""
    n_bins = max((len(c) for c in stats["objects_per_image"].values()), default=0)
    per_image = {s: [*c, *[0] * (n_bins - len(c))] for s, c in stats["objects_per_image"].items()}
    if n_bins <= cap + 1:
        return [str(k) for k in range(n_bins)], per_image
    return [*(str(k) for k in range(cap)), f"{cap}+"], {s: [*c[:cap], sum(c[cap:])] for s, c in per_image.items()}


def bin_labels(edges: Sequence[float], ratio: bool = False) -> list[str]:
    """["16-24", "24-32", ...] for edges [16, 24, 32, ...]; with ``ratio``, edges below 1
    as fractions ("1/2-1/1.5")."""
    label = edge_label if ratio else (lambda value: f"{value:g}")
    return [f"{label(a)}-{label(b)}" for a, b in zip(edges, edges[1:], strict=False)]


# --------------------------------------------------------------------------- the grid


def pick_grid_images(records: Sequence[VOCRecord], n: int, num_classes: int) -> list[VOCRecord]:
    """Up to ``n`` records, in their given order: first, for each class from the rarest up,
    one image that shows it (so every class is seen once if ``n`` allows), then images
    spread evenly over the rest. Deterministic: the same records give the same picture."""
    if n <= 0 or not records:
        return []
    images_of = {label: [i for i, r in enumerate(records) if label in r.labels] for label in range(1, num_classes + 1)}
    chosen: list[int] = []
    for label in sorted(images_of, key=lambda k: (len(images_of[k]), k)):
        free = [i for i in images_of[label] if i not in chosen]
        if free and len(chosen) < n:
            chosen.append(free[0])
    rest = [i for i in range(len(records)) if i not in chosen]
    missing = min(n - len(chosen), len(rest))
    chosen += [rest[int(k * len(rest) / missing)] for k in range(missing)]
    return [records[i] for i in sorted(chosen)]
