"""``detexp serve``: the detector eval and predict run, behind HTTP on Ray Serve, until Ctrl-C.

The checkpoint and its effective config are resolved as for predict; the replicas are
those of :mod:`detexp.distributed.serving`, on a local Ray or the cluster at
``ray.address``. ``score_threshold`` is predict's: detections below it are not returned.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from detexp.checkpoint.effective_config import prepare_inference
from detexp.config import plain
from detexp.errors import ConfigError, MissingDependencyError

log = logging.getLogger("detexp")
INSTALL_SERVE = "pip install 'detexp[serve]'"


@dataclass
class Server:
    """A running ``detexp serve``: where it answers, and how to stop it."""

    url: str
    classes: list[str]
    deployed: Any

    def curl(self, image: str = "photo.jpg") -> str:
        return f"curl -s --data-binary @{image} -H 'Content-Type: image/jpeg' {self.url}"

    def stop(self) -> None:
        from detexp.distributed.serving import stop

        stop(self.deployed)


def serve(cfg: DictConfig, run_dir: str | Path, overrides: Sequence[str] | None = None) -> dict[str, Any]:
    """``detexp serve``: start the endpoint (:func:`start_server`), print its URL and a curl
    command, and serve until Ctrl-C (or SIGTERM); then take it down."""
    server = start_server(cfg, run_dir, overrides)
    log.info("serving %s on %s (%d replica(s)); POST a JPEG or PNG image, e.g.:\n  %s\nCtrl-C stops it.",
             cfg.checkpoint, server.url, cfg.serve.num_replicas, server.curl())
    started = time.monotonic()
    try:
        with _sigterm_as_interrupt():
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        log.info("stopping the endpoint")
    finally:
        server.stop()
    log.info("stopped after %.0f s", time.monotonic() - started)
    return {"url": server.url, "run_dir": str(Path(run_dir).resolve())}


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """``kill PID`` stops the endpoint as Ctrl-C does (its replicas taken down first)."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def start_server(cfg: DictConfig, run_dir: str | Path, overrides: Sequence[str] | None = None) -> Server:
    """Check the config and checkpoint (before Ray starts), start or join Ray, deploy the
    replicas and return once they answer. ``run_dir`` gets the effective config."""
    serving = _import_serving()
    settings = cfg.serve
    _check_settings(settings, cfg.score_threshold)
    ckpt, eff, state = prepare_inference(cfg, overrides)
    local = eff.ray.address is None and not os.environ.get("RAY_ADDRESS")
    if local:  # a cluster's proxy listens on its head node, not necessarily here
        serving.check_port_free(settings.host, settings.port)
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(eff))

    from detexp.distributed import cluster

    cluster.init_ray(eff.ray.address, eff.ray.verbose)
    gpus = settings.gpus_per_replica if settings.gpus_per_replica is not None else (1.0 if eff.scaling.use_gpu else 0.0)
    replicas = serving.Replicas(
        settings.num_replicas, float(eff.scaling.cpus_per_worker), float(gpus), eff.scaling.get("threads_per_worker"),
    )
    serving.check_replicas(replicas)
    classes = list(eff.dataset.classes)
    log.info("starting %d replica(s) of %s (%s)", replicas.count, ckpt.path, ", ".join(classes))
    deployed = serving.start(
        plain(eff.model), classes, state, replicas, host=settings.host, port=settings.port,
        score_threshold=float(eff.score_threshold),
        limits=serving.Limits(int(settings.max_bytes), int(settings.max_pixels)),
        max_batch_size=int(settings.max_batch_size), batch_wait_timeout_s=float(settings.batch_wait_timeout_s),
        verbose=bool(eff.ray.verbose),
    )
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    return Server(f"http://{host}:{settings.port}/", classes, deployed)


def _import_serving():
    try:
        from detexp.distributed import serving
    except ImportError as exc:  # ray[serve]'s own dependencies (fastapi, uvicorn, ...)
        raise MissingDependencyError(f"serve needs Ray Serve ({exc.name or exc} is missing): {INSTALL_SERVE}") from None
    return serving


def _check_settings(settings: Any, score_threshold: float) -> None:
    checks = (
        (settings.num_replicas >= 1, f"serve.num_replicas={settings.num_replicas} must be at least 1"),
        (settings.max_batch_size >= 1, f"serve.max_batch_size={settings.max_batch_size} must be at least 1"),
        (settings.batch_wait_timeout_s >= 0, f"serve.batch_wait_timeout_s={settings.batch_wait_timeout_s} must be 0 or more"),
        (1 <= settings.port <= 65535, f"serve.port={settings.port} must be a port number (1 to 65535)"),
        (settings.max_bytes >= 1, f"serve.max_bytes={settings.max_bytes} must be at least 1"),
        (settings.max_pixels >= 1, f"serve.max_pixels={settings.max_pixels} must be at least 1"),
        (settings.gpus_per_replica is None or settings.gpus_per_replica >= 0,
         f"serve.gpus_per_replica={settings.gpus_per_replica} must be 0 or more (or null: from scaling.use_gpu)"),
        (0.0 <= score_threshold <= 1.0, f"score_threshold={score_threshold} must be between 0 and 1"),
    )
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
