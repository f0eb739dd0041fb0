"""The DeepSpeed config distrib completes ("auto" values, knobs, conflicts) and its errors, without processes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from distrib import DeepSpeedOptions, Settings, distributed
from distrib.errors import PrecisionError, SettingsError
from distrib.strategies import _deepspeed_config
from distrib.strategies import deepspeed as ds_strategy


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
