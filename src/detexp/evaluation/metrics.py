"""Detection metrics: COCO-style mAP and Pascal VOC devkit mAP, overall and per class.

`DetectionEvaluator` collects per-image detections and ground truth (small numpy arrays, never
images) and reports:

- ``map``, ``map_50``, ``map_75``, ``map_small``, ``map_medium``, ``map_large``: COCO-style,
  one faster_coco_eval COCOeval run on datasets built as torchmetrics'
  ``MeanAveragePrecision`` builds them, with its semantics: -1 where undefined, at most 100
  detections per image and class, boxes in continuous coordinates. VOC ``difficult``
  objects are passed as COCO ``iscrowd``, so detections on them are ignored rather than
  counted as false positives.
- ``voc07_map`` (11-point interpolated AP, at the recall points of py-faster-rcnn's
  voc_eval.py and Detectron2: ``np.arange(0.0, 1.1, 0.1)``, float rounding included) and
  ``voc12_map`` (area under the monotone PR curve, devkit 2010+), both at IoU 0.5 following
  the official VOC devkit: difficult objects are ignored, IoU uses the devkit's +1 pixel
  convention, a match needs IoU strictly greater than the threshold, duplicates are false
  positives and every detection counts (no per-image cap).
- ``per_class``: each class's ``ap``, ``ap_50``, ``voc07_ap``, ``voc12_ap``, ``num_gt``
  (non-difficult objects) and ``num_det``.

The VOC mean is taken over classes with at least one non-difficult object. A class without any
has AP NaN and is left out of the mean (the devkit would divide by zero there); a class with
objects but no detections has AP 0 and pulls the mean down.

Plain numpy: no Ray, Hydra or MLflow here, so the engine and tests can use it directly; torch
tensors are taken too, without importing torch (the driver that reports a run has none).
"""

from __future__ import annotations

import contextlib
import io
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

COCO_KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large")

# The thresholds pycocotools uses (float64 linspace), see _coco_metrics.
_COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10).tolist()
_COCO_RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101).tolist()

# The published code's recall points, float rounding included: py-faster-rcnn's voc_eval.py and
# Detectron2 use np.arange(0.0, 1.1, 0.1) (MMDetection's np.arange(0, 1 + 1e-3, 0.1) gives the
# same values), whose 0.3, 0.6 and 0.7 are 0.30000000000000004, 0.6000000000000001 and
# 0.7000000000000001. A recall of exactly 3/10 (24 of 80 objects) then misses the 0.3 point. The
# VOC07 figures users compare against are what that code computes, so we use its points rather
# than exact k/10 (issue 14: those gave 0.5769 on a trained model where voc_eval.py gives 0.5752).
_VOC07_RECALL_POINTS = np.arange(0.0, 1.1, 0.1)


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool) -> float:
    """VOC devkit AP of one class from its cumulative recall/precision (detections by score).

    ``use_07_metric=True``: VOC2007 11-point interpolation, the mean over t in {0, 0.1, ..., 1}
    (as ``np.arange(0.0, 1.1, 0.1)`` rounds them, see ``_VOC07_RECALL_POINTS``) of the best
    precision at recall >= t. Otherwise (VOC2010+, "voc12"): the area under the PR curve after
    making precision monotone (the maximum of everything to its right). Empty arrays give 0.
    """
    recall = np.asarray(recall, dtype=np.float64)
    precision = np.asarray(precision, dtype=np.float64)
    if use_07_metric:
        total = 0.0
        for threshold in _VOC07_RECALL_POINTS:
            reached = recall >= threshold
            total += precision[reached].max() if reached.any() else 0.0
        return float(total / len(_VOC07_RECALL_POINTS))
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def _voc_iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """Pairwise IoU [len(a), len(b)] with the devkit's inclusive pixels (width = xmax - xmin + 1)."""
    a = boxes_a[:, None, :]
    b = boxes_b[None, :, :]
    inter_w = np.clip(
        np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1, 0, None
    )
    inter_h = np.clip(
        np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1, 0, None
    )
    inter = inter_w * inter_h
    area_a = (a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)
    area_b = (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)
    return inter / (area_a + area_b - inter)


@dataclass(frozen=True)
class ImageRecord:
    """What the evaluator keeps of one image. Labels are 1..C (0 is background)."""

    image_id: str | None
    det_boxes: np.ndarray  # float64 [N, 4] xmin, ymin, xmax, ymax
    det_scores: np.ndarray  # float64 [N]
    det_labels: np.ndarray  # int64 [N]
    gt_boxes: np.ndarray  # float64 [M, 4]
    gt_labels: np.ndarray  # int64 [M]
    gt_difficult: np.ndarray  # bool [M]


@dataclass(frozen=True)
class _ClassMatches:
    """VOC matching of one class: detections by descending score, ignored ones removed."""

    is_tp: np.ndarray  # bool, one per counted detection
    num_gt: int  # non-difficult objects
    num_det: int  # all detections of the class, ignored ones included

    def pr_curve(self) -> tuple[np.ndarray, np.ndarray]:
        if self.num_gt == 0:
            return np.zeros(0), np.zeros(0)
        tp = np.cumsum(self.is_tp)
        fp = np.cumsum(~self.is_tp)
        return tp / self.num_gt, tp / (tp + fp)

    def ap(self, use_07_metric: bool) -> float:
        if self.num_gt == 0:
            return math.nan
        return voc_ap(*self.pr_curve(), use_07_metric=use_07_metric)


def _is_tensor(value: Any) -> bool:
    """A torch tensor, told without importing torch (there is none unless torch is loaded)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _to_numpy(value: Any, dtype: type, name: str) -> np.ndarray:
    if _is_tensor(value):
        value = value.detach().cpu().numpy()
    try:
        return np.asarray(value, dtype=dtype)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}: cannot convert to {np.dtype(dtype)} array: {err}") from err


def _boxes(value: Any, name: str) -> np.ndarray:
    boxes = _to_numpy(value, np.float64, name)
    if boxes.size == 0:
        return boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name}: expected shape [N, 4], got {list(boxes.shape)}")
    return boxes


def _image_id(value: Any) -> str | None:
    if value is None:
        return None
    if _is_tensor(value):
        value = value.item()
    return str(value)


class DetectionEvaluator:
    """Accumulates detections and ground truth image by image; `compute` reports the metrics.

    Usage: ``update(predictions, targets)`` per batch, then ``compute()``. In distributed
    evaluation each worker calls ``state()``, the records are gathered (they are picklable) and
    one process calls ``merge(state)`` for each other worker before ``compute()``.
    Each image must be evaluated once: a repeated ``image_id`` raises ``ValueError``.
    """

    def __init__(self, class_names: Sequence[str], iou_threshold: float = 0.5):
        if not class_names:
            raise ValueError("class_names is empty")
        self.class_names = list(class_names)
        self.iou_threshold = float(iou_threshold)
        self.reset()

    def reset(self) -> None:
        self._records: list[ImageRecord] = []
        self._seen_ids: set[str] = set()

    def __len__(self) -> int:
        return len(self._records)

    def update(self, predictions: Sequence[Mapping], targets: Sequence[Mapping]) -> None:
        """Add one batch: ``predictions[i]`` and ``targets[i]`` describe the same image.

        predictions[i]: ``boxes`` [N, 4] xmin, ymin, xmax, ymax in VOC pixel coordinates,
        ``scores`` [N], ``labels`` [N] in 1..C. targets[i]: ``boxes`` [M, 4], ``labels`` [M],
        ``difficult`` [M] (optional, default all False), ``image_id`` (optional). Numpy arrays
        or CPU/GPU torch tensors.
        """
        if len(predictions) != len(targets):
            raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
        records = [
            self._record(pred, target) for pred, target in zip(predictions, targets, strict=True)
        ]
        self._add(records)

    def state(self) -> list[ImageRecord]:
        """The per-image records so far, picklable, for gathering from other processes."""
        return list(self._records)

    def merge(self, state: Sequence[ImageRecord]) -> None:
        """Add records gathered from another evaluator (its ``state()``)."""
        self._add(list(state))

    def compute(self) -> dict:
        """All metrics as plain Python floats/ints; see the module docstring for the keys."""
        coco, coco_per_class = self._coco_metrics()
        matches = self._voc_matches()
        per_class = {}
        for label, name in enumerate(self.class_names, start=1):
            match = matches[name]
            ap, ap_50 = coco_per_class.get(label, (-1.0, -1.0))
            per_class[name] = {
                "ap": ap,
                "ap_50": ap_50,
                "voc07_ap": match.ap(use_07_metric=True),
                "voc12_ap": match.ap(use_07_metric=False),
                "num_gt": match.num_gt,
                "num_det": match.num_det,
            }
        return {
            **coco,
            "voc07_map": _mean_defined([c["voc07_ap"] for c in per_class.values()]),
            "voc12_map": _mean_defined([c["voc12_ap"] for c in per_class.values()]),
            "per_class": per_class,
        }

    def pr_curves(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Class name -> (recall, precision) under the VOC rules at ``iou_threshold``.

        Points follow the detections in descending score order; both arrays are empty for a
        class without non-difficult objects or without counted detections.
        """
        return {name: match.pr_curve() for name, match in self._voc_matches().items()}

    # -- internals ---------------------------------------------------------------------------

    def _record(self, pred: Mapping, target: Mapping) -> ImageRecord:
        det_boxes = _boxes(pred["boxes"], "predictions.boxes")
        det_scores = _to_numpy(pred["scores"], np.float64, "predictions.scores").reshape(-1)
        det_labels = _to_numpy(pred["labels"], np.int64, "predictions.labels").reshape(-1)
        gt_boxes = _boxes(target["boxes"], "targets.boxes")
        gt_labels = _to_numpy(target["labels"], np.int64, "targets.labels").reshape(-1)
        difficult = target.get("difficult")
        if difficult is None:
            gt_difficult = np.zeros(len(gt_labels), dtype=bool)
        else:
            gt_difficult = _to_numpy(difficult, bool, "targets.difficult").reshape(-1)
        image_id = _image_id(target.get("image_id"))
        where = f"image {image_id}" if image_id is not None else f"image #{len(self._records)}"
        if not len(det_boxes) == len(det_scores) == len(det_labels):
            raise ValueError(
                f"{where}: {len(det_boxes)} boxes, {len(det_scores)} scores, "
                f"{len(det_labels)} labels in predictions"
            )
        if not len(gt_boxes) == len(gt_labels) == len(gt_difficult):
            raise ValueError(
                f"{where}: {len(gt_boxes)} boxes, {len(gt_labels)} labels, "
                f"{len(gt_difficult)} difficult flags in targets"
            )
        num_classes = len(self.class_names)
        for kind, labels in (("predictions", det_labels), ("targets", gt_labels)):
            bad = labels[(labels < 1) | (labels > num_classes)]
            if bad.size:
                raise ValueError(
                    f"{where}: {kind} label {int(bad[0])} outside 1..{num_classes} "
                    "(labels count from 1; 0 is background)"
                )
        return ImageRecord(
            image_id=image_id, det_boxes=det_boxes, det_scores=det_scores, det_labels=det_labels,
            gt_boxes=gt_boxes, gt_labels=gt_labels, gt_difficult=gt_difficult,
        )

    def _add(self, records: list[ImageRecord]) -> None:
        # Check the whole batch first so a failed call leaves the evaluator unchanged.
        ids = [r.image_id for r in records if r.image_id is not None]
        repeated = (set(ids) & self._seen_ids) or {i for i in ids if ids.count(i) > 1}
        if repeated:
            # A distributed sampler that pads its shards repeats images; counting them twice
            # would silently skew every AP.
            raise ValueError(f"image(s) evaluated twice: {sorted(repeated)[:5]}")
        self._seen_ids.update(ids)
        self._records.extend(records)

    def _voc_matches(self) -> dict[str, _ClassMatches]:
        matches = _match_classes(self._records, len(self.class_names), self.iou_threshold)
        return {name: matches[label] for label, name in enumerate(self.class_names, start=1)}

    def _coco_metrics(self) -> tuple[dict[str, float], dict[int, tuple[float, float]]]:
        """Overall COCO-style numbers and {label: (ap, ap_50)}, from one COCO evaluation.

        The COCO datasets are built here as torchmetrics' ``MeanAveragePrecision`` builds them
        (boxes as xywh, area = w * h, ``iscrowd`` = difficult, every record an image, the
        categories those present in detections or ground truth) and evaluated once with
        faster_coco_eval. torchmetrics' ``class_metrics`` re-runs the whole evaluation once
        per class and converts every detection to Python one tensor element at a time: 19 s
        for 5,000 images x 100 detections. A class's AP is the mean of its slice of the
        precision array, exactly what a re-run restricted to that class would summarize.
        """
        records = self._records
        gt_labels = _joined([r.gt_labels for r in records], np.int64)
        det_labels = _joined([r.det_labels for r in records], np.int64)
        if not (gt_labels.size or det_labels.size):
            # Nothing to evaluate (and COCOeval chokes on zero categories).
            return dict.fromkeys(COCO_KEYS, -1.0), {}
        # Imported here: it is heavy, and only compute() needs it.
        from faster_coco_eval import COCO, COCOeval_faster

        categories = [{"id": label, "name": str(label)} for label in np.union1d(det_labels, gt_labels).tolist()]
        images = [{"id": i} for i in range(len(records))]
        gt_annotations = _coco_annotations(
            np.repeat(np.arange(len(records)), [len(r.gt_boxes) for r in records]),
            np.concatenate([r.gt_boxes for r in records]), gt_labels,
            iscrowd=np.concatenate([r.gt_difficult for r in records]),
        )
        det_annotations = _coco_annotations(
            np.repeat(np.arange(len(records)), [len(r.det_boxes) for r in records]),
            np.concatenate([r.det_boxes for r in records]), det_labels,
            scores=np.concatenate([r.det_scores for r in records]),
        )
        ground_truth, detections = COCO(), COCO()
        ground_truth.dataset = {"images": images, "annotations": gt_annotations, "categories": categories}
        detections.dataset = {"images": images, "annotations": det_annotations, "categories": categories}
        with contextlib.redirect_stdout(io.StringIO()):
            ground_truth.createIndex()
            detections.createIndex()
            evaluation = COCOeval_faster(ground_truth, detections, iouType="bbox")
            evaluation.params.iouThrs = np.array(_COCO_IOU_THRESHOLDS, dtype=np.float64)
            evaluation.params.recThrs = np.array(_COCO_RECALL_THRESHOLDS, dtype=np.float64)
            evaluation.params.maxDets = [1, 10, 100]
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
        overall = {key: float(evaluation.stats[k]) for k, key in enumerate(COCO_KEYS)}
        # precision: [iou thresholds, recall points, classes (sorted ids), areas, max dets];
        # area "all" is the first range, 100 detections the last; IoU 0.5 the first threshold.
        precision = np.asarray(evaluation.eval["precision"])[:, :, :, 0, -1]
        per_class = {
            label: (_defined_mean(precision[:, :, k]), _defined_mean(precision[0, :, k]))
            for k, label in enumerate(evaluation.params.catIds)
        }
        return overall, per_class


def _coco_annotations(
    images: np.ndarray, boxes: np.ndarray, labels: np.ndarray,
    iscrowd: np.ndarray | None = None, scores: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """Boxes (of every image, ``images`` giving each box's image) as COCO annotations with
    ids from 1 (COCOeval needs ids > 0)."""
    xywh = np.concatenate((boxes[:, :2], boxes[:, 2:] - boxes[:, :2]), axis=1)
    area = xywh[:, 2] * xywh[:, 3]
    crowd = iscrowd.astype(np.int64) if iscrowd is not None else np.zeros(len(xywh), dtype=np.int64)
    columns = zip(images.tolist(), xywh.tolist(), area.tolist(), labels.tolist(), crowd.tolist(), strict=True)
    annotations = [
        {"id": k, "image_id": image, "bbox": box, "area": box_area, "category_id": label, "iscrowd": is_crowd}
        for k, (image, box, box_area, label, is_crowd) in enumerate(columns, start=1)
    ]
    if scores is not None:
        for annotation, score in zip(annotations, scores.tolist(), strict=True):
            annotation["score"] = score
    return annotations


def _joined(parts: list[np.ndarray], dtype) -> np.ndarray:
    """``parts`` concatenated; an empty array of ``dtype`` when there are none."""
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def _defined_mean(values: np.ndarray) -> float:
    """pycocotools' summary of a precision slice: the mean of its defined (> -1) entries, else -1."""
    defined = values[values > -1]
    return float(defined.mean()) if defined.size else -1.0


def _match_classes(records: Sequence[ImageRecord], num_classes: int, iou_threshold: float) -> dict[int, _ClassMatches]:
    """VOC devkit matching for every class over the whole split: {label: matches}.

    Each detection's candidate is the same-image object of its class with the highest IoU;
    which object that is does not depend on the ranking, so it is found image by image (one
    pass over the images for all classes). Then, per class, going down the global ranking,
    the first detection to hit a non-difficult object above the threshold is a TP, later hits
    on it are duplicates (FP), hits on difficult objects are ignored, and misses are FP.
    """
    labels, scores, best_iou, best_gt = [], [], [], []
    gt_labels, gt_difficult = [], []  # of every object, indexed by global object id
    gt_offset = 0
    for record in records:
        num_det, num_gt = len(record.det_boxes), len(record.gt_boxes)
        if num_det:
            labels.append(record.det_labels)
            scores.append(record.det_scores)
            if num_gt:
                # IoU with the objects of the detection's own class only; the first of equal
                # maxima, as the devkit's max() over that class's objects in file order.
                same = record.det_labels[:, None] == record.gt_labels[None, :]
                iou = np.where(same, _voc_iou(record.det_boxes, record.gt_boxes), -np.inf)
                nearest = iou.argmax(axis=1)
                best_gt.append(nearest + gt_offset)
                best_iou.append(iou[np.arange(num_det), nearest])
            else:
                best_gt.append(np.zeros(num_det, dtype=np.int64))
                best_iou.append(np.full(num_det, -np.inf))
        gt_labels.append(record.gt_labels)
        gt_difficult.append(record.gt_difficult)
        gt_offset += num_gt

    labels, scores = _joined(labels, np.int64), _joined(scores, np.float64)
    best_iou, best_gt = _joined(best_iou, np.float64), _joined(best_gt, np.int64)
    gt_labels, gt_difficult = _joined(gt_labels, np.int64), _joined(gt_difficult, bool)

    matches = {}
    for label in range(1, num_classes + 1):
        num_gt = int(((gt_labels == label) & ~gt_difficult).sum())
        mine = labels == label
        num_det = int(mine.sum())
        if num_det == 0:
            matches[label] = _ClassMatches(np.zeros(0, dtype=bool), num_gt, 0)
            continue
        # Stable sort: detections with equal scores keep their input order.
        order = np.argsort(-scores[mine], kind="stable")
        class_iou = best_iou[mine][order]
        class_gt = best_gt[mine][order]
        hit = class_iou > iou_threshold  # strictly greater, as the devkit's ovmax > ovthresh
        on_difficult = np.zeros_like(hit)
        on_difficult[hit] = gt_difficult[class_gt[hit]]
        candidate = hit & ~on_difficult
        is_tp = np.zeros_like(hit)
        # np.unique's return_index gives the first position of each object id: its best-ranked hit.
        _, first = np.unique(np.where(candidate, class_gt, -1), return_index=True)
        is_tp[first] = True
        is_tp &= candidate
        matches[label] = _ClassMatches(is_tp[~on_difficult], num_gt, num_det)
    return matches


def _mean_defined(values: Sequence[float]) -> float:
    defined = [v for v in values if not math.isnan(v)]
    return float(np.mean(defined)) if defined else math.nan
