"""Ray on the driver: start or join a cluster quietly, refuse resource requests it cannot
meet and storage its nodes cannot reach, and ship files every node needs.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from detexp.errors import ResourceError

# Logical CPUs a local Ray keeps beyond the train workers, so that the Ray Data tasks
# that decode images always get scheduled (with none left, the pipeline would stall).
DATA_CPUS = 1

# glibc malloc settings for the processes of a local Ray (a user's own values win). Ray
# Train runs the training loop in a thread other than the main one; glibc gives such a
# thread its own arena of 64 MB heaps, and every step's activations were mmapped, freed and
# faulted in again. One arena (the main heap) with freed memory kept for the next step
# faults a tenth as often and steps about 8% faster (benchmarks/RESULTS.md). Memory freed
# after a peak is kept by the process instead of returned to the system.
MALLOC_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_TRIM_THRESHOLD_": str(16 << 30),
    "MALLOC_TOP_PAD_": str(256 << 20),
    "MALLOC_MMAP_THRESHOLD_": str(32 << 20),  # glibc's largest; bigger blocks are still mmapped
}


def quiet_ray(verbose: bool) -> None:
    """Keep Ray's internals out of the user's console unless asked for."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    level = logging.INFO if verbose else logging.ERROR
    for name in ("ray", "ray.data", "ray.train", "ray.tune", "ray.util"):
        logging.getLogger(name).setLevel(level)
    ray.data.DataContext.get_current().enable_progress_bars = verbose
    ray.data.DataContext.get_current().print_on_execution_start = verbose


def init_ray(address: str | None, verbose: bool = False) -> None:
    """Join the cluster at ``address``, or start a local one on this machine.

    A local Ray gets the machine's cores, and never fewer logical CPUs than the train
    workers need plus :data:`DATA_CPUS` for the data pipeline.
    """
    quiet_ray(verbose)
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {
        "log_to_driver": verbose,
        "logging_level": logging.INFO if verbose else logging.ERROR,
        "configure_logging": True,
        "include_dashboard": False,
    }
    if address is None:
        kwargs["num_cpus"] = (os.cpu_count() or 1) + DATA_CPUS
        # Ray Train's preemption watcher (an actor process) listens for a cloud node's
        # drain notice, which a local Ray on this machine never gets: one process fewer to
        # start, and to wake 100 times a second as every Ray worker process does (no
        # measurable speed-up by itself: benchmarks/RESULTS.md). Read by the controller,
        # which inherits this process's environment.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        for key, value in MALLOC_ENV.items():  # the Ray processes started here inherit them
            os.environ.setdefault(key, value)
    else:
        kwargs["address"] = address
    ray.init(**kwargs)


def check_resources(scaling: Any) -> None:
    """Fail at once, saying what was asked and what the cluster has, where Ray would
    otherwise wait forever for resources that will never come."""
    have = ray.cluster_resources()
    cpus, gpus = have.get("CPU", 0.0), have.get("GPU", 0.0)
    need_cpus = scaling.num_workers * scaling.cpus_per_worker + DATA_CPUS
    asked = (
        f"scaling.num_workers={scaling.num_workers} x scaling.cpus_per_worker="
        f"{scaling.cpus_per_worker} CPUs (+{DATA_CPUS} for data loading)"
    )
    if need_cpus > cpus:
        raise ResourceError(
            f"asked for {asked} = {need_cpus} CPUs, but the Ray cluster has {cpus:g} CPUs; "
            "lower scaling.num_workers or scaling.cpus_per_worker"
        )
    if scaling.use_gpu and scaling.num_workers > gpus:
        raise ResourceError(
            f"asked for scaling.num_workers={scaling.num_workers} GPU workers, but the Ray "
            f"cluster has {gpus:g} GPUs; lower scaling.num_workers or set scaling.use_gpu=false"
        )


def _worker_nodes() -> list[dict[str, Any]]:
    """Alive nodes that can host a Train worker (have CPUs)."""
    return [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]


@ray.remote(num_cpus=0)
def _probe(storage: str, token: str, dataset_root: str) -> str | None:
    """Runs on one node: can it read the driver's token in ``storage``, write its own
    there, and read ``dataset_root``? Returns what is wrong, or None."""
    import pyarrow.fs

    try:
        fs, base = pyarrow.fs.FileSystem.from_uri(storage) if "://" in storage else (pyarrow.fs.LocalFileSystem(), storage)
        with fs.open_input_stream(f"{base}/{token}") as f:
            f.read()
        with fs.open_output_stream(f"{base}/{token}.{ray.get_runtime_context().get_node_id()[:12]}") as f:
            f.write(b"ok")
    except Exception as exc:  # noqa: BLE001 - reported with the node's name
        return f"cannot use scaling.storage_path={storage} ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
    if not os.path.isdir(dataset_root) or not os.access(dataset_root, os.R_OK):
        return f"cannot read dataset.root={dataset_root}"
    return None


def check_storage(storage: str, dataset_root: Any, timeout_s: float = 60.0) -> None:
    """On a cluster of several nodes, fail before training unless every node that may host
    a worker can read and write the checkpoint storage and read the dataset: a worker that
    reports a checkpoint into a disk only it sees would fail only then, maybe hours in.
    The driver writes a token that each node must read (so a node-local path that merely
    exists everywhere is refused), and reads back each node's own."""
    import uuid

    import pyarrow.fs

    nodes = _worker_nodes()
    if len(nodes) < 2:
        return  # one machine: its own disk is shared by every worker
    fs, base = pyarrow.fs.FileSystem.from_uri(storage) if "://" in storage else (pyarrow.fs.LocalFileSystem(), storage)
    token = f".detexp-storage-check-{uuid.uuid4().hex[:8]}"
    try:
        fs.create_dir(base, recursive=True)
        with fs.open_output_stream(f"{base}/{token}") as f:
            f.write(b"ok")
    except Exception as exc:  # noqa: BLE001
        raise ResourceError(f"the driver cannot write scaling.storage_path={storage}: {exc}") from None
    probes = {
        n["NodeID"]: _probe.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(storage, token, str(dataset_root))
        for n in nodes
    }
    problems = []
    try:
        for node_id, ref in probes.items():
            name = next(f"{n['NodeManagerAddress']} ({node_id[:12]})" for n in nodes if n["NodeID"] == node_id)
            try:
                problem = ray.get(ref, timeout=timeout_s)
            except Exception as exc:  # noqa: BLE001 - a node that does not answer
                problem = f"did not answer the storage check ({type(exc).__name__})"
            if problem is None and fs.get_file_info(f"{base}/{token}.{node_id[:12]}").type != pyarrow.fs.FileType.File:
                problem = f"wrote into scaling.storage_path={storage}, but the driver cannot see it (not shared storage)"
            if problem:
                problems.append(f"node {name}: {problem}")
    finally:
        for path in [f"{base}/{token}"] + [f"{base}/{token}.{node_id[:12]}" for node_id in probes]:
            with contextlib.suppress(Exception):  # best effort clean-up
                fs.delete_file(path)
    if problems:
        raise ResourceError(
            "the cluster's nodes cannot all reach the run's storage or data; use a shared filesystem "
            "or a URI (s3://, gs://) for scaling.storage_path and a dataset.root every node mounts:\n  "
            + "\n  ".join(problems)
        )


def share_files(paths: list[Any]) -> dict[str, Any]:
    """File name -> object ref of its bytes, for files every worker node needs (model
    weights in the torch hub cache); empty on one machine, where they are on disk already."""
    if len(_worker_nodes()) < 2:
        return {}
    return {Path(p).name: [ray.put(Path(p).read_bytes())] for p in paths}
