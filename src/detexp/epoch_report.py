"""The keys of the report every Ray Train worker sends once per epoch (``ray.train.report``),
shared by the worker loop that writes it and the driver, Ray Tune and the checkpoint
keeper that read it. Besides these, a report holds the epoch's metrics by their MLflow
names (``train/loss``, ``val/map_50``, ...)."""

EPOCH = "epoch"  # the epoch just trained, 0-based
EPOCHS_DONE = "epochs_done"  # epochs trained in all (what ASHA counts, also across a resume)
# Sent instead of an epoch's metrics when the loss diverged: {"step", "rank", "losses"}.
DIVERGED = "diverged"
IMPROVED = "improved"  # the epoch just trained is the new best by schedule.monitor
STOPPED_EARLY = "stopped_early"  # patience ran out after it (the last report of the run)
BEST_EPOCH = "best/epoch"
BEST_VALUE = "best/value"
# Wall-clock time (time.time()) at which the epoch's first training step ended: the driver
# turns the first one it gets into the run's start-up, ``time/first_step_s``.
FIRST_STEP_AT = "first_step_at"
