"""``data show``: its statistics are the counts a person gets from the XML files, its
plot and grid are real images, and a dataset whose class names are not the configured
ones gets one summary with the override to use, before any table (``data show``,
``data check`` and train's error policy alike)."""

from __future__ import annotations

import json
import logging
import math
import re
import shlex
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from conftest import compose_train
from detexp.commands.data_show import data_show
from detexp.data.label_stats import pick_grid_images
from detexp.data.parsing import check_dataset, parse_record
from detexp.data.problems import class_names_summary
from detexp.data.shapes import SHAPES_CLASSES
from detexp.data.source import resolve
from detexp.errors import DetexpError
from test_data_check import error_rows, run_cli
from test_third_party import RENAME, _export

CLASSES = list(SHAPES_CLASSES)


def _xml_objects(root: Path, image_id: str) -> list[dict]:
    """The objects of one annotation, read with ElementTree (not detexp's parser)."""
    objects = []
    for obj in ET.parse(root / "Annotations" / f"{image_id}.xml").getroot().iter("object"):
        box = {k: float(obj.find(f"bndbox/{k}").text) for k in ("xmin", "ymin", "xmax", "ymax")}
        difficult = obj.find("difficult")
        objects.append({
            "name": obj.find("name").text.strip(),
            "difficult": difficult is not None and difficult.text.strip() == "1",
            "size": math.sqrt((box["xmax"] - box["xmin"]) * (box["ymax"] - box["ymin"])),
            "ratio": (box["xmax"] - box["xmin"]) / (box["ymax"] - box["ymin"]),
        })
    return objects


def _split_ids(root: Path, split: str) -> list[str]:
    return (root / "ImageSets" / "Main" / f"{split}.txt").read_text().split()


def _binned(values: list[float], edges: list[float]) -> list[int]:
    counts = [0] * (len(edges) - 1)
    for value in values:
        (i,) = [i for i in range(len(counts)) if edges[i] <= value < edges[i + 1]]
        counts[i] += 1
    return counts


@pytest.fixture(scope="module")
def shown(shapes_cache, tmp_path_factory):
    """``data show`` on the smoke-sized shapes dataset, composed from a train command line."""
    cfg = compose_train(["+experiment=smoke", f"dataset.cache_dir={shapes_cache}", "grid_images=6"],
                        config_name="data_show")
    run_dir = tmp_path_factory.mktemp("show")
    return data_show(cfg, run_dir), run_dir


def test_stats_are_the_counts_in_the_xml_files(shown):
    stats, _ = shown
    root = Path(stats["root"])
    assert list(stats["splits"]) == ["train", "val"]
    for split, found in stats["splits"].items():
        ids = _split_ids(root, split)
        objects = {i: _xml_objects(root, i) for i in ids}
        everything = [o for objs in objects.values() for o in objs]
        assert (found["listed"], found["images"], found["skipped"]) == (len(ids), len(ids), 0)
        assert found["objects"] == len(everything)
        assert found["difficult"] == sum(o["difficult"] for o in everything)
        assert found["empty"] == sum(1 for objs in objects.values() if not objs)
        for name in CLASSES:
            assert found["classes"][name] == {
                "images": sum(1 for objs in objects.values() if any(o["name"] == name for o in objs)),
                "objects": sum(o["name"] == name for o in everything),
                "difficult": sum(o["name"] == name and o["difficult"] for o in everything),
            }, (split, name)
        per_image = Counter(len(objs) for objs in objects.values())
        assert stats["objects_per_image"][split] == [per_image[k] for k in range(len(stats["objects_per_image"][split]))]
        assert sum(stats["objects_per_image"][split]) == len(ids)
        assert stats["box_size"][split] == _binned([o["size"] for o in everything], stats["box_size"]["edges"])
        assert stats["aspect_ratio"][split] == _binned([o["ratio"] for o in everything], stats["aspect_ratio"]["edges"])
    # The generated data has what the test must see counted: negatives and difficult objects.
    assert sum(s["empty"] for s in stats["splits"].values()) > 0
    assert sum(s["difficult"] for s in stats["splits"].values()) > 0


def test_stats_file_plot_and_grid_are_written(shown):
    stats, run_dir = shown
    assert json.loads((run_dir / "label_stats.json").read_text()) == stats
    with Image.open(run_dir / "label_stats.png") as plot:
        assert (plot.format, plot.size) == ("PNG", (1200, 800))
        plot.load()
    with Image.open(run_dir / "gt_grid.jpg") as grid:
        assert (grid.format, grid.size) == ("JPEG", (4 * 320, 2 * 320))  # 6 images, 4 a row
        grid.load()


def test_console_shows_the_class_table_and_histograms(shapes_cache, tmp_path, capsys):
    cfg = compose_train(["+experiment=smoke", f"dataset.cache_dir={shapes_cache}", "grid_images=0"],
                        config_name="data_show")
    stats = data_show(cfg, tmp_path)
    out = capsys.readouterr().out
    train, val = stats["splits"]["train"], stats["splits"]["val"]
    circle = [train["classes"]["circle"][k] for k in ("images", "objects", "difficult")]
    circle += [val["classes"]["circle"][k] for k in ("images", "objects", "difficult")]
    assert re.search(r"^circle\s+" + r"\s+".join(map(str, circle)) + "$", out, re.M), out
    assert re.search(rf"^  without objects\s+{train['empty']}\s+{val['empty']}$", out, re.M), out
    for title in ("objects per image", "box size, sqrt(area) px", "aspect ratio, w/h"):
        assert re.search(rf"^{re.escape(title)}\s+train\s+val$", out, re.M), out
    assert f"wrote label_stats.json, label_stats.png to {tmp_path}" in out
    assert not (tmp_path / "gt_grid.jpg").exists()


def test_the_grid_shows_every_class_when_it_can(shapes_cache):
    cfg = compose_train(["+experiment=smoke", f"dataset.cache_dir={shapes_cache}"], config_name="data_show")
    source = resolve(cfg.dataset)
    records, _ = check_dataset(source.root, source.train_ids, source.classes)
    picked = pick_grid_images(records, len(CLASSES), len(CLASSES))
    assert len(picked) == len(CLASSES)
    assert {int(label) for r in picked for label in r.labels} == set(range(1, len(CLASSES) + 1))
    assert pick_grid_images(records, 10, len(CLASSES)) == pick_grid_images(records, 10, len(CLASSES))
    assert len(pick_grid_images(records, 1000, len(CLASSES))) == len(records)


# --------------------------------------------------------------------------- class names


def test_class_names_summary_suggests_what_the_user_most_likely_wants():
    # None of the configured classes appear: the class list is another dataset's.
    summary = class_names_summary({"Disc": 3, "tri angle": 5}, ["aeroplane", "bicycle"])
    first, second = summary.splitlines()
    assert first.startswith("2 class names in the annotations are not in dataset.classes")
    assert "'tri angle' in 5 images, 'Disc' in 3 images" in first
    assert second.endswith("""pass:  'dataset.classes=[Disc,"tri angle"]'""")
    # Some configured classes appear: keep them (and their labels) and add the new name;
    # a case variant is a typo to fix, not a class to add.
    summary = class_names_summary({"circle": 9, "Circle": 1, "dog": 2}, ["circle", "square"])
    assert "'Circle' in 1 image (did you mean 'circle'?)" in summary
    assert "'dataset.classes=[circle,square,dog]'" in summary
    assert "fix them in the annotations" in summary
    # Same spelling as configured, other case everywhere: the data's spelling, in the configured order.
    assert "'dataset.classes=[Cat,Dog]'" in class_names_summary({"Dog": 1, "Cat": 4}, ["cat", "dog"])
    assert class_names_summary({"circle": 9}, ["circle", "square"]) == ""


def test_an_unknown_class_problem_carries_the_name(tmp_path):
    root = _export(tmp_path)
    _, problems = parse_record(root, "000001", CLASSES)
    assert problems and all(p.unknown_class in RENAME.values() for p in problems)
    assert all(p.problem.startswith("unknown class ") for p in problems)


def _export_name_images(root: Path) -> dict[str, int]:
    return Counter(name for xml in (root / "Annotations").glob("*.xml")
                   for name in {o["name"] for o in _xml_objects(root, xml.stem)})


def _images_with_objects(root: Path) -> int:
    """Every image with an object is unusable in the export: all its names are unknown."""
    return sum(1 for xml in (root / "Annotations").glob("*.xml") if _xml_objects(root, xml.stem))


# The VOC class list, given: none of its names is in the export of _export()
VOC_CLASSES = ("dataset.classes=[aeroplane,bicycle,bird,boat,bottle,bus,car,cat,chair,cow,diningtable,"
               "dog,horse,motorbike,person,pottedplant,sheep,sofa,train,tvmonitor]")


def _summary_lines(output: str, root: Path) -> tuple[str, str]:
    """The summary's two lines: they open the output after the line naming the layout, and
    name each unknown name with its image count (counted from the XML here) and the override."""
    lines = output.splitlines()
    first, second = lines[1:3] if lines[0].startswith("dataset ") else lines[:2]
    assert first.startswith("4 class names in the annotations are not in dataset.classes"), output
    for name, images in _export_name_images(root).items():
        assert f"{name!r} in {images} images" in first, first
    assert second.startswith("none of the 20 configured classes appear in these annotations"), second
    return first, second


def test_data_check_and_show_give_the_summary_before_any_table(tmp_path):
    root = _export(tmp_path)
    splits = ["dataset.train_split=fold0_train", "dataset.val_split=fold0_holdout", VOC_CLASSES]
    check = run_cli("data", "check", "dataset=voc", f"dataset.root={root}", *splits, "hydra.run.dir=check",
                    cwd=tmp_path)
    assert check.returncode == 1, check.stdout + check.stderr
    _, override = _summary_lines(check.stdout, root)
    assert check.stdout.splitlines()[0].startswith(f"dataset {root}: JPEGImages/ + Annotations/"), check.stdout
    assert check.stdout.splitlines()[3].startswith("image_id  file"), check.stdout  # then the table
    assert len(error_rows(check.stdout)) == _images_with_objects(root)  # the table still lists each

    show = run_cli("data", "show", "dataset=voc", f"dataset.root={root}", *splits, "hydra.run.dir=show",
                   cwd=tmp_path)
    assert show.returncode == 0, show.stdout + show.stderr
    assert _summary_lines(show.stdout, root)[1] == override
    assert f"{_images_with_objects(root)} image(s) with errors are left out" in show.stdout

    # The suggested override, pasted as it is printed, makes the dataset clean.
    suggested = shlex.split(override.split("pass:", 1)[1])
    assert suggested == ["dataset.classes=[box_4,Disc,plus,\"tri angle\"]"]
    again = run_cli("data", "check", "dataset=voc", f"dataset.root={root}", *splits[:2], *suggested,
                    "hydra.run.dir=again", cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "class names" not in again.stdout
    assert re.search(r"^checked 32 images in .*: 0 error\(s\)", again.stdout, re.M), again.stdout


def test_train_error_policy_puts_the_summary_before_the_table(tmp_path, caplog):
    from detexp.commands.train import _apply_error_policy

    root = _export(tmp_path)
    overrides = ["dataset=voc", f"dataset.root={root}",
                 "dataset.train_split=fold0_train", "dataset.val_split=fold0_holdout", VOC_CLASSES]
    source = resolve(compose_train(overrides).dataset)
    _, problems = check_dataset(source.root, source.train + source.val, source.classes)

    with pytest.raises(DetexpError) as info:
        _apply_error_policy(compose_train([*overrides, "dataset.on_error=raise"]), problems, tmp_path / "r", source)
    lines = str(info.value).splitlines()
    assert lines[0] == "the dataset has errors (dataset.on_error=raise):"
    _summary_lines("\n".join(lines[1:]), root)
    assert lines[3].startswith("image_id  file")

    with caplog.at_level(logging.WARNING, logger="detexp"):
        _apply_error_policy(compose_train(overrides), problems, tmp_path / "s", source)
    lines = caplog.text.splitlines()
    skipping = next(n for n, line in enumerate(lines) if f"skipping {_images_with_objects(root)} image(s)" in line)
    _summary_lines("\n".join(lines[skipping + 1:]), root)
    assert lines[skipping + 3].startswith("image_id  file")
