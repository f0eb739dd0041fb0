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
    added = {k for k in os.environ if k not in before}
    changed = {k for k in before if os.environ.get(k) != before[k]}
    os.environ.clear()
    os.environ.update(before)
    assert not leaked_scopes, "a test left a distributed() scope open"
    assert not group_alive, "a test left a process group alive"
    assert not (added | changed), f"a test leaked environment variables: {sorted(added | changed)}"
