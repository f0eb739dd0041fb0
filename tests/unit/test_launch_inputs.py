"""Bad input to the launcher, its config file and its Accelerate translation: each a clear error (exit 2 on
the command line), never a raw traceback or a silent choice; and Accelerate's spellings of the flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from distrib._cli.main import cli
from distrib._launch import accelerate_compat, config_file, machine, rules
from distrib._launch.options import ROWS
from distrib._launch.plan import MachineFacts
from distrib.errors import SettingsError


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTRIB_CONFIG_DIR", str(tmp_path / "cfg"))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("SLURM_STEP_NUM_NODES", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.py").write_text("print('hi')\n")

    def detect(need_gpus: bool = True, strategy: str | None = None) -> MachineFacts:
        unavailable = {"xla": "strategy='xla' needs the 'torch_xla' package"} if strategy == "xla" else {}
        return MachineFacts(cpu_count=4, gpu_count=2, unavailable=unavailable)

    monkeypatch.setattr(machine, "detect", detect)


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), (
        result.output
    )
    return result.exit_code, result.output


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


# -- the config file ------------------------------------------------------------------------------------


def test_a_config_file_that_is_not_utf8_names_the_line_and_byte(tmp_path: Path):
    path = write(tmp_path / "c.yaml", b"version: 1\nnum_processes: 2\nmain_process_ip: caf\xe9\n")
    with pytest.raises(
        SettingsError, match=r"not valid UTF-8 \(byte 0xe9 on line 3\).*save the config file as UTF-8"
    ):
        config_file.load(path)
    code, out = invoke("launch", "--config-file", str(path), "--dry-run", "train.py")
    assert code == 2 and "not valid UTF-8" in out


@pytest.mark.parametrize(
    "text",
    [
        "version: 1\nnum_processes: 2\nnum_processes: 4\n",
        "version: 1\nfsdp:\n  sharding: full\n  sharding: grad_op\n",
        "version: 1\nenv:\n  A: 1\n  A: 2\n",
    ],
)
def test_a_key_given_twice_is_refused_with_both_lines(tmp_path: Path, text: str):
    path = write(tmp_path / "c.yaml", text)
    with pytest.raises(
        SettingsError,
        match=r"invalid YAML at line \d+, column \d+: key '\w+' is given twice \(first on line \d+\)",
    ):
        config_file.load(path)


def test_a_function_setting_in_a_config_file_says_why_it_cannot_be_there(tmp_path: Path):
    path = write(tmp_path / "c.yaml", "version: 1\nfsdp:\n  auto_wrap_policy: my_policy\n")
    with pytest.raises(SettingsError, match=r"fsdp.auto_wrap_policy takes a Python function.*wrap_classes"):
        config_file.load(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("version: 1\nnum_machines: '1:3'\n", "needs main_process_ip"),
        (
            "version: 1\nnum_machines: '1:3'\nmain_process_ip: h\n",
            "needs torch's dynamic rendezvous: add --rdzv-backend c10d",
        ),
        ("version: 1\nnum_machines: '3:1'\n", "MIN <= MAX"),
        ("version: 1\nnum_machines: 0\n", "at least 1 machine"),
        ("version: 1\ncpu: true\ngpu_ids: '0,1'\n", "gpu_ids='0,1' chooses GPUs, but cpu=True"),
        ("version: 1\nddp:\n  bucket_cap_mb: -25\n", "bucket_cap_mb=-25.0 must be a positive size"),
        (
            "version: 1\ndeepspeed:\n  zero_stage: 1\n  offload_params: true\n",
            "offload_params=True needs ZeRO stage 3",
        ),
        (
            "version: 1\nrdzv_conf: last_call_timeout\n",
            "rdzv_conf='last_call_timeout' is not valid: expected KEY=VALUE",
        ),
        ("version: 1\ntimeout: 0\n", "timeout=0.0 is out of range"),
        ("version: 1\nstall_timeout: -1\n", "stall_timeout=-1.0 is out of range"),
    ],
)
def test_combinations_no_run_can_have_are_refused_in_the_file(tmp_path: Path, text: str, message: str):
    path = write(tmp_path / "c.yaml", text)
    with pytest.raises(SettingsError) as info:
        config_file.load(path)
    assert message in str(info.value) and str(path) in str(info.value)


def test_timeouts_and_an_elastic_range_are_config_keys(tmp_path: Path):
    path = write(
        tmp_path / "c.yaml",
        "version: 1\ntimeout: 60\nstall_timeout: null\nnum_machines: '1:4'\nrdzv_backend: c10d\n"
        "main_process_ip: h\nnum_processes_per_machine: 2\ngrace_period: 5\nrdzv_conf: last_call_timeout=3\n",
    )
    values = config_file.load(path).values
    assert values["timeout"] == 60.0 and values["stall_timeout"] is None and values["num_machines"] == "1:4"
    code, out = invoke("launch", "--config-file", str(path), "--cpu", "--dry-run", "train.py")
    assert code == 0, out
    for text in (
        "DISTRIB_TIMEOUT=60.0",
        "DISTRIB_STALL_TIMEOUT=none",
        "1 to 4 (elastic",
        "2 to 8 in total",
        "killed 5 s later",
        "last_call_timeout=3",
    ):
        assert text in out, text


# -- the command line ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--gpu-ids", "0,1", "--cpu", "train.py"],
            "gpu_ids='0,1' chooses GPUs, but cpu=True runs on the CPU",
        ),
        (["--offload-params", "--zero-stage", "1", "train.py"], "offload_params=True needs ZeRO stage 3"),
        (["--offload-optimizer", "--zero-stage", "0", "train.py"], "needs ZeRO stage 1, 2 or 3"),
        (
            ["--strategy", "xla", "train.py"],
            "strategy 'xla' cannot run here: strategy='xla' needs the 'torch_xla'",
        ),
        (["-m", "no_such_package.train"], "module 'no_such_package.train' (-m) not found"),
        (["--num-machines", "1:2", "--main-process-ip", "h", "train.py"], "add --rdzv-backend c10d"),
        (
            [
                "--num-machines",
                "1:2",
                "--rdzv-backend",
                "c10d",
                "--main-process-ip",
                "h",
                "--num-processes",
                "4",
                "train.py",
            ],
            "give --num-processes-per-machine",
        ),
        (
            ["--num-machines", "two", "train.py"],
            "expected a number of machines (2) or an elastic range MIN:MAX",
        ),
        (["--timeout", "0", "train.py"], "0.0 is not in the range"),
        (["--stall-timeout", "soon", "train.py"], "'soon' is not a valid float"),
        (
            ["--use_fsdp", "--use_deepspeed", "train.py"],
            "--use_fsdp, --use_deepspeed ask for different strategies",
        ),
        (
            ["--multi_gpu", "--strategy", "fsdp", "train.py"],
            "--multi_gpu, --strategy fsdp ask for different strategies",
        ),
        (
            ["--num-processes", "4", "--num-processes-per-machine", "3", "train.py"],
            "disagree for num_machines=1",
        ),
    ],
)
def test_bad_flags_are_usage_errors_even_with_dry_run(args: list[str], message: str):
    code, out = invoke("launch", "--dry-run", *args)
    assert code == 2, out
    assert message in out.replace("\n", " ").replace("  ", " ") or message in out


def test_timeout_flags_reach_the_workers():
    code, out = invoke(
        "launch", "--dry-run", "--timeout", "90", "--stall-timeout", "none", "--cpu", "train.py"
    )
    assert code == 0, out
    assert "DISTRIB_TIMEOUT=90.0" in out and "DISTRIB_STALL_TIMEOUT=none" in out
    code, out = invoke(
        "launch", "--dry-run", "--stall-timeout", "45", "--preemption-exit-code", "99", "--cpu", "train.py"
    )
    assert "DISTRIB_STALL_TIMEOUT=45.0" in out and "DISTRIB_PREEMPTION_EXIT_CODE=99" in out
    assert "exit code 99 means preempted" in out
    code, out = invoke("launch", "--dry-run", "--preemption-exit-code", "none", "--cpu", "train.py")
    assert code == 0, out
    assert "DISTRIB_PREEMPTION_EXIT_CODE=none" in out and "the workers do not catch them" in out


def _alias_value(row) -> list[str]:
    samples = {
        "num_processes": "2",
        "num_processes_per_machine": "2",
        "num_machines": "1",
        "machine_rank": "0",
        "gpu_ids": "0,1",
        "num_cpu_threads_per_process": "3",
        "main_process_ip": "127.0.0.1",
        "main_process_port": "29501",
        "rdzv_backend": "c10d",
        "rdzv_timeout": "77",
        "rdzv_conf": "last_call_timeout=4",
        "max_restarts": "2",
        "monitor_interval": "0.5",
        "grace_period": "12",
        "strategy": "fsdp",
        "mixed_precision": "bf16",
        "gradient_accumulation_steps": "3",
        "seed": "5",
        "timeout": "60",
        "stall_timeout": "30",
        "preemption_exit_code": "76",
        "fsdp.sharding": "grad_op",
        "deepspeed.zero_stage": "3",
        "parallelism.dp_replicate": "1",
        "parallelism.dp_shard": "-1",
        "parallelism.tp": "1",
        "parallelism.cp": "1",
        "parallelism.pp": "1",
        "parallelism.tp_plan": '{"layers.*.up": "colwise"}',
        "parallelism.pp_schedule": "gpipe",
        "parallelism.pp_microbatches": "4",
    }
    return [samples[row.key]] if row.key in samples else []


@pytest.mark.parametrize("row", [r for r in ROWS if r.alias_flag], ids=lambda r: r.alias_flag)
def test_every_dashed_flag_has_accelerates_underscore_spelling(row, tmp_path: Path):
    if row.key == "deepspeed.config":
        (tmp_path / "ds.json").write_text("{}")
        value = [str(tmp_path / "ds.json")]
    else:
        value = _alias_value(row)
    dashed = invoke("launch", "--dry-run", row.option_flag, *value, "train.py")
    underscored = invoke("launch", "--dry-run", row.alias_flag, *value, "train.py")
    assert dashed[0] == 0, dashed[1]
    assert underscored == dashed  # the same plan, exactly
    assert row.key.split(".")[-1] in underscored[1] or value == [] or row.key in underscored[1]


def test_underscore_spellings_of_negated_and_control_flags():
    assert (
        invoke("launch", "--dry-run", "--no_split_batches", "train.py")[1].count("split_batches=False") == 1
    )
    assert "cpu=False" in invoke("launch", "--dry-run", "--no_cpu", "train.py")[1]
    (Path("c.yaml")).write_text("version: 1\nnum_processes: 2\n")
    code, out = invoke("launch", "--config_file", "c.yaml", "--dry_run", "train.py")
    assert code == 0 and "2 in total" in out
    code, out = invoke("launch", "--dry-run", "--use_deepspeed", "--zero_stage", "2", "--cpu", "train.py")
    assert code == 0 and "DISTRIB_STRATEGY=deepspeed" in out and '"zero_stage": 2' in out


def test_the_aliases_stay_out_of_help():
    code, out = invoke("launch", "--help")
    assert code == 0
    options = out[out.index("\nProcesses:") :]  # the option list, after the prose
    assert "--num-processes" in options and "--no-cpu" in options and "--dry-run" in options
    for alias in ("--num_processes", "--no_cpu", "--dry_run", "--config_file", "--multi_gpu", "--use_fsdp"):
        assert alias not in options, alias


# -- the Accelerate config translation ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"distributed_type": "FSDP", "fsdp_config": ["fsdp_offload_params", True]},
            r"fsdp_config must be a mapping of fsdp options.*got list",
        ),
        (
            {"distributed_type": "DEEPSPEED", "deepspeed_config": "zero3.json"},
            r"deepspeed_config must be a mapping",
        ),
        (
            {"distributed_type": "MULTI_GPU", "gradient_accumulation_steps": 4},
            r"keys Accelerate itself does not accept: gradient_accumulation_steps \(gradient_accumulation_steps belongs under deepspeed_config",
        ),
        ({"distributed_type": "NO", "seed": 1, "learning_rate": 3}, r"does not accept: learning_rate, seed"),
        ({"distributed_type": "GPU_PLEASE"}, r"distributed_type='GPU_PLEASE' is not one Accelerate knows"),
        ({"distributed_type": "MEGATRON_LM"}, r"asks for Megatron-LM, which distrib does not run on"),
        ({"compute_environment": "AMAZON_SAGEMAKER", "distributed_type": "NO"}, r"SageMaker config"),
        ({"distributed_type": "MULTI_GPU", "rdzv_backend": "etcd"}, r"rdzv_backend='etcd' is not available"),
        (
            {"distributed_type": "FSDP", "fsdp_config": {"fsdp_sharding_strategy": "HALF"}},
            r"fsdp_sharding_strategy='HALF' is not one Accelerate knows",
        ),
    ],
)
def test_what_accelerate_rejects_is_rejected(raw, message):
    with pytest.raises(SettingsError, match=message):
        accelerate_compat.translate(raw, "a.yaml")


def test_an_accelerate_file_with_a_list_section_is_a_clear_error(tmp_path: Path):
    path = write(
        tmp_path / "a.yaml", "compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nfsdp_config:\n- x\n"
    )
    code, out = invoke("launch", "--config-file", str(path), "--dry-run", "train.py")
    assert code == 2 and "fsdp_config must be a mapping" in out and str(path) in out


def test_ignored_accelerate_keys_are_warned_about_with_the_reason():
    raw = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "FSDP",
        "debug": True,
        "enable_cpu_affinity": True,
        "dynamo_config": {"dynamo_backend": "INDUCTOR"},
        "main_training_function": "train",
        "num_processes": -1,
        "gpu_ids": [0, 1],
        "fsdp_config": {
            "fsdp_state_dict_type": "FULL_STATE_DICT",
            "fsdp_backward_prefetch": "BACKWARD_PRE",
            "fsdp_version": 1,
            "fsdp_use_orig_params": True,
            "fsdp_auto_wrap_policy": "NO_WRAP",
        },
        "deepspeed_config": {"deepspeed_multinode_launcher": "pdsh", "offload_param_device": "nvme"},
    }
    out, warnings = accelerate_compat.translate(raw)
    assert out["gpu_ids"] == "0,1" and "num_processes" not in out  # -1: decided at launch
    assert out["compile"] == {"backend": "inductor"}  # dynamo_config is the compile setting
    text = "\n".join(warnings)
    for expected in (
        "debug=True is ignored: distrib has no debug switch",
        "enable_cpu_affinity=True is ignored: distrib does not pin workers",
        "main_training_function='train' is ignored",
        "fsdp_state_dict_type='FULL_STATE_DICT' is ignored: save_state always writes FSDP state sharded",
        "fsdp_backward_prefetch='BACKWARD_PRE' is ignored: FSDP2 prefetches",
        "fsdp_version=1 is ignored: distrib always uses FSDP2",
        "NO_WRAP' is ignored: distrib always makes the model's repeated blocks",
        "deepspeed_multinode_launcher='pdsh' is ignored: distrib runs DeepSpeed under torch's elastic agent",
        "offload_param_device='nvme' is ignored: NVMe offload is set in a DeepSpeed JSON config",
    ):
        assert expected in text, expected
    assert "has no distrib equivalent" not in text  # every warning gives its real reason
    assert "fsdp_use_orig_params" not in text  # harmless: FSDP2 always keeps the original parameters


def test_the_legacy_fp16_key_is_translated():
    out, warnings = accelerate_compat.translate({"distributed_type": "MULTI_GPU", "fp16": True})
    assert out["mixed_precision"] == "fp16" and warnings == []


# -- the rules, written once ----------------------------------------------------------------------------


def test_rules_are_shared_by_the_file_the_plan_and_the_prompt():
    with pytest.raises(
        SettingsError,
        match=r"src: machine_rank=2 is out of range for num_machines=2: allowed values are 0 to 1",
    ):
        rules.check_machines({"num_machines": 2, "machine_rank": 2, "main_process_ip": "h"}, "src")
    with pytest.raises(SettingsError, match=r"src: num_processes=3 is not a multiple of num_machines=2"):
        rules.check_processes(3, 2, "src")
    with pytest.raises(
        SettingsError, match=r"mixed_precision='fp8' needs a GPU, but this launch runs on CPU"
    ):
        rules.check_precision("fp8", "cpu", "src")
    rules.check_precision("fp16", "cuda", "src")
    assert rules.machine_range("2:4") == (2, 4) and rules.machine_count(" 3 ") == 3
    assert rules.rdzv_settings("a=1, b = 2") == {"a": "1", "b": "2"}


def test_accelerates_value_flags_are_translated_like_its_config():
    code, out = invoke(
        "launch", "--dry-run", "--use_fsdp", "--fsdp_sharding_strategy", "SHARD_GRAD_OP",
        "--fsdp_offload_params", "true", "--fsdp_transformer_layer_cls_to_wrap", "GPT2Block,Embedding",
        "--fsdp_state_dict_type", "SHARDED_STATE_DICT", "--cpu", "train.py",
    )  # fmt: skip
    assert code == 0, out
    fsdp = json.loads(next(line for line in out.splitlines() if "DISTRIB_FSDP=" in line).split("=", 1)[1])
    assert fsdp == {"sharding": "grad_op", "cpu_offload": True, "wrap_classes": ["GPT2Block", "Embedding"]}
    assert "warning: --fsdp_state_dict_type='SHARDED_STATE_DICT' is ignored: save_state always writes" in out
    code, out = invoke(
        "launch", "--dry-run", "--use_deepspeed", "--zero_stage", "3", "--offload_param_device", "cpu",
        "--offload_optimizer_device", "none", "--gradient_clipping", "0.5", "--zero3_save_16bit_model", "false",
        "--cpu", "train.py",
    )  # fmt: skip
    assert code == 0, out
    assert (
        '"offload_params": true' in out
        and '"gradient_clipping": 0.5' in out
        and '"save_16bit_model": false' in out
    )
    assert '"offload_optimizer"' not in out  # "none": the default, nothing chosen
    code, out = invoke("launch", "--dry-run", "--fsdp_offload_params", "maybe", "train.py")
    assert code == 2 and "fsdp_offload_params='maybe' is not a boolean" in out
    code, out = invoke(
        "launch", "--dry-run", "--fsdp-sharding", "full", "--fsdp_sharding_strategy", "NO_SHARD", "train.py"
    )
    assert code == 2 and "two values" in out


def test_accelerates_no_op_flags_are_accepted_and_dynamo_backend_is_the_compile_setting():
    code, out = invoke(
        "launch", "--dry-run", "--same_network", "--debug", "--dynamo_backend", "no", "train.py"
    )
    assert code == 0, out
    code, out = invoke("launch", "--dry-run", "--dynamo_backend", "inductor", "train.py")
    assert (
        code == 0
        and "compile={'backend': 'inductor'}" in out
        and 'DISTRIB_COMPILE={"backend": "inductor"}' in out
    )
    code, out = invoke("launch", "--dry-run", "--tpu", "train.py")
    assert code == 2 and "strategy 'xla' cannot run here" in out  # --tpu chose xla; torch_xla is missing here


def test_accelerate_parallelism_and_dynamo_configs_become_distrib_settings(tmp_path: Path):
    path = tmp_path / "accelerate.yaml"
    path.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_CPU\nnum_processes: 4\n"
        "parallelism_config:\n  parallelism_config_tp_size: 2\n  parallelism_config_dp_shard_size: 2\n"
        "dynamo_config:\n  dynamo_backend: INDUCTOR\n  dynamo_use_regional_compilation: true\n"
    )
    code, out = invoke("launch", "--dry-run", "--config-file", str(path), "train.py")
    assert code == 0, out
    assert 'DISTRIB_PARALLELISM={"dp_shard": 2, "tp": 2}' in out or '"tp": 2' in out, out
    assert 'DISTRIB_COMPILE={"regional": true}' in out, out
