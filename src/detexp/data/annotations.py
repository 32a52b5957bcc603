"""The annotation side of the Ray Data reader: a datasource whose read tasks parse and
check each image's annotation (its VOC XML, or its objects from a COCO JSON) and decode the
image once to check it, one row per image.

This module imports no torch: unpickling a read task on a fresh Ray worker imports it,
and torch + torchvision would add about 4 s to the first read of every run. Images are
decoded later, in :mod:`detexp.data.pipeline`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray.data
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask
from ray.data.expressions import col

from detexp.data.files import DataRoot, as_root
from detexp.data.parsing import parse_record
from detexp.data.voc import ImageEntry, Problem

ANNOTATION_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("image_file", pa.string()),  # the image file, relative to the dataset root
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("boxes", pa.list_(pa.float32())),  # flat xmin, ymin, xmax, ymax, ...
        ("labels", pa.list_(pa.int64())),
        ("difficult", pa.list_(pa.bool_())),
        ("problems", pa.string()),  # JSON list of Problem dicts; "[]" when clean
        ("ok", pa.bool_()),  # False when the image has an error and must not be used
    ]
)


class VOCAnnotationDatasource(Datasource):
    """One row per image id: its boxes, labels and difficult flags, parsed and checked
    (the image fully decoded) by read tasks on the cluster, not on the driver. Images
    with an error get ``ok=False`` and their problems, so the driver can count, list and
    skip them."""

    def __init__(self, root: DataRoot | str | Path, entries: Sequence[ImageEntry | str], classes: Sequence[str]):
        super().__init__()
        self._root = as_root(root)
        self._entries = [ImageEntry.devkit(e) if isinstance(e, str) else e for e in entries]
        self._classes = tuple(classes)

    def estimate_inmemory_data_size(self) -> int:
        return 200 * len(self._entries)

    def get_read_tasks(self, parallelism: int, **kwargs) -> list[ReadTask]:
        n_tasks = max(1, min(parallelism, len(self._entries) // 64 or 1))
        chunks = [c for c in np.array_split(np.asarray(self._entries, dtype=object), n_tasks) if len(c)]
        root, classes = self._root, self._classes
        return [
            ReadTask(
                lambda chunk=chunk: [_read_annotations(root, list(chunk), classes)],
                BlockMetadata(
                    num_rows=len(chunk), size_bytes=200 * len(chunk), input_files=None,
                    exec_stats=None,
                ),
                schema=ANNOTATION_SCHEMA,
            )
            for chunk in chunks
        ]


def _read_annotations(root: DataRoot | str | Path, entries: Sequence[ImageEntry | str], classes: Sequence[str]) -> pa.Table:
    columns: dict[str, list] = {name: [] for name in ANNOTATION_SCHEMA.names}
    root = as_root(root)
    for entry in entries:
        entry = ImageEntry.devkit(entry) if isinstance(entry, str) else entry
        # Decode every pixel here, once: a truncated JPEG must be skipped and counted now,
        # not crash a worker mid-epoch (or, dropped there, leave DDP ranks uneven).
        record, problems = parse_record(root, entry, tuple(classes), verify_image=True)
        columns["image_id"].append(entry.image_id)
        columns["image_file"].append(entry.image)
        columns["problems"].append(json.dumps([p.__dict__ for p in problems]))
        columns["ok"].append(record is not None)
        if record is None:
            columns["width"].append(0)
            columns["height"].append(0)
            columns["boxes"].append([])
            columns["labels"].append([])
            columns["difficult"].append([])
        else:
            columns["width"].append(record.width)
            columns["height"].append(record.height)
            columns["boxes"].append(record.boxes.reshape(-1).tolist())
            columns["labels"].append(record.labels.tolist())
            columns["difficult"].append(record.difficult.tolist())
    return pa.Table.from_pydict(columns, schema=ANNOTATION_SCHEMA)


def read_annotations(root: DataRoot | str | Path, entries: Sequence[ImageEntry | str], classes: Sequence[str]) -> ray.data.Dataset:
    return ray.data.read_datasource(VOCAnnotationDatasource(root, entries, classes))


def problems_of(annotations: ray.data.Dataset) -> list[Problem]:
    """Problems (errors and warnings) of every image, collected on the driver.
    Only rows that have problems travel, so this stays small for a clean dataset."""
    rows = annotations.filter(expr=col("problems") != "[]").select_columns(["problems"]).take_all()
    return [Problem(**p) for row in rows for p in json.loads(row["problems"])]
