"""What ``eval``, ``predict`` and ``export`` share once their checkpoint is checked: the run
directory with its resolved config, Ray started and checked, and the MLflow run of the command."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from detexp.config import plain


def open_inference_run(
    command: str, eff: DictConfig, ckpt: Any, run_dir: Path, overrides: Sequence[str] | None,
    *, start_ray: bool = True,
) -> tuple[Any, str]:
    """Start ``command``'s run of checkpoint ``ckpt`` with the effective config ``eff`` in
    ``run_dir``: returns the tracker and the MLflow run id. The MLflow store is checked
    before Ray starts (a dead server is refused early); ``start_ray=False`` for a command
    that runs in this process only (export)."""
    from detexp.distributed import cluster
    from detexp.tracking.mlflow_runs import Tracker, command_line, default_run_name, inference_tags

    tracker = Tracker(eff.tracking.uri, eff.tracking.experiment)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(eff))
    if start_ray:
        cluster.start_ray(eff.scaling, eff.ray.address, eff.ray.verbose)
    run_id = tracker.start(
        default_run_name(eff, f"{command}-"), plain(eff),
        inference_tags(command, overrides, ckpt.path, ckpt.train_run_id),
        description=command_line(command, list(overrides or [])),
    )
    return tracker, run_id
