"""``WorkerPlan``: what the driver decided for the Train workers of one run.

Ray Train's controller unpickles the plan with the run's other settings before it starts
any worker, so this module imports no torch (see :mod:`detexp.distributed.controller`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class WorkerPlan:
    """Everything a Train worker needs besides its dataset shards, decided on the driver."""

    cfg: dict[str, Any]  # the resolved train config, with the lr the workers train with
    steps_per_epoch: int | None = None  # of each worker (its train shard / batch size)
    shown: tuple[str, ...] = ()  # val image ids drawn in the end-of-training report's grid
    weights: dict[str, Any] = field(default_factory=dict)  # file name -> [object ref]: nodes without them
    # [object ref] of model.checkpoint's bytes, for nodes that do not see the driver's file;
    # None on one machine.
    start_weights: list[Any] | None = None
    # A Ray Queue to the driver: rank 0's progress within an epoch (with live_steps), a
    # stalled worker's last word (detexp.distributed.watchdog); None: no driver listens.
    events: Any = None
    live_steps: bool = False
