"""The DeepSpeed config: built from `DeepSpeedOptions` and distrib's settings, "auto" values filled in.

Pure functions over dicts (no DeepSpeed import), so every rule is unit-tested without processes:

* the config comes from `DeepSpeedOptions.config` (a dict or a JSON file), else is empty;
* the common knobs (`zero_stage`, `offload_optimizer`, `offload_params`, `gradient_clipping`) are set in
  it; a knob that contradicts the config is a `SettingsError`; clipping is off unless asked for (DeepSpeed
  alone would clip at 1.0);
* `gradient_accumulation_steps`, `train_micro_batch_size_per_gpu`, `train_batch_size` and the
  precision sections are filled where missing or "auto" from distrib's settings and the first prepared
  dataloader, and a value that contradicts them is a `SettingsError` naming both;
* any "auto" left afterwards (e.g. in an optimizer's params) is an error naming its key.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import SettingsError

if TYPE_CHECKING:
    from .._options import DeepSpeedOptions
    from .._settings import Settings

AUTO = "auto"


def load_config(source: dict[str, Any] | str | None) -> dict[str, Any]:
    """A private copy of the user's config: the dict itself, or the JSON file it names."""
    if source is None:
        return {}
    if isinstance(source, dict):
        return copy.deepcopy(source)
    path = Path(source)
    try:
        loaded = json.loads(path.read_text())
    except FileNotFoundError:
        raise SettingsError(
            f"DeepSpeedOptions.config={source!r} (--deepspeed-config-file) does not exist; give the path of "
            "a DeepSpeed JSON config, or a dict."
        ) from None
    except json.JSONDecodeError as exc:
        raise SettingsError(f"the DeepSpeed config {source!r} is not valid JSON: {exc}.") from None
    if not isinstance(loaded, dict):
        raise SettingsError(
            f"the DeepSpeed config {source!r} must hold a JSON object, not {type(loaded).__name__}."
        )
    return loaded


def _agree(section: dict[str, Any], key: str, value: Any, path: str, ours: str) -> None:
    """Set `section[key]` to `value` unless the config already holds a different, non-"auto" value."""
    current = section.get(key, AUTO)
    if current == AUTO:
        section[key] = value
    elif current != value:
        raise SettingsError(
            f"the DeepSpeed config sets {path}={current!r}, but distrib's {ours} is {value!r}; make them "
            f'agree, or set {path} to "auto" (or leave it out) to take distrib\'s value.'
        )


def build_config(
    options: DeepSpeedOptions,
    settings: Settings,
    *,
    world_size: int,
    micro_batch_size: int | None,
    has_optimizer: bool,
    has_scheduler: bool,
) -> dict[str, Any]:
    """The complete DeepSpeed config for this run (see the module docstring for the rules)."""
    config = load_config(options.config)
    _apply_knobs(config, options)
    _apply_precision(config, settings.mixed_precision)
    _apply_batch(config, settings.gradient_accumulation_steps, world_size, micro_batch_size)
    _check_optimizer(config, has_optimizer, has_scheduler)
    config.setdefault("zero_allow_untested_optimizer", True)  # the user's own torch optimizer
    config.setdefault("zero_force_ds_cpu_optimizer", False)  # ... also with offloaded optimizer state
    left = [path for path, value in _walk(config) if value == AUTO]
    if left:
        raise SettingsError(
            f'the DeepSpeed config leaves {", ".join(left)} as "auto", which distrib cannot fill (it fills '
            "batch sizes, accumulation, precision, ZeRO stage and clipping); give real values."
        )
    return config


def _walk(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, node


def _apply_knobs(config: dict[str, Any], options: DeepSpeedOptions) -> None:
    zero = config.setdefault("zero_optimization", {})
    if options.zero_stage is not None:
        _agree(zero, "stage", options.zero_stage, "zero_optimization.stage", "DeepSpeedOptions.zero_stage")
    elif zero.get("stage") == AUTO:
        zero["stage"] = 0
    stage = zero.get("stage", 0)
    if options.offload_optimizer:
        if stage == 0:
            raise SettingsError(
                "DeepSpeedOptions(offload_optimizer=True) needs ZeRO stage 1, 2 or 3; set zero_stage too."
            )
        target = zero.setdefault("offload_optimizer", {"device": "cpu", "pin_memory": False})
        _agree(target, "device", "cpu", "zero_optimization.offload_optimizer.device", "offload_optimizer")
    if options.offload_params:
        if stage != 3:
            raise SettingsError(
                f"DeepSpeedOptions(offload_params=True) needs ZeRO stage 3 (parameters are partitioned "
                f"only there), but the stage is {stage}; set zero_stage=3."
            )
        target = zero.setdefault("offload_param", {"device": "cpu", "pin_memory": False})
        _agree(target, "device", "cpu", "zero_optimization.offload_param.device", "offload_params")
    if options.gradient_clipping is not None:
        _agree(
            config,
            "gradient_clipping",
            options.gradient_clipping,
            "gradient_clipping",
            "DeepSpeedOptions.gradient_clipping",
        )
    elif config.get("gradient_clipping", AUTO) == AUTO:
        config["gradient_clipping"] = 0.0  # DeepSpeed's own default would clip at 1.0 unasked


def _apply_precision(config: dict[str, Any], mixed_precision: str) -> None:
    if mixed_precision == "fp8":
        raise SettingsError(
            "strategy='deepspeed' does not run mixed_precision='fp8' through distrib; use 'bf16', or "
            "strategy='fsdp' / 'ddp' for fp8."
        )
    for name in ("bf16", "fp16"):
        section = config.setdefault(name, {})
        if not isinstance(section, dict):
            raise SettingsError(
                f'the DeepSpeed config\'s {name!r} must be a section like {{"enabled": true}}.'
            )
        wanted = mixed_precision == name
        ours = f"mixed_precision={mixed_precision!r}"
        _agree(section, "enabled", wanted, f"{name}.enabled", ours)


def _apply_batch(config: dict[str, Any], accumulation: int, world_size: int, micro: int | None) -> None:
    _agree(
        config,
        "gradient_accumulation_steps",
        accumulation,
        "gradient_accumulation_steps",
        "gradient_accumulation_steps",
    )
    if micro is not None:
        _agree(
            config,
            "train_micro_batch_size_per_gpu",
            micro,
            "train_micro_batch_size_per_gpu",
            "per-process batch size of the first prepared dataloader",
        )
    micro = config.get("train_micro_batch_size_per_gpu", AUTO)
    if micro == AUTO:
        total = config.get("train_batch_size", AUTO)
        if total == AUTO:
            raise SettingsError(
                "DeepSpeed needs the per-process batch size: pass the training DataLoader to the same "
                "prepare() call as the model (or prepare it first), or set train_micro_batch_size_per_gpu "
                "in the DeepSpeed config."
            )
        config["train_micro_batch_size_per_gpu"] = max(1, int(total) // (accumulation * world_size))
        micro = config["train_micro_batch_size_per_gpu"]
    _agree(
        config,
        "train_batch_size",
        int(micro) * accumulation * world_size,
        "train_batch_size",
        f"micro batch x gradient_accumulation_steps x processes ({micro} x {accumulation} x {world_size})",
    )


def _check_optimizer(config: dict[str, Any], has_optimizer: bool, has_scheduler: bool) -> None:
    if has_optimizer and "optimizer" in config:
        raise SettingsError(
            "prepare() got a torch optimizer and the DeepSpeed config names one too "
            f"({config['optimizer'].get('type', '?')!r}); drop one of them."
        )
    if has_scheduler and "scheduler" in config:
        raise SettingsError(
            "prepare() got a learning-rate scheduler and the DeepSpeed config names one too "
            f"({config['scheduler'].get('type', '?')!r}); drop one of them."
        )
