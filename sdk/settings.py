"""Process configuration: one typed object, layered from a YAML file, the environment and flags.

A config class (a frozen pydantic dataclass) declares each field once with :func:`setting`:
its default, its description, its environment variable and, if it has one, its flag. From
that one declaration come the command's flags (:func:`config_options`), the layering
(:func:`layered`: defaults < ``--config FILE`` < environment < flags), the error messages
(each names the field and where its value came from) and the README table
(:func:`markdown_table`).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Annotated, Any

import click
from pydantic import BeforeValidator, Field, ValidationError
from pydantic.dataclasses import is_pydantic_dataclass

from tether.sdk.quantities import format_duration, format_memory, parse_duration, parse_memory
from tether.sdk.yaml_source import YamlSourceError, load_yaml

__all__ = [
    "ByteSize",
    "CommaList",
    "ConfigError",
    "Duration",
    "KeyValues",
    "Setting",
    "config_options",
    "layered",
    "markdown_table",
    "setting",
    "settings_of",
]

_SOURCES = (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)


def _comma_list(value: Any) -> Any:
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    return value


def _key_values(value: Any) -> Any:
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    if isinstance(value, list | tuple):
        out = {}
        for item in value:
            k, sep, v = str(item).partition("=")
            if not sep or not k.strip():
                raise ValueError(f"{item!r}: use KEY=VALUE")
            out[k.strip()] = v
        return out
    return value


# Field types whose values may also be written as people write them: ``7d``, ``64Mi``,
# ``a:2379,b:2379``, ``zone=a,rack=3`` (from a file, the environment or a flag alike).
Duration = Annotated[float, BeforeValidator(parse_duration)]
ByteSize = Annotated[int, BeforeValidator(parse_memory)]
CommaList = Annotated[tuple[str, ...], BeforeValidator(_comma_list)]
KeyValues = Annotated[dict[str, str], BeforeValidator(_key_values)]


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names each bad field and its source."""


def setting(
    default: Any = MISSING,
    *,
    description: str,
    env: str | None = None,
    flag: str | None = None,
    default_factory: Callable[[], Any] | None = None,
    shown_default: str | None = None,
    multiple: bool = False,
    choices: tuple[str, ...] | None = None,
) -> Any:
    """Declare a config field (use as the field's default).

    Args:
        default: The value when no layer sets one.
        description: What the field means; the flag's help and the README say this.
        env: Environment variable that sets it; None derives ``TETHER_<FIELD>``, "" is none.
        flag: Command-line flag that sets it (``--lease-ttl``); None has no flag.
        default_factory: Computes the default instead of ``default``.
        shown_default: How the docs show a computed default.
        multiple: The flag may repeat (each value one item of a list or mapping).
        choices: The values the flag offers (and completes); the class still checks them.
    """
    extra = {
        "env": env,
        "flag": flag,
        "shown_default": shown_default,
        "multiple": multiple,
        "choices": list(choices) if choices else None,
    }
    if default_factory is not None:
        return Field(default_factory=default_factory, description=description, **_extra(extra))
    return Field(default, description=description, **_extra(extra))


def _extra(extra: dict[str, Any]) -> dict[str, Any]:
    return {"json_schema_extra": {k: v for k, v in extra.items() if v is not None}}


@dataclass(frozen=True)
class Setting:
    """One configurable field, possibly of a nested section (``limits.max_tasks``)."""

    path: tuple[str, ...]
    description: str
    env: str
    flag: str | None
    default: Any
    multiple: bool
    choices: tuple[str, ...] = ()
    kind: str = ""  # "bytes" or "duration": how the docs show the default

    @property
    def name(self) -> str:
        """The dotted name, as in the YAML file and in error messages."""
        return ".".join(self.path)

    @property
    def param(self) -> str:
        """The click parameter name of its flag."""
        return "_".join(self.path)


def settings_of(cls: type) -> list[Setting]:
    """Every setting of the config class ``cls``, sections flattened, in declaration order."""
    return _settings(cls, ())


def _settings(cls: type, prefix: tuple[str, ...]) -> list[Setting]:
    out: list[Setting] = []
    for name, info in cls.__pydantic_fields__.items():
        path = (*prefix, name)
        if is_pydantic_dataclass(info.annotation):
            out.extend(_settings(info.annotation, path))
            continue
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        env = extra.get("env")
        if env is None:
            env = "TETHER_" + name.upper()
        if "shown_default" in extra:
            default = extra["shown_default"]
        elif info.default_factory is not None:
            default = info.default_factory()
        else:
            default = info.default
        parsers = {getattr(m, "func", None) for m in info.metadata}
        kind = (
            "bytes" if parse_memory in parsers else "duration" if parse_duration in parsers else ""
        )
        out.append(
            Setting(
                path=path,
                description=info.description or "",
                env=str(env),
                flag=extra.get("flag"),
                default=default,
                multiple=bool(extra.get("multiple")),
                choices=tuple(extra.get("choices") or ()),
                kind=kind,
            )
        )
    return out


def _shown(value: Any, kind: str = "") -> str:
    if kind == "bytes" and isinstance(value, int):
        return format_memory(value) if value else "0"
    if kind == "duration" and isinstance(value, int | float):
        return format_duration(value) if value else "0s"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple | list):
        return ",".join(map(str, value))
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def config_options(cls: type) -> Callable[[Callable], Callable]:
    """Add ``--config FILE`` and a flag for every setting of ``cls`` that declares one.

    The flags have no click defaults and read no environment: :func:`layered` applies the
    defaults and the environment beneath the file, so that a flag overrides a file only when
    it is given.
    """

    def decorate(command: Callable) -> Callable:
        for s in reversed([s for s in settings_of(cls) if s.flag]):
            shown = _shown(s.default, s.kind)
            env = f" (env {s.env})" if s.env else ""
            default = f"  [default: {shown}]" if shown and not isinstance(s.default, bool) else ""
            kw: dict[str, Any] = {"help": s.description + env + default, "default": None}
            decls = [s.flag, s.param]
            if isinstance(s.default, bool):
                # --no-X too, so that a flag can turn off what a config file turned on.
                decls[0] = f"{s.flag}/--no-{s.flag.removeprefix('--')}"
            elif not s.choices:
                kw["metavar"] = {"bytes": "SIZE", "duration": "DURATION"}.get(s.kind, "TEXT")
            if s.multiple:
                kw["multiple"] = True
            if s.choices:
                kw["type"] = click.Choice(s.choices)
            command = click.option(*decls, **kw)(command)
        return click.option(
            "--config",
            "config_file",
            type=click.Path(dir_okay=False, path_type=Path),
            default=None,
            help="YAML file of settings (see 'Configuration' in the README); the "
            "environment and flags override it.",
        )(command)

    return decorate


def layered(
    cls: type,
    ctx: click.Context,
    *,
    environ: Mapping[str, str] | None = None,
    derive: Callable[[dict[str, Any]], None] | None = None,
) -> Any:
    """Build ``cls`` from its defaults, then ``--config FILE``, the environment, the flags.

    Args:
        cls: The config class (declared with :func:`setting`).
        ctx: The click context of a command decorated with :func:`config_options`; its
            ``config_file`` parameter names the file. Options added by hand whose name is a
            field's count as flags (or as environment, when click read them from it).
        environ: The environment (default: ``os.environ``).
        derive: Called with the layered keyword arguments (sections as dicts) before the
            object is built, to fill defaults that depend on other fields.

    Raises:
        ConfigError: the file or a value is bad; the message names the field and its source.
    """
    environ = os.environ if environ is None else environ
    all_settings = settings_of(cls)
    by_path = {s.path: s for s in all_settings}
    sections = {s.path[0] for s in all_settings if len(s.path) > 1}
    values: dict[tuple[str, ...], tuple[Any, str]] = {}

    config_file = ctx.params.get("config_file")
    if config_file is not None:
        values.update(_from_file(Path(config_file), by_path, sections))
    for s in all_settings:
        if s.env and s.env in environ:
            values[s.path] = (environ[s.env], s.env)
    by_param = {s.param: s for s in all_settings if s.flag}
    top = {s.path[0]: s for s in all_settings if len(s.path) == 1}
    for param in ctx.command.params:
        if param.name is None or ctx.get_parameter_source(param.name) not in _SOURCES:
            continue
        s = by_param.get(param.name) or top.get(param.name)
        if s is None:
            continue
        from_env = ctx.get_parameter_source(param.name) == click.core.ParameterSource.ENVIRONMENT
        source = (param.envvar if isinstance(param.envvar, str) else "env") if from_env else None
        flag = s.flag or "--" + param.name.replace("_", "-")
        values[s.path] = (ctx.params[param.name], source or flag)

    kwargs: dict[str, Any] = {}
    for path, (value, _) in values.items():
        target = kwargs
        for part in path[:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = value
    if derive is not None:
        derive(kwargs)
    try:
        return cls(**kwargs)
    except ValidationError as e:
        raise ConfigError(_explain(e, values)) from None
    except ValueError as e:  # a plain check after validation
        raise ConfigError(str(e)) from None


def _from_file(
    path: Path, by_path: dict[tuple[str, ...], Setting], sections: set[str]
) -> dict[tuple[str, ...], tuple[Any, str]]:
    try:
        data, lines = load_yaml(path)
    except YamlSourceError as e:
        raise ConfigError(str(e)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: expected a mapping of settings, got {type(data).__name__}")
    out: dict[tuple[str, ...], tuple[Any, str]] = {}
    known = sorted({".".join(p) for p in by_path} | sections)

    def where(keys: tuple[str, ...]) -> str:
        return f"{path}:{lines.get(keys, 1)}"

    def visit(mapping: dict, keys: tuple[str, ...]) -> None:
        for raw, value in mapping.items():
            here = (*keys, str(raw))
            norm = tuple(k.replace("-", "_") for k in here)
            if len(norm) == 1 and norm[0] in sections:
                if not isinstance(value, dict):
                    raise ConfigError(f"{where(here)}: {norm[0]}: expected a mapping")
                visit(value, here)
            elif norm in by_path:
                out[norm] = (value, f"{where(here)}")
            else:
                name = ".".join(norm)
                # A flag's name where the setting has another (--name sets node, say).
                by_flag = [
                    ".".join(p)
                    for p, st in by_path.items()
                    if st.flag and st.flag.lstrip("-").replace("-", "_") == name
                ]
                hint = by_flag or difflib.get_close_matches(name, known, n=1)
                maybe = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise ConfigError(f"{where(here)}: unknown setting {name!r}{maybe}")

    visit(data, ())
    return out


def _explain(e: ValidationError, values: dict[tuple[str, ...], tuple[Any, str]]) -> str:
    parts = []
    for err in e.errors():
        loc = tuple(str(x) for x in err["loc"] if not isinstance(x, int))
        msg = err["msg"].removeprefix("Value error, ")
        if loc:
            source = next(
                (values[loc[:n]][1] for n in range(len(loc), 0, -1) if loc[:n] in values), ""
            )
            where = f" (from {source})" if source else ""
            parts.append(f"{'.'.join(loc)}: {msg}{where}")
        else:
            # A check across fields names its field first ("controller: ..."): say where
            # that field's value came from, as for the others.
            field = tuple(msg.partition(":")[0].split("."))
            source = values.get(field, (None, ""))[1]
            parts.append(f"{msg} (from {source})" if source else msg)
    return "; ".join(parts)


def markdown_table(cls: type) -> str:
    """The README table of ``cls``'s settings: YAML key, flag, environment, default, meaning."""
    rows = [
        "| setting | flag | environment | default | meaning |",
        "|---|---|---|---|---|",
    ]
    for s in settings_of(cls):
        default = _shown(s.default, s.kind)
        description = " ".join(s.description.split()).replace("|", "\\|")
        flag = s.flag or ""
        if flag and isinstance(s.default, bool):
            flag = "--[no-]" + flag.removeprefix("--")
        rows.append(
            f"| `{s.name}` | {f'`{flag}`' if flag else ''} | "
            f"{f'`{s.env}`' if s.env else ''} | {f'`{default}`' if default else ''} | "
            f"{description} |"
        )
    return "\n".join(rows) + "\n"
