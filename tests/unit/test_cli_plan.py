"""The launch plan builder, without processes: every rule that turns options into a LaunchPlan."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from distrib._environment import SlurmStep, slurm_step
from distrib._launch.plan import LaunchPlan, MachineFacts, Target, build_plan
from distrib.errors import SettingsError

CPU_BOX = MachineFacts(cpu_count=8, gpu_count=0)
GPU_BOX = MachineFacts(cpu_count=32, gpu_count=4)
SCRIPT = Target("train.py", "script", ("--lr", "3"))


def plan(values: dict | None = None, machine: MachineFacts = CPU_BOX, **kwargs) -> LaunchPlan:
    return build_plan(values or {}, target=SCRIPT, machine=machine, **kwargs)


def test_defaults_on_a_cpu_machine_run_one_process_on_a_free_port():
    p = plan()
    assert (p.num_processes, p.num_machines, p.machine_rank, p.device) == (1, 1, 0, "cpu")
    assert p.main_process_ip == "127.0.0.1" and p.main_process_port is None
    assert (p.rdzv_backend, p.max_restarts, p.executor) == ("static", 0, "elastic")
    assert p.env == {}  # nothing chosen, nothing exported: the code's own settings stay in charge


def test_defaults_on_a_gpu_machine_run_one_process_per_gpu():
    p = plan(machine=GPU_BOX)
    assert (p.num_processes, p.device) == (4, "cuda")
    assert p.env["OMP_NUM_THREADS"] == "8"


def test_gpu_ids_choose_the_processes_and_cuda_visible_devices():
    p = plan({"gpu_ids": "1, 3"}, machine=GPU_BOX)
    assert p.num_processes == 2
    assert p.env["CUDA_VISIBLE_DEVICES"] == "1,3"


def test_cpu_threads_default_divides_the_cores_and_an_explicit_value_wins():
    assert plan({"num_processes": 3}).env["OMP_NUM_THREADS"] == "2"  # 8 cores // 3
    assert plan({"num_processes": 16}).env["OMP_NUM_THREADS"] == "1"  # at least 1
    assert plan({"num_processes": 2, "num_cpu_threads_per_process": 3}).env["OMP_NUM_THREADS"] == "3"
    kept = plan({"num_processes": 2}, machine=dataclasses.replace(CPU_BOX, omp_num_threads="5"))
    assert "OMP_NUM_THREADS" not in kept.env and any("OMP_NUM_THREADS=5" in n for n in kept.notes)


def test_settings_travel_as_distrib_variables():
    p = plan({"num_processes": 2, "mixed_precision": "bf16", "gradient_accumulation_steps": 4, "seed": 7})
    assert p.env["DISTRIB_MIXED_PRECISION"] == "bf16"
    assert p.env["DISTRIB_GRADIENT_ACCUMULATION_STEPS"] == "4"
    assert p.env["DISTRIB_SEED"] == "7"


def test_fsdp_options_travel_as_json_and_imply_the_strategy():
    p = plan({"num_processes": 2, "fsdp.sharding": "grad_op", "fsdp.cpu_offload": True})
    assert json.loads(p.env["DISTRIB_FSDP"]) == {"sharding": "grad_op", "cpu_offload": True}
    assert p.env["DISTRIB_STRATEGY"] == "fsdp"
    assert any("strategy='fsdp'" in n for n in p.notes)


def test_deepspeed_options_travel_as_json(tmp_path: Path):
    config = tmp_path / "ds.json"
    config.write_text("{}")
    p = plan({"deepspeed.zero_stage": 3, "deepspeed.offload_params": True, "deepspeed.config": str(config)})
    assert json.loads(p.env["DISTRIB_DEEPSPEED"]) == {
        "config": str(config.resolve()),
        "zero_stage": 3,
        "offload_params": True,
    }


def test_strategy_options_for_another_strategy_are_refused():
    with pytest.raises(SettingsError, match=r"fsdp options were given but strategy='ddp'.*--strategy fsdp"):
        plan({"strategy": "ddp", "fsdp.sharding": "full"})


def test_missing_deepspeed_config_is_named():
    with pytest.raises(SettingsError, match=r"deepspeed.config='nope.json'.*does not exist"):
        plan({"deepspeed.config": "nope.json"})


@pytest.mark.parametrize("precision", ["fp8"])
def test_gpu_only_precision_on_cpu_names_the_fix(precision: str):
    with pytest.raises(SettingsError, match=rf"mixed_precision='{precision}' needs a GPU.*bf16"):
        plan({"mixed_precision": precision})
    with pytest.raises(SettingsError, match="needs a GPU"):
        plan({"mixed_precision": precision, "cpu": True}, machine=GPU_BOX)
    assert plan({"mixed_precision": precision}, machine=GPU_BOX).device == "cuda"


def test_bf16_and_fp16_on_cpu_are_fine():
    assert plan({"mixed_precision": "bf16"}).env["DISTRIB_MIXED_PRECISION"] == "bf16"
    assert plan({"mixed_precision": "fp16"}).env["DISTRIB_MIXED_PRECISION"] == "fp16"


def test_multi_machine_needs_an_address_and_gets_a_fixed_port():
    with pytest.raises(SettingsError, match="num_machines=2 needs main_process_ip"):
        plan({"num_machines": 2})
    p = plan({"num_machines": 2, "machine_rank": 1, "main_process_ip": "10.0.0.1", "num_processes": 4})
    assert (p.processes_per_machine, list(p.ranks), p.main_process_port) == (2, [2, 3], 29500)


def test_machine_rank_must_be_below_the_machine_count():
    with pytest.raises(SettingsError, match=r"machine_rank=2 is out of range.*allowed values are 0 to 1"):
        plan({"num_machines": 2, "machine_rank": 2, "main_process_ip": "h"})


def test_processes_must_split_evenly_over_machines_and_fit_the_gpus():
    with pytest.raises(SettingsError, match="not a multiple of num_machines=2"):
        plan({"num_machines": 2, "main_process_ip": "h", "num_processes": 3})
    with pytest.raises(SettingsError, match=r"has 4 usable GPU\(s\).*--num-processes 4, or --cpu"):
        plan({"num_processes": 8}, machine=GPU_BOX)
    with pytest.raises(SettingsError, match="gpu_ids='a,b' is not valid"):
        plan({"gpu_ids": "a,b"}, machine=GPU_BOX)


def test_slurm_step_gives_machines_rank_and_address_unless_overridden():
    step = SlurmStep(node_rank=1, num_nodes=2, num_tasks=2, main_address="gpu03", job_id="77")
    p = plan({"num_processes": 4}, slurm=step)
    assert (p.num_machines, p.machine_rank, p.main_process_ip, p.run_id) == (2, 1, "gpu03", "distrib-77")
    assert any("from SLURM" in n for n in p.notes)
    assert plan({"num_processes": 4, "main_process_ip": "10.1.1.1"}, slurm=step).main_process_ip == "10.1.1.1"


def test_slurm_with_several_tasks_per_node_is_refused():
    step = SlurmStep(node_rank=0, num_nodes=1, num_tasks=4, main_address="n1", job_id="1")
    with pytest.raises(SettingsError, match="--ntasks-per-node=1"):
        plan(slurm=step)


def test_slurm_step_is_read_from_srun_variables_only():
    env = {
        "SLURM_STEP_NUM_NODES": "2",
        "SLURM_NODEID": "1",
        "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_STEP_NODELIST": "gpu[03-04]",
        "SLURM_JOB_ID": "9",
    }
    assert slurm_step(env) == SlurmStep(
        node_rank=1, num_nodes=2, num_tasks=2, main_address="gpu03", job_id="9"
    )
    assert slurm_step({"SLURM_JOB_ID": "9", "SLURM_NNODES": "2"}) is None  # a batch script, not srun


def test_xla_uses_its_own_spawner_and_says_so():
    p = plan({"strategy": "xla", "num_processes": 4})
    assert (p.executor, p.device) == ("xla", "xla")
    assert any("one process per local XLA device" in n for n in p.notes)
    assert "torch_xla.launch" in p.describe()


def test_deepspeed_on_several_machines_is_explained():
    p = plan({"strategy": "deepspeed", "num_machines": 2, "main_process_ip": "h", "num_processes": 2})
    assert p.executor == "elastic"
    assert any("run this command on every machine" in n for n in p.notes)


def test_plan_is_frozen_and_validates_itself():
    p = plan()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.num_processes = 3  # type: ignore[misc]
    with pytest.raises(SettingsError, match="not a multiple of num_machines=2"):
        dataclasses.replace(p, num_processes=3, num_machines=2, main_process_port=1)


def test_worker_command_runs_the_bootstrap_and_keeps_the_script_args():
    assert plan().worker_args() == ("-u", "-m", "distrib._launch.worker", "train.py", "--lr", "3")
    module = build_plan({}, target=Target("pkg.train", "module", ("-x",)), machine=CPU_BOX)
    assert module.worker_args()[-3:] == ("--module", "pkg.train", "-x")


def test_describe_shows_processes_rendezvous_and_environment():
    p = plan(
        {"num_processes": 2, "mixed_precision": "bf16", "max_restarts": 2}, sources={"num_processes": "file"}
    )
    text = p.describe()
    for expected in (
        "2 in total",
        "static at 127.0.0.1",
        "DISTRIB_MIXED_PRECISION=bf16",
        "up to 2 restart",
        "num_processes (file)",
        "distrib._launch.worker train.py --lr 3",
    ):
        assert expected in text
    assert json.loads(json.dumps(p.as_dict()))["environment"]["OMP_NUM_THREADS"] == "4"


def test_extra_environment_is_added_last():
    p = plan({"mixed_precision": "bf16"}, extra_env={"FOO": "1", "DISTRIB_MIXED_PRECISION": "no"})
    assert p.env["FOO"] == "1" and p.env["DISTRIB_MIXED_PRECISION"] == "no"
