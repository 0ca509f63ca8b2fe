"""The workflow format users write, in YAML or in Python, and its conversion to the API.

YAML::

    name: fraud-detection
    tasks:
      - name: collect
        command: [python3, -c, "..."]
        resources: {cpu: 0.5, memory: 256Mi}
      - name: features
        depends_on: [collect]
        retries: 2
        timeout: 30s
        env:
          API_KEY: {secret: openai-key}    # a secret set with `tether secrets set`
      - name: train
        depends_on: [features]
        node_selector: {gpu-model: a100}
        affinity: ["zone In [z1, z2]", {key: ssd, operator: Exists, weight: 20}]
        priority: 80
        replicas: 2
        expected_duration: 10m
    scheduling: {policy: critical-path}

Python::

    wf = Workflow("fraud-detection")
    collect = wf.task("collect", command=["python3", "-c", "..."], cpu=0.5, memory="256Mi")
    wf.task("features", command=[...], depends_on=[collect], retries=2, timeout="30s",
            env={"API_KEY": Secret("openai-key")})

Unknown fields are errors, so a typo never silently changes what runs.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from google.protobuf import duration_pb2
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tether.api.v1 import types_pb2
from tether.sdk.constants import INT32_MAX
from tether.sdk.errors import InvalidSpecError
from tether.sdk.quantities import parse_duration, parse_memory
from tether.sdk.validation import FieldViolation, validate_workflow
from tether.sdk.yaml_source import YamlSourceError, key_lines, load_yaml, yaml_error_text

__all__ = [
    "Affinity",
    "Backoff",
    "Resources",
    "Scheduling",
    "Secret",
    "Task",
    "Workflow",
    "load_workflow",
]


@dataclass(frozen=True)
class Secret:
    """A reference to a secret (set with ``tether secrets set NAME``) as an ``env`` value.

    Only the name travels with the workflow and is stored with the run; the controller puts
    the decrypted value into the task's environment when it starts the task.

    Args:
        name: The secret's name.
    """

    name: str

    def __str__(self) -> str:
        return f"secret:{self.name}"


# What the API's integer fields hold: a bigger number is refused with its field's name,
# rather than failing in protobuf with no name.
_Int32 = Annotated[int, Field(ge=-INT32_MAX - 1, le=INT32_MAX)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Resources(_Strict):
    """What a task needs: ``cpu`` in cores, ``memory`` as ``512Mi``/``2Gi``, ``gpu`` devices."""

    cpu: float = 0.0
    memory: int = 0
    gpu: _Int32 = 0

    @field_validator("memory", mode="before")
    @classmethod
    def _memory(cls, v: Any) -> int:
        return parse_memory(v)


class Backoff(_Strict):
    """Retry delay: ``initial * factor**n``, capped at ``max``, randomised by ``jitter``."""

    initial: float = 0.0
    factor: float = 0.0
    max: float = 0.0
    jitter: float = 0.0

    @field_validator("initial", "max", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float:
        return parse_duration(v)


_AFFINITY_TEXT = re.compile(
    r"^\s*(?P<key>\S+)\s+(?P<op>In|NotIn|Exists|DoesNotExist)\s*(?:\[(?P<values>[^\]]*)\])?\s*$"
)


class Affinity(_Strict):
    """One affinity expression: ``key In [a, b]``, ``NotIn``, ``Exists``, ``DoesNotExist``.

    ``weight`` 0 (the default) makes it required; 1..100 makes it preferred. In YAML either
    ``{key: zone, operator: In, values: [a, b], weight: 10}`` or the text ``"zone In [a, b]"``.
    """

    key: str
    operator: str
    values: list[str] = Field(default_factory=list)
    weight: _Int32 = 0

    @classmethod
    def parse(cls, v: Any) -> Any:
        """The mapping for a text expression; other values are left as they are."""
        if not isinstance(v, str):
            return v
        m = _AFFINITY_TEXT.match(v)
        if not m:
            raise ValueError(
                f"{v!r}: expected 'KEY In [a, b]', 'KEY NotIn [a]', 'KEY Exists' or "
                "'KEY DoesNotExist'"
            )
        values = [x.strip() for x in (m["values"] or "").split(",") if x.strip()]
        return {"key": m["key"], "operator": m["op"], "values": values}


class Scheduling(_Strict):
    """How a workflow's tasks are placed: ``policy`` names a placement policy."""

    policy: str = ""


class Task(_Strict):
    """One task of a workflow. See the README for every field."""

    name: str
    command: list[str]
    image: str = ""
    env: dict[str, str | Secret] = Field(default_factory=dict)
    resources: Resources = Resources()  # frozen: one shared default, not one per task
    depends_on: list[str] = Field(default_factory=list)
    retries: _Int32 = 0
    timeout: float = 0.0
    working_dir: str = ""
    allow_failure: bool = False
    image_pull_policy: Literal["", "if-not-present", "always", "never"] = ""
    backoff: Backoff | None = None
    node_selector: dict[str, str] = Field(default_factory=dict)
    affinity: list[Affinity] = Field(default_factory=list)
    priority: _Int32 | None = None
    preemptible: bool = False
    replicas: _Int32 = 0
    expected_duration: float = 0.0

    @field_validator("timeout", "expected_duration", mode="before")
    @classmethod
    def _timeout(cls, v: Any) -> float:
        return parse_duration(v)

    @field_validator("node_selector", mode="before")
    @classmethod
    def _selector(cls, v: Any) -> Any:
        if isinstance(v, Mapping):
            return {k: _scalar(v2) for k, v2 in v.items()}
        return v

    @field_validator("affinity", mode="before")
    @classmethod
    def _affinity(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [Affinity.parse(x) for x in v]
        return v

    @field_validator("env", mode="before")
    @classmethod
    def _env(cls, v: Any) -> Any:
        # YAML turns `X: 1` into an int; environment values are strings.
        if isinstance(v, Mapping):
            return {k: _env_value(k, v2) for k, v2 in v.items()}
        return v

    def to_proto(self) -> types_pb2.TaskSpec:
        """Return the API message for this task."""
        return types_pb2.TaskSpec(**self._proto_fields())

    def _proto_fields(self) -> dict[str, Any]:
        """The message's fields, as keyword arguments: only those set (a workflow of 100,000
        tasks mostly sets a name, a command and depends_on; unset fields cost time here and
        in every check the controller makes)."""
        fields: dict[str, Any] = {"name": self.name, "command": self.command}
        if self.depends_on:
            fields["depends_on"] = self.depends_on
        if self.image:
            fields["image"] = self.image
        if self.env:
            fields["env"] = {k: v for k, v in self.env.items() if isinstance(v, str)}
            fields["env_secrets"] = {
                k: v.name for k, v in self.env.items() if isinstance(v, Secret)
            }
        r = self.resources
        if r.cpu or r.memory or r.gpu:
            fields["resources"] = types_pb2.Resources(cpu=r.cpu, memory_bytes=r.memory, gpu=r.gpu)
        if self.retries:
            fields["retries"] = self.retries
        if self.working_dir:
            fields["working_dir"] = self.working_dir
        if self.allow_failure:
            fields["allow_failure"] = True
        if self.image_pull_policy:
            fields["image_pull_policy"] = self.image_pull_policy
        if self.node_selector:
            fields["node_selector"] = self.node_selector
        if self.affinity:
            fields["affinity"] = [
                types_pb2.AffinityTerm(
                    key=a.key, operator=a.operator, values=a.values, weight=a.weight
                )
                for a in self.affinity
            ]
        if self.preemptible:
            fields["preemptible"] = True
        if self.replicas:
            fields["replicas"] = self.replicas
        if self.priority is not None:
            fields["priority"] = self.priority
        if self.expected_duration:
            fields["expected_duration"] = _duration(self.expected_duration)
        if self.timeout:
            fields["timeout"] = _duration(self.timeout)
        if self.backoff:
            b = self.backoff
            fields["backoff"] = types_pb2.RetryBackoff(
                initial=_duration(b.initial),
                factor=b.factor,
                max=_duration(b.max),
                jitter=b.jitter,
            )
        return fields


def _given(value: Any, default: Any) -> bool:
    """Whether an argument differs from its default (in type or value)."""
    return type(value) is not type(default) or value != default


def _env_value(key: Any, v: Any) -> Any:
    if isinstance(v, str | Secret):
        return v
    if isinstance(v, Mapping):
        # YAML's form of a secret reference: `{secret: NAME}`.
        if set(v) != {"secret"} or not isinstance(v["secret"], str):
            raise ValueError(f"{key}: a secret reference is {{secret: NAME}} with a string NAME")
        return Secret(v["secret"])
    return _scalar(v)


def _scalar(v: Any) -> Any:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return str(v)
    return v


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


class _WorkflowModel(_Strict):
    name: str
    tasks: list[Task]
    timeout: float = 0.0
    scheduling: Scheduling | None = None

    @field_validator("timeout", mode="before")
    @classmethod
    def _timeout(cls, v: Any) -> float:
        return parse_duration(v)


class Workflow:
    """A workflow (a DAG of tasks) built in Python or loaded from YAML.

    Args:
        name: The workflow's name, shown in run listings.
        tasks: Tasks to start with; more can be added with :meth:`task`.
        timeout: Fail the run if it has not finished this long after submission
            (``"2h"`` or seconds); 0 means no limit.
        policy: Placement policy for this workflow's tasks (``"binpack"``, ``"spread"``,
            ``"fifo"``, ``"least-connections"``, ``"critical-path"``); empty takes the
            controller's ``--policy``.
    """

    def __init__(
        self,
        name: str,
        tasks: Iterable[Task] = (),
        timeout: str | float = 0.0,
        policy: str = "",
    ) -> None:
        self.name = name
        self.policy = policy
        self.tasks: list[Task] = list(tasks)
        try:
            self.timeout = parse_duration(timeout)
        except ValueError as e:
            raise InvalidSpecError([FieldViolation("timeout", str(e))]) from None

    def task(
        self,
        name: str,
        command: Sequence[str],
        *,
        depends_on: Iterable[str | Task] = (),
        image: str = "",
        env: Mapping[str, str | Secret] | None = None,
        cpu: float = 0.0,
        memory: str | int = 0,
        gpu: int = 0,
        retries: int = 0,
        timeout: str | float = 0.0,
        working_dir: str = "",
        allow_failure: bool = False,
        image_pull_policy: str = "",
        backoff: Mapping[str, Any] | None = None,
        node_selector: Mapping[str, str] | None = None,
        affinity: Iterable[str | Mapping[str, Any]] = (),
        priority: int | None = None,
        preemptible: bool = False,
        replicas: int = 0,
        expected_duration: str | float = 0.0,
    ) -> Task:
        """Add a task and return it (pass it to ``depends_on`` of later tasks).

        Scheduling arguments: ``node_selector`` labels a node must carry; ``affinity``
        expressions (``"zone In [a, b]"`` or mappings with ``key``, ``operator``, ``values``,
        ``weight``); ``priority`` 0..100 (default 50); ``preemptible``; ``replicas`` (a gang
        of N placed at once); ``expected_duration`` for the critical-path policy. See the
        README's "Scheduling" section.

        Raises:
            InvalidSpecError: a field is malformed (for example ``memory="lots"``).
        """
        # A str is a sequence too, and list("echo hi") is a command of one-letter programs:
        # handed over as it is, the model refuses it ("Input should be a valid list").
        if not isinstance(command, str | bytes | bytearray):
            command = list(command)
        fields: dict[str, Any] = {"name": name, "command": command}
        deps = [d.name if isinstance(d, Task) else d for d in depends_on]
        # Only what was given is validated: a default needs no check, and validating all 18
        # fields of each of 100,000 tasks took seconds. A value of another type than its
        # default's (``cpu=0`` for ``0.0``) is passed on, to be checked and converted.
        if deps:
            fields["depends_on"] = deps
        if env:
            fields["env"] = dict(env)
        if _given(cpu, 0.0) or _given(memory, 0) or _given(gpu, 0):
            fields["resources"] = {"cpu": cpu, "memory": memory, "gpu": gpu}
        if backoff:
            fields["backoff"] = dict(backoff)
        if node_selector:
            fields["node_selector"] = dict(node_selector)
        if affinity != ():
            fields["affinity"] = list(affinity)
        if priority is not None:
            fields["priority"] = priority
        for key, value, default in (
            ("image", image, ""),
            ("retries", retries, 0),
            ("timeout", timeout, 0.0),
            ("working_dir", working_dir, ""),
            ("allow_failure", allow_failure, False),
            ("image_pull_policy", image_pull_policy, ""),
            ("preemptible", preemptible, False),
            ("replicas", replicas, 0),
            ("expected_duration", expected_duration, 0.0),
        ):
            if _given(value, default):
                fields[key] = value
        try:
            t = Task(**fields)
        except ValidationError as e:
            where = f"tasks[{len(self.tasks)}]" + (f" ({name})" if isinstance(name, str) else "")
            raise InvalidSpecError(_violations(e, prefix=where)) from None
        self.tasks.append(t)
        return t

    @classmethod
    def from_dict(cls, data: Any, *, _source: tuple[str, dict] | None = None) -> Workflow:
        """Build a workflow from parsed YAML/JSON data.

        Raises:
            InvalidSpecError: unknown or malformed fields, with their paths.
        """
        if not isinstance(data, Mapping):
            # pydantic would name its private model ("a valid dictionary or instance of
            # _WorkflowModel"), not what the user wrote.
            name = (_source[0] if _source else "") or "workflow"
            kind = type(data).__name__
            got = "nothing" if data is None else ("an " if kind[0] in "aeiou" else "a ") + kind
            raise InvalidSpecError(
                [
                    FieldViolation(
                        "", f"{name}: expected a workflow mapping (name, tasks), got {got}"
                    )
                ]
            )
        try:
            model = _WorkflowModel.model_validate(data)
        except ValidationError as e:
            raise InvalidSpecError(_violations(e, data=data, source=_source)) from None
        policy = model.scheduling.policy if model.scheduling else ""
        return cls(model.name, model.tasks, model.timeout, policy)

    @classmethod
    def from_yaml(cls, source: str | Path) -> Workflow:
        """Load a workflow from a YAML file path or a YAML string.

        Errors name the file (``"workflow"`` for a string) and the line of what is wrong.
        A one-line string that names no file and reads as plain text (``"typo.yaml"``) is
        taken for a path that does not exist.
        """
        path = source if isinstance(source, Path) else None
        if isinstance(source, str) and source and "\n" not in source and Path(source).exists():
            path = Path(source)
        if path is not None:
            if not path.exists():  # load_yaml's "cannot read: No such file or directory"
                raise InvalidSpecError([FieldViolation("", f"{path}: no such file")])
            try:
                data, lines = load_yaml(path)
            except YamlSourceError as e:
                raise InvalidSpecError([FieldViolation("", str(e))]) from None
            if data is None:
                raise InvalidSpecError(
                    [FieldViolation("", f"{path}: the file is empty (expected a workflow mapping)")]
                )
            return cls.from_dict(data, _source=(str(path), lines))
        try:
            data = yaml.safe_load(source)
            lines = key_lines(yaml.compose(source, Loader=yaml.SafeLoader))
        except yaml.YAMLError as e:
            raise InvalidSpecError([FieldViolation("", yaml_error_text(e, "workflow"))]) from None
        if "\n" not in source and isinstance(data, str):
            raise InvalidSpecError([FieldViolation("", f"{source}: no such file")])
        if data is None:
            raise InvalidSpecError(
                [FieldViolation("", "workflow: the text is empty (expected a workflow mapping)")]
            )
        return cls.from_dict(data, _source=("", lines))

    def to_proto(self, validate: bool = True) -> types_pb2.WorkflowSpec:
        """Return the API message, after the same validation the controller runs.

        Args:
            validate: Check the spec (InvalidSpecError); False leaves that to the controller.
        """
        spec = types_pb2.WorkflowSpec()
        self._fill_proto(spec)
        if validate:
            validate_workflow(spec)
        return spec

    def _fill_proto(self, spec: types_pb2.WorkflowSpec) -> None:
        """Set the fields of an empty ``spec`` (a request's, say: no copy of a big one)."""
        spec.name = self.name
        add = spec.tasks.add  # built in place: TaskSpec(...) then a copy took twice as long
        for t in self.tasks:
            add(**t._proto_fields())
        if self.timeout:
            spec.timeout.CopyFrom(_duration(self.timeout))
        if self.policy:
            spec.scheduling.policy = self.policy


def load_workflow(path: str | Path) -> Workflow:
    """Load a workflow from a YAML file."""
    return Workflow.from_yaml(Path(path))


def _violations(
    e: ValidationError, prefix: str = "", data: Any = None, source: tuple[str, dict] | None = None
) -> list[FieldViolation]:
    out = []
    for err in e.errors():
        where = _where(err["loc"], source)
        parts: list[str] = [prefix] if prefix else []
        node = data
        for loc in err["loc"]:
            if isinstance(loc, int):
                label = f"[{loc}]"
                if isinstance(node, list) and loc < len(node) and isinstance(node[loc], dict):
                    name = node[loc].get("name")
                    if name:
                        label += f" ({name})"
                parts.append(label)
            else:
                parts.append(("." if parts else "") + str(loc))
            if isinstance(node, dict):
                node = node.get(loc)
            elif isinstance(node, list) and isinstance(loc, int) and loc < len(node):
                node = node[loc]
            else:
                node = None
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field" + _did_you_mean(err["loc"])
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        out.append(FieldViolation("".join(parts), msg + where))
    return out


def _where(loc: tuple, source: tuple[str, dict] | None) -> str:
    """`` (wf.yaml:7)`` or `` (line 7)``: the line of ``loc``, or of the nearest enclosing
    item that has one."""
    if source is None:
        return ""
    name, lines = source
    for n in range(len(loc), 0, -1):
        line = lines.get(tuple(loc[:n]))
        if line is not None:
            return f" ({name}:{line})" if name else f" (line {line})"
    return ""


def _did_you_mean(loc: tuple) -> str:
    """`` (did you mean 'retries'?)`` for an unknown field at ``loc``, when one is close."""
    model: Any = _WorkflowModel
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        info = model.model_fields.get(part) if _is_model(model) else None
        if info is None:
            return ""
        model = _model_in(info.annotation)
    if not _is_model(model):
        return ""
    hint = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f" (did you mean {hint[0]!r}?)" if hint else ""


def _is_model(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def _model_in(annotation: Any) -> Any:
    """The model a field holds: itself, or the model inside ``list[M]`` or ``M | None``."""
    if _is_model(annotation):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None
