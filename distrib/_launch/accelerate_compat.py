"""Read an Accelerate `default_config.yaml`: translate what maps onto distrib, say why the rest does not.

`translate` is pure: it takes the parsed YAML and returns a distrib (version 1) mapping plus one warning
per key whose value asks for something distrib does differently or not at all, each with the reason. Keys
whose value asks for nothing special (`compute_environment: LOCAL_MACHINE`, `debug: false`, empty
sections) are dropped without a word. What Accelerate itself refuses is refused too, with a
`SettingsError`: keys its `ClusterConfig` does not have (a top-level `gradient_accumulation_steps`,
`seed`), values its enums do not have, and sections that are not mappings. Requests distrib cannot serve
at all (another device type, Megatron-LM, SageMaker, etcd rendezvous) are errors naming the alternative,
since running anyway would run something else.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ..errors import SettingsError

Translator = Callable[[Any, dict[str, Any], list[str], str], None]

_STRATEGIES = {
    "MULTI_GPU": "ddp",
    "MULTI_CPU": "ddp",
    "FSDP": "fsdp",
    "DEEPSPEED": "deepspeed",
    "XLA": "xla",
    "TPU": "xla",
}
# distributed types Accelerate knows that ask for hardware or a framework distrib does not run on
_UNSUPPORTED_TYPES = {
    "MULTI_NPU": "Ascend NPUs",
    "MULTI_MLU": "Cambricon MLUs",
    "MULTI_SDAA": "SDAA devices",
    "MULTI_MUSA": "Moore Threads GPUs",
    "MULTI_XPU": "Intel XPUs",
    "MULTI_HPU": "Intel Gaudi HPUs",
    "MEGATRON_LM": "Megatron-LM",
}
_SAME_NAME = ("mixed_precision", "num_machines", "machine_rank", "main_process_ip", "main_process_port")
_RDZV_BACKENDS = ("static", "c10d")

#: every top-level key of Accelerate's `ClusterConfig` (plus the legacy `fp16` and `dynamo_backend`,
#: which Accelerate converts), and the reason distrib ignores it when set to something that matters
_IGNORED: dict[str, tuple[tuple[Any, ...], str]] = {
    "debug": (
        (False, None),
        "distrib has no debug switch: its collectives check every rank's shapes and call sites in every run",
    ),
    "downcast_bf16": (
        ("no", False, None),
        "it downcasts fp32 to bf16 on TPUs; with distrib use mixed_precision: bf16 (autocast) instead",
    ),
    "enable_cpu_affinity": (
        (False, None),
        "distrib does not pin workers to CPU cores; start the launcher under numactl or taskset to do so",
    ),
    "same_network": ((True, False, None), ""),
    "main_training_function": (
        ("main", None),
        "it names the function of Accelerate's notebook and TPU launchers; distrib launch runs the script "
        "as __main__ (use notebook_launcher(fn) to run a function)",
    ),
    "fp8_config": (
        ({}, None),
        "distrib's fp8 uses torchao's float8 training with its defaults; the backend and recipe are not "
        "configurable",
    ),
    "tp_config": (({}, None), "distrib has no tensor parallelism"),
    "megatron_lm_config": (({}, None), "distrib does not run Megatron-LM"),
    "ipex_config": (({}, None), "distrib does not use Intel Extension for PyTorch"),
    "mpirun_config": (
        ({}, None),
        "distrib launch starts workers with torch's elastic agent; to use mpirun, start the script with "
        "mpirun directly (distributed() reads the OMPI_*/PMI_* variables)",
    ),
    "tpu_name": ((None,), "TPU pod setup (`accelerate tpu-config`) is not part of distrib launch"),
    "tpu_zone": ((None,), "TPU pod setup (`accelerate tpu-config`) is not part of distrib launch"),
    "tpu_use_cluster": ((False, None), "on a TPU pod, run distrib launch on every host"),
    "tpu_use_sudo": ((False, None), "TPU pod setup (`accelerate tpu-config`) is not part of distrib launch"),
    "command_file": ((None,), "TPU pod setup (`accelerate tpu-config`) is not part of distrib launch"),
    "commands": ((None, []), "TPU pod setup (`accelerate tpu-config`) is not part of distrib launch"),
    "tpu_vm": ((None, []), "TPU pod setup (`accelerate tpu-config`) is not part of distrib launch"),
    "tpu_env": ((None, []), "TPU pod setup (`accelerate tpu-config`) is not part of distrib launch"),
}

_SHARDING = {
    "FULL_SHARD": "full",
    "1": "full",
    "SHARD_GRAD_OP": "grad_op",
    "2": "grad_op",
    "NO_SHARD": "no_shard",
    "3": "no_shard",
    "HYBRID_SHARD": "hybrid",
    "4": "hybrid",
    "HYBRID_SHARD_ZERO2": "hybrid",
    "5": "hybrid",
}
_FSDP_IGNORED: dict[str, tuple[tuple[Any, ...], str]] = {
    "fsdp_version": (
        (2, "2", None),
        "distrib always uses FSDP2 (fully_shard); the other keys were translated to it",
    ),
    "fsdp_use_orig_params": ((True, False, None), ""),
    "fsdp_state_dict_type": (
        (),
        "save_state always writes FSDP state sharded (torch.distributed.checkpoint, loadable at another world "
        "size) and save_model writes the full state dict: there is nothing to choose",
    ),
    "fsdp_backward_prefetch": ((), "FSDP2 prefetches the next unit's parameters in backward by itself"),
    "fsdp_forward_prefetch": ((False, None), "FSDP2 overlaps the all-gathers of forward by itself"),
    "fsdp_cpu_ram_efficient_loading": (
        (False, None),
        "distrib shards the model every rank built; build it on the meta device (distrib.init_empty_weights) "
        "to save host memory",
    ),
    "fsdp_sync_module_states": (
        (False, None),
        "FSDP2 does not broadcast rank 0's weights; build the model identically on every rank (seed it, e.g. "
        "seed: 0)",
    ),
}
_DEEPSPEED_IGNORED: dict[str, tuple[tuple[Any, ...], str]] = {
    "zero3_init_flag": (
        (False, None),
        "distrib partitions a ZeRO-3 model when prepare() creates the engine, not while the model is built",
    ),
    "deepspeed_multinode_launcher": (
        (),
        "distrib runs DeepSpeed under torch's elastic agent: run distrib launch on every machine (no pdsh, "
        "no hostfile)",
    ),
    "deepspeed_hostfile": ((None,), "see deepspeed_multinode_launcher"),
    "deepspeed_inclusion_filter": ((None,), "see deepspeed_multinode_launcher"),
    "deepspeed_exclusion_filter": ((None,), "see deepspeed_multinode_launcher"),
    "deepspeed_moe_layer_cls_names": (
        (None,),
        "mark MoE layers as ZeRO-3 leaf modules in your script (deepspeed.utils.set_z3_leaf_modules)",
    ),
    "offload_optimizer_nvme_path": (
        (None, "none"),
        "NVMe offload is set in a DeepSpeed JSON config (deepspeed_config_file: offload_optimizer.device: nvme)",
    ),
    "offload_param_nvme_path": (
        (None, "none"),
        "NVMe offload is set in a DeepSpeed JSON config (deepspeed_config_file: offload_param.device: nvme)",
    ),
}


#: Accelerate's `accelerate launch` flags that take a value and have no flag of the same name in distrib
#: (`distrib launch` accepts them, hidden, and translates them like the config keys): flag -> section
LAUNCH_FLAGS: dict[str, str] = {
    **dict.fromkeys(
        (
            "fsdp_sharding_strategy",
            "fsdp_offload_params",
            "fsdp_transformer_layer_cls_to_wrap",
            "fsdp_min_num_params",
            "fsdp_auto_wrap_policy",
            "fsdp_state_dict_type",
            "fsdp_backward_prefetch",
            "fsdp_forward_prefetch",
            "fsdp_use_orig_params",
            "fsdp_cpu_ram_efficient_loading",
            "fsdp_sync_module_states",
            "fsdp_reshard_after_forward",
            "fsdp_version",
        ),
        "fsdp_config",
    ),
    **dict.fromkeys(
        (
            "offload_optimizer_device",
            "offload_param_device",
            "offload_optimizer_nvme_path",
            "offload_param_nvme_path",
            "gradient_clipping",
            "zero3_init_flag",
            "zero3_save_16bit_model",
            "deepspeed_multinode_launcher",
            "deepspeed_hostfile",
        ),
        "deepspeed_config",
    ),
}
_TRUE, _FALSE = ("true", "yes", "1"), ("false", "no", "0")


def translate_flags(flags: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
    """Accelerate launch flags (`LAUNCH_FLAGS`, values as typed) as distrib settings (nested: `fsdp`,
    `deepspeed`), and the warnings of the keys left behind."""
    raw: dict[str, Any] = {}
    for flag, value in flags.items():
        raw.setdefault(LAUNCH_FLAGS[flag], {})[flag] = value
    out, warnings = translate(raw, "Accelerate launch flags")
    out.pop("version", None)
    return out, [
        w.replace("Accelerate key fsdp_config.", "--").replace("Accelerate key deepspeed_config.", "--")
        for w in warnings
    ]


def _truthy(value: Any, name: str) -> bool:
    """A boolean from YAML or from a command-line word (`--fsdp_offload_params false` is False)."""
    if isinstance(value, bool) or value is None:
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise SettingsError(f"{name}={value!r} is not a boolean: use true or false.")


def looks_like_accelerate(raw: Mapping[str, Any]) -> bool:
    """True for a file written by `accelerate config` (it has no `version`, but these keys)."""
    return "version" not in raw and ("compute_environment" in raw or "distributed_type" in raw)


def translate(raw: Mapping[str, Any], source: str = "Accelerate config") -> tuple[dict[str, Any], list[str]]:
    """An Accelerate config as a distrib mapping, and one warning (with its reason) per key left behind.

    Raises `SettingsError` for what Accelerate itself would refuse and for requests distrib cannot run.
    """
    _check_known_keys(raw, source)
    out: dict[str, Any] = {"version": 1}
    warnings: list[str] = []
    for key, value in raw.items():
        if key in _SAME_NAME:
            if value is not None:
                out[key] = value
        elif key in _TRANSLATORS:
            _TRANSLATORS[key](value, out, warnings, source)
        else:
            _note_ignored("", key, value, _IGNORED, warnings)
    if raw.get("distributed_type") == "MULTI_CPU":
        out["cpu"] = True
    return out, warnings


def _check_known_keys(raw: Mapping[str, Any], source: str) -> None:
    known = {*_SAME_NAME, *_TRANSLATORS, *_IGNORED}
    extra = sorted(str(k) for k in raw if k not in known)
    if not extra:
        return
    hints = []
    if "gradient_accumulation_steps" in extra:
        hints.append(
            "gradient_accumulation_steps belongs under deepspeed_config in an Accelerate file (otherwise it is "
            "an argument of Accelerator(...)); in a distrib config it is a top-level key"
        )
    raise SettingsError(
        f"{source}: this Accelerate config has keys Accelerate itself does not accept: {', '.join(extra)}"
        + (f" ({'; '.join(hints)})" if hints else "")
        + ". Remove them, or rewrite the file as a distrib config (`distrib config`), where every setting "
        "has a key."
    )


def _note_ignored(
    prefix: str, key: str, value: Any, table: Mapping[str, tuple[tuple[Any, ...], str]], warnings: list[str]
) -> None:
    harmless, reason = table.get(key, ((), "distrib has no equivalent"))
    if isinstance(value, str) and value.strip().lower() in (*_TRUE, *_FALSE):
        value = value.strip().lower() in _TRUE  # a command-line word compares like a YAML boolean
    if value in harmless or (not reason and key in table):
        return
    warnings.append(f"Accelerate key {prefix}{key}={value!r} is ignored: {reason}.")


def _compute_environment(value: Any, out: dict[str, Any], warnings: list[str], source: str) -> None:
    if value not in (None, "LOCAL_MACHINE"):
        raise SettingsError(
            f"{source}: compute_environment={value!r} is a SageMaker config, which distrib launch cannot run; "
            "write a config for this machine with `distrib config`."
        )


def _use_cpu(value: Any, out: dict[str, Any], warnings: list[str], source: str) -> None:
    if value:
        out["cpu"] = True


def _num_processes(value: Any, out: dict[str, Any], warnings: list[str], source: str) -> None:
    if value is not None and value != -1:  # Accelerate writes -1 for "decided at launch"
        out["num_processes"] = value


def _gpu_ids(value: Any, out: dict[str, Any], warnings: list[str], source: str) -> None:
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    if value not in (None, "", "all"):
        out["gpu_ids"] = str(value)


def _rdzv_backend(value: Any, out: dict[str, Any], warnings: list[str], source: str) -> None:
    if value is None:
        return
    if value not in _RDZV_BACKENDS:
        raise SettingsError(
            f"{source}: rdzv_backend={value!r} is not available in distrib launch (it offers "
            f"{', '.join(_RDZV_BACKENDS)}; etcd servers are not supported). Use c10d, torch's own dynamic "
            "rendezvous, hosted by machine 0."
        )
    out["rdzv_backend"] = value


def _legacy_fp16(value: Any, out: dict[str, Any], warnings: list[str], source: str) -> None:
    if value and "mixed_precision" not in out:
        out["mixed_precision"] = "fp16"


def _section(value: Any, name: str, source: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise SettingsError(
            f"{source}: {name} must be a mapping of {name.split('_')[0]} options (key: value lines under it), "
            f"got {type(value).__name__} {value!r}."
        )
    return value


def _fsdp_section(value: Any, out: dict[str, Any], warnings: list[str], source: str) -> None:
    config = _section(value, "fsdp_config", source)
    if config:
        out["fsdp"] = _fsdp(config, warnings, source)


def _deepspeed_section(value: Any, out: dict[str, Any], warnings: list[str], source: str) -> None:
    config = _section(value, "deepspeed_config", source)
    if config:
        out["deepspeed"] = _deepspeed(config, out, warnings)


def _distributed_type(value: Any, out: dict[str, Any], warnings: list[str], source: str) -> None:
    value = str(value)
    if value == "NO":
        return
    if value in _STRATEGIES:
        out["strategy"] = _STRATEGIES[value]
        return
    if value in _UNSUPPORTED_TYPES:
        raise SettingsError(
            f"{source}: distributed_type={value!r} asks for {_UNSUPPORTED_TYPES[value]}, which distrib does not "
            "run on (it runs on CUDA GPUs, CPUs and XLA devices). Use MULTI_GPU, MULTI_CPU, FSDP, DEEPSPEED, "
            "XLA or NO."
        )
    raise SettingsError(
        f"{source}: distributed_type={value!r} is not one Accelerate knows; allowed: NO, "
        f"{', '.join([*_STRATEGIES, *_UNSUPPORTED_TYPES])}."
    )


def _fsdp(config: Mapping[str, Any], warnings: list[str], source: str) -> dict[str, Any]:
    fsdp: dict[str, Any] = {}
    for key, value in config.items():
        if key in _FSDP_KEYS:
            _FSDP_KEYS[key](value, fsdp, warnings)
        elif key == "fsdp_sharding_strategy":
            _sharding(value, fsdp, warnings, source)
        else:
            _note_ignored("fsdp_config.", key, value, _FSDP_IGNORED, warnings)
    return fsdp


def _wrap_classes(value: Any, fsdp: dict[str, Any], warnings: list[str]) -> None:
    if value:
        names = value.split(",") if isinstance(value, str) else [str(v) for v in value]
        fsdp["wrap_classes"] = [n.strip() for n in names if n.strip()]


def _wrap_policy(value: Any, fsdp: dict[str, Any], warnings: list[str]) -> None:
    if value == "NO_WRAP":
        warnings.append(
            "Accelerate key fsdp_config.fsdp_auto_wrap_policy='NO_WRAP' is ignored: distrib always makes the "
            "model's repeated blocks (classes named ...Block/...Layer in a ModuleList) FSDP units unless "
            "wrap_classes or min_num_params choose others."
        )


_FSDP_KEYS: dict[str, Callable[[Any, dict[str, Any], list[str]], None]] = {
    "fsdp_reshard_after_forward": lambda v, f, w: f.setdefault(
        "sharding",
        "full"
        if v == "FULL_SHARD" or (v != "SHARD_GRAD_OP" and _truthy(v, "fsdp_reshard_after_forward"))
        else "grad_op",
    ),
    "fsdp_offload_params": lambda v, f, w: f.__setitem__("cpu_offload", _truthy(v, "fsdp_offload_params")),
    "fsdp_activation_checkpointing": lambda v, f, w: f.__setitem__(
        "activation_checkpointing", _truthy(v, "fsdp_activation_checkpointing")
    ),
    "fsdp_transformer_layer_cls_to_wrap": _wrap_classes,
    "fsdp_min_num_params": lambda v, f, w: f.__setitem__("min_num_params", int(v)) if v else None,
    "fsdp_auto_wrap_policy": _wrap_policy,
}


def _sharding(value: Any, fsdp: dict[str, Any], warnings: list[str], source: str) -> None:
    text = str(value)
    if text not in _SHARDING:
        raise SettingsError(
            f"{source}: fsdp_config.fsdp_sharding_strategy={value!r} is not one Accelerate knows; allowed: "
            f"{', '.join(k for k in _SHARDING if not k.isdigit())} (or 1 to 5)."
        )
    fsdp["sharding"] = _SHARDING[text]
    if text in ("HYBRID_SHARD_ZERO2", "5"):
        warnings.append(
            "Accelerate fsdp_sharding_strategy HYBRID_SHARD_ZERO2 is translated to 'hybrid': distrib's hybrid "
            "sharding reshards parameters after forward inside each group (HYBRID_SHARD's behaviour)."
        )


def _deepspeed(config: Mapping[str, Any], out: dict[str, Any], warnings: list[str]) -> dict[str, Any]:
    ds: dict[str, Any] = {}
    for key, value in config.items():
        if key == "zero_stage":
            ds["zero_stage"] = int(value)
        elif key in ("offload_optimizer_device", "offload_param_device"):
            _offload(key, value, ds, warnings)
        elif key == "gradient_accumulation_steps":
            out["gradient_accumulation_steps"] = int(value)
        elif key == "gradient_clipping":
            ds["gradient_clipping"] = float(value)
        elif key == "deepspeed_config_file":
            if value:
                ds["config"] = str(value)
        elif key == "zero3_save_16bit_model":
            ds["save_16bit_model"] = _truthy(value, key)
        else:
            _note_ignored("deepspeed_config.", key, value, _DEEPSPEED_IGNORED, warnings)
    return ds


def _offload(key: str, value: Any, ds: dict[str, Any], warnings: list[str]) -> None:
    name = "offload_optimizer" if key == "offload_optimizer_device" else "offload_params"
    if value == "nvme":
        warnings.append(
            f"Accelerate key deepspeed_config.{key}='nvme' is ignored: NVMe offload is set in a DeepSpeed JSON "
            "config (deepspeed_config_file); without one, nothing is offloaded."
        )
    ds[name] = value == "cpu"


def compile_options(backend: Any, config: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """Accelerate's dynamo backend (and `dynamo_config`) as distrib's `compile` setting; None for "no"."""
    name = str(backend or "no").strip().lower()
    if name == "no":
        return None
    config = config or {}
    out: dict[str, Any] = {"backend": name}
    if config.get("dynamo_mode") not in (None, "default"):
        out["mode"] = str(config["dynamo_mode"])
    for key, field in (
        ("dynamo_use_fullgraph", "fullgraph"),
        ("dynamo_use_regional_compilation", "regional"),
    ):
        if config.get(key) is not None:
            out[field] = _truthy(config[key], key)
    if config.get("dynamo_use_dynamic") is not None:
        out["dynamic"] = _truthy(config["dynamo_use_dynamic"], "dynamo_use_dynamic")
    return out


def _parallelism_config(value: Any, out: dict[str, Any], warnings: list[str], source: str) -> None:
    """Accelerate's ParallelismConfig sizes (`parallelism_config_tp_size: 2` or `tp_size: 2`)."""
    if not isinstance(value, Mapping):
        return
    sizes = {}
    for key, size in value.items():
        name = str(key).removeprefix("parallelism_config_").removesuffix("_size")
        if name in ("dp_replicate", "dp_shard", "tp", "cp") and size is not None:
            sizes[name] = int(size)
        elif size is not None:
            warnings.append(
                f"Accelerate key parallelism_config.{key}={size!r} is ignored: distrib has no such size"
            )
    if sizes:
        out["parallelism"] = sizes


def _dynamo_config(value: Any, out: dict[str, Any], warnings: list[str], source: str) -> None:
    if isinstance(value, Mapping):
        chosen = compile_options(value.get("dynamo_backend"), value)
        if chosen is not None:
            out["compile"] = chosen


def _dynamo_backend(value: Any, out: dict[str, Any], warnings: list[str], source: str) -> None:
    chosen = compile_options(value)
    if chosen is not None and "compile" not in out:
        out["compile"] = chosen


_TRANSLATORS: dict[str, Translator] = {
    "parallelism_config": _parallelism_config,
    "dynamo_config": _dynamo_config,
    "dynamo_backend": _dynamo_backend,
    "compute_environment": _compute_environment,
    "distributed_type": _distributed_type,
    "use_cpu": _use_cpu,
    "num_processes": _num_processes,
    "gpu_ids": _gpu_ids,
    "rdzv_backend": _rdzv_backend,
    "fp16": _legacy_fp16,
    "fsdp_config": _fsdp_section,
    "deepspeed_config": _deepspeed_section,
}
