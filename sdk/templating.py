"""Templating of task arguments and environment: ``{{ params.x }}`` and
``{{ tasks.train.outputs.model_uri }}``.

Deliberately tiny (no Jinja): two kinds of expression, checked at submit time and rendered by
the controller just before an attempt is dispatched, from the run's parameters and the outputs
of upstream tasks.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["Ref", "TemplateError", "references", "render"]

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


def render(text: str, params: dict[str, str], outputs: dict[str, Any]) -> str:
    """Replace every expression in ``text``; non-string values become JSON.

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
        if ref.name not in outputs:
            raise TemplateError(f"task {ref.name!r} has no output")
        value = outputs[ref.name]
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
