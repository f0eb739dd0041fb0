"""Every registered strategy module imports without its backend and defines the whole contract."""

from __future__ import annotations

import importlib

import pytest

from distrib import strategies

OPTIONAL_HOOKS = ("no_sync", "wrap_dataloader")


@pytest.mark.parametrize("name", sorted(strategies.REGISTRY))
def test_strategy_module_defines_the_contract(name: str):
    module = strategies.load(name)
    assert name == module.NAME
    missing = [f for f in strategies.REQUIRED_FUNCTIONS if not callable(getattr(module, f, None))]
    assert not missing, f"strategy {name!r} lacks {missing}"
    assert isinstance(getattr(module, "CHECKPOINT_WORLD_SIZE_DEPENDENT", None), bool), name
    for hook in OPTIONAL_HOOKS:
        function = getattr(module, hook, None)
        assert function is None or callable(function), f"{name}.{hook} is defined but not callable"
    assert isinstance(module.is_available(), bool)
    if not module.is_available():
        reason = module.unavailable_reason()
        assert "pip install" in reason or "torch" in reason, reason
    public = getattr(module, "__all__", [])
    assert all(hasattr(module, n) for n in public), f"{name}.__all__ names something undefined"


def test_unknown_strategy_lists_the_registered_ones():
    from distrib.errors import SettingsError

    with pytest.raises(SettingsError, match="fsdp, deepspeed, xla"):
        strategies.load("zero")
    assert importlib.import_module("distrib.strategies.fsdp").NAME == "fsdp"
