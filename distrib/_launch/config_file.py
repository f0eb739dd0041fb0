"""The YAML config file: find it, read it safely, validate it against one schema, write it.

Schema version 1, flat keys plus one section per strategy::

    version: 1
    num_processes: 4
    mixed_precision: bf16
    strategy: fsdp
    fsdp:
      sharding: grad_op
    env:
      NCCL_DEBUG: WARN

Valid keys are the launch options (`options.ROWS`), every scalar `Settings` field, the fields of the
option sections (`ddp`, `fsdp`, `deepspeed`, `xla`) and `env`. Values are checked against the same
annotations the runtime uses. An Accelerate `default_config.yaml` is recognised and translated.
"""

from __future__ import annotations

import collections.abc
import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_origin

from .. import _environment, _validation
from .._settings import settings_field_types
from ..errors import SettingsError
from . import accelerate_compat
from .options import ROWS, ROWS_BY_KEY, SECTIONS, strip_none

VERSION = 1
FILE_NAME = "default_config.yaml"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class ConfigFile:
    """A validated config file: flat dotted keys (`fsdp.sharding`) to typed values."""

    path: Path | None
    origin: str
    values: Mapping[str, Any]
    env: Mapping[str, str]
    warnings: tuple[str, ...] = ()
    format: str = "distrib"


def default_path() -> Path:
    """`$DISTRIB_CONFIG_DIR`, else `$XDG_CONFIG_HOME/distrib`, else `~/.config/distrib`, + the file name."""
    return _environment.config_directory() / FILE_NAME


def default_origin() -> str:
    rule = _environment.config_directory_origin()
    return "default location" + ("" if rule == "home" else f", from {rule}")


def schema() -> dict[str, Any]:
    """Every valid flat key and its annotation."""
    keys: dict[str, Any] = {name: tp for name, tp in settings_field_types().items() if name not in SECTIONS}
    for section, cls in SECTIONS.items():
        for name, tp in _validation.field_types(cls).items():
            if get_origin(strip_none(tp)) is not collections.abc.Callable:
                keys[f"{section}.{name}"] = tp
    for row in ROWS:
        if not row.is_setting:
            keys[row.key] = row.annotation
    return keys


def load_effective(explicit: str | None) -> ConfigFile:
    """The file given with --config-file (which must exist), else the default one if present."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise SettingsError(
                f"config file {str(path)!r} does not exist; create one with "
                f"`distrib config --config-file {path}` or fix the path."
            )
        return load(path, origin="--config-file")
    path = default_path()
    if path.is_file():
        return load(path, origin=default_origin())
    return ConfigFile(path=None, origin="none (defaults)", values={}, env={})


def load(path: Path, *, origin: str = "--config-file") -> ConfigFile:
    """Read and validate one file; errors name the file, the key, the value and what is allowed."""
    text = path.read_text(encoding="utf-8")
    raw = parse_yaml(text, str(path))
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise SettingsError(
            f"{path}: the top level must be a mapping of keys to values, got {type(raw).__name__}."
        )
    notes: tuple[str, ...] = ()
    kind = "distrib"
    if accelerate_compat.looks_like_accelerate(raw):
        raw, found = accelerate_compat.translate(raw)
        notes, kind = tuple(f"{path}: {w}" for w in found), "accelerate"
    values, env = validate(raw, str(path))
    return ConfigFile(path=path, origin=origin, values=values, env=env, warnings=notes, format=kind)


def parse_yaml(text: str, source: str) -> Any:
    """`yaml.safe_load`, with syntax errors reported with their line and column."""
    import yaml  # here, not at the top: `distrib --help` never needs it

    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise SettingsError(f"{source}: invalid YAML at {where}: {exc.problem or exc}.") from None
    except yaml.YAMLError as exc:
        raise SettingsError(f"{source}: invalid YAML: {exc}.") from None


def validate(raw: Mapping[str, Any], source: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Check a parsed file; return its flat values and its `env` mapping."""
    _check_version(raw, source)
    values = validate_flat(flatten(raw, source), source)
    return values, _env_mapping(raw.get("env"), source)


def validate_flat(flat: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Check flat values (dotted keys) against the schema; return them normalised."""
    known = schema()
    values: dict[str, Any] = {}
    for key, value in flat.items():
        if key not in known:
            raise SettingsError(_unknown_key(source, key, known))
        values[key] = check(source, key, value, known[key])
    check_combinations(values, source)
    return values


def flatten(raw: Mapping[str, Any], source: str) -> dict[str, Any]:
    """`{fsdp: {sharding: full}}` -> `{"fsdp.sharding": "full"}`; `version` and `env` left out."""
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if key in ("version", "env"):
            continue
        if key in SECTIONS:
            if value is None:
                continue
            if not isinstance(value, Mapping):
                names = ", ".join(_validation.field_types(SECTIONS[key]))
                raise SettingsError(f"{source}: {key} must be a mapping of options ({names}), got {value!r}.")
            flat.update({f"{key}.{name}": v for name, v in value.items()})
        else:
            flat[str(key)] = value
    return flat


def check(source: str, key: str, value: Any, annotation: Any) -> Any:
    """Validate one value (type, then the row's bounds); return it normalised."""
    try:
        value = _validation.check_value("config", key, value, annotation)
    except SettingsError as exc:
        raise SettingsError(f"{source}: {exc}") from None
    row = ROWS_BY_KEY.get(key)
    if row is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
        if row.minimum is not None and value < row.minimum:
            raise SettingsError(f"{source}: {key}={value!r} is out of range: must be >= {row.minimum:g}.")
        if row.maximum is not None and value > row.maximum:
            raise SettingsError(f"{source}: {key}={value!r} is out of range: must be <= {row.maximum:g}.")
    return value


def check_combinations(values: Mapping[str, Any], source: str) -> None:
    """Combinations no run can have: several machines without an address, a rank beyond the count."""
    num_machines = values.get("num_machines", 1)
    rank = values.get("machine_rank", 0)
    if rank >= num_machines:
        raise SettingsError(
            f"{source}: machine_rank={rank} is out of range for num_machines={num_machines}: "
            f"allowed values are 0 to {num_machines - 1}."
        )
    if num_machines > 1 and not values.get("main_process_ip"):
        raise SettingsError(
            f"{source}: num_machines={num_machines} needs main_process_ip (--main-process-ip), the address "
            "of machine 0 that every machine can reach."
        )


def _check_version(raw: Mapping[str, Any], source: str) -> None:
    version = raw.get("version")
    if version is None:
        raise SettingsError(
            f"{source}: missing 'version: {VERSION}' (the schema version) at the top of the file."
        )
    if version != VERSION:
        raise SettingsError(
            f"{source}: version={version!r} is not supported: allowed values are {VERSION}. "
            "Upgrade distrib, or rewrite the file with `distrib config`."
        )


def _unknown_key(source: str, key: str, known: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"{source}: unknown key {key!r}.{hint} Valid keys are: version, env, {', '.join(sorted(known))}."


def _env_mapping(env: Any, source: str) -> dict[str, str]:
    if env is None:
        return {}
    if not isinstance(env, Mapping):
        raise SettingsError(f"{source}: env must be a mapping of variable names to values, got {env!r}.")
    out: dict[str, str] = {}
    for name, value in env.items():
        if not isinstance(name, str) or not _ENV_NAME.match(name):
            raise SettingsError(f"{source}: env key {name!r} is not a valid environment variable name.")
        if isinstance(value, (Mapping, list)):
            raise SettingsError(f"{source}: env.{name}={value!r} must be a string, number or boolean.")
        out[name] = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return out


def to_yaml(values: Mapping[str, Any], env: Mapping[str, str] | None = None) -> str:
    """The YAML text of flat values (sections nested again), `version` first."""
    doc: dict[str, Any] = {"version": VERSION}
    for key, value in values.items():
        if "." in key:
            section, name = key.split(".", 1)
            doc.setdefault(section, {})[name] = list(value) if isinstance(value, tuple) else value
        else:
            doc[key] = value
    if env:
        doc["env"] = dict(env)
    import yaml

    return yaml.safe_dump(doc, sort_keys=False)


def write(path: Path, values: Mapping[str, Any], env: Mapping[str, str] | None = None) -> None:
    """Validate and write a config file, creating its directory."""
    text = to_yaml(values, env)
    validate(parse_yaml(text, str(path)), str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
