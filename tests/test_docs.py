"""The commands the docs tell people to run, run or composed as ``python -m detexp`` would.

A ```bash block of README.md or docs/*.md whose previous line is ``<!-- runnable -->`` holds
commands that work here as they are written; each of its lines that starts with
``python -m detexp`` is one (a trailing ``\\`` continues it). Commands that need what this
machine lacks (Pascal VOC under ~/data, GPUs, a tracking server) stay in unmarked blocks.

The default suite takes every runnable command, page by page, in a fresh directory:
``--help`` runs for real (a subprocess), ``data synth|check|show`` run for real in-process
(small sizes), and ``train``/``tune``/``eval``/``predict``/``export``/``serve`` are composed
with Hydra exactly as the command line composes them (``-m`` sweeps: every combination;
``-cd``/``-cn``; ``--cfg``), then put through the checks each command makes before Ray
starts. A renamed key, group or option in the code, or a typo in the docs, fails here with
the page and line. ``test_runnable_commands_end_to_end`` (slow) runs the training, tuning,
inference and export commands for real, on tiny data (``serve``, which runs until Ctrl-C,
is tests/test_serve.py's).

Placeholders in commands (:data:`PLACEHOLDERS`) stand for what an earlier command made.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from conftest import CONF_DIR
from detexp.__main__ import COMMANDS
from detexp.config import register_configs

REPO = Path(__file__).resolve().parents[1]
MARK = "<!-- runnable -->"
PREFIX = ("python", "-m", "detexp")
# Pages that must show at least one runnable command (the user-experience issue's list).
REQUIRED_PAGES = (
    "README.md", "docs/getting-started.md", "docs/datasets.md", "docs/configuration.md",
    "docs/tracking.md", "docs/from-the-ray-tutorial.md",
)
# What a placeholder in a command stands for: resolved in the command's working directory.
PLACEHOLDERS = {
    "runs/train/<timestamp>": "the newest run directory under runs/train/ (a train run made it)",
    "runs/tune/<timestamp>": "the newest directory under runs/tune/ with a best_config.yaml (a tune made it)",
}
# Files the docs assume a user has: a folder of their own images.
PHOTOS = "photos"
REGISTERED = "shapes"  # the registered model name the docs use (models:/shapes/...)


# -- reading the docs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DocCommand:
    page: str  # relative to the repository
    line: int  # 1-based, the command's first line
    argv: tuple[str, ...]  # after `python -m detexp`

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: python -m detexp {shlex.join(self.argv)}"


def _pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _blocks(text: str) -> Iterator[tuple[int, list[str]]]:
    """(line number of the fence, lines) of each runnable block."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip() != MARK:
            continue
        assert i + 1 < len(lines) and lines[i + 1].strip() == "```bash", f"line {i + 1}: {MARK} must come just before a ```bash fence"
        end = next(j for j in range(i + 2, len(lines)) if lines[j].strip() == "```")
        yield i + 2, lines[i + 2 : end]


def commands_in(text: str, page: str) -> list[DocCommand]:
    """The runnable commands of one page's text."""
    commands = []
    for fence, lines in _blocks(text):
        logical, first = "", None
        for n, line in enumerate(lines, start=fence + 1):
            first = first or n
            if line.rstrip().endswith("\\"):
                logical += line.rstrip()[:-1] + " "
                continue
            argv = shlex.split(logical + line, comments=True)
            if tuple(argv[:3]) == PREFIX:
                commands.append(DocCommand(page, first, tuple(argv[3:])))
            logical, first = "", None
    return commands


def runnable_commands() -> list[DocCommand]:
    return [c for page in _pages() for c in commands_in(page.read_text(encoding="utf-8"), str(page.relative_to(REPO)))]


def split_command(argv: tuple[str, ...]) -> tuple[tuple[str, ...] | None, list[str]]:
    """(command words as in detexp.__main__.COMMANDS or None, the rest)."""
    words = next((w for w in COMMANDS if list(argv[: len(w)]) == list(w)), None)
    return words, list(argv[len(words) :] if words else argv)


@dataclass
class HydraArgs:
    overrides: list[str]
    multirun: bool = False
    cfg: str | None = None  # --cfg job|hydra|all
    config_dir: str | None = None  # -cd
    config_name: str | None = None  # -cn


def hydra_args(rest: list[str]) -> HydraArgs:
    out, args = HydraArgs([]), iter(rest)
    for arg in args:
        if arg in ("-m", "--multirun"):
            out.multirun = True
        elif arg in ("--cfg", "-c"):
            out.cfg = next(args)
        elif arg in ("-cd", "--config-dir"):
            out.config_dir = next(args)
        elif arg in ("-cn", "--config-name"):
            out.config_name = next(args)
        elif arg.startswith("-"):
            raise AssertionError(f"a Hydra flag this test does not know: {arg}")
        else:
            out.overrides.append(arg)
    return out


def sweep_jobs(args: HydraArgs) -> list[list[str]]:
    """The overrides of each job, as Hydra's basic sweeper splits a `-m` command line."""
    if not args.multirun:
        return [args.overrides]
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(args.overrides)
    return [list(job) for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


COMMANDS_IN_DOCS = runnable_commands()
PAGES_WITH_COMMANDS = sorted({c.page for c in COMMANDS_IN_DOCS})


def test_docs_mark_enough_runnable_commands_on_every_page_that_needs_them():
    assert len(COMMANDS_IN_DOCS) >= 15, [str(c) for c in COMMANDS_IN_DOCS]
    missing = [page for page in REQUIRED_PAGES if page not in PAGES_WITH_COMMANDS]
    assert not missing, f"no runnable block in {missing}"
    for command in COMMANDS_IN_DOCS:
        words, rest = split_command(command.argv)
        assert words is not None or rest in (["--help"], ["-h"]), f"{command}: not a detexp command"
        text = " ".join(command.argv)
        assert "~/data" not in text and "..." not in text, f"{command}: needs data that is not here; leave it unmarked"


def test_the_block_reader_sees_continuations_comments_and_quotes():
    text = (
        "```bash\npython -m detexp train  # not marked\n```\n" + MARK + "\n```bash\n"
        "python -m detexp train -m 'schedule.lr_steps=[16,22]','[8,11]'   # a comment\n"
        "mlflow ui --backend-store-uri sqlite:///$PWD/mlflow.db\n"
        "python -m detexp data check dataset=voc \\\n    dataset.root=shapes\n```\n"
    )
    commands = commands_in(text, "x.md")
    assert [c.argv for c in commands] == [
        ("train", "-m", "schedule.lr_steps=[16,22],[8,11]"),
        ("data", "check", "dataset=voc", "dataset.root=shapes"),
    ]
    assert [c.line for c in commands] == [6, 8]
    assert len(sweep_jobs(hydra_args(["-m", "optimizer.lr=0.01,0.02", "schedule.lr_steps=[16,22],[8,11]"]))) == 4
    with pytest.raises(AssertionError, match="just before"):
        commands_in(MARK + "\n\n```bash\npython -m detexp train\n```\n", "x.md")


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings (lower case, punctuation dropped, - for spaces)."""
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    headings = re.findall(r"^#+ (.+)$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_links_between_the_docs_reach_their_page_and_heading():
    broken = []
    for page in _pages():
        text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):  # http(s):, mailto:
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


# -- where a command runs ---------------------------------------------------------------------------


class Workspace:
    """A directory to run the docs' commands in, as a user's current directory, with a
    private shapes cache and MLflow store appended to every command."""

    def __init__(self, root: Path, cache: Path, store: Path):
        self.root, self.cache, self.store = root, cache, store
        self.uri = f"sqlite:///{store}"

    def resolve(self, argv: tuple[str, ...], ensure=None) -> list[str]:
        """``argv`` with its placeholders replaced; ``ensure(what)`` makes what is missing."""
        out = []
        for arg in argv:
            for placeholder in PLACEHOLDERS:
                if placeholder in arg:
                    arg = arg.replace(placeholder, self.newest(placeholder, ensure))
            if "models:/" in arg and ensure is not None and not self.registered():
                ensure("models:/")
            out.append(arg)
        return out

    def newest(self, placeholder: str, ensure=None) -> str:
        folder, marker = ("runs/train", "model_final.pt") if "train" in placeholder else ("runs/tune", "best_config.yaml")
        found = sorted(p.parent for p in (self.root / folder).glob(f"*/{marker}"))
        if not found and ensure is not None:
            ensure(placeholder)
            found = sorted(p.parent for p in (self.root / folder).glob(f"*/{marker}"))
        assert found, f"{placeholder}: {PLACEHOLDERS[placeholder]}, but there is none in {self.root}"
        return str(found[-1].relative_to(self.root))

    def registered(self) -> bool:
        from mlflow.tracking import MlflowClient

        if not self.store.exists():
            return False
        client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        return bool(client.search_model_versions(f"name='{REGISTERED}'"))

    def extra(self, words: tuple[str, ...], overrides: list[str], slow: bool = False) -> list[str]:
        """What is appended to a command: smoke sizes, the private cache and store."""
        config_name = COMMANDS[words][0]
        if config_name == "synth":
            return ["synth.num_train=8", "synth.num_val=4", "synth.image_size=96"]
        extra = []
        trains = config_name in ("train", "tune", "data_show")  # the train schema: experiments compose
        if trains and not any(o.startswith("+experiment=") for o in overrides):
            extra.append("+experiment=smoke")
        extra += [f"dataset.cache_dir={self.cache}", f"tracking.uri={self.uri}"]
        if slow and config_name in ("train", "tune"):
            extra += ["schedule.epochs=1", "dataset.synth.num_train=8", "dataset.synth.num_val=4"]
        if slow and config_name == "tune":
            extra += ["tune.num_samples=2"]
        return extra


def make_photos(root: Path) -> None:
    """``photos/``: three JPEGs standing for a user's own pictures."""
    from detexp.data.shapes import generate_shapes

    shapes = generate_shapes(root / ".photos-src", num_train=3, num_val=0, image_size=96)
    (root / PHOTOS).mkdir()
    for image in sorted((shapes / "JPEGImages").glob("*.jpg")):
        shutil.copy(image, root / PHOTOS / image.name)
    shutil.rmtree(shapes)


# -- the default suite: run the cheap commands, compose the others ----------------------------------


def compose_as_cli(config_name: str, overrides: list[str], config_dir: str | None = None) -> DictConfig:
    """What ``python -m detexp`` composes; ``config_dir`` is ``-cd`` (searched first, the
    packaged conf/ after it)."""
    register_configs()
    if config_dir is None:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(config_name=config_name, overrides=overrides)
    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
        return compose(config_name=config_name, overrides=[f"hydra.searchpath=[file://{CONF_DIR}]", *overrides])


def run_cheap_or_compose(command: DocCommand, ws: Workspace, help_outputs: HelpRuns) -> str:
    """Run ``command`` for real when that is cheap, else compose and check it. Returns which."""
    from detexp.checkpoint.effective_config import prepare_inference
    from detexp.commands.data_check import data_check
    from detexp.commands.data_show import data_show
    from detexp.commands.data_synth import data_synth
    from detexp.commands.predict import list_images
    from detexp.commands.train import check_train_config, find_data
    from detexp.commands.tune import check_search, check_tune_config
    from detexp.data.source import resolve

    argv = ws.resolve(command.argv)
    words, rest = split_command(tuple(argv))
    if words is None or "--help" in rest or "-h" in rest:
        out = help_outputs[tuple(argv)]
        assert out.returncode == 0 and out.stdout.startswith(("usage: python -m detexp", "python -m detexp")), (
            f"{command}\n{out.stdout[-2000:]}{out.stderr[-2000:]}"
        )
        return "run"
    args = hydra_args(rest)
    config_name = args.config_name or COMMANDS[words][0]
    for job in sweep_jobs(args):
        overrides = job + ws.extra(words, job)
        cfg = compose_as_cli(config_name, overrides, args.config_dir)
        if words == ("data", "synth"):
            out = data_synth(cfg)
            assert (out / "ImageSets" / "Main" / "train.txt").is_file()
        elif words == ("data", "check"):
            assert data_check(cfg) == 0, f"{command}: the docs' example has errors"
        elif words == ("data", "show"):
            stats = data_show(cfg, ws.root / "runs" / "data_show" / f"line{command.line}")
            assert stats["splits"]["train"]["images"] > 0
        elif words == ("train",):
            check_train_config(cfg)
            if args.cfg is None:  # a real run reads the split files next (shapes: generates them)
                resolve(cfg.dataset)
        elif words == ("tune",):
            base = check_tune_config(cfg)
            if args.cfg is None:  # as the command: the data found, then the search checked against it
                find_data(base)
                check_search(cfg.tune, base)
        elif words in (("eval",), ("predict",), ("export",), ("serve",)):
            prepare_inference(cfg, overrides)  # checkpoint, effective config, weights that fit
            if words == ("predict",):
                list_images(cfg.input)
        else:
            raise AssertionError(f"{command}: no check for {' '.join(words)}")
    return "run" if words[0] == "data" else "composed"


def register_checkpoint(ws: Workspace) -> None:
    """Version 1 of ``shapes``, laid out as ``train tracking.register_model=shapes`` lays it
    out (the detexp checkpoint in ``model/extra_files/``; eval and predict read only that),
    without the pickled model, which costs seconds to write and is tested elsewhere."""
    from detexp.tracking.mlflow_runs import MODEL_ARTIFACT, Tracker
    from test_predict import random_checkpoint

    files = ws.store.parent / "registered"
    random_checkpoint(files / "extra_files" / "model_best.pt")
    tracker = Tracker(ws.uri, "detexp")
    run_id = tracker.start("docs-registered", {}, {})
    tracker.log_artifact(files, MODEL_ARTIFACT)
    client = tracker.client
    client.create_registered_model(REGISTERED)
    client.create_model_version(REGISTERED, f"{client.get_run(run_id).info.artifact_uri}/{MODEL_ARTIFACT}", run_id=run_id)
    tracker.end()


class HelpRuns:
    """Every ``--help`` command of the docs, run for real as subprocesses, all started at
    once (they run while the other commands are composed)."""

    def __init__(self, cwd: Path):
        argvs = sorted({c.argv for c in COMMANDS_IN_DOCS if "--help" in c.argv or "-h" in c.argv})
        self.procs = {
            argv: subprocess.Popen([sys.executable, "-m", "detexp", *argv], cwd=cwd, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
            for argv in argvs
        }
        self.done: dict[tuple[str, ...], subprocess.CompletedProcess] = {}

    def __getitem__(self, argv: tuple[str, ...]) -> subprocess.CompletedProcess:
        if argv not in self.done:
            proc = self.procs[argv]
            stdout, stderr = proc.communicate(timeout=120)
            self.done[argv] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        return self.done[argv]


@pytest.fixture(scope="module")
def help_outputs(tmp_path_factory) -> HelpRuns:
    return HelpRuns(tmp_path_factory.mktemp("help"))


STAMP = "2000-01-01_00-00-00"  # the run directories the default suite's placeholders find


@pytest.fixture(scope="module")
def made_once(tmp_path_factory, shapes_cache) -> Workspace:
    """What every page's directory gets, made once: a train run directory (a random-init
    checkpoint), a tune directory (its best_config.yaml), photos/, and an MLflow store in
    which ``shapes`` version 1 is registered."""
    from detexp.commands.tune import write_best_config
    from detexp.config import TrainConfig
    from test_predict import random_checkpoint

    root = tmp_path_factory.mktemp("docs-made")
    ws = Workspace(root, shapes_cache, root / "mlflow" / "mlflow.db")
    ws.store.parent.mkdir()
    run_dir = root / "runs" / "train" / STAMP
    random_checkpoint(run_dir / "model_final.pt")
    (run_dir / "model_best.pt").symlink_to(run_dir / "model_final.pt")
    best = OmegaConf.merge(OmegaConf.structured(TrainConfig), compose_as_cli("train", ["+experiment=smoke"]))
    tune_dir = root / "runs" / "tune" / STAMP
    tune_dir.mkdir(parents=True)
    write_best_config(best, tune_dir, {"job": "t_00000", "best_value": 0.5, "best_epoch": 0, "overrides": ""}, "val/map_50")
    make_photos(root)
    register_checkpoint(ws)
    return ws


@pytest.fixture
def workspace(tmp_path, monkeypatch, made_once) -> Workspace:
    """A fresh current directory with links to what :func:`made_once` made."""
    root = tmp_path / "cwd"
    for rel in (f"runs/train/{STAMP}", f"runs/tune/{STAMP}", PHOTOS):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(made_once.root / rel, root / rel, symlinks=True, copy_function=os.link)
    monkeypatch.chdir(root)
    return Workspace(root, made_once.cache, made_once.store)


def check(command: DocCommand, ws: Workspace, help_outputs: HelpRuns) -> str:
    """:func:`run_cheap_or_compose`, failing with the page, line and command."""
    try:
        return run_cheap_or_compose(command, ws, help_outputs)
    except Exception as exc:  # noqa: BLE001 - any failure: say which command of which page
        raise AssertionError(f"{command}\n  {type(exc).__name__}: {exc}") from exc


@pytest.mark.parametrize("page", PAGES_WITH_COMMANDS)
def test_runnable_commands_of_each_page_run_or_compose(page, help_outputs, workspace):
    """Each page's commands in order, in one directory (a later one may read what an
    earlier one wrote, as for the reader)."""
    for command in (c for c in COMMANDS_IN_DOCS if c.page == page):
        check(command, workspace, help_outputs)


@pytest.mark.parametrize(("line", "named"), [
    ("python -m detexp train +experiment=smoke optimizer.lrr=0.1", "lrr"),
    ("python -m detexp train model=yolo", "yolo"),
    ("python -m detexp tune 'tune.search_space={optimizer.lrr: {choice: [0.1]}}'", "optimizer.lrr"),
    ("python -m detexp eval checkpoint=runs/train/<timestamp> dataset.val_splitt=test", "val_splitt"),
])
def test_a_command_the_code_no_longer_takes_fails_naming_page_and_line(line, named, help_outputs, workspace):
    (command,) = commands_in(f"{MARK}\n```bash\n{line}\n```\n", "docs/x.md")
    with pytest.raises(AssertionError, match=named) as failed:
        check(command, workspace, help_outputs)
    assert str(failed.value).startswith("docs/x.md:3: python -m detexp ")


# -- slow: every train, tune, eval and predict command for real ------------------------------------


# What each command prints when it has done its job.
DONE = {
    ("train",): "done:", ("tune",): "best trial", ("eval",): "metrics.json", ("predict",): "predictions.jsonl",
    ("export",): "parity.json",
}


def _slow_order(commands: list[DocCommand]) -> list[DocCommand]:
    """Getting started first (a user's first commands), then the README, then the rest."""
    first = ("docs/getting-started.md", "README.md")
    return sorted(commands, key=lambda c: (first.index(c.page) if c.page in first else len(first), c.page, c.line))


def _run(ws: Workspace, argv: list[str], timeout: int = 1200) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        [sys.executable, "-m", "detexp", *argv], cwd=ws.root, capture_output=True, text=True, timeout=timeout, env=env,
    )


@pytest.mark.slow
@pytest.mark.timeout(7200)
def test_runnable_commands_end_to_end(tmp_path):
    """Every runnable command (but ``--help`` and ``--cfg``) as a subprocess in one
    directory, in the docs' order, with smoke sizes appended: 1 epoch of 8 images, tune with
    2 trials. What a placeholder needs and no earlier command made is made first."""
    ws = Workspace(tmp_path / "cwd", tmp_path / "cache", tmp_path / "cwd" / "mlflow.db")
    ws.root.mkdir()
    make_photos(ws.root)
    done: dict[tuple[str, ...], str] = {}
    failures: list[str] = []

    def execute(argv: list[str], what: str) -> None:
        words, rest = split_command(tuple(argv))
        args = hydra_args(rest)
        full = [*argv, *ws.extra(words, args.overrides, slow=True)]
        if tuple(full) in done:
            return
        out = _run(ws, full)
        done[tuple(full)] = what
        text = out.stdout + out.stderr
        if out.returncode != 0 or DONE.get(words, "") not in text:
            failures.append(f"{what}\n  exit {out.returncode}: ...{text[-3000:]}")
        for ckpts in ws.root.glob("mlartifacts/*/artifacts/checkpoints"):  # copies nothing reads: 150 MB a file
            shutil.rmtree(ckpts)

    def ensure(what: str) -> None:
        made_by = {
            "runs/train/<timestamp>": ["train", "+experiment=smoke"],
            "runs/tune/<timestamp>": ["tune", "+experiment=smoke"],
            "models:/": ["train", "+experiment=smoke", f"tracking.register_model={REGISTERED}"],
        }[what]
        execute(made_by, f"(made for {what}) python -m detexp {shlex.join(made_by)}")

    try:
        for command in _slow_order(COMMANDS_IN_DOCS):
            words, rest = split_command(command.argv)
            if words is None or "--help" in rest or hydra_args(rest).cfg is not None:
                continue  # the default suite runs these
            if words == ("serve",):
                continue  # serves until Ctrl-C; tests/test_serve.py serves and stops it for real
            try:
                argv = ws.resolve(command.argv, ensure)
            except AssertionError as exc:  # what it needs was not made: an earlier failure says why
                failures.append(f"{command}\n  {exc}")
                continue
            execute(argv, str(command))
    finally:
        for heavy in ws.root.rglob("*.pt"):  # several GB in all; the logs and reports stay
            heavy.unlink()
    assert not failures, "\n\n".join(failures)
    assert len(done) >= 10, list(done.values())
