"""``detexp data show``: what the model will see, before training. Label statistics of the
train and val splits on the console and in ``label_stats.json``, their plots in
``label_stats.png``, and ``gt_grid.jpg``: images with their ground-truth boxes drawn.

The counting is :mod:`detexp.data.label_stats` (pure, data layer); this module reads the images
and draws, with :mod:`detexp.evaluation.figures` for the boxes and the grid, which is why it sits
above the data layer rather than in it. No Ray: one loop over the annotations, reading
only JPEG headers, runs in seconds even for Pascal VOC.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from detexp.data.files import DataRoot
from detexp.data.label_stats import (
    bin_labels,
    format_label_stats,
    label_stats,
    objects_per_image_bins,
    pick_grid_images,
    read_records,
)
from detexp.data.parsing import object_name_images
from detexp.data.problems import class_names_summary, has_unknown_classes, write_problems_csv
from detexp.data.source import DataSource, resolve
from detexp.data.voc import ImageEntry, Problem, VOCRecord
from detexp.errors import ConfigError

STATS_FILE = "label_stats.json"
PLOT_FILE = "label_stats.png"
GRID_FILE = "gt_grid.jpg"
PROBLEMS_FILE = "problems.csv"
GRID_COLUMNS = 4
GRID_TILE = 320  # px, as the evaluation's predictions_grid.jpg


def data_show(cfg: Any, run_dir: str | Path) -> dict:
    """Read the splits of ``cfg.dataset``; print the statistics (after the summary of unknown
    class names, if any); write the stats, plot and grid (``cfg.grid_images`` images, 0 =
    no grid) into ``run_dir``. Returns the stats dict as written to ``label_stats.json``."""
    if cfg.grid_images < 0:
        raise ConfigError(f"grid_images={cfg.grid_images} must be 0 (no grid) or more")
    source = resolve(cfg.dataset)
    print(source.summary())
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    splits = {"train": source.train, "val": source.val} if source.val else {"train": source.train}
    records, problems = _read_splits(source, splits)
    if has_unknown_classes(problems):  # first, as train and data check say it
        print(class_names_summary(object_name_images(source.root, source.train + source.val), source.classes))
    stats = {"root": str(source.root), **label_stats(records, {s: len(e) for s, e in splits.items()}, source.classes)}
    print(format_label_stats(stats))

    errors = [p for p in problems if p.severity == "error"]
    if errors:
        write_problems_csv(errors, run_dir / PROBLEMS_FILE)
        print(f"{len({p.image_id for p in errors})} image(s) with errors are left out of these numbers "
              f"(list: {run_dir / PROBLEMS_FILE}; `data check` also decodes every JPEG)")
    (run_dir / STATS_FILE).write_text(json.dumps(stats, indent=2) + "\n")
    plot_label_stats(stats, run_dir / PLOT_FILE)
    written = [STATS_FILE, PLOT_FILE]
    usable = list({r.image_id: r for rs in records.values() for r in rs}.values())  # train then val, once each
    shown = pick_grid_images(usable, cfg.grid_images, len(source.classes))
    if shown:
        draw_gt_grid(source.root, shown, source.classes).save(run_dir / GRID_FILE, quality=90)
        written.append(f"{GRID_FILE} ({len(shown)} image{'s' if len(shown) != 1 else ''}; difficult objects in thin white)")
    print(f"wrote {', '.join(written)} to {run_dir}")
    return stats


def _read_splits(source: DataSource, splits: dict[str, list[ImageEntry]]) -> tuple[dict[str, list[VOCRecord]], list[Problem]]:
    """(usable records of each split, the problems of all of them)."""
    records: dict[str, list[VOCRecord]] = {}
    problems: list[Problem] = []
    for split, entries in splits.items():
        records[split], found = read_records(source.root, entries, source.classes)
        problems += found
    return records, problems


def draw_gt_grid(root: DataRoot, records: list[VOCRecord], classes: list[str]) -> Image.Image:
    """The images of ``records`` with their boxes in class colours and names (difficult
    ones as thin white boxes, as ground truth is drawn under predictions elsewhere), each
    captioned with its id, tiled GRID_COLUMNS wide."""
    from detexp.evaluation.figures import draw_detections, image_grid

    tiles = []
    for record in records:
        with Image.open(root.open(record.image)) as image:
            easy = ~record.difficult
            drawn = draw_detections(
                image, record.boxes[easy], record.labels[easy], None, classes,
                gt_boxes=record.boxes[~easy], gt_labels=record.labels[~easy],
            )
        tiles.append(_caption(drawn, record.image_id))
    return image_grid(tiles, cols=GRID_COLUMNS, tile=GRID_TILE)


def _caption(image: Image.Image, text: str) -> Image.Image:
    """``text`` on a dark strip in the bottom-left corner, sized to survive the tile's scaling."""
    draw = ImageDraw.Draw(image)
    size = max(10, round(max(image.size) / GRID_TILE * 12))  # about 12 px once fitted into a tile
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one fixed-size bitmap font
        font = ImageFont.load_default()
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    y = image.height - (bottom - top) - 6
    draw.rectangle((0, y, right - left + 6, image.height), fill=(0, 0, 0))
    draw.text((3, y + 3 - top), text, fill=(255, 255, 255), font=font)
    return image


def plot_label_stats(stats: dict, path: Path) -> Path:
    """label_stats.png: objects per class (counts), and objects per image, box size and
    aspect ratio as each split's share, so train and val compare at a glance whatever
    their sizes. One bar per split side by side; matplotlib's Agg canvas on a fresh Figure,
    as in detexp.evaluation.figures."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    splits = list(stats["splits"])
    figure = Figure(figsize=(12, 8), dpi=100)
    FigureCanvasAgg(figure)
    panels = figure.subplots(2, 2).ravel()
    per_class = {s: [stats["splits"][s]["classes"][c]["objects"] for c in stats["classes"]] for s in splits}
    _grouped_bars(panels[0], "objects per class", stats["classes"], per_class, "objects")
    charts = [
        ("objects per image", "% of the split's images", *objects_per_image_bins(stats)),
        ("box size, sqrt(area) px", "% of the split's boxes", bin_labels(stats["box_size"]["edges"]),
         {s: stats["box_size"][s] for s in splits}),
        ("aspect ratio, w/h", "% of the split's boxes", bin_labels(stats["aspect_ratio"]["edges"], ratio=True),
         {s: stats["aspect_ratio"][s] for s in splits}),
    ]
    for axes, (title, ylabel, labels, counts) in zip(panels[1:], charts, strict=True):
        shares = {s: [100 * c / max(sum(values), 1) for c in values] for s, values in counts.items()}
        _grouped_bars(axes, title, labels, shares, ylabel)
    figure.suptitle(f"{stats.get('root', '')}\n" + ", ".join(
        f"{s}: {stats['splits'][s]['images']} images, {stats['splits'][s]['objects']} objects" for s in splits),
        fontsize=10)
    figure.tight_layout()
    figure.savefig(path)
    return path


def _grouped_bars(axes, title: str, labels: list[str], values: dict[str, list[float]], ylabel: str) -> None:
    if not labels:
        axes.text(0.5, 0.5, "no objects", ha="center", va="center")
        axes.set(title=title, xticks=[], yticks=[])
        return
    x = np.arange(len(labels))
    width = 0.8 / len(values)
    for k, (split, heights) in enumerate(values.items()):
        axes.bar(x + (k - (len(values) - 1) / 2) * width, heights, width, label=split)
    crowded = len(labels) > 6 or max(map(len, labels)) > 10
    axes.set_xticks(x, labels, rotation=45 if crowded else 0, ha="right" if crowded else "center", fontsize=8)
    highest = max((h for heights in values.values() for h in heights), default=0)
    axes.set(title=title, ylabel=ylabel, ylim=(0, max(highest, 1) * 1.15))  # room for the legend
    axes.legend(fontsize=8)
    axes.grid(True, axis="y", alpha=0.3)
