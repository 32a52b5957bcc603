"""Searching and comparing runs: the best epoch and early stopping in `train`, Hydra
multirun as one MLflow parent run, and `detexp tune` (Ray Tune over Ray Train)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from conftest import compose_train
from detexp.commands.train import find_data, train
from detexp.commands.tune import (
    check_search,
    check_tune_config,
    max_concurrent_trials,
    tune,
    write_best_config,
)
from detexp.config import TrainConfig
from detexp.errors import ConfigError, ResourceError

# -- best epoch and patience ---------------------------------------------------------------------


@pytest.mark.no_mlflow_store
@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("schedule.monitor=train/loss", "validation metric"),
        ("schedule.patience=0", "at least 1"),
    ],
)
def test_bad_monitor_settings_are_refused_before_ray(smoke_cfg, tmp_path, override, words):
    with pytest.raises(ConfigError, match=words):
        train(smoke_cfg(override), tmp_path / "run")
    assert not (tmp_path / "mlflow.db").exists()


# -- tune: checks before Ray ---------------------------------------------------------------------


def _tune_cfg(tmp_path, shapes_cache, *overrides):
    return compose_train(
        ["+experiment=smoke", f"dataset.cache_dir={shapes_cache}", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", *overrides],
        config_name="tune",
    )


@pytest.mark.no_mlflow_store
@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("tune.search_space={optimizer.lrr: {loguniform: [1e-3, 1e-1]}}", "optimizer.lrr.*not a key of the train config"),
        ("tune.search_space={optimizer: {choice: [a, b]}}", "optimizer.*is a group of keys"),
        ("tune.search_space={optimizer.lr: {choice: [fast, 0.1]}}", "optimizer.lr.*'fast' does not fit"),
        ("tune.search_space={optimizer.lr: {loguniform: [0, 0.1]}}", "0 < low < high"),
        ("tune.search_space={optimizer.lr: {normal: [0.01, 0.1]}}", "one of loguniform, uniform, choice, grid"),
        ("tune.search_space={schedule.lr_steps: {grid: [[8, 11]]}}", "grid is not supported with tune.search=optuna"),
        ("tune.metric=train/loss", "validation metric"),
    ],
)
def test_a_bad_search_is_refused_before_ray_naming_the_key(tmp_path, shapes_cache, override, words):
    extra = ["tune.search=optuna"] if "grid:" in override else []
    with pytest.raises(ConfigError, match=words):
        tune(_tune_cfg(tmp_path, shapes_cache, override, *extra), tmp_path / "tune")
    assert not (tmp_path / "tune").exists() and not (tmp_path / "mlflow.db").exists()


def test_the_default_search_is_around_the_recipe_train_runs(shapes_cache):
    """tune without a search space searches the recipe `train` runs, not another one."""
    cfg = compose_train([f"dataset.cache_dir={shapes_cache}"], config_name="tune")
    base = check_tune_config(cfg)
    train = compose_train([f"dataset.cache_dir={shapes_cache}"])
    assert base.optimizer == train.optimizer and base.model == train.model and base.schedule == train.schedule
    find_data(base)  # the 400 shapes: 4 epochs, the lr lowered for the 4th
    assert check_search(cfg.tune, base) == {
        "optimizer.lr": {"loguniform": [train.optimizer.lr / 4, train.optimizer.lr * 4]},
        "schedule.lr_steps": {"choice": [[3], [2, 3]]},  # inside the 4 epochs
    }
    smoke_cfg = compose_train(["+experiment=smoke"], config_name="tune")
    smoke_base = check_tune_config(smoke_cfg)
    smoke = check_search(smoke_cfg.tune, smoke_base)
    assert smoke == {"optimizer.lr": {"loguniform": [0.005, 0.08]}}  # SGD at 0.02; 2 epochs: no step to move
    assert smoke_base.optimizer.name == "sgd"


def test_trials_that_cannot_be_placed_fail_saying_what_one_needs():
    scaling = OmegaConf.create({"num_workers": 2, "cpus_per_worker": 2, "use_gpu": True})
    assert max_concurrent_trials(scaling, {"CPU": 17, "GPU": 4}, 1) == 2  # GPUs: 2 per trial
    assert max_concurrent_trials(scaling, {"CPU": 10, "GPU": 8}, 1) == 2  # CPUs: 4 + 1 for data per trial
    assert max_concurrent_trials(scaling, {"CPU": 9, "GPU": 8}, 1) == 1
    with pytest.raises(ResourceError, match=r"one trial needs 4 CPUs .* and 2 GPUs.* has 16 CPUs and 1 GPUs"):
        max_concurrent_trials(scaling, {"CPU": 16, "GPU": 1}, 1)


def test_best_config_trains_with_train(tmp_path, shapes_cache):
    """best_config.yaml is a primary config over train.yaml: `train -cd DIR -cn best_config`."""
    cfg = _tune_cfg(tmp_path, shapes_cache)
    base = OmegaConf.merge(OmegaConf.structured(TrainConfig), {k: v for k, v in cfg.items() if k != "tune"})
    base.optimizer.lr = 0.0123
    base.schedule.lr_steps = [8, 11]
    best = {"job": "abc_00001", "best_value": 0.5, "best_epoch": 1, "overrides": "optimizer.lr=0.0123"}
    path = write_best_config(base, tmp_path, best, "val/map_50")
    out = subprocess.run(
        [sys.executable, "-m", "detexp", "train", "-cd", str(tmp_path), "-cn", path.stem, "--cfg", "job"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    shown = OmegaConf.create(out.stdout)
    assert shown.optimizer.lr == 0.0123 and list(shown.schedule.lr_steps) == [8, 11]
    assert shown.dataset.synth.num_train == cfg.dataset.synth.num_train and shown.resume is False
    assert f"-cd {tmp_path} -cn best_config" in path.read_text()


# -- tune end to end ------------------------------------------------------------------------------


def _mlflow(tmp_path):
    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")


@pytest.mark.slow  # about 100 s on 2 cores: two trials, each a Ray Train run and its report
def test_tune_two_trials_are_children_of_one_parent(ray_cluster, tmp_path, shapes_cache):
    cfg = _tune_cfg(tmp_path, shapes_cache, "tune.num_samples=2", "schedule.epochs=1", "tune.grace_period=1")
    result = tune(cfg, tmp_path / "tune")

    client = _mlflow(tmp_path)
    parent = client.get_run(result["run_id"])
    assert parent.info.status == "FINISHED"
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert len(children) == 2 == result["trials"]
    # the default space around the smoke recipe: its 1 epoch leaves no lr step to search
    assert re.fullmatch(r"tune lr \d\d-\d\d \d\d:\d\d", parent.info.run_name), parent.info.run_name
    best = max(c.data.metrics["best/val_map_50"] for c in children)
    assert parent.data.metrics["val/map_50"] == parent.data.metrics["best/val_map_50"] == pytest.approx(best)
    assert 0 < parent.data.metrics["tune/efficiency"] < 1
    assert parent.data.metrics["tune/train_s"] == pytest.approx(sum(
        m.value for c in children for m in client.get_metric_history(c.info.run_id, "train/epoch_s")))
    for child in children:
        assert child.info.status == "FINISHED"
        assert 0 < child.data.metrics["time/first_step_s"] < parent.data.metrics["tune/seconds"]
        assert re.fullmatch(r"lr=[\d.e-]+", child.info.run_name), child.info.run_name
        assert "val/map_50" in child.data.metrics
        assert child.data.params["optimizer.lr"] == re.search(r"optimizer.lr=(\S+)", child.data.tags["detexp.trial_overrides"])[1]
    assert parent.data.tags["detexp.best_trial"] == result["best_trial"]
    assert parent.data.tags["detexp.best_child"] in {c.info.run_id for c in children}
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"best_config.yaml", "sweep_summary.csv", "sweep_summary.md", "config.yaml"}
    assert Path(result["best_config"]).is_file()
    # trials ran in their own run directories inside the tune's, not in Ray's temp dirs
    assert sorted(p.name for p in (tmp_path / "tune" / "trials").iterdir()) == sorted(
        c.data.tags["detexp.trial_id"] for c in children
    )
    assert os.getcwd() != str(tmp_path / "tune")


# -- through the command line and long runs -------------------------------------------------------


def _ray_processes(marker: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if marker in line and "ps -eo" not in line]


@pytest.mark.slow  # about 2 minutes: two CLI jobs, each starting its own Ray (the default run's budget)
def test_cli_sweep_of_two_jobs_is_one_parent_run_and_leaves_no_ray(tmp_path, shapes_cache):
    """`train -m` as a user types it: one job of one worker and one of two DDP workers
    (gloo), one parent run; the console shows progress, not Ray's internals."""
    ray_tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # short: Ray's socket paths live below it
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    out = subprocess.run(
        [
            sys.executable, "-m", "detexp", "train", "-m", "+experiment=smoke", "scaling.num_workers=1,2",
            f"dataset.cache_dir={shapes_cache}", "hydra.sweep.dir=sweep", "eval_at_end=false",
            # the session's smoke run made this half-size data already; 2 and 1 steps an epoch
            "dataset.synth.num_train=16", "dataset.synth.num_val=8", "tracking.system_metrics=false",
        ],
        cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert len(re.findall(r"^epoch 2/2 .*steps/s.*val map .*ETA", text, re.M)) == 2, text
    for noise in ("PlacementGroupCleaner", "State API", "Traceback", "RayTrainWorker pid=", "TrainController pid=",
                  "already initialized"):
        assert noise not in text, noise
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/mlflow.db" in text
    assert len(text.splitlines()) < 60, text  # a screenful, not Ray's internals
    assert not _ray_processes(ray_tmp), "a Ray process outlived the command"

    client = _mlflow(tmp_path)
    runs = client.search_runs([client.get_experiment_by_name("detexp").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["sweep.overrides"].startswith("+experiment=smoke scaling.num_workers=1,2")
    assert {c.data.params["scaling.num_workers"] for c in children} == {"1", "2"}
    assert re.fullmatch(r"sweep num_workers \d\d-\d\d \d\d:\d\d", parent.info.run_name), parent.info.run_name
    assert {c.info.run_name for c in children} == {"num_workers=1", "num_workers=2"}
    assert parent.data.metrics["val/map_50"] == max(c.data.metrics["best/val_map_50"] for c in children)
    assert 0 < parent.data.metrics["sweep/efficiency"] < 1
    assert re.search(r"^.*the sweep trained for \d+ s of its \d+ s \(efficiency 0\.\d\d\); median start-up of a job", text, re.M)
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status == "FINISHED" and "val/map_50" in child.data.metrics
        assert child.data.metrics["time/first_step_s"] > 0
    assert parent.data.tags["detexp.best_child"] in {c.info.run_id for c in children}
    summary = (tmp_path / "sweep" / "sweep_summary.csv").read_text().splitlines()
    assert len(summary) == 3 and all(",FINISHED," in line for line in summary[1:])
    # each job trained in its own directory: no job read another's checkpoints
    assert all((tmp_path / "sweep" / str(n) / "model_final.pt").is_file() for n in (0, 1))


@pytest.mark.slow
def test_asha_stops_a_trial_early_and_says_so(ray_cluster, tmp_path, shapes_cache):
    """Four trials, ASHA deciding after every epoch on the training loss's proxy of
    progress: with lr spread over two decades at least one trial is stopped early."""
    cfg = _tune_cfg(
        tmp_path, shapes_cache, "tune.num_samples=4", "schedule.epochs=3", "tune.grace_period=1",
        "tune.search_space={optimizer.lr: {grid: [0.0005, 0.002, 0.01, 0.03]}}", "tune.search=grid",
        "tune.num_samples=1", "tune.metric=val/map", "dataset.synth.num_train=64",
    )
    result = tune(cfg, tmp_path / "tune")
    assert result["stopped_early"] >= 1
    client = _mlflow(tmp_path)
    stopped = client.search_runs(
        [client.get_experiment_by_name("detexp").experiment_id], "tags.`detexp.stopped_by` = 'asha'"
    )
    assert len(stopped) == result["stopped_early"]
    assert all(r.info.status == "KILLED" for r in stopped)
    for run in stopped:  # every epoch it trained, the one ASHA stopped it at included
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val/map"))
        assert steps and steps == list(range(len(steps))), (run.info.run_name, steps)
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == steps
    assert "STOPPED" in (tmp_path / "tune" / "sweep_summary.md").read_text()


def test_asha_stops_trials_below_the_cutoff_but_never_at_their_last_epoch():
    """Grace 1, 4 epochs and factor 2 put ASHA's rungs at epochs 1, 2 and 4: below the cutoff
    at epoch 1 a trial is stopped; below it at epoch 4, its last, it ends itself (its final
    report, model_final.pt and MLflow run are made after that result)."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    from detexp.commands.tune import TIME_ATTR, LastEpochsEnd

    asha = LastEpochsEnd(time_attr=TIME_ATTR, max_t=4, grace_period=1, reduction_factor=2,
                         stop_last_trials=False, metric="val/map_50", mode="max")
    leader, late, weak = (Trial("trainable", stub=True) for _ in range(3))
    for trial in (leader, late, weak):
        asha.on_trial_add(None, trial)

    def decide(trial, epochs, value):
        return asha.on_trial_result(None, trial, {TIME_ATTR: epochs, "val/map_50": value, "training_iteration": epochs})

    assert [decide(leader, e, 0.9) for e in (1, 2, 3, 4)] == [TrialScheduler.CONTINUE] * 4
    assert decide(weak, 1, 0.1) == TrialScheduler.STOP  # early stopping still stops
    assert [decide(late, e, 0.95) for e in (1, 2, 3)] == [TrialScheduler.CONTINUE] * 3
    assert decide(late, 4, 0.1) == TrialScheduler.CONTINUE  # Ray's ASHA: STOP, at its last epoch
