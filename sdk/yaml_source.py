"""YAML read from a file, with errors that name the file and the line.

PyYAML names a string it parsed ``<unicode string>``; users need the path they gave and the
line to look at, for a syntax error as for a key a schema does not know.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

__all__ = ["YamlSourceError", "key_lines", "load_yaml", "yaml_error_text"]


class YamlSourceError(ValueError):
    """A YAML document that cannot be read or parsed; the message names the file and line."""


def yaml_error_text(e: yaml.YAMLError, name: str) -> str:
    """``FILE:LINE:COL: problem`` for a PyYAML error (lines and columns count from 1)."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    context = getattr(e, "context", None)
    what = f"{context}: {problem}" if context else problem
    if mark is None:
        return f"{name}: not valid YAML: {what}"
    return f"{name}:{mark.line + 1}:{mark.column + 1}: not valid YAML: {what}"


def load_yaml(path: str | Path) -> tuple[Any, dict[tuple[str, ...], int]]:
    """Parse the YAML file at ``path``.

    Returns:
        The data, and the line (from 1) of each mapping key, by its path of keys.

    Raises:
        YamlSourceError: the file cannot be read, is not UTF-8, or is not YAML.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise YamlSourceError(f"{path} is not UTF-8 text: {e}") from None
    except OSError as e:
        raise YamlSourceError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise YamlSourceError(yaml_error_text(e, str(path))) from None
    return data, key_lines(node)


def key_lines(node: yaml.Node | None, prefix: tuple = ()) -> dict[tuple, int]:
    """The line (from 1) of every mapping key and list item under ``node``, by its path
    (keys as strings, list positions as ints: ``("tasks", 0, "name")``)."""
    out: dict[tuple, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            path = (*prefix, str(key.value))
            out[path] = key.start_mark.line + 1
            out.update(key_lines(value, path))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            path = (*prefix, i)
            out[path] = item.start_mark.line + 1
            out.update(key_lines(item, path))
    return out
