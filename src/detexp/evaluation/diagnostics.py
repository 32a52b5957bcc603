"""Detection diagnostics: where a detector goes wrong, beyond its AP.

`DetectionDiagnostics` takes the same per-image records as `DetectionEvaluator.update`, batch
by batch, and keeps counts, one score and one true-positive flag per detection and class, and
the few worst images: memory stays bounded on splits of thousands of images. It reports

- ``confusion_matrix()``: a detection confusion matrix at one score threshold. Detections with
  score >= the threshold are matched to ground truth by IoU >= 0.5 *whatever their class*,
  greedily, highest IoU first, each object and each detection used once (the usual rule, as
  in Ultralytics). Rows are the true class plus "background" (detections that match no
  object: false detections), columns the predicted class plus "background" (missed objects).
- ``threshold_curves()``: precision, recall and F1 per class (and pooled over all classes)
  against the score threshold, at IoU >= 0.5 with VOC's one-to-one matching per class: going
  down the scores, a detection is a true positive if it overlaps a not yet matched object of
  its class (the one with the highest IoU), otherwise a false positive.
- ``worst_images()``: the images with the most errors at the threshold, an error being a
  missed object or a false detection under that per-class matching (so a detection of the
  wrong class on an object counts as one of each); ``summary()`` gives the split's totals.

Difficult objects are ignored everywhere, as the VOC metrics do: they are never missed, and a
detection that matches no other object but overlaps a difficult one (IoU >= 0.5) is neither
right nor wrong. IoU here is continuous (width = xmax - xmin, as torchvision and COCO), not
the devkit's +1 pixel rule that the VOC APs of :mod:`detexp.evaluation.metrics` follow.

The writers use Matplotlib through its Agg canvas on a fresh `Figure` (no pyplot), as
:mod:`detexp.evaluation.figures` does. Plain numpy: no torch, Ray, Hydra or MLflow.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

IOU_THRESHOLD = 0.5
THRESHOLDS = np.round(np.linspace(0.0, 1.0, 101), 2)  # 0.00, 0.01, ..., 1.00
BACKGROUND = "background"
ALL_CLASSES = "all classes"
_COMPACT_EVERY = 64  # arrays per class before they are joined into one


@dataclass(frozen=True)
class ImageErrors:
    """One image's errors at the score threshold, with what to draw (detections >= it)."""

    image_id: str
    missed: int
    false: int
    det_boxes: np.ndarray
    det_scores: np.ndarray
    det_labels: np.ndarray
    gt_boxes: np.ndarray
    gt_labels: np.ndarray

    @property
    def errors(self) -> int:
        return self.missed + self.false

    @property
    def caption(self) -> str:
        return f"{self.image_id}: {self.missed} missed, {self.false} false"


@dataclass(frozen=True)
class Summary:
    """Totals at ``score_threshold``: objects found (right class), non-difficult objects,
    false detections (score >= threshold, no object of their class found)."""

    score_threshold: float
    found: int
    objects: int
    false: int


def box_iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """Pairwise IoU [len(a), len(b)] of xmin, ymin, xmax, ymax boxes, continuous coordinates."""
    a, b = boxes_a[:, None, :], boxes_b[None, :, :]
    inter_w = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    inter_h = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = inter_w * inter_h
    area_a = np.clip(a[..., 2] - a[..., 0], 0, None) * np.clip(a[..., 3] - a[..., 1], 0, None)
    area_b = np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)
    union = area_a + area_b - inter
    return np.divide(inter, union, out=np.zeros(inter.shape), where=union > 0)


def _greedy_pairs(iou: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one (row, column) pairs with IoU >= threshold, taken by descending IoU."""
    rows, cols = np.nonzero(iou >= threshold)
    order = np.argsort(-iou[rows, cols], kind="stable")
    used_rows, used_cols, pairs = set(), set(), []
    for r, c in zip(rows[order].tolist(), cols[order].tolist(), strict=True):
        if r not in used_rows and c not in used_cols:
            used_rows.add(r)
            used_cols.add(c)
            pairs.append((r, c))
    matched = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    return matched[:, 0], matched[:, 1]


def _match_by_score(iou: np.ndarray, difficult: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """VOC-style matching of one class in one image, detections (rows of ``iou``) already in
    descending score order: (is_tp, ignored) per detection."""
    easy_iou = iou[:, ~difficult]
    hits = easy_iou >= threshold
    is_tp = np.zeros(len(iou), dtype=bool)
    taken = np.zeros(easy_iou.shape[1], dtype=bool)
    for i in np.flatnonzero(hits.any(axis=1)):  # only detections that touch an object
        free = hits[i] & ~taken
        if free.any():
            taken[np.argmax(np.where(free, easy_iou[i], -1.0))] = True
            is_tp[i] = True
    ignored = ~is_tp & (iou[:, difficult] >= threshold).any(axis=1)
    return is_tp, ignored


def _array(value: Any, dtype: type, width: int = 1) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch here
        value = value.detach().cpu().numpy()
    array = np.asarray(value, dtype=dtype)
    return array.reshape(-1, width) if width > 1 else array.reshape(-1)


class DetectionDiagnostics:
    """Accumulates the diagnostics image by image; see the module docstring for the rules.

    ``update(predictions, targets, image_ids)`` per batch, in the form
    `DetectionEvaluator.update` takes (boxes xyxy, labels 1..C, scores; targets with optional
    ``difficult``), then ``confusion_matrix()``, ``threshold_curves()``, ``worst_images()``
    and ``summary()``, which may be called at any time.
    """

    def __init__(self, class_names: Sequence[str], score_threshold: float = 0.5, worst: int = 8,
                 iou_threshold: float = IOU_THRESHOLD):
        if not class_names:
            raise ValueError("class_names is empty")
        self.class_names = list(class_names)
        self.score_threshold = float(score_threshold)
        self.iou_threshold = float(iou_threshold)
        self.worst = max(int(worst), 0)
        num = len(self.class_names)
        self._matrix = np.zeros((num + 1, num + 1), dtype=np.int64)
        self._num_gt = np.zeros(num, dtype=np.int64)  # non-difficult objects per class
        # Per class: scores and TP flags of the counted (not ignored) detections, in parts.
        self._scores: list[list[np.ndarray]] = [[] for _ in range(num)]
        self._tp: list[list[np.ndarray]] = [[] for _ in range(num)]
        self._worst: list[ImageErrors] = []
        self._found = self._false = self._images = 0

    def update(self, predictions: Sequence[Mapping], targets: Sequence[Mapping],
               image_ids: Sequence[str] | None = None) -> None:
        """Add one batch; ``image_ids`` default to the targets' ``image_id`` (or a counter)."""
        if image_ids is None:
            image_ids = [t.get("image_id") for t in targets]
        if not len(predictions) == len(targets) == len(image_ids):
            raise ValueError(f"{len(predictions)} predictions, {len(targets)} targets, {len(image_ids)} ids")
        for pred, target, image_id in zip(predictions, targets, image_ids, strict=True):
            name = str(image_id) if image_id is not None else f"#{self._images}"
            self._add_image(pred, target, name)
            self._images += 1
        self._worst.sort(key=lambda e: (-e.errors, e.image_id))
        del self._worst[self.worst :]
        for parts in (*self._scores, *self._tp):
            if len(parts) > _COMPACT_EVERY:
                parts[:] = [np.concatenate(parts)]

    def _add_image(self, pred: Mapping, target: Mapping, image_id: str) -> None:
        boxes, scores = _array(pred["boxes"], np.float64, 4), _array(pred["scores"], np.float64)
        labels = _array(pred["labels"], np.int64)
        gt_boxes, gt_labels = _array(target["boxes"], np.float64, 4), _array(target["labels"], np.int64)
        difficult = target.get("difficult")
        difficult = np.zeros(len(gt_labels), bool) if difficult is None else _array(difficult, bool)
        num = len(self.class_names)
        for kind, values in (("predictions", labels), ("targets", gt_labels)):
            if values.size and (values.min() < 1 or values.max() > num):
                raise ValueError(f"image {image_id}: {kind} labels must be in 1..{num}, got {values.tolist()}")
        keep = scores >= self.score_threshold
        self._confusion(boxes[keep], labels[keep], gt_boxes, gt_labels, difficult)

        found = false = 0
        for label in np.unique(np.concatenate([labels, gt_labels])).tolist():
            mine = np.flatnonzero(labels == label)
            mine = mine[np.argsort(-scores[mine], kind="stable")]
            objects = gt_labels == label
            is_tp, ignored = _match_by_score(
                box_iou(boxes[mine], gt_boxes[objects]), difficult[objects], self.iou_threshold
            )
            counted = scores[mine][~ignored]
            self._scores[label - 1].append(counted)
            self._tp[label - 1].append(is_tp[~ignored])
            self._num_gt[label - 1] += int((~difficult[objects]).sum())
            shown = counted >= self.score_threshold
            found += int((is_tp[~ignored] & shown).sum())
            false += int((~is_tp[~ignored] & shown).sum())
        missed = int((~difficult).sum()) - found
        self._found += found
        self._false += false
        if missed + false and self.worst:
            # Copies: the records may be views into a whole batch's arrays.
            self._worst.append(ImageErrors(
                image_id=image_id, missed=missed, false=false, det_boxes=boxes[keep], det_scores=scores[keep],
                det_labels=labels[keep], gt_boxes=gt_boxes.copy(), gt_labels=gt_labels.copy(),
            ))

    def _confusion(self, boxes, labels, gt_boxes, gt_labels, difficult) -> None:
        background = len(self.class_names)
        iou = box_iou(boxes, gt_boxes)
        easy_labels = gt_labels[~difficult]
        det, obj = _greedy_pairs(iou[:, ~difficult], self.iou_threshold)
        np.add.at(self._matrix, (easy_labels[obj] - 1, labels[det] - 1), 1)
        missed = np.ones(len(easy_labels), dtype=bool)
        missed[obj] = False
        np.add.at(self._matrix, (easy_labels[missed] - 1, background), 1)
        false = np.ones(len(labels), dtype=bool)
        false[det] = False
        # A detection on a difficult object that no other object claimed is ignored, not false.
        false &= ~(iou[:, difficult] >= self.iou_threshold).any(axis=1)
        np.add.at(self._matrix, (background, labels[false] - 1), 1)

    def confusion_matrix(self) -> np.ndarray:
        """Counts [C + 1, C + 1]: row = true class (last: background), column = predicted
        class (last: background, i.e. missed). The background/background cell stays 0."""
        return self._matrix.copy()

    def threshold_curves(self, thresholds: np.ndarray = THRESHOLDS) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Class name (and ``ALL_CLASSES``, pooled) -> (precision, recall, F1) at each
        threshold (score >= it). Precision is NaN without detections, recall without objects;
        F1 = 2 TP / (2 TP + FP + FN) is NaN only when there are neither."""
        thresholds = np.asarray(thresholds, dtype=np.float64)
        counts = {}
        for k, name in enumerate(self.class_names):
            scores = np.concatenate([np.zeros(0), *self._scores[k]])
            tp = np.concatenate([np.zeros(0, dtype=bool), *self._tp[k]])
            order = np.argsort(scores, kind="stable")
            start = np.searchsorted(scores[order], thresholds, side="left")
            tp_below = np.concatenate([[0], np.cumsum(tp[order])])
            num_tp = tp_below[-1] - tp_below[start]
            counts[name] = (num_tp, len(scores) - start - num_tp, int(self._num_gt[k]))
        counts[ALL_CLASSES] = tuple(sum(c[i] for c in counts.values()) for i in range(3))
        return {name: _precision_recall_f1(*c) for name, c in counts.items()}

    def worst_images(self) -> list[ImageErrors]:
        """Up to ``worst`` images with at least one error, most errors first (then by id)."""
        return list(self._worst)

    def summary(self) -> Summary:
        return Summary(self.score_threshold, self._found, int(self._num_gt.sum()), self._false)


def _precision_recall_f1(tp: np.ndarray, fp: np.ndarray, num_gt: int):
    tp, fp = np.asarray(tp, dtype=np.float64), np.asarray(fp, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), np.nan)
        recall = tp / num_gt if num_gt else np.full(tp.shape, np.nan)
        denominator = 2 * tp + fp + (num_gt - tp)
        f1 = np.where(denominator > 0, 2 * tp / denominator, np.nan)
    return precision, recall, f1


def best_f1(curves: Mapping[str, tuple], thresholds: np.ndarray = THRESHOLDS, name: str = ALL_CLASSES):
    """(threshold, F1) where ``curves[name]``'s F1 is highest (the lowest such threshold),
    or None when it is undefined everywhere."""
    f1 = np.asarray(curves[name][2])
    if np.isnan(f1).all():
        return None
    best = int(np.nanargmax(f1))
    return float(thresholds[best]), float(f1[best])


def _number(value: float) -> str:
    return f"{float(value):.4f}"  # "nan" where undefined, as in per_class_ap.csv


def _canvas(width: float, height: float, **kwargs):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, **kwargs)
    FigureCanvasAgg(figure)
    return figure


def write_confusion_matrix(matrix: np.ndarray, class_names: Sequence[str], score_threshold: float,
                           out_dir: Path) -> list[Path]:
    """confusion_matrix.csv (counts; the first column names the true class, the header the
    predicted one; the background/background cell is empty) and confusion_matrix.png."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [*class_names, BACKGROUND]
    csv_path = out_dir / "confusion_matrix.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ground truth \\ predicted", *names])
        for name, row in zip(names, matrix.tolist(), strict=True):
            writer.writerow([name, *row[:-1], "" if name == BACKGROUND else row[-1]])

    size = max(5.0, 0.5 * len(names) + 2.5)
    figure = _canvas(size + 1.0, size)
    axes = figure.subplots()
    totals = matrix.sum(axis=1, keepdims=True)
    shade = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
    image = axes.imshow(shade, cmap="Blues", vmin=0.0, vmax=1.0)
    font = max(6, 11 - len(names) // 4)
    for (i, j), count in np.ndenumerate(matrix):
        if count:  # empty cells stay blank, so the errors stand out
            colour = "white" if shade[i, j] > 0.5 else "black"
            axes.text(j, i, str(count), ha="center", va="center", color=colour, fontsize=font)
    ticks = range(len(names))
    axes.set_xticks(ticks, names, rotation=45, ha="right", rotation_mode="anchor")
    axes.set_yticks(ticks, names)
    axes.set(xlabel="predicted", ylabel="ground truth",
             title=f"confusion matrix, score >= {score_threshold:.2f}, IoU >= {IOU_THRESHOLD}")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of the row")
    figure.tight_layout()
    png_path = out_dir / "confusion_matrix.png"
    figure.savefig(png_path)
    return [csv_path, png_path]


def write_threshold_curves(curves: Mapping[str, tuple], out_dir: Path,
                           thresholds: np.ndarray = THRESHOLDS) -> list[Path]:
    """threshold_curves.csv (class, threshold, precision, recall, f1; ``ALL_CLASSES`` last)
    and threshold_curves.png (three panels, one line per class, all classes in bold)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "threshold_curves.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["class", "threshold", "precision", "recall", "f1"])
        for name, (precision, recall, f1) in curves.items():
            for row in zip(thresholds, precision, recall, f1, strict=True):
                writer.writerow([name, f"{row[0]:.2f}", *(_number(v) for v in row[1:])])

    figure = _canvas(15, 4.8, layout="constrained")
    panels = figure.subplots(1, 3, sharex=True)
    colours = _colours(len(curves))
    for colour, (name, values) in zip(colours, curves.items(), strict=True):
        bold = name == ALL_CLASSES
        for axes, series in zip(panels, values, strict=True):
            axes.plot(thresholds, series, label=name, color="black" if bold else colour,
                      lw=2.5 if bold else 1.0, alpha=1.0 if bold else 0.8, zorder=3 if bold else 2)
    best = best_f1(curves, thresholds)
    title = "precision, recall and F1 against the score threshold (IoU >= 0.5)"
    if best is not None:
        label = f"best F1 ({ALL_CLASSES}) {best[1]:.3f} at score >= {best[0]:.2f}"
        for axes in panels:
            axes.axvline(best[0], color="grey", ls="--", lw=1, label=label)
        title += f"; {label}"
    for axes, what in zip(panels, ("precision", "recall", "F1"), strict=True):
        axes.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="score threshold", title=what)
        axes.grid(True, alpha=0.3)
    figure.legend(*panels[2].get_legend_handles_labels(), loc="outside right center", fontsize="small")
    figure.suptitle(title)
    png_path = out_dir / "threshold_curves.png"
    figure.savefig(png_path)
    return [csv_path, png_path]


def _colours(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    return [cmap(k % cmap.N) for k in range(n)]


def caption_tiles(grid: Image.Image, captions: Sequence[str], cols: int, tile: int) -> Image.Image:
    """Write each caption at the top left of its tile of an `image_grid` picture (in place)."""
    draw = ImageDraw.Draw(grid)
    try:
        font = ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        font = ImageFont.load_default()
    for index, text in enumerate(captions):
        row, col = divmod(index, cols)
        x, y = col * tile + 4, row * tile + 4
        left, top, right, bottom = draw.textbbox((x, y), text, font=font)
        draw.rectangle((left - 3, top - 3, right + 3, bottom + 3), fill=(0, 0, 0))
        draw.text((x, y), text, fill=(255, 255, 255), font=font)
    return grid
