"""What the driver prints while and after training: live progress within an epoch (a bar
on a terminal, periodic lines in a log), the end-of-run summary, and MLflow run names."""

from __future__ import annotations

import io
import logging
import re

import pytest

from conftest import compose_train
from detexp.tracking.mlflow_runs import command_line, default_run_name
from detexp.tracking.progress import EpochProgress, LiveProgress, summary_table


def _step(step, total=10, epoch=0, elapsed=5.0, loss=1.25, ips=3.2):
    return {"epoch": epoch, "step": step, "total": total, "elapsed_s": elapsed, "loss": loss, "images_per_s": ips}


def test_log_lines_say_step_images_per_s_loss_and_eta_at_most_every_interval(caplog):
    live = LiveProgress(epochs=3, tty=False, every_s=0.0)
    with caplog.at_level(logging.INFO, logger="detexp"):
        live.update(_step(4, elapsed=8.0))  # 0.5 steps/s, 6 steps left: 12 s
    assert caplog.messages == ["  epoch 1/3  step 4/10  loss 1.250  3.2 images/s  epoch ETA 12s"]

    caplog.clear()
    slow = LiveProgress(epochs=3, tty=False, every_s=3600.0)
    with caplog.at_level(logging.INFO, logger="detexp"):
        for n in range(1, 6):
            slow.update(_step(n))
    assert caplog.messages == []  # none within the interval: a log file is not flooded


def test_terminal_gets_a_bar_that_is_cleared_before_the_epoch_line(monkeypatch):
    screen = io.StringIO()
    monkeypatch.setattr("sys.stdout", screen)
    live = LiveProgress(epochs=2, tty=True)
    live.update(_step(3))
    live.update(_step(6, elapsed=9.0, loss=0.875))
    assert live.bar.n == 6 and live.bar.total == 10
    text = screen.getvalue()
    assert "epoch 1/2" in text and "6/10" in text and "loss 0.875" in text and "images/s" in text
    live.close()
    assert live.bar is None
    live.update(_step(1, epoch=1))  # the next epoch starts a new bar
    assert live.bar.desc.startswith("epoch 2/2") and live.bar.n == 1


class _FakeTracker:
    run_id = "abc123"

    def run_name(self):
        return "mobilenet-shapes-20260101-120000"

    def ui_command(self):
        return "mlflow ui --backend-store-uri sqlite:////x/mlflow.db --host 127.0.0.1"


def test_summary_names_best_epoch_its_maps_checkpoints_run_and_ui(tmp_path):
    progress = EpochProgress(epochs=5, max_failures=0, tracker=None, logged=set(), previous=None)
    best = {"epoch": 2, "improved": True, "val/map": 0.41, "val/map_50": 0.72, "val/voc07_map": 0.69, "val/voc12_map": 0.7}
    progress.best_metrics = best
    progress.last = {**best, "epoch": 4, "improved": False, "val/map_50": 0.66}
    text = summary_table(
        progress, "completed 5 epochs", final=tmp_path / "model_final.pt", best=tmp_path / "model_best.pt",
        tracker=_FakeTracker(), registered=("shapes", "3"),
    )
    assert "best epoch  3 of 5 by val/map_50" in text
    assert "map 0.4100  map_50 0.7200  voc07_map 0.6900  voc12_map 0.7000" in text  # the best epoch's, not the last
    assert str(tmp_path / "model_best.pt") in text and str(tmp_path / "model_final.pt") in text
    assert "mobilenet-shapes-20260101-120000 (abc123)" in text
    assert "models:/shapes/3" in text
    assert text.rstrip().endswith("--host 127.0.0.1")


def test_run_names_and_descriptions():
    cfg = compose_train(["+experiment=smoke"])
    name = default_run_name(cfg)
    assert re.fullmatch(rf"{cfg.model.name}-shapes-\d{{8}}-\d{{6}}", name), name
    assert default_run_name(cfg, "eval-").startswith(f"eval-{cfg.model.name}-shapes-")
    cfg.tracking.run_name = "my-baseline"
    assert default_run_name(cfg) == "my-baseline"
    assert command_line("train", ["+experiment=smoke", "schedule.lr_steps=[8, 11]"]) == (
        "python -m detexp train +experiment=smoke 'schedule.lr_steps=[8, 11]'"
    )


@pytest.mark.parametrize("name", ["a/b", "shapes:1", "x@prod", " "])
def test_a_registry_name_mlflow_cannot_hold_is_refused_before_training(name):
    from detexp.commands.train import check_train_config
    from detexp.errors import ConfigError

    cfg = compose_train(["+experiment=smoke", f"tracking.register_model='{name}'"])
    with pytest.raises(ConfigError, match="tracking.register_model"):
        check_train_config(cfg)


def test_unknown_registry_version_is_one_line_naming_it(tmp_path):
    from detexp.checkpoint.effective_config import prepare_inference
    from detexp.errors import TrackingError

    cfg = compose_train(
        [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "checkpoint=models:/nothing/1"], config_name="predict"
    )
    with pytest.raises(TrackingError, match=r"checkpoint=models:/nothing/1: not found in the MLflow store"):
        prepare_inference(cfg, [])


def test_summary_without_validation_says_last_epoch(tmp_path):
    progress = EpochProgress(epochs=2, max_failures=0, tracker=None, logged=set(), previous=None)
    progress.last = {"epoch": 1}
    text = summary_table(progress, "completed 2 epochs", final=tmp_path / "f.pt", best=None, tracker=_FakeTracker(), registered=None)
    assert "best epoch" not in text and "val mAP" not in text and "registered" not in text
