"""Files people look at after an evaluation: per-class AP tables, PR curves, drawn detections.

Matplotlib is used through its Agg canvas on a fresh `Figure` (no pyplot), so nothing here
needs a display or touches global plotting state, and it is safe in Ray workers.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

TABLE_COLUMNS = ("class", "num_gt", "num_det", "ap", "ap_50", "voc07_ap", "voc12_ap")
_FLOAT_COLUMNS = ("ap", "ap_50", "voc07_ap", "voc12_ap")
# The "mean" row of the tables shows the headline numbers the metrics already average.
_MEAN_KEYS = {"ap": "map", "ap_50": "map_50", "voc07_ap": "voc07_map", "voc12_ap": "voc12_map"}

# Distinct, saturated colours that read on photos; class k (1..C) gets _PALETTE[(k - 1) % len].
_PALETTE = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (220, 190, 255),
    (170, 110, 40),
    (0, 255, 127),
    (128, 0, 0),
    (170, 255, 195),
    (128, 128, 0),
    (255, 215, 180),
    (0, 0, 128),
    (128, 128, 128),
)
_GT_COLOUR = (255, 255, 255)  # thin white: distinct from every class colour


def _table_rows(metrics: dict) -> list[list[str]]:
    """Header, one row per class (in `per_class` order), then "mean"; floats to 4 decimals."""

    def number(value: float) -> str:
        return f"{float(value):.4f}"

    rows = [list(TABLE_COLUMNS)]
    for name, values in metrics["per_class"].items():
        rows.append(
            [name, str(values["num_gt"]), str(values["num_det"])]
            + [number(values[column]) for column in _FLOAT_COLUMNS]
        )
    # Counts are left empty: an averaged count would mean nothing.
    rows.append(["mean", "", ""] + [number(metrics[_MEAN_KEYS[c]]) for c in _FLOAT_COLUMNS])
    return rows


def write_per_class_table(metrics: dict, out_dir: Path) -> list[Path]:
    """Write per_class_ap.csv and per_class_ap.md from `DetectionEvaluator.compute()` output.

    Columns: class, num_gt, num_det, ap, ap_50, voc07_ap, voc12_ap; a final "mean" row holds
    map, map_50, voc07_map and voc12_map. "nan" marks a class without ground truth (no VOC
    AP), -1 torchmetrics' undefined COCO AP. Returns the two paths.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = _table_rows(metrics)

    csv_path = out_dir / "per_class_ap.csv"
    with csv_path.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)

    def markdown_row(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    # Numbers right-aligned so the decimals line up in rendered Markdown.
    alignment = ["---"] + ["---:"] * (len(TABLE_COLUMNS) - 1)
    lines = [markdown_row(rows[0]), markdown_row(alignment)] + [markdown_row(r) for r in rows[1:]]
    md_path = out_dir / "per_class_ap.md"
    md_path.write_text("\n".join(lines) + "\n")
    return [csv_path, md_path]


def _file_stem(name: str) -> str:
    """A class name made safe for a file name ("traffic light" -> "traffic_light")."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "class"


def plot_pr_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]], out_dir: Path) -> list[Path]:
    """Write one pr_<class>.png per class from `DetectionEvaluator.pr_curves()`.

    Each plot shows the raw precision/recall steps and the monotone envelope whose area is the
    VOC (2010+) AP given in the title. Returns the paths in the order of `curves`.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from detexp.evaluation.metrics import voc_ap

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, (recall, precision) in curves.items():
        recall = np.asarray(recall, dtype=float)
        precision = np.asarray(precision, dtype=float)
        figure = Figure(figsize=(4.5, 4), dpi=100)
        FigureCanvasAgg(figure)
        axes = figure.subplots()
        if len(recall):
            ap = voc_ap(recall, precision, use_07_metric=False)
            envelope = np.maximum.accumulate(precision[::-1])[::-1]
            axes.plot(recall, precision, drawstyle="steps-post", lw=1, alpha=0.6, label="raw")
            axes.plot(recall, envelope, drawstyle="steps-post", lw=2, label="interpolated")
            axes.legend(loc="lower left")
            title = f"{name}: AP {ap:.3f}"
        else:
            # No ground truth or no counted detection: nothing to draw, say so on the plot.
            axes.text(0.5, 0.5, "no detections or no ground truth", ha="center", va="center")
            title = f"{name}: AP n/a"
        axes.set(xlim=(0, 1.02), ylim=(0, 1.02), xlabel="recall", ylabel="precision", title=title)
        axes.grid(True, alpha=0.3)
        figure.tight_layout()
        path = out_dir / f"pr_{_file_stem(name)}.png"
        figure.savefig(path)
        paths.append(path)
    return paths


def _as_rgb(image: Image.Image | np.ndarray) -> Image.Image:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(np.ascontiguousarray(image))
    return image.convert("RGB")  # also copies, so the caller's image is never drawn on


def _as_list(values) -> list:
    if values is None:
        return []
    if hasattr(values, "detach"):  # a torch tensor, without importing torch here
        values = values.detach().cpu().numpy()
    return np.asarray(values).tolist()


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


def draw_detections(
    image: Image.Image | np.ndarray,
    boxes,
    labels,
    scores,
    class_names: Sequence[str],
    gt_boxes=None,
    gt_labels=None,
) -> Image.Image:
    """A copy of `image` (PIL, or HWC uint8 array) with predictions and optional ground truth.

    Predicted boxes ([N, 4] xmin, ymin, xmax, ymax; labels 1..C into `class_names`) are drawn
    in their class colour with "name 0.87" above them; ground truth in thin white beneath.
    Filter by score before calling: every box given is drawn. `scores=None` labels the boxes
    with the name alone (ground truth in class colours, as `data show` draws it). The size
    is unchanged.
    """
    canvas = _as_rgb(image)
    draw = ImageDraw.Draw(canvas)
    width = max(2, round(min(canvas.size) / 200))  # visible on both thumbnails and photos
    font = _font(size=max(10, min(canvas.size) // 32))

    def name_of(label: int) -> str:
        return class_names[label - 1] if 1 <= label <= len(class_names) else str(label)

    gt_label_list = _as_list(gt_labels)
    for index, box in enumerate(_as_list(gt_boxes)):
        draw.rectangle(box, outline=_GT_COLOUR, width=1)
        if index < len(gt_label_list):
            gt_name = name_of(int(gt_label_list[index]))
            draw.text((box[0] + 2, box[1] + 2), gt_name, fill=_GT_COLOUR, font=font)

    box_list = _as_list(boxes)
    score_list = [None] * len(box_list) if scores is None else _as_list(scores)
    for box, label, score in zip(box_list, _as_list(labels), score_list, strict=True):
        colour = _PALETTE[(int(label) - 1) % len(_PALETTE)]
        draw.rectangle(box, outline=colour, width=width)
        text = name_of(int(label)) if score is None else f"{name_of(int(label))} {score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        # Put the label above the box, or inside it when the box touches the top edge.
        y = box[1] - (bottom - top) - 4
        y = box[1] if y < 0 else y
        draw.rectangle((box[0], y, box[0] + right - left + 4, y + bottom - top + 4), fill=colour)
        # Black text on light colours, white on dark ones (Rec. 601 luma).
        luma = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        ink = (0, 0, 0) if luma > 110 else (255, 255, 255)
        draw.text((box[0] + 2, y + 2 - top), text, fill=ink, font=font)
    return canvas


def image_grid(images: Sequence[Image.Image], cols: int = 4, tile: int = 320) -> Image.Image:
    """Tile images into one picture, `cols` per row, each fitted into a tile x tile square.

    Images are scaled up or down to fit, keeping their aspect ratio (letterboxed on dark
    grey). The result is min(cols, n) * tile wide and ceil(n / cols) * tile high.
    """
    if not images:
        raise ValueError("image_grid needs at least one image")
    if cols < 1 or tile < 1:
        raise ValueError(f"cols and tile must be positive, got cols={cols}, tile={tile}")
    columns = min(cols, len(images))
    rows = math.ceil(len(images) / cols)
    grid = Image.new("RGB", (columns * tile, rows * tile), (32, 32, 32))
    for index, image in enumerate(images):
        thumb = ImageOps.contain(_as_rgb(image), (tile, tile))
        row, col = divmod(index, cols)
        grid.paste(
            thumb, (col * tile + (tile - thumb.width) // 2, row * tile + (tile - thumb.height) // 2)
        )
    return grid


def encode_image(image: Image.Image, name: str) -> bytes:
    """``image`` in the format of ``name``'s suffix (JPEG when it has none we know)."""
    fmt = Image.registered_extensions().get(Path(name).suffix.lower(), "JPEG")
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()
