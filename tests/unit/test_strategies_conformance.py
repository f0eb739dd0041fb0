"""Every registered strategy module imports without its backend and defines the whole contract.

mypy checks the same against `strategies._contract.Strategy` (statically, with signatures); this test
checks it at run time, as a registry user sees the modules."""

from __future__ import annotations

import importlib

import pytest
import torch

from distrib import strategies
from distrib.strategies import DataLoaderWrapper, GradientSyncControl, Strategy

CONTRACT = [
    name for name in dir(Strategy) if not name.startswith("_") and callable(getattr(Strategy, name, None))
]


def test_the_contract_was_read():
    assert {"prepare_training", "precision_plan", "check_model", "collective_device"} <= set(CONTRACT)


@pytest.mark.parametrize("name", sorted(strategies.REGISTRY))
def test_strategy_module_defines_the_contract(name: str):
    module = strategies.load(name)
    assert name == module.NAME
    missing = [f for f in CONTRACT if not callable(getattr(module, f, None))]
    assert not missing, f"strategy {name!r} lacks {missing}"
    assert isinstance(module.CHECKPOINT_WORLD_SIZE_DEPENDENT, bool), name
    assert isinstance(module.is_available(), bool)
    if not module.is_available():
        reason = module.unavailable_reason()
        assert "pip install" in reason or "torch" in reason, reason


def test_abilities_are_found_by_protocol():
    by_name = {name: strategies.load(name) for name in strategies.REGISTRY}
    assert {n for n, m in by_name.items() if isinstance(m, GradientSyncControl)} == {
        "ddp",
        "fsdp",
        "deepspeed",
    }
    assert {n for n, m in by_name.items() if isinstance(m, DataLoaderWrapper)} == {"xla"}


def test_unknown_strategy_lists_the_registered_ones():
    from distrib.errors import SettingsError

    with pytest.raises(SettingsError, match="fsdp, deepspeed, xla"):
        strategies.load("zero")
    assert importlib.import_module("distrib.strategies.fsdp").NAME == "fsdp"


def test_collectives_of_cuda_runs_use_the_device_and_gloo_runs_the_cpu():
    cuda, cpu = torch.device("cuda", 1), torch.device("cpu")
    for name in ("single", "ddp", "fsdp", "deepspeed"):
        module = strategies.load(name)
        assert module.collective_device(cuda) == cuda, name  # cpu:gloo,cuda:nccl: CUDA tensors go over NCCL
        assert module.collective_device(cpu) == cpu, name
