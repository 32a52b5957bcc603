"""End to end through real Ray Train workers, real JPEG/XML files and a real MLflow
SQLite store: what a user sees after ``python -m detexp train +experiment=smoke``."""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient

from detexp.train import train


def _history(client, run_id, key):
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


@pytest.mark.parametrize("workers", [1])
def test_smoke_run_logs_everything(ray_cluster, smoke_cfg, tmp_path, workers):
    cfg = smoke_cfg(f"scaling.num_workers={workers}")
    result = train(cfg, tmp_path / "run", overrides=[f"scaling.num_workers={workers}"])

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    # every resolved config value as a param under its dotted key
    assert run.data.params["optimizer.lr"] == str(cfg.optimizer.lr)
    assert run.data.params["scaling.num_workers"] == str(workers)
    assert run.data.params["dataset.classes"] == str(list(cfg.dataset.classes))
    assert run.data.tags["detexp.overrides"] == f"scaling.num_workers={workers}"
    # one value per epoch (not per batch) for losses, lr and validation metrics
    epochs = cfg.schedule.epochs
    for key in ("train/loss", "train/loss_classifier", "train/loss_box_reg", "train/lr", "val/map", "val/map_50"):
        assert len(_history(client, run.info.run_id, key)) == epochs, key
    lrs = _history(client, run.info.run_id, "train/lr")
    assert lrs[1] == pytest.approx(cfg.optimizer.lr * cfg.schedule.lr_gamma)  # MultiStepLR at epoch 1
    assert run.data.metrics["data/train_images"] == cfg.dataset.synth.num_train
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config.yaml" in artifacts
    checkpoints = [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")]
    assert checkpoints == ["checkpoints/model_best.pt", "checkpoints/model_final.pt"]
    assert run.data.metrics["best/epoch"] in (0, 1) and "best/val_map_50" in run.data.metrics

    # the checkpoint holds the unwrapped model (no "module." prefix with DDP) and loads safely
    ckpt = torch.load(result["checkpoint"], map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == epochs - 1
    assert {"model", "optimizer", "lr_scheduler", "config", "epoch"} <= ckpt.keys()
    assert not any(k.startswith("module.") for k in ckpt["model"])
    assert ckpt["config"]["scaling"]["num_workers"] == workers
