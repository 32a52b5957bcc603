"""The MLflow UI in a real browser: ``mlflow ui`` on the store of the session's one smoke
training run (conftest.py's ``trained_smoke``), driven by headless Chromium through
Playwright, checking what a user sees: the experiment in the experiments list, the run's
page with its name and ``val/map_50``, and the end-of-training report in its artifacts.

The browser is Debian's ``chromium`` (``.ci/run`` installs it; never ``playwright install``).
Full-page screenshots of each view go to ``$DETEXP_TEST_ARTIFACTS`` (default
``<repo>/test-artifacts/ui/``).

MLflow 3.x UI routes relied on (hash router): ``#/experiments`` (the list, each name a link
to ``#/experiments/<id>``), ``#/experiments/<id>/runs/<run_id>`` (the run's Overview tab:
the run name as a heading, a "Search metrics" box over the metrics table) and
``.../runs/<run_id>/artifacts`` (the artifact tree, whose nodes carry
``data-testid="artifact-tree-node"`` and ``artifact-name="<basename>"``; a selected image
is previewed as an ``<img>`` under a title with its full artifact path).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient
from playwright.sync_api import Browser, Page, expect, sync_playwright

REPO = Path(__file__).resolve().parents[1]
WAIT_MS = 30_000  # for anything the UI has to fetch and render
SERVER_START_S = 90  # `mlflow ui` imports a lot: ~15 s on 2 idle cores, over 30 s on busy ones
CHROMIUM_ARGS = [
    "--no-sandbox",  # tests run as root in CI, where Chromium's sandbox refuses to start
    "--disable-dev-shm-usage",  # containers' /dev/shm is small
    "--disable-gpu",
]


def _artifacts_dir() -> Path:
    out = Path(os.environ.get("DETEXP_TEST_ARTIFACTS") or REPO / "test-artifacts" / "ui")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 40) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's own process group (`mlflow ui` runs uvicorn as a child), then SIGKILL."""
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


# Checked before any fixture, so that a machine without the browser skips before training.
pytestmark = pytest.mark.skipif(
    shutil.which("chromium") is None,
    reason="no `chromium` on PATH: .ci/run installs Debian's chromium package (apt-get install chromium)",
)


@pytest.fixture(scope="module")
def chromium() -> str:
    return shutil.which("chromium")


@contextlib.contextmanager
def _mlflow_ui(uri: str, cwd: Path) -> Iterator[str]:
    """`mlflow ui` on the store at ``uri``, stopped afterwards; its base address."""
    log = cwd / "server.log"
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]
    env = {
        **os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
        # no job runners: MLflow 3 otherwise starts 7 huey consumer processes (for GenAI
        # judges and trace rollups), which double the start-up time on 2 cores
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"`mlflow ui` exited with {proc.returncode} before answering:\n{_tail(log)}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as response:  # noqa: S310 - our server
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"`mlflow ui` did not answer {base}/health within {SERVER_START_S} s:\n{_tail(log)}")
            time.sleep(0.5)
        yield base
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def ui(trained_smoke, chromium, tmp_path_factory) -> Iterator[SimpleNamespace]:
    """`mlflow ui` on the smoke run's SQLite store, killed at teardown; what the pages should show."""
    client = MlflowClient(tracking_uri=trained_smoke.uri)
    run = client.get_run(trained_smoke.result["run_id"])
    experiment = client.get_experiment(run.info.experiment_id)
    cwd = tmp_path_factory.mktemp("mlflow-ui")  # anything the server writes beside itself lands here
    with _mlflow_ui(trained_smoke.uri, cwd) as base:
        yield SimpleNamespace(
            base=base, client=client, run=run, experiment=experiment,
            classes=list(trained_smoke.cfg.dataset.classes), log=cwd / "server.log",
        )


@pytest.fixture(scope="module")
def browser(chromium) -> Iterator[Browser]:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1400, "height": 1100})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    try:
        yield page
    finally:
        context.close()


def _screenshot(page: Page, name: str, capsys) -> Path:
    path = _artifacts_dir() / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    with capsys.disabled():
        print(f"\nscreenshot: {path}")
    return path


def test_the_experiments_page_lists_the_experiment(ui, page, capsys):
    page.goto(f"{ui.base}/#/experiments")
    link = page.get_by_role("link", name=ui.experiment.name, exact=True)
    expect(link).to_be_visible(timeout=WAIT_MS)
    expect(link).to_have_attribute("href", f"#/experiments/{ui.experiment.experiment_id}")
    _screenshot(page, "experiments", capsys)


def test_the_run_page_shows_its_name_and_val_map_50(ui, page, capsys):
    run_id = ui.run.info.run_id
    page.goto(f"{ui.base}/#/experiments/{ui.experiment.experiment_id}/runs/{run_id}")
    expect(page.get_by_role("heading", name=ui.run.info.run_name, exact=True)).to_be_visible(timeout=WAIT_MS)
    expect(page.get_by_text(run_id, exact=True)).to_be_visible(timeout=WAIT_MS)

    value = ui.run.data.metrics["val/map_50"]  # the last epoch's, as the table shows it
    shown = page.evaluate("v => String(v)", value)  # the UI prints the number as JavaScript does
    page.get_by_placeholder("Search metrics").fill("val/map_50")
    row = (
        page.get_by_role("row")
        .filter(has=page.get_by_role("cell", name="val/map_50", exact=True))
        .filter(has=page.get_by_role("cell", name=shown, exact=True))
    )
    expect(row).to_be_visible(timeout=WAIT_MS)
    row.scroll_into_view_if_needed()
    _screenshot(page, "run", capsys)


def _node(page: Page, name: str):
    return page.locator(f'[data-testid="artifact-tree-node"][artifact-name="{name}"]')


def _preview(page: Page, path: str, name: str, capsys) -> None:
    """Select artifact `path` in the tree and check that its image is shown."""
    _node(page, path.rsplit("/", 1)[-1]).click()
    expect(page.get_by_text(path, exact=True)).to_be_visible(timeout=WAIT_MS)  # the preview's title
    image = page.locator('img[src^="blob:"]').first  # the artifact's bytes, fetched from the server
    expect(image).to_be_visible(timeout=WAIT_MS)
    expect(image).to_have_js_property("complete", True, timeout=WAIT_MS)
    assert image.evaluate("img => img.naturalWidth") > 0, f"{path} did not decode as an image"
    _screenshot(page, name, capsys)


def test_the_artifacts_view_shows_the_report(ui, page, capsys):
    run_id = ui.run.info.run_id
    page.goto(f"{ui.base}/#/experiments/{ui.experiment.experiment_id}/runs/{run_id}/artifacts")
    expect(_node(page, "eval")).to_be_visible(timeout=WAIT_MS)
    _node(page, "eval").click()
    expect(_node(page, "pr_curves")).to_be_visible(timeout=WAIT_MS)
    _node(page, "pr_curves").click()
    for name in ui.classes:
        expect(_node(page, f"pr_{name}.png")).to_be_visible(timeout=WAIT_MS)
    _preview(page, f"eval/pr_curves/pr_{ui.classes[0]}.png", "artifacts_pr_curve", capsys)

    logged = {item.path for item in ui.client.list_artifacts(run_id, "eval")}
    assert "eval/confusion_matrix.png" in logged, f"training logged no eval/confusion_matrix.png: {sorted(logged)}"
    expect(_node(page, "confusion_matrix.png")).to_be_visible(timeout=WAIT_MS)
    _preview(page, "eval/confusion_matrix.png", "artifacts_confusion_matrix", capsys)


# -- a sweep, as a user compares it --------------------------------------------------------


@pytest.fixture(scope="module")
def sweep(chromium, shapes_cache, tmp_path_factory) -> Iterator[SimpleNamespace]:
    """A two-job `train -m` sweep over the learning rate, as a user types it, and `mlflow ui`
    on its store opened at the address the command printed."""
    root = tmp_path_factory.mktemp("sweep")
    out = subprocess.run(
        [sys.executable, "-m", "detexp", "train", "-m", "+experiment=smoke", "optimizer.lr=0.01,0.02",
         f"dataset.cache_dir={shapes_cache}", "schedule.epochs=1", "eval_at_end=false",
         "dataset.synth.num_train=16", "dataset.synth.num_val=8", "tracking.system_metrics=false"],
        cwd=root, capture_output=True, text=True, timeout=900,
        env={**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="ru", dir="/tmp")},
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    page = re.search(r"then open http://127\.0\.0\.1:5000/(#/experiments/\S+)", out.stdout + out.stderr)[1]
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("detexp").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    with _mlflow_ui(uri, root) as base:
        yield SimpleNamespace(url=f"{base}/{page}", parent=parent, children=children)


def _cell(page: Page, run_id: str, column: str):
    """The runs table's cell of ``column`` in the row of ``run_id`` (the table is an ag-grid
    whose rows carry the run id)."""
    return page.locator(f'.ag-row[row-id="{run_id}"] [col-id="{column}"]')


@pytest.mark.slow
def test_a_sweep_reads_as_one_row_with_its_best_value_and_a_named_child_per_job(sweep, browser, capsys):
    # wide: the runs table draws only the columns in view, and the metrics come last
    context = browser.new_context(viewport={"width": 2000, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    try:
        _check_sweep(page, sweep, capsys)
    finally:
        context.close()


def _check_sweep(page: Page, sweep: SimpleNamespace, capsys) -> None:
    page.goto(sweep.url)
    expect(page.get_by_text("Model training", exact=True)).to_be_visible(timeout=WAIT_MS)
    name = sweep.parent.info.run_name
    assert re.fullmatch(r"sweep lr \d\d-\d\d \d\d:\d\d", name), name
    expect(_cell(page, sweep.parent.info.run_id, "attributes.`Run Name`")).to_contain_text(name, timeout=WAIT_MS)
    assert len(sweep.children) == 2

    # the metric a user compares on, as a column: the parent shows the best child's value
    page.get_by_role("button", name="Columns").click()
    page.get_by_placeholder("Search columns").fill("val/map_50")
    page.get_by_text("val/map_50", exact=True).click()  # the one metric of that name (best/val_map_50 is another)
    page.keyboard.press("Escape")
    best = max(c.data.metrics["val/map_50"] for c in sweep.children)
    column = "metrics.`val/map_50`"
    expect(_cell(page, sweep.parent.info.run_id, column)).to_have_text(page.evaluate("v => String(v)", best),
                                                                       timeout=WAIT_MS)

    # expanded, each job is a child named by the value it swept
    _cell(page, sweep.parent.info.run_id, "attributes.`Run Name`").locator("button").first.click()
    for child in sweep.children:
        lr = child.data.params["optimizer.lr"]
        expect(_cell(page, child.info.run_id, "attributes.`Run Name`")).to_contain_text(f"lr={lr}", timeout=WAIT_MS)
        shown = page.evaluate("v => String(v)", child.data.metrics["val/map_50"])
        expect(_cell(page, child.info.run_id, column)).to_have_text(shown, timeout=WAIT_MS)
    _screenshot(page, "sweep", capsys)
