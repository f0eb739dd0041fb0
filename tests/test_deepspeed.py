"""DeepSpeed strategy: config completion and errors without processes, then ZeRO 1, 2 and 3 in fp32 and
bf16 on 2 real gloo processes compared with DDP (accumulation and clipping included).

The first DeepSpeed run on a machine compiles a C++ op (30 s to 3 min, then cached); the
`deepspeed_ops` fixture does it once, outside the ranks' timeouts."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from test_fsdp_support import (
    build_deepspeed_ops,
    changed_from_init,
    make_loader,
    make_model,
    max_difference,
    train,
)

from distrib import DeepSpeedOptions, Settings, distributed, prepare
from distrib.errors import PrecisionError, PrepareError, SettingsError, TrainingError
from distrib.strategies import _deepspeed_config
from distrib.strategies import deepspeed as ds_strategy
from distrib.testing import run_ranks

# -- the config, no processes ----------------------------------------------------------------------


def _build(
    options: dict[str, Any] | None = None, micro: int | None = 4, optimizer: bool = True, **settings: Any
) -> dict[str, Any]:
    return _deepspeed_config.build_config(
        DeepSpeedOptions(**(options or {})),
        Settings(**settings),
        world_size=2,
        micro_batch_size=micro,
        has_optimizer=optimizer,
        has_scheduler=False,
    )


def test_auto_values_are_filled_from_settings_and_the_dataloader():
    config = _build(
        {"config": {"train_micro_batch_size_per_gpu": "auto", "bf16": {"enabled": "auto"}}, "zero_stage": 3},
        gradient_accumulation_steps=4,
        mixed_precision="bf16",
    )
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_accumulation_steps"] == 4
    assert config["train_batch_size"] == 4 * 4 * 2
    assert config["bf16"] == {"enabled": True} and config["fp16"] == {"enabled": False}
    assert config["zero_optimization"] == {"stage": 3}
    assert config["zero_allow_untested_optimizer"] is True
    assert config["gradient_clipping"] == 0.0  # as in a plain loop: DeepSpeed alone would clip at 1.0


def test_knobs_build_the_zero_section_with_cpu_offload():
    config = _build(
        {"zero_stage": 3, "offload_optimizer": True, "offload_params": True, "gradient_clipping": 1.0}
    )
    zero = config["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert config["gradient_clipping"] == 1.0
    with pytest.raises(SettingsError, match=r"needs ZeRO stage 3.*set zero_stage=3"):
        _build({"zero_stage": 2, "offload_params": True})
    with pytest.raises(SettingsError, match="needs ZeRO stage 1, 2 or 3"):
        _build({"offload_optimizer": True})


def test_a_config_that_contradicts_distrib_names_both_values(tmp_path: Path):
    with pytest.raises(
        SettingsError, match=r"gradient_accumulation_steps=8, but distrib's gradient_accumulation_steps is 2"
    ):
        _build({"config": {"gradient_accumulation_steps": 8}}, gradient_accumulation_steps=2)
    with pytest.raises(
        SettingsError, match=r"bf16.enabled=True, but distrib's mixed_precision='no' is False"
    ):
        _build({"config": {"bf16": {"enabled": True}}})
    with pytest.raises(SettingsError, match=r"zero_optimization.stage=2.*DeepSpeedOptions.zero_stage is 3"):
        _build({"config": {"zero_optimization": {"stage": 2}}, "zero_stage": 3})
    with pytest.raises(SettingsError, match=r"train_batch_size=100.*\(4 x 1 x 2\) is 8"):
        _build({"config": {"train_batch_size": 100}})
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 3, "gradient_clipping": 0.5}))
    config = _build({"config": str(path)}, micro=None)
    assert (config["train_micro_batch_size_per_gpu"], config["train_batch_size"]) == (3, 6)


def test_config_errors_name_the_fix(tmp_path: Path):
    with pytest.raises(SettingsError, match="pass the training DataLoader to the same prepare"):
        _build(micro=None)
    with pytest.raises(SettingsError, match=r"optimizer.params.lr as \"auto\""):
        _build({"config": {"optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}}, optimizer=False)
    with pytest.raises(SettingsError, match="does not exist"):
        _build({"config": str(tmp_path / "missing.json")})
    with pytest.raises(SettingsError, match="'fp8'"):
        _build(mixed_precision="fp8")
    with pytest.raises(SettingsError, match="config names one too"):
        _deepspeed_config.build_config(
            DeepSpeedOptions(config={"optimizer": {"type": "Adam", "params": {"lr": 0.1}}}),
            Settings(), world_size=1, micro_batch_size=1, has_optimizer=True, has_scheduler=False,
        )  # fmt: skip
    with pytest.raises(SettingsError, match="unknown setting 'stage' for DeepSpeedOptions"):
        Settings.from_mapping({"deepspeed": {"stage": 3}})


def test_missing_deepspeed_and_fp16_on_cpu_are_clear_errors(monkeypatch: pytest.MonkeyPatch):
    with (
        pytest.raises(PrecisionError, match="mixed_precision='bf16'"),
        distributed(strategy="deepspeed", mixed_precision="fp16"),
    ):
        pass
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "deepspeed" else real_find_spec(name, *a),
    )
    assert not ds_strategy.is_available()
    assert "pip install 'distrib[deepspeed]'" in ds_strategy.unavailable_reason()
    with (
        pytest.raises(SettingsError, match=r"strategy 'deepspeed' cannot run here.*distrib\[deepspeed\]"),
        distributed(strategy="deepspeed"),
    ):
        pass


# -- real processes --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deepspeed_ops() -> None:
    pytest.importorskip("deepspeed")
    build_deepspeed_ops()


def _error_checks() -> dict[str, str]:
    """Bad input inside a live DeepSpeed scope (each raises before any collective)."""
    found: dict[str, str] = {}
    with distributed(strategy="deepspeed", deepspeed={"zero_stage": 3}):
        with torch.device("meta"):
            meta_model = make_model()
        for name, call in {
            "meta": lambda: prepare(
                meta_model, torch.optim.SGD(meta_model.parameters(), lr=0.1), make_loader()
            ),
            "orphan_optimizer": lambda: prepare(torch.optim.SGD(make_model().parameters(), lr=0.1)),
        }.items():
            try:
                call()
            except PrepareError as exc:
                found[name] = str(exc)
    return found


def _zero_worker() -> dict[str, Any]:
    dist.init_process_group("gloo")
    try:
        out: dict[str, Any] = {"errors": _error_checks()}
        common = {"clip": 0.5, "gradient_accumulation_steps": 2}
        references = {
            mp: train("ddp", mixed_precision=mp, sgd=mp == "bf16", **common) for mp in ("no", "bf16")
        }
        for stage in (1, 2, 3):
            for mp in ("no", "bf16"):
                # bf16 runs gather the fp32 master weights, fp32 runs the module's (ZeRO-3: consolidated)
                options = {"zero_stage": stage, "gradient_clipping": 0.5, "save_16bit_model": mp == "no"}
                state, norms = train(
                    "deepspeed", mixed_precision=mp, deepspeed=options, sgd=mp == "bf16", **common
                )
                reference, reference_norms = references[mp]
                out[(stage, mp)] = (
                    state is None or max_difference(state, reference),
                    state is None or {v.dtype for v in state.values()},
                    norms,
                    reference_norms,
                )
        options = {"zero_stage": 3, "gradient_clipping": 0.5}
        state, _ = train("deepspeed", mixed_precision="bf16", deepspeed=options, sgd=True, **common)
        out["zero3_16bit"] = state is None or (
            max_difference(state, references["bf16"][0]),
            state["head.weight"].dtype,
        )
        # nothing configured: the loop's clip_grad_norm_(params, 0.5) sets DeepSpeed's clipping
        state, _ = train("deepspeed", deepspeed={"zero_stage": 2}, **common)
        out["adopted"] = state is None or max_difference(state, references["no"][0])
        try:
            train("deepspeed", clip=1.0, deepspeed={"zero_stage": 1, "gradient_clipping": 0.5})
        except TrainingError as exc:
            out["clip_error"] = str(exc)
        out["trained"] = {mp: ref is None or changed_from_init(ref) for mp, (ref, _) in references.items()}
        return out
    finally:
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.timeout(900)  # the first DeepSpeed run on a machine compiles a C++ op first
def test_zero_stages_in_fp32_and_bf16_train_like_ddp_on_two_processes(deepspeed_ops: None):
    out = run_ranks(_zero_worker, 2, timeout=300)[0]
    assert "meta device" in out["errors"]["meta"] and "deepspeed.zero.Init" in out["errors"]["meta"]
    assert "same prepare() call" in out["errors"]["orphan_optimizer"]
    assert min(out["trained"].values()) > 3e-2  # the references moved: the comparisons are not vacuous
    for stage in (1, 2, 3):
        for mp, tolerance in (("no", 1e-5), ("bf16", 1e-2)):
            difference, dtypes, norms, reference_norms = out[(stage, mp)]
            assert difference < tolerance, f"ZeRO-{stage} {mp}: differs from DDP by {difference}"
            assert dtypes == {torch.float32}
            # DeepSpeed measures the norm inside step(): clip_grad_norm_ reports the previous step's
            assert norms[0] != norms[0]  # NaN before the first step
            assert norms[1:] == pytest.approx(reference_norms[:-1], rel=1e-4 if mp == "no" else 2e-2)
    difference, dtype = out["zero3_16bit"]
    assert dtype == torch.bfloat16 and difference < 2e-2
    assert out["adopted"] < 1e-5, "clip_grad_norm_ with no clipping configured clips like DDP"
    assert (
        "gradient_clipping=0.5" in out["clip_error"]
        and "DeepSpeedOptions(gradient_clipping=1.0)" in out["clip_error"]
    )
