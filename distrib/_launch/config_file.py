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
annotations the runtime uses, and combinations against `rules.py`. The file must be UTF-8 and may not
repeat a key (YAML itself keeps the last one without a word). An Accelerate `default_config.yaml` is
recognised and translated (`accelerate_compat.py`).
"""

from __future__ import annotations

import collections.abc
import difflib
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_origin

from .. import _codec, _environment, _validation
from .._settings import Settings, settings_field_types
from ..errors import SettingsError
from . import accelerate_compat, rules
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
    """Every valid flat key and its annotation (callable option fields included: `check` refuses them
    with the reason instead of calling them unknown)."""
    keys: dict[str, Any] = {name: tp for name, tp in settings_field_types().items() if name not in SECTIONS}
    for section, cls in SECTIONS.items():
        for name, tp in _validation.field_types(cls).items():
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
    raw = parse_yaml(read_text(path), str(path))
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise SettingsError(
            f"{path}: the top level must be a mapping of keys to values, got {type(raw).__name__}."
        )
    notes: tuple[str, ...] = ()
    kind = "distrib"
    if accelerate_compat.looks_like_accelerate(raw):
        raw, found = accelerate_compat.translate(raw, str(path))
        notes, kind = tuple(f"{path}: {w}" for w in found), "accelerate"
    values, env = validate(raw, str(path))
    return ConfigFile(path=path, origin=origin, values=values, env=env, warnings=notes, format=kind)


def read_text(path: Path) -> str:
    """The file's text; a file that is not UTF-8 is an error naming the file, the line and the byte."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SettingsError(f"{path}: cannot read the config file ({exc.strerror or exc}).") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise SettingsError(
            f"{path}: not valid UTF-8 (byte {data[exc.start]:#04x} on line {line}); save the config file "
            "as UTF-8."
        ) from None


def parse_yaml(text: str, source: str) -> Any:
    """`yaml.safe_load` that refuses a repeated key; syntax errors are reported with line and column."""
    import yaml  # here, not at the top: `distrib --help` never needs it

    try:
        return yaml.load(text, Loader=_strict_loader())  # a SafeLoader: no tags run code
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise SettingsError(f"{source}: invalid YAML at {where}: {exc.problem or exc}.") from None
    except yaml.YAMLError as exc:
        raise SettingsError(f"{source}: invalid YAML: {exc}.") from None


_LOADER: list[Any] = []


def _strict_loader() -> Any:
    """A `yaml.SafeLoader` whose mappings refuse a key given twice (plain YAML keeps the last one)."""
    if _LOADER:
        return _LOADER[0]
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, collections.abc.Hashable):
                    continue  # the base class reports unhashable keys
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"key {key!r} is given twice (first on line {seen[key].line + 1}); keep one of them",
                        key_node.start_mark,
                    )
                seen[key] = key_node.start_mark
            return super().construct_mapping(node, deep=deep)

    _LOADER.append(StrictLoader)
    return StrictLoader


def validate(raw: Mapping[str, Any], source: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Check a parsed file; return its flat values and its `env` mapping."""
    _check_version(raw, source)
    values = validate_flat(flatten(raw, source), source)
    return values, _env_mapping(raw.get("env"), source)


def validate_flat(flat: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Check flat values (dotted keys) against the schema and the rules; return them normalised."""
    known = schema()
    values: dict[str, Any] = {}
    for key, value in flat.items():
        if key not in known:
            raise SettingsError(_unknown_key(source, key, known))
        values[key] = check(source, key, value, known[key])
    rules.check_combinations(values, source)
    _check_settings(values, source)
    return values


def _check_settings(values: Mapping[str, Any], source: str) -> None:
    """The settings of the file built once, so a rule over several fields of `Settings` or an option
    section (a positive bucket size, an offload the ZeRO stage cannot honour) fails here, naming the file."""
    names = settings_field_types()
    chosen = {k: v for k, v in values.items() if k.split(".")[0] in names}
    try:
        Settings.from_mapping(_codec.from_flat(chosen, source=source))
    except SettingsError as exc:
        raise SettingsError(f"{source}: {exc}") from None


def flatten(raw: Mapping[str, Any], source: str) -> dict[str, Any]:
    """`{fsdp: {sharding: full}}` -> `{"fsdp.sharding": "full"}`; `version` and `env` left out."""
    return _codec.to_flat({str(k): v for k, v in raw.items() if k not in ("version", "env")}, source=source)


def check(source: str, key: str, value: Any, annotation: Any) -> Any:
    """Validate one value (type, then the row's bounds and conversion); return it normalised."""
    if get_origin(strip_none(annotation)) is collections.abc.Callable:
        raise SettingsError(
            f"{source}: {key} takes a Python function, which a config file or the launcher cannot hand to the "
            "worker processes. Set it in the code they run (distributed(fsdp=FSDPOptions(...))), or use "
            "fsdp.wrap_classes / fsdp.min_num_params, which can travel."
        )
    try:
        value = _validation.check_value("config", key, value, annotation)
    except SettingsError as exc:
        raise SettingsError(f"{source}: {exc}") from None
    row = ROWS_BY_KEY.get(key)
    if row is None:
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if row.minimum is not None and value < row.minimum:
            raise SettingsError(f"{source}: {key}={value!r} is out of range: must be >= {row.minimum:g}.")
        if row.maximum is not None and value > row.maximum:
            raise SettingsError(f"{source}: {key}={value!r} is out of range: must be <= {row.maximum:g}.")
    return row.convert(value, source) if row.convert is not None else value


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
        if value is None or isinstance(value, (Mapping, list)):
            raise SettingsError(f"{source}: env.{name}={value!r} must be a string, number or boolean.")
        out[name] = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return out


def to_yaml(values: Mapping[str, Any], env: Mapping[str, str] | None = None) -> str:
    """The YAML text of flat values (sections nested again), `version` first."""
    plain = {key: list(value) if isinstance(value, tuple) else value for key, value in values.items()}
    doc: dict[str, Any] = {"version": VERSION, **_codec.from_flat(plain)}
    if env:
        doc["env"] = dict(env)
    import yaml

    return yaml.safe_dump(doc, sort_keys=False)


def write(path: Path, values: Mapping[str, Any], env: Mapping[str, str] | None = None) -> None:
    """Validate and write a config file atomically (a reader sees the old file or the new one), creating
    its directory."""
    text = to_yaml(values, env)
    validate(parse_yaml(text, str(path)), str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
