"""Load: a smoke training on 2,000 generated images of which 5% are broken in every way the
corpus knows. Nothing good may be lost on the way: used = total - bad, in training and in
validation. Slow (a few minutes on 2 cores): ``nox -s slow`` or ``pytest -m slow``."""

from __future__ import annotations

import csv
import logging
import time

import pytest
from mlflow.tracking import MlflowClient

from detexp.commands.train import train
from detexp.data.problems import MAX_TABLE_ROWS
from test_data_check import CLASSES_ARG, build_corpus

TOTAL, BAD_TRAIN, BAD_VAL = 2000, 95, 5  # 5% bad
NUM_VAL = 100


@pytest.mark.slow
def test_two_thousand_images_five_percent_bad_nothing_good_lost(ray_cluster, tmp_path, caplog):
    started = time.perf_counter()
    corpus = build_corpus(tmp_path, num_train=TOTAL - NUM_VAL, num_val=NUM_VAL, bad_train=BAD_TRAIN,
                          bad_val=BAD_VAL, legal=40, image_size=96, seed=5)
    built = time.perf_counter() - started
    assert corpus.total == TOTAL and len(corpus.bad) == BAD_TRAIN + BAD_VAL

    from conftest import compose_train

    cfg = compose_train([
        "+experiment=smoke", "dataset=voc", f"dataset.root={corpus.root}", CLASSES_ARG,
        "dataset.batch_size=8", "schedule.epochs=1", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
    ])
    with caplog.at_level(logging.INFO, logger="detexp"):
        result = train(cfg, tmp_path / "run")
    trained = time.perf_counter() - started - built

    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    metrics = client.get_run(result["run_id"]).data.metrics
    bad = len(corpus.bad)
    assert metrics["data/skipped"] == bad
    assert metrics["data/train_images"] + metrics["data/val_images"] == TOTAL - bad
    assert metrics["data/train_images"] == TOTAL - NUM_VAL - BAD_TRAIN
    assert metrics["train/images"] == metrics["data/train_images"]  # every good image trained on
    assert metrics["val/images"] == metrics["data/val_images"]  # and every good val image scored
    with (tmp_path / "run" / "data" / "skipped.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {row["image_id"] for row in rows} == set(corpus.bad)
    # The console shows a screenful of the table, in split order, and points at the CSV.
    assert f"and {len(rows) - MAX_TABLE_ROWS} more rows in" in caplog.text
    listed = corpus.train_ids + corpus.val_ids
    assert [r["image_id"] for r in rows] == sorted((r["image_id"] for r in rows), key=listed.index)
    print(f"\nstress: built {TOTAL} images in {built:.0f}s, trained+validated in {trained:.0f}s; "
          f"used {TOTAL - bad} of {TOTAL}, skipped {bad}")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_workers_stop_together_on_a_nonfinite_loss(ray_cluster, smoke_cfg, tmp_path):
    """With DDP, a rank that stopped alone would leave the other one waiting in the
    gradient all-reduce forever; the ranks agree on the step and both report it."""
    from detexp.errors import TrainingDivergedError

    cfg = smoke_cfg("dataset.synth.num_train=16", "dataset.synth.num_val=8", "scaling.num_workers=2",
                    "dataset.batch_size=2", "schedule.epochs=2", "schedule.lr_steps=[1]", "schedule.lr_gamma=1e6")
    with pytest.raises(TrainingDivergedError, match=r"non-finite loss in epoch 2/2 at step \d+"):
        train(cfg, tmp_path / "run")
    run = MlflowClient(tracking_uri=cfg.tracking.uri).get_run((tmp_path / "run" / "mlflow_run_id").read_text())
    assert run.info.status == "FAILED"
