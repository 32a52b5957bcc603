"""The generated shapes dataset: deterministic, valid VOC, boxes on the drawn shapes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detexp.data.parsing import check_dataset
from detexp.data.shapes import SHAPES_CLASSES, ensure_shapes, generate_shapes
from detexp.data.voc import read_split_ids

PARAMS = dict(num_train=40, num_val=10, image_size=96, seed=7)


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory) -> Path:
    return generate_shapes(tmp_path_factory.mktemp("shapes"), **PARAMS)


@pytest.fixture(scope="module")
def records(shapes_root):
    ids = read_split_ids(shapes_root, "trainval")
    records, problems = check_dataset(shapes_root, ids, SHAPES_CLASSES)
    assert [p for p in problems if p.severity == "error"] == []
    return records, problems


def load(root: Path, image_id: str) -> np.ndarray:
    return np.asarray(Image.open(root / "JPEGImages" / f"{image_id}.jpg"), dtype=np.float32)


def test_generation_is_deterministic(shapes_root, tmp_path):
    again = generate_shapes(tmp_path / "again", **PARAMS)
    for xml in sorted((shapes_root / "Annotations").glob("*.xml")):
        assert xml.read_bytes() == (again / "Annotations" / xml.name).read_bytes()
    for image_id in ("000001", "000050"):
        np.testing.assert_array_equal(load(shapes_root, image_id), load(again, image_id))
    other = generate_shapes(tmp_path / "other", **{**PARAMS, "seed": 8})
    assert (other / "Annotations/000001.xml").read_bytes() != (
        shapes_root / "Annotations/000001.xml"
    ).read_bytes()


def test_splits(shapes_root):
    train = read_split_ids(shapes_root, "train")
    val = read_split_ids(shapes_root, "val")
    assert len(train) == 40 and len(val) == 10 and set(train).isdisjoint(val)
    assert read_split_ids(shapes_root, "trainval") == train + val


def test_every_record_parses_with_only_negative_image_warnings(records):
    recs, problems = records
    assert len(recs) == 50
    assert {p.problem for p in problems} == {"no objects (used as a negative image)"}
    sizes = {(r.width, r.height) for r in recs}
    assert len(sizes) > 10  # sizes vary
    assert all(76 <= w <= 116 and 76 <= h <= 116 for w, h in sizes)
    assert set(np.concatenate([r.labels for r in recs]).tolist()) == {1, 2, 3, 4}


def test_there_are_difficult_objects_and_empty_images(records):
    recs, _ = records
    assert any(len(r.labels) == 0 for r in recs)
    assert any(r.difficult.any() for r in recs)
    assert all(1 <= len(r.labels) <= 4 for r in recs if len(r.labels))


def test_xml_is_voc_shaped(shapes_root):
    text = (shapes_root / "Annotations" / "000001.xml").read_text()
    for tag in (
        "<folder>",
        "<filename>000001.jpg</filename>",
        "<depth>3</depth>",
        "<pose>Unspecified</pose>",
        "<truncated>0</truncated>",
        "<difficult>",
    ):
        assert tag in text


def test_boxes_sit_on_the_drawn_shapes(shapes_root, records):
    """The box centre has the shape's colour, and a square's box edges are tight."""
    recs, _ = records
    checked = tight = 0
    for rec in recs:
        pixels = load(shapes_root, rec.image_id)
        inside_any = np.zeros(pixels.shape[:2], bool)
        for xmin, ymin, xmax, ymax in rec.boxes.astype(int):
            inside_any[ymin - 3 : ymax + 2, xmin - 3 : xmax + 2] = True
        background = pixels[~inside_any].mean(axis=0)
        for (xmin, ymin, xmax, ymax), label in zip(rec.boxes.astype(int), rec.labels, strict=True):
            # VOC 1-based inclusive -> 0-based pixel rows/columns [xmin-1, xmax-1].
            cx, cy = (xmin - 1 + xmax - 1) // 2, (ymin - 1 + ymax - 1) // 2
            centre = pixels[cy - 1 : cy + 2, cx - 1 : cx + 2].reshape(-1, 3).mean(axis=0)
            assert np.linalg.norm(centre - background) > 40, rec.image_id
            if SHAPES_CLASSES[label - 1] == "square" and _alone(rec.boxes, xmin, ymin, pixels):
                _assert_tight(pixels, (xmin, ymin, xmax, ymax), centre, rec.image_id)
                tight += 1
            checked += 1
    assert checked > 50 and tight >= 3


def _alone(boxes, xmin, ymin, pixels) -> bool:
    """True when no other box comes within 3 px (so the lines just outside are background)."""
    height, width = pixels.shape[:2]
    box = next(b for b in boxes.astype(int) if b[0] == xmin and b[1] == ymin)
    if box[0] < 4 or box[1] < 4 or box[2] > width - 3 or box[3] > height - 3:
        return False
    return all(
        b[0] > box[2] + 3 or b[2] < box[0] - 3 or b[1] > box[3] + 3 or b[3] < box[1] - 3
        for b in boxes.astype(int)
        if not (b == box).all()
    )


def _assert_tight(pixels, box, colour, image_id) -> None:
    """Each edge line of the box is shape-coloured; the line just outside is not.

    JPEG and the added noise perturb colours, so compare distances instead of demanding
    exact colours. This fails if the box is off by one pixel in either direction.
    """
    xmin, ymin, xmax, ymax = (int(v) for v in box)
    x0, y0, x1, y1 = xmin - 1, ymin - 1, xmax - 1, ymax - 1  # 0-based inclusive
    lines = [  # (edge line inside the box, the line 1 px outside it)
        (pixels[y0, x0 : x1 + 1], pixels[y0 - 1, x0 : x1 + 1]),
        (pixels[y1, x0 : x1 + 1], pixels[y1 + 1, x0 : x1 + 1]),
        (pixels[y0 : y1 + 1, x0], pixels[y0 : y1 + 1, x0 - 1]),
        (pixels[y0 : y1 + 1, x1], pixels[y0 : y1 + 1, x1 + 1]),
    ]
    for inside, outside in lines:
        d_in = np.linalg.norm(inside.mean(axis=0) - colour)
        d_out = np.linalg.norm(outside.mean(axis=0) - colour)
        assert d_in < 0.3 * d_out, (image_id, d_in, d_out)


def test_ensure_shapes_generates_once_and_reuses(tmp_path):
    cache = tmp_path / "cache"
    params = dict(num_train=4, num_val=2, image_size=64, seed=1)
    first = ensure_shapes(cache, **params)
    marker = first / "marker"
    marker.write_text("kept")
    second = ensure_shapes(cache, **params)
    assert second == first and marker.exists()
    assert [p.name for p in cache.iterdir()] == [first.name]  # no temp folders left over
    assert ensure_shapes(cache, **{**params, "seed": 2}) != first
    assert len(read_split_ids(first, "trainval")) == 6


def test_ensure_shapes_tolerates_losing_a_race(tmp_path, monkeypatch):
    """If another process renames its copy into place first, ours is discarded."""
    cache = tmp_path / "cache"
    import detexp.data.shapes as shapes

    params = dict(num_train=2, num_val=1, image_size=64, seed=0)
    real_generate = shapes.generate_shapes

    def generate_then_competitor_wins(root, *args):
        real_generate(root, *args)
        real_generate(cache / shapes.shapes_dirname(*args), *args)
        return root

    monkeypatch.setattr(shapes, "generate_shapes", generate_then_competitor_wins)
    result = ensure_shapes(cache, **params)
    assert result.is_dir() and len(list(cache.iterdir())) == 1


def test_bad_parameters_are_refused(tmp_path):
    with pytest.raises(ValueError, match="image_size"):
        generate_shapes(tmp_path, image_size=16)
    with pytest.raises(TypeError):
        ensure_shapes(tmp_path, num_images=3)
