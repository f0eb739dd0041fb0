"""Test fixtures that keep every test honest: no leaked scopes, process groups or environment."""

from __future__ import annotations

import os

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
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
