"""Exports as labelling tools write them, built from a generated shapes devkit: real JPEG,
PNG, XML and JSON files, in the folder layouts of Roboflow (VOC and COCO), LabelImg, Label
Studio, FiftyOne and COCO's official release. Test data only; never downloaded."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

from PIL import Image

from detexp.data.shapes import SHAPES_CLASSES, generate_shapes


def devkit(root: Path, num_train: int = 8, num_val: int = 4, seed: int = 3) -> Path:
    return generate_shapes(root, num_train=num_train, num_val=num_val, image_size=64, seed=seed)


def _split_ids(source: Path, split: str) -> list[str]:
    return (source / "ImageSets" / "Main" / f"{split}.txt").read_text().split()


def _copy_pair(source: Path, image_id: str, images: Path, annotations: Path, image_name: str | None = None) -> None:
    """The image (renamed, or converted to PNG by its suffix) and its XML, with <filename>
    set to the image's new name, as the tools write it."""
    images.mkdir(parents=True, exist_ok=True)
    annotations.mkdir(parents=True, exist_ok=True)
    name = image_name or f"{image_id}.jpg"
    src = source / "JPEGImages" / f"{image_id}.jpg"
    if name.lower().endswith(".png"):
        Image.open(src).save(images / name)
    else:
        shutil.copyfile(src, images / name)
    tree = ET.parse(source / "Annotations" / f"{image_id}.xml")
    tree.getroot().find("filename").text = name
    tree.write(annotations / f"{image_id}.xml")


def roboflow_voc(source: Path, out: Path) -> Path:
    """``train/`` and ``valid/``, each image's XML beside it."""
    for split, folder in (("train", "train"), ("val", "valid")):
        for image_id in _split_ids(source, split):
            _copy_pair(source, image_id, out / folder, out / folder)
    (out / "README.roboflow.txt").write_text("exported from roboflow\n")
    return out


def labelimg_flat(source: Path, out: Path, odd: bool = False) -> Path:
    """One folder of images with their XMLs. ``odd``: the first image is a PNG, the second
    an upper-case ``.JPG``, the third named differently from its XML (found by <filename>),
    and one image has no XML (unlabelled)."""
    ids = _split_ids(source, "trainval")
    for n, image_id in enumerate(ids):
        name = None
        if odd and n == 0:
            name = f"{image_id}.png"
        elif odd and n == 1:
            name = f"{image_id}.JPG"
        elif odd and n == 2:
            name = f"photo_{image_id}.jpeg"
        _copy_pair(source, image_id, out, out, name)
    if odd:
        shutil.copyfile(source / "JPEGImages" / f"{ids[0]}.jpg", out / "unlabelled.jpg")
    return out


def separate(source: Path, out: Path, images: str, annotations: str) -> Path:
    """Images in ``out/images``, XMLs in ``out/annotations`` (Label Studio: images/ +
    Annotations/; FiftyOne: data/ + labels/)."""
    for image_id in _split_ids(source, "trainval"):
        _copy_pair(source, image_id, out / images, out / annotations)
    return out


def _coco(source: Path, ids: list[str], images_dir: Path, file_prefix: str = "") -> dict:
    """A COCO document of ``ids``, images copied into ``images_dir``; Roboflow's way: a
    category 0 named after the dataset with no boxes, the classes under it from id 1."""
    images_dir.mkdir(parents=True, exist_ok=True)
    categories = [{"id": 0, "name": "shapes", "supercategory": "none"}] + [
        {"id": i, "name": name, "supercategory": "shapes"} for i, name in enumerate(SHAPES_CLASSES, start=1)]
    doc: dict = {"info": {}, "images": [], "annotations": [], "categories": categories}
    for n, image_id in enumerate(ids):
        shutil.copyfile(source / "JPEGImages" / f"{image_id}.jpg", images_dir / f"{image_id}.jpg")
        root = ET.parse(source / "Annotations" / f"{image_id}.xml").getroot()
        width, height = int(root.find("size/width").text), int(root.find("size/height").text)
        doc["images"].append({"id": n, "file_name": f"{file_prefix}{image_id}.jpg", "width": width, "height": height})
        for obj in root.iter("object"):
            box = [float(obj.find(f"bndbox/{k}").text) for k in ("xmin", "ymin", "xmax", "ymax")]
            doc["annotations"].append({
                "id": len(doc["annotations"]) + 1, "image_id": n,
                "category_id": SHAPES_CLASSES.index(obj.find("name").text) + 1,
                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                "area": (box[2] - box[0]) * (box[3] - box[1]), "iscrowd": int(obj.find("difficult").text),
            })
    return doc


def roboflow_coco(source: Path, out: Path) -> Path:
    """``<split>/_annotations.coco.json`` with the images beside it."""
    for split, folder in (("train", "train"), ("val", "valid")):
        doc = _coco(source, _split_ids(source, split), out / folder)
        (out / folder / "_annotations.coco.json").write_text(json.dumps(doc))
    return out


def official_coco(source: Path, out: Path) -> Path:
    """``annotations/instances_<split>.json`` with the images in ``<split>/``."""
    (out / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        doc = _coco(source, _split_ids(source, split), out / split)
        (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))
    return out
