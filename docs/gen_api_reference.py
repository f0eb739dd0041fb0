"""Write docs/reference/api.md from the docstrings of everything `distrib` exports.

Run `python docs/gen_api_reference.py`; `tests/unit/test_docs.py` fails when the committed page is stale.
"""

from __future__ import annotations

import inspect
import sys
import textwrap
from pathlib import Path

OUT = Path(__file__).parent / "reference" / "api.md"

SECTIONS = {
    "Scope and runtime": ("_scope", "_runtime", "_settings", "_options"),
    "Training": ("_prepare", "_training", "_precision", "_data"),
    "N-D parallelism": ("parallel",),
    "Collectives": ("_collectives",),
    "Process control": ("_process",),
    "Checkpoints": ("checkpointing",),
    "Launching": ("_launch",),
    "Big-model inference": ("big_modeling",),
    "Tracking, logging and profiling": ("_tracking", "_logging", "_progress", "_profiler"),
}


def _section(module: str) -> str:
    inner = module.removeprefix("distrib.")
    for title, prefixes in SECTIONS.items():
        if inner.startswith(prefixes):
            return title
    return "Other"


def _signature(obj: object) -> str:
    try:
        return str(inspect.signature(obj))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return ""


def _markdown(doc: str) -> str:
    """Turn the reST-style `Example::` block that ends each docstring into a fenced code block."""
    if "::" not in doc:
        return doc.strip()
    head, _, code = doc.partition("::")
    return f"{head.rstrip()}:\n\n```python\n{textwrap.dedent(code).strip()}\n```"


def render() -> str:
    import distrib

    grouped: dict[str, list[str]] = {title: [] for title in [*SECTIONS, "Other"]}
    for name in distrib.__all__:
        if name.startswith("__"):
            continue
        obj = getattr(distrib, name)
        kind = "class" if inspect.isclass(obj) else "function"
        doc = _markdown(inspect.cleandoc(obj.__doc__ or ""))
        entry = f"### `{name}`\n\n```python\n{kind} {name}{_signature(obj)}\n```\n\n{doc}\n"
        grouped[_section(getattr(obj, "__module__", ""))].append(entry)
    parts = ["# Python API reference\n", "Generated from the docstrings by `docs/gen_api_reference.py`.\n"]
    for title, entries in grouped.items():
        if entries:
            parts.append(f"## {title}\n")
            parts.extend(entries)
    return "\n".join(parts)


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        sys.exit(0 if OUT.read_text() == text else 1)
    OUT.write_text(text)
