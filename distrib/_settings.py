"""`Settings`: every choice a run makes, in one frozen, validated dataclass.

Precedence, highest first: values given in code (`distributed(...)`), values set by the launcher (the
`DISTRIB_*` environment variables, see `_environment.py`), the config file (read by the launcher, which
turns it into those variables), then the defaults below. When code and launcher give different values the
code wins and a `DistribWarning` names both, so a conflict is never resolved silently.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from . import _validation
from ._options import (
    CompileOptions,
    DDPOptions,
    DeepSpeedOptions,
    FSDPOptions,
    ParallelismOptions,
    XLAOptions,
)
from .errors import SettingsError

StrategyName = Literal["auto", "single", "ddp", "fsdp", "deepspeed", "xla"]
MixedPrecision = Literal["no", "fp16", "bf16", "fp8"]


@dataclass(frozen=True, kw_only=True)
class Settings(_validation.KeywordFields):
    """The settings of a `distributed(...)` scope. Build it with keyword arguments; it validates itself.

    Example::

        settings = Settings(mixed_precision="bf16", gradient_accumulation_steps=4)
        with distributed(settings):   # or: with distributed(mixed_precision="bf16", ...)
            ...
    """

    strategy: StrategyName = "auto"
    mixed_precision: MixedPrecision = "no"
    gradient_accumulation_steps: int = 1
    split_batches: bool = False
    even_batches: bool = True
    device_placement: bool = True
    cpu: bool = False
    seed: int | None = None
    dispatch_batches: bool | None = None
    sync_each_batch: bool = False
    compile: bool | CompileOptions = False
    timeout: float = 1800.0
    stall_timeout: float | None = 300.0
    project_dir: str | None = None
    total_limit: int | None = None
    background_saves: bool = False
    check_replicas_every: int | None = 1000
    straggler_report_every: int | None = None
    straggler_threshold: float = 0.2
    debug_collectives: bool = False
    preemption_exit_code: int | None = 75
    ddp: DDPOptions = field(default_factory=DDPOptions)
    fsdp: FSDPOptions = field(default_factory=FSDPOptions)
    deepspeed: DeepSpeedOptions = field(default_factory=DeepSpeedOptions)
    xla: XLAOptions = field(default_factory=XLAOptions)
    parallelism: ParallelismOptions = field(default_factory=ParallelismOptions)

    def __post_init__(self) -> None:
        _validation.validate_fields(self)
        if self.gradient_accumulation_steps < 1:
            raise SettingsError(
                f"Settings.gradient_accumulation_steps={self.gradient_accumulation_steps} must be >= 1."
            )
        if self.timeout <= 0:
            raise SettingsError(f"Settings.timeout={self.timeout} must be a positive number of seconds.")
        if self.total_limit is not None and self.total_limit < 1:
            raise SettingsError(f"Settings.total_limit={self.total_limit} must be >= 1, or None to keep all.")
        if self.stall_timeout is not None and self.stall_timeout <= 0:
            raise SettingsError(
                f"Settings.stall_timeout={self.stall_timeout} must be a positive number of seconds, or None "
                "to turn the stall watchdog off."
            )
        for name in ("check_replicas_every", "straggler_report_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise SettingsError(
                    f"Settings.{name}={value} must be >= 1 (optimizer steps), or None for off."
                )
        if self.straggler_threshold <= 0:
            raise SettingsError(
                f"Settings.straggler_threshold={self.straggler_threshold} must be > 0 (0.2 flags ranks more "
                "than 20% slower than the median)."
            )
        if self.preemption_exit_code is not None and not 0 <= self.preemption_exit_code <= 255:
            raise SettingsError(
                f"Settings.preemption_exit_code={self.preemption_exit_code} must be an exit status, 0 to 255, "
                "or None to leave SIGTERM and SIGUSR1 alone."
            )

    def replace(self, **changes: Any) -> Settings:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Settings:
        """Build settings from a mapping, with an error naming any unknown key."""
        return _validation.build(cls, values)  # type: ignore[no-any-return]


def settings_field_types() -> dict[str, Any]:
    """Annotation of every settings field; the CLI derives its choices from these."""
    return _validation.field_types(Settings)


def choices(name: str) -> tuple[Any, ...]:
    """The allowed values of a closed-set setting, e.g. `choices("mixed_precision")`."""
    return _validation.literal_values(settings_field_types()[name])
