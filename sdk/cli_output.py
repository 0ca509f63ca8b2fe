"""``-o json|yaml|wide|name`` for the read commands, and NDJSON for streams.

Each read command gives its records (protobuf messages) and how to draw them as a table;
this module prints them in the format asked for, the same way for every command: ``json``
and ``yaml`` are the API's messages (field names as in ``status --json``), ``name`` one id
a line for ``xargs``, ``wide`` the table with every column and nothing cut short.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import click
import yaml
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from tether.sdk.terminal import console

__all__ = [
    "FORMATS",
    "STREAM_FORMATS",
    "emit",
    "emit_stream",
    "output_option",
    "resolve",
    "to_dict",
]

FORMATS = ("table", "wide", "json", "yaml", "name")
STREAM_FORMATS = ("table", "wide", "json", "yaml")


def output_option(
    formats: Sequence[str] = FORMATS, json_flag: bool = False
) -> Callable[[Callable], Callable]:
    """Add ``-o/--output FORMAT`` (and, for commands that had it, ``--json``: ``-o json``).

    The command receives ``output``: one of ``formats``, the first when not given.
    """

    def decorate(command: Callable) -> Callable:
        command = click.option(
            "-o",
            "--output",
            type=click.Choice(formats),
            default=formats[0],
            show_default=True,
            help="Output format: " + ", ".join(formats) + ".",
        )(command)
        if json_flag:
            command = click.option(
                "--json",
                "as_json",
                is_flag=True,
                expose_value=True,
                help="Same as -o json (kept for scripts).",
            )(command)
        return command

    return decorate


def resolve(output: str, as_json: bool = False) -> str:
    """The format asked for, ``--json`` counting as ``-o json``."""
    return "json" if as_json else output


def to_dict(message: Message) -> dict[str, Any]:
    """A message as JSON-ready data: API field names in camelCase, enums by name."""
    return MessageToDict(message)


def emit(
    fmt: str,
    records: Message | Sequence[Message],
    *,
    table: Callable[[bool], Any],
    names: Callable[[], Iterable[str]],
) -> None:
    """Print one record (a message) or a list of them in ``fmt``.

    Args:
        fmt: A format of :data:`FORMATS`.
        records: What ``json`` and ``yaml`` print (a list prints as an array).
        table: Draws the rich renderable; called with ``wide``.
        names: The ids ``-o name`` prints, one a line.
    """
    if fmt in ("json", "yaml"):
        data = to_dict(records) if isinstance(records, Message) else [to_dict(r) for r in records]
        if fmt == "json":
            click.echo(json.dumps(data, indent=2))
        else:
            click.echo(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), nl=False)
    elif fmt == "name":
        for name in names():
            click.echo(name)
    else:
        console.print(table(fmt == "wide"))


def emit_stream(fmt: str, data: dict[str, Any]) -> None:
    """Print one item of a stream: a JSON line (NDJSON) or a YAML document; flushed."""
    if fmt == "json":
        click.echo(json.dumps(data, separators=(",", ":")))
    else:
        click.echo("---\n" + yaml.safe_dump(data, sort_keys=False, allow_unicode=True), nl=False)
