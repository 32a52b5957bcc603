"""``detexp eval`` end to end, and the report at the end of ``detexp train``, on ONE smoke
training run made once for the session (conftest.py's ``trained_smoke``, about a minute), plus the one-line errors.

The smoke run barely learns: its final model detects nothing above torchvision's 0.05
score floor, while the checkpoint of its first epoch still makes hundreds of low-scoring
detections on the 8 val images. Eval runs on that one, so that the comparison with
pycocotools has detections, true positives and non-zero APs to agree on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from conftest import compose_train
from detexp.checkpoint.effective_config import effective_config
from detexp.checkpoint.files import CheckpointInfo
from detexp.commands.evaluate import evaluate
from detexp.commands.train import train
from detexp.config import ModelConfig
from detexp.data.parsing import parse_record
from detexp.data.source import dataset_root
from detexp.data.voc import read_split_ids
from detexp.errors import ConfigError
from detexp.evaluation.metrics import DetectionEvaluator
from test_predict import random_checkpoint

METRIC_KEYS = {
    "map", "map_50", "map_75", "map_small", "map_medium", "map_large", "voc07_map", "voc12_map", "per_class",
}
CLASSES = ["circle", "square", "triangle", "cross"]
DIAGNOSTICS = (
    "confusion_matrix.csv", "confusion_matrix.png", "threshold_curves.csv", "threshold_curves.png", "worst_images.jpg",
)


@pytest.fixture
def trained(trained_smoke):
    """The session's one smoke training run (tests/conftest.py), shared with test_ui."""
    return trained_smoke


def _history(client, run_id, key):
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def _artifacts(client, run_id, path=None) -> set[str]:
    out = set()
    for item in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return out


def test_train_validates_every_epoch_and_reports_at_the_end(trained):
    client = MlflowClient(tracking_uri=trained.uri)
    run_id = trained.result["run_id"]
    for key in ("val/map", "val/map_50", "val/voc07_map", "val/voc12_map"):
        assert len(_history(client, run_id, key)) == trained.cfg.schedule.epochs, key
    # Each epoch says how much of its time the steps waited for their batches.
    epoch_s, waited = (_history(client, run_id, f"train/{k}") for k in ("epoch_s", "data_wait_s"))
    assert len(waited) == trained.cfg.schedule.epochs
    assert all(0 < w < e for w, e in zip(waited, epoch_s, strict=True))

    report = {f"eval/{name}" for name in (
        "metrics.json", "predictions.jsonl", "per_class_ap.csv", "per_class_ap.md", "predictions_grid.jpg",
        *DIAGNOSTICS,
    )} | {f"eval/pr_curves/pr_{c}.png" for c in CLASSES}
    assert report <= _artifacts(client, run_id)
    metrics = json.loads((trained.root / "train" / "eval" / "metrics.json").read_text())
    assert set(metrics) == METRIC_KEYS
    # The best epoch's own validation predictions, written up: no second pass over the images.
    assert metrics["per_class"]["circle"]["num_gt"] > 0
    assert metrics["map_50"] == pytest.approx(trained.result["best/value"], abs=1e-3)
    assert any("from the validation the model had in training" in line for line in trained.log)
    assert not any(line.startswith("predicted ") for line in trained.log)
    # ... and no second read of the split: the dataset is said once, before training
    assert sum(line.startswith("dataset ") for line in trained.log) == 1, trained.log


def _coco_reference(run_dir: Path, root: Path, ids: list[str]) -> tuple[dict[str, float], list[dict]]:
    """pycocotools' numbers for run_dir/predictions.jsonl, with ground truth built from the XMLs."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    number = {image_id: n for n, image_id in enumerate(ids, start=1)}
    images, annotations = [], []
    for image_id in ids:
        record, _ = parse_record(root, image_id, tuple(CLASSES))
        images.append({"id": number[image_id], "width": record.width, "height": record.height})
        for (x0, y0, x1, y1), label, difficult in zip(
            record.boxes.tolist(), record.labels.tolist(), record.difficult.tolist(), strict=True
        ):
            annotations.append({
                "id": len(annotations) + 1, "image_id": number[image_id], "category_id": label,
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": int(difficult),
            })
    gt = COCO()
    gt.dataset = {
        "images": images, "annotations": annotations,
        "categories": [{"id": k, "name": c} for k, c in enumerate(CLASSES, start=1)],
    }
    gt.createIndex()
    lines = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    detections = [
        {
            "image_id": number[d["image_id"]], "category_id": CLASSES.index(d["label"]) + 1,
            "bbox": [d["box"][0], d["box"][1], d["box"][2] - d["box"][0], d["box"][3] - d["box"][1]],
            "score": d["score"],
        }
        for d in lines
    ]
    coco_eval = COCOeval(gt, gt.loadRes(detections), "bbox")
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    keys = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large")
    return dict(zip(keys, coco_eval.stats[:6].tolist(), strict=True)), lines


def test_eval_metrics_agree_with_pycocotools_on_its_own_predictions(trained, tmp_path):
    overrides = [f"checkpoint={trained.first_epoch}", f"tracking.uri={trained.uri}"]
    cfg = compose_train(overrides, config_name="eval")
    result = evaluate(cfg, tmp_path / "eval", overrides)

    run_dir = tmp_path / "eval"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics) == METRIC_KEYS
    assert metrics["map"] == pytest.approx(result["map"])
    root = dataset_root(OmegaConf.load(run_dir / "config.yaml").dataset)  # the checkpoint's data
    ids = read_split_ids(root, "val")
    reference, lines = _coco_reference(run_dir, root, ids)
    assert len(lines) > 100 and reference["map_50"] > 0  # something to agree on
    for key, value in reference.items():
        assert abs(metrics[key] - value) <= 1e-6, (key, metrics[key], value)

    # predictions.jsonl holds exactly what was measured: fed back with the XMLs' ground truth,
    # it reproduces every number, VOC and per class included.
    assert {d["image_id"] for d in lines} <= set(ids)
    by_image = {image_id: [] for image_id in ids}
    for d in lines:
        by_image[d["image_id"]].append(d)
    evaluator = DetectionEvaluator(CLASSES)
    for image_id, dets in by_image.items():
        record, _ = parse_record(root, image_id, tuple(CLASSES))
        evaluator.update(
            [{
                "boxes": torch.tensor([d["box"] for d in dets], dtype=torch.float64).reshape(-1, 4),
                "scores": torch.tensor([d["score"] for d in dets], dtype=torch.float64),
                "labels": torch.tensor([CLASSES.index(d["label"]) + 1 for d in dets]),
            }],
            [{"boxes": record.boxes, "labels": record.labels, "difficult": record.difficult, "image_id": image_id}],
        )
    again = evaluator.compute()
    for key in ("voc07_map", "voc12_map", "map", "map_50"):
        assert again[key] == pytest.approx(metrics[key], abs=1e-9), key
    assert again["per_class"]["triangle"]["num_det"] == metrics["per_class"]["triangle"]["num_det"]

    # the eval run in MLflow, tagged with the training run the checkpoint came from
    client = MlflowClient(tracking_uri=trained.uri)
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["detexp.train_run_id"] == trained.result["run_id"]
    assert run.data.tags["detexp.command"] == "eval"
    assert run.data.metrics["eval/map_50"] == pytest.approx(metrics["map_50"])
    assert {
        "metrics.json", "predictions.jsonl", "per_class_ap.csv", "per_class_ap.md", "predictions_grid.jpg",
        *DIAGNOSTICS, *(f"pr_curves/pr_{c}.png" for c in CLASSES),
    } <= _artifacts(client, run.info.run_id)
    table = (run_dir / "per_class_ap.csv").read_text().splitlines()
    assert table[0].startswith("class,num_gt,num_det,ap,ap_50") and len(table) == 1 + len(CLASSES) + 1


def _eval_cfg(tmp_path, *overrides):
    return compose_train([f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", *overrides], config_name="eval")


def test_model_and_dataset_come_from_the_checkpoint_unless_given():
    stored = OmegaConf.to_container(compose_train(["+experiment=smoke", "dataset.cache_dir=/data/cache"]))
    stored["dataset"]["classes"] = ["a", "b"]
    ckpt = CheckpointInfo(Path("model_final.pt"), stored, ["a", "b"], None)

    plain = effective_config(compose_train([], config_name="eval"), ckpt, [])
    assert (plain.model.min_size, plain.dataset.synth.num_val, plain.dataset.cache_dir) == (128, 16, "/data/cache")
    assert list(plain.dataset.classes) == ["a", "b"] and plain.model.checkpoint is None

    overrides = ["dataset.val_split=train", "model.min_size=160"]
    some = effective_config(compose_train(overrides, config_name="eval"), ckpt, overrides)
    assert (some.dataset.val_split, some.model.min_size, some.model.max_size) == ("train", 160, 128)
    assert some.dataset.synth.num_val == 16

    overrides = ["dataset=voc", "dataset.root=/data/VOC2007", "dataset.classes=[a,b,c]"]
    other = effective_config(compose_train(overrides, config_name="eval"), ckpt, overrides)
    assert (other.dataset.name, other.dataset.root, list(other.dataset.classes)) == ("voc", "/data/VOC2007", ["a", "b", "c"])


def test_a_checkpoint_of_another_detexp_version_still_loads(caplog):
    stored = OmegaConf.to_container(compose_train(["+experiment=smoke"]))
    del stored["model"]["box_batch_size_per_image"]  # a key this checkpoint's detexp did not have yet
    stored["model"]["retired_option"] = 3  # and one this detexp no longer has
    ckpt = CheckpointInfo(Path("model_final.pt"), stored, CLASSES, None)
    eff = effective_config(compose_train([], config_name="eval"), ckpt, [])
    assert eff.model.box_batch_size_per_image == ModelConfig.box_batch_size_per_image
    assert "retired_option" not in eff.model and "retired_option" in caplog.text
    assert eff.model.min_size == 128


def test_a_fine_tuned_model_is_rebuilt_exactly_without_its_pretrained_weights():
    """Trained from pretrained weights, torchvision's backbone has FrozenBatchNorm2d (not
    BatchNorm2d); eval must rebuild that (without downloading the weights) and load the
    checkpoint strictly, with the same outputs."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    from detexp.modeling.detector import build_detector, build_inference_model

    cfg = OmegaConf.structured(ModelConfig)
    cfg.min_size = cfg.max_size = 128
    torch.manual_seed(0)
    trained = build_detector(cfg, 5)  # then made what a weights_backbone=... build looks like
    for parent in list(trained.modules()):
        for name, child in parent.named_children():
            if isinstance(child, torch.nn.BatchNorm2d):
                frozen = FrozenBatchNorm2d(child.num_features)
                frozen.running_mean.uniform_(-0.5, 0.5)
                frozen.running_var.uniform_(0.5, 2.0)
                setattr(parent, name, frozen)
    cfg.weights_backbone = "IMAGENET1K_V1"
    rebuilt = build_inference_model(cfg, 5)
    rebuilt.load_state_dict(trained.state_dict(), strict=True)
    image = [torch.rand(3, 100, 120)]
    with torch.no_grad():
        expected, got = trained.eval()(image)[0], rebuilt.eval()(image)[0]
    assert len(expected["boxes"]) > 0
    assert torch.equal(expected["boxes"], got["boxes"]) and torch.equal(expected["scores"], got["scores"])


@pytest.mark.no_mlflow_store
def test_checkpoint_errors_are_one_line_before_ray(tmp_path):
    good = random_checkpoint(tmp_path / "run" / "model_final.pt")
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    cases = [
        ([f"checkpoint={tmp_path / 'missing.pt'}"], "checkpoint not found"),
        ([], "checkpoint is not set"),
        ([f"checkpoint={tmp_path / 'empty'}"], "a folder without model_best.pt or model_final.pt"),
        ([f"checkpoint={tmp_path / 'notes.txt'}"], "not a PyTorch checkpoint"),
        ([f"checkpoint={tmp_path / 'other.pt'}"], "not a detexp checkpoint"),
        ([f"checkpoint={good}", "dataset.classes=[cat,dog]"], "predicts 4 classes \\+ background, the dataset has 2"),
        ([f"checkpoint={good}", "model=fasterrcnn_resnet50_fpn"], "does not fit this model config"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            evaluate(_eval_cfg(tmp_path, *overrides), tmp_path / "eval", overrides)
    assert not (tmp_path / "mlflow.db").exists()  # failed before MLflow (and Ray) started


def test_ray_noise_is_kept_off_the_console(tmp_path, capfd):
    from detexp.distributed.batch_inference import ray_noise_to

    with ray_noise_to(tmp_path / "ray.log"):
        os.write(2, b"[E core_worker.cc:2465] Actor with class name: 'MapWorker' has constructor "
                    b"arguments in the object store and max_restarts > 0.\n")
        print("a warning that matters", file=sys.stderr, flush=True)
    err = capfd.readouterr().err
    assert err == "a warning that matters\n"
    assert "constructor arguments" in (tmp_path / "ray.log").read_text()


def test_command_line_error_is_one_line(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "detexp", "eval", "checkpoint=nope.pt", "hydra.run.dir=run"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 2, text
    assert [line for line in text.splitlines() if line.strip()] == ["error: checkpoint=nope.pt: checkpoint not found"]


@pytest.mark.slow
def test_a_trained_model_agrees_with_pycocotools(ray_cluster, shapes_cache, tmp_path):
    """The default recipe (`python -m detexp train`, about 5 minutes on 2 cores) learns the
    shapes to the README's promise; eval of its model agrees with pycocotools where the APs
    are far from 0."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    trained = train(compose_train([f"dataset.cache_dir={shapes_cache}", f"tracking.uri={uri}"]), tmp_path / "train")
    assert trained["val/map_50"] >= 0.6, trained  # the goal; measured 0.906-0.941 in four default runs
    overrides = [f"checkpoint={tmp_path / 'train'}", f"tracking.uri={uri}"]
    evaluate(compose_train(overrides, config_name="eval"), tmp_path / "eval", overrides)

    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    root = dataset_root(OmegaConf.load(tmp_path / "eval" / "config.yaml").dataset)
    reference, _ = _coco_reference(tmp_path / "eval", root, read_split_ids(root, "val"))
    assert reference["map_50"] > 0.3, reference
    for key, value in reference.items():
        assert abs(metrics[key] - value) <= 1e-6, (key, metrics[key], value)
    # What training's last validation saw, up to batching: torchvision pads the images of a
    # batch to one size, and eval batches them differently (measured: 0.091 vs 0.083 at epoch 2).
    assert metrics["map_50"] == pytest.approx(trained["val/map_50"], abs=0.03)
