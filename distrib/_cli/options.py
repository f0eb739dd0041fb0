"""The click side of the launch options: `distrib launch`'s flags and `--help` layout, built from the table
in `distrib/_launch/options.py`, so flags, config keys and settings cannot drift apart."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import click

from .. import _validation
from .._launch.options import ROWS, Row, strip_none


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


def click_type(row: Row) -> Any:
    """The click parameter type of a row, derived from its annotation and bounds."""
    tp = strip_none(row.type)
    values = _validation.literal_values(tp)
    if values:
        return LiteralChoice(values)
    if tp is int:
        if row.minimum is None and row.maximum is None:
            return click.INT
        low = None if row.minimum is None else int(row.minimum)
        high = None if row.maximum is None else int(row.maximum)
        return click.IntRange(low, high)
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
    """A click option that remembers its heading in `--help`."""

    def __init__(self, *args: Any, section: str = "Other options", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.section = section


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


def row_option(row: Row) -> Callable[[Any], Any]:
    """The click option decorator of one table row."""
    flag = row.option_flag
    if strip_none(row.type) is bool:
        decls = [f"{flag}/--no-{flag[2:]}", row.param_name]
        return click.option(*decls, cls=SectionOption, section=row.section, default=None, help=help_text(row))
    return click.option(
        flag,
        row.param_name,
        cls=SectionOption,
        section=row.section,
        type=click_type(row),
        default=None,
        help=help_text(row),
    )


def launch_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a click command with every row of the table (first row on top of `--help`)."""
    for row in reversed(ROWS):
        fn = row_option(row)(fn)
    return fn


def values_from_params(params: dict[str, Any]) -> dict[str, Any]:
    """The table values given on the command line (flat, dotted keys), leaving out unset flags."""
    return {row.key: params[row.param_name] for row in ROWS if params.get(row.param_name) is not None}
