"""CPU cost of one training step of the default detector, by image size, sampled RoIs,
RoIAlign sampling and implementation, and memory format.

The default recipe (conf/model/mobilenet_320_cpu.yaml) trains from scratch on 2 CPU
cores, so its step cost decides how much it can learn in the 6-minute budget. This
times the trainer's step (``engine.train_one_epoch``: forward, backward, update) in-process, batch 8 of the generated
shapes, for each variant side by side in one run, and prints each as a ratio to
torchvision's own settings (512 RoIs, 2000 proposals). With ``--profile`` it also prints
the operators that take the time for the default variant.

    .venv/bin/python benchmarks/cpu_step.py              # all variants, 2 threads
    .venv/bin/python benchmarks/cpu_step.py --profile    # + where the default's step goes

Not a test: nothing here fails on a number. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import load_batches  # benchmarks/, first on sys.path when run as a script
from omegaconf import OmegaConf
from torchvision.ops import MultiScaleRoIAlign

import detexp
from detexp.config import ModelConfig
from detexp.data.shapes import SHAPES_CLASSES, generate_shapes
from detexp.engine.loops import train_one_epoch
from detexp.modeling.detector import build_detector

# The default's fit to the shapes, read from conf/model/mobilenet_320_cpu.yaml: RoI sampling
# and an FPN that reads stride 16 and 32; the anchors the shapes were fitted with by hand
# (the default's own are `auto`, fitted to a train split, which a model built here lacks).
_DEFAULT_MODEL = OmegaConf.load(Path(detexp.__file__).parent / "conf" / "model" / "mobilenet_320_cpu.yaml")
FIT = {"anchor_sizes": [32, 64, 128], "anchor_ratios": [1.0],
       **{key: _DEFAULT_MODEL[key] for key in ("box_positive_fraction", "returned_layers")}}

# (label, min/max size, box_batch_size_per_image, rpn top-n while training, RoIAlign
# sampling ratio, channels-last weights, torchvision's own RoIAlign instead of detexp's,
# other ModelConfig keys)
VARIANTS = [
    ("torchvision's settings, 320 px", 320, 512, 2000, 2, False, True, {}),
    ("128 RoIs, 192 px (the previous default)", 192, 128, 500, 2, False, True, {}),
    ("64 RoIs, 320 px", 320, 64, 500, 2, False, True, {}),
    ("32 RoIs, 320 px", 320, 32, 500, 2, False, True, {}),
    ("32 RoIs, 320 px, RoIAlign sampling 1", 320, 32, 500, 1, False, True, {}),
    ("32 RoIs, 320 px, sampling 1, channels-last", 320, 32, 500, 1, True, True, {}),
    ("32 RoIs, 320 px, channels-last", 320, 32, 500, 2, True, True, {}),
    ("the same, detexp's RoIAlign", 320, 32, 500, 2, True, False, {}),
    ("the same, anchors, RoIs, stride 16 (the default)", 320, 32, 500, 2, True, False, FIT),
    ("sampling 1, channels-last, 256 px", 256, 32, 500, 1, True, True, {}),
]


def step_seconds(
    size: int, rois: int, proposals: int, sampling: int, channels_last: bool, torchvision_pool: bool,
    extra: dict, batches, steps: int, profile: bool = False,
) -> list[float]:
    """Seconds of each of ``steps`` training steps of :func:`detexp.engine.loops.train_one_epoch`
    (the trainer's own step), after one untimed warm-up step."""
    cfg = OmegaConf.structured(ModelConfig)
    cfg.min_size = cfg.max_size = size
    cfg.box_batch_size_per_image = rois
    cfg.rpn_pre_nms_top_n_train = cfg.rpn_post_nms_top_n_train = proposals
    cfg.roi_sampling_ratio = sampling
    cfg = OmegaConf.merge(cfg, extra)
    torch.manual_seed(0)
    model = build_detector(cfg, len(SHAPES_CLASSES) + 1)
    if torchvision_pool:  # its CPU kernel, as detexp used until detexp.modeling.roi_align
        model.roi_heads.box_roi_pool = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, sampling)
    if channels_last:  # trainer.channels_last
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    ends: list[float] = []
    train_one_epoch(
        model, optimizer, (batches[n % len(batches)] for n in range(steps + 1)), epoch=0,
        on_step=lambda step, losses: ends.append(time.perf_counter()),
    )
    if profile:
        from torch.profiler import profile as torch_profile

        with torch_profile() as prof:
            train_one_epoch(model, optimizer, batches[:1], epoch=0)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    return [b - a for a, b in zip(ends, ends[1:], strict=False)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (Ray gives a worker its CPU count)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        root = generate_shapes(Path(tmp) / "shapes", num_train=48, num_val=1, image_size=192)
        batches = load_batches(root, 8, 6)
        results = []
        for label, *variant in VARIANTS:
            profile = args.profile and label.endswith("(the default)")
            times = step_seconds(*variant, batches, args.steps, profile)
            results.append((label, statistics.median(times)))
            print(f"{label:50s} {statistics.median(times):6.2f} s/step", flush=True)

    base = results[0][1]
    print(f"\nbatch 8, {args.threads} threads, median of {args.steps} steps; speed-up over the first row:")
    for label, seconds in results:
        print(f"  {label:50s} {base / seconds:5.1f}x")


if __name__ == "__main__":
    main()
