"""Composition: every experiment config composes, typos fail fast naming the key."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from conftest import compose_train
from detexp.commands.train import check_train_config, find_data
from detexp.commands.tune import check_tune_config
from detexp.engine.solver import resolve_auto_schedule
from detexp.errors import ConfigError

EXPERIMENTS_DIR = Path(__file__).parents[1] / "experiments"
EXPERIMENTS = sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml"))


def test_there_are_experiments():
    assert {"smoke", "voc_tutorial"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_validates(name):
    # An experiment with a `tune` section is a search: `detexp tune +experiment=NAME`.
    if "tune" in (yaml.safe_load((EXPERIMENTS_DIR / f"{name}.yaml").read_text()) or {}):
        check_tune_config(compose_train([f"+experiment={name}"], config_name="tune"))
    else:
        check_train_config(compose_train([f"+experiment={name}"]))


def test_voc_tutorial_is_the_tutorial_recipe():
    cfg = compose_train(["+experiment=voc_tutorial"])
    assert cfg.model.name == "fasterrcnn_resnet50_fpn"
    assert len(cfg.dataset.classes) == 20 and cfg.dataset.classes[0] == "aeroplane"
    assert cfg.dataset.batch_size == 2
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.optimizer.momentum, cfg.optimizer.weight_decay) == (
        "sgd", 0.02, 0.9, 1e-4,
    )
    assert (cfg.schedule.warmup_iters, cfg.schedule.warmup_factor) == (250, 0.001)
    assert list(cfg.schedule.lr_steps) == [16, 22] and cfg.schedule.lr_gamma == 0.1
    assert cfg.schedule.epochs == 26
    assert (cfg.scaling.num_workers, cfg.scaling.use_gpu) == (8, True)


def test_misspelt_key_is_rejected_by_name():
    with pytest.raises(ConfigCompositionException) as info:
        compose_train(["optimizer.lrr=0.1"])
    assert "lrr" in str(info.value.__cause__ or info.value)


def test_wrong_type_is_rejected():
    with pytest.raises((ConfigCompositionException, ValidationError, ConfigKeyError)) as info:
        compose_train(["schedule.lr_gamma=ten"])
    assert "lr_gamma" in str(info.value) + str(info.value.__cause__)


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.name=yolo", "model.name"),
        ("model.weights=IMAGENET_V9", "model.weights"),
        ("model.weights_backbone=IMAGENET1K_V9", "model.weights_backbone"),
        ("schedule.lr_steps=[8,4]", "schedule.lr_steps"),
        ("schedule.epochs=ten", "schedule.epochs"),  # a number or auto
        ("schedule.lr_steps=soon", "schedule.lr_steps"),
        ("schedule.min_epochs=0", "schedule.min_epochs"),
    ],
)
def test_impossible_values_name_the_key(override, key):
    cfg = compose_train([override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_train_config(cfg)


@pytest.mark.parametrize(
    ("override", "choices", "config_name"),
    [
        ("optimizer.name=lion", "[sgd, adamw]", "train"),
        ("schedule.name=linear", "[multistep, cosine]", "train"),
        ("schedule.monitor_mode=biggest", "[max, min]", "train"),
        ("dataset.on_error=ignore", "[skip, raise]", "train"),
        ("scaling.placement_strategy=RANDOM", "[PACK, SPREAD, STRICT_PACK, STRICT_SPREAD]", "train"),
        ("trainer.amp=fp8", "[bf16, fp16]", "train"),
        ("tune.search=bayes", "[random, grid, optuna]", "tune"),
        ("tune.scheduler=hyperband", "[asha, fifo]", "tune"),
        ("tune.mode=up", "[max, min]", "tune"),
        ("scaling.placement_strategy=RANDOM", "[PACK, SPREAD, STRICT_PACK, STRICT_SPREAD]", "eval"),
    ],
)
def test_an_unknown_choice_fails_while_composing_and_lists_the_valid_ones(override, choices, config_name):
    with pytest.raises(ConfigCompositionException) as info:
        compose_train([override], config_name=config_name)
    text = f"{info.value} {info.value.__cause__}"
    assert override.split("=")[0] in text and choices in text, text


def test_choices_reach_mlflow_checkpoints_and_workers_as_plain_strings():
    from detexp.config import plain

    cfg = compose_train(["dataset.on_error=raise", "trainer.amp=bf16", "optimizer.name=adamw"])
    assert cfg.dataset.on_error == "raise" and f"{cfg.trainer.amp}" == "bf16"
    values = plain(cfg)
    assert (values["dataset"]["on_error"], values["trainer"]["amp"], values["optimizer"]["name"]) == ("raise", "bf16", "adamw")
    assert all(type(v) is str for v in (values["dataset"]["on_error"], values["scaling"]["placement_strategy"]))


@pytest.mark.no_mlflow_store
def test_command_line_typo_fails_in_seconds_without_traceback(tmp_path):
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "detexp", "train", "optimizer.lrr=0.1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode != 0
    assert "lrr" in out.stderr + out.stdout
    assert "Traceback" not in out.stderr + out.stdout
    assert time.perf_counter() - started < 20
    assert not (tmp_path / "mlflow.db").exists()  # failed before anything started


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("scaling.min_workers=2", "scaling.min_workers=2 must be between 1 and scaling.num_workers=1"),
        ("optimizer.reference_batch=0", "optimizer.reference_batch=0 must be at least 1"),
        ("scaling.cpus_per_worker=0", r"scaling.cpus_per_worker=0.0 must be more than 0"),
        ("scaling.threads_per_worker=0", "scaling.threads_per_worker=0 must be at least 1"),
    ],
)
def test_impossible_scaling_values_are_refused(override, words):
    with pytest.raises(ConfigError, match=words):
        check_train_config(compose_train([override]))


def test_voc_tutorial_scales_its_lr_to_the_global_batch():
    from detexp.engine.solver import scaled_lr

    cfg = compose_train(["+experiment=voc_tutorial", "scaling.num_workers=2"])
    assert cfg.model.weights_backbone == "IMAGENET1K_V1"  # as the tutorial's builder call
    assert scaled_lr(cfg.optimizer, cfg.scaling.num_workers, cfg.dataset.batch_size) == pytest.approx(0.005)
    full = compose_train(["+experiment=voc_tutorial"])
    assert scaled_lr(full.optimizer, full.scaling.num_workers, full.dataset.batch_size) == pytest.approx(0.02)


def test_lr_steps_that_can_never_apply_are_named_before_ray(caplog):
    """The README's former sweep put the tutorial's 26-epoch milestones on a 4-epoch recipe."""
    with caplog.at_level(logging.WARNING, logger="detexp"):
        check_train_config(compose_train(["schedule.epochs=4", "schedule.lr_steps=[3]"]))
        assert not caplog.records
        check_train_config(compose_train(["schedule.epochs=4", "schedule.lr_steps=[2,16,22]"]))
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning.startswith("schedule.lr_steps=[2, 16, 22]: step(s) 16, 22 at or past schedule.epochs=4 never apply")


def test_the_readmes_former_sweep_is_named_twice_before_ray(caplog, shapes_cache):
    """`train -m optimizer.lr=0.01,0.02 schedule.lr_steps='[16,22]','[8,11]'` on the default
    recipe: SGD's learning rates on AdamW (epoch-1 loss 364) and steps past the 4 epochs
    that `auto` gives the 400 shapes (named once the data is found, still before Ray)."""

    def job(*overrides):
        cfg = compose_train([f"dataset.cache_dir={shapes_cache}", *overrides])
        check_train_config(cfg)
        find_data(cfg)
        return cfg

    with caplog.at_level(logging.WARNING, logger="detexp"):
        for lr in ("0.0005", "0.002"):  # the sweep the README has now
            assert job(f"optimizer.lr={lr}").schedule.epochs == 4
        check_train_config(compose_train(["+experiment=smoke", "optimizer.lr=0.02"]))  # SGD's own lr on SGD
        assert not caplog.records
        job("optimizer.lr=0.01", "schedule.lr_steps=[8,11]")
    lr, steps = (r.getMessage() for r in caplog.records)
    assert lr.startswith("optimizer.lr=0.01 is far above what adamw trains a detector with (1e-05 to 0.005")
    assert steps.startswith("schedule.lr_steps=[8, 11]: step(s) 8, 11 at or past schedule.epochs=4 never apply")


def test_the_cpu_recipe_trains_a_small_split_longer(tmp_path, caplog):
    """schedule.epochs=auto: as many epochs as show 1600 train images, at least 4, the lr
    lowered for the last quarter; said before Ray starts and kept as numbers. Given numbers stay."""
    from test_pipeline import _write_voc

    for n in range(50):
        _write_voc(tmp_path, f"{n:03d}", box=(40, 30, 140, 130), size=(200, 160), filename=f"{n:03d}.jpg")
    export = ["dataset=voc", f"dataset.root={tmp_path}", "model.anchor_sizes=[64]", "model.anchor_ratios=[1.0]"]
    cfg = compose_train(export)
    with caplog.at_level(logging.INFO, logger="detexp"):
        find_data(cfg)  # 40 train images (dataset.val_fraction 0.2)
    assert (cfg.schedule.epochs, list(cfg.schedule.lr_steps)) == (40, [30])
    assert ("schedule: 40 epochs (schedule.epochs=auto: at least 4, and at least 1600 images shown from a train "
            "split of 40); the lr x 0.1 after epoch(s) [30] (schedule.lr_steps=auto)") in caplog.text
    assert OmegaConf.to_container(cfg.schedule)["epochs"] == 40  # a number in the params and checkpoints
    given = compose_train([*export, "schedule.epochs=6"])
    find_data(given)
    assert (given.schedule.epochs, list(given.schedule.lr_steps)) == (6, [4])
    large = compose_train([*export, "schedule.min_images=10"])
    find_data(large)
    assert (large.schedule.epochs, list(large.schedule.lr_steps)) == (4, [3])  # never under min_epochs


def test_a_search_dimension_that_cannot_change_a_trial_is_named(caplog):
    from detexp.commands.search_space import check_search_space

    base = compose_train([])  # AdamW
    resolve_auto_schedule(base.schedule, 400)  # 4 epochs, as on the shapes
    with caplog.at_level(logging.WARNING, logger="detexp"):
        check_search_space({"optimizer.lr": {"loguniform": [3e-4, 3e-3]}, "schedule.lr_steps": {"choice": [[3], [2, 3]]}}, base, "random")
        assert not caplog.records
        check_search_space({"optimizer.momentum": {"uniform": [0.8, 0.95]},
                            "schedule.lr_steps": {"choice": [[3, 16], [3, 22]]}}, base, "random")
    momentum, steps = (r.getMessage() for r in caplog.records)
    assert momentum == ("tune.search_space.optimizer.momentum: optimizer=adamw has no momentum (SGD's); "
                        "every trial trains alike on this key")
    assert steps.startswith("tune.search_space.schedule.lr_steps: every choice drops the lr at the same epochs")
