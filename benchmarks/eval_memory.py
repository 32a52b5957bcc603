"""Driver memory of ``detexp eval`` over many images: does it stay flat?

Generates N small shapes images (``detexp.data.shapes.generate_shapes``) and a random-init
small detector saved as a detexp checkpoint, runs the real ``detexp.commands.evaluate.evaluate``
command function on them, and samples the driver's resident memory (RSS) every 0.2 s and
at every progress line. A random-init model is the worst case for the records the driver
keeps: torchvision's cap of 100 detections on every image.

    .venv/bin/python benchmarks/eval_memory.py                 # 5,000 images
    .venv/bin/python benchmarks/eval_memory.py --images 500    # a quick look

Prints RSS before the first prediction, as the images stream in, and at the peak (the
metric computation at the end), next to what the same images would take if the driver
held them decoded. Not a test: nothing here fails on a number.
"""

from __future__ import annotations

import argparse
import logging
import re
import tempfile
import threading
import time
from pathlib import Path

import torch
from _common import rss_mib  # benchmarks/, first on sys.path when run as a script
from omegaconf import OmegaConf


class Sampler(threading.Thread):
    """RSS every ``period`` seconds, and at each ``N/M images`` progress line of detexp."""

    def __init__(self, period: float = 0.2):
        super().__init__(daemon=True)
        self.period = period
        self.samples: list[tuple[float, float]] = []  # (seconds, MiB)
        self.progress: list[tuple[int, float]] = []  # (images done, MiB)
        self.stop = threading.Event()
        self.t0 = time.perf_counter()

    def run(self) -> None:
        while not self.stop.wait(self.period):
            self.samples.append((time.perf_counter() - self.t0, rss_mib()))

    def peak(self) -> float:
        return max(m for _, m in self.samples)


class _ProgressHandler(logging.Handler):
    pattern = re.compile(r"^\s*(\d+)/(\d+|\?) images")

    def __init__(self, sampler: Sampler):
        super().__init__()
        self.sampler = sampler

    def emit(self, record: logging.LogRecord) -> None:
        match = self.pattern.match(record.getMessage())
        if match:
            self.sampler.progress.append((int(match.group(1)), rss_mib()))


def write_checkpoint(path: Path, root: Path, classes: list[str], image_size: int) -> None:
    from detexp.checkpoint.files import CHECKPOINT_FORMAT
    from detexp.config import TrainConfig, plain
    from detexp.modeling.detector import build_detector

    cfg = OmegaConf.structured(TrainConfig)
    cfg.dataset.name, cfg.dataset.root, cfg.dataset.classes = "voc", str(root), classes
    cfg.model.min_size = cfg.model.max_size = image_size
    torch.manual_seed(0)
    model = build_detector(cfg.model, len(classes) + 1)
    torch.save(
        {
            "format": CHECKPOINT_FORMAT, "model": model.state_dict(), "epoch": 0, "classes": classes,
            "config": plain(cfg),  # plain strings, as train stores it (torch.load weights_only)
        },
        path,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the data here (default: a temp dir)")
    args = parser.parse_args()

    from hydra import compose, initialize_config_dir

    import detexp
    from detexp.commands import evaluate as ev
    from detexp.config import register_configs
    from detexp.data.shapes import SHAPES_CLASSES, generate_shapes
    from detexp.distributed import batch_inference

    logging.basicConfig(level=logging.INFO, format="%(relativeCreated)8.0f ms  %(message)s")
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="detexp-evalmem-"))
    root = work / "shapes"
    started = time.perf_counter()
    if not (root / "ImageSets" / "Main" / "val.txt").is_file() or len(
        (root / "ImageSets" / "Main" / "val.txt").read_text().split()
    ) != args.images:
        generate_shapes(root, num_train=1, num_val=args.images, image_size=args.image_size, seed=0)
    print(f"data: {args.images} images of ~{args.image_size} px in {root} ({time.perf_counter() - started:.0f}s)")
    ckpt = work / "model_final.pt"
    write_checkpoint(ckpt, root, list(SHAPES_CLASSES), 128)

    overrides = [
        f"checkpoint={ckpt}", f"tracking.uri=sqlite:///{work}/mlflow.db", f"batch_size={args.batch_size}",
        "grid_images=8",
    ]
    register_configs()
    with initialize_config_dir(config_dir=str(Path(detexp.__file__).parent / "conf"), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=overrides)

    batch_inference.PROGRESS_EVERY_S = 2.0  # progress lines (and RSS samples at them) every 2 s
    sampler = Sampler()
    logging.getLogger("detexp").addHandler(_ProgressHandler(sampler))
    before_start = rss_mib()
    sampler.start()
    t0 = time.perf_counter()
    result = ev.evaluate(cfg, work / "eval", overrides)
    seconds = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()

    detections = sum(1 for _ in (work / "eval" / "predictions.jsonl").open())
    progress = sampler.progress
    print()
    print(f"driver RSS before eval (imports, no Ray yet):   {before_start:8.1f} MiB")
    if progress:
        first_n, first = progress[0]
        last_n, last = progress[-1]
        print(f"driver RSS at the first progress line ({first_n:5d} images): {first:8.1f} MiB")
        for n, mib in progress[1:-1:max(1, len(progress) // 8)]:
            print(f"driver RSS at {n:5d} images:                      {mib:8.1f} MiB")
        print(f"driver RSS at the last progress line ({last_n:5d} images):  {last:8.1f} MiB")
        growth = (last - first) * 1024 / max(last_n - first_n, 1)
        pixels = 3 * args.image_size * args.image_size / 1024
        print(f"growth while streaming: {last - first:.1f} MiB over {last_n - first_n} images = {growth:.2f} KiB/image")
        print(f"  (the evaluator's records of {detections / args.images:.0f} detections/image; decoded images would be "
              f"{pixels:.0f} KiB/image, {args.images * pixels / 1024:.0f} MiB in all: ratio {growth / pixels:.3f})")
    print(f"driver RSS peak (metrics at the end included):  {sampler.peak():8.1f} MiB")
    print(f"eval of {args.images} images: {seconds:.0f}s ({args.images / seconds:.1f} images/s), "
          f"{detections} detections, map {result['map']:.4f}")


if __name__ == "__main__":
    main()
