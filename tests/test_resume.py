"""Resume after a crash: ``kill -9`` a training command's whole process group (driver and its
local Ray) after its first checkpoint, train the same config again with ``resume=true``, and
the one MLflow run holds every epoch exactly once, continuing the learning-rate schedule."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from conftest import compose_train
from detexp.commands.train import train
from detexp.errors import USER_ERRORS, ConfigError

EPOCHS = 2
LR, GAMMA = 0.02, 0.1  # smoke: lr 0.02, MultiStepLR x0.1 from epoch index 1


def _overrides(tmp_path: Path, shapes_cache: Path, *extra: str) -> list[str]:
    return [
        "+experiment=smoke",
        # 24 steps an epoch: epoch 2 must outlast Ray Train's 2 s poll of the workers, or its
        # checkpoint is registered together with epoch 1's and the kill comes too late.
        f"dataset.cache_dir={shapes_cache}", "dataset.synth.num_train=96", "dataset.synth.num_val=8",
        "dataset.val_split=null",  # about resuming training: validation would only cost time
        f"schedule.epochs={EPOCHS}", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", *extra,
    ]


def _command(tmp_path: Path, shapes_cache: Path) -> list[str]:
    """The training command that is killed; its run directory is ``tmp_path/run``."""
    return [sys.executable, "-m", "detexp", "train", *_overrides(tmp_path, shapes_cache), "hydra.run.dir=run"]


def _config(tmp_path: Path, shapes_cache: Path, *extra: str):
    """The same run's config, composed as the command line composes it."""
    return compose_train(_overrides(tmp_path, shapes_cache, *extra))


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # the command starts its own Ray, not the test session's
    return env


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (Ray puts its workers in process groups of their own)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


def _kill9_after_first_checkpoint(cmd: list[str], cwd: Path, snapshot: Path, timeout_s: float = 420) -> str:
    """Start ``cmd`` in its own process group; SIGKILL the group once Ray Train has
    registered a checkpoint. Returns what the process printed."""
    log_path = cwd / "first.log"
    with log_path.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
    pgid = proc.pid
    ray_processes: set[int] = set()
    try:
        deadline = time.monotonic() + timeout_s
        while not snapshot.is_file():
            assert proc.poll() is None, f"training ended before its first checkpoint:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"no checkpoint after {timeout_s}s:\n{log_path.read_text()}"
            time.sleep(0.2)
        ray_processes = _descendants(pgid)
        os.killpg(pgid, signal.SIGKILL)  # the driver and its local Ray
        proc.wait(timeout=30)
        # The Train workers sit in process groups of their own; they must die with their
        # raylet, or they would go on writing checkpoints beside the resumed run.
        deadline = time.monotonic() + 60
        while (_group_alive(pgid) or _alive(ray_processes)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(ray_processes), "Ray processes outlived kill -9 of the driver's group"
    finally:
        if _group_alive(pgid):
            os.killpg(pgid, signal.SIGKILL)
        for pid in _alive(ray_processes):
            os.kill(pid, signal.SIGKILL)
    return log_path.read_text()


def test_kill9_after_first_checkpoint_then_resume_continues_the_same_run(ray_cluster, tmp_path, shapes_cache, caplog):
    run_dir = tmp_path / "run"
    snapshot = run_dir / "checkpoints" / "train" / "checkpoint_manager_snapshot.json"

    first = _kill9_after_first_checkpoint(_command(tmp_path, shapes_cache), tmp_path, snapshot)
    assert not re.search(r"^epoch 2/2 ", first, re.M), "the kill came too late to test anything"
    assert (run_dir / "mlflow_run_id").is_file()
    run_id = (run_dir / "mlflow_run_id").read_text().strip()

    # The same run without resume=true refuses to train over it, before Ray starts (in-process:
    # the command line prints a ConfigError as one line and exits 2, as test_eval and
    # test_predict check for theirs).
    with pytest.raises(ConfigError, match="already holds a run's checkpoints") as refused:
        train(_config(tmp_path, shapes_cache), run_dir)
    assert "resume=true" in str(refused.value) and isinstance(refused.value, USER_ERRORS)

    # Run again with resume=true: in-process, on the test session's Ray (a second command line
    # would add a Ray start and the imports, not behaviour). With anchors=auto it continues
    # with its checkpoint's anchors: a new fit (5 sizes here) would not fit its RPN.
    with caplog.at_level(logging.INFO, logger="detexp"):
        train(_config(tmp_path, shapes_cache, "resume=true", "model.anchor_sizes=auto", "model.anchor_ratios=auto"), run_dir)
    said = [r.getMessage() for r in caplog.records]
    text = "\n".join(said)
    first_model = OmegaConf.load(run_dir / "config.yaml").model  # as the killed run trained it
    assert (f"anchors of the checkpoint this run continues: sizes {list(first_model.anchor_sizes)}, "
            f"ratios {list(first_model.anchor_ratios)}") in said, text
    assert not any(line.startswith("anchors fitted") for line in said), text
    assert f"resuming MLflow run {run_id}" in said, text
    assert "resuming from the checkpoint of epoch 1/2" in text and "continues with epoch 2/2" in text, text
    assert not any(line.startswith("epoch 1/2 ") for line in said), text  # epoch 1 is not trained again
    assert any(line.startswith("epoch 2/2 ") for line in said), text
    caplog.clear()

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("detexp").experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]  # one MLflow run holds it all
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key in ("epoch", "train/loss", "train/lr", "train/images"):
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert steps == list(range(EPOCHS)), (key, steps)  # every epoch, exactly once
    lrs = {m.step: m.value for m in client.get_metric_history(run_id, "train/lr")}
    # The scheduler state came back with the checkpoint: a fresh MultiStepLR would give LR again.
    assert lrs[1] == pytest.approx(LR * GAMMA)
    assert len(client.get_metric_history(run_id, "data/train_images")) == 1
    assert (run_dir / "model_final.pt").is_file()

    # Resuming a finished run trains nothing (and starts no Ray) and leaves the history alone.
    with caplog.at_level(logging.INFO, logger="detexp"):
        done = train(_config(tmp_path, shapes_cache, "resume=true"), run_dir)
    # the data it found and the anchors it keeps
    said = [r.getMessage() for r in caplog.records if not r.getMessage().startswith(("dataset ", "anchors of "))]
    assert said[0] == f"resuming MLflow run {run_id}" and "has finished all 2 epochs already" in said[1], said
    assert not any(line.startswith("epoch ") for line in said), said  # nothing trained
    assert done["run_id"] == run_id and done["checkpoint"].endswith("model_final.pt")
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == list(range(EPOCHS))
    assert client.get_run(run_id).info.status == "FINISHED"
