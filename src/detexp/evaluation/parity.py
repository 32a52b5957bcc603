"""Parity of two detectors on the same images: the PyTorch model and its export.

Per image and class, the detections of the two are paired greedily by IoU (the best
remaining pair first, IoU >= 0.7). A box and its own counterpart overlap almost entirely
(half a pixel off on a 20 px box is still IoU 0.9), while two boxes of one class that both
survive the model's NMS overlap at most 0.5, so a box is not paired with a neighbour of
its counterpart.

Near the cuts the model makes itself, a rounding of a score decides which boxes are kept:
its ``box_score_thresh`` (0.05), and when it returned its full ``detections_per_img`` (100),
its lowest score. A detection is *at a cut* when its score is below ``min_score``, or
below the other model's cut plus the blur of scores between the two models: the largest
score difference of the pairs above the cuts, and at least :data:`ROUNDING`. The largest
coordinate difference (in the image's pixels) and score difference are taken over the
pairs with at least one side above its cut; an unpaired detection above its cut counts as
missing from the other model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torchvision.ops import box_iou

MATCH_IOU = 0.7
# Scores that two runtimes give one detection differ by about 1e-7 (float32 rounding): the
# least blur of a cut. An untrained detector's hundred best scores can lie within 0.01.
ROUNDING = 1e-4


@dataclass(frozen=True)
class Parity:
    """The figures of one comparison (what parity.json holds)."""

    images: int
    compared: int  # pairs with at least one side above its cut (>= min_score)
    max_box_px: float
    max_score: float
    only_reference: int  # detections >= min_score the exported model does not have
    only_exported: int
    min_score: float

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def missing(self) -> int:
        return self.only_reference + self.only_exported


def compare(
    reference: Sequence[dict[str, torch.Tensor]],
    exported: Sequence[dict[str, torch.Tensor]],
    *,
    min_score: float,
    score_thresh: float,
    per_image: int,
    score_tolerance: float,
) -> Parity:
    """Compare the detections (``boxes``, ``labels``, ``scores`` per image) of two models
    on the same images; ``score_thresh`` and ``per_image`` are the models' own cuts
    (``box_score_thresh``, ``detections_per_img``). The blur of the cuts grows with the
    score differences seen, up to ``score_tolerance``: differences beyond it fail anyway,
    and a larger blur could hide every detection of an untrained model."""
    parity = _compare(reference, exported, min_score, score_thresh, per_image, ROUNDING)
    if ROUNDING < parity.max_score <= score_tolerance:  # a blur that covers every difference it lets through
        parity = _compare(reference, exported, min_score, score_thresh, per_image, parity.max_score)
    return parity


def _compare(reference, exported, min_score: float, score_thresh: float, per_image: int, margin: float) -> Parity:
    compared, max_box, max_score, only = 0, 0.0, 0.0, [0, 0]
    for ref, exp in zip(reference, exported, strict=True):
        # a reference detection scored below cuts[0] may be missing from the export by a
        # rounding of its score, and an exported one below cuts[1] from the reference
        cuts = [max(min_score, _floor(other, score_thresh, per_image) + margin) for other in (exp, ref)]
        for label in torch.unique(torch.cat([ref["labels"], exp["labels"]])).tolist():
            a, b = _of_class(ref, label), _of_class(exp, label)
            pairs, unpaired = _pair(a["boxes"], b["boxes"])
            for i, j in pairs:
                if a["scores"][i] < cuts[0] and b["scores"][j] < cuts[1]:
                    continue  # both at a cut: each may stand for a box the other model cut
                compared += 1
                max_box = max(max_box, float((a["boxes"][i] - b["boxes"][j]).abs().max()))
                max_score = max(max_score, float((a["scores"][i] - b["scores"][j]).abs()))
            for side, (dets, left) in enumerate(((a, unpaired[0]), (b, unpaired[1]))):
                only[side] += sum(1 for i in left if float(dets["scores"][i]) >= cuts[side])
    return Parity(len(reference), compared, max_box, max_score, only[0], only[1], min_score)


def _floor(dets: dict[str, torch.Tensor], score_thresh: float, per_image: int) -> float:
    """The lowest score at which these detections could have kept one more box."""
    scores = dets["scores"]
    return float(scores.min()) if len(scores) >= per_image else score_thresh


def _of_class(dets: dict[str, torch.Tensor], label: int) -> dict[str, torch.Tensor]:
    keep = dets["labels"] == label
    return {"boxes": dets["boxes"][keep].double().reshape(-1, 4), "scores": dets["scores"][keep].double()}


def _pair(a: torch.Tensor, b: torch.Tensor) -> tuple[list[tuple[int, int]], tuple[list[int], list[int]]]:
    """Greedy pairs of rows of ``a`` and ``b`` by IoU (>= MATCH_IOU, best first), and the
    rows of each left unpaired."""
    pairs: list[tuple[int, int]] = []
    if len(a) and len(b):
        iou = box_iou(a, b)
        while True:
            best = int(iou.argmax())
            i, j = divmod(best, iou.shape[1])
            if iou[i, j] < MATCH_IOU:
                break
            pairs.append((i, j))
            iou[i, :] = -1.0
            iou[:, j] = -1.0
    paired_a, paired_b = {i for i, _ in pairs}, {j for _, j in pairs}
    return pairs, ([i for i in range(len(a)) if i not in paired_a], [j for j in range(len(b)) if j not in paired_b])
