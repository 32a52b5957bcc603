"""nox sessions: `nox -s tests` (the default suite), `nox -s slow` (long end-to-end
runs), `nox -s lint` (ruff, and import-linter's layers contract from pyproject.toml)."""

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.default_venv_backend = "venv"


@nox.session
def tests(session):
    session.install("-e", ".[dev]")
    session.run("pytest", *session.posargs)


@nox.session
def slow(session):
    session.install("-e", ".[dev,cluster]")  # tests/test_cluster.py submits a Ray job
    session.run("pytest", "-m", "slow", *session.posargs)


@nox.session
def lint(session):
    session.install("ruff", "import-linter")
    session.run("ruff", "check", "src", "tests", "benchmarks", "noxfile.py")
    # grimp reads the source; it needs the package on the path, not installed.
    session.run("lint-imports", env={"PYTHONPATH": "src"})
