"""Test tiers and the fixtures that keep every test honest: no leaked scopes, process groups or environment.

Tiers, by directory (each test is marked with its tier):

* `unit/`: no processes started; the whole tier runs in under a minute (`nox -s unit`);
* `ranks/`: real processes over gloo through `distrib.testing.run_ranks` (2, 3 and 4 ranks), and
  one-process runs of the sharded strategies;
* `launch/`: `distrib launch`, torchrun, example scripts, fresh interpreters, crash tests;
* `gpu/`: needs CUDA; skipped elsewhere, run on the accelerator machine (`tests/gpu/run_gpu_tier.sh`).

Helpers shared by several test modules live in `_support/`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

#: test tiers, one directory each; every test gets the marker of its directory (`pytest -m unit`, ...)
TIERS = ("unit", "ranks", "launch", "gpu")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = Path(__file__).parent
    for item in items:
        parts = Path(item.fspath).relative_to(root).parts
        if parts and parts[0] in TIERS:
            item.add_marker(getattr(pytest.mark, parts[0]))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run on the accelerator machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _owned_by_tooling(name: str) -> bool:
    # pytest names the running test; torch's compiler caches set their own directories on first import
    return name == "PYTEST_CURRENT_TEST" or name.startswith("TORCHINDUCTOR_")


@pytest.fixture(autouse=True)
def _clean_state():
    before = dict(os.environ)
    yield
    from distrib import _runtime

    leaked_scopes = _runtime.depth()
    while _runtime.depth():
        _runtime._stack().pop()
    group_alive = torch.distributed.is_available() and torch.distributed.is_initialized()
    if group_alive:
        torch.distributed.destroy_process_group()
    added = {k for k in os.environ if k not in before and not _owned_by_tooling(k)}
    changed = {k for k in before if os.environ.get(k) != before[k] and not _owned_by_tooling(k)}
    for key in added:
        del os.environ[key]
    os.environ.update({k: before[k] for k in changed if k in before})
    assert not leaked_scopes, "a test left a distributed() scope open"
    assert not group_alive, "a test left a process group alive"
    assert not (added | changed), f"a test leaked environment variables: {sorted(added | changed)}"


# -- shared fixtures of the big-model tests (unit and gpu tiers) ---------------------------------------------


@pytest.fixture(scope="module")
def reference():
    """A small language-model-shaped network, a batch of ids and its outputs (`tests/_support/big_model.py`)."""
    from tests._support.big_model import make_reference

    return make_reference()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, reference):
    """The `reference` model saved in every checkpoint layout."""
    from tests._support.big_model import make_checkpoints

    return make_checkpoints(tmp_path_factory.mktemp("checkpoints"), reference[0])
