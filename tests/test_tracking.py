"""What a training run leaves in MLflow for people, on the session's one smoke run
(conftest.py's ``trained_smoke``, trained with ``tracking.register_model=shapes``): its
name and description, system metrics, the registered model that ``predict`` and ``eval``
take as ``models:/shapes/1``, and the console lines a user read while it trained."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import mlflow.artifacts
import mlflow.models
import mlflow.pytorch
import torch
from mlflow.tracking import MlflowClient

from conftest import compose_train
from detexp.commands.predict import predict
from detexp.data.source import dataset_root


def _run(trained):
    return MlflowClient(tracking_uri=trained.uri).get_run(trained.result["run_id"])


def test_run_is_named_after_model_dataset_and_time_and_describes_its_command(trained_smoke):
    run = _run(trained_smoke)
    model = trained_smoke.cfg.model.name
    assert re.fullmatch(rf"{model}-shapes-\d{{8}}-\d{{6}}", run.info.run_name), run.info.run_name
    description = run.data.tags["mlflow.note.content"]
    assert description.startswith("python -m detexp train +experiment=smoke ")
    assert "tracking.register_model=shapes" in description


def test_the_experiment_opens_in_mlflows_model_training_view(trained_smoke):
    client = MlflowClient(tracking_uri=trained_smoke.uri)
    experiment = client.get_experiment(_run(trained_smoke).info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_sweep_runs_are_named_by_what_was_swept():
    from detexp.commands.multirun import swept_keys
    from detexp.tracking.mlflow_runs import short_overrides, sweep_run_name

    assert short_overrides(["optimizer.lr=0.018812345", "schedule.lr_steps=[8, 11]"]) == "lr=0.01881 lr_steps=[8,11]"
    assert short_overrides(["scaling.num_workers=2", "optimizer.lr=1e-3", "+experiment=smoke"]) == (
        "num_workers=2 lr=0.001 experiment=smoke"
    )
    keys = swept_keys(["+experiment=smoke", "optimizer.lr=0.01,0.02", "schedule.lr_steps='[16,22]','[8,11]'",
                       "schedule.epochs=4", "seed=range(3)"])
    assert keys == ("optimizer.lr", "schedule.lr_steps", "seed")
    assert re.fullmatch(r"sweep lr,lr_steps,seed \d\d-\d\d \d\d:\d\d", sweep_run_name("sweep", keys))


def test_system_metrics_are_recorded_while_training(trained_smoke):
    client = MlflowClient(tracking_uri=trained_smoke.uri)
    keys = set(_run(trained_smoke).data.metrics)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= keys, sorted(keys)
    history = client.get_metric_history(trained_smoke.result["run_id"], "system/system_memory_usage_megabytes")
    assert history and all(m.value > 0 for m in history)


def test_the_run_says_and_logs_how_long_its_first_training_step_took_to_come(trained_smoke):
    """What every run pays before it trains (Ray, the workers, the first batch): said once
    and logged as ``time/first_step_s``, from the call of ``train`` to the end of the
    first step, so within the seconds the call took and before its last epoch began."""
    run = _run(trained_smoke)
    first = run.data.metrics["time/first_step_s"]
    lines = [m for m in trained_smoke.log if m.startswith("the first training step ended ")]
    assert lines == [f"the first training step ended {first:.1f} s after the start"], lines
    epochs = MlflowClient(tracking_uri=trained_smoke.uri).get_metric_history(run.info.run_id, "train/epoch_s")
    assert len(epochs) == 2
    assert 1 < first < trained_smoke.seconds - epochs[-1].value
    assert trained_smoke.result["first_step_s"] == first


def test_best_model_is_registered_with_a_signature_and_loads_with_mlflow(trained_smoke):
    client = MlflowClient(tracking_uri=trained_smoke.uri)
    assert trained_smoke.result["registered_model"] == "models:/shapes/1"
    version = client.get_model_version("shapes", "1")
    assert version.run_id == trained_smoke.result["run_id"]
    # what a user's own code does with the registered version (no global tracking URI here)
    local = mlflow.artifacts.download_artifacts(client.get_model_version_download_uri("shapes", "1"))
    net = mlflow.pytorch.load_model(local)
    signature = mlflow.models.Model.load(str(Path(local) / "MLmodel")).signature
    assert signature is not None and signature.inputs.inputs[0].shape == (-1, 3, -1, -1)
    with torch.no_grad():
        out = net.eval()([torch.rand(3, 128, 128)])
    assert set(out[0]) == {"boxes", "labels", "scores"}
    # the registered weights are the best epoch's checkpoint
    best = torch.load(trained_smoke.result["best_checkpoint"], map_location="cpu", weights_only=True)["model"]
    name = "roi_heads.box_predictor.cls_score.weight"
    assert torch.equal(net.state_dict()[name], best[name])


def test_predict_takes_the_registered_model(trained_smoke, tmp_path):
    images = tmp_path / "photos"
    images.mkdir()
    for path in sorted((dataset_root(trained_smoke.cfg.dataset).local_path("JPEGImages")).glob("*.jpg"))[:2]:
        shutil.copy(path, images / path.name)
    overrides = ["checkpoint=models:/shapes/1", f"input={images}", "score_threshold=0.0"]
    cfg = compose_train([f"tracking.uri={trained_smoke.uri}", *overrides], config_name="predict")
    result = predict(cfg, tmp_path / "run", overrides)
    assert result["images"] == 2
    lines = (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()
    assert {json.loads(line)["image_id"] for line in lines} == {p.stem for p in images.iterdir()}
    run = MlflowClient(tracking_uri=trained_smoke.uri).get_run(result["run_id"])
    assert run.data.tags["detexp.train_run_id"] == trained_smoke.result["run_id"]  # traced to its training
    assert run.info.run_name.startswith("predict-")


def test_console_showed_live_progress_and_a_summary(trained_smoke):
    log = trained_smoke.log
    steps = [line for line in log if re.match(r"  epoch \d/2  step \d+/\d+  loss [\d.]+  [\d.]+ images/s  epoch ETA", line)]
    assert any(line.startswith("  epoch 1/2") for line in steps) and any(line.startswith("  epoch 2/2") for line in steps)
    summary = next(line for line in log if line.startswith("done:"))
    for row in ("stopped", "best epoch", "val mAP", "best model", "last model", "MLflow run", "registered", "browse"):
        assert f"\n  {row}" in summary, row
    assert trained_smoke.result["run_id"] in summary and str(Path(trained_smoke.result["checkpoint"])) in summary
