"""``dataset.root`` on object storage: a real S3 endpoint on 127.0.0.1 (moto's server,
tests/s3_server.py) that the driver and Ray's tasks reach over HTTP through pyarrow, with
the credentials in the environment. The layout is found and ``data check`` reads it as a
local folder; the smoke training and eval from S3 are in test_layouts' end-to-end test."""

from __future__ import annotations

import pytest

import exports
from conftest import compose_train
from detexp.commands.data_check import data_check
from detexp.data.shapes import SHAPES_CLASSES
from detexp.data.source import resolve
from detexp.errors import DatasetError


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return exports.devkit(tmp_path_factory.mktemp("devkit"))


def _ids(found) -> tuple[list[str], list[str]]:
    return sorted(found.train_ids), sorted(found.val_ids)


@pytest.mark.parametrize("layout", ["devkit", "roboflow_voc", "flat", "roboflow_coco"])
def test_layouts_are_found_on_s3_as_on_disk(layout, s3, source, tmp_path):
    folder = {
        "devkit": lambda: source,
        "roboflow_voc": lambda: exports.roboflow_voc(source, tmp_path / "export"),
        "flat": lambda: exports.labelimg_flat(source, tmp_path / "export", odd=True),
        "roboflow_coco": lambda: exports.roboflow_coco(source, tmp_path / "export"),
    }[layout]()
    fmt = "coco" if "coco" in layout else "voc"
    uri = s3.upload(folder, f"layouts/{layout}")
    remote = resolve(compose_train([f"dataset={fmt}", f"dataset.root='{uri}'"]).dataset)
    local = resolve(compose_train([f"dataset={fmt}", f"dataset.root={folder}"]).dataset)
    assert remote.root.remote and remote.description == local.description
    assert _ids(remote) == _ids(local) and remote.images() == local.images()
    assert remote.classes == local.classes and remote.notes == local.notes
    assert remote.summary().splitlines()[0].startswith(f"dataset {uri}: ")


def test_data_check_reads_every_image_from_s3(s3, source, tmp_path, capsys):
    folder = exports.labelimg_flat(source, tmp_path / "export", odd=True)
    broken = sorted(p.name for p in folder.glob("*.jpg") if p.name != "unlabelled.jpg")[-1]
    (folder / broken).write_bytes(b"\xff\xd8 not really a jpeg")
    uri = s3.upload(folder, "check/flat")
    errors = data_check(compose_train(["dataset=voc", f"dataset.root='{uri}'"]))
    out = capsys.readouterr().out
    assert out.startswith(f"dataset {uri}: ./ (images with their XMLs)")
    assert f"classes read from the train split ({len(SHAPES_CLASSES)})" in out
    rows = [row for row in map(str.split, out.splitlines()) if row[2:3] == ["error"]]  # image_id file severity
    assert errors == 1 and [row[1] for row in rows] == [broken]  # the broken JPEG, by its file
    assert f"checked {len(list(folder.glob('*.xml')))} images in {uri}" in out


def test_a_bucket_prefix_that_holds_nothing_is_one_line(s3):
    with pytest.raises(DatasetError, match="does not exist or is not a folder"):
        resolve(compose_train(["dataset=voc", f"dataset.root='{s3.uri('nothing/here')}'"]).dataset)


def test_tune_keeps_a_uri_root_as_it_is_and_makes_a_folder_absolute(tmp_path, monkeypatch):
    """Trials run in other processes: a relative folder is made absolute, a URI is left alone."""
    from detexp.commands.tune import absolute_paths

    uri = "s3://bucket/exports/helmets?endpoint_override=127.0.0.1:9000&scheme=http"
    cfg = absolute_paths(compose_train(["dataset=coco", f"dataset.root='{uri}'"]))
    assert cfg.dataset.root == uri
    monkeypatch.chdir(tmp_path)
    assert absolute_paths(compose_train(["dataset=coco", "dataset.root=export"])).dataset.root == str(tmp_path / "export")
