"""The command line as a user meets it: ``--help`` of the program and of each command, the
``detexp`` console script, and help piped into ``head``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from detexp.__main__ import COMMANDS

CONSOLE_SCRIPT = Path(sys.executable).with_name("detexp")


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_help_lists_every_command_with_a_line_each(tmp_path):
    out = _run(sys.executable, "-m", "detexp", "--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for words in COMMANDS:
        name = " ".join(words)
        line = next((line for line in lines if line.strip().startswith(name + " ")), None)
        assert line is not None, f"{name} missing from --help"
        assert len(line.split(maxsplit=len(words))[-1]) > 20, f"{name} has no description"


@pytest.mark.parametrize("command", ["train", "tune", "eval", "data show"])
def test_command_help_shows_its_groups_and_names_the_command(tmp_path, command):
    out = _run(sys.executable, "-m", "detexp", *command.split(), "--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"python -m detexp {command} [overrides...]")
    assert "dataset: coco, shapes, voc" in out.stdout
    assert "experiment: finetune, lr_sweep, smoke, voc_tutorial" in out.stdout


def test_help_piped_into_head_prints_no_traceback(tmp_path):
    # The reader closes the pipe after one line, long before Hydra's help (all the config) is written.
    proc = subprocess.Popen(
        [sys.executable, "-m", "detexp", "train", "--help"], cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    proc.stdout.readline()
    proc.stdout.close()
    stderr = proc.stderr.read()
    proc.wait(timeout=60)
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr


def test_console_script_works_like_python_m(tmp_path):
    assert CONSOLE_SCRIPT.is_file(), "pip install -e . installs the `detexp` script"
    args = ["train", "+experiment=smoke", "optimizer.lr=0.005", "--cfg", "job"]
    script = _run(str(CONSOLE_SCRIPT), *args, cwd=tmp_path)
    module = _run(sys.executable, "-m", "detexp", *args, cwd=tmp_path)
    assert script.returncode == 0, script.stderr
    assert script.stdout == module.stdout
    assert "lr: 0.005" in script.stdout
