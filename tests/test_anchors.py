"""``model.anchor_sizes=auto`` / ``model.anchor_ratios=auto``: the fit against torchvision's
own resize and anchor generator, on boxes whose best anchors are known, and through
``train``'s first lines on real XML files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from conftest import compose_train
from detexp.commands.train import find_data
from detexp.data.voc import VOCRecord
from detexp.errors import ConfigError
from detexp.modeling.anchors import (
    anchor_shapes,
    best_iou,
    fit_anchors,
    fit_model_anchors,
    resized_shapes,
)
from detexp.modeling.detector import build_detector, check_model_config


def _record(width, height, boxes):
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    n = len(boxes)
    return VOCRecord("x", width, height, "x.jpg", boxes, np.ones(n, dtype=np.int64), np.zeros(n, dtype=bool))


def test_box_shapes_are_those_after_torchvisions_resize():
    record = _record(500, 375, [[10, 20, 110, 220], [300, 100, 480, 140]])
    transform = GeneralizedRCNNTransform(min_size=320, max_size=400, image_mean=[0, 0, 0], image_std=[1, 1, 1])
    _, (target,) = transform([torch.zeros(3, 375, 500)], [{"boxes": torch.from_numpy(record.boxes)}])
    boxes = target["boxes"].numpy()
    expected = np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], axis=1)
    np.testing.assert_allclose(resized_shapes([record], 320, 400), expected, rtol=1e-3)


def test_anchor_shapes_are_torchvisions():
    sizes, ratios = (30, 90), (0.5, 1.0, 2.0)
    cell = AnchorGenerator((sizes,), (ratios,)).cell_anchors[0].numpy()
    theirs = np.stack([cell[:, 2] - cell[:, 0], cell[:, 3] - cell[:, 1]], axis=1)
    # torchvision orders ratio-major and rounds to whole pixels
    ours = anchor_shapes(sizes, ratios).reshape(len(sizes), len(ratios), 2).transpose(1, 0, 2).reshape(-1, 2)
    np.testing.assert_allclose(ours, theirs, atol=1.0)


def test_two_kinds_of_boxes_get_their_own_anchors_and_match_better_than_torchvisions():
    rng = np.random.default_rng(0)
    small = rng.normal(1.0, 0.05, (200, 2)) * [40, 40]  # squares of about 40 px
    wide = rng.normal(1.0, 0.05, (200, 2)) * [240, 80]  # 3:1 wide boxes of about 139 px
    wh = np.concatenate([small, wide])
    sizes, ratios = fit_anchors(wh)
    assert any(abs(s - 40) < 6 for s in sizes) and any(abs(s - 139) < 15 for s in sizes), sizes
    assert any(abs(r - 1.0) < 0.1 for r in ratios) and any(abs(r - 1 / 3) < 0.06 for r in ratios), ratios
    fitted = best_iou(wh, anchor_shapes(sizes, ratios)).mean()
    builders = best_iou(wh, anchor_shapes((32, 64, 128, 256, 512), (0.5, 1.0, 2.0))).mean()
    assert fitted > builders + 0.1
    # boxes of one shape: one anchor does as well as any number
    assert fit_anchors(np.full((100, 2), [40.0, 80.0])) == ([57], [2.0])


def test_the_resnet_ladder_keeps_one_octave_per_level_and_given_ratios_stay():
    wh = np.full((50, 2), [300.0, 300.0])
    sizes, ratios = fit_anchors(wh, ratios=[0.5, 1.0, 2.0], ladder=True)
    assert ratios == [0.5, 1.0, 2.0]
    assert len(sizes) == 5 and all(b / a == pytest.approx(2, rel=0.05) for a, b in zip(sizes, sizes[1:], strict=False))
    assert min(abs(np.log(np.asarray(sizes) / 300))) < np.log(2 ** 0.25)  # a rung within a quarter octave


def test_train_fits_auto_anchors_before_ray_and_the_model_is_built_from_the_numbers(tmp_path):
    """Large boxes, as in photos of one animal: the fit leaves torchvision's small anchors out."""
    from test_pipeline import _write_voc

    for n in range(6):
        _write_voc(tmp_path, f"{n:03d}", box=(40 + n, 30, 340, 280), size=(400, 300), filename=f"{n:03d}.jpg")
    cfg = compose_train(["dataset=voc", f"dataset.root={tmp_path}", "model.anchor_sizes=auto", "model.anchor_ratios=auto"])
    check_model_config(cfg.model)
    with pytest.raises(ConfigError, match="auto is fitted to the train split by `train`"):
        build_detector(cfg.model, 2)
    find_data(cfg)
    sizes, ratios = list(cfg.model.anchor_sizes), list(cfg.model.anchor_ratios)
    # 300 x 250 px boxes at 400 x 300: 320 px high after the resize, about 290 px a side
    assert min(sizes) > 150 and max(sizes) < 450 and all(0.6 < r < 1.1 for r in ratios), (sizes, ratios)
    model = build_detector(cfg.model, 2)
    assert model.rpn.anchor_generator.sizes[0] == tuple(sizes)
    fit = fit_model_anchors(compose_train(["model.anchor_sizes=auto"]).model, [_record(400, 300, [[40, 30, 340, 280]])], ladder=False)
    assert fit.mean_iou > fit.builder_mean_iou


def test_anchor_values_that_are_neither_numbers_nor_auto_are_refused():
    with pytest.raises(ConfigError, match="model.anchor_sizes=big must be"):
        check_model_config(compose_train(["model.anchor_sizes=big"]).model)
