"""Read an Accelerate `default_config.yaml`: translate what maps onto distrib, warn about the rest.

`translate` is pure: it takes the parsed YAML and returns a distrib (version 1) mapping plus one warning
per key that has no distrib equivalent. Keys whose value means "nothing special" (for example
`compute_environment: LOCAL_MACHINE` or `debug: false`) are dropped without a warning.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

_STRATEGIES = {
    "MULTI_GPU": "ddp",
    "MULTI_CPU": "ddp",
    "FSDP": "fsdp",
    "DEEPSPEED": "deepspeed",
    "XLA": "xla",
    "TPU": "xla",
}
_SAME_NAME = (
    "mixed_precision",
    "num_processes",
    "num_machines",
    "machine_rank",
    "main_process_ip",
    "main_process_port",
    "rdzv_backend",
    "gradient_accumulation_steps",
    "seed",
)
# keys (top level) whose listed values ask for nothing distrib would do differently
_HARMLESS: dict[str, tuple[Any, ...]] = {
    "compute_environment": ("LOCAL_MACHINE",),
    "debug": (False,),
    "downcast_bf16": ("no", False),
    "enable_cpu_affinity": (False,),
    "main_training_function": ("main",),
    "same_network": (True, False),
    "tpu_env": ([],),
    "tpu_use_cluster": (False,),
    "tpu_use_sudo": (False,),
    "dynamo_config": ({},),
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
}
_FSDP_HARMLESS = ("fsdp_auto_wrap_policy", "fsdp_version", "fsdp_use_orig_params", "fsdp_sync_module_states")


def looks_like_accelerate(raw: Mapping[str, Any]) -> bool:
    """True for a file written by `accelerate config` (it has no `version`, but these keys)."""
    return "version" not in raw and ("compute_environment" in raw or "distributed_type" in raw)


def translate(raw: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """An Accelerate config as a distrib mapping, and the warnings about keys left behind."""
    out: dict[str, Any] = {"version": 1}
    warnings: list[str] = []
    for key, value in raw.items():
        if key in _SAME_NAME:
            if value is not None:
                out[key] = value
        elif key in _TRANSLATORS:
            _TRANSLATORS[key](value, out, warnings)
        elif not (key in _HARMLESS and value in _HARMLESS[key]):
            warnings.append(f"Accelerate key {key}={value!r} has no distrib equivalent; ignored.")
    if raw.get("distributed_type") == "MULTI_CPU":
        out["cpu"] = True
    return out, warnings


def _use_cpu(value: Any, out: dict[str, Any], warnings: list[str]) -> None:
    if value:
        out["cpu"] = True


def _gpu_ids(value: Any, out: dict[str, Any], warnings: list[str]) -> None:
    if value not in (None, "", "all"):
        out["gpu_ids"] = str(value)


def _fsdp_section(value: Any, out: dict[str, Any], warnings: list[str]) -> None:
    out["fsdp"] = _fsdp(value or {}, warnings)


def _deepspeed_section(value: Any, out: dict[str, Any], warnings: list[str]) -> None:
    out["deepspeed"] = _deepspeed(value or {}, out, warnings)


def _distributed_type(value: Any, out: dict[str, Any], warnings: list[str]) -> None:
    value = str(value)
    if value == "NO":
        return
    if value in _STRATEGIES:
        out["strategy"] = _STRATEGIES[value]
        return
    warnings.append(
        f"Accelerate distributed_type={value!r} has no distrib equivalent; using strategy 'auto' "
        f"(allowed: NO, {', '.join(_STRATEGIES)})."
    )


def _fsdp(config: Mapping[str, Any], warnings: list[str]) -> dict[str, Any]:
    fsdp: dict[str, Any] = {}
    for key, value in config.items():
        if key == "fsdp_sharding_strategy":
            _sharding(str(value), fsdp, warnings)
        elif key == "fsdp_reshard_after_forward":
            fsdp.setdefault("sharding", "full" if value in (True, "FULL_SHARD") else "grad_op")
        elif key == "fsdp_offload_params":
            fsdp["cpu_offload"] = bool(value)
        elif key == "fsdp_activation_checkpointing":
            fsdp["activation_checkpointing"] = bool(value)
        elif key == "fsdp_transformer_layer_cls_to_wrap" and value:
            names = value.split(",") if isinstance(value, str) else list(value)
            fsdp["wrap_classes"] = [n.strip() for n in names if n.strip()]
        elif key == "fsdp_min_num_params" and value:
            fsdp["min_num_params"] = int(value)
        elif key not in _FSDP_HARMLESS:
            warnings.append(f"Accelerate key fsdp_config.{key}={value!r} has no distrib equivalent; ignored.")
    return fsdp


def _sharding(value: str, fsdp: dict[str, Any], warnings: list[str]) -> None:
    if value in _SHARDING:
        fsdp["sharding"] = _SHARDING[value]
    elif value in ("HYBRID_SHARD_ZERO2", "5"):
        fsdp["sharding"] = "hybrid"
        warnings.append("Accelerate fsdp_sharding_strategy HYBRID_SHARD_ZERO2 is translated to 'hybrid'.")
    else:
        warnings.append(f"Accelerate fsdp_sharding_strategy={value!r} is unknown; using 'full'.")


def _deepspeed(config: Mapping[str, Any], out: dict[str, Any], warnings: list[str]) -> dict[str, Any]:
    ds: dict[str, Any] = {}
    for key, value in config.items():
        if key == "zero_stage":
            ds["zero_stage"] = int(value)
        elif key in ("offload_optimizer_device", "offload_param_device"):
            name = "offload_optimizer" if key == "offload_optimizer_device" else "offload_params"
            if value == "nvme":
                warnings.append(f"Accelerate deepspeed_config.{key}='nvme' is not supported; not offloading.")
            ds[name] = value == "cpu"
        elif key == "gradient_accumulation_steps":
            out["gradient_accumulation_steps"] = int(value)
        elif key == "gradient_clipping":
            ds["gradient_clipping"] = float(value)
        elif key == "deepspeed_config_file" and value:
            ds["config"] = str(value)
        elif key == "zero3_save_16bit_model":
            ds["save_16bit_model"] = bool(value)
        else:
            warnings.append(
                f"Accelerate key deepspeed_config.{key}={value!r} has no distrib equivalent; ignored "
                "(distrib runs DeepSpeed under torch's elastic agent: run the command on every machine)."
            )
    return ds


_TRANSLATORS: dict[str, Callable[[Any, dict[str, Any], list[str]], None]] = {
    "distributed_type": _distributed_type,
    "use_cpu": _use_cpu,
    "gpu_ids": _gpu_ids,
    "fsdp_config": _fsdp_section,
    "deepspeed_config": _deepspeed_section,
}
