"""One field-walking validator for every frozen settings dataclass.

Checks each field against its annotation (Literal sets, bool, int, float, str, tuples, nested option
dataclasses, callables) and turns text (environment variables, config files) into typed values. Errors
name the field, the value and what is allowed, so the CLI, the config file and the code all report alike.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal, Union, get_args, get_origin

from .errors import SettingsError

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotation of every field of a dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def literal_values(tp: Any) -> tuple[Any, ...]:
    """The allowed values of a `Literal` (or `Literal | None`) annotation, else ()."""
    if get_origin(tp) is Literal:
        return get_args(tp)
    if _is_union(tp):
        return tuple(v for arg in get_args(tp) for v in literal_values(arg))
    return ()


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _describe(tp: Any) -> str:
    values = literal_values(tp)
    if values:
        return "one of " + ", ".join(repr(v) for v in values)
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def check_value(owner: str, name: str, value: Any, tp: Any) -> Any:
    """Validate (and normalise) one value against its annotation; return the value to store."""
    ok, normalised = _match(value, tp)
    if not ok:
        raise SettingsError(f"{owner}.{name}={value!r} is not valid: expected {_describe(tp)}.")
    return normalised


def _match(value: Any, tp: Any) -> tuple[bool, Any]:  # noqa: C901 - one branch per kind of annotation
    if tp is Any:
        return True, value
    if _is_union(tp):
        for arg in get_args(tp):
            ok, out = _match(value, arg)
            if ok:
                return True, out
        return False, value
    origin = get_origin(tp)
    if origin is Literal:
        return (value in get_args(tp) and type(value) in {type(a) for a in get_args(tp)}), value
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if tp is str:
        return isinstance(value, str), value
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            return False, value
        item = get_args(tp)[0]
        results = [_match(v, item) for v in value]
        return all(ok for ok, _ in results), tuple(v for _, v in results)
    if origin in (dict, Mapping) or tp is dict:
        return isinstance(value, Mapping), value
    if origin is Callable or tp is Callable or origin is typing.Callable:  # type: ignore[comparison-overlap]
        return callable(value), value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, Mapping):
            value = build(tp, value, owner=tp.__name__)
        if not isinstance(value, tp):
            return False, value
        validate_fields(value)
        return True, value
    return isinstance(value, tp) if isinstance(tp, type) else True, value


def build(cls: type, values: Mapping[str, Any], *, owner: str | None = None) -> Any:
    """Build a settings dataclass from a mapping, naming unknown keys and their closest allowed names."""
    check_names(cls, values, owner=owner)
    return cls(**values)


def check_names(cls: type, values: Mapping[str, Any], *, owner: str | None = None) -> None:
    """Raise `SettingsError` naming the keys of `values` that are no field of the dataclass `cls`."""
    names = getattr(cls, "__dataclass_fields__", {})
    unknown = sorted(str(k) for k in values if k not in names)
    if not unknown:
        return
    close = [c[0] for k in unknown if (c := difflib.get_close_matches(k, list(names), n=1))]
    hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
    raise SettingsError(
        f"unknown {'setting' if len(unknown) == 1 else 'settings'} {', '.join(map(repr, unknown))} "
        f"for {owner or cls.__name__}{hint}; valid names are: {', '.join(sorted(names))}."
    )


class KeywordFields:
    """Base of the frozen settings dataclasses: `Settings(foo=1)` gets the same error as
    `distributed(foo=1)` (the unknown name, the closest valid one, all valid names), not a bare TypeError,
    and a positional argument is refused with the keyword spelling."""

    __slots__ = ()

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        if args:
            first = next(iter(getattr(cls, "__dataclass_fields__", {"name": None})))
            raise SettingsError(
                f"{cls.__name__} takes keyword arguments only, e.g. {cls.__name__}({first}=...); "
                f"got {len(args)} positional argument(s): {', '.join(map(repr, args))}."
            )
        check_names(cls, kwargs)
        return super().__new__(cls)


def validate_fields(obj: Any) -> None:
    """Check every field of a frozen dataclass instance in place (called from `__post_init__`)."""
    owner = type(obj).__name__
    for name, tp in field_types(type(obj)).items():
        value = getattr(obj, name)
        normalised = check_value(owner, name, value, tp)
        if normalised is not value:
            object.__setattr__(obj, name, normalised)


def parse_text(label: str, text: str, tp: Any) -> Any:
    """Turn a string (from an environment variable or a flag called `label`) into a value of type `tp`."""
    candidates: list[Any] = []
    lowered = text.strip().lower()
    if lowered in _TRUE:
        candidates.append(True)
    if lowered in _FALSE:
        candidates.append(False)
    if lowered in {"none", "null", ""}:
        candidates.append(None)
    for conv in (int, float):
        try:
            candidates.append(conv(text))
        except ValueError:
            pass
    if text.strip().startswith(("{", "[", '"')):
        try:
            decoded = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SettingsError(f"{label}: {text!r} is not valid JSON ({exc}).") from None
        if isinstance(decoded, str):  # a quoted string is that string, never a keyword or a number
            candidates = []
        candidates.append(decoded)
    candidates.append(text)
    for candidate in candidates:
        ok, out = _match(candidate, tp)
        if ok:
            return out
    raise SettingsError(f"{label}={text!r} is not valid: expected {_describe(tp)}.")
