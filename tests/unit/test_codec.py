"""The settings codec: chosen fields, nested <-> flat, the text of DISTRIB_* variables; and the settings
classes' own refusals (unknown names, positional arguments, values no run can use)."""

from __future__ import annotations

import pytest

from distrib import DDPOptions, DeepSpeedOptions, FSDPOptions, Settings, XLAOptions, distributed
from distrib._codec import (
    encode,
    explicit_fields,
    from_environment,
    from_flat,
    section_fields,
    to_environment,
    to_flat,
)
from distrib._environment import read_environment, resolve_settings
from distrib._scope import _explicit_values
from distrib.errors import SettingsError


def policy(module: object) -> bool:
    return False


def test_explicit_fields_are_the_fields_that_differ_from_the_defaults():
    settings = Settings(mixed_precision="bf16", fsdp=FSDPOptions(sharding="grad_op"), seed=0)
    assert explicit_fields(settings) == {
        "mixed_precision": "bf16",
        "seed": 0,
        "fsdp": FSDPOptions(sharding="grad_op"),
    }
    assert explicit_fields(Settings()) == {}
    # a callable is a chosen value like any other: it is kept, never dropped
    assert explicit_fields(FSDPOptions(auto_wrap_policy=policy)) == {"auto_wrap_policy": policy}


def test_the_scope_uses_the_codec_for_what_the_code_asked_for():
    settings = Settings(gradient_accumulation_steps=2, ddp=DDPOptions(static_graph=True))
    assert _explicit_values(settings) == explicit_fields(settings)


def test_nested_and_flat_round_trip():
    nested = {"mixed_precision": "bf16", "fsdp": FSDPOptions(sharding="hybrid", hybrid_shard_size=2)}
    flat = to_flat(nested)
    assert flat == {"mixed_precision": "bf16", "fsdp.sharding": "hybrid", "fsdp.hybrid_shard_size": 2}
    assert from_flat(flat) == {
        "mixed_precision": "bf16",
        "fsdp": {"sharding": "hybrid", "hybrid_shard_size": 2},
    }
    assert Settings.from_mapping(from_flat(flat)).fsdp == nested["fsdp"]
    assert to_flat({"fsdp": {"cpu_offload": True}, "fsdp_none": None, "ddp": None}) == {
        "fsdp.cpu_offload": True,
        "fsdp_none": None,
    }


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"fsdp": "full"},
            r"fsdp must be a mapping of options \(sharding, .*\) or a FSDPOptions, got 'full'",
        ),
        ({"fsdp": DDPOptions()}, r"fsdp must be a mapping .* or a FSDPOptions"),
        ({"deepspeed": ["zero_stage", 3]}, r"deepspeed must be a mapping"),
    ],
)
def test_a_section_that_is_not_options_is_named(values, message):
    with pytest.raises(SettingsError, match=message):
        to_flat(values, source="c.yaml")


def test_from_flat_refuses_keys_that_name_no_section():
    with pytest.raises(SettingsError, match=r"'zero.stage' names no option section"):
        from_flat({"zero.stage": 3})
    with pytest.raises(SettingsError, match=r"fsdp is an option section; give its fields as fsdp.<field>"):
        from_flat({"fsdp": "full"})


@pytest.mark.parametrize(
    "values",
    [
        {"mixed_precision": "bf16", "gradient_accumulation_steps": 4, "cpu": True, "seed": None},
        {"project_dir": "none"},  # a string that reads like a keyword stays a string
        {"project_dir": "7"},
        {"project_dir": " padded "},
        {"project_dir": '{"not": "json"}'},
        {"timeout": 0.1, "stall_timeout": None, "preemption_exit_code": 0},
        {"fsdp": FSDPOptions(sharding="hybrid", hybrid_shard_size=2, wrap_classes=("Block", "Layer"))},
        {"deepspeed": DeepSpeedOptions(config={"zero_optimization": {"stage": 3}}, gradient_clipping=1.0)},
        {"ddp": DDPOptions(bucket_cap_mb=12.5), "xla": XLAOptions(loader_prefetch_size=2)},
    ],
)
def test_every_value_travels_through_the_environment_exactly(values):
    env = to_environment(values)
    assert all(k.startswith("DISTRIB_") and isinstance(v, str) for k, v in env.items())
    assert from_environment(env) == values
    assert dict(read_environment(env).launcher_settings) == values


def test_a_callable_cannot_travel_and_the_error_names_the_field_and_the_fix():
    with pytest.raises(
        SettingsError, match=r"fsdp\.auto_wrap_policy=.*is a function.*DISTRIB_.*wrap_classes"
    ):
        to_environment({"fsdp": FSDPOptions(auto_wrap_policy=policy)})
    with pytest.raises(SettingsError, match=r"setting deepspeed holds \{1, 2\} \(set\)"):
        encode("deepspeed", {"config": {"ids": {1, 2}}})


def test_an_unknown_setting_name_is_refused_with_the_valid_names():
    with pytest.raises(
        SettingsError, match=r"'mixed_precison' is not a setting; valid names are: .*mixed_precision"
    ):
        to_environment({"mixed_precison": "bf16"})


def test_section_fields_of_an_option_object_are_its_explicit_fields():
    assert section_fields("deepspeed", DeepSpeedOptions(zero_stage=2)) == {"zero_stage": 2}
    assert section_fields("deepspeed", {"zero_stage": 2}) == {"zero_stage": 2}


def test_code_and_launcher_options_merge_field_by_field_through_the_codec():
    env = read_environment(to_environment({"fsdp": FSDPOptions(sharding="grad_op", cpu_offload=True)}))
    settings, conflicts = resolve_settings({"fsdp": FSDPOptions(activation_checkpointing=True)}, env)
    assert settings.fsdp == FSDPOptions(sharding="grad_op", cpu_offload=True, activation_checkpointing=True)
    assert conflicts == []
    settings, conflicts = resolve_settings(
        {"fsdp": FSDPOptions(sharding="full", auto_wrap_policy=policy)}, env
    )
    assert settings.fsdp.auto_wrap_policy is policy  # code values never travel, so a callable is fine here
    assert settings.fsdp.sharding == "grad_op"  # "full" is the default: the code did not choose it


# -- the settings classes refuse what no run can use, as clearly as distributed() ------------------------


def _message(call) -> str:
    with pytest.raises(SettingsError) as info:
        call()
    return str(info.value)


def test_settings_with_an_unknown_name_is_as_clear_as_distributed():
    from_class = _message(lambda: Settings(mixed_precison="bf16"))
    from_scope = _message(lambda: distributed(mixed_precison="bf16"))
    assert from_class == from_scope
    assert "unknown setting 'mixed_precison' for Settings (did you mean 'mixed_precision'?)" in from_class
    assert "valid names are: " in from_class and "gradient_accumulation_steps" in from_class
    assert "unknown setting 'foo' for Settings; valid names are" in _message(lambda: Settings(foo=1))


@pytest.mark.parametrize("cls", [Settings, DDPOptions, FSDPOptions, DeepSpeedOptions, XLAOptions])
def test_every_settings_class_names_unknown_and_positional_arguments(cls):
    assert f"unknown setting 'bogus' for {cls.__name__}" in _message(lambda: cls(bogus=1))
    assert f"{cls.__name__} takes keyword arguments only" in _message(lambda: cls(1))


@pytest.mark.parametrize("size", [-1, 0, -0.5])
def test_a_bucket_size_must_be_positive(size):
    assert "DDPOptions.bucket_cap_mb" in _message(lambda: DDPOptions(bucket_cap_mb=size))
    assert "must be a positive size" in _message(
        lambda: Settings.from_mapping({"ddp": {"bucket_cap_mb": size}})
    )
    assert DDPOptions(bucket_cap_mb=0.5).bucket_cap_mb == 0.5


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_parameter_offload_needs_zero_stage_3(stage):
    message = _message(lambda: DeepSpeedOptions(zero_stage=stage, offload_params=True))
    assert "offload_params=True needs ZeRO stage 3" in message and f"the stage is {stage}" in message
    assert DeepSpeedOptions(zero_stage=3, offload_params=True).offload_params


def test_optimizer_offload_needs_a_zero_stage():
    assert "needs ZeRO stage 1, 2 or 3" in _message(
        lambda: DeepSpeedOptions(zero_stage=0, offload_optimizer=True)
    )
    assert DeepSpeedOptions(zero_stage=1, offload_optimizer=True).offload_optimizer
    # no stage here: it may come from a config file or from options merged with the launcher's
    assert DeepSpeedOptions(offload_params=True).zero_stage is None
