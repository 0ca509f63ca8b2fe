"""Templating of task arguments and environment: ``{{ params.x }}`` and
``{{ tasks.train.outputs.model_uri }}``.

Deliberately tiny (no Jinja): two kinds of expression, checked at submit time and rendered by
the controller just before an attempt is dispatched, from the run's parameters and the outputs
of upstream tasks.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tether.api.v1.types_pb2 import TaskSpec

__all__ = ["Ref", "TemplateError", "references", "render", "render_spec"]

# Only `{{ dotted.name }}` is an expression; any other braces (code, JSON, format strings in a
# `python -c` argument) are left alone, so tasks need no escaping.
_EXPR = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_.-]*)\s*\}\}")
_PARAM = re.compile(r"^params\.([A-Za-z_][A-Za-z0-9_-]*)$")
_TASK = re.compile(r"^tasks\.([A-Za-z0-9][A-Za-z0-9_.-]*?)\.outputs(?:\.([A-Za-z0-9_.-]+))?$")


class TemplateError(ValueError):
    """A template is malformed, or names a value that does not exist."""


@dataclass(frozen=True)
class Ref:
    """One ``{{ … }}`` expression: a parameter, or (a path into) a task's output."""

    kind: str  # "param" or "task"
    name: str
    path: tuple[str, ...] = ()


def references(text: str) -> list[Ref]:
    """Parse every expression in ``text``.

    Raises:
        TemplateError: an expression is neither ``params.NAME`` nor ``tasks.T.outputs[.PATH]``.
    """
    refs = []
    for m in _EXPR.finditer(text):
        expr = m.group(1).strip()
        if p := _PARAM.match(expr):
            refs.append(Ref("param", p.group(1)))
        elif tm := _TASK.match(expr):
            path = tuple(tm.group(2).split(".")) if tm.group(2) else ()
            refs.append(Ref("task", tm.group(1), path))
        else:
            raise TemplateError(
                f"bad template {{{{ {expr} }}}}: use params.NAME or tasks.TASK.outputs.KEY"
            )
    return refs


def render(text: str, params: Mapping[str, str], output_of: Callable[[str], Any]) -> str:
    """Replace every expression in ``text``; non-string values become JSON.

    Args:
        text: An argument or environment value.
        params: The run's parameters.
        output_of: A task's parsed output, or None if it has none.

    Raises:
        TemplateError: a parameter, task output or key is missing.
    """
    if "{{" not in text:
        return text

    def one(m: re.Match) -> str:
        ref = references(m.group(0))[0]
        if ref.kind == "param":
            if ref.name not in params:
                raise TemplateError(f"parameter {ref.name!r} was not given")
            return params[ref.name]
        value = output_of(ref.name)
        if value is None:
            raise TemplateError(f"task {ref.name!r} has no output")
        for i, key in enumerate(ref.path):
            if isinstance(value, dict) and key in value:
                value = value[key]
            elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
                value = value[int(key)]
            else:
                where = ".".join(ref.path[: i + 1])
                raise TemplateError(f"output of task {ref.name!r} has no {where!r}")
        return value if isinstance(value, str) else json.dumps(value)

    return _EXPR.sub(one, text)


def render_spec(
    spec: TaskSpec, params: Mapping[str, str], output_of: Callable[[str], Any]
) -> TaskSpec | None:
    """A copy of ``spec`` with its arguments and environment rendered; None if it has no
    templates (the spec is used as it is).

    Raises:
        TemplateError: as :func:`render`.
    """
    if not any("{{" in f for f in (*spec.command, *spec.env.values())):
        return None
    cached = functools.cache(output_of)
    out = TaskSpec()
    out.CopyFrom(spec)
    del out.command[:]
    out.command.extend(render(a, params, cached) for a in spec.command)
    for k, v in spec.env.items():
        out.env[k] = render(v, params, cached)
    return out
