"""VOC reading and validation on real files written into tmp_path."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from detexp.data.parsing import check_dataset, parse_record
from detexp.data.problems import format_problems, write_problems_csv
from detexp.data.voc import (
    DatasetError,
    ImageEntry,
    Problem,
    read_split_ids,
    seeded_split,
)

CLASSES = ("cat", "dog", "person")
WIDTH, HEIGHT = 64, 48


# --------------------------------------------------------------------------- fixtures


def write_jpeg(root: Path, image_id: str, size=(WIDTH, HEIGHT), mode: str = "RGB") -> Path:
    path = root / "JPEGImages" / f"{image_id}.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path, quality=90)
    return path


def obj_xml(name="dog", box=(10, 5, 30, 40), difficult=None, bndbox=True) -> str:
    diff = "" if difficult is None else f"<difficult>{difficult}</difficult>"
    coords = "".join(
        f"<{k}>{v}</{k}>" for k, v in zip(("xmin", "ymin", "xmax", "ymax"), box, strict=True)
    )
    bb = f"<bndbox>{coords}</bndbox>" if bndbox else ""
    return f"<object><name>{name}</name><pose>Unspecified</pose>{diff}{bb}</object>"


def write_xml(root: Path, image_id: str, objects: list[str] | str, size=(WIDTH, HEIGHT)) -> Path:
    body = objects if isinstance(objects, str) else "".join(objects)
    xml = (
        f"<annotation><folder>x</folder><filename>{image_id}.jpg</filename>"
        f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>"
        f"{body}</annotation>"
    )
    return write_raw_xml(root, image_id, xml)


def write_raw_xml(root: Path, image_id: str, text: str) -> Path:
    path = root / "Annotations" / f"{image_id}.xml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def errors(problems: list[Problem]) -> list[Problem]:
    return [p for p in problems if p.severity == "error"]


def warnings_(problems: list[Problem]) -> list[Problem]:
    return [p for p in problems if p.severity == "warning"]


# --------------------------------------------------------------------------- good files


def test_multi_object_uses_real_image_size_and_ignores_xml_filename(tmp_path):
    write_jpeg(tmp_path, "a", size=(80, 60))
    xml = (
        "<annotation><filename>../../etc/passwd</filename><path>/nowhere/b.png</path>"
        "<size><width>500</width><height>375</height><depth>3</depth></size>"
        + obj_xml("dog", (10, 5, 30, 40), difficult=0)
        + obj_xml(" cat ", (1, 2, 80, 60), difficult=1)
        + obj_xml("person", (40, 10, 50, 20))
        + "</annotation>"
    )
    write_raw_xml(tmp_path, "a", xml)

    record, problems = parse_record(tmp_path, "a", CLASSES)

    assert not errors(problems)
    assert record is not None
    assert (record.width, record.height) == (80, 60)
    np.testing.assert_array_equal(record.boxes, [[10, 5, 30, 40], [1, 2, 80, 60], [40, 10, 50, 20]])
    assert record.boxes.dtype == np.float32
    assert record.labels.tolist() == [2, 1, 3] and record.labels.dtype == np.int64
    assert record.difficult.tolist() == [False, True, False]
    # The stale <size> is worth a warning: boxes may be in the old coordinate frame.
    assert any("500x375" in p.problem for p in warnings_(problems))


def test_single_object(tmp_path):
    write_jpeg(tmp_path, "one")
    write_xml(tmp_path, "one", [obj_xml("person", (3, 4, 20, 30))])

    record, problems = parse_record(tmp_path, "one", CLASSES)

    assert problems == []
    assert record.boxes.shape == (1, 4)
    assert record.labels.tolist() == [3]
    assert record.difficult.tolist() == [False]


# --------------------------------------------------------------------------- errors

ANN, IMG = "Annotations/x.xml", "JPEGImages/x.jpg"


def _bad_xml(text):
    return lambda root: (write_jpeg(root, "x"), write_raw_xml(root, "x", text))


def _objects(*objs):
    return lambda root: (write_jpeg(root, "x"), write_xml(root, "x", list(objs)))


def _truncated_jpeg(root):
    path = write_jpeg(root, "x", size=(200, 150))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    write_xml(root, "x", [obj_xml()], size=(200, 150))


def _not_an_image(root):
    path = root / "JPEGImages" / "x.jpg"
    path.parent.mkdir(parents=True)
    path.write_text("this is not a picture")
    write_xml(root, "x", [obj_xml()])


ERROR_CASES = {
    "xml does not parse": (_bad_xml("<annotation><object>"), ANN, "does not parse"),
    "empty xml": (_bad_xml("  \n"), ANN, "empty"),
    "missing xml": (lambda root: write_jpeg(root, "x"), ANN, "missing"),
    "missing jpeg": (lambda root: write_xml(root, "x", [obj_xml()]), IMG, "missing"),
    "truncated jpeg": (_truncated_jpeg, IMG, "truncated"),
    "not an image": (_not_an_image, IMG, "not a recognised image"),
    "unknown class": (_objects(obj_xml("horse")), ANN, "unknown class 'horse'"),
    "no bndbox": (_objects(obj_xml(bndbox=False)), ANN, "no <bndbox>"),
    "missing coordinate": (
        _objects(
            "<object><name>dog</name><bndbox><xmin>1</xmin><ymin>1</ymin>"
            "<xmax>9</xmax></bndbox></object>"
        ),
        ANN,
        "missing <ymax>",
    ),
    "non-numeric coordinate": (_objects(obj_xml(box=(1, 2, "ten", 9))), ANN, "non-numeric <xmax>"),
    "zero width": (_objects(obj_xml(box=(10, 5, 10, 40))), ANN, "zero width"),
    "zero height": (_objects(obj_xml(box=(10, 5, 30, 5))), ANN, "zero height"),
    "inverted": (_objects(obj_xml(box=(30, 5, 10, 40))), ANN, "xmax 10 < xmin 30 (inverted box)"),
    "outside image": (_objects(obj_xml(box=(10, 5, WIDTH + 2, 40))), ANN, "outside image width"),
    "negative": (_objects(obj_xml(box=(-2, 5, 20, 40))), ANN, "xmin -2 outside"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_each_error_gives_one_problem_naming_the_file(tmp_path, case):
    make, file, text = ERROR_CASES[case]
    make(tmp_path)

    record, problems = parse_record(tmp_path, "x", CLASSES, verify_image=True)

    assert record is None
    assert len(errors(problems)) == 1, problems
    error = errors(problems)[0]
    assert error.file == file
    assert error.image_id == "x"
    assert text in error.problem


def test_unknown_class_hints_at_case_mismatch(tmp_path):
    _objects(obj_xml("Dog"))(tmp_path)
    _, problems = parse_record(tmp_path, "x", CLASSES)
    assert problems[0].problem == "unknown class 'Dog' (did you mean 'dog'?) in object 1 'Dog'"


def test_error_names_object_number_and_class(tmp_path):
    _objects(obj_xml("cat"), obj_xml("dog", box=(30, 5, 10, 40)))(tmp_path)
    _, problems = parse_record(tmp_path, "x", CLASSES)
    assert problems[0].problem == "xmax 10 < xmin 30 (inverted box) in object 2 'dog'"


def test_truncated_jpeg_is_only_caught_when_verifying(tmp_path, monkeypatch):
    _truncated_jpeg(tmp_path)
    record, problems = parse_record(tmp_path, "x", CLASSES, verify_image=False)
    assert record is not None and not problems  # header-only open is the fast path
    # Other code may have switched Pillow's global leniency on; verification must not inherit it.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    record, problems = parse_record(tmp_path, "x", CLASSES, verify_image=True)
    assert record is None and "truncated" in errors(problems)[0].problem
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


def test_box_collapsing_when_clipped_is_an_error(tmp_path):
    _objects(obj_xml(box=(WIDTH, 5, WIDTH + 1, 40)))(tmp_path)
    record, problems = parse_record(tmp_path, "x", CLASSES)
    assert record is None
    assert "zero size after clipping" in errors(problems)[0].problem


def test_invalid_difficult_flag_is_an_error(tmp_path):
    _objects(obj_xml(difficult="yes"))(tmp_path)
    record, problems = parse_record(tmp_path, "x", CLASSES)
    assert record is None and "<difficult> 'yes'" in errors(problems)[0].problem


def test_all_errors_of_an_image_are_reported(tmp_path):
    write_xml(tmp_path, "x", [obj_xml("horse"), obj_xml(box=(5, 5, 5, 9))])
    _, problems = parse_record(tmp_path, "x", CLASSES)
    assert [p.file for p in errors(problems)] == [IMG, ANN, ANN]


# --------------------------------------------------------------------------- warnings


def _warning_case(tmp_path, objects, mode="RGB", box_size=(WIDTH, HEIGHT)):
    write_jpeg(tmp_path, "w", mode=mode)
    write_xml(tmp_path, "w", objects, size=box_size)
    record, problems = parse_record(tmp_path, "w", CLASSES)
    assert record is not None
    assert not errors(problems)
    assert len(problems) == 1, problems
    return record, problems[0]


def test_no_objects_is_a_negative_image(tmp_path):
    record, warning = _warning_case(tmp_path, [])
    assert record.boxes.shape == (0, 4) and record.boxes.dtype == np.float32
    assert record.labels.shape == (0,) and record.difficult.shape == (0,)
    assert "no objects" in warning.problem and warning.file == "Annotations/w.xml"


def test_self_closing_annotation_is_a_negative_image(tmp_path):
    write_jpeg(tmp_path, "w")
    write_raw_xml(tmp_path, "w", "<annotation/>")
    record, problems = parse_record(tmp_path, "w", CLASSES)
    assert record is not None and [p.severity for p in problems] == ["warning"]


@pytest.mark.parametrize(("mode", "word"), [("L", "grayscale"), ("CMYK", "CMYK")])
def test_non_rgb_image_warns(tmp_path, mode, word):
    record, warning = _warning_case(tmp_path, [obj_xml()], mode=mode)
    assert word in warning.problem and warning.file == "JPEGImages/w.jpg"
    assert (record.width, record.height) == (WIDTH, HEIGHT)


def test_exif_rotation_warns(tmp_path):
    path = write_jpeg(tmp_path, "w")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.open(path).save(path, exif=exif)
    write_xml(tmp_path, "w", [obj_xml()])
    record, problems = parse_record(tmp_path, "w", CLASSES)
    assert record is not None and [p.severity for p in problems] == ["warning"]
    assert "EXIF orientation 6" in problems[0].problem


def test_float_coordinates_warn_and_are_kept(tmp_path):
    record, warning = _warning_case(tmp_path, [obj_xml(box=(10.5, 5, 30.25, 40))])
    assert "non-integer" in warning.problem
    np.testing.assert_allclose(record.boxes, [[10.5, 5, 30.25, 40]])


def test_one_pixel_tolerance_clips_silently(tmp_path):
    write_jpeg(tmp_path, "t")
    write_xml(tmp_path, "t", [obj_xml(box=(-1, 0, WIDTH + 1, HEIGHT + 1))])
    record, problems = parse_record(tmp_path, "t", CLASSES)
    assert problems == []
    np.testing.assert_array_equal(record.boxes, [[0, 0, WIDTH, HEIGHT]])


# --------------------------------------------------------------------------- paths and splits


@pytest.mark.parametrize("bad_id", ["../x", "../../etc/passwd", "/etc/passwd", "a/../../b", ""])
def test_path_escape_is_an_entry_error(bad_id):
    entry = ImageEntry.devkit(bad_id)
    assert entry.error is not None and (not bad_id or "outside" in entry.error)


def test_path_escape_in_parse_record_is_a_problem(tmp_path):
    record, problems = parse_record(tmp_path, "../x", CLASSES)
    assert record is None and "outside" in errors(problems)[0].problem


def test_devkit_entry_paths():
    entry = ImageEntry.devkit("2008_000001")
    assert (entry.image, entry.annotation) == ("JPEGImages/2008_000001.jpg", "Annotations/2008_000001.xml")


def test_read_split_ids_plain_and_per_class_format(tmp_path):
    main = tmp_path / "ImageSets" / "Main"
    main.mkdir(parents=True)
    (main / "train.txt").write_text("b\n\na\r\n  \nb\n")
    (main / "dog_train.txt").write_text("2008_000008 -1\n2008_000015  1\n\n2008_000019  0\n")
    assert read_split_ids(tmp_path, "train") == ["b", "a"]
    assert read_split_ids(tmp_path, "dog_train") == ["2008_000008", "2008_000015", "2008_000019"]


def test_missing_split_names_file_and_existing_splits(tmp_path):
    main = tmp_path / "ImageSets" / "Main"
    main.mkdir(parents=True)
    (main / "train.txt").write_text("a\n")
    (main / "trainval.txt").write_text("a\n")
    with pytest.raises(DatasetError, match=r"ImageSets/Main/val\.txt.*train, trainval"):
        read_split_ids(tmp_path, "val")


def test_seeded_split_is_deterministic_and_disjoint():
    ids = [f"{i:04d}" for i in range(50)]
    train, val = seeded_split(ids, 0.2, seed=3)
    assert (train, val) == seeded_split(list(reversed(ids)), 0.2, seed=3)
    assert len(val) == 10 and set(train).isdisjoint(val) and set(train) | set(val) == set(ids)
    assert seeded_split(ids, 0.2, seed=4) != (train, val)
    assert len(seeded_split(ids[:3], 0.01, seed=0)[1]) == 1
    assert seeded_split(ids, 0.0, seed=0) == (ids, [])
    with pytest.raises(DatasetError):
        seeded_split(ids, 1.0, seed=0)


# --------------------------------------------------------------------------- whole dataset


def test_check_dataset_and_reports(tmp_path):
    write_jpeg(tmp_path, "good")
    write_xml(tmp_path, "good", [obj_xml()])
    write_jpeg(tmp_path, "bad1")
    write_xml(tmp_path, "bad1", [obj_xml("horse")])
    write_xml(tmp_path, "bad2", [obj_xml(box=(30, 5, 10, 40))])  # JPEG missing too
    write_jpeg(tmp_path, "neg")
    write_xml(tmp_path, "neg", [])

    records, problems = check_dataset(tmp_path, ["good", "bad1", "bad2", "neg"], CLASSES)

    assert [r.image_id for r in records] == ["good", "neg"]
    table = format_problems(problems)
    for image_id in ("bad1", "bad2", "neg"):
        assert image_id in table
    assert table.splitlines()[-1] == "3 errors in 2 images, 1 warning"
    # Columns line up: every row starts its "file" column at the same offset.
    rows = table.splitlines()[2:-1]
    assert (
        len(
            {
                row.index("Annotations/") if "Annotations/" in row else row.index("JPEG")
                for row in rows
            }
        )
        == 1
    )

    csv_path = tmp_path / "out" / "problems.csv"
    write_problems_csv(problems, csv_path)
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["image_id"] for r in rows] == [p.image_id for p in problems]
    assert set(rows[0]) == {"image_id", "file", "severity", "problem"}


def test_format_problems_empty():
    assert format_problems([]) == "0 errors in 0 images, 0 warnings"


def test_bad_class_list_raises(tmp_path):
    with pytest.raises(DatasetError, match="twice"):
        parse_record(tmp_path, "x", ["dog", "dog"])
