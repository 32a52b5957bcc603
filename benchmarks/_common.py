"""Helpers shared by the benchmark scripts (not a benchmark itself).

The scripts run as ``python benchmarks/<name>.py``, so this folder is first on
``sys.path`` and they import this module as ``_common``.
"""

from __future__ import annotations

import io
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# --------------------------------------------------------------------------- memory


def rss_mib() -> float:
    """This process's resident set size (Linux /proc; no psutil needed)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _tree() -> list:
    import psutil

    me = psutil.Process()
    return [me, *me.children(recursive=True)]


def tree_rss_bytes() -> tuple[int, int]:
    """(summed RSS, number of processes) of this process and all its descendants.

    A local Ray started by this process (``ray.init``) runs its GCS, raylet and every
    ``ray::`` worker as descendants of it, so this is "the driver plus all Ray worker
    processes" of this session, and never another job's Ray on the same machine. RSS
    counts shared pages (the object store's shared memory, the torch libraries) once in
    every process that maps them; :class:`PeakTreeRSS` also samples PSS, which does not."""
    import psutil

    total, count = 0, 0
    for proc in _tree():
        try:
            total += proc.memory_info().rss
            count += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return total, count


def _label(proc) -> str:
    """A short name for a process: ``ray::Actor`` titles as they are, else the program."""
    try:
        cmdline = proc.cmdline()
    except Exception:  # noqa: BLE001 - gone, or not ours to read
        return "?"
    if cmdline and cmdline[0].startswith("ray::"):
        return cmdline[0].split()[0]
    program = [Path(part).name for part in cmdline[:3] if not part.startswith("-")]
    return " ".join(program)[:60] or proc.name()


class PeakTreeRSS(threading.Thread):
    """Samples the summed RSS of this process and its descendants (:func:`tree_rss_bytes`)
    every ``period`` seconds until :meth:`finish`, and their summed PSS (proportional set
    size: shared pages divided among the processes that map them; slower to read) every
    ``pss_every`` samples. Keeps the per-process RSS at the RSS peak."""

    def __init__(self, period: float = 0.2, pss_every: int = 5):
        super().__init__(daemon=True, name="peak-rss")
        self.period, self.pss_every = period, pss_every
        self.samples: list[tuple[float, int, int]] = []  # (seconds, RSS bytes, processes)
        self.pss_samples: list[tuple[float, int]] = []  # (seconds, PSS bytes)
        self.at_peak: list[tuple[str, int]] = []  # (process, RSS bytes) at the RSS peak
        self._stop_event = threading.Event()
        self.t0 = time.perf_counter()

    def _sample(self, with_pss: bool) -> None:
        import psutil

        rss, pss, per_process = 0, 0, []
        for proc in _tree():
            try:
                if with_pss:
                    info = proc.memory_full_info()
                    pss += info.pss
                else:
                    info = proc.memory_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            rss += info.rss
            per_process.append((proc, info.rss))
        now = time.perf_counter() - self.t0
        if not self.samples or rss > self.peak_bytes:  # names now: a Ray worker's title changes
            self.at_peak = sorted(((_label(p), r) for p, r in per_process), key=lambda item: -item[1])
        self.samples.append((now, rss, len(per_process)))
        if with_pss:
            self.pss_samples.append((now, pss))

    def run(self) -> None:
        n = 0
        while True:
            self._sample(with_pss=n % self.pss_every == 0)
            n += 1
            if self._stop_event.wait(self.period):
                return

    def finish(self) -> None:
        self._stop_event.set()
        self.join()

    @property
    def peak_bytes(self) -> int:
        return max(s[1] for s in self.samples)

    @property
    def peak_pss_bytes(self) -> int:
        return max(s[1] for s in self.pss_samples)

    @property
    def max_processes(self) -> int:
        return max(s[2] for s in self.samples)


# --------------------------------------------------------------------------- configs


def compose(overrides: Sequence[str] = (), config_name: str = "train"):
    """Compose a config exactly as ``python -m detexp <command>`` would (as tests/conftest.py)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import detexp
    from detexp.config import register_configs

    register_configs()
    conf_dir = str(Path(detexp.__file__).parent / "conf")
    with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


# --------------------------------------------------------------------------- data


def load_batches(root: Path, batch_size: int, count: int):
    """The first ``batch_size * count`` images of a shapes folder, decoded by the pipeline's
    own ``decode_batch`` + ``batch_to_tensors`` and held in memory, as training batches."""
    from detexp.data.annotations import _read_annotations
    from detexp.data.pipeline import batch_to_tensors, decode_batch
    from detexp.data.shapes import SHAPES_CLASSES

    ids = [f"{i + 1:06d}" for i in range(batch_size * count)]
    table = _read_annotations(str(root), ids, SHAPES_CLASSES)
    images, targets = batch_to_tensors(decode_batch(table, str(root)))
    return [
        (images[i : i + batch_size], targets[i : i + batch_size]) for i in range(0, len(images), batch_size)
    ]


VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)
# VOC's common image sizes (width, height), divided by 8 so that the JPEG behind each XML
# costs next to nothing to open and decode: what is timed is the annotation side.
_TINY_SIZES = ((62, 46), (46, 62), (62, 41), (41, 62), (62, 35))
_POSES = ("Unspecified", "Frontal", "Left", "Right", "Rear")


def write_voc_annotations(root: Path, count: int, seed: int = 0) -> list[str]:
    """Write ``count`` VOC2012-style annotations (``2012_000001``...) with 1-5 objects each
    (VOC's own elements: folder, filename, source, size, segmented, and per object name,
    pose, truncated, occluded, difficult, bndbox; ``person`` objects sometimes with
    ``<part>`` boxes as in VOC's layout annotations), and a tiny JPEG of the size the XML
    states, plus ``ImageSets/Main/trainval.txt``. Returns the ids."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    jpegs = {}
    for w, h in _TINY_SIZES:
        buffer = io.BytesIO()
        Image.new("RGB", (w, h), (120, 110, 100)).save(buffer, "JPEG", quality=90)
        jpegs[(w, h)] = buffer.getvalue()
    ids = [f"2012_{i + 1:06d}" for i in range(count)]
    for image_id in ids:
        w, h = _TINY_SIZES[int(rng.integers(len(_TINY_SIZES)))]
        objects = []
        for _ in range(int(rng.integers(1, 6))):
            x0, y0 = int(rng.integers(1, w - 8)), int(rng.integers(1, h - 8))
            x1, y1 = int(rng.integers(x0 + 4, w + 1)), int(rng.integers(y0 + 4, h + 1))
            name = VOC_CLASSES[int(rng.integers(len(VOC_CLASSES)))]
            parts = ""
            if name == "person" and rng.random() < 0.3:
                parts = "".join(
                    f"\n\t\t<part>\n\t\t\t<name>{part}</name>\n\t\t\t<bndbox>\n\t\t\t\t<xmin>{x0}</xmin>\n"
                    f"\t\t\t\t<ymin>{y0}</ymin>\n\t\t\t\t<xmax>{x1}</xmax>\n\t\t\t\t<ymax>{y1}</ymax>\n"
                    "\t\t\t</bndbox>\n\t\t</part>"
                    for part in ("head", "hand", "foot")[: int(rng.integers(1, 4))]
                )
            objects.append(
                f"\t<object>\n\t\t<name>{name}</name>\n\t\t<pose>{_POSES[int(rng.integers(len(_POSES)))]}</pose>\n"
                f"\t\t<truncated>{int(rng.random() < 0.3)}</truncated>\n"
                f"\t\t<occluded>{int(rng.random() < 0.3)}</occluded>\n"
                f"\t\t<difficult>{int(rng.random() < 0.1)}</difficult>\n"
                f"\t\t<bndbox>\n\t\t\t<xmin>{x0}</xmin>\n\t\t\t<ymin>{y0}</ymin>\n"
                f"\t\t\t<xmax>{x1}</xmax>\n\t\t\t<ymax>{y1}</ymax>\n\t\t</bndbox>{parts}\n\t</object>\n"
            )
        xml = (
            f"<annotation>\n\t<folder>VOC2012</folder>\n\t<filename>{image_id}.jpg</filename>\n"
            "\t<source>\n\t\t<database>The VOC2012 Database</database>\n"
            "\t\t<annotation>PASCAL VOC2012</annotation>\n\t\t<image>flickr</image>\n\t</source>\n"
            f"\t<size>\n\t\t<width>{w}</width>\n\t\t<height>{h}</height>\n\t\t<depth>3</depth>\n\t</size>\n"
            f"\t<segmented>0</segmented>\n{''.join(objects)}</annotation>\n"
        )
        (root / "Annotations" / f"{image_id}.xml").write_text(xml, encoding="utf-8")
        (root / "JPEGImages" / f"{image_id}.jpg").write_bytes(jpegs[(w, h)])
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("".join(f"{i}\n" for i in ids))
    return ids


class BatchedVOCImages:
    """A map-style dataset for ``torch.utils.data.DataLoader`` whose items are batches:
    given a list of indices (a ``BatchSampler``'s), it does per image what detexp's Ray
    Data pipeline does: ``_read_annotations`` (the read tasks' function: ``parse_record``
    with ``verify_image=True``, into the annotation row), the ``ok`` filter of
    ``decode_images``, and ``decode_batch`` with the same flip probability. Returns the
    decoded ``pyarrow.Table``, as ``iter_batches(batch_format="pyarrow")`` does."""

    def __init__(self, root: str | Path, ids: Sequence[str], classes: Sequence[str], hflip_prob: float):
        self.root, self.ids, self.classes, self.hflip_prob = str(root), list(ids), tuple(classes), hflip_prob

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, indices):
        from detexp.data.annotations import _read_annotations
        from detexp.data.pipeline import decode_batch

        table = _read_annotations(self.root, [self.ids[i] for i in indices], self.classes)
        table = table.filter(table.column("ok"))
        return decode_batch(table, self.root, self.hflip_prob)


def cpu_count() -> int:
    """CPUs this process may run on (the affinity mask), else os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
