"""Problems found in a dataset, for people: a summary line, an aligned table, a CSV, and
the summary of class names the annotations use but ``dataset.classes`` does not list."""

from __future__ import annotations

import csv
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
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


# --------------------------------------------------------------------------- class names

# Names Hydra's override grammar reads back unchanged without quotes; others are quoted.
_PLAIN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_HYDRA_KEYWORDS = {"true", "false", "null", "nan", "inf"}


def has_unknown_classes(problems: Iterable[Problem]) -> bool:
    return any(p.unknown_class for p in problems)


def _hydra_item(name: str) -> str:
    if _PLAIN_NAME.fullmatch(name) and name.lower() not in _HYDRA_KEYWORDS:
        return name
    # Double quotes read best inside the single-quoted shell word. Hydra unescapes a
    # backslash only before a quote, so only those backslashes are doubled.
    quote = "'" if '"' in name and "'" not in name else '"'
    escaped = re.sub(rf"(\\+)(?={quote}|$)", r"\1\1", name).replace(quote, "\\" + quote)
    return quote + escaped + quote


def classes_override(names: Sequence[str]) -> str:
    """``dataset.classes=[a,b]`` as one shell word that Hydra reads back as ``names``
    (quoted for both where a name needs it: spaces, leading digits, quotes)."""
    return shlex.quote("dataset.classes=[" + ",".join(_hydra_item(n) for n in names) + "]")


def class_names_summary(name_images: Mapping[str, int], classes: Sequence[str]) -> str:
    """A few lines on the object names of ``name_images`` (name -> images that use it, e.g.
    from :func:`detexp.data.parsing.object_name_images`) that are not in ``classes``; ""
    when there are none. Printed before a problems table, it replaces reading one
    "unknown class" row per object.

    Line 1 names each unknown name with its image count (and the configured class it
    differs from only in case). The next gives the override that most likely helps: when no
    configured class appears at all, the class list is plainly another dataset's, so it
    suggests exactly the names found (a configured spelling's position kept, the rest
    sorted); otherwise it keeps the configured classes, whose labels stay as they are, and
    appends the new names (not case variants: those are typos to fix in the annotations)."""
    unknown = {name: n for name, n in name_images.items() if name not in set(classes)}
    if not unknown:
        return ""
    folded = {c.casefold(): c for c in classes}

    def described(name: str) -> str:
        hint = folded.get(name.casefold())
        return f"{name!r} in {_plural(unknown[name], 'image')}" + (f" (did you mean {hint!r}?)" if hint else "")

    ranked = sorted(unknown, key=lambda name: (-unknown[name], name.casefold(), name))
    line = (f"{_plural(len(unknown), 'class name')} in the annotations {'is' if len(unknown) == 1 else 'are'} not in dataset.classes "
            f"(their images are unusable): {', '.join(described(n) for n in ranked)}")
    if not any(c in name_images for c in classes):
        position = {c.casefold(): i for i, c in enumerate(classes)}
        found = sorted(unknown, key=lambda name: (position.get(name.casefold(), len(classes)), name.casefold(), name))
        return (f"{line}\nnone of the {len(classes)} configured classes appear in these annotations; "
                f"to train on the names they use, pass:  {classes_override(found)}")
    new = sorted((n for n in unknown if n.casefold() not in folded), key=lambda name: (name.casefold(), name))
    lines = [line]
    if new:
        lines.append(f"to train on {', '.join(map(repr, new))} too, pass:  {classes_override([*classes, *new])}")
    if len(new) < len(unknown):
        lines.append("names that differ from a configured class only in case are typos: fix them in the annotations")
    return "\n".join(lines)
