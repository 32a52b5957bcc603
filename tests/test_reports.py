"""Report artifacts: tables hold the numbers, plots and drawings are real images."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from detexp.evaluation.figures import (
    draw_detections,
    image_grid,
    plot_pr_curves,
    write_per_class_table,
)

METRICS = {
    "map": 0.41234,
    "map_50": 0.7,
    "map_75": 0.4,
    "map_small": -1.0,
    "map_medium": 0.3,
    "map_large": 0.5,
    "voc07_map": 0.66666666,
    "voc12_map": 0.75,
    "per_class": {
        "cat": {"ap": 0.5, "ap_50": 0.9, "voc07_ap": 0.8181818, "voc12_ap": 0.875, "num_gt": 12,
                "num_det": 30},
        "traffic light": {"ap": 0.32468, "ap_50": 0.5, "voc07_ap": 0.5151515, "voc12_ap": 0.625,
                          "num_gt": 3, "num_det": 7},
        "bird": {"ap": -1.0, "ap_50": -1.0, "voc07_ap": float("nan"), "voc12_ap": float("nan"),
                 "num_gt": 0, "num_det": 2},
    },
}  # fmt: skip


def test_per_class_table_has_every_class_and_its_numbers(tmp_path):
    csv_path, md_path = write_per_class_table(METRICS, tmp_path)
    assert (csv_path.name, md_path.name) == ("per_class_ap.csv", "per_class_ap.md")

    with csv_path.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["class"] for r in rows] == ["cat", "traffic light", "bird", "mean"]
    cat = rows[0]
    assert (cat["num_gt"], cat["num_det"], cat["ap"], cat["voc07_ap"]) == (
        "12",
        "30",
        "0.5000",
        "0.8182",
    )
    assert rows[1]["ap"] == "0.3247"
    assert rows[2]["voc12_ap"] == "nan"
    mean = rows[3]
    assert (mean["ap"], mean["ap_50"], mean["voc07_ap"], mean["voc12_ap"]) == (
        "0.4123",
        "0.7000",
        "0.6667",
        "0.7500",
    )

    markdown = md_path.read_text()
    assert markdown.splitlines()[0] == (
        "| class | num_gt | num_det | ap | ap_50 | voc07_ap | voc12_ap |"
    )
    assert "| traffic light | 3 | 7 | 0.3247 | 0.5000 | 0.5152 | 0.6250 |" in markdown
    assert "| mean |  |  | 0.4123 | 0.7000 | 0.6667 | 0.7500 |" in markdown


def test_one_pr_plot_per_class(tmp_path):
    curves = {
        "cat": (np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3])),
        "traffic light": (np.array([0.25, 0.5]), np.array([1.0, 1.0])),
        "bird": (np.zeros(0), np.zeros(0)),  # no ground truth: still gets a (labelled) plot
    }
    paths = plot_pr_curves(curves, tmp_path / "pr")
    assert [p.name for p in paths] == ["pr_cat.png", "pr_traffic_light.png", "pr_bird.png"]
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.width > 100 and image.height > 100


def test_draw_detections_marks_the_box_border_and_keeps_the_size():
    image = np.full((120, 200, 3), 128, dtype=np.uint8)
    drawn = draw_detections(
        image,
        boxes=np.array([[40.0, 50.0, 120.0, 100.0]]),
        labels=np.array([1]),
        scores=np.array([0.87]),
        class_names=["cat", "dog"],
        gt_boxes=np.array([[10.0, 10.0, 30.0, 30.0]]),
        gt_labels=np.array([2]),
    )
    assert drawn.size == (200, 120)
    pixels = np.asarray(drawn)
    assert (pixels[75, 40] != 128).any()  # left border of the prediction
    assert (pixels[100, 80] != 128).any()  # bottom border
    assert (pixels[75, 80] == 128).all()  # inside the box is left alone
    assert tuple(pixels[20, 10]) == (255, 255, 255)  # ground truth in thin white
    assert (image == 128).all()  # the input array is not drawn on


@pytest.mark.parametrize(("count", "expected"), [(6, (4 * 50, 2 * 50)), (3, (3 * 50, 50))])
def test_image_grid_size(count, expected):
    images = [Image.new("RGB", (80 + 10 * i, 60), (i * 40, 0, 0)) for i in range(count)]
    assert image_grid(images, cols=4, tile=50).size == expected
