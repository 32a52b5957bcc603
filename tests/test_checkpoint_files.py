"""model_best.pt and model_final.pt are written whole or not at all: a copy that fails
leaves no half-written checkpoint under the name eval and predict look for, and says so."""

from __future__ import annotations

import logging

import pytest
import torch

from detexp.checkpoint.files import BEST_FILE, CHECKPOINT_FILE, BestModelFile, copy_checkpoint_file
from detexp.epoch_report import EPOCH, IMPROVED


def _ray_checkpoint_folder(path, epoch: int):
    path.mkdir(parents=True)
    torch.save({"epoch": epoch, "model": {"w": torch.full((4,), float(epoch))}}, path / CHECKPOINT_FILE)
    return path


def test_a_failed_copy_keeps_the_previous_file_and_leaves_no_partial_one(tmp_path):
    target = copy_checkpoint_file(_ray_checkpoint_folder(tmp_path / "epoch1", 1), tmp_path / "model_final.pt")
    with pytest.raises(FileNotFoundError):
        copy_checkpoint_file(tmp_path / "no_such_checkpoint", target)
    assert torch.load(target)["epoch"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]


def test_a_best_epoch_that_cannot_be_copied_is_reported_and_not_raised(tmp_path, caplog):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    best = BestModelFile(run_dir)
    best.update({EPOCH: 0, IMPROVED: True}, _ray_checkpoint_folder(tmp_path / "epoch0", 0))
    assert torch.load(best.existing())["epoch"] == 0

    (run_dir / BEST_FILE).unlink()
    (run_dir / BEST_FILE).mkdir()  # what a rename cannot replace, as a full or read-only disk would refuse
    with caplog.at_level(logging.WARNING, logger="detexp"):
        best.update({EPOCH: 1, IMPROVED: True}, _ray_checkpoint_folder(tmp_path / "epoch1", 1))
    assert f"could not write {run_dir / BEST_FILE} for the new best epoch 2" in caplog.text
    assert best.existing() is None  # no older epoch's weights under the best epoch's name
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".part")]
