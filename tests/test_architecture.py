"""The layers contract in pyproject.toml holds, and `lint-imports` catches the day it
does not: a lower module importing a higher one (which is also how import cycles start)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(src: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=src, env=env, capture_output=True, text=True, timeout=120,
    )


def test_the_package_keeps_its_layers():
    result = lint_imports(ROOT / "src")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_an_upward_import_is_refused(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "detexp", src / "detexp", ignore=shutil.ignore_patterns("__pycache__"))
    # The data layer reaching up into the train command closes a cycle (train -> data -> train).
    voc = src / "detexp" / "data" / "voc.py"
    voc.write_text(voc.read_text() + "\n\ndef _late():\n    from detexp.commands.train import train\n\n    return train\n")
    result = lint_imports(src)
    assert result.returncode != 0
    assert "detexp.data.voc -> detexp.commands.train" in result.stdout, result.stdout
