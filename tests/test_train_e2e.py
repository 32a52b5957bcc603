"""End to end through real Ray Train workers, real JPEG/XML files and a real MLflow
SQLite store: what a user sees after ``python -m detexp train +experiment=smoke``."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import ray
import torch
from mlflow.tracking import MlflowClient

from detexp.checkpoint.files import find_checkpoint
from detexp.commands.train import train


def _history(client, run_id, key):
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


# Two DDP workers (gloo), sharing 2 cores (the smoke experiment's 0.5 CPU each): the
# default suite's multi-worker run; the shared smoke checkpoint (conftest) is one worker's.
@pytest.mark.parametrize("workers", [2])
def test_smoke_run_logs_everything_and_stops_early(ray_cluster, smoke_cfg, tmp_path, workers):
    # lr 0.02 is declared for 8 images a step; smoke trains on 4 per worker: lr 0.01 each.
    # Patience: the number of val images never improves, so epoch 1 stays the best and
    # patience 1 ends the 4-epoch run after epoch 2 (a smoke model's map_50 is too close
    # to 0 to rank epochs reliably); the best checkpoint is then not the last one.
    early = ("schedule.epochs=4", "schedule.patience=1", "schedule.monitor=val/images")
    cfg = smoke_cfg(f"scaling.num_workers={workers}", "optimizer.reference_batch=8", *early)
    run_dir = tmp_path / "run"
    result = train(cfg, run_dir, overrides=[f"scaling.num_workers={workers}"])
    lr = cfg.optimizer.lr * workers * cfg.dataset.batch_size / 8

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    # every resolved config value as a param under its dotted key
    assert run.data.params["optimizer.lr"] == str(cfg.optimizer.lr)
    assert float(run.data.params["optimizer.scaled_lr"]) == pytest.approx(lr)
    assert run.data.params["scaling.num_workers"] == str(workers)
    assert run.data.metrics["train/workers"] == workers  # every epoch trained by both ranks
    assert run.data.params["dataset.classes"] == str(list(cfg.dataset.classes))
    assert run.data.tags["detexp.overrides"] == f"scaling.num_workers={workers}"
    # one value per epoch (not per batch) for losses, lr and validation metrics
    epochs = 2  # of 4: stopped early
    for key in ("train/loss", "train/loss_classifier", "train/loss_box_reg", "train/lr", "val/map", "val/map_50"):
        assert len(_history(client, run.info.run_id, key)) == epochs, key
    lrs = _history(client, run.info.run_id, "train/lr")
    assert lrs[1] == pytest.approx(lr * cfg.schedule.lr_gamma)  # the scaled lr, MultiStepLR at epoch 1
    assert run.data.metrics["data/train_images"] == cfg.dataset.synth.num_train
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config.yaml" in artifacts
    checkpoints = [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")]
    assert checkpoints == ["checkpoints/model_best.pt", "checkpoints/model_final.pt"]
    assert "eval/metrics.json" in {a.path for a in client.list_artifacts(run.info.run_id, "eval")}

    # the early stop, said and recorded; the best epoch kept beside the last
    assert result["epochs_trained"] == 2
    assert result["stop_reason"] == (
        "early stop: val/images did not improve for 1 epoch(s) after epoch 1 (16.0000); trained 2 of 4 epochs"
    )
    assert run.data.tags["detexp.stop_reason"] == result["stop_reason"]
    assert run.data.tags["detexp.best_epoch"] == "1"
    assert run.data.metrics["best/epoch"] == 0 and run.data.metrics["best/val_images"] == 16
    best = torch.load(run_dir / "model_best.pt", map_location="cpu", weights_only=True)
    assert best["epoch"] == 0 and best["best"]["bad_epochs"] == 0
    assert find_checkpoint(str(run_dir)) == (run_dir / "model_best.pt").resolve()  # what eval/predict take
    again = train(smoke_cfg(*early, "resume=true"), run_dir)  # nothing more to train
    assert again["epochs_trained"] == 2

    # the checkpoint holds the unwrapped model (no "module." prefix with DDP) and loads safely
    ckpt = torch.load(result["checkpoint"], map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == epochs - 1 and ckpt["best"]["bad_epochs"] == 1
    assert {"model", "optimizer", "lr_scheduler", "config", "epoch"} <= ckpt.keys()
    assert not any(k.startswith("module.") for k in ckpt["model"])
    assert ckpt["config"]["scaling"]["num_workers"] == workers
    assert ckpt["config"]["optimizer"]["lr"] == pytest.approx(lr)  # what it trained with


def test_the_command_trains_the_shared_runs_losses_again_without_importing_torch_itself(trained_smoke, tmp_path):
    """The shared smoke run, trained again by ``python -m detexp train`` in another run
    directory and store: the shuffle, every image's flip and the initial weights come from
    ``seed``, so each epoch's losses repeat to the last digit (and the flips change from one
    epoch to the next). The command's own process checks, reads, trains on Ray's workers
    and writes its final report without importing torch or torchvision: a Tune trial's
    actor runs the same code, and on a small machine each import is seconds of CPU before
    the first step. It joins the session's Ray, as the command joins a running cluster."""
    overrides = [o for o in trained_smoke.overrides if not o.startswith(("tracking.", "progress_every_s"))]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "detexp", "train", *overrides, "hydra.run.dir=again"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env,
    )
    said = out.stdout + out.stderr
    assert out.returncode == 0 and "done:" in said, said[-3000:]
    assert (tmp_path / "again" / "eval" / "metrics.json").is_file()  # the report at the end
    imported = re.findall(r"^import time:.*\|\s*(\S+)$", out.stderr, re.M)  # the command's own process
    assert "ray.train" in imported and "faster_coco_eval" in imported  # what it needs, it imports
    assert not [m for m in imported if m.split(".")[0] in ("torch", "torchvision")]

    first, second = MlflowClient(tracking_uri=trained_smoke.uri), MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (again,) = second.search_runs([second.get_experiment_by_name("detexp").experiment_id])
    for key in ("train/loss", "train/loss_classifier", "train/loss_objectness"):
        expected = _history(first, trained_smoke.result["run_id"], key)
        assert len(expected) == 2 and expected[0] != expected[1]
        assert _history(second, again.info.run_id, key) == expected, key
