"""The scope: thread-local runtime stack, nesting, threads, decorator, errors (one process)."""

from __future__ import annotations

import importlib.util
import threading
import warnings

import pytest
import torch

import distrib
from distrib import Settings, backward, current, distributed, distributed_main, prepare
from distrib.errors import NoScopeError, PrecisionError, SettingsError


def test_current_outside_a_scope_says_how_to_open_one():
    with pytest.raises(
        NoScopeError, match=r"with distrib\.distributed\(\.\.\.\) as ctx:.*@distrib\.distributed_main"
    ):
        current()


@pytest.mark.parametrize(
    "call",
    [
        lambda: distrib.prepare(torch.nn.Linear(1, 1)),
        lambda: distrib.backward(torch.tensor(1.0)),
        lambda: distrib.gather(torch.tensor(1.0)),
        lambda: distrib.is_main_process(),
        lambda: distrib.wait_for_everyone(),
    ],
)
def test_free_functions_outside_a_scope_name_themselves(call):
    with pytest.raises(NoScopeError, match=r"\w+\(\) needs a distrib runtime"):
        call()


def test_runtime_fields_single_process():
    with distributed(cpu=True) as ctx:
        assert current() is ctx
        assert (ctx.rank, ctx.local_rank, ctx.world_size, ctx.node_rank, ctx.num_nodes) == (0, 0, 1, 0, 1)
        assert ctx.is_main_process and ctx.is_local_main_process and ctx.is_last_process
        assert ctx.device == torch.device("cpu") and ctx.strategy == "single"
        assert ctx.sync_gradients and ctx.gradient_accumulation_steps == 1 and ctx.mixed_precision == "no"
    with pytest.raises(NoScopeError):
        current()


def test_runtime_is_read_only():
    with distributed() as ctx, pytest.raises(AttributeError):
        ctx.rank = 3  # type: ignore[misc]


def test_nested_scopes_restore_the_outer_one():
    with distributed(gradient_accumulation_steps=2) as outer:
        with distributed(mixed_precision="bf16") as inner:
            assert current() is inner and inner.mixed_precision == "bf16"
            assert inner.gradient_accumulation_steps == 1
        assert current() is outer


def test_repeated_scopes_in_one_process():
    for steps in (1, 2, 3):
        with distributed(gradient_accumulation_steps=steps) as ctx:
            assert current().gradient_accumulation_steps == steps
        assert ctx is not None


def test_scopes_are_per_thread():
    seen: dict[str, object] = {}

    def other_thread() -> None:
        try:
            current()
        except NoScopeError:
            seen["outside"] = "no scope"
        with distributed(mixed_precision="bf16") as ctx:
            seen["inside"] = ctx.mixed_precision

    with distributed() as mine:
        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
        assert current() is mine and mine.mixed_precision == "no"
    assert seen == {"outside": "no scope", "inside": "bf16"}


def test_settings_object_or_keywords_but_not_both():
    with distributed(Settings(seed=3)) as ctx:
        assert ctx.settings.seed == 3
    with pytest.raises(SettingsError, match="not both"):
        distributed(Settings(), seed=1)
    with pytest.raises(SettingsError, match="takes a Settings object or keywords"):
        distributed({"seed": 1})  # type: ignore[arg-type]


def test_invalid_setting_fails_at_the_call_site():
    with pytest.raises(SettingsError, match="expected one of 'no', 'fp16', 'bf16', 'fp8'"):
        distributed(mixed_precision="half")


def test_fp16_on_cpu_autocasts_and_scales_the_loss():
    torch.manual_seed(0)
    with distributed(mixed_precision="fp16", cpu=True) as ctx:
        assert ctx.precision.autocast_dtype == torch.float16
        assert isinstance(ctx.state.scaler, torch.amp.GradScaler) and ctx.state.scaler.is_enabled()
        model = torch.nn.Sequential(torch.nn.Linear(4, 2))
        seen = []  # the dtype inside the forward (the prepared model casts its outputs back to float32)
        model[0].register_forward_hook(lambda module, args, out: seen.append(out.dtype))
        model, optimizer = prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
        before = model[0].weight.detach().clone()
        out = model(torch.randn(3, 4))
        backward(out.square().mean())
        optimizer.step()
    assert seen == [torch.float16], "the forward must run under fp16 autocast"
    assert out.dtype == torch.float32, "outputs come back in float32"
    assert not torch.equal(before, model[0].weight.detach()), "the scaled step must update the weights"


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed")
def test_fp16_under_deepspeed_on_cpu_is_a_clear_error():
    with (
        pytest.raises(PrecisionError, match="mixed_precision='bf16'"),
        distributed(strategy="deepspeed", mixed_precision="fp16", cpu=True),
    ):
        pass


def test_fp8_without_hardware_is_a_clear_error():
    with (
        pytest.raises(PrecisionError, match=r"compute capability 8\.9"),
        distributed(mixed_precision="fp8", cpu=True),
    ):
        pass


def test_single_strategy_refuses_several_processes(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SettingsError, match="strategy='ddp'"), distributed(strategy="single"):
        pass


def test_launcher_settings_apply_and_conflicts_warn(monkeypatch):
    monkeypatch.setenv("DISTRIB_GRADIENT_ACCUMULATION_STEPS", "4")
    monkeypatch.setenv("DISTRIB_MIXED_PRECISION", "bf16")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with distributed(mixed_precision="no") as ctx:
            assert ctx.gradient_accumulation_steps == 4 and ctx.mixed_precision == "no"
    assert any("launcher set 'bf16'" in str(w.message) for w in caught)


def test_distributed_main_bare_with_settings_and_without_ctx():
    @distributed_main
    def bare(ctx, x):
        return ctx.world_size, x

    @distributed_main(gradient_accumulation_steps=3)
    def configured(ctx):
        return ctx.gradient_accumulation_steps

    @distributed_main
    def no_params():
        return current().strategy

    assert bare(5) == (1, 5)
    assert configured() == 3
    assert no_params() == "single"
    with pytest.raises(SettingsError):
        distributed_main(bogus=1)


def test_seed_setting_seeds_torch():
    with distributed(seed=123):
        a = torch.rand(3)
    with distributed(seed=123):
        b = torch.rand(3)
    assert torch.equal(a, b)


def test_scope_exit_finishes_what_the_run_started(tmp_path):
    from distrib import init_trackers, log

    finished = []
    with distributed() as ctx:
        ctx.state.closers.append(lambda: finished.append("custom"))
        init_trackers("run", trackers="jsonl", logging_dir=tmp_path)
        log({"loss": 1.0}, step=0)
    assert finished == ["custom"]
    assert "tracking" not in ctx.state.extensions, "trackers are finished when the scope closes"
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 1


def test_a_closer_that_raises_skips_neither_the_others_nor_the_group_teardown():
    import torch.distributed as dist

    ran = []

    def broken() -> None:
        ran.append("broken")
        raise RuntimeError("closer failed")

    with pytest.raises(RuntimeError, match="closer failed"), distributed(strategy="fsdp", cpu=True) as ctx:
        assert dist.is_initialized()
        ctx.call_on_close(lambda: ran.append("first"))
        ctx.call_on_close(broken)
        ctx.call_on_close(lambda: ran.append("last"))
    assert ran == ["last", "broken", "first"]
    assert not dist.is_initialized(), "the scope's process group must be destroyed anyway"
    with pytest.raises(NoScopeError):
        current()


def test_a_failing_strategy_setup_leaves_no_process_group_behind():
    import torch.distributed as dist

    opened = distributed(strategy="fsdp", cpu=True, fsdp={"sharding": "hybrid", "hybrid_shard_size": 3})
    with pytest.raises(SettingsError, match="multiple of the shard group size"), opened:
        pass
    assert not dist.is_initialized(), "a group created before setup failed must not leak to the next scope"
    with distributed(cpu=True) as ctx:  # the next scope starts clean and owns what it creates
        assert ctx.world_size == 1
