"""The rules a launch's values must follow, each written once.

The config file applies them when it is read, the plan builder when it resolves the options (and the
`LaunchPlan` again when it validates itself), `distrib config` at the prompt and `notebook_launcher`
before any process starts, so a rule cannot drift between them and every caller reports it alike. Each
function raises `SettingsError` naming the values, the rule and the fix; `source` says where the values
came from (a file path, "launch options", ...).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ..errors import SettingsError

_RANGE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")

# mixed precisions that need an accelerator, and the launch devices that have one (fp16 runs on the CPU too,
# with CPU autocast and loss scaling; the strategies' precision plans refuse what their backend cannot run)
_PRECISION_DEVICES: dict[str, tuple[str, ...]] = {"fp8": ("cuda",)}


def machine_count(value: Any, source: str = "launch options") -> int | str:
    """A `num_machines` value normalised: an int (fixed), or "MIN:MAX" (an elastic range), validated."""
    low, high = machine_range(value, source)
    return low if low == high else f"{low}:{high}"


def machine_range(value: Any, source: str = "launch options") -> tuple[int, int]:
    """(MIN, MAX) of a `num_machines` value: `2` -> (2, 2); `"1:4"` -> (1, 4)."""
    if isinstance(value, int) and not isinstance(value, bool):
        low = high = value
    elif isinstance(value, str) and value.strip().isdigit():
        low = high = int(value)
    elif isinstance(value, str) and _RANGE.match(value):
        found = _RANGE.match(value)
        assert found is not None
        low, high = int(found.group(1)), int(found.group(2))
    else:
        raise SettingsError(
            f"{source}: num_machines={value!r} is not valid: expected a number of machines (2) or an "
            "elastic range MIN:MAX (1:4)."
        )
    if low < 1 or high < low:
        raise SettingsError(
            f"{source}: num_machines={value!r} is not valid: expected at least 1 machine, and MIN <= MAX "
            "in a range MIN:MAX."
        )
    return low, high


def rdzv_conf(value: Any, source: str = "launch options") -> str:
    """A `rdzv_conf` value (`key=value,key=value`) validated and normalised; see `rdzv_settings`."""
    return ",".join(f"{k}={v}" for k, v in rdzv_settings(value, source).items())


def rdzv_settings(value: Any, source: str = "launch options") -> dict[str, str]:
    """`"last_call_timeout=5,keep_alive_interval=1"` -> {"last_call_timeout": "5", ...}."""
    out: dict[str, str] = {}
    for part in str(value or "").split(","):
        if not part.strip():
            continue
        key, sep, item = part.partition("=")
        if not sep or not key.strip().isidentifier() or not item.strip():
            raise SettingsError(
                f"{source}: rdzv_conf={value!r} is not valid: expected KEY=VALUE pairs separated by commas, "
                "e.g. last_call_timeout=5,keep_alive_interval=2."
            )
        out[key.strip()] = item.strip()
    return out


def check_machines(values: Mapping[str, Any], source: str) -> None:
    """Machine rank in range; an address for several machines; an elastic range only with c10d."""
    low, high = machine_range(values.get("num_machines", 1), source)
    rank = values.get("machine_rank", 0)
    if not 0 <= rank < high:
        allowed = f"0 to {high - 1}" + (
            " (in an elastic range only machine 0, the host, is special)" if low < high else ""
        )
        raise SettingsError(
            f"{source}: machine_rank={rank} is out of range for num_machines={values.get('num_machines', 1)}: "
            f"allowed values are {allowed}."
        )
    if high > 1 and not values.get("main_process_ip"):
        raise SettingsError(
            f"{source}: num_machines={values.get('num_machines')} needs main_process_ip (--main-process-ip), "
            "the address of machine 0 that every machine can reach."
        )
    if low < high and values.get("rdzv_backend", "static") != "c10d":
        raise SettingsError(
            f"{source}: num_machines={values.get('num_machines')!r} is an elastic range, which needs "
            "torch's dynamic rendezvous: add --rdzv-backend c10d (static rendezvous fixes every machine's "
            "rank, so the group cannot change size)."
        )


def check_processes(num_processes: int, num_machines: int, source: str) -> None:
    """`num_processes` counts all machines together, so it must split evenly over them."""
    if num_processes < 1 or num_processes % num_machines:
        raise SettingsError(
            f"{source}: num_processes={num_processes} is not a multiple of num_machines="
            f"{num_machines} (or not positive); every machine runs the same number of processes (num_processes counts all "
            f"machines together). Use --num-processes {max(1, num_processes // num_machines) * num_machines}, "
            "or --num-processes-per-machine."
        )


def check_precision(mixed_precision: str, device: str, source: str) -> None:
    """A mixed precision that needs an accelerator, on a launch that has none."""
    devices = _PRECISION_DEVICES.get(mixed_precision)
    if devices is not None and device not in devices:
        where = "CPU (--cpu, or no CUDA GPU found)" if device == "cpu" else device
        raise SettingsError(
            f"{source}: mixed_precision={mixed_precision!r} needs a GPU, but this launch runs on {where}. "
            "Use --mixed-precision bf16 (works on CPU) or no."
        )


def check_devices(values: Mapping[str, Any], source: str) -> None:
    """GPU choices that contradict running on the CPU."""
    if values.get("cpu") and values.get("gpu_ids") not in (None, "all"):
        raise SettingsError(
            f"{source}: gpu_ids={values['gpu_ids']!r} chooses GPUs, but cpu=True runs on the CPU; drop "
            "--gpu-ids, or drop --cpu."
        )
    if values.get("cpu") and values.get("strategy") == "xla":
        raise SettingsError(
            f"{source}: strategy='xla' runs on XLA devices, but cpu=True asks for the CPU; drop one of them "
            "(torch_xla's CPU device is chosen with PJRT_DEVICE=CPU, not --cpu)."
        )


def check_combinations(values: Mapping[str, Any], source: str) -> None:
    """Every rule over several values that a config file, the command line or `notebook_launcher` can break
    before the machine is known (the plan builder checks the rest)."""
    check_machines(values, source)
    check_devices(values, source)
    if "num_processes" in values and "num_processes_per_machine" in values:
        low, high = machine_range(values.get("num_machines", 1), source)
        if low < high or values["num_processes"] != values["num_processes_per_machine"] * low:
            raise SettingsError(
                f"{source}: num_processes={values['num_processes']} and num_processes_per_machine="
                f"{values['num_processes_per_machine']} disagree for num_machines={values.get('num_machines', 1)}; "
                "give only one of them."
            )
    elif "num_processes" in values:
        low, high = machine_range(values.get("num_machines", 1), source)
        if low < high:
            raise SettingsError(
                f"{source}: num_processes={values['num_processes']} counts the processes of all machines, "
                f"which the elastic range num_machines={values['num_machines']!r} leaves open; give "
                "--num-processes-per-machine instead."
            )
        check_processes(int(values["num_processes"]), low, source)
