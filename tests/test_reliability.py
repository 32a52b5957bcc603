"""Failures a long run meets: a Ray Train worker killed mid-epoch, a loss that diverges, a
tracking server that does not answer, boxes torchvision cannot take; and the security rules
(safe checkpoint loading, dataset files only from inside dataset.root)."""

from __future__ import annotations

import ast
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

import detexp
from detexp.commands.train import train
from detexp.engine.loops import (
    InvalidTargetError,
    NonFiniteLossError,
    check_targets,
    train_one_epoch,
)
from detexp.errors import USER_ERRORS, TrackingError, TrainingDivergedError
from detexp.tracking.mlflow_runs import check_reachable

SRC = Path(detexp.__file__).parent
REPO = SRC.parent.parent
TINY = ("dataset.synth.num_train=16", "dataset.synth.num_val=8")
NO_VAL = "dataset.val_split=null"  # these tests are about training; validation only costs time


def _steps(client, run_id, key):
    return sorted(m.step for m in client.get_metric_history(run_id, key))


# --------------------------------------------------------------------------- worker faults


def _train_worker_pids() -> set[int]:
    """Pids of the live RayTrainWorker actors. The state API needs Ray's dashboard, which
    detexp does not start; the GCS actor table answers without it."""
    import ray
    from ray.util.state import list_actors

    try:
        actors = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
        return {a.pid for a in actors}
    except Exception:  # noqa: BLE001 - no dashboard: ask the GCS directly
        table = ray._private.state.actors().values()
        return {a["Pid"] for a in table if a["ActorClassName"] == "RayTrainWorker" and a["State"] == "ALIVE"}


def test_worker_killed_mid_epoch_run_finishes_from_last_checkpoint(ray_cluster, smoke_cfg, tmp_path, caplog):
    epochs = 2
    cfg = smoke_cfg(*TINY, NO_VAL, f"schedule.epochs={epochs}", "scaling.max_failures=1")
    run_dir = tmp_path / "run"
    snapshot = run_dir / "checkpoints" / "train" / "checkpoint_manager_snapshot.json"
    killed: list[int] = []

    def kill_a_worker_after_the_first_checkpoint():
        deadline = time.monotonic() + 400
        while not snapshot.is_file() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # into epoch 2: its data iterator alone takes longer to start
        for pid in _train_worker_pids():
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    killer = threading.Thread(target=kill_a_worker_after_the_first_checkpoint, daemon=True)
    killer.start()
    with caplog.at_level(logging.INFO, logger="detexp"):
        result = train(cfg, run_dir)
    killer.join(timeout=5)

    assert killed, "no RayTrainWorker was found to kill"
    text = caplog.text
    assert "restarting the workers from the checkpoint of epoch 1/2" in text, text
    assert "failure 1 of scaling.max_failures=1" in text
    assert "trained again" not in text  # resumed from the checkpoint, not from scratch
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    for key in ("epoch", "train/loss", "train/images"):
        assert _steps(client, run.info.run_id, key) == list(range(epochs)), key
    assert torch.load(result["checkpoint"], map_location="cpu", weights_only=True)["epoch"] == epochs - 1
    assert not set(killed) & _train_worker_pids()


def test_a_pipeline_without_a_cpu_fails_within_the_stall_timeout_saying_why(ray_cluster, smoke_cfg, tmp_path):
    """Another job holds the CPU the run kept for decoding (the worker holds the other one):
    the first batch never comes, and instead of waiting for ever the worker fails after
    trainer.stall_timeout_s, naming what it waited for and the CPUs free."""
    from detexp.errors import WorkerStalledError

    cpus = int(ray_cluster.cluster_resources()["CPU"])

    @ray_cluster.remote(num_cpus=cpus - 1)
    class OtherJob:
        def ready(self) -> bool:
            return True

    other = OtherJob.remote()
    ray_cluster.get(other.ready.remote())
    cfg = smoke_cfg(*TINY, NO_VAL, "scaling.cpus_per_worker=1", "trainer.stall_timeout_s=20")
    started = time.monotonic()
    try:
        with pytest.raises(WorkerStalledError) as stalled:
            train(cfg, tmp_path / "run")
    finally:
        ray_cluster.kill(other)
    assert time.monotonic() - started < 150  # start-up, the 20 s, Ray Train's failure handling
    message = str(stalled.value)
    assert "worker 0: no progress for 2" in message and "(trainer.stall_timeout_s=20)" in message
    assert "waiting for batch 1 of training epoch 1/2 from the data pipeline" in message
    assert f"0 of the cluster's {cpus} CPUs are free" in message
    assert "continue with resume=true" in message
    run = MlflowClient(tracking_uri=cfg.tracking.uri).get_run((tmp_path / "run" / "mlflow_run_id").read_text())
    assert run.info.status == "FAILED"


# --------------------------------------------------------------------------- divergence


def test_nonfinite_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(ray_cluster, smoke_cfg, tmp_path):
    # Epoch 1 trains normally; then MultiStepLR multiplies lr 0.02 by 1e6: SGD blows up for real.
    cfg = smoke_cfg(*TINY, NO_VAL, "dataset.batch_size=2", "schedule.epochs=2", "schedule.lr_steps=[1]",
                    "schedule.lr_gamma=1e6")
    run_dir = tmp_path / "run"

    with pytest.raises(TrainingDivergedError) as info:
        train(cfg, run_dir)

    message = str(info.value)
    assert isinstance(info.value, USER_ERRORS)  # the CLI prints it as one line and exits 2
    assert "\n" not in message
    assert "non-finite loss in epoch 2/2 at step" in message, message
    assert "loss_classifier=" in message and "loss_box_reg=" in message
    assert "last good checkpoint (epoch 1/2)" in message
    good = [p for p in (run_dir / "checkpoints" / "train").glob("checkpoint_*") if (p / "checkpoint.pt").is_file()]
    assert len(good) == 1 and str(good[0]) in message
    state = torch.load(good[0] / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (run_dir / "model_final.pt").exists()

    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    run = client.get_run((run_dir / "mlflow_run_id").read_text())
    assert run.info.status == "FAILED"
    assert _steps(client, run.info.run_id, "train/loss") == [0]  # the diverged epoch is not logged


class _Toy(torch.nn.Module):
    """A 'detector' whose loss dict is ``scale * w . x`` (gradient = scale * x)."""

    def __init__(self, scale: float):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(4))
        self.scale = scale

    def forward(self, images, targets):
        return {"loss_a": self.scale * (self.w * torch.stack(images).mean(0)).sum()}


def _batches(n=3, value=1.0):
    target = {"boxes": torch.tensor([[1.0, 1.0, 5.0, 5.0]]), "labels": torch.tensor([1]), "image_id": "a"}
    return [([torch.full((4,), value)], [target]) for _ in range(n)]


def test_engine_stops_before_the_step_on_a_nonfinite_loss():
    model = _Toy(scale=1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = _batches(2) + _batches(1, value=float("nan"))
    with pytest.raises(NonFiniteLossError) as info:
        train_one_epoch(model, optimizer, batches, epoch=4)
    assert (info.value.epoch, info.value.step) == (4, 2)
    assert set(info.value.losses) == {"loss_a", "loss"}
    assert torch.isfinite(model.w).all()  # the NaN batch never reached the weights


def test_grad_clip_norm_bounds_each_update():
    def step_norm(clip):
        model = _Toy(scale=1e6)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        train_one_epoch(model, optimizer, _batches(1), epoch=0, grad_clip_norm=clip)
        return float((model.w.detach() - 1).norm())

    assert step_norm(None) == pytest.approx(2e6)
    assert step_norm(0.5) == pytest.approx(0.5, rel=1e-4)


@pytest.mark.parametrize(
    ("box", "what"),
    [([5.0, 5.0, 5.0, 9.0], "no area"), ([9.0, 5.0, 2.0, 9.0], "no area"), ([1.0, float("nan"), 4.0, 4.0], "finite")],
)
def test_boxes_torchvision_would_assert_on_are_named(box, what):
    good = {"boxes": torch.tensor([[0.0, 0.0, 3.0, 3.0]]), "image_id": "ok"}
    bad = {"boxes": torch.tensor([[0.0, 0.0, 3.0, 3.0], box]), "image_id": "2008_000123"}
    check_targets([good, {"boxes": torch.zeros(0, 4), "image_id": "negative"}])
    with pytest.raises(InvalidTargetError, match=rf"'2008_000123': box 2 .*{what}"):
        check_targets([good, bad])


# --------------------------------------------------------------------------- tracking server


def test_refused_connection_names_the_uri_at_once():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    started = time.monotonic()
    with pytest.raises(TrackingError, match=rf"tracking.uri=http://127.0.0.1:{port} does not answer"):
        check_reachable(f"http://127.0.0.1:{port}")
    assert time.monotonic() - started < 5


def test_silent_tracking_server_is_refused_before_ray_starts(smoke_cfg, tmp_path):
    """A server that accepts the connection and never answers (a hung proxy, a firewall
    that swallows packets): training gives up within a minute, naming the URI, with an
    error the command line prints as its one line."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)  # accepted by the kernel, never read or answered
        uri = f"http://127.0.0.1:{server.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(TrackingError) as info:
            train(smoke_cfg(f"tracking.uri={uri}"), tmp_path / "run")
        took = time.monotonic() - started
    assert took < 60
    assert f"tracking.uri={uri} does not answer" in str(info.value)
    assert isinstance(info.value, USER_ERRORS) and "\n" not in str(info.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


# --------------------------------------------------------------------------- security


def _calls(name: str):
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if called == name:
                    yield path, node


def test_every_torch_load_is_weights_only():
    loads = list(_calls("load"))
    torch_loads = [(p, n) for p, n in loads if isinstance(n.func, ast.Attribute) and getattr(n.func.value, "id", "") == "torch"]
    assert torch_loads, "expected torch.load calls in src/detexp"
    for path, node in torch_loads:
        flags = {k.arg: k.value for k in node.keywords}
        assert "weights_only" in flags, f"{path}:{node.lineno}"
        assert isinstance(flags["weights_only"], ast.Constant) and flags["weights_only"].value is True, f"{path}:{node.lineno}"
    for path in SRC.rglob("*.py"):  # nor any other unpickling of files
        assert "import pickle" not in path.read_text() and "cloudpickle" not in path.read_text(), path


def test_docs_say_how_to_keep_mlflow_private():
    text = (REPO / "docs" / "security.md").read_text()
    assert "--host 127.0.0.1" in text
    assert "basic-auth" in text and "reverse proxy" in text
    assert "weights_only=True" in text


def test_a_worker_error_is_told_in_one_line():
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    from detexp.distributed.controller import describe_failure

    try:
        raise ValueError("Key 'foo' not in 'ModelConfig'\n    full_key: model.foo\n    object_type=dict")
    except ValueError as exc:
        wrapped = UserExceptionWithTraceback(exc, "Traceback (most recent call last):\n  ...\nValueError: ...\nobject_type=dict")
    assert describe_failure(wrapped) == "ValueError: Key 'foo' not in 'ModelConfig'"
    died = RuntimeError("The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR "
                        "Worker exit detail: Worker unexpectedly exits with a connection error code 2. " + "x" * 200)
    assert describe_failure(died) == "The actor is dead because its worker process has died. ..."
