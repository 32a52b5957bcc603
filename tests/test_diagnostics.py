"""Detection diagnostics on cases small enough to count by hand: the confusion matrix,
precision/recall/F1 against the score threshold, the worst images and the files."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from detexp.evaluation.diagnostics import (
    ALL_CLASSES,
    THRESHOLDS,
    DetectionDiagnostics,
    best_f1,
    box_iou,
    write_confusion_matrix,
    write_threshold_curves,
)

CLASSES = ["cat", "dog"]  # labels 1, 2
CAT, DOG = 1, 2


def _pred(*dets):
    """dets: (box, label, score)"""
    return {
        "boxes": np.array([d[0] for d in dets], dtype=np.float64).reshape(-1, 4),
        "labels": np.array([d[1] for d in dets], dtype=np.int64),
        "scores": np.array([d[2] for d in dets], dtype=np.float64),
    }


def _target(*objects, image_id=None):
    """objects: (box, label) or (box, label, difficult)"""
    return {
        "boxes": np.array([o[0] for o in objects], dtype=np.float64).reshape(-1, 4),
        "labels": np.array([o[1] for o in objects], dtype=np.int64),
        "difficult": np.array([o[2] if len(o) > 2 else False for o in objects], dtype=bool),
        "image_id": image_id,
    }


# Five images, counted at score >= 0.5 in the comments.
IMAGES = {
    # cat found; a cat on the dog (wrong class); a second cat on the first cat (IoU 0.82).
    # confusion: (cat, cat), (dog, cat), (background, cat). Per class: cat TP, FP, FP; dog missed.
    "a": (
        _pred(([0, 0, 10, 10], CAT, 0.9), ([20, 20, 30, 30], CAT, 0.8), ([1, 0, 11, 10], CAT, 0.6)),
        _target(([0, 0, 10, 10], CAT), ([20, 20, 30, 30], DOG)),
    ),
    # the dog's only detection is below 0.5 (missed there, a TP at 0.0); a confident cat on a
    # difficult cat is ignored.
    "b": (
        _pred(([0, 0, 10, 10], DOG, 0.4), ([50, 50, 60, 60], CAT, 0.95)),
        _target(([0, 0, 10, 10], DOG), ([50, 50, 60, 60], CAT, True)),
    ),
    # no detection at all: the cat is missed, the difficult dog is not.
    "c": (_pred(), _target(([0, 0, 10, 10], CAT), ([30, 30, 40, 40], DOG, True))),
    # perfect
    "d": (_pred(([5, 5, 15, 15], DOG, 0.7)), _target(([5, 5, 15, 15], DOG))),
    # no object: a dog at 0.55 is false at 0.5; a cat at 0.2 only below.
    "e": (_pred(([0, 0, 5, 5], DOG, 0.55), ([0, 0, 5, 5], CAT, 0.2)), _target()),
}


@pytest.fixture
def diagnostics():
    diag = DetectionDiagnostics(CLASSES, score_threshold=0.5, worst=3)
    ids = list(IMAGES)
    diag.update([IMAGES[i][0] for i in ids[:2]], [IMAGES[i][1] for i in ids[:2]], ids[:2])
    diag.update([IMAGES[i][0] for i in ids[2:]], [IMAGES[i][1] for i in ids[2:]], ids[2:])
    return diag


def test_iou_is_continuous_and_vectorised():
    iou = box_iou(np.array([[0, 0, 10, 10], [1, 0, 11, 10]], float), np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float))
    np.testing.assert_allclose(iou, [[1.0, 0.0], [90 / 110, 0.0]])
    assert box_iou(np.zeros((0, 4)), np.zeros((3, 4))).shape == (0, 3)


def test_confusion_matrix_counts(diagnostics):
    #        predicted: cat dog background(missed)
    expected = [
        [1, 0, 1],  # cat: found in a, missed in c
        [1, 1, 1],  # dog: called a cat in a, found in d, missed in b (its detection is below 0.5)
        [1, 0 + 1, 0],  # background: the duplicate cat in a, the dog in e; the difficult cat in b ignored
    ]
    np.testing.assert_array_equal(diagnostics.confusion_matrix(), expected)


def test_confusion_matches_highest_iou_first_and_per_class_curves_by_score():
    # X (0.9) overlaps G1 by 0.54 and G2 by 0.82; Y (0.6) is exactly G2 and overlaps G1 by 0.43.
    diag = DetectionDiagnostics(CLASSES, 0.5)
    diag.update(
        [_pred(([3, 0, 13, 10], CAT, 0.9), ([4, 0, 14, 10], CAT, 0.6))],
        [_target(([0, 0, 10, 10], CAT), ([4, 0, 14, 10], CAT))],
    )
    # IoU first: Y-G2 (1.0), then X-G1 (0.54): both objects found, class-agnostically.
    np.testing.assert_array_equal(diag.confusion_matrix(), [[2, 0, 0], [0, 0, 0], [0, 0, 0]])
    # By score (VOC): X takes G2, Y has nothing left above 0.5: one TP, one FP, one missed.
    assert diag.summary().found == 1 and diag.summary().false == 1
    (errors,) = diag.worst_images()
    assert errors.caption == "#0: 1 missed, 1 false"  # no image id given: counted


@pytest.mark.parametrize(
    "threshold, name, precision, recall, f1",
    [
        (0.0, "cat", 1 / 4, 1 / 2, 2 / 6),  # cat: TP .9; FP .8, .6, .2; 2 objects (a, c)
        (0.0, "dog", 2 / 3, 2 / 3, 4 / 6),  # dog: TP .7, .4; FP .55; 3 objects (a, b, d)
        (0.0, ALL_CLASSES, 3 / 7, 3 / 5, 6 / 12),
        (0.5, "cat", 1 / 3, 1 / 2, 2 / 5),
        (0.5, "dog", 1 / 2, 1 / 3, 2 / 5),
        (0.55, "dog", 1 / 2, 1 / 3, 2 / 5),  # score >= threshold: 0.55 still counts
        (0.56, "dog", 1.0, 1 / 3, 2 / 4),
        (0.5, ALL_CLASSES, 2 / 5, 2 / 5, 4 / 10),  # 2 TP, 3 FP, 3 missed
        (0.95, "cat", np.nan, 0.0, 0.0),  # no detection left: precision undefined, F1 0
        (1.0, ALL_CLASSES, np.nan, 0.0, 0.0),
    ],
)
def test_precision_recall_f1_against_the_threshold(diagnostics, threshold, name, precision, recall, f1):
    curves = diagnostics.threshold_curves()
    k = int(np.flatnonzero(np.isclose(THRESHOLDS, threshold))[0])
    got = [curves[name][i][k] for i in range(3)]
    np.testing.assert_allclose(got, [precision, recall, f1])


def test_best_f1_is_the_lowest_threshold_with_the_highest_f1(diagnostics):
    # all classes: F1 = 0.5 from 0.00 to 0.20 (3 TP, 4 FP), 6/11 from 0.21 to 0.40 (3 TP, 3 FP).
    assert best_f1(diagnostics.threshold_curves()) == pytest.approx((0.21, 6 / 11))
    empty = DetectionDiagnostics(CLASSES).threshold_curves()
    assert best_f1(empty) is None and np.isnan(empty[ALL_CLASSES][2]).all()


def test_summary_and_worst_images(diagnostics):
    summary = diagnostics.summary()
    assert (summary.found, summary.objects, summary.false) == (2, 5, 3)  # difficult ones not counted
    worst = diagnostics.worst_images()
    # a has 3 errors; b, c and e one each: ties by id, and only 3 kept; d has none.
    assert [w.caption for w in worst] == ["a: 1 missed, 2 false", "b: 1 missed, 0 false", "c: 1 missed, 0 false"]
    # what is drawn: the detections at the threshold and all the ground truth
    assert worst[1].det_scores.tolist() == [0.95] and len(worst[1].gt_boxes) == 2
    assert len(worst[2].det_boxes) == 0


def test_batches_do_not_change_the_result():
    rng = np.random.default_rng(0)

    def image(i):
        n, m = int(rng.integers(0, 6)), int(rng.integers(0, 4))
        corners = rng.uniform(0, 50, (n + m, 2))
        boxes = np.concatenate([corners, corners + rng.uniform(5, 30, (n + m, 2))], axis=1)
        pred = {"boxes": boxes[:n], "labels": rng.integers(1, 3, n), "scores": rng.uniform(0, 1, n)}
        target = {"boxes": boxes[n:], "labels": rng.integers(1, 3, m), "difficult": rng.uniform(0, 1, m) < 0.2}
        # detections that land on the objects, so there is something to find
        pred["boxes"][: min(n, m)] = boxes[n : n + min(n, m)] + rng.uniform(-1, 1, (min(n, m), 4))
        return pred, target, f"img{i:03d}"

    data = [image(i) for i in range(300)]
    whole, batched = DetectionDiagnostics(CLASSES, 0.3), DetectionDiagnostics(CLASSES, 0.3)
    whole.update(*map(list, zip(*data, strict=True)))
    for start in range(0, len(data), 3):
        batched.update(*map(list, zip(*data[start : start + 3], strict=True)))
    np.testing.assert_array_equal(whole.confusion_matrix(), batched.confusion_matrix())
    assert whole.summary() == batched.summary() and whole.summary().found > 0
    for name, curves in whole.threshold_curves().items():
        np.testing.assert_array_equal(curves, batched.threshold_curves()[name])
    assert [w.image_id for w in whole.worst_images()] == [w.image_id for w in batched.worst_images()]
    assert len(whole.worst_images()) == 8


def test_bad_labels_are_refused():
    with pytest.raises(ValueError, match="1..2"):
        DetectionDiagnostics(CLASSES).update([_pred(([0, 0, 1, 1], 3, 0.9))], [_target()], ["x"])


def _rows(path):
    with path.open(newline="") as handle:
        return list(csv.reader(handle))


def test_files_hold_the_numbers_and_the_plots_are_images(diagnostics, tmp_path):
    cm_csv, cm_png = write_confusion_matrix(diagnostics.confusion_matrix(), CLASSES, 0.5, tmp_path)
    curves_csv, curves_png = write_threshold_curves(diagnostics.threshold_curves(), tmp_path)
    assert [p.name for p in (cm_csv, cm_png, curves_csv, curves_png)] == [
        "confusion_matrix.csv", "confusion_matrix.png", "threshold_curves.csv", "threshold_curves.png",
    ]
    assert _rows(cm_csv) == [
        ["ground truth \\ predicted", "cat", "dog", "background"],
        ["cat", "1", "0", "1"],
        ["dog", "1", "1", "1"],
        ["background", "1", "1", ""],
    ]
    rows = _rows(curves_csv)
    assert rows[0] == ["class", "threshold", "precision", "recall", "f1"]
    assert len(rows) == 1 + 3 * 101
    assert [r[0] for r in rows[1::101]] == ["cat", "dog", ALL_CLASSES]
    assert ["cat", "0.50", "0.3333", "0.5000", "0.4000"] in rows
    assert [ALL_CLASSES, "1.00", "nan", "0.0000", "0.0000"] in rows
    for png in (cm_png, curves_png):
        with Image.open(png) as image:
            image.verify()
        with Image.open(png) as image:
            assert image.format == "PNG" and image.width >= 400 and image.height >= 300
            # not a blank canvas
            assert len(np.unique(np.asarray(image.convert("L")))) > 10


def test_worst_images_gallery_reads_the_dataset_images(diagnostics, tmp_path):
    from detexp.commands.evaluate import _Split, _write_worst_images
    from detexp.data.files import DataRoot

    (tmp_path / "photos").mkdir()
    for image_id in "abc":  # the images as a layout lists them: any folder, any extension
        Image.new("RGB", (80, 60), (90, 120, 60)).save(tmp_path / "photos" / f"{image_id}.png")
    split = _Split(DataRoot(tmp_path), CLASSES, {i: f"photos/{i}.png" for i in "abc"}, None, 3)
    worst = diagnostics.worst_images()
    (path,) = _write_worst_images(worst, split, tmp_path / "worst_images.jpg")
    with Image.open(path) as grid:
        assert grid.size == (3 * 320, 320)  # 3 tiles in one row
    assert _write_worst_images([], split, tmp_path / "none.jpg") == []
