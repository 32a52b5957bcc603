"""A corpus of broken VOC entries the way third-party exports and copies break them
(labelling-tool quirks, interrupted uploads, hand edits, wrong formats saved under the
right name), mixed with awkward-but-legal ones. ``data check`` must name every broken id
and only those; ``train`` must skip exactly those and use every other image.

:func:`build_corpus` is shared with the training and stress tests."""

from __future__ import annotations

import csv
import json
import logging
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from conftest import compose_train
from detexp.commands.train import train
from detexp.data.parsing import parse_record
from detexp.data.shapes import SHAPES_CLASSES, generate_shapes
from detexp.data.voc import VOCRecord
from detexp.errors import DetexpError

CLASSES = list(SHAPES_CLASSES)
CLASSES_ARG = "dataset.classes=[" + ",".join(CLASSES) + "]"


# --------------------------------------------------------------------------- XML writing


def voc_xml(image_id: str, size: tuple[int, int], objects: list[dict], head: str = "", prolog: str = "") -> str:
    """LabelImg-style XML. An object is ``{"name", "box": [4 strings or numbers], "extra"}``."""
    body = ""
    for obj in objects:
        coords = "".join(f"<{k}>{v}</{k}>" for k, v in zip(("xmin", "ymin", "xmax", "ymax"), obj["box"], strict=True))
        bndbox = obj.get("bndbox", f"<bndbox>{coords}</bndbox>")
        body += (
            f"\n  <object>\n    <name>{obj['name']}</name>\n    <pose>Unspecified</pose>\n"
            f"    <truncated>0</truncated>\n    {obj.get('difficult', '<difficult>0</difficult>')}\n"
            f"    {obj.get('extra', '')}{bndbox}\n  </object>"
        )
    return (
        f"{prolog}<annotation>\n  <folder>images</folder>\n  <filename>{image_id}.jpg</filename>\n{head}"
        f"  <size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>\n"
        f"  <segmented>0</segmented>{body}\n</annotation>\n"
    )


def _objects(rec: VOCRecord) -> list[dict]:
    return [
        {"name": CLASSES[label - 1], "box": [int(v) for v in box]}
        for box, label in zip(rec.boxes.tolist(), rec.labels.tolist(), strict=True)
    ]


def _rewrite(root: Path, image_id: str, rec: VOCRecord, edit: Callable[[list[dict]], None], **kw) -> str:
    objects = _objects(rec)
    edit(objects)
    (root / "Annotations" / f"{image_id}.xml").write_text(voc_xml(image_id, (rec.width, rec.height), objects, **kw))
    return image_id


def _set(index: int, **values):
    def edit(objects: list[dict]) -> None:
        for key, value in values.items():
            if key in ("xmin", "ymin", "xmax", "ymax"):
                objects[index]["box"][("xmin", "ymin", "xmax", "ymax").index(key)] = value
            else:
                objects[index][key] = value

    return edit


def _jpg(root: Path, image_id: str) -> Path:
    return root / "JPEGImages" / f"{image_id}.jpg"


def _xml(root: Path, image_id: str) -> Path:
    return root / "Annotations" / f"{image_id}.xml"


# --------------------------------------------------------------------------- breakages
# Each takes (root, id, parsed good record), breaks that entry in place and returns the id
# as the split file must now list it.


def _path_traversal(root: Path, image_id: str, rec: VOCRecord) -> str:
    """A split line that climbs out of the dataset; the target exists, so opening it would work."""
    outside = root.parent / "outside"
    (outside / "Annotations").mkdir(parents=True, exist_ok=True)
    (outside / "JPEGImages").mkdir(parents=True, exist_ok=True)
    shutil.move(_xml(root, image_id), outside / "Annotations" / f"{image_id}.xml")
    shutil.move(_jpg(root, image_id), outside / "JPEGImages" / f"{image_id}.jpg")
    return f"../../outside/{image_id}"


def _xxe(root: Path, image_id: str, rec: VOCRecord) -> str:
    prolog = '<?xml version="1.0"?>\n<!DOCTYPE annotation [<!ENTITY secret SYSTEM "file:///etc/hostname">]>\n'
    return _rewrite(root, image_id, rec, _set(0, name="&secret;"), prolog=prolog)


def _cvat_root(root: Path, image_id: str, rec: VOCRecord) -> str:
    boxes = "".join(
        f'<box label="{o["name"]}" xtl="{o["box"][0]}" ytl="{o["box"][1]}" xbr="{o["box"][2]}" ybr="{o["box"][3]}"/>'
        for o in _objects(rec)
    )
    _xml(root, image_id).write_text(
        f'<annotations><version>1.1</version><image id="0" name="{image_id}.jpg" width="{rec.width}" '
        f'height="{rec.height}">{boxes}</image></annotations>'
    )
    return image_id


def _coco_json(root: Path, image_id: str, rec: VOCRecord) -> str:
    ann = [{"bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])], "category_id": int(label)}
           for b, label in zip(rec.boxes, rec.labels, strict=True)]
    _xml(root, image_id).write_text(json.dumps({"images": [{"file_name": f"{image_id}.jpg"}], "annotations": ann}))
    return image_id


def _in_place(damage: Callable[[Path, str], object]) -> Callable[[Path, str, VOCRecord], str]:
    def breakage(root: Path, image_id: str, rec: VOCRecord) -> str:
        damage(root, image_id)
        return image_id

    return breakage


def _truncate(path: Path, fraction: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


BREAKAGES: dict[str, Callable[[Path, str, VOCRecord], str]] = {
    # labelling tools
    "class name capitalised (LabelImg predefined_classes.txt)": lambda r, i, rec: _rewrite(r, i, rec, _set(0, name=CLASSES[0].capitalize())),
    "unlabelled box (CVAT: empty <name>)": lambda r, i, rec: _rewrite(r, i, rec, _set(0, name="")),
    "class from another project": lambda r, i, rec: _rewrite(r, i, rec, _set(0, name="dog")),
    "box dragged right-to-left, xmin > xmax": lambda r, i, rec: _rewrite(
        r, i, rec, _set(0, xmin=_objects(rec)[0]["box"][2], xmax=_objects(rec)[0]["box"][0])),
    "point click saved as a box (zero width)": lambda r, i, rec: _rewrite(r, i, rec, _set(0, xmax=_objects(rec)[0]["box"][0])),
    "boxes in the original 8x larger frame (images resized after labelling)": lambda r, i, rec: _rewrite(
        r, i, rec, lambda objs: [o.update(box=[v * 8 for v in o["box"]]) for o in objs]),
    "negative coordinate from a tool without clamping": lambda r, i, rec: _rewrite(r, i, rec, _set(0, xmin=-15)),
    "decimal comma (European locale export)": lambda r, i, rec: _rewrite(r, i, rec, _set(0, xmin="12,5")),
    "empty coordinate element": lambda r, i, rec: _rewrite(r, i, rec, _set(0, ymax="")),
    "NaN coordinate": lambda r, i, rec: _rewrite(r, i, rec, _set(0, ymin="NaN")),
    "difficult written as Unspecified": lambda r, i, rec: _rewrite(r, i, rec, _set(0, difficult="<difficult>Unspecified</difficult>")),
    "two <bndbox> in one object (merge tool)": lambda r, i, rec: _rewrite(
        r, i, rec, _set(0, extra="<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox>")),
    "CVAT-for-images dump saved per image": _cvat_root,
    "COCO JSON saved as .xml": _coco_json,
    # copies and transfers
    "image deleted, still listed": _in_place(lambda r, i: _jpg(r, i).unlink()),
    "annotation never exported": _in_place(lambda r, i: _xml(r, i).unlink()),
    "JPEG cut off by an interrupted upload": _in_place(lambda r, i: _truncate(_jpg(r, i), 0.5)),
    "zero-byte JPEG (failed download)": _in_place(lambda r, i: _jpg(r, i).write_bytes(b"")),
    "HTML error page saved as .jpg": _in_place(
        lambda r, i: _jpg(r, i).write_text("<!DOCTYPE html><html><body><h1>403 Forbidden</h1></body></html>")),
    "zero-byte XML (export crashed)": _in_place(lambda r, i: _xml(r, i).write_bytes(b"")),
    "XML cut off mid-element": _in_place(lambda r, i: _truncate(_xml(r, i), 0.6)),
    # hostile
    "external entity declaration (XXE)": _xxe,
    "split line climbing out of the dataset": _path_traversal,
}


def _gray(root, image_id, rec):
    Image.open(_jpg(root, image_id)).convert("L").save(_jpg(root, image_id), quality=92)


def _cmyk(root, image_id, rec):
    Image.open(_jpg(root, image_id)).convert("CMYK").save(_jpg(root, image_id), quality=92)


def _png_named_jpg(root, image_id, rec):
    Image.open(_jpg(root, image_id)).convert("RGB").save(_jpg(root, image_id), format="PNG")


def _exif_rotated(root, image_id, rec):
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(_jpg(root, image_id)).save(_jpg(root, image_id), exif=exif, quality=92)


def _float_coords(root, image_id, rec):
    _rewrite(root, image_id, rec, lambda objs: [o.update(box=[v + 0.25 if v > 1 else v for v in o["box"]]) for o in objs])


def _touching_border(root, image_id, rec):
    def edit(objs):
        objs[0]["box"] = [0, 0, rec.width, rec.height]  # the whole image, 0-based origin
        objs.append({"name": CLASSES[1], "box": [rec.width - 10, rec.height - 10, rec.width + 1, rec.height + 1]})

    _rewrite(root, image_id, rec, edit)


def _windows_export(root, image_id, rec):
    head = (
        "  <path>C:\\Users\\ann\\Desktop\\export\\..\\..\\secret.jpg</path>\n"
        "  <source><database>Unknown</database></source>\n"
    )
    text = voc_xml(image_id, (rec.width, rec.height), _objects(rec), head=head,
                   prolog='<?xml version="1.0" encoding="utf-8"?>\r\n')
    text = text.replace(f"<filename>{image_id}.jpg</filename>", "<filename>../../outside/secret.jpg</filename>")
    _xml(root, image_id).write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())


def _cvat_extras(root, image_id, rec):
    def edit(objs):
        for o in objs:
            o["name"] = f"  {o['name']} "
            o["difficult"] = "<difficult>false</difficult>"
            o["extra"] = "<occluded>1</occluded><attributes><attribute><name>color</name></attribute></attributes>"

    _rewrite(root, image_id, rec, edit)


def _negative(root, image_id, rec):
    _rewrite(root, image_id, rec, lambda objs: objs.clear())


LEGAL: dict[str, Callable[[Path, str, VOCRecord], None]] = {
    "no objects (negative image)": _negative,
    "grayscale JPEG": _gray,
    "CMYK JPEG": _cmyk,
    "PNG bytes under a .jpg name": _png_named_jpg,
    "EXIF-rotated phone photo": _exif_rotated,
    "float coordinates": _float_coords,
    "boxes touching the border (and 1 px past it)": _touching_border,
    "Windows export: BOM, CRLF, <path>/<filename> pointing elsewhere": _windows_export,
    "CVAT extras: padded names, difficult=false, attributes": _cvat_extras,
}


@dataclass
class Corpus:
    root: Path
    train_ids: list[str]
    val_ids: list[str]
    bad: dict[str, str] = field(default_factory=dict)  # listed id -> breakage
    legal: dict[str, str] = field(default_factory=dict)  # id -> edge case

    @property
    def total(self) -> int:
        return len(self.train_ids) + len(self.val_ids)


def build_corpus(base: Path, num_train: int, num_val: int, bad_train: int, bad_val: int, legal: int,
                 image_size: int = 96, seed: int = 11) -> Corpus:
    """A generated VOC folder under ``base/voc``: ``bad_train`` + ``bad_val`` entries broken
    (the breakages taken in turn, spread over each split) and ``legal`` training entries
    made awkward but valid. Only images with objects are altered, so every breakage has a
    box to break. The split files are rewritten the Windows way (CRLF, blank last line)."""
    root = generate_shapes(base / "voc", num_train=num_train, num_val=num_val, image_size=image_size, seed=seed)
    ids = [f"{i:06d}" for i in range(1, num_train + num_val + 1)]
    records = {i: parse_record(root, i, CLASSES)[0] for i in ids}
    with_objects = [n for n, i in enumerate(ids) if len(records[i].boxes)]
    train_pool = [n for n in with_objects if n < num_train]
    val_pool = [n for n in with_objects if n >= num_train]
    bad = _spread(train_pool, bad_train) + _spread(val_pool, bad_val)
    good = [n for n in train_pool if n not in set(bad)][:legal]
    assert len(good) == legal, "not enough images with objects for the legal cases"

    listed = list(ids)
    corpus = Corpus(root, [], [])
    breakages, cases = list(BREAKAGES.items()), list(LEGAL.items())
    for k, n in enumerate(bad):
        name, breakage = breakages[k % len(breakages)]
        listed[n] = breakage(root, ids[n], records[ids[n]])
        corpus.bad[listed[n]] = name
    for k, n in enumerate(good):
        name, make = cases[k % len(cases)]
        make(root, ids[n], records[ids[n]])
        corpus.legal[ids[n]] = name
    corpus.train_ids, corpus.val_ids = listed[:num_train], listed[num_train:]
    main = root / "ImageSets" / "Main"
    for split, split_ids in (("train", corpus.train_ids), ("val", corpus.val_ids)):
        (main / f"{split}.txt").write_bytes(("\r\n".join(split_ids) + "\r\n\r\n").encode())
    (main / "trainval.txt").unlink()
    return corpus


def _spread(pool: list[int], n: int) -> list[int]:
    assert len(pool) >= n, f"need {n} images with objects, have {len(pool)}"
    return [pool[int(k * len(pool) / n)] for k in range(n)]


def small_corpus(base: Path) -> Corpus:
    """52 entries: every breakage once (21 in train, 2 in val), every legal edge case once
    (in train), the rest plain."""
    return build_corpus(base, num_train=40, num_val=12, bad_train=len(BREAKAGES) - 2, bad_val=2, legal=len(LEGAL))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    return small_corpus(tmp_path_factory.mktemp("corpus"))


# --------------------------------------------------------------------------- data check


def run_cli(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "detexp", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def error_rows(output: str) -> dict[str, set[str]]:
    """image id -> files named in the table's error rows."""
    rows: dict[str, set[str]] = {}
    for line in output.splitlines():
        m = re.match(r"^(\S+)\s+(\S+)\s+error\s+\S", line)
        if m:
            rows.setdefault(m.group(1), set()).add(m.group(2))
    return rows


def test_corpus_has_every_breakage_and_edge_case(corpus):
    assert set(corpus.bad.values()) == set(BREAKAGES)
    assert set(corpus.legal.values()) == set(LEGAL)
    assert sum(i in corpus.bad for i in corpus.val_ids) == 2


def test_data_check_names_every_bad_id_and_only_those(corpus, tmp_path):
    out = run_cli("data", "check", "dataset=voc", f"dataset.root={corpus.root}", CLASSES_ARG,
                  "hydra.run.dir=check", cwd=tmp_path)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text
    assert "Traceback" not in text
    rows = error_rows(out.stdout)
    missing = {i: why for i, why in corpus.bad.items() if i not in rows}
    assert not missing, f"not named: {missing}\n{text}"
    assert set(rows) == set(corpus.bad), text
    assert f"{sum(len(f) for f in rows.values())} errors in {len(corpus.bad)} images" in out.stdout
    assert re.search(rf"^checked {corpus.total} images in {re.escape(str(corpus.root))}: ", out.stdout, re.M)
    # Legal edge cases may warn (grayscale, rotation, floats, negatives) but never fail.
    for image_id in corpus.legal:
        assert image_id not in rows
    assert "JPEGImages/" in out.stdout and "Annotations/" in out.stdout  # the file column


def test_data_check_of_a_clean_dataset_exits_zero(tmp_path):
    root = generate_shapes(tmp_path / "clean", num_train=6, num_val=2, image_size=64, seed=1)
    out = run_cli("data", "check", "dataset=voc", f"dataset.root={root}", CLASSES_ARG, "hydra.run.dir=check",
                  cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(rf"^checked 8 images in {re.escape(str(root))}: 0 error\(s\), ", out.stdout, re.M), out.stdout


def test_data_check_of_a_missing_root_is_one_line(tmp_path):
    out = run_cli("data", "check", "dataset=voc", f"dataset.root={tmp_path}/nope", CLASSES_ARG,
                  "hydra.run.dir=check", cwd=tmp_path)
    assert out.returncode == 2
    assert "Traceback" not in out.stdout + out.stderr
    assert "does not exist or is not a folder" in out.stdout + out.stderr


def test_dataset_files_are_opened_only_inside_the_root(corpus, tmp_path):
    """Every file the checker and the Ray Data read/decode functions open lies under
    dataset.root, whatever the split lines and the XML <filename>/<path> say."""
    from detexp.data.annotations import _read_annotations
    from detexp.data.parsing import check_dataset
    from detexp.data.pipeline import decode_batch

    opened: list[str] = []
    watching = [True]

    def hook(event, args):
        if watching[0] and event == "open" and isinstance(args[0], str | bytes | Path):
            opened.append(str(args[0] if not isinstance(args[0], bytes) else args[0].decode()))

    sys.addaudithook(hook)  # cannot be removed; `watching` switches it off
    try:
        ids = corpus.train_ids + corpus.val_ids
        check_dataset(corpus.root, ids, CLASSES)
        table = _read_annotations(str(corpus.root), ids, tuple(CLASSES))
        decode_batch(table.filter(table.column("ok")), str(corpus.root))
    finally:
        watching[0] = False
    base = corpus.root.parent
    ours = [p for p in opened if p.startswith(str(base))]
    assert ours, "the hook saw no dataset file"
    outside = [p for p in ours if not Path(p).resolve().is_relative_to(corpus.root.resolve())]
    assert outside == []
    assert (base / "outside" / "Annotations").is_dir()  # the bait was there


def test_skipped_csv_round_trips(corpus, tmp_path):
    """What train writes is readable back: one row per error, the bad ids only."""
    from detexp.data.parsing import check_dataset
    from detexp.data.problems import write_problems_csv

    _, problems = check_dataset(corpus.root, corpus.train_ids + corpus.val_ids, CLASSES)
    errors = [p for p in problems if p.severity == "error"]
    write_problems_csv(errors, tmp_path / "skipped.csv")
    with (tmp_path / "skipped.csv").open() as f:
        assert {row["image_id"] for row in csv.DictReader(f)} == set(corpus.bad)


def test_truncated_jpeg_read_by_the_training_reader_is_an_error(corpus):
    """The Ray Data annotation pass decodes pixels, so a cut-off JPEG is skipped up front
    rather than crashing a worker mid-epoch."""
    from detexp.data.annotations import _read_annotations

    cut = next(i for i, why in corpus.bad.items() if why.startswith("JPEG cut off"))
    table = _read_annotations(str(corpus.root), [cut], tuple(CLASSES))
    assert table.column("ok").to_pylist() == [False]
    assert "truncated" in table.column("problems")[0].as_py()


# --------------------------------------------------------------------------- training on it


def test_train_skips_exactly_the_bad_ids_and_uses_the_rest(corpus, ray_cluster, tmp_path, caplog):
    """``train`` on the corpus: the bad ids listed and counted, every other image trained
    on and evaluated. (In-process on the test session's Ray: the command line adds only its
    error handling, which the ``data check`` runs above go through.)"""
    cfg = compose_train([
        "+experiment=smoke", "dataset=voc", f"dataset.root={corpus.root}", CLASSES_ARG,
        "schedule.epochs=1", "eval_at_end=false",  # val/images below shows the evaluation
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
    ])
    with caplog.at_level(logging.WARNING, logger="detexp"):
        result = train(cfg, tmp_path / "run")
    text = caplog.text
    assert f"skipping {len(corpus.bad)} image(s) with broken annotations or images" in text
    for image_id in corpus.bad:
        assert image_id in text  # the table on the console names each

    with (tmp_path / "run" / "data" / "skipped.csv").open() as f:
        assert {row["image_id"] for row in csv.DictReader(f)} == set(corpus.bad)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(result["run_id"])
    metrics = run.data.metrics
    bad_train = sum(i in corpus.bad for i in corpus.train_ids)
    bad_val = sum(i in corpus.bad for i in corpus.val_ids)
    assert run.info.status == "FINISHED"
    assert metrics["data/skipped"] == len(corpus.bad)
    assert metrics["data/train_images"] == len(corpus.train_ids) - bad_train
    assert metrics["data/val_images"] == len(corpus.val_ids) - bad_val
    assert metrics["data/warnings"] >= 5  # grayscale, CMYK, EXIF, floats, negative
    # used = total - bad: every good image went through training and validation
    assert metrics["train/images"] == metrics["data/train_images"]
    assert metrics["val/images"] == metrics["data/val_images"]
    assert "data/skipped.csv" in {a.path for a in client.list_artifacts(run.info.run_id, "data")}


def test_on_error_raise_stops_before_training_with_the_table(corpus, ray_cluster, tmp_path):
    cfg = compose_train([
        "+experiment=smoke", "dataset=voc", f"dataset.root={corpus.root}", CLASSES_ARG,
        "dataset.on_error=raise", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
    ])
    with pytest.raises(DetexpError) as info:
        train(cfg, tmp_path / "run")
    message = str(info.value)
    assert message.startswith("the dataset has errors (dataset.on_error=raise):")
    assert set(error_rows(message)) == set(corpus.bad)
    assert message.splitlines()[-1] == f"{len(corpus.bad)} errors in {len(corpus.bad)} images, 0 warnings"
    assert not (tmp_path / "run" / "mlflow_run_id").exists()  # no MLflow run, no training
    assert not (tmp_path / "run" / "checkpoints").exists()
