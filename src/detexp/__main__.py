"""``python -m detexp <command> [hydra overrides]``: pick the command, hand the rest of
the command line to Hydra (so ``-m``, ``--cfg job`` and ``--help`` work as in any Hydra
app), and turn user errors into one line instead of a traceback."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from detexp.config import register_configs

USAGE = """\
usage: python -m detexp <command> [overrides...]

commands:
  train        train a detector (Ray Train), log to MLflow; -m sweeps as one MLflow parent run
  tune         Ray Tune search over train keys (ASHA, Optuna): tune tune.num_samples=N [tune.search_space=...]
  eval         mAP, per-class AP, PR curves of a checkpoint: eval checkpoint=PATH [dataset.val_split=...]
  predict      draw detections on images: predict checkpoint=PATH input=DIR_OR_IMAGE [score_threshold=0.5]
  export       TorchScript or ONNX file checked against the PyTorch model: export checkpoint=PATH format=torchscript|onnx
  serve        HTTP endpoint on Ray Serve (POST an image, get JSON detections): serve checkpoint=PATH [serve.port=8000]
  data synth   write the generated shapes dataset: data synth out=DIR [synth.num_train=N ...]
  data check   scan a dataset's splits for broken annotations and images
  data show    label statistics and ground-truth boxes drawn on a grid of images: data show [dataset=... grid_images=16]

Overrides are Hydra's: key=value, group=option, +experiment=NAME; add -m to sweep,
--cfg job to print the composed config, --help for a command's config groups.
Examples:
  python -m detexp train
  python -m detexp train +experiment=smoke scaling.num_workers=2
  python -m detexp train dataset=voc dataset.root=~/data/VOCdevkit/VOC2012 scaling.num_workers=8 scaling.use_gpu=true
  python -m detexp train -m optimizer.lr=0.01,0.02 schedule.lr_steps='[16,22]','[8,11]'
  python -m detexp tune +experiment=smoke tune.num_samples=4
  python -m detexp data check dataset=voc dataset.root=~/data/VOCdevkit/VOC2012
  python -m detexp data show dataset=voc dataset.root=~/data/VOCdevkit/VOC2012
  python -m detexp eval checkpoint=runs/train/2024-01-01_12-00-00/model_final.pt
  python -m detexp predict checkpoint=runs/train/2024-01-01_12-00-00 input=~/photos
  python -m detexp export checkpoint=runs/train/2024-01-01_12-00-00 format=onnx
  python -m detexp serve checkpoint=models:/shapes/1 serve.num_replicas=2
"""

log = logging.getLogger("detexp")
CONF_DIR = str(Path(__file__).resolve().parent / "conf")


def _run_train(cfg: DictConfig) -> dict:
    from detexp.commands.multirun import child_run_name, parent_tags
    from detexp.commands.train import train

    hc = HydraConfig.get()
    overrides = list(hc.overrides.task)
    if not cfg.tracking.run_name:  # a sweep's job is named by its values of the swept keys
        cfg.tracking.run_name = child_run_name(overrides)
    return train(cfg, hc.runtime.output_dir, overrides, tags=parent_tags(), started_at=_job_started_at())


_jobs_started = 0


def _job_started_at() -> float:
    """When this train job started: the process's start for the first job (imports and
    Hydra count), this moment for a later job of a ``-m`` sweep (it reuses them)."""
    global _jobs_started
    _jobs_started += 1
    if _jobs_started > 1:
        return time.time()
    import psutil

    return psutil.Process().create_time()


def _in_run_dir(module: str, function: str) -> Callable[[DictConfig], object]:
    """A command that takes (config, Hydra's run directory, the command line's overrides):
    ``detexp.commands.<module>.<function>``, imported when the command runs."""

    def run(cfg: DictConfig) -> object:
        import importlib

        hc = HydraConfig.get()
        command = getattr(importlib.import_module(f"detexp.commands.{module}"), function)
        return command(cfg, hc.runtime.output_dir, list(hc.overrides.task))

    return run


def _run_data_check(cfg: DictConfig) -> int:
    from detexp.commands.data_check import data_check

    errors = data_check(cfg)
    if errors:
        raise SystemExit(1)
    return errors


def _run_data_show(cfg: DictConfig) -> dict:
    from detexp.commands.data_show import data_show

    return data_show(cfg, HydraConfig.get().runtime.output_dir)


def _run_data_synth(cfg: DictConfig):
    from detexp.commands.data_synth import data_synth

    return data_synth(cfg)


# command words -> (config name, function of the composed config)
COMMANDS: dict[tuple[str, ...], tuple[str, Callable[[DictConfig], object]]] = {
    ("train",): ("train", _run_train),
    ("tune",): ("tune", _in_run_dir("tune", "tune")),
    ("eval",): ("eval", _in_run_dir("evaluate", "evaluate")),
    ("predict",): ("predict", _in_run_dir("predict", "predict")),
    ("export",): ("export", _in_run_dir("export", "export")),
    ("serve",): ("serve", _in_run_dir("serve", "serve")),
    ("data", "check"): ("train", _run_data_check),
    ("data", "show"): ("data_show", _run_data_show),
    ("data", "synth"): ("synth", _run_data_synth),
}


class JobFailed(Exception):
    """One job of a `-m` sweep failed with a user error (already printed); the sweep goes on."""


def _guarded(fn: Callable[[DictConfig], object]) -> Callable[[DictConfig], object]:
    def task(cfg: DictConfig):
        from hydra.types import RunMode

        from detexp.errors import USER_ERRORS

        try:
            return fn(cfg)
        except USER_ERRORS as exc:
            log.error("error: %s", exc)
            if HydraConfig.get().mode == RunMode.MULTIRUN:
                raise JobFailed(str(exc).splitlines()[0]) from None  # Hydra records it, runs the rest
            raise SystemExit(2) from None

    return task


def main(argv: list[str] | None = None) -> None:
    try:
        _main(argv)
    except BrokenPipeError:  # `... --help | head`: the reader has gone; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(1) from None


def _main(argv: list[str] | None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    words = next((w for w in COMMANDS if argv[: len(w)] == list(w)), None)
    if words is None:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"unknown command: {' '.join(argv[:2])}\n", file=sys.stderr)
            print(USAGE, file=sys.stderr)
            raise SystemExit(2)
        print(USAGE)
        return
    config_name, fn = COMMANDS[words]
    register_configs()
    sys.argv = [f"detexp {' '.join(words)}", *argv[len(words):]]
    os.environ["DETEXP_COMMAND"] = f"detexp {' '.join(words)}"  # named by the --help header
    try:
        # An absolute path: the `detexp` console script and `python -m detexp` find the same files.
        hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=config_name)(_guarded(fn))()
    except KeyboardInterrupt:
        _finish(interrupted=True)
        raise
    finally:
        _finish()


def _finish(interrupted: bool = False) -> None:
    """Close a sweep's parent run however the sweep ended, and stop the Ray this process
    started, so that no Ray process outlives the command."""
    if "detexp.commands.multirun" in sys.modules:
        sys.modules["detexp.commands.multirun"].finish_sweep(interrupted)
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()


if __name__ == "__main__":
    main()
