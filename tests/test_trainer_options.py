"""The GPU-side trainer options, exercised on the CPU: mixed precision through the real
training step, batches grouped by image orientation, and the refusals that come before
Ray starts. (A GPU is never required; the GPU figures live in benchmarks/RESULTS.md.)"""

from __future__ import annotations

import math

import pyarrow as pa
import pytest
import torch

from conftest import compose_train
from detexp.commands.train import check_train_config
from detexp.distributed.worker_loop import group_by_orientation
from detexp.engine.loops import train_one_epoch
from detexp.errors import ConfigError
from detexp.modeling.detector import build_detector

# A model built without a train split to fit its anchors to (the default `auto`): numbers.
FIXED_ANCHORS = ["model.anchor_sizes=[32,64,128]", "model.anchor_ratios=[1.0]"]


def _rows(shapes: list[tuple[int, int]], start: int = 0) -> pa.Table:
    return pa.table({
        "image_id": [f"{start + i:06d}" for i in range(len(shapes))],
        "image_shape": [[3, h, w] for h, w in shapes],
    })


def _orientation(table: pa.Table) -> set[bool]:
    return {w >= h for _, h, w in table.column("image_shape").to_pylist()}


def test_grouped_batches_hold_one_orientation_and_keep_every_row_once():
    # VOC-like: wide 500x375 and tall 375x500 images interleaved, in batches of 4 rows
    shapes = [(375, 500) if i % 3 else (500, 375) for i in range(30)]
    tables = [_rows(shapes[i : i + 4], i) for i in range(0, 30, 4)]
    batches = list(group_by_orientation(iter(tables), batch_size=4))

    ids = [i for b in batches for i in b.column("image_id").to_pylist()]
    assert sorted(ids) == [f"{i:06d}" for i in range(30)]  # nothing lost, nothing twice
    assert len(batches) == math.ceil(30 / 4)  # DDP ranks with equal shards step together
    assert all(b.num_rows == 4 for b in batches[:-1])
    mixed = [b for b in batches if len(_orientation(b)) > 1]
    assert len(mixed) <= 1 and (not mixed or mixed[0] is batches[-2] or mixed[0] is batches[-1])
    # without grouping, most of these batches would mix both orientations
    assert sum(len(_orientation(t)) > 1 for t in tables) >= 6


def test_square_images_pass_through_in_order():
    tables = [_rows([(192, 192)] * 8, 0), _rows([(192, 192)] * 8, 8)]
    batches = list(group_by_orientation(iter(tables), batch_size=8))
    assert [b.column("image_id").to_pylist() for b in batches] == [t.column("image_id").to_pylist() for t in tables]


def _step_inputs():
    torch.manual_seed(0)
    images = [torch.rand(3, 128, 128) for _ in range(2)]
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[30.0, 20.0, 90.0, 100.0], [5.0, 5.0, 40.0, 30.0]]), "labels": torch.tensor([2, 3])},
    ]
    return images, targets


def test_bf16_autocast_trains_the_real_step_on_the_cpu():
    cfg = compose_train(["+experiment=smoke", "trainer.amp=bf16", *FIXED_ANCHORS])
    torch.manual_seed(0)
    model = build_detector(cfg.model, len(cfg.dataset.classes) + 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    before = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    stats = train_one_epoch(model, optimizer, [_step_inputs()] * 2, epoch=0, amp=cfg.trainer.amp)
    assert stats.steps == 2 and all(math.isfinite(v) for v in stats.losses.values())
    changed = [k for k, v in model.state_dict().items() if k in before and not torch.equal(v, before[k])]
    assert changed, "the optimizer step under autocast must update the weights"
    assert all(v.dtype == torch.float32 for v in model.state_dict().values() if v.is_floating_point())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.amp=fp16"], "trainer.amp=fp16 needs scaling.use_gpu=true"),
        (["trainer.prefetch_batches=-1"], "trainer.prefetch_batches=-1"),
    ],
)
def test_impossible_trainer_options_are_refused_before_ray(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_train_config(compose_train(["+experiment=smoke", *overrides]))


def test_channels_last_model_learns_the_same_as_the_default_layout():
    """trainer.channels_last changes the memory layout only: from the same weights, two
    steps give the same losses and the same weight updates (up to float summation order,
    which BatchNorm on random weights amplifies a little), and the saved state loads into
    a model built the usual way."""
    cfg = compose_train(["+experiment=smoke", *FIXED_ANCHORS])
    runs = []
    for channels_last in (False, True):
        torch.manual_seed(0)
        model = build_detector(cfg.model, len(cfg.dataset.classes) + 1)
        start = {k: v.clone() for k, v in model.state_dict().items()}
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        torch.manual_seed(1)  # the same RoI sampling
        losses = []
        train_one_epoch(model, optimizer, [_step_inputs()] * 2, epoch=0, on_step=lambda s, v, out=losses: out.append(v["loss"]))
        runs.append((model, start, losses))
    (plain, start, plain_losses), (nhwc, _, nhwc_losses) = runs
    assert nhwc.state_dict()["backbone.body.0.0.weight"].is_contiguous(memory_format=torch.channels_last)
    assert nhwc_losses == pytest.approx(plain_losses, rel=1e-3)
    for key, before in start.items():
        if before.is_floating_point() and key.endswith("weight"):
            a, b = plain.state_dict()[key] - before, nhwc.state_dict()[key] - before
            if a.norm() > 0:
                assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.95, key
    fresh = build_detector(cfg.model, len(cfg.dataset.classes) + 1)
    fresh.load_state_dict(nhwc.state_dict())
    assert torch.equal(fresh.state_dict()["backbone.body.0.0.weight"], nhwc.state_dict()["backbone.body.0.0.weight"])


def test_the_next_epoch_started_early_yields_every_batch_once_and_passes_errors_on():
    from detexp.distributed.worker_loop import StartedEarly

    started = StartedEarly(iter(range(5)))
    assert list(started) == [0, 1, 2, 3, 4]
    assert list(StartedEarly(iter([]))) == []

    def broken():
        raise OSError("shard gone")
        yield  # a generator

    with pytest.raises(OSError, match="shard gone"):
        list(StartedEarly(broken()))


@pytest.mark.parametrize("limit_mib", [16, 0.01, 0])
def test_val_images_are_kept_after_the_first_pass_only_when_they_fit(ray_cluster, tmp_path, limit_mib):
    """trainer.keep_val_mib: a val shard that fits is decoded once; later passes give the
    same images even when the files change. One that does not fit is read again."""
    from PIL import Image

    from detexp.data.annotations import read_annotations
    from detexp.data.pipeline import batch_to_tensors, decode_images
    from detexp.data.shapes import SHAPES_CLASSES, generate_shapes
    from detexp.distributed.worker_loop import KeptShard

    root = generate_shapes(tmp_path / "shapes", num_train=6, num_val=0, image_size=64)
    ids = [f"{i:06d}" for i in range(1, 7)]
    shard = KeptShard(decode_images(read_annotations(root, ids, SHAPES_CLASSES), root), 4, limit_mib)

    def images_by_id():
        out = {}
        for table in shard:
            images, targets = batch_to_tensors(table)
            out |= {t["image_id"]: image for image, t in zip(images, targets, strict=True)}
        return out

    first = images_by_id()
    assert sorted(first) == ids
    for image_id in ids:  # the files change on disk after the first validation
        path = root / "JPEGImages" / f"{image_id}.jpg"
        Image.new("RGB", Image.open(path).size, (0, 0, 0)).save(path)
    second = images_by_id()
    assert sorted(second) == ids
    kept = limit_mib == 16  # 6 images of at most 77 x 77 x 3 bytes fit in 16 MiB, not in 0.01
    assert all(torch.equal(first[i], second[i]) == kept for i in ids)
    assert all((second[i].max() == 0) != kept for i in ids)


@pytest.mark.parametrize("optimizer", ["adamw_scratch", "sgd"])
def test_the_fused_optimizer_updates_the_weights_as_the_per_parameter_loop_does(optimizer):
    """build_optimizer picks torch's fused kernel on the CPU (one pass over all weights);
    three steps of it move the weights as the same optimizer unfused does, and its state
    saved in a checkpoint loads back into an optimizer the usual way."""
    from detexp.engine.solver import build_optimizer

    cfg = compose_train(["+experiment=smoke", f"optimizer={optimizer}"])
    torch.manual_seed(0)
    fused_model, loop_model = (torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 4)) for _ in "ab")
    loop_model.load_state_dict(fused_model.state_dict())
    start = {k: v.clone() for k, v in fused_model.state_dict().items()}
    fused = build_optimizer(cfg.optimizer, fused_model.parameters())
    assert fused.defaults["fused"] is True
    kwargs = {k: v for k, v in fused.defaults.items() if k in ("lr", "momentum", "weight_decay")}
    loop = type(fused)(loop_model.parameters(), fused=False, foreach=False, **kwargs)
    data = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        for model, opt in ((fused_model, fused), (loop_model, loop)):
            opt.zero_grad()
            model(data).pow(2).mean().backward()
            opt.step()
    for (name, a), b in zip(fused_model.state_dict().items(), loop_model.state_dict().values(), strict=True):
        assert not torch.equal(a, start[name]), f"{name} did not train"
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    resumed = build_optimizer(cfg.optimizer, loop_model.parameters())
    resumed.load_state_dict(fused.state_dict())
    assert resumed.state_dict()["state"].keys() == fused.state_dict()["state"].keys()
