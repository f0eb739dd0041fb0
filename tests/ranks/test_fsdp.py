"""FSDP2 strategy: unit choice and options without processes, prepare on one in-process rank, and the
same loop on 2 and 4 real gloo processes compared with DDP (every sharding mode, bf16, CPU offload,
activation checkpointing, meta-device init, accumulation and clipping)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from distrib import FSDPOptions, Settings, distributed, prepare, unwrap_model
from distrib._environment import launcher_settings
from distrib.errors import PrepareError, SettingsError
from distrib.strategies import _fsdp_wrap
from distrib.testing import run_ranks
from tests._support.models import (
    WIDTH,
    TinyNet,
    changed_from_init,
    make_loader,
    make_model,
    max_difference,
    run_loop,
    train,
)

# -- units and options, no processes ---------------------------------------------------------------


class DecoderLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Linear(4, 4)
        self.mlp = nn.Linear(4, 4)


class Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.layers = nn.ModuleList([DecoderLayer() for _ in range(2)])


def test_default_units_are_the_transformer_blocks_of_common_model_families():
    net = TinyNet()
    assert _fsdp_wrap.find_units(net, FSDPOptions()) == list(net.blocks)
    decoder = Decoder()
    assert _fsdp_wrap.find_units(decoder, FSDPOptions()) == list(decoder.layers)
    assert _fsdp_wrap.find_units(nn.Sequential(nn.Linear(2, 2)), FSDPOptions()) == []


def test_units_by_class_name_size_and_policy():
    decoder = Decoder()
    by_name = _fsdp_wrap.find_units(decoder, FSDPOptions(wrap_classes=("Embedding", "DecoderLayer")))
    assert by_name == [decoder.embed, *decoder.layers]
    # each DecoderLayer holds 40 parameters, each Linear 20: the Linears fill the threshold first
    by_size = _fsdp_wrap.find_units(decoder, FSDPOptions(min_num_params=20))
    assert by_size == [decoder.embed, decoder.layers[0].attn, decoder.layers[0].mlp,
                       decoder.layers[1].attn, decoder.layers[1].mlp]  # fmt: skip
    assert _fsdp_wrap.find_units(decoder, FSDPOptions(min_num_params=40)) == [decoder.embed, *decoder.layers]
    by_policy = _fsdp_wrap.find_units(decoder, FSDPOptions(auto_wrap_policy=lambda m: m is decoder.embed))
    assert by_policy == [decoder.embed]


def test_a_class_name_that_matches_nothing_lists_the_names_present():
    with pytest.raises(
        SettingsError, match=r"'LlamaDecoderLayer'.*does not contain.*DecoderLayer, Embedding"
    ):
        _fsdp_wrap.find_units(Decoder(), FSDPOptions(wrap_classes=("LlamaDecoderLayer",)))


def test_options_are_validated_and_read_from_dicts_and_the_launcher():
    with pytest.raises(SettingsError, match="give only one way"):
        FSDPOptions(wrap_classes=("Block",), min_num_params=10)
    with pytest.raises(SettingsError, match="only applies to sharding='hybrid'"):
        FSDPOptions(hybrid_shard_size=2)
    with pytest.raises(SettingsError, match="'full', 'grad_op', 'hybrid', 'no_shard'"):
        FSDPOptions(sharding="zero3")  # type: ignore[arg-type]
    with pytest.raises(SettingsError, match="unknown setting 'shard' for FSDPOptions"):
        Settings.from_mapping({"strategy": "fsdp", "fsdp": {"shard": "full"}})
    settings = Settings.from_mapping({"fsdp": {"sharding": "hybrid", "hybrid_shard_size": 2}})
    assert settings.fsdp == FSDPOptions(sharding="hybrid", hybrid_shard_size=2)
    env = launcher_settings(
        {"DISTRIB_STRATEGY": "fsdp", "DISTRIB_FSDP": '{"sharding": "grad_op", "cpu_offload": true}'}
    )
    assert env["fsdp"] == FSDPOptions(sharding="grad_op", cpu_offload=True)


def test_hybrid_groups_must_divide_the_processes_and_reduce_dtype_needs_mixed_precision():
    with pytest.raises(SettingsError, match="multiple of the shard group size"):
        _fsdp_wrap.build_mesh(FSDPOptions(sharding="hybrid", hybrid_shard_size=3), 4, 4, "cpu")
    policy = _fsdp_wrap.mixed_precision_policy(torch.bfloat16, None)
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert _fsdp_wrap.mixed_precision_policy(torch.bfloat16, "bf16").reduce_dtype == torch.bfloat16
    assert _fsdp_wrap.mixed_precision_policy(None, None) is None
    with pytest.raises(SettingsError, match="reduce_dtype='bf16' needs mixed_precision"):
        _fsdp_wrap.mixed_precision_policy(None, "bf16")


# -- one in-process rank ---------------------------------------------------------------------------


def test_prepare_shards_in_place_and_repoints_an_optimizer_built_before():
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    with distributed(strategy="fsdp"):
        model = make_model()
        optimizer = torch.optim.AdamW(
            [
                {"params": model.blocks.parameters(), "lr": 0.1, "weight_decay": 0.5},
                {"params": model.head.parameters(), "lr": 0.01},
            ]
        )
        prepared, prepared_optimizer = prepare(model, optimizer)
        assert prepared is model and unwrap_model(prepared) is model
        assert isinstance(model, FSDPModule) and isinstance(model.blocks[0], FSDPModule)
        assert all(isinstance(p, DTensor) for p in model.parameters())
        groups = prepared_optimizer.param_groups
        assert [id(p) for p in groups[0]["params"]] == [id(p) for p in model.blocks.parameters()]
        assert [id(p) for p in groups[1]["params"]] == [id(p) for p in model.head.parameters()]
        assert (groups[0]["lr"], groups[0]["weight_decay"], groups[1]["lr"]) == (0.1, 0.5, 0.01)
        before = model.head.weight.full_tensor().clone()
        run_loop(prepared, prepared_optimizer, prepare(make_loader()))
        assert not torch.equal(before, model.head.weight.full_tensor())

        # an optimizer built before sharding but prepared in a later call is re-pointed too
        second = make_model(1)
        late_optimizer = torch.optim.SGD(second.parameters(), lr=0.1)
        prepare(second)
        prepare(late_optimizer)
        assert [id(p) for p in late_optimizer.param_groups[0]["params"]] == [
            id(p) for p in second.parameters()
        ]


def test_prepare_refuses_a_stepped_optimizer_and_a_model_sharded_by_hand():
    from torch.distributed.fsdp import fully_shard

    with distributed(strategy="fsdp"):
        model = make_model()
        optimizer = torch.optim.Adam(model.parameters())
        model(torch.randn(2, 8)).sum().backward()
        optimizer.step()
        with pytest.raises(PrepareError, match="already stepped"):
            prepare(model, optimizer)
        sharded = fully_shard(make_model())
        with pytest.raises(PrepareError, match=r"already wrapped by fully_shard\(\) \(FSDP2\)"):
            prepare(sharded)


def test_accumulation_micro_steps_skip_the_reduce_scatter(monkeypatch: pytest.MonkeyPatch):
    from torch.distributed.fsdp import FSDPModule

    calls: list[bool] = []
    real = FSDPModule.set_requires_gradient_sync

    def record(self: FSDPModule, requires: bool, **kwargs: Any) -> None:
        calls.append(requires)
        real(self, requires, **kwargs)

    monkeypatch.setattr(FSDPModule, "set_requires_gradient_sync", record)
    with distributed(strategy="fsdp", gradient_accumulation_steps=2):
        model = make_model()
        prepared = prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), make_loader())
        run_loop(*prepared)
    assert calls == [False, True] * 8  # 16 micro-batches: off for the first of each window, then back on


def test_compile_runs_per_unit_before_sharding(monkeypatch: pytest.MonkeyPatch):
    from torch.distributed.fsdp import FSDPModule

    compiled: list[tuple[nn.Module, bool]] = []
    monkeypatch.setattr(
        nn.Module, "compile", lambda self, *a, **k: compiled.append((self, isinstance(self, FSDPModule)))
    )
    for settings in ({"fsdp": FSDPOptions(compile=True)}, {"compile": {"regional": True}}):
        compiled.clear()
        with distributed(strategy="fsdp", **settings):
            model = prepare(make_model())
            assert [m for m, _ in compiled] == list(model.blocks)
            assert not any(sharded for _, sharded in compiled), "torchtitan's order: compile, then shard"
    with (
        distributed(strategy="fsdp", fsdp=FSDPOptions(activation_checkpointing=True)),
        pytest.raises(SettingsError, match="has none besides the root"),
    ):
        prepare(nn.Sequential(nn.Linear(2, 2)))


# -- real processes --------------------------------------------------------------------------------

MODES: dict[str, dict[str, Any]] = {
    "full": {},
    "grad_op": {"sharding": "grad_op"},
    "no_shard": {"sharding": "no_shard"},
    "hybrid": {"sharding": "hybrid", "hybrid_shard_size": 1},
    "cpu_offload": {"cpu_offload": True},
    "activation_checkpointing": {"activation_checkpointing": True, "wrap_classes": ["Block"]},
    "min_num_params": {"min_num_params": 50},
}


def _local_fraction(model: nn.Module) -> float:
    local = sum(p.to_local().numel() for p in model.parameters())
    return local / sum(p.numel() for p in model.parameters())


def _meta_model(rank0_real: bool) -> nn.Module:
    if rank0_real and dist.get_rank() == 0:
        return make_model()
    with torch.device("meta"):
        return TinyNet()


def _meta_init_checks() -> dict[str, Any]:
    """Every rank on meta: shards are allocated, then initialised by reset_parameters."""
    with distributed(strategy="fsdp"):
        model = prepare(_meta_model(rank0_real=False))
        block = model.blocks[0]
        weight = block.linear.weight.to_local()
        return {
            "in_bounds": bool((weight.abs() <= WIDTH**-0.5 + 1e-6).all()) and weight.std().item() > 0.05,
            "norm_reset": bool((block.norm.weight.to_local() == 1).all()),
            "fraction": _local_fraction(model),
        }


def _equivalence_worker() -> dict[str, Any]:
    dist.init_process_group("gloo")
    try:
        out: dict[str, Any] = {}
        common = {"clip": 0.5, "gradient_accumulation_steps": 2}
        reference, out["ddp_norms"] = train("ddp", **common)
        for name, options in MODES.items():
            state, norms = train("fsdp", fsdp=options, **common)
            out[name] = (state is None or max_difference(state, reference), norms)
        state, _ = train("fsdp", model=_meta_model(rank0_real=True), **common)
        out["meta_rank0"] = state is None or max_difference(state, reference)
        out["meta_all"] = _meta_init_checks()
        # bf16 is compared with fp32 training, next to the distance DDP's bf16 autocast has from it
        fp32_reference, _ = train("ddp", sgd=True)
        ddp_bf16, _ = train("ddp", mixed_precision="bf16", sgd=True)
        seen: list[torch.dtype] = []
        model = make_model()
        model.blocks[0].linear.register_forward_pre_hook(lambda m, args: seen.append(m.weight.dtype))
        state, _ = train("fsdp", mixed_precision="bf16", model=model, sgd=True)
        if state is not None:
            out["bf16"] = {
                "fsdp_error": max_difference(state, fp32_reference),
                "ddp_error": max_difference(ddp_bf16, fp32_reference),
                "moved": changed_from_init(fp32_reference),
                "compute_dtype": seen[0],
            }
        out["trained"] = reference is None or changed_from_init(reference)
        return out
    finally:
        dist.barrier()
        dist.destroy_process_group()


def test_every_sharding_mode_trains_like_ddp_on_two_processes():
    results = run_ranks(_equivalence_worker, 2, timeout=240)
    out = results[0]
    assert out["trained"] > 1e-2  # the reference moved: the comparisons below are not vacuous
    for name in MODES:
        difference, norms = out[name]
        assert difference < 1e-5, f"{name}: parameters differ from DDP by {difference}"
        assert norms == pytest.approx(out["ddp_norms"], rel=1e-5), name
    assert out["meta_rank0"] < 1e-5
    meta = out["meta_all"]
    assert meta["in_bounds"] and meta["norm_reset"], meta
    assert meta["fraction"] < 0.6  # each rank holds about half of the parameters
    bf16 = out["bf16"]
    assert bf16["compute_dtype"] == torch.bfloat16  # FSDP's mixed-precision policy gathered bf16 params
    # FSDP computes in bf16 throughout (parameters cast, activations too), DDP only where autocast does:
    # both land within bf16's noise of fp32 training, which is small next to how far training moved
    assert bf16["fsdp_error"] < 2 * bf16["ddp_error"] + 1e-3
    assert bf16["fsdp_error"] < 0.3 * bf16["moved"]


def _hybrid_worker() -> dict[str, Any]:
    dist.init_process_group("gloo")
    try:
        reference, _ = train("ddp", batch_size=1, gradient_accumulation_steps=2)
        state, _ = train(
            "fsdp", batch_size=1, gradient_accumulation_steps=2,
            fsdp={"sharding": "hybrid", "hybrid_shard_size": 2},
        )  # fmt: skip
        with distributed(strategy="fsdp", fsdp={"sharding": "hybrid", "hybrid_shard_size": 2}) as ctx:
            model = prepare(make_model())
            mesh = ctx.state.strategy_state.mesh
            fraction = _local_fraction(model)
        return {
            "difference": state is None or max_difference(state, reference),
            "mesh": tuple(mesh.shape),
            "fraction": fraction,
        }
    finally:
        dist.barrier()
        dist.destroy_process_group()


def test_hybrid_sharding_over_a_two_by_two_mesh_on_four_processes():
    results = run_ranks(_hybrid_worker, 4, timeout=240)
    for out in results:
        assert out["mesh"] == (2, 2)
        assert out["fraction"] < 0.6  # sharded over 2 ranks, replicated over the other 2
    assert results[0]["difference"] < 1e-5


def test_batch_norm_runs_in_float32_under_a_bf16_policy():
    from distrib import backward

    with distributed(strategy="fsdp", mixed_precision="bf16"):
        model = nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)
        )
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model, optimizer = prepare(model, optimizer)
        out = model(torch.randn(2, 3, 8, 8))
        backward(out.sum())
        optimizer.step()
        assert model[1].running_mean.dtype == torch.float32 and out.dtype == torch.float32
