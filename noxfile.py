"""Developer sessions; `tests`, `lint`, `typecheck`, `examples` and `docs` mirror CI."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typecheck", "examples", "docs"]
nox.options.reuse_existing_virtualenvs = True
CONSTRAINTS = ("-c", "constraints.txt")


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite (the README's test command)."""
    session.install(*CONSTRAINTS, "-e", ".[test]")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def unit(session: nox.Session) -> None:
    """The unit tier only (tests/unit: no processes; under a minute)."""
    session.install(*CONSTRAINTS, "-e", ".[test]")
    session.run("python", "-m", "pytest", "tests/unit", "-q", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    session.install("ruff")
    session.run("ruff", "check", "distrib", "tests", "examples", "benchmarks", "noxfile.py", "docs")
    session.run(
        "ruff", "format", "--check", "distrib", "tests", "examples", "benchmarks", "noxfile.py", "docs"
    )


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy over the package."""
    session.install(*CONSTRAINTS, "-e", ".", "mypy", "types-PyYAML")
    session.run("mypy", "distrib")


@nox.session
def examples(session: nox.Session) -> None:
    """Run every example on 2 CPU processes."""
    session.install(*CONSTRAINTS, "-e", ".[test]")
    session.run("python", "-m", "pytest", "tests/launch/test_examples.py", *session.posargs)


@nox.session
def docs(session: nox.Session) -> None:
    """Regenerate the reference pages and build the site; warnings fail the build."""
    session.install(*CONSTRAINTS, "-e", ".[docs]")
    session.run("python", "docs/gen_api_reference.py")
    session.run("python", "docs/gen_cli_reference.py")
    session.run("mkdocs", "build", "--strict")


@nox.session
def benchmarks(session: nox.Session) -> None:
    """Overhead against raw PyTorch (and Accelerate) in the same run; writes docs/benchmarks.md."""
    session.install(*CONSTRAINTS, "-e", ".[test]", "accelerate")
    session.run("python", "benchmarks/run_all.py", *session.posargs, env={"ACCELERATE_USE_CPU": "true"})


@nox.session
def xla(session: nox.Session) -> None:
    """Opt-in (not in CI): the `xla`-marked tests on torch_xla's CPU device (PJRT_DEVICE=CPU).

    torch_xla must match torch exactly, so this session builds its own environment with torch 2.9 and
    torch_xla 2.9 (a large download) instead of the pinned CPU torch of the other sessions.
    """
    session.install("torch==2.9.*", "torch_xla==2.9.*", "-e", ".", "pytest>=8", "pytest-timeout>=2.3")
    paths = ("tests/unit/test_xla.py", *session.posargs)
    session.run("python", "-m", "pytest", "-m", "xla", *paths, env={"PJRT_DEVICE": "CPU"})
