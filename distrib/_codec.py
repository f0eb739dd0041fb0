"""The one settings codec: which fields were chosen, nested <-> flat, and the text of `DISTRIB_*` variables.

Settings travel in three forms, and every conversion between them goes through this module:

* nested, as the code writes them: `{"mixed_precision": "bf16", "fsdp": FSDPOptions(sharding="grad_op")}`
  (an option section may also be a dict of its fields);
* flat, as the config file, the launch options table and `notebook_launcher` hold them:
  `{"mixed_precision": "bf16", "fsdp.sharding": "grad_op"}`;
* text, as the launcher hands them to the workers: one `DISTRIB_<SETTING>` variable per chosen field,
  `DISTRIB_MIXED_PRECISION=bf16`, option sections as JSON (`DISTRIB_FSDP='{"sharding": "grad_op"}'`).

"Chosen" always means the same thing: the fields whose value differs from the default (`explicit_fields`),
so a field set to its default is neither sent nor reported as a conflict. Every field travels, or the
conversion fails naming it: a callable (`FSDPOptions(auto_wrap_policy=...)`) cannot become text, so
`to_environment` refuses it with the fix instead of dropping it. The environment itself is read by
`_environment.py` (the one place that reads it), which decodes through `from_environment`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from . import _validation
from ._options import DDPOptions, DeepSpeedOptions, FSDPOptions, ParallelismOptions, XLAOptions
from ._settings import settings_field_types
from .errors import SettingsError

PREFIX = "DISTRIB_"

#: settings fields that hold a per-strategy option object; flat keys of their fields are `section.field`
SECTIONS: dict[str, type] = {
    "ddp": DDPOptions,
    "fsdp": FSDPOptions,
    "deepspeed": DeepSpeedOptions,
    "xla": XLAOptions,
    "parallelism": ParallelismOptions,
}

# text that `_validation.parse_text` reads as something other than a string
_KEYWORDS = {"true", "false", "yes", "no", "on", "off", "none", "null", "1", "0", ""}


def _is_instance(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def explicit_fields(obj: Any) -> dict[str, Any]:
    """The fields of a settings dataclass (`Settings` or an option object) that differ from its defaults.

    Nested option objects stay objects (use `to_flat` for their fields). Callables are kept: whether they
    can travel is decided where they would have to (`to_environment`). Example::

        explicit_fields(Settings(mixed_precision="bf16"))   # {"mixed_precision": "bf16"}
    """
    defaults = type(obj)()
    return {
        f.name: getattr(obj, f.name)
        for f in dataclasses.fields(obj)
        if getattr(obj, f.name) != getattr(defaults, f.name)
    }


def section_fields(section: str, value: Any, *, source: str = "settings") -> dict[str, Any]:
    """The chosen fields of one option section given as an option object (its explicit fields) or a dict."""
    cls = SECTIONS[section]
    if isinstance(value, cls):
        return explicit_fields(value)
    if isinstance(value, Mapping):
        return {str(name): v for name, v in value.items()}
    names = ", ".join(_validation.field_types(cls))
    raise SettingsError(
        f"{source}: {section} must be a mapping of options ({names}) or a {cls.__name__}, got {value!r}."
    )


def to_flat(values: Mapping[str, Any], *, source: str = "settings") -> dict[str, Any]:
    """Nested -> flat: `{"fsdp": FSDPOptions(sharding="grad_op")}` -> `{"fsdp.sharding": "grad_op"}`.

    Keys that are not option sections (launch options, scalar settings) pass through; a section given as
    None (an empty section in YAML) contributes nothing.
    """
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if key in SECTIONS:
            if value is not None:
                flat.update(
                    {f"{key}.{name}": v for name, v in section_fields(key, value, source=source).items()}
                )
        else:
            flat[key] = value
    return flat


def from_flat(flat: Mapping[str, Any], *, source: str = "settings") -> dict[str, Any]:
    """Flat -> nested: dotted keys gathered into one dict per option section (values not validated)."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        section, dot, name = key.partition(".")
        if not dot:
            if key in SECTIONS:
                raise SettingsError(
                    f"{source}: {key} is an option section; give its fields as {key}.<field>."
                )
            nested[key] = value
        elif section in SECTIONS:
            nested.setdefault(section, {})[name] = value
        else:
            raise SettingsError(
                f"{source}: {key!r} names no option section; sections are {', '.join(SECTIONS)}."
            )
    return nested


def encode(name: str, value: Any) -> str:
    """The text of one setting's value, as its `DISTRIB_*` variable carries it (see `decode`)."""
    if _is_instance(value) or isinstance(value, Mapping):
        if name in SECTIONS:
            fields = section_fields(name, value)
        else:  # an option object that is not a section (e.g. `compile=CompileOptions(...)`)
            fields = explicit_fields(value) if _is_instance(value) else dict(value)
        for field_name, field_value in fields.items():
            _check_travels(f"{name}.{field_name}", field_value)
        return json.dumps(fields, default=_unencodable(name))
    _check_travels(name, value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value), default=_unencodable(name))
    if isinstance(value, str) and _ambiguous(value):
        return json.dumps(value)  # a string that would read back as another type, e.g. "none" or "7"
    return str(value)


def _ambiguous(text: str) -> bool:
    stripped = text.strip()
    if stripped.lower() in _KEYWORDS or stripped != text or stripped.startswith(("{", "[", '"')):
        return True
    try:
        float(stripped)
    except ValueError:
        return False
    return True


def _check_travels(name: str, value: Any) -> None:
    if callable(value) and not isinstance(value, type):
        raise SettingsError(
            f"setting {name}={value!r} is a function, which cannot travel to the worker processes (the "
            "launcher hands settings over as text, in DISTRIB_* variables). Set it in the code the workers "
            f"run instead, e.g. distributed({name.split('.')[0]}=...) inside the script or launched function"
            + (
                ", or use FSDPOptions.wrap_classes / min_num_params, which can travel"
                if "wrap" in name
                else ""
            )
            + "."
        )


def _unencodable(name: str) -> Any:
    def fail(value: Any) -> Any:
        raise SettingsError(
            f"setting {name} holds {value!r} ({type(value).__name__}), which cannot be written as JSON for the "
            "worker processes; use plain values (str, int, float, bool, lists and dicts of them)."
        )

    return fail


def decode(name: str, text: str, annotation: Any, *, label: str | None = None) -> Any:
    """The typed value of a setting from its text (`encode`'s inverse); errors name `label`."""
    return _validation.parse_text(label or name, text, annotation)


def variable(name: str) -> str:
    """The `DISTRIB_*` variable that carries the setting `name` (`mixed_precision` -> DISTRIB_MIXED_PRECISION)."""
    return PREFIX + name.split(".")[0].upper()


def to_environment(values: Mapping[str, Any]) -> dict[str, str]:
    """The `DISTRIB_*` variables that carry `values` (nested `Settings` fields) to the workers.

    Raises `SettingsError` naming the field for a name that is no setting and for a value that cannot
    travel as text (a callable, an object JSON cannot hold).
    """
    types = _settings_types()
    out: dict[str, str] = {}
    for name, value in values.items():
        if name not in types:
            raise SettingsError(f"{name!r} is not a setting; valid names are: {', '.join(sorted(types))}.")
        out[variable(name)] = encode(name, value)
    return out


def from_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    """Typed `Settings` values found in `DISTRIB_<FIELD>` variables (option sections as option objects)."""
    found: dict[str, Any] = {}
    for name, annotation in _settings_types().items():
        text = environ.get(variable(name))
        if text is not None:
            found[name] = decode(name, text, annotation, label=f"launcher variable {variable(name)}")
    return found


def _settings_types() -> dict[str, Any]:
    return settings_field_types()
