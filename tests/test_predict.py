"""``detexp predict``: annotated images and predictions.jsonl for a folder of images, and
the one-line errors a user sees for a wrong checkpoint or input.

A random-init checkpoint (written here in detexp's format, no training) is enough: predict
has no ground truth to be right about, only files to write.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import compose_train
from detexp.checkpoint.files import CHECKPOINT_FORMAT
from detexp.commands.predict import predict
from detexp.config import TrainConfig, plain
from detexp.data.shapes import SHAPES_CLASSES, generate_shapes
from detexp.errors import ConfigError
from detexp.modeling.detector import build_detector


def random_checkpoint(path: Path, classes=SHAPES_CLASSES, **model) -> Path:
    """A detexp checkpoint of a random-init small detector, as ``train`` would write it."""
    cfg = OmegaConf.structured(TrainConfig)
    cfg.dataset.classes = list(classes)
    cfg.model.min_size = cfg.model.max_size = 128
    for key, value in model.items():
        cfg.model[key] = value
    torch.manual_seed(0)
    net = build_detector(cfg.model, len(classes) + 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "model": net.state_dict(),
            "config": plain(cfg),  # plain strings, as train stores it (torch.load weights_only)
            "epoch": 0,
            "classes": list(classes),
        },
        path,
    )
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return random_checkpoint(tmp_path_factory.mktemp("ckpt") / "model_final.pt")


def predict_cfg(tmp_path: Path, *overrides: str):
    return compose_train([f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", *overrides], config_name="predict")


def test_folder_of_five_images_gives_five_annotated_images(ray_cluster, checkpoint, tmp_path):
    shapes = generate_shapes(tmp_path / "shapes", num_train=4, num_val=1, image_size=96)
    photos = tmp_path / "photos"
    (photos / "more").mkdir(parents=True)
    for image in sorted((shapes / "JPEGImages").glob("*.jpg"))[:4]:
        shutil.copy(image, photos / image.name)
    Image.open(shapes / "JPEGImages" / "000005.jpg").save(photos / "more" / "five.png")
    (photos / "notes.txt").write_text("not an image")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")

    overrides = [f"checkpoint={checkpoint}", f"input={photos}", "score_threshold=0.1"]
    result = predict(predict_cfg(tmp_path, *overrides), tmp_path / "run", overrides)

    annotated = tmp_path / "run" / "annotated"
    written = sorted(str(p.relative_to(annotated)) for p in annotated.rglob("*") if p.is_file())
    assert written == ["000001.jpg", "000002.jpg", "000003.jpg", "000004.jpg", "more/five.png"]
    assert (result["images"], result["unreadable"]) == (5, 1)
    for name in written:
        source = np.asarray(Image.open(photos / name).convert("RGB"), dtype=np.int16)
        drawn = Image.open(annotated / name)
        assert drawn.format == ("PNG" if name.endswith(".png") else "JPEG")
        drawn = np.asarray(drawn.convert("RGB"), dtype=np.int16)
        assert drawn.shape == source.shape
        assert np.abs(drawn - source).max() > 100, f"{name}: no boxes drawn"

    lines = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == result["detections"] > 0
    assert {d["image_id"] for d in lines} <= {"000001", "000002", "000003", "000004", "more/five"}
    for d in lines:
        assert set(d) == {"image_id", "label", "box", "score"}
        assert d["label"] in SHAPES_CLASSES and d["score"] >= 0.1
        xmin, ymin, xmax, ymax = d["box"]
        assert 0 <= xmin <= xmax <= 96 * 1.2 and 0 <= ymin <= ymax <= 96 * 1.2


@pytest.mark.no_mlflow_store
def test_input_errors_are_one_line_before_ray(checkpoint, tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.md").write_text("no images here")
    cases = {
        f"input={tmp_path / 'empty'}": "a folder with no images",
        f"input={tmp_path / 'nowhere'}": "no such file or folder",
        f"input={tmp_path / 'empty' / 'readme.md'}": "not an image file",
    }
    for override, message in cases.items():
        overrides = [f"checkpoint={checkpoint}", override]
        with pytest.raises(ConfigError, match=message):
            predict(predict_cfg(tmp_path, *overrides), tmp_path / "run", overrides)
    with pytest.raises(ConfigError, match="input is not set"):
        predict(predict_cfg(tmp_path, f"checkpoint={checkpoint}"), tmp_path / "run", [])
    assert not (tmp_path / "mlflow.db").exists()  # nothing started


def test_command_line_error_is_one_line(checkpoint, tmp_path):
    (tmp_path / "empty").mkdir()
    out = subprocess.run(
        [sys.executable, "-m", "detexp", "predict", f"checkpoint={checkpoint}", "input=empty", "hydra.run.dir=run"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 2, text
    assert "Traceback" not in text
    assert [line for line in text.splitlines() if line.strip()] == [
        "error: input=empty: a folder with no images (.jpg, .jpeg, .png, .bmp, .tif, .tiff, .webp)"
    ]
