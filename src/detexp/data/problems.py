"""Problems found in a dataset, for people: a summary line, an aligned table, a CSV."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from pathlib import Path

from detexp.data.voc import Problem

# Rows of a problems table shown on the console; the CSV beside it lists them all.
MAX_TABLE_ROWS = 30


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def summarize_problems(problems: Iterable[Problem]) -> str:
    """``"N errors in K images, M warnings"``."""
    problems = list(problems)
    errors = [p for p in problems if p.severity == "error"]
    n_images = len({p.image_id for p in errors})
    n_warnings = len(problems) - len(errors)
    return (
        f"{_plural(len(errors), 'error')} in {_plural(n_images, 'image')}, "
        f"{_plural(n_warnings, 'warning')}"
    )


def format_problems(problems: Sequence[Problem]) -> str:
    """An aligned text table (id | file | severity | problem) followed by the summary line."""
    header = ("image_id", "file", "severity", "problem")
    rows = [header] + [(p.image_id, p.file, p.severity, p.problem) for p in problems]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True))
        + "  "
        + row[3]
        for row in rows
    ]
    if problems:
        lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * len(header[3]))
    else:
        lines = []
    lines.append(summarize_problems(problems))
    return "\n".join(lines)


def write_problems_csv(problems: Iterable[Problem], path: Path) -> None:
    """Write problems as CSV with columns image_id, file, severity, problem."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image_id", "file", "severity", "problem"])
        for p in problems:
            writer.writerow([p.image_id, p.file, p.severity, p.problem])


def problems_table(problems: Sequence[Problem], csv_path: Path, max_rows: int = MAX_TABLE_ROWS) -> str:
    """The problems table, cut to a screenful: the rows past ``max_rows`` are counted and
    left to ``csv_path``, which has every one."""
    if len(problems) <= max_rows:
        return format_problems(problems)
    lines = format_problems(problems[:max_rows]).splitlines()[:-1]
    lines.append(f"... and {len(problems) - max_rows} more rows in {csv_path}")
    lines.append(summarize_problems(problems))
    return "\n".join(lines)
