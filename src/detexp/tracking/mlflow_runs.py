"""MLflow tracking: the only module that imports mlflow. Runs on the driver only.

A relative SQLite URI (the default ``sqlite:///mlflow.db``) is made absolute against the
directory the command was started from, so every process and the printed ``mlflow ui``
command point at the same file. Tune trials write to one SQLite store from several
processes at once; a write that finds the database locked is retried, not lost.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from detexp.errors import TrackingError

MODEL_ARTIFACT = "model"  # where a registered model's files live in its training run
# MLflow caps a param value at 6000 characters; longer values are truncated, with a mark.
_PARAM_MAX = 6000
_LOCKED_RETRIES = 10  # about 50 s of backoff in all: SQLite's lock is held for milliseconds


class _RetryingClient:
    """An MlflowClient whose calls are retried when another process holds SQLite's write
    lock (a locked write did not commit, so calling again is safe)."""

    def __init__(self, client: MlflowClient):
        self._client = client

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "_client":  # unpickling: no client yet
            raise AttributeError(name)
        method = getattr(self._client, name)
        if not callable(method):
            return method

        def call(*args, **kwargs):
            for attempt in range(_LOCKED_RETRIES + 1):
                try:
                    return method(*args, **kwargs)
                except Exception as exc:  # noqa: BLE001 - MLflow wraps SQLAlchemy's OperationalError
                    if "database is locked" not in str(exc) or attempt == _LOCKED_RETRIES:
                        raise
                    time.sleep(min(0.1 * 2**attempt, 10.0))
            return None

        return call


def resolve_uri(uri: str) -> str:
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).expanduser().resolve())
    if "://" not in uri:  # a plain folder: MLflow's file store
        return str(Path(uri).expanduser().resolve())
    return uri


def artifact_root(uri: str) -> str | None:
    """Artifacts of a SQLite store go beside the database file (MLflow would otherwise
    use ./mlruns of whatever directory the command ran in); servers choose their own."""
    if uri.startswith("sqlite:///"):
        return str(Path(uri[len("sqlite:///"):]).parent / "mlartifacts")
    return None


def check_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """Refuse an HTTP tracking server that does not answer, before any training starts."""
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        urllib.request.urlopen(url, timeout=timeout_s)  # noqa: S310 - the user's own server
    except urllib.error.HTTPError:
        return  # it answered (some servers have no /health); that is enough
    except (OSError, ValueError) as exc:
        raise TrackingError(
            f"tracking.uri={uri} does not answer ({getattr(exc, 'reason', exc)}); "
            "start the server or pick another tracking.uri"
        ) from None


def flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optimizer": {"lr": 0.02}}`` -> ``{"optimizer.lr": 0.02}``; lists stay whole."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def git_commit(cwd: str | Path = ".") -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"


class Tracker:
    """One MLflow run: params from the resolved config, per-epoch metrics, artifacts."""

    def __init__(self, uri: str, experiment: str):
        self.uri = resolve_uri(uri)
        check_reachable(self.uri)
        for name in ("mlflow", "alembic"):  # schema-migration chatter on a new store
            logging.getLogger(name).setLevel(logging.WARNING)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        self.client = _RetryingClient(MlflowClient(tracking_uri=self.uri))
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = (
            found.experiment_id
            if found
            else self.client.create_experiment(experiment, artifact_location=artifact_root(self.uri))
        )
        if found is None or EXPERIMENT_KIND_TAG not in found.tags:
            # MLflow's UI opens an experiment of this kind in its model-training view (runs,
            # metrics, charts), not the GenAI one (traces) it may guess for an untyped one.
            self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
        self.run_id: str | None = None
        self._monitor = None  # MLflow's system-metrics monitor, while one runs

    def start(
        self, run_name: str | None, params: Mapping[str, Any], tags: Mapping[str, str],
        description: str | None = None,
    ) -> str:
        tags = dict(tags)
        if description:
            tags["mlflow.note.content"] = description  # the run page's Description
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        flat = {k: _param(v) for k, v in flatten(params).items()}
        items = [Param(k, v) for k, v in flat.items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=items[i : i + 100])
        return self.run_id

    def resume(self, run_id: str) -> str:
        self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        return run_id

    def monitor_system(self, interval_s: float = 10.0) -> None:
        """Record CPU, memory, disk, network (and GPU, where NVML answers) of this machine
        as ``system/*`` metrics every ``interval_s`` until :meth:`end`, with MLflow's own
        monitor. A resumed run continues the steps it has."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)
        self._monitor = SystemMetricsMonitor(
            self.run_id, sampling_interval=interval_s, resume_logging=True, tracking_uri=self.uri
        )
        self._monitor.start()

    def log_metrics(self, metrics: Mapping[str, float], step: int, run_id: str | None = None) -> None:
        """Numbers of ``metrics`` at ``step``, into this run (or the run ``run_id`` of this store)."""
        items = [
            Metric(k, float(v), int(time.time() * 1000), step)
            for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        ]
        if items:
            self.client.log_batch(run_id or self.run_id, metrics=items)

    def logged_steps(self, key: str, run_id: str | None = None) -> set[int]:
        """Steps at which this run (or the run ``run_id``) already has ``key`` (a resumed run skips them)."""
        return {m.step for m in self.client.get_metric_history(run_id or self.run_id, key)}

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def __getstate__(self) -> dict:
        # Ray Tune pickles its callbacks (and this tracker with them): the monitor's thread
        # stays with the process that started it.
        return {**self.__dict__, "_monitor": None}

    def end(self, status: str = "FINISHED") -> None:
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            monitor.finish()  # flushes the samples it holds while the run is still RUNNING
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)

    def register_model(self, model: Any, checkpoint_file: Path, name: str) -> tuple[str, str]:
        """Log ``model`` (a torch module) with ``mlflow.pytorch`` under this run's ``model``
        artifact, with a tensor signature and the detexp checkpoint it came from as an extra
        file, and register it as a new version of ``name``. Returns ``(name, version)``."""
        import tempfile

        import mlflow.pytorch
        import numpy as np
        import torch
        from mlflow.exceptions import MlflowException
        from mlflow.models.signature import ModelSignature
        from mlflow.types.schema import Schema, TensorSpec

        # Faster R-CNN takes a batch of float images in [0, 1] of any size; it returns one dict
        # of boxes, labels and scores per image, which a tensor schema cannot describe.
        signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, -1, -1), "images")]))
        requirements = [f"torch=={torch.__version__.split('+')[0]}"]
        # Its warning about pickled models concerns whoever loads this flavour; detexp's own
        # eval/predict read the weights-only checkpoint stored beside it (docs/security.md).
        logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "model"
            mlflow.pytorch.save_model(
                model, local, signature=signature, extra_files=[str(checkpoint_file)], pip_requirements=requirements,
                serialization_format="pickle",  # "pt2" would trace the model with an example input
            )
            self.client.log_artifacts(self.run_id, str(local), MODEL_ARTIFACT)
        try:
            self.client.create_registered_model(name)
        except MlflowException as exc:
            if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
                raise
        source = f"{self.client.get_run(self.run_id).info.artifact_uri}/{MODEL_ARTIFACT}"
        version = self.client.create_model_version(name, source, run_id=self.run_id)
        return name, str(version.version)

    def end_run(self, run_id: str, status: str, tags: Mapping[str, str]) -> None:
        """Tag and end another run of this store (a Tune trial the scheduler stopped)."""
        for k, v in tags.items():
            self.client.set_tag(run_id, k, v)
        self.client.set_terminated(run_id, status=status)

    def run_name(self) -> str:
        return self.client.get_run(self.run_id).info.run_name

    def ui_command(self) -> str:
        """How to see this experiment in MLflow's UI, in its model-training view (the UI
        opens its GenAI view unless the address asks for the other)."""
        page = f"#/experiments/{self.experiment_id}?workflowType=machine_learning"
        if self.uri.startswith(("http://", "https://")):
            return f"open {self.uri.rstrip('/')}/{page}"
        return f"mlflow ui --backend-store-uri {self.uri} --host 127.0.0.1, then open http://127.0.0.1:5000/{page}"


def _param(value: Any) -> str:
    text = str(value)
    return text if len(text) <= _PARAM_MAX else text[: _PARAM_MAX - 3] + "..."


def default_run_name(cfg: Any, prefix: str = "") -> str:
    """``tracking.run_name``, else ``<prefix><model>-<dataset>-<yyyymmdd-hhmmss>``."""
    if cfg.tracking.run_name:
        return cfg.tracking.run_name
    return f"{prefix}{cfg.model.name}-{cfg.dataset.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _short_key(key: str) -> str:
    """A config key by its last part, without Hydra's ``+``/``~`` (``+optimizer.lr`` -> ``lr``)."""
    return key.lstrip("+~").rsplit(".", 1)[-1]


def short_overrides(overrides: Sequence[str]) -> str:
    """``key=value`` overrides as a run's name shows them in the MLflow UI: each key by its
    last part, numbers to 4 significant digits, lists without spaces
    (``optimizer.lr=0.018812 schedule.lr_steps=[8, 11]`` -> ``lr=0.01881 lr_steps=[8,11]``)."""
    shown = []
    for override in overrides:
        key, _, value = override.partition("=")
        with contextlib.suppress(ValueError):
            number = float(value)
            value = value if number.is_integer() and "." not in value and "e" not in value.lower() else f"{number:.4g}"
        shown.append(f"{_short_key(key)}={value.replace(' ', '')}")
    return " ".join(shown)


def sweep_run_name(command: str, keys: Sequence[str]) -> str:
    """A sweep's parent run name: what was swept and when (``tune lr,lr_steps 12-03 10:55``)."""
    swept = ",".join(_short_key(k) for k in keys) or "sweep"
    return f"{command} {swept} {time.strftime('%m-%d %H:%M')}"


def command_line(command: str, overrides: Sequence[str]) -> str:
    """The command that reproduces a run, for its MLflow description."""
    return " ".join(["python -m detexp", command, *(shlex.quote(o) for o in overrides)])


def download_model(uri: str, tracking_uri: str) -> tuple[Path, str | None]:
    """Fetch a registered model (``models:/NAME/VERSION``, ``models:/NAME/latest`` or
    ``models:/NAME@alias``) from the store at ``tracking_uri``; returns the detexp
    checkpoint it holds and the training run it came from."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    store = resolve_uri(tracking_uri)
    name, _, ref = uri[len("models:/"):].partition("/")
    # The version is resolved with a client of this store: mlflow's own models:/ resolution
    # would ask the process-wide registry URI instead.
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    try:
        if "@" in name:
            name, alias = name.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        elif ref == "latest":
            versions = client.search_model_versions(f"name='{name}'")
            if not versions:
                raise MlflowException(f"Registered Model with name={name} not found")
            version = max(versions, key=lambda v: int(v.version))
        else:
            version = client.get_model_version(name, ref)
        source = client.get_model_version_download_uri(name, version.version)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, tracking_uri=store))
    except (MlflowException, OSError, ValueError) as exc:
        raise TrackingError(
            f"checkpoint={uri}: not found in the MLflow store {tracking_uri} ({str(exc).splitlines()[0]})"
        ) from None
    files = sorted((local / "extra_files").glob("*.pt"))
    if not files:
        raise TrackingError(f"checkpoint={uri}: a model that `detexp train tracking.register_model=...` did not register")
    return files[0], version.run_id


def default_tags(command: str, overrides: list[str]) -> dict[str, str]:
    tags = {"detexp.command": command, "detexp.overrides": " ".join(overrides) or "(none)"}
    commit = git_commit(os.getcwd())
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def inference_tags(command: str, overrides: list[str] | None, checkpoint: Any, train_run_id: str | None) -> dict[str, str]:
    """Tags of an ``eval`` or ``predict`` run: which checkpoint, and the training run it came from."""
    tags = {**default_tags(command, list(overrides or [])), "detexp.checkpoint": str(checkpoint)}
    if train_run_id:
        tags["detexp.train_run_id"] = train_run_id
    return tags
