"""Settings validation, the environment reader and the precedence rules (no processes)."""

from __future__ import annotations

import pytest

from distrib import DDPOptions, FSDPOptions, Settings
from distrib._codec import to_environment as settings_to_environment
from distrib._environment import config_directory, first_slurm_host, read_environment, resolve_settings
from distrib._settings import choices
from distrib.errors import SettingsError


def test_defaults_are_single_process_friendly():
    s = Settings()
    assert (s.strategy, s.mixed_precision, s.gradient_accumulation_steps) == ("auto", "no", 1)
    assert s.even_batches and s.device_placement and not s.split_batches


def test_invalid_literal_lists_the_valid_values():
    with pytest.raises(SettingsError, match=r"mixed_precision='fp32'.*'no', 'fp16', 'bf16', 'fp8'"):
        Settings(mixed_precision="fp32")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("gradient_accumulation_steps", 0, ">= 1"),
        ("gradient_accumulation_steps", 1.5, "expected int"),
        ("split_batches", "yes", "expected bool"),
        ("timeout", -1.0, "positive"),
        ("strategy", "horovod", "'auto', 'single', 'ddp', 'fsdp', 'deepspeed', 'xla'"),
    ],
)
def test_bad_values_name_field_and_fix(field, value, message):
    with pytest.raises(SettingsError, match=message):
        Settings(**{field: value})


def test_unknown_key_is_named_with_valid_names():
    with pytest.raises(SettingsError, match=r"unknown setting 'mixed_precison'.*mixed_precision"):
        Settings.from_mapping({"mixed_precison": "bf16"})


def test_strategy_options_accept_dicts_and_validate():
    s = Settings.from_mapping({"fsdp": {"sharding": "grad_op"}, "ddp": {"static_graph": True}})
    assert s.fsdp == FSDPOptions(sharding="grad_op")
    assert s.ddp == DDPOptions(static_graph=True)
    with pytest.raises(SettingsError, match=r"FSDPOptions\.sharding='half'"):
        Settings.from_mapping({"fsdp": {"sharding": "half"}})
    with pytest.raises(SettingsError, match="unknown setting 'shard'"):
        Settings.from_mapping({"fsdp": {"shard": "full"}})


def test_choices_come_from_the_literals():
    assert choices("mixed_precision") == ("no", "fp16", "bf16", "fp8")
    assert "deepspeed" in choices("strategy")


def test_plain_python_is_one_process():
    env = read_environment({})
    assert (env.launcher, env.rank, env.world_size, env.num_nodes) == ("python", 0, 1, 1)


def test_torchrun_variables():
    env = read_environment(
        {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
         "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"}
    )  # fmt: skip
    assert (env.launcher, env.rank, env.local_rank, env.world_size) == ("torchrun", 5, 1, 8)
    assert (env.node_rank, env.num_nodes, env.master_addr, env.master_port) == (1, 2, "10.0.0.1", 1234)


def test_slurm_variables():
    env = read_environment(
        {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
         "SLURM_NNODES": "2", "SLURM_STEP_NODELIST": "gpu[07-08]"}
    )  # fmt: skip
    assert (env.launcher, env.rank, env.local_rank, env.node_rank, env.num_nodes) == ("slurm", 3, 1, 1, 2)
    assert env.master_addr == "gpu07" and env.local_world_size == 2


def test_mpi_variables():
    env = read_environment(
        {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
         "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    )  # fmt: skip
    assert (env.launcher, env.rank, env.world_size, env.master_addr) == ("mpi", 1, 2, "127.0.0.1")
    pmi = read_environment({"PMI_RANK": "0", "PMI_SIZE": "3", "MPI_LOCALRANKID": "0"})
    assert (pmi.launcher, pmi.world_size) == ("mpi", 3)


def test_mpi_across_machines_needs_master_addr():
    with pytest.raises(SettingsError, match="MASTER_ADDR"):
        read_environment(
            {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
        )


def test_bad_rank_variable_is_reported():
    with pytest.raises(SettingsError, match="WORLD_SIZE='two'"):
        read_environment({"RANK": "0", "WORLD_SIZE": "two"})


@pytest.mark.parametrize(
    ("nodelist", "host"), [("node1", "node1"), ("gpu[03-05,07],cpu1", "gpu03"), ("a[9],b", "a9"), ("", None)]
)
def test_first_slurm_host(nodelist, host):
    assert first_slurm_host(nodelist) == host


def test_launcher_settings_round_trip():
    values = {"mixed_precision": "bf16", "gradient_accumulation_steps": 4, "cpu": True, "seed": None,
              "fsdp": FSDPOptions(sharding="hybrid", hybrid_shard_size=2)}  # fmt: skip
    env = read_environment(settings_to_environment(values))
    assert dict(env.launcher_settings) == values


def test_bad_launcher_variable_names_the_variable():
    with pytest.raises(SettingsError, match="DISTRIB_GRADIENT_ACCUMULATION_STEPS"):
        read_environment({"DISTRIB_GRADIENT_ACCUMULATION_STEPS": "four"})


def test_code_beats_launcher_and_the_conflict_is_reported():
    env = read_environment({"DISTRIB_MIXED_PRECISION": "fp16", "DISTRIB_SEED": "7"})
    settings, conflicts = resolve_settings({"mixed_precision": "bf16"}, env)
    assert settings.mixed_precision == "bf16" and settings.seed == 7
    assert len(conflicts) == 1 and "'bf16'" in conflicts[0] and "'fp16'" in conflicts[0]
    _, none = resolve_settings({"mixed_precision": "fp16"}, env)
    assert none == []


def test_config_directory_order(tmp_path):
    assert config_directory({"DISTRIB_CONFIG_DIR": "/a", "XDG_CONFIG_HOME": "/b"}) == type(tmp_path)("/a")
    assert config_directory({"XDG_CONFIG_HOME": "/b", "HOME": "/h"}) == type(tmp_path)("/b/distrib")
    assert config_directory({"HOME": "/h"}) == type(tmp_path)("/h/.config/distrib")


def test_option_objects_merge_field_by_field_with_the_launcher():
    from distrib import DeepSpeedOptions

    env = read_environment(settings_to_environment({"deepspeed": DeepSpeedOptions(zero_stage=3)}))
    settings, conflicts = resolve_settings({"deepspeed": DeepSpeedOptions(gradient_clipping=1.0)}, env)
    assert settings.deepspeed == DeepSpeedOptions(zero_stage=3, gradient_clipping=1.0)
    assert conflicts == []
    settings, conflicts = resolve_settings({"deepspeed": {"zero_stage": 2}}, env)
    assert settings.deepspeed.zero_stage == 2
    assert (
        len(conflicts) == 1 and "deepspeed.zero_stage" in conflicts[0] and "DISTRIB_DEEPSPEED" in conflicts[0]
    )
