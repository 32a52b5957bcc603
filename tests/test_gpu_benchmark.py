"""benchmarks/gpu.py, the one-command GPU benchmark, run as ``--cpu-smoke`` in a subprocess:
every section of its JSON is there with positive numbers, so that the script still runs
the first time a GPU is lent. Needs no GPU: the smoke runs the same code on the CPU with
tiny sizes (its Ray Train run, which starts a local Ray of its own, is most of its time)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

# About 1-3 minutes on 2 cores (a local Ray of its own, Ray Train, Ray Data): the nox `slow`
# session runs it, so that the script still works the first time a GPU is lent.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu.py"


def _positive(row: dict, *keys: str) -> None:
    for key in keys:
        value = row[key]
        assert isinstance(value, int | float) and math.isfinite(value) and value > 0, (key, row)


def _check_rows(rows: list[dict], name: str) -> None:
    assert rows, f"{name}: no configurations"
    ran = [r for r in rows if r["status"] == "ok"]
    assert ran, f"{name}: none ran: {[r['status'] for r in rows]}"
    for row in rows:
        if row["precision"] == "fp16":  # needs CUDA: recorded, not run
            assert row["status"].startswith("skipped (fp16"), row
        else:
            assert row["status"] == "ok", row
    for row in ran:
        _positive(row, "images_per_s", "images", "steps", "seconds", "min_size", "max_size", "rss_mib")
        assert row["peak_gpu_mib"] is None  # the CPU has none to report


def test_cpu_smoke_writes_every_section(tmp_path):
    out = tmp_path / "gpu.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-smoke", "--json", str(out), "--workdir", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())

    meta = report["meta"]
    assert meta["mode"] == "cpu-smoke" and "--cpu-smoke" in meta["command"]
    for key in ("torch", "torchvision", "ray", "device_name", "date", "git_commit"):
        assert meta[key], key
    _positive(meta, "cpu_count", "wall_s")
    assert meta["errors"] == 0
    for anchor in report["anchors"].values():
        _positive(anchor, "images_per_s")

    assert report["dataset"]["status"] == "ok"
    _positive(report["dataset"], "train_images", "held_images", "objects_held", "mean_jpeg_kib", "decode_to_tensors_s")

    _check_rows(report["train"], "train")
    assert {r["precision"] for r in report["train"] if r["status"] == "ok"} == {"fp32", "bf16"}
    assert all(math.isfinite(r["loss"]) for r in report["train"] if r["status"] == "ok")

    ray_row = report["ray_train"]
    assert ray_row["status"] == "ok", ray_row
    _positive(ray_row, "images_per_s", "bare_images_per_s", "ratio_to_bare", "data_wait_share", "train_call_s")
    assert ray_row["data_wait_share"] < 1
    assert [e["epoch"] for e in ray_row["epochs"]] == [ray_row["timed_epoch"]]

    _check_rows(report["inference"], "inference")
    assert any(r["folded"] and r["status"] == "ok" and r["batchnorms_folded"] > 0 for r in report["inference"])
    assert {(r["folded"], r["precision"]) for r in report["inference"] if r["status"] == "ok"} == {
        (False, "fp32"), (True, "fp32"), (True, "bf16")}

    _check_rows(report["mobilenet"]["train"], "mobilenet train")
    _check_rows(report["mobilenet"]["inference"], "mobilenet inference")

    summary = report["summary"]
    _positive(summary, "resnet50_fp32_batch2_images_per_s", "resnet50_best_amp_images_per_s")
    assert summary["goal_met"] is None  # not judged on a CPU
    assert "ray_train (" in proc.stdout and "anchors" in proc.stdout
