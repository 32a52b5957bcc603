"""The prediction record of one image (:data:`PREDICTION_SCHEMA`): what a Predictor actor
returns and what a train worker keeps of its best epoch's validation, as Arrow rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa

from detexp.evaluation.figures import draw_detections, encode_image

# One row per image: what a Predictor actor returns, and what a train worker keeps of its
# best epoch's validation, so that the report at the end of training needs no new pass.
PREDICTION_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("det_boxes", pa.list_(pa.float32())),  # flat xmin, ymin, xmax, ymax, ...
        ("det_scores", pa.list_(pa.float32())),
        ("det_labels", pa.list_(pa.int64())),
        ("gt_boxes", pa.list_(pa.float32())),
        ("gt_labels", pa.list_(pa.int64())),
        ("gt_difficult", pa.list_(pa.bool_())),
        ("drawn", pa.binary()),  # the image with its boxes drawn, encoded; empty if not asked for
        ("error", pa.string()),  # why an image could not be read (predict); null when fine
    ]
)


def prediction_table(
    rows: Mapping[str, list],
    outputs: Mapping[int, Mapping],
    classes: Sequence[str],
    draw: bool | set[str] | list[str] = False,
    draw_threshold: float = 0.5,
    errors: Sequence[str | None] | None = None,
) -> pa.Table:
    """The :data:`PREDICTION_SCHEMA` rows of a batch: ``rows`` are the pipeline's columns
    as lists (image_id, image_shape, boxes, labels, difficult, and image bytes for the rows
    to draw), ``outputs`` the detector's output (boxes, scores, labels tensors) by row
    index; a row without output gets no detections. ``draw`` (True, or image ids) asks for
    the image with its boxes (score >= ``draw_threshold``) and ground truth drawn."""
    n = len(rows["image_id"])
    errors = errors or [None] * n
    columns: dict[str, list] = {name: [] for name in PREDICTION_SCHEMA.names}
    for i in range(n):
        shape = rows["image_shape"][i] or [3, 0, 0]
        out = outputs.get(i)
        columns["image_id"].append(rows["image_id"][i])
        columns["height"].append(int(shape[1]))
        columns["width"].append(int(shape[2]))
        columns["det_boxes"].append(out["boxes"].reshape(-1).tolist() if out else [])
        columns["det_scores"].append(out["scores"].tolist() if out else [])
        columns["det_labels"].append(out["labels"].tolist() if out else [])
        columns["gt_boxes"].append(rows["boxes"][i])
        columns["gt_labels"].append(rows["labels"][i])
        columns["gt_difficult"].append(rows["difficult"][i])
        wanted = draw is True or (draw and rows["image_id"][i] in draw)
        columns["drawn"].append(_drawn(rows, i, out, classes, draw_threshold) if out is not None and wanted else b"")
        columns["error"].append(errors[i] or None)
    return pa.Table.from_pydict(columns, schema=PREDICTION_SCHEMA)


def _drawn(rows: Mapping[str, list], i: int, out: Mapping, classes: Sequence[str], threshold: float) -> bytes:
    c, h, w = rows["image_shape"][i]
    pixels = np.frombuffer(rows["image"][i], dtype=np.uint8).reshape(c, h, w).transpose(1, 2, 0)
    shown = out["scores"] >= threshold
    image = draw_detections(
        pixels, out["boxes"][shown], out["labels"][shown], out["scores"][shown], classes,
        gt_boxes=np.asarray(rows["boxes"][i], dtype=np.float32).reshape(-1, 4),
        gt_labels=rows["labels"][i],
    )
    return encode_image(image, rows["image_id"][i])
