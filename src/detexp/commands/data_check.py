"""``detexp data check``: scan a dataset's splits for broken annotations and images."""

from __future__ import annotations

from typing import Any

from detexp.data.parsing import check_dataset, object_name_images
from detexp.data.problems import class_names_summary, format_problems, has_unknown_classes
from detexp.data.source import resolve


def data_check(cfg: Any) -> int:
    """Say which layout and classes the dataset has; scan its splits, decoding every image;
    print the summary of unknown class names (if any), then the problems table; return the
    number of errors."""
    source = resolve(cfg.dataset)
    print(source.summary())
    entries = list({e.image_id: e for e in source.train + source.val}.values())
    _, problems = check_dataset(source.root, entries, source.classes)
    errors = sum(1 for p in problems if p.severity == "error")
    if has_unknown_classes(problems):
        print(class_names_summary(object_name_images(source.root, entries), source.classes))
    if problems:
        print(format_problems(problems))
    print(f"checked {len(entries)} images in {source.root}: {errors} error(s), {len(problems) - errors} warning(s)")
    return errors
