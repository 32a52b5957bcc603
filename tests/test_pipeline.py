"""The Ray Data side of the reader: real JPEG and XML files, decoded in map_batches,
boxes flipped with the pixels."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import compose_train
from detexp.commands.train import _load_datasets
from detexp.data.annotations import _read_annotations, problems_of, read_annotations
from detexp.data.pipeline import batch_to_tensors, decode_batch
from detexp.data.source import resolve

XML = """<annotation><folder>VOC</folder><filename>{filename}</filename>
<size><width>{w}</width><height>{h}</height><depth>3</depth></size>
<object><name>block</name><difficult>0</difficult>
<bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>
</annotation>"""


def _write_voc(root: Path, image_id: str, box=(11, 21, 40, 60), size=(120, 90), filename="wrong.png"):
    """A black image with one white block at ``box`` (VOC 1-based inclusive coords)."""
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    w, h = size
    pixels = np.zeros((h, w, 3), dtype=np.uint8)
    x0, y0, x1, y1 = box
    pixels[y0 - 1 : y1, x0 - 1 : x1] = 255
    Image.fromarray(pixels).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
    (root / "Annotations" / f"{image_id}.xml").write_text(
        XML.format(filename=filename, w=w, h=h, x0=x0, y0=y0, x1=x1, y1=y1)
    )


def _mean_inside(image: torch.Tensor, box) -> float:
    x0, y0, x1, y1 = (int(round(v)) for v in box.tolist())
    return image[:, y0 + 2 : y1 - 2, x0 + 2 : x1 - 2].mean().item()


@pytest.mark.parametrize("flip", [0.0, 1.0])
def test_flipped_box_still_covers_its_flipped_object(tmp_path, flip):
    _write_voc(tmp_path, "a")
    table = _read_annotations(str(tmp_path), ["a"], ("block",))
    images, targets = batch_to_tensors(decode_batch(table, str(tmp_path), hflip_prob=flip))
    image, box = images[0], targets[0]["boxes"][0]

    assert _mean_inside(image, box) > 0.9  # the (flipped) box sits on the white block
    if flip:
        assert box[0].item() == pytest.approx(120 - 40) and box[2].item() == pytest.approx(120 - 11)
        assert _mean_inside(image, torch.tensor([11.0, 21, 40, 60])) < 0.1  # the old place is dark


def test_the_flip_is_torchvisions(tmp_path):
    """decode_batch flips in numpy (no torch in decode tasks); the result is what
    torchvision v2's RandomHorizontalFlip gives for the same image and boxes."""
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    _write_voc(tmp_path, "a", box=(3, 5, 77, 60), size=(81, 64))
    table = _read_annotations(str(tmp_path), ["a"], ("block",))
    (image,), (target,) = batch_to_tensors(decode_batch(table, str(tmp_path)))
    (flipped,), (flipped_target,) = batch_to_tensors(decode_batch(table, str(tmp_path), hflip_prob=1.0))
    boxes = tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=(64, 81))
    want_image, want_boxes = v2.RandomHorizontalFlip(p=1.0)(tv_tensors.Image(image), boxes)
    assert torch.equal(flipped, want_image.as_subclass(torch.Tensor))
    assert torch.equal(flipped_target["boxes"], want_boxes.as_subclass(torch.Tensor))


def test_image_is_read_by_id_not_by_the_xml_filename(tmp_path):
    # third-party exports often carry a <filename> that does not exist
    _write_voc(tmp_path, "0007", filename="IMG_1234 (copy).PNG")
    table = _read_annotations(str(tmp_path), ["0007"], ("block",))
    images, targets = batch_to_tensors(decode_batch(table, str(tmp_path)))
    assert images[0].shape == (3, 90, 120)
    assert targets[0]["image_id"] == "0007" and targets[0]["labels"].tolist() == [1]


def test_ray_datasource_reads_rows_and_reports_broken_ones(ray_cluster, tmp_path):
    for i in range(5):
        _write_voc(tmp_path, f"{i:03d}")
    (tmp_path / "Annotations" / "003.xml").write_text("<annotation><object>")  # broken
    ann = read_annotations(tmp_path, [f"{i:03d}" for i in range(5)], ["block"]).materialize()

    rows = {r["image_id"]: r for r in ann.take_all()}
    assert len(rows) == 5
    assert [i for i, r in rows.items() if not r["ok"]] == ["003"]
    assert list(rows["000"]["boxes"]) == [11.0, 21.0, 40.0, 60.0]
    problems = problems_of(ann)
    assert [(p.image_id, p.file, p.severity) for p in problems] == [("003", "Annotations/003.xml", "error")]


def test_what_rays_control_actors_and_decode_tasks_run_does_not_import_torch(ray_cluster, tmp_path):
    """Ray Train's controller unpickles what the trainer hands it (the run's settings with
    the worker plan and the process-group backend, the report callback, the dataset split),
    its DatasetManager and SplitCoordinators the datasets' plans (read tasks, decode_batch),
    and Ray Data's tasks decode (with the training flip), each in a fresh process and
    before the first step: a torch import there costs every run seconds of start-up on a
    small machine."""
    import ray.cloudpickle
    from ray.util.queue import Queue

    from detexp.checkpoint.storage import storage_location
    from detexp.config import plain
    from detexp.distributed.controller import ForwardReports
    from detexp.distributed.plan import WorkerPlan
    from detexp.distributed.trainer import data_parallel_trainer

    _write_voc(tmp_path, "000", size=(40, 32), box=(2, 2, 20, 20))
    _write_voc(tmp_path, "001", size=(40, 32), box=(2, 2, 20, 20))
    cfg = compose_train(["dataset=voc", f"dataset.root={tmp_path}", "dataset.classes=[block]", "dataset.val_fraction=0.5"])
    datasets, _, _ = _load_datasets(cfg, resolve(cfg.dataset))
    queue = Queue(actor_options={"num_cpus": 0})
    trainer = data_parallel_trainer(WorkerPlan(cfg=plain(cfg), events=queue), datasets, cfg.scaling,
                                    storage_location(None, tmp_path / "run"), keep=1, callbacks=[ForwardReports(queue)])
    pickled = tmp_path / "controller.pkl"
    # the TrainController's own arguments, as DataParallelTrainer.fit() passes them
    pickled.write_bytes(ray.cloudpickle.dumps(
        (datasets, trainer.train_run_context, trainer._create_default_callbacks())
    ))
    code = (
        "import pickle, sys, ray; ray.init(address='auto', logging_level='ERROR');"
        f"datasets, context, callbacks = pickle.loads(open({str(pickled)!r}, 'rb').read());"
        "from detexp.data.annotations import _read_annotations; from detexp.data.pipeline import decode_batch;"
        f"decode_batch(_read_annotations({str(tmp_path)!r}, ['000', '001'], ('block',)), {str(tmp_path)!r}, 1.0);"
        "print(sorted(datasets), type(context.train_loop_config).__name__, len(callbacks) > 3,"
        " 'torch' in sys.modules, 'torchvision' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    ray.kill(queue.actor)
    assert out.stdout.strip().splitlines()[-1] == "['train', 'val'] WorkerPlan True False False", out.stdout + out.stderr


def test_training_rows_come_in_a_new_order_every_epoch(ray_cluster, tmp_path):
    # Sorted ids, as real folders have them: a buffer that only mixes neighbours would give
    # nearly the same batches every epoch.
    ids = [f"{i:03d}" for i in range(48)]
    for image_id in ids:
        _write_voc(tmp_path, image_id, size=(40, 32), box=(2, 2, 20, 20))
    cfg = compose_train(["dataset=voc", f"dataset.root={tmp_path}", "dataset.classes=[block]", "dataset.val_fraction=0.25"])
    source = resolve(cfg.dataset)
    datasets, counts, _ = _load_datasets(cfg, source)
    shard = datasets["train"].streaming_split(1)[0]  # as a worker iterates it, epoch after epoch

    epochs = [[i for b in shard.iter_batches(batch_size=8) for i in b["image_id"]] for _ in range(2)]
    assert counts["data/train_images"] == len(source.train_ids) == 36
    assert all(sorted(order) == source.train_ids for order in epochs)  # every image once per epoch
    assert len({tuple(order) for order in epochs + [source.train_ids]}) == 3  # two new orders
    assert set(epochs[0][:8]) != set(epochs[1][:8])  # not the same first batch in both epochs



def test_an_images_flip_comes_from_the_seed_the_epoch_and_its_id_not_from_the_task_it_lands_in(ray_cluster, tmp_path):
    """The same rows cut into other blocks (other decode tasks, in another order) flip the
    same images; the next epoch flips others. A run repeats its batches only so."""
    from detexp.data.pipeline import decode_images

    ids = [f"{i:03d}" for i in range(40)]
    for image_id in ids:
        _write_voc(tmp_path, image_id, size=(40, 32), box=(2, 2, 20, 20))

    def rows():  # read as a run reads them: a dataset of its own counts its executions (epochs)
        return read_annotations(tmp_path, ids, ["block"]).materialize()

    def flipped(ds) -> set[str]:  # the box of every image is at x 2-20 of 40; flipped, at 20-38
        return {i for b in ds.iter_batches(batch_size=8, batch_format="pyarrow")
                for i, box in zip(b["image_id"].to_pylist(), b["boxes"].to_pylist(), strict=True) if box[0] > 10}

    one_block = decode_images(rows().repartition(1), tmp_path, hflip_prob=0.5, seed=3, augment="hflip")
    five_blocks = decode_images(rows().repartition(5).random_shuffle(seed=1), tmp_path, hflip_prob=0.5, seed=3, augment="hflip")
    first = flipped(one_block)
    assert 8 < len(first) < 32  # about half
    assert flipped(five_blocks) == first
    assert flipped(one_block) != first  # its second execution: the next epoch
    other_seed = decode_images(rows().repartition(1), tmp_path, hflip_prob=0.5, seed=4, augment="hflip")
    assert flipped(other_seed) != first


def _two_blocks(root: Path) -> Path:
    """A 160 x 120 black image with two white blocks, one in a corner, and their XML."""
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((120, 160, 3), dtype=np.uint8)
    blocks = [(61, 41, 110, 90), (1, 1, 20, 16)]
    for x0, y0, x1, y1 in blocks:
        pixels[y0 - 1 : y1, x0 - 1 : x1] = 255
    Image.fromarray(pixels).save(root / "JPEGImages" / "b.png")  # lossless: the blocks stay white
    objects = "".join(
        f"<object><name>block</name><difficult>{n}</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
        f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>" for n, (x0, y0, x1, y1) in enumerate(blocks)
    )
    (root / "Annotations" / "b.xml").write_text(
        f"<annotation><filename>b.png</filename><size><width>160</width><height>120</height></size>{objects}</annotation>"
    )
    return root


@pytest.mark.parametrize("preset", ["ssd", "lsj"])
def test_augmentation_presets_keep_boxes_on_their_objects_and_repeat_with_the_seed(tmp_path, preset):
    """torchvision's ssd and lsj presets, in the decode step: every box kept is inside the
    image and covers white pixels, a box cropped away goes with its label and difficult
    flag, the same seed gives the same image and the seeds of an epoch give many."""

    from detexp.data.voc import ImageEntry

    _two_blocks(tmp_path)
    table = _read_annotations(str(tmp_path), [ImageEntry("b", "JPEGImages/b.png", "Annotations/b.xml")], ("block",))
    seen = set()
    for seed in range(24):
        out = decode_batch(table, str(tmp_path), hflip_prob=0.5, augment=preset, size=128, seed=seed)
        again = decode_batch(table, str(tmp_path), hflip_prob=0.5, augment=preset, size=128, seed=seed)
        assert out.column("image").to_pylist() == again.column("image").to_pylist()
        (image,), (target,) = batch_to_tensors(out)
        height, width = image.shape[1:]
        boxes = target["boxes"]
        assert len(target["labels"]) == len(target["difficult"]) == len(boxes)
        assert torch.all(boxes[:, 0::2] >= 0) and torch.all(boxes[:, 0::2] <= width)
        assert torch.all(boxes[:, 1::2] >= 0) and torch.all(boxes[:, 1::2] <= height)
        assert torch.all(boxes[:, 2:] - boxes[:, :2] >= 1)
        if preset == "lsj":  # no photometric change: a box still sits on white pixels
            assert (height, width) == (128, 128)
            for box in boxes:
                x0, y0, x1, y1 = (int(round(v)) for v in box.tolist())
                assert image[:, y0:y1, x0:x1].mean().item() > 0.5
        seen.add((out.column("image")[0].as_py(), tuple(target["difficult"].tolist())))
    assert len(seen) > 12  # the draws differ from seed to seed
    assert any(difficult == (False,) for _, difficult in seen)  # the corner block was cropped away, with its flag


def test_multiscale_sizes_are_torchvisions_references():
    from detexp.data.augment import multiscale_sizes

    assert multiscale_sizes(800) == tuple(range(480, 801, 32))
    assert multiscale_sizes(320) == (192, 224, 256, 288, 320)
