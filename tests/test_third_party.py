"""A VOC-format export the team did not lay out: custom class names, <filename> and
<path> fields that point nowhere, extra tags, its own split names. It must train with
``dataset=voc dataset.root=... dataset.classes=[...] dataset.train_split=... dataset.val_split=...``."""

from __future__ import annotations

import re
import shutil

from mlflow.tracking import MlflowClient

from conftest import compose_train
from detexp.commands.train import train
from detexp.data.shapes import generate_shapes

RENAME = {"circle": "Disc", "square": "box_4", "triangle": "tri angle", "cross": "plus"}


def _export(tmp_path):
    """Rewrite a generated dataset the way labelling tools export it."""
    src = generate_shapes(tmp_path / "src", num_train=24, num_val=8, image_size=128, seed=3)
    root = tmp_path / "export"
    shutil.copytree(src, root)
    for xml in (root / "Annotations").glob("*.xml"):
        text = xml.read_text()
        for old, new in RENAME.items():
            text = text.replace(f"<name>{old}</name>", f"<name>{new}</name>")
        text = re.sub(r"<filename>.*?</filename>", "<filename>IMG_0001.PNG</filename>", text)
        text = text.replace(
            "</filename>", "</filename><path>C:\\Users\\me\\Desktop\\export\\IMG_0001.PNG</path>"
            "<source><database>Unknown</database></source>", 1,
        )
        xml.write_text(text)
    main = root / "ImageSets" / "Main"
    (main / "train.txt").rename(main / "fold0_train.txt")
    (main / "val.txt").rename(main / "fold0_holdout.txt")
    return root


def test_third_party_export_trains(ray_cluster, tmp_path):
    root = _export(tmp_path)
    classes = "[" + ",".join(f"'{c}'" for c in RENAME.values()) + "]"
    cfg = compose_train(
        [
            "+experiment=smoke", "dataset=voc", f"dataset.root={root}", f"dataset.classes={classes}",
            "dataset.train_split=fold0_train", "dataset.val_split=fold0_holdout",
            "dataset.batch_size=4", "schedule.epochs=1", "eval_at_end=false",  # val/map_50: the epoch's validation
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        ]
    )
    result = train(cfg, tmp_path / "run")

    run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["data/train_images"] == 24
    assert run.data.metrics["data/val_images"] == 8
    assert run.data.metrics["data/skipped"] == 0
    assert "val/map_50" in run.data.metrics
    assert run.data.params["dataset.classes"] == str(list(RENAME.values()))
