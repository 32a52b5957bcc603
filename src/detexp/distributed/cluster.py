"""Ray on the driver: start or join a cluster quietly, refuse resource requests it cannot
meet and storage its nodes cannot reach, and ship files every node needs.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from detexp.data.files import DataRoot, first_line
from detexp.errors import ResourceError

# CPUs a run keeps free of train workers, out of those Ray counts, so that the Ray Data
# tasks that decode images always get scheduled (with none left, the pipeline would stall).
DATA_CPUS = 1
COORDINATOR_EXPIRE_S = 180  # a reservation not renewed in this time lapses (a driver that died)

log = logging.getLogger("detexp")
_joined = False  # this process joined a cluster that others may be using (init_ray)

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


def detected_cpus() -> int:
    """This machine's CPUs as Ray counts them (a container's CPU quota included), and never
    more than this process may run on (its CPU affinity, e.g. ``taskset`` or a cpuset),
    which Ray's own count ignores."""
    from ray._private.utils import get_num_cpus

    count = int(get_num_cpus(override_docker_cpu_warning=True))
    with contextlib.suppress(AttributeError):  # no sched_getaffinity on macOS
        count = min(count, len(os.sched_getaffinity(0)))
    return max(count, 1)


def torch_threads(asked: int | None, sharing: int) -> int | None:
    """The torch threads of a Ray worker process: ``asked`` (``scaling.threads_per_worker``),
    but never more than this node's CPUs shared among the ``sharing`` processes of the run
    on it (more threads than cores only slows each step); ``None`` asked is the CPUs Ray
    reserved for the process (its OMP_NUM_THREADS), or None when Ray set none."""
    if not asked:
        reserved = os.environ.get("OMP_NUM_THREADS")
        return int(reserved) if reserved else None
    return max(min(int(asked), detected_cpus() // max(sharing, 1)), 1)


def init_ray(address: str | None, verbose: bool = False) -> None:
    """Join the cluster at ``address`` (or at ``RAY_ADDRESS`` when it is set), or start a
    local Ray of this machine's :func:`detected_cpus`, beside any Ray already running here.
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
    if address is None and os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]
        log.info("joining the Ray cluster at RAY_ADDRESS=%s (unset it to start a local Ray)", address)
    if address is None:
        # "local": a new Ray of its own even when another is running on this machine (a
        # `ray start --head`, a notebook's), which ray.init() would otherwise join.
        kwargs.update(address="local", num_cpus=detected_cpus())
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
    global _joined
    _joined = address is not None
    if _joined:
        have, free = ray.cluster_resources(), ray.available_resources()
        log.info("joined the Ray cluster at %s: %d node(s), %g of %g CPUs and %g of %g GPUs free",
                 address, len(_worker_nodes()), free.get("CPU", 0), have.get("CPU", 0),
                 free.get("GPU", 0), have.get("GPU", 0))


def usable_resources() -> tuple[dict[str, float], str]:
    """What a run may count on: a local Ray's whole cluster, or what a joined cluster has
    free now (other jobs may hold the rest); and the word for it in messages."""
    if _joined:
        return ray.available_resources(), "free"
    return ray.cluster_resources(), "in all"


def start_ray(scaling: Any, address: str | None, verbose: bool = False) -> None:
    """:func:`init_ray` for a run of ``scaling``'s workers, refusing what cannot be placed:
    a local Ray's CPUs before it starts (they are known), then against what Ray has."""
    if not ray.is_initialized() and address is None and not os.environ.get("RAY_ADDRESS"):
        _check_cpus(scaling, detected_cpus(), "on this machine")
    init_ray(address, verbose)
    check_resources(scaling)


def _check_cpus(scaling: Any, cpus: float, which: str) -> None:
    need_cpus = scaling.num_workers * scaling.cpus_per_worker + DATA_CPUS
    if need_cpus <= cpus:
        return
    share = math.floor((cpus - DATA_CPUS) / scaling.num_workers * 100) / 100
    raise ResourceError(
        f"asked for scaling.num_workers={scaling.num_workers} x scaling.cpus_per_worker="
        f"{scaling.cpus_per_worker:g} CPUs (+{DATA_CPUS} for data loading) = {need_cpus:g} CPUs, but "
        f"the Ray cluster has {cpus:g} CPUs {which}; lower scaling.num_workers"
        + (f", or reserve scaling.cpus_per_worker={share:g} CPUs each (workers may share a core; "
           "scaling.threads_per_worker sets their torch threads)" if share > 0 else "")
    )


def check_resources(scaling: Any) -> None:
    """Fail at once, saying what was asked and what the cluster has, where Ray would
    otherwise wait forever for resources that will never come."""
    have, which = usable_resources()
    cpus, gpus = have.get("CPU", 0.0), have.get("GPU", 0.0)
    _check_cpus(scaling, cpus, which)
    if scaling.use_gpu and scaling.num_workers > gpus:
        raise ResourceError(
            f"asked for scaling.num_workers={scaling.num_workers} GPU workers, but the Ray "
            f"cluster has {gpus:g} GPUs {which}; lower scaling.num_workers or set scaling.use_gpu=false"
        )


@contextlib.contextmanager
def data_cpus_kept(name: str) -> Iterator[None]:
    """Keep :data:`DATA_CPUS` out of what Ray Train's elastic scaling counts as room for
    workers, while the block runs: after a node is lost, it restarts with as many workers as
    the CPUs left hold, and one that took every CPU would leave the data pipeline none (its
    first batch would never come). Ray Train sizes the group by the reservations of Ray's
    autoscaling coordinator, which serves requests of equal priority first come, first
    served: this one is made before the trainer's, and renewed until the block ends."""
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            ResourceRequestPriority,
            get_or_create_autoscaling_coordinator,
        )
    except ImportError:  # another Ray: the restart may then take the data pipeline's CPU
        log.warning("this Ray has no autoscaling coordinator: an elastic restart may take the CPU "
                    "the data pipeline needs; keep a CPU of each node free of workers")
        yield
        return
    coordinator = get_or_create_autoscaling_coordinator()
    requester = f"detexp-data-{name}-{os.getpid()}"

    def request() -> None:
        ray.get(coordinator.request_resources.remote(
            requester_id=requester, resources=[{"CPU": DATA_CPUS}], expire_after_s=COORDINATOR_EXPIRE_S,
            priority=ResourceRequestPriority.HIGH,  # Ray Train's own priority
        ), timeout=30)

    request()
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(COORDINATOR_EXPIRE_S / 6):
            try:
                request()
            except Exception as exc:  # noqa: BLE001 - retried at the next renewal
                log.debug("could not renew the data pipeline's CPU reservation: %s", exc)

    thread = threading.Thread(target=renew, name="detexp-data-cpus", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        with contextlib.suppress(Exception):  # it expires by itself otherwise
            ray.get(coordinator.cancel_request.remote(requester), timeout=10)


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
    root = DataRoot(dataset_root)
    try:
        readable = root.is_dir()
    except Exception as exc:  # noqa: BLE001 - no credentials there, an unknown scheme, ...
        return f"cannot read dataset.root={dataset_root} ({type(exc).__name__}: {first_line(exc)})"
    if not readable or not (root.remote or os.access(dataset_root, os.R_OK)):
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
