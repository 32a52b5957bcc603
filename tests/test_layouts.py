"""Exports as labelling tools lay them out, read with ``dataset.root`` alone: the layout is
found, the one line says which, the classes come from the data, and every image is read
with the same boxes as the devkit it was made from. Real JPEG, PNG, XML and JSON files."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import exports
from conftest import compose_train
from detexp.data.parsing import check_dataset, parse_record
from detexp.data.shapes import SHAPES_CLASSES
from detexp.data.source import resolve
from detexp.errors import DatasetError

# SHAPES_CLASSES sorted as classes read from XML names are
SORTED = sorted(SHAPES_CLASSES, key=lambda n: (n.casefold(), n))


def dataset_cfg(*overrides: str, fmt: str = "voc"):
    return compose_train([f"dataset={fmt}", *overrides]).dataset


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return exports.devkit(tmp_path_factory.mktemp("devkit"))


def devkit_boxes(source: Path) -> dict[str, tuple]:
    """Image id -> (sorted class names, boxes) as the devkit's own XMLs give them."""
    found = resolve(dataset_cfg(f"dataset.root={source}", f"dataset.classes={list(SHAPES_CLASSES)}"))
    out = {}
    for entry in found.train + found.val:
        record, _ = parse_record(found.root, entry, found.classes)
        out[entry.image_id] = _named_boxes(record, found.classes)
    return out


def _named_boxes(record, classes) -> list[tuple]:
    return sorted((classes[label - 1], *np.round(box, 1).tolist()) for box, label in zip(record.boxes, record.labels, strict=True))


def read_all(found) -> dict[str, list[tuple]]:
    """Every image of both splits read in full, none with an error; id -> named boxes."""
    records, problems = check_dataset(found.root, found.train + found.val, found.classes)
    errors = [p for p in problems if p.severity == "error"]
    assert not errors, errors
    assert len(records) == len(found.train) + len(found.val)
    return {r.image_id: _named_boxes(r, found.classes) for r in records}


@pytest.mark.parametrize("layout", ["roboflow_voc", "flat", "label_studio", "fiftyone", "roboflow_coco", "official_coco"])
def test_each_export_layout_reads_with_the_root_alone(layout, source, tmp_path):
    out = tmp_path / "export"
    fmt = "coco" if "coco" in layout else "voc"
    make = {
        "roboflow_voc": lambda: exports.roboflow_voc(source, out),
        "flat": lambda: exports.labelimg_flat(source, out),
        "label_studio": lambda: exports.separate(source, out, "images", "Annotations"),
        "fiftyone": lambda: exports.separate(source, out, "data", "labels"),
        "roboflow_coco": lambda: exports.roboflow_coco(source, out),
        "official_coco": lambda: exports.official_coco(source, out),
    }[layout]
    make()
    found = resolve(dataset_cfg(f"dataset.root={out}", fmt=fmt))
    expected_what = {
        "roboflow_voc": "split folders train/ and valid/",
        "flat": "(images with their XMLs), split by dataset.val_fraction",
        "label_studio": "images/ + Annotations/, split by dataset.val_fraction",
        "fiftyone": "data/ + labels/, split by dataset.val_fraction",
        "roboflow_coco": "COCO JSON train/_annotations.coco.json (images in train/) and valid/_annotations.coco.json",
        "official_coco": "COCO JSON annotations/instances_train.json (images in train/) and annotations/instances_val.json",
    }[layout]
    assert expected_what in found.description
    assert str(out) in found.summary().splitlines()[0]
    # the classes come from the data: COCO's categories with boxes in id order (Roboflow's
    # category 0 "shapes" has none: not a class), the XMLs' names sorted
    assert found.classes == (list(SHAPES_CLASSES) if fmt == "coco" else SORTED)
    assert any(line.startswith("classes read from") for line in found.summary().splitlines())
    # every image, the same boxes as the devkit's XMLs
    assert read_all(found) == devkit_boxes(source)
    if layout in ("roboflow_voc", "roboflow_coco", "official_coco"):  # the export's own split
        assert sorted(found.val_ids) == sorted((source / "ImageSets/Main/val.txt").read_text().split())


def test_a_flat_folder_as_labelimg_leaves_it(source, tmp_path):
    """A PNG, an upper-case .JPG, an image named differently from its XML (found by the
    XML's <filename>), and an image nobody labelled."""
    out = exports.labelimg_flat(source, tmp_path / "flat", odd=True)
    found = resolve(dataset_cfg(f"dataset.root={out}"))
    images = found.images()
    ids = (source / "ImageSets/Main/trainval.txt").read_text().split()
    assert images[ids[0]].endswith(".png") and images[ids[1]].endswith(".JPG")
    assert images[ids[2]] == f"photo_{ids[2]}.jpeg"
    assert "unlabelled" not in images
    assert "1 image(s) in the root folder have no XML: left out (unlabelled)" in found.notes
    assert read_all(found) == devkit_boxes(source)


def test_the_seeded_split_is_the_same_every_time_and_moves_with_the_seed(source, tmp_path):
    out = exports.labelimg_flat(source, tmp_path / "flat")
    first = resolve(dataset_cfg(f"dataset.root={out}"))
    again = resolve(dataset_cfg(f"dataset.root={out}"))
    other = resolve(dataset_cfg(f"dataset.root={out}", "dataset.split_seed=7"))
    assert first.val_ids == again.val_ids and first.val_ids
    assert sorted(first.train_ids + first.val_ids) == sorted(other.train_ids + other.val_ids)
    assert first.val_ids != other.val_ids


def test_folder_names_it_cannot_guess_are_set_by_keys(source, tmp_path):
    out = exports.separate(source, tmp_path / "odd", "pictures", "boxes")
    with pytest.raises(DatasetError) as refused:
        resolve(dataset_cfg(f"dataset.root={out}"))
    message = str(refused.value)
    assert "no VOC-XML layout found" in message and "pictures/" in message and "boxes/" in message
    assert "dataset.images_dir" in message and "dataset.annotations_dir" in message
    found = resolve(dataset_cfg(f"dataset.root={out}", "dataset.images_dir=pictures", "dataset.annotations_dir=boxes"))
    assert found.description.startswith("pictures/ + boxes/")
    assert read_all(found) == devkit_boxes(source)
    with pytest.raises(DatasetError, match="dataset.images_dir=photos: no such folder"):
        resolve(dataset_cfg(f"dataset.root={out}", "dataset.images_dir=photos", "dataset.annotations_dir=boxes"))


def test_an_export_one_folder_down_is_named(source, tmp_path):
    exports.roboflow_voc(source, tmp_path / "download" / "my-project")
    (tmp_path / "download" / "notes").mkdir()
    out = exports.labelimg_flat(source, tmp_path / "zip" / "dataset")
    with pytest.raises(DatasetError, match=r"did you mean dataset.root=.*zip/dataset\?"):
        resolve(dataset_cfg(f"dataset.root={out.parent}"))


def test_given_classes_win_and_val_only_names_are_named(source, tmp_path):
    out = exports.roboflow_voc(source, tmp_path / "rf")
    given = resolve(dataset_cfg(f"dataset.root={out}", "dataset.classes=[triangle,circle]"))
    assert given.classes == ["triangle", "circle"]
    assert not any(line.startswith("classes read from") for line in given.notes)
    # a name only the val split uses: named before training, its images skipped as unknown
    val_xml = sorted((out / "valid").glob("*.xml"))[0]
    val_xml.write_text(re.sub(r"<name>[^<]*</name>", "<name>hexagon</name>", val_xml.read_text(), count=1))
    found = resolve(dataset_cfg(f"dataset.root={out}"))
    assert "hexagon" not in found.classes
    assert any("'hexagon' appear in the val split and not in the train split" in n for n in found.notes)


def test_cvat_labelmap_gives_the_class_order(source, tmp_path):
    """CVAT's Pascal VOC export is the devkit with a labelmap.txt: its order, not sorted."""
    out = tmp_path / "cvat"
    shutil.copytree(source, out)
    (out / "labelmap.txt").write_text(
        "# label:color_rgb:parts:actions\nbackground:0,0,0::\n"
        + "".join(f"{name}:{n},0,0::\n" for n, name in enumerate(reversed(SHAPES_CLASSES)))
    )
    found = resolve(dataset_cfg(f"dataset.root={out}"))
    assert found.classes == list(reversed(SHAPES_CLASSES))
    assert "split by ImageSets/Main/train.txt, val.txt" in found.description
    assert any("the export's class list" in n for n in found.notes)


def test_cvat_devkit_with_its_one_split_file_is_split_by_the_seed(source, tmp_path):
    """CVAT writes ImageSets/Main/default.txt only; a devkit may lack val.txt."""
    out = tmp_path / "cvat"
    shutil.copytree(source, out)
    splits = out / "ImageSets" / "Main"
    for name in splits.iterdir():
        name.unlink()
    (splits / "default.txt").write_text((source / "ImageSets/Main/trainval.txt").read_text())
    found = resolve(dataset_cfg(f"dataset.root={out}"))
    assert "split by dataset.val_fraction" in found.description and found.val
    assert any("has no train.txt (it has default.txt)" in n for n in found.notes)
    named = resolve(dataset_cfg(f"dataset.root={out}", "dataset.train_split=default"))
    assert named.description == (
        "JPEGImages/ + Annotations/, split by ImageSets/Main/default.txt (no val.txt: val cut from it by "
        "dataset.val_fraction=0.2)")
    assert sorted(named.train_ids + named.val_ids) == sorted((splits / "default.txt").read_text().split())
    same = resolve(dataset_cfg(f"dataset.root={out}", "dataset.train_split=default", "dataset.val_split=default"))
    assert any("validation scores the training images" in n for n in same.notes)


def test_a_folder_of_xmls_without_images_is_not_taken_for_an_export(source, tmp_path):
    out = exports.separate(source, tmp_path / "export", "images", "label")
    found = resolve(dataset_cfg(f"dataset.root={out}"))  # label/ is found as the XMLs' folder
    assert found.description.startswith("images/ + label/")
    with pytest.raises(DatasetError, match="no VOC-XML layout found"):
        resolve(dataset_cfg(f"dataset.root={out / 'label'}"))


# --------------------------------------------------------------------------- COCO odd cases


def _edit_json(path: Path, edit) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def test_coco_problems_are_named_and_skipped_like_voc_ones(source, tmp_path):
    out = exports.roboflow_coco(source, tmp_path / "coco")
    train_json = out / "train" / "_annotations.coco.json"
    doc = json.loads(train_json.read_text())
    names = [im["file_name"] for im in doc["images"]]

    def edit(doc):
        doc["annotations"][0]["category_id"] = 99  # a category id the file does not define
        first_of_third = next(a for a in doc["annotations"] if a["image_id"] == doc["images"][2]["id"])
        first_of_third["bbox"] = [5, 5, 0, 4]  # a box of zero width
        doc["annotations"].append({"id": 999, "image_id": 12345, "category_id": 1, "bbox": [1, 1, 2, 2]})
        doc["images"][3]["file_name"] = "../outside.jpg"
    _edit_json(train_json, edit)
    (out / "train" / names[1]).unlink()  # listed in the JSON, missing on disk

    found = resolve(dataset_cfg(f"dataset.root={out}", fmt="coco"))
    assert "1 annotations whose image_id is not in 'images' in train/_annotations.coco.json: ignored" in found.notes
    records, problems = check_dataset(found.root, found.train, found.classes)
    by_image = {p.image_id: p.problem for p in problems if p.severity == "error"}
    stems = [Path(n).stem for n in names]
    first_image = next(im for im in doc["images"] if im["id"] == doc["annotations"][0]["image_id"])
    assert "unknown category id in annotation id 1 (category_id 99)" in by_image[Path(first_image["file_name"]).stem]
    assert by_image[stems[1]] == "image file is missing"
    assert by_image[stems[2]].startswith("xmax 5 == xmin 5 (zero width) in annotation id")
    assert "points outside the dataset root" in by_image["../outside"]
    assert len(records) == len(found.train) - len(by_image)


def test_coco_with_explicit_files_and_a_seeded_split(source, tmp_path):
    out = exports.official_coco(source, tmp_path / "coco")
    (out / "annotations" / "instances_train.json").rename(out / "annotations" / "all.json")
    found = resolve(dataset_cfg(
        f"dataset.root={out}", "dataset.train_annotations=annotations/all.json", "dataset.images_dir=train",
        "dataset.val_split=null", fmt="coco",
    ))
    assert found.description == "COCO JSON annotations/all.json (images in train/)"
    assert not found.val
    seeded = resolve(dataset_cfg(
        f"dataset.root={out}", "dataset.train_annotations=annotations/all.json", "dataset.images_dir=train",
        "dataset.val_split=nothing", fmt="coco",
    ))
    assert "no nothing JSON: split by dataset.val_fraction" in seeded.description
    assert len(seeded.train) + len(seeded.val) == len(found.train) and seeded.val
    with pytest.raises(DatasetError, match="dataset.train_annotations=annotations/none.json: no such file"):
        resolve(dataset_cfg(f"dataset.root={out}", "dataset.train_annotations=annotations/none.json", fmt="coco"))


def test_coco_boxes_in_fractional_pixels_are_not_a_warning(source, tmp_path):
    out = exports.roboflow_coco(source, tmp_path / "coco")

    def edit(doc):
        for ann in doc["annotations"]:
            ann["bbox"] = [v + 0.25 for v in ann["bbox"][:2]] + ann["bbox"][2:]
    _edit_json(out / "train" / "_annotations.coco.json", edit)
    found = resolve(dataset_cfg(f"dataset.root={out}", fmt="coco"))
    _, problems = check_dataset(found.root, found.train, found.classes)
    assert not [p for p in problems if "non-integer" in p.problem]


def test_a_coco_root_one_folder_off_is_named(source, tmp_path):
    out = exports.roboflow_coco(source, tmp_path / "download" / "project.coco")
    with pytest.raises(DatasetError, match=r"did you mean dataset.root=.*download/project.coco\?"):
        resolve(dataset_cfg(f"dataset.root={out.parent}", fmt="coco"))
    with pytest.raises(DatasetError, match=r"one split folder of a Roboflow export: set dataset.root=.*project.coco \(the"):
        resolve(dataset_cfg(f"dataset.root={out / 'train'}", fmt="coco"))


def test_a_root_without_coco_json_says_what_it_holds(source, tmp_path):
    out = exports.roboflow_voc(source, tmp_path / "voc")
    with pytest.raises(DatasetError) as refused:
        resolve(dataset_cfg(f"dataset.root={out}", fmt="coco"))
    message = str(refused.value)
    assert "no COCO JSON found" in message and "train/, valid/" in message
    assert "_annotations.coco.json" in message and "dataset.train_annotations" in message


# --------------------------------------------------------------------------- end to end


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_a_model_trained_from_coco_json_on_s3_evaluates_and_predicts_as_a_voc_one(
    trained_smoke, smoke_cfg, source, s3, tmp_path
):
    """Roboflow's COCO export in a bucket (a real S3 endpoint on 127.0.0.1), no classes
    given: Ray's tasks read it from there, the names come from its categories, the
    checkpoint keeps them, eval reads the bucket again, and eval and predict write what
    they write for a VOC model."""
    from detexp.commands.evaluate import evaluate
    from detexp.commands.predict import predict
    from detexp.commands.train import train

    out = exports.roboflow_coco(source, tmp_path / "coco")
    uri = s3.upload(out, "e2e/coco")
    overrides = ["dataset=coco", f"dataset.root='{uri}'"]
    result = train(smoke_cfg(*overrides), tmp_path / "train", overrides)
    ckpt = torch.load(result["checkpoint"], map_location="cpu", weights_only=True)
    assert ckpt["classes"] == list(SHAPES_CLASSES)
    assert ckpt["config"]["dataset"]["format"] == "coco" and ckpt["config"]["dataset"]["root"] == uri
    # the report at the end of training: the same files as the VOC smoke run's
    assert _files(tmp_path / "train" / "eval") == _files(trained_smoke.root / "train" / "eval")

    args = [f"checkpoint={tmp_path / 'train'}", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    metrics = evaluate(compose_train(args, config_name="eval"), tmp_path / "eval", args)
    assert 0 <= metrics["map_50"] <= 1
    lines = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert {d["image_id"] for d in lines} <= {p.stem for p in (out / "valid").glob("*.jpg")}
    rows = (tmp_path / "eval" / "per_class_ap.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:-1]] == list(SHAPES_CLASSES)
    assert _files(tmp_path / "train" / "eval") <= _files(tmp_path / "eval")

    args = [f"checkpoint={tmp_path / 'train'}", f"input={out / 'valid'}", "score_threshold=0.0"]
    found = predict(compose_train(args, config_name="predict"), tmp_path / "predict", args)
    assert found["images"] == len(list((out / "valid").glob("*.jpg")))
    lines = [json.loads(line) for line in (tmp_path / "predict" / "predictions.jsonl").read_text().splitlines()]
    assert lines and {d["label"] for d in lines} <= set(SHAPES_CLASSES)
