"""nox sessions: `nox -s tests` (the default suite), `nox -s slow` (long end-to-end
runs), `nox -s lint` (ruff)."""

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.default_venv_backend = "venv"


@nox.session
def tests(session):
    session.install("-e", ".[dev]")
    session.run("pytest", *session.posargs)


@nox.session
def slow(session):
    session.install("-e", ".[dev]")
    session.run("pytest", "-m", "slow", *session.posargs)


@nox.session
def lint(session):
    session.install("ruff")
    session.run("ruff", "check", "src", "tests", "benchmarks", "noxfile.py")
