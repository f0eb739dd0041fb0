"""The click side of the launch options: `distrib launch`'s flags and `--help` layout, built from the table
in `distrib/_launch/options.py`, so flags, config keys and settings cannot drift apart. Every flag also
accepts Accelerate's underscore spelling (`--num_processes`), which `--help` does not list."""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable
from typing import Any, Union, get_args, get_origin

import click

from .. import _validation
from .._launch.options import ROWS, Row, strip_none
from ..errors import SettingsError


class LiteralChoice(click.Choice):  # type: ignore[type-arg]
    """A `click.Choice` over a `Literal`'s values that returns the typed value (`"2"` -> `2`)."""

    def __init__(self, values: Iterable[Any]) -> None:
        self.values = tuple(values)
        super().__init__([str(v) for v in self.values])

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value in self.values and type(value) in {type(v) for v in self.values}:
            return value
        text = super().convert(str(value), param, ctx)
        return self.values[[str(v) for v in self.values].index(text)]


class Converted(click.ParamType):
    """A value a row converts itself (e.g. `--num-machines 1:4`); errors come from the same converter as
    the config file's."""

    def __init__(self, row: Row, metavar: str = "VALUE") -> None:
        self.row = row
        self.name = row.key.replace("_", "-")
        self.metavar = metavar

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return self.metavar

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        assert self.row.convert is not None
        try:
            return self.row.convert(value, self.row.option_flag)
        except SettingsError as exc:
            self.fail(str(exc), param, ctx)


class _NoneOr(click.ParamType):
    """A number (within bounds), or `none`/`off` for None (`--stall-timeout none`)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "off")):
            return "none"  # the flag was given: a value the table turns into None
        return super().convert(value, param, ctx)


class OptionalFloat(_NoneOr, click.FloatRange):
    pass


class OptionalInt(_NoneOr, click.IntRange):
    pass


def _is_optional(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType) and type(None) in get_args(tp)


def click_type(row: Row) -> Any:
    """The click parameter type of a row, derived from its annotation and bounds."""
    if row.convert is not None:
        return Converted(row, "N|MIN:MAX" if row.key == "num_machines" else "VALUE")
    tp = strip_none(row.type)
    values = _validation.literal_values(tp)
    if values:
        return LiteralChoice(values)
    if tp is float and _is_optional(row.type):
        return OptionalFloat(row.minimum, row.maximum)
    if tp is int:
        low = None if row.minimum is None else int(row.minimum)
        high = None if row.maximum is None else int(row.maximum)
        if _is_optional(row.type):
            return OptionalInt(low, high)
        return click.INT if low is None and high is None else click.IntRange(low, high)
    if tp is float:
        return click.FloatRange(row.minimum, row.maximum)
    return click.STRING


def help_text(row: Row) -> str:
    text = row.help
    if row.default is not None:
        text += f" [default: {row.default}]"
    if row.environment_variable:
        text += f" [sets {row.environment_variable}]"
    return text + f" [config: {row.key}]"


class SectionOption(click.Option):
    """A click option that remembers its heading in `--help`, and whose `hidden_aliases` (Accelerate's
    underscore spellings) work on the command line but stay out of `--help`."""

    def __init__(
        self, *args: Any, section: str = "Other options", hidden_aliases: Iterable[str] = (), **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.section = section
        self.hidden_aliases = set(hidden_aliases)

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        shown, shown_secondary = self.opts, self.secondary_opts
        self.opts = [o for o in shown if o not in self.hidden_aliases]
        self.secondary_opts = [o for o in shown_secondary if o not in self.hidden_aliases]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts, self.secondary_opts = shown, shown_secondary


def underscore(flag: str) -> str:
    """Accelerate's spelling of a dashed flag: `--num-processes` -> `--num_processes`."""
    return "--" + flag[2:].replace("-", "_")


def option(*decls: str, section: str, **kwargs: Any) -> Callable[[Any], Any]:
    """`click.option` with a help section and, for each dashed flag, its hidden underscore alias."""
    names = [d for d in decls if d.startswith("-")]
    others = [d for d in decls if not d.startswith("-")]
    aliases: list[str] = []
    for name in names:
        if "/" in name:
            on, off = name.split("/", 1)
            if underscore(on) != on:
                aliases.append(f"{underscore(on)}/{underscore(off)}")
            elif underscore(off) != off:  # click's spelling of an alias for the "off" flag alone
                aliases.append(f" /{underscore(off)}")
        elif name.startswith("--") and "-" in name[2:]:
            aliases.append(underscore(name))
    hidden = [part.strip() for alias in aliases for part in alias.split("/") if part.strip()]
    return click.option(
        *names, *aliases, *others, cls=SectionOption, section=section, hidden_aliases=hidden, **kwargs
    )


class SectionedCommand(click.Command):
    """A click command whose `--help` lists options under headings, in table order."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        groups: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx) if isinstance(param, click.Option) else None
            if record is not None:
                groups.setdefault(getattr(param, "section", "Other options"), []).append(record)
        for section, records in groups.items():
            with formatter.section(section):
                formatter.write_dl(records)


def _is_switch(tp: Any) -> bool:
    """`bool | SomeOptions` (e.g. the `compile` setting): a --flag/--no-flag on the command line; the option
    object itself is given in the config file or in code."""
    return get_origin(tp) in (Union, types.UnionType) and bool in get_args(tp)


def row_option(row: Row) -> Callable[[Any], Any]:
    """The click option decorator of one table row."""
    flag = row.option_flag
    if strip_none(row.type) is bool or _is_switch(row.type):
        return option(
            f"{flag}/--no-{flag[2:]}", row.param_name, section=row.section, default=None, help=help_text(row)
        )
    return option(
        flag, row.param_name, section=row.section, type=click_type(row), default=None, help=help_text(row)
    )


def launch_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a click command with every row of the table (first row on top of `--help`)."""
    for row in reversed(ROWS):
        fn = row_option(row)(fn)
    return fn


def values_from_params(params: dict[str, Any]) -> dict[str, Any]:
    """The table values given on the command line (flat, dotted keys), leaving out unset flags (`none` for
    an optional number means the flag was given to turn the setting off)."""
    values = {row.key: params[row.param_name] for row in ROWS if params.get(row.param_name) is not None}
    return {key: None if value == "none" else value for key, value in values.items()}
