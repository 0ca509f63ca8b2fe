"""The ``tether controller --max-*`` flags: sizes and counts a request may not exceed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields

import click

from tether.controller.config import ControllerConfig
from tether.sdk.quantities import parse_memory
from tether.sdk.validation import LIMITS, Limits

__all__ = ["limit_options", "limits_from_flags"]

# flag -> (Limits field, or None for ControllerConfig.max_message_bytes; is a size; help)
_FLAGS: dict[str, tuple[str | None, bool, str]] = {
    "max-message-bytes": (None, True, "Largest gRPC message received or sent."),
    "max-spec-bytes": ("max_spec_bytes", True, "Largest workflow spec."),
    "max-tasks-per-run": ("max_tasks", False, "Most tasks in one run."),
    "max-params-bytes": ("max_params_bytes", True, "All of a run's parameters together."),
    "max-env-value-bytes": ("max_env_value_bytes", True, "One task environment value."),
    "max-env-bytes": ("max_env_bytes", True, "All of one task's environment together."),
    "max-id-length": ("max_id_length", False, "Longest run id, task name or request id."),
}


def _default(field: str | None) -> int:
    if field is None:
        return next(f.default for f in fields(ControllerConfig) if f.name == "max_message_bytes")
    return getattr(LIMITS, field)


def _size(ctx, param, value):
    try:
        return parse_memory(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def limit_options(command: Callable) -> Callable:
    """Add the ``--max-*`` flags; they reach the command as ``max_*`` keywords."""
    for flag, (field, is_size, help_text) in reversed(_FLAGS.items()):
        env = "TETHER_" + flag.upper().replace("-", "_")
        command = click.option(
            f"--{flag}",
            flag.replace("-", "_"),
            envvar=env,
            default=str(_default(field)) if is_size else _default(field),
            show_default=True,
            type=str if is_size else click.IntRange(min=1),
            callback=_size if is_size else None,
            help=f"{help_text}{' Bytes, or 64Ki, 4Mi.' if is_size else ''} (env {env})",
        )(command)
    return command


def limits_from_flags(flags: dict[str, int]) -> dict[str, object]:
    """ControllerConfig keywords (``max_message_bytes``, ``limits``) from the flags' values."""
    values = {field: flags[flag.replace("-", "_")] for flag, (field, _, _) in _FLAGS.items()}
    message = values.pop(None)
    return {"max_message_bytes": message, "limits": Limits(**values)}
