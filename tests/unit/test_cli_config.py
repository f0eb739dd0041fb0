"""The config file: schema, errors, Accelerate translation, and the `distrib config` commands."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from distrib._cli import config_cmd
from distrib._cli.main import cli
from distrib._launch import accelerate_compat, config_file
from distrib.errors import SettingsError


@pytest.fixture
def config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DISTRIB_CONFIG_DIR", str(tmp_path / "cfg"))
    return tmp_path / "cfg"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_valid_file_is_flattened_and_typed(tmp_path: Path):
    path = write(
        tmp_path / "c.yaml",
        """
version: 1
num_processes: 4
mixed_precision: bf16
monitor_interval: 1
fsdp:
  sharding: grad_op
  wrap_classes: [Block]
env:
  NCCL_DEBUG: WARN
  FLAG: true
""",
    )
    found = config_file.load(path)
    assert found.values == {
        "num_processes": 4,
        "mixed_precision": "bf16",
        "monitor_interval": 1.0,
        "fsdp.sharding": "grad_op",
        "fsdp.wrap_classes": ("Block",),
    }
    assert found.env == {"NCCL_DEBUG": "WARN", "FLAG": "true"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("version: 1\nnum_procesess: 2\n", r"unknown key 'num_procesess'\. Did you mean 'num_processes'\?"),
        (
            "version: 1\nmixed_precision: fp32\n",
            r"mixed_precision='fp32' is not valid: expected one of 'no', 'fp16'",
        ),
        ("version: 1\nnum_processes: two\n", r"num_processes='two' is not valid: expected int"),
        ("version: 1\nnum_processes: 0\n", r"num_processes=0 is out of range: must be >= 1"),
        (
            "version: 1\nmain_process_port: 70000\n",
            r"main_process_port=70000 is out of range: must be <= 65535",
        ),
        ("version: 1\nnum_machines: 2\n", r"num_machines=2 needs main_process_ip"),
        (
            "version: 1\nnum_machines: 2\nmachine_rank: 2\nmain_process_ip: h\n",
            r"machine_rank=2 is out of range for num_machines=2: allowed values are 0 to 1",
        ),
        ("version: 1\nfsdp: full\n", r"fsdp must be a mapping of options \(sharding, "),
        ("version: 1\nfsdp:\n  shard: full\n", r"unknown key 'fsdp.shard'"),
        ("num_processes: 2\n", r"missing 'version: 1'"),
        ("version: 7\n", r"version=7 is not supported: allowed values are 1"),
        ("version: 1\nenv:\n  1BAD: x\n", r"env key '1BAD' is not a valid environment variable name"),
        ("- a\n- b\n", r"the top level must be a mapping"),
    ],
)
def test_invalid_files_name_the_key_the_value_and_what_is_allowed(tmp_path: Path, text: str, message: str):
    path = write(tmp_path / "c.yaml", text)
    with pytest.raises(SettingsError, match=message) as info:
        config_file.load(path)
    assert str(path) in str(info.value)


def test_broken_yaml_is_reported_with_its_line(tmp_path: Path):
    path = write(tmp_path / "c.yaml", "version: 1\nnum_processes: 2\nfsdp: [unclosed\nseed: 1\n")
    with pytest.raises(SettingsError, match=r"invalid YAML at line \d+, column \d+") as info:
        config_file.load(path)
    assert "line 4" in str(info.value) or "line 3" in str(info.value)


def test_yaml_tags_are_not_executed(tmp_path: Path):
    path = write(tmp_path / "c.yaml", "version: 1\nseed: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(SettingsError, match="invalid YAML"):
        config_file.load(path)


def test_round_trip_through_yaml(tmp_path: Path):
    values = {"num_processes": 2, "strategy": "fsdp", "fsdp.sharding": "full", "fsdp.wrap_classes": ("A",)}
    config_file.write(tmp_path / "x" / "c.yaml", values, {"A": "1"})
    found = config_file.load(tmp_path / "x" / "c.yaml")
    assert dict(found.values) == values and found.env == {"A": "1"}
    assert yaml.safe_load((tmp_path / "x" / "c.yaml").read_text())["version"] == 1


ACCELERATE = """
compute_environment: LOCAL_MACHINE
debug: false
distributed_type: FSDP
downcast_bf16: 'no'
enable_cpu_affinity: false
fsdp_config:
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_sharding_strategy: SHARD_GRAD_OP
  fsdp_offload_params: true
  fsdp_transformer_layer_cls_to_wrap: GPT2Block,Embedding
  fsdp_state_dict_type: SHARDED_STATE_DICT
gpu_ids: all
machine_rank: 0
main_training_function: main
mixed_precision: bf16
num_machines: 1
num_processes: 8
rdzv_backend: static
same_network: true
tpu_env: []
tpu_use_cluster: false
tpu_use_sudo: false
use_cpu: false
"""


def test_an_accelerate_config_is_translated_with_warnings(tmp_path: Path):
    found = config_file.load(write(tmp_path / "default_config.yaml", ACCELERATE))
    assert found.format == "accelerate"
    assert found.values == {
        "strategy": "fsdp",
        "fsdp.sharding": "grad_op",
        "fsdp.cpu_offload": True,
        "fsdp.wrap_classes": ("GPT2Block", "Embedding"),
        "machine_rank": 0,
        "mixed_precision": "bf16",
        "num_machines": 1,
        "num_processes": 8,
        "rdzv_backend": "static",
    }
    assert len(found.warnings) == 1 and "fsdp_config.fsdp_state_dict_type" in found.warnings[0]


def test_accelerate_deepspeed_and_multi_cpu_keys():
    raw = {
        "distributed_type": "DEEPSPEED",
        "use_cpu": True,
        "main_process_port": None,
        "deepspeed_config": {
            "zero_stage": 3,
            "offload_optimizer_device": "cpu",
            "offload_param_device": "none",
            "gradient_accumulation_steps": 4,
            "zero3_init_flag": True,
        },
    }
    out, warnings = accelerate_compat.translate(raw)
    assert out == {
        "version": 1,
        "strategy": "deepspeed",
        "cpu": True,
        "gradient_accumulation_steps": 4,
        "deepspeed": {"zero_stage": 3, "offload_optimizer": True, "offload_params": False},
    }
    assert [w for w in warnings if "zero3_init_flag" in w and "prepare()" in w]
    with pytest.raises(SettingsError, match=r"MULTI_NPU.*Ascend NPUs.*Use MULTI_GPU"):
        accelerate_compat.translate({"distributed_type": "MULTI_NPU"})


def test_default_location_follows_the_documented_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("DISTRIB_CONFIG_DIR", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert config_file.default_path() == tmp_path / "xdg" / "distrib" / "default_config.yaml"
    monkeypatch.setenv("DISTRIB_CONFIG_DIR", str(tmp_path / "d"))
    assert config_file.default_path() == tmp_path / "d" / "default_config.yaml"
    assert "DISTRIB_CONFIG_DIR" in config_file.default_origin()


def test_config_default_writes_a_file_and_refuses_to_overwrite(
    config_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(config_cmd, "_gpu_count", lambda: 0)
    runner = CliRunner()
    result = runner.invoke(cli, ["config", "--default"])
    assert result.exit_code == 0, result.output
    written = yaml.safe_load((config_dir / "default_config.yaml").read_text())
    assert written == {"version": 1, "num_processes": 1, "cpu": True, "mixed_precision": "no"}
    again = runner.invoke(cli, ["config", "--default"])
    assert again.exit_code == 2 and "already exists" in again.output
    assert runner.invoke(cli, ["config", "--default", "--force"]).exit_code == 0


def test_questionnaire_validates_each_answer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(config_cmd, "_gpu_count", lambda: 0)
    path = tmp_path / "q.yaml"
    answers = [
        "2",  # machines
        "5",
        "1",  # machine rank: 5 is refused, then 1
        "10.0.0.1",  # address
        "",  # port: default 29500
        "c10d",  # rendezvous backend
        "y",  # CPU only
        "3",
        "4",  # processes: 3 is not a multiple of 2 machines, then 4
        "fsdp",  # strategy
        "fp8",
        "bf16",  # fp8 is refused on CPU
        "2",  # accumulation
        "grad_op",
        "n",
        "y",
    ]
    result = CliRunner().invoke(cli, ["config", "--config-file", str(path)], input="\n".join(answers) + "\n")
    assert result.exit_code == 0, result.output
    assert "num_processes=3 is not a multiple of num_machines=2" in result.output
    assert "mixed_precision='fp8' needs a GPU" in result.output
    assert "1<=x<=1" in result.output or "0<=x<=1" in result.output
    values = config_file.load(path).values
    assert values == {
        "num_machines": 2,
        "machine_rank": 1,
        "main_process_ip": "10.0.0.1",
        "main_process_port": 29500,
        "rdzv_backend": "c10d",
        "cpu": True,
        "num_processes": 4,
        "strategy": "fsdp",
        "mixed_precision": "bf16",
        "gradient_accumulation_steps": 2,
        "fsdp.sharding": "grad_op",
        "fsdp.cpu_offload": False,
        "fsdp.activation_checkpointing": True,
    }


def test_config_show_prints_values_and_their_origin(config_dir: Path):
    runner = CliRunner()
    empty = runner.invoke(cli, ["config", "show"])
    assert empty.exit_code == 0 and "does not exist" in empty.output
    write(config_dir / "default_config.yaml", "version: 1\nnum_processes: 3\nenv:\n  A: b\n")
    result = runner.invoke(cli, ["config", "show"])
    assert result.exit_code == 0, result.output
    assert "from $DISTRIB_CONFIG_DIR" in result.output
    lines = result.output.splitlines()
    assert any("num_processes" in line and "3" in line and line.endswith("file") for line in lines)
    assert any("mixed_precision" in line and line.endswith("default") for line in lines)
    assert any("env.A" in line for line in lines)


def test_config_show_reports_a_broken_file_as_a_usage_error(tmp_path: Path):
    path = write(tmp_path / "c.yaml", "version: 1\nstrategy: magic\n")
    result = CliRunner().invoke(cli, ["config", "show", "--config-file", str(path)])
    assert result.exit_code == 2
    assert "strategy='magic' is not valid" in result.output and "'fsdp'" in result.output


def test_deepspeed_questions_ask_the_stage_first_and_refuse_a_missing_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(config_cmd, "_gpu_count", lambda: 0)
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 3}}')
    path = tmp_path / "q.yaml"
    answers = [
        "1",  # machines
        "y",  # CPU only
        "2",  # processes
        "deepspeed",  # strategy
        "bf16",  # precision
        "1",  # accumulation
        "3",  # ZeRO stage: asked before the optional JSON path
        str(tmp_path / "missing.json"),  # refused: does not exist
        str(tmp_path / "broken.json"),  # refused: not JSON
        str(tmp_path / "ds.json"),
        "y",  # offload optimizer
        "n",  # offload parameters
    ]
    result = CliRunner().invoke(cli, ["config", "--config-file", str(path)], input="\n".join(answers) + "\n")
    assert result.exit_code == 0, result.output
    assert result.output.index("ZeRO stage?") < result.output.index("DeepSpeed JSON config file")
    assert "missing.json does not exist" in result.output and "is not a readable JSON file" in result.output
    values = config_file.load(path).values
    assert values["deepspeed.zero_stage"] == 3 and values["deepspeed.config"] == str(tmp_path / "ds.json")
    assert values["deepspeed.offload_optimizer"] is True and values["deepspeed.offload_params"] is False
    stage_one = ["1", "y", "2", "deepspeed", "no", "1", "1", "", "n"]
    result = CliRunner().invoke(
        cli, ["config", "--config-file", str(tmp_path / "s1.yaml")], input="\n".join(stage_one) + "\n"
    )
    assert result.exit_code == 0, result.output
    assert "Offload parameters" not in result.output  # only ZeRO-3 can offload parameters
    assert "deepspeed.config" not in config_file.load(tmp_path / "s1.yaml").values
