"""The docs stay true: every public name documented with an example, generated pages current, README commands."""

from __future__ import annotations

import importlib.util
import inspect
import re
from pathlib import Path

import pytest

import distrib

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", [n for n in distrib.__all__ if not n.startswith("__")])
def test_public_name_has_a_docstring_with_an_example(name):
    obj = getattr(distrib, name)
    doc = inspect.getdoc(obj) or ""
    assert doc, f"distrib.{name} has no docstring"
    assert "Example" in doc or ">>>" in doc, f"distrib.{name}'s docstring has no example"


def test_api_reference_is_current():
    spec = importlib.util.spec_from_file_location("gen_api_reference", ROOT / "docs" / "gen_api_reference.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    committed = (ROOT / "docs" / "reference" / "api.md").read_text()
    assert committed == module.render(), "run: python docs/gen_api_reference.py"


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.+?)\n```", readme)
    assert (
        commands[0].startswith("python -m pip install -c constraints.txt") and "distrib launch" in commands[0]
    )
    assert commands[1] == "python -m pytest"
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci


def test_every_docs_page_in_the_nav_exists():
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = re.findall(r":\s*([\w/.-]+\.md)", nav)
    missing = [p for p in pages if not (ROOT / "docs" / p).exists()]
    assert not missing, f"mkdocs.yml names pages that do not exist: {missing}"
