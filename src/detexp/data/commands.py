"""``detexp data check`` and ``detexp data synth``: plain functions of a composed config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from detexp.data.parsing import check_dataset, object_name_images
from detexp.data.problems import class_names_summary, format_problems, has_unknown_classes
from detexp.data.source import resolve


def data_check(cfg: Any) -> int:
    """Scan the dataset's splits; print the summary of unknown class names (if any), then
    the problems table; return the number of errors."""
    source = resolve(cfg.dataset)
    ids = list(dict.fromkeys(source.train_ids + source.val_ids))
    _, problems = check_dataset(source.root, ids, source.classes)
    errors = sum(1 for p in problems if p.severity == "error")
    if has_unknown_classes(problems):
        print(class_names_summary(object_name_images(source.root, ids), source.classes))
    if problems:
        print(format_problems(problems))
    print(f"checked {len(ids)} images in {source.root}: {errors} error(s), {len(problems) - errors} warning(s)")
    return errors


def data_synth(cfg: Any) -> Path:
    """Write the generated shapes dataset to ``cfg.out``; print how to train on it."""
    from detexp.data.shapes import generate_shapes

    out = Path(cfg.out).expanduser().resolve()
    s = cfg.synth
    generate_shapes(out, num_train=s.num_train, num_val=s.num_val, image_size=s.image_size, seed=s.seed)
    print(f"wrote {s.num_train} train + {s.num_val} val images to {out}")
    print(f"train on it with:  python -m detexp train dataset=voc dataset.root={out} "
          "'dataset.classes=[circle,square,triangle,cross]'")
    return out
