"""Validation of a workflow spec: the rules the SDK checks early and the controller enforces.

The controller is the authority and runs :func:`validate_workflow` on every submit; the SDK
runs it too so that a bad spec fails before it leaves the user's machine. Every violation
names its field path, for example ``tasks[2] (train).depends_on[0]``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from pydantic.dataclasses import dataclass

from tether.api.v1 import types_pb2
from tether.sdk.constants import POLICY_NAMES
from tether.sdk.errors import FieldViolation, InvalidSpecError
from tether.sdk.settings import ByteSize, Duration, setting
from tether.sdk.templating import TemplateError, references

__all__ = ["LIMITS", "FieldViolation", "Limits", "validate_params", "validate_workflow"]

TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
SECRET_NAME = TASK_NAME
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Limits:
    """Bounds that keep specs sane and every etcd value far below its 1.5 MiB cap.

    The controller enforces the ones it is configured with (the ``limits`` section of its
    config, ``tether controller --max-*``); the SDK checks the defaults early.
    """

    max_tasks: int = setting(
        200_000,
        description="Most tasks in one run.",
        flag="--max-tasks-per-run",
        env="TETHER_MAX_TASKS_PER_RUN",
    )
    max_task_bytes: ByteSize = setting(
        256 * 1024,
        description="Encoded size of one task's spec without its depends_on list (each task "
        "is one etcd value; a long depends_on list is stored apart, in parts).",
    )
    max_spec_bytes: ByteSize = setting(
        32 * 1024 * 1024, description="Largest workflow spec (encoded).", flag="--max-spec-bytes"
    )
    max_cpu: float = setting(4096.0, description="Most CPU cores one task may ask for.")
    max_memory_bytes: ByteSize = setting(
        64 * 2**40, description="Most memory one task may ask for."
    )
    max_gpu: int = setting(1024, description="Most GPUs one task may ask for.")
    max_retries: int = setting(100, description="Most retries a task may declare.")
    max_timeout_seconds: Duration = setting(
        30 * 86400, description="Longest timeout a task or a run may declare."
    )
    max_name: int = setting(128, description="Longest workflow name.")
    max_env_value_bytes: ByteSize = setting(
        32 * 1024,
        description="One task environment value: Linux refuses to exec a process with a "
        "single NAME=value string over 128 KiB.",
        flag="--max-env-value-bytes",
    )
    max_env_bytes: ByteSize = setting(
        128 * 1024,
        description="All of one task's environment names and values together.",
        flag="--max-env-bytes",
    )
    max_arg_bytes: ByteSize = setting(
        64 * 1024, description="One command argument (the same exec limit as an env value)."
    )
    max_params_bytes: ByteSize = setting(
        256 * 1024,
        description="All of a run's parameter names and values together (the run record "
        "holds them, in one etcd value).",
        flag="--max-params-bytes",
    )
    max_param_value_bytes: ByteSize = setting(4096, description="One parameter value.")
    max_id_length: int = setting(
        128,
        description="Longest run id, task name or request id a request may name.",
        flag="--max-id-length",
    )
    max_replicas: int = setting(1024, description="Most replicas of one gang task.")
    max_affinity_terms: int = setting(32, description="Most affinity expressions of one task.")
    max_label_length: int = setting(
        253, description="Longest node_selector or affinity key or value."
    )

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")


LIMITS = Limits()


def validate_workflow(
    spec: types_pb2.WorkflowSpec,
    limits: Limits = LIMITS,
    params: Mapping[str, str] | None = None,
) -> None:
    """Check a workflow spec, and with ``params`` also what :func:`validate_params` checks
    (in the same pass over the tasks; its problems are raised only for a valid spec).

    Raises:
        InvalidSpecError: with one :class:`FieldViolation` per problem found.
    """

    templated: list[tuple[int, str, str]] = []
    problems = list(_violations(spec, limits, templated))
    if problems:
        raise InvalidSpecError(problems)
    if params is not None:
        problems = _param_violations(spec, templated, params)
        if problems:
            raise InvalidSpecError(problems)


def _where(i: int, name: str) -> str:
    return f"tasks[{i}]" + (f" ({name})" if name else "")


def _violations(spec: types_pb2.WorkflowSpec, limits: Limits, templated: list):
    """Every problem of ``spec``; ``templated`` receives each templated task field as
    ``(task index, field path, text)``."""
    if not spec.name.strip():
        yield FieldViolation("name", "must not be empty")
    elif len(spec.name) > limits.max_name:
        yield FieldViolation("name", f"longer than {limits.max_name} characters")
    elif not spec.name.isprintable():
        # Shown in tables and logs, and a line break or escape would forge their lines.
        yield FieldViolation("name", "must not contain control characters (line breaks, tabs)")
    if not spec.tasks:
        yield FieldViolation("tasks", "a workflow needs at least one task")
        return
    if len(spec.tasks) > limits.max_tasks:
        yield FieldViolation(
            "tasks", f"{len(spec.tasks)} tasks; at most {limits.max_tasks} (limit max_tasks)"
        )
        return
    run_timeout = spec.timeout.seconds + spec.timeout.nanos / 1e9
    if bad := _bad_duration(spec.timeout):
        yield FieldViolation("timeout", bad)
    elif run_timeout < 0 or run_timeout > limits.max_timeout_seconds:
        yield FieldViolation("timeout", "must be between 0 and 30 days")
    if spec.HasField("scheduling") and spec.scheduling.policy:
        if spec.scheduling.policy not in POLICY_NAMES:
            yield FieldViolation(
                "scheduling.policy",
                f"unknown policy {spec.scheduling.policy[:64]!r}; known: {', '.join(POLICY_NAMES)}",
            )
    size = spec.ByteSize()
    if size > limits.max_spec_bytes:
        yield FieldViolation(
            "", f"spec is {size} bytes; at most {limits.max_spec_bytes} (limit max_spec_bytes)"
        )
        return

    index: dict[str, int] = {}
    match_name = TASK_NAME.match
    for i, t in enumerate(spec.tasks):
        name = t.name
        if not name:
            yield FieldViolation(f"{_where(i, name)}.name", "must not be empty")
        elif not match_name(name):
            yield FieldViolation(
                f"{_where(i, name)}.name",
                "use 1-63 letters, digits, '_', '.', '-', starting alphanumeric",
            )
        elif name in index:
            yield FieldViolation(
                f"{_where(i, name)}.name", f"duplicate task name (also tasks[{index[name]}])"
            )
        else:
            index[name] = i
        # Only the fields a task sets are checked: every field's default is valid, and a
        # 100,000-task spec mostly sets a name, a command and depends_on.
        present = {f for f, _ in t.ListFields()}
        if present <= _PLAIN_FIELDS and _plain_task_ok(t, limits):
            continue
        yield from _task_violations(t, i, {f.name for f in present}, limits, templated)

    # A cycle needs an edge to a name first seen later (names are the graph's nodes, a
    # duplicate's edges are its first one's): without one the (costlier) search for a cycle
    # to name is skipped.
    forward = False
    for i, t in enumerate(spec.tasks):
        deps = t.depends_on
        if not deps:
            continue
        name = t.name
        first = index.get(name, -1)  # -1: a bad name, which no edge leads to
        if len(deps) == 1:  # the usual case, without the set
            k = index.get(deps[0])
            if k is not None and k < first and deps[0] != name:
                continue
        seen: set[str] = set()
        for j, dep in enumerate(deps):
            k = index.get(dep)
            if dep == name:
                yield FieldViolation(
                    f"{_where(i, name)}.depends_on[{j}]", "a task cannot depend on itself"
                )
            elif k is None:
                yield FieldViolation(f"{_where(i, name)}.depends_on[{j}]", f"unknown task {dep!r}")
            elif dep in seen:
                yield FieldViolation(f"{_where(i, name)}.depends_on[{j}]", f"{dep!r} listed twice")
            elif k > first >= 0:
                forward = True
            seen.add(dep)

    cycle = _find_cycle(spec, index) if forward else None
    if cycle:
        first = index[cycle[0]]
        yield FieldViolation(
            f"tasks[{first}] ({cycle[0]}).depends_on", "cycle: " + " -> ".join(cycle)
        )
        return
    yield from _template_violations(spec, index, templated)


def _templated_fields(task: types_pb2.TaskSpec):
    for j, arg in enumerate(task.command):
        if "{{" in arg:
            yield f"command[{j}]", arg
    for key, value in task.env.items():
        if "{{" in value:
            yield f"env.{key}", value


def _template_violations(
    spec: types_pb2.WorkflowSpec, index: dict[str, int], templated: list[tuple[int, str, str]]
):
    # All task references first, then one pass over the DAG: a walk up the dependencies per
    # reference was quadratic in a long chain whose tasks refer to tasks far upstream.
    found: list[tuple[int, str, list[str]]] = []
    for i, field, text in templated:
        t = spec.tasks[i]
        if index.get(t.name) != i:
            continue  # a bad or duplicate name, reported above
        where = f"{_where(i, t.name)}.{field}"
        try:
            refs = references(text)
        except TemplateError as e:
            yield FieldViolation(where, str(e))
            continue
        names = list({r.name: None for r in refs if r.kind == "task"})  # once each, in order
        if names:
            found.append((i, where, names))
    if not found:
        return
    targets: dict[str, int] = {}
    for _, _, names in found:
        for name in names:
            targets.setdefault(name, len(targets))
    upstream = _upstream_bits(spec, index, targets)
    for i, field, names in found:
        for name in names:
            if not upstream[i] >> targets[name] & 1:
                yield FieldViolation(
                    field,
                    f"task {name!r} is not upstream of {spec.tasks[i].name!r}; "
                    "add it to depends_on",
                )


def _upstream_bits(
    spec: types_pb2.WorkflowSpec, index: dict[str, int], targets: dict[str, int]
) -> list[int]:
    """For each task, a bit set (an int; bit ``targets[name]``) of the referenced tasks
    upstream of it. One post-order walk: each task's set is its dependencies' sets joined."""
    deps = [[index[d] for d in t.depends_on if d in index] for t in spec.tasks]
    bits = [0] * len(deps)
    state = [0] * len(deps)  # 1: on the walk's stack, 2: done
    own = {index[n]: 1 << b for n, b in targets.items() if n in index}
    for root in range(len(deps)):
        if state[root]:
            continue
        stack = [(root, 0)]
        state[root] = 1
        while stack:
            node, k = stack[-1]
            if k < len(deps[node]):
                stack[-1] = (node, k + 1)
                child = deps[node][k]
                if not state[child]:
                    state[child] = 1
                    stack.append((child, 0))
                continue
            stack.pop()
            acc = 0
            for d in deps[node]:
                if state[d] == 2:  # a cycle (reported elsewhere) leaves the back edge out
                    acc |= bits[d] | own.get(d, 0)
            bits[node] = acc
            state[node] = 2
    return bits


def validate_params(spec: types_pb2.WorkflowSpec, params: Mapping[str, str]) -> None:
    """Check that every ``{{ params.x }}`` a task uses is given.

    Raises:
        InvalidSpecError: naming each task field that uses a missing parameter.
    """
    templated = [
        (i, field, text) for i, t in enumerate(spec.tasks) for field, text in _templated_fields(t)
    ]
    problems = _param_violations(spec, templated, params)
    if problems:
        raise InvalidSpecError(problems)


def _param_violations(
    spec: types_pb2.WorkflowSpec,
    templated: list[tuple[int, str, str]],
    params: Mapping[str, str],
) -> list[FieldViolation]:
    problems = []
    for i, field, text in templated:
        try:
            refs = references(text)
        except TemplateError:
            continue  # reported by validate_workflow
        missing = {ref.name: None for ref in refs if ref.kind == "param"}  # once each, in order
        for name in missing:
            if name not in params:
                problems.append(
                    FieldViolation(
                        f"tasks[{i}] ({spec.tasks[i].name}).{field}",
                        f"parameter {name!r} was not given",
                    )
                )
    return problems


_PLAIN_FIELDS = frozenset(
    types_pb2.TaskSpec.DESCRIPTOR.fields_by_name[f] for f in ("name", "command", "depends_on")
)


def _plain_task_ok(t: types_pb2.TaskSpec, limits: Limits) -> bool:
    """Whether a task that sets only a name, a command and depends_on is certainly valid
    and has no templated field (else :func:`_task_violations` looks at it in full)."""
    command = t.command
    if not command or not command[0] or t.ByteSize() > limits.max_task_bytes:
        return False
    longest = limits.max_arg_bytes // 4  # characters that surely fit (UTF-8: 1-4 bytes each)
    for arg in command:
        if "\0" in arg or "{{" in arg or len(arg) > longest:
            return False
    return True


def _task_violations(
    t: types_pb2.TaskSpec, i: int, present: set[str], limits: Limits, templated: list
):
    """The problems of one task, checking only the fields in ``present`` (those it sets);
    its templated fields are added to ``templated``."""
    where = _where(i, t.name)
    size = t.ByteSize()
    if size > limits.max_task_bytes and t.depends_on:
        # depends_on is bounded by max_tasks, and the controller stores a long one apart.
        size -= types_pb2.TaskSpec(depends_on=t.depends_on).ByteSize()
    if size > limits.max_task_bytes:
        yield FieldViolation(
            where,
            f"task is {size} bytes; at most {limits.max_task_bytes} (limit max_task_bytes)",
        )
    command = t.command
    if not command:
        yield FieldViolation(f"{where}.command", "must not be empty")
    elif not command[0]:
        yield FieldViolation(f"{where}.command[0]", "the program must not be empty")
    if "resources" in present:
        yield from _resource_violations(t.resources, where, limits)
    if "retries" in present and not 0 <= t.retries <= limits.max_retries:
        yield FieldViolation(
            f"{where}.retries", f"must be in 0..{limits.max_retries}, got {t.retries}"
        )
    if "timeout" in present:
        timeout = t.timeout.seconds + t.timeout.nanos / 1e9
        if bad := _bad_duration(t.timeout):
            yield FieldViolation(f"{where}.timeout", bad)
        elif timeout < 0:
            yield FieldViolation(f"{where}.timeout", "must be >= 0")
        elif timeout > limits.max_timeout_seconds:
            yield FieldViolation(f"{where}.timeout", "longer than 30 days")
    if "env" in present:
        yield from _env_violations(t, where, limits)
    if "env_secrets" in present:
        for key, secret in t.env_secrets.items():
            if not ENV_NAME.match(key):
                yield FieldViolation(f"{where}.env.{key}", "not a valid environment variable name")
            elif key in t.env:
                yield FieldViolation(f"{where}.env.{key}", "set both as a value and as a secret")
            if not SECRET_NAME.match(secret):
                yield FieldViolation(
                    f"{where}.env.{key}",
                    f"secret name {secret[:64]!r} must match {SECRET_NAME.pattern}",
                )
    for j, arg in enumerate(command):
        if "\0" in arg:
            yield FieldViolation(f"{where}.command[{j}]", "must not contain a NUL byte")
        elif len(arg) * 4 > limits.max_arg_bytes and len(arg.encode()) > limits.max_arg_bytes:
            yield FieldViolation(
                f"{where}.command[{j}]",
                f"{len(arg.encode())} bytes; at most {limits.max_arg_bytes} (limit max_arg_bytes)",
            )
        if "{{" in arg:
            templated.append((i, f"command[{j}]", arg))
    if "env" in present:
        templated.extend((i, f"env.{k}", v) for k, v in t.env.items() if "{{" in v)
    for name in ("working_dir", "image"):  # a path and a reference: no NUL either
        if name in present and "\0" in getattr(t, name):
            yield FieldViolation(f"{where}.{name}", "must not contain a NUL byte")
    if "image_pull_policy" in present and t.image_pull_policy not in (
        "",
        "if-not-present",
        "always",
        "never",
    ):
        yield FieldViolation(
            f"{where}.image_pull_policy", "must be if-not-present, always or never"
        )
    if not present.isdisjoint(_SCHEDULING_FIELDS):
        yield from _scheduling_violations(t, where, limits)
    if "backoff" in present:
        b = t.backoff
        if b.initial.seconds < 0 or b.max.seconds < 0:
            yield FieldViolation(f"{where}.backoff", "durations must be >= 0")
        for name in ("initial", "max"):
            if bad := _bad_duration(getattr(b, name)):
                yield FieldViolation(f"{where}.backoff.{name}", bad)
        if b.factor and (not math.isfinite(b.factor) or b.factor < 1):
            yield FieldViolation(f"{where}.backoff.factor", "must be >= 1")
        if not math.isfinite(b.jitter) or not 0 <= b.jitter <= 1:
            yield FieldViolation(f"{where}.backoff.jitter", "must be in [0, 1]")


_SCHEDULING_FIELDS = frozenset(
    ("priority", "replicas", "expected_duration", "node_selector", "affinity")
)


def _resource_violations(r: types_pb2.Resources, where: str, limits: Limits):
    if not math.isfinite(r.cpu):
        yield FieldViolation(f"{where}.resources.cpu", f"must be a finite number, got {r.cpu}")
    elif r.cpu < 0:
        yield FieldViolation(f"{where}.resources.cpu", f"must be >= 0, got {r.cpu}")
    elif r.cpu > limits.max_cpu:
        yield FieldViolation(f"{where}.resources.cpu", f"{r.cpu} cores; at most {limits.max_cpu}")
    if r.memory_bytes < 0:
        yield FieldViolation(f"{where}.resources.memory", f"must be >= 0, got {r.memory_bytes}")
    elif r.memory_bytes > limits.max_memory_bytes:
        yield FieldViolation(f"{where}.resources.memory", "more than 64Ti")
    if r.gpu < 0:
        yield FieldViolation(f"{where}.resources.gpu", f"must be >= 0, got {r.gpu}")
    elif r.gpu > limits.max_gpu:
        yield FieldViolation(f"{where}.resources.gpu", f"at most {limits.max_gpu}")


def _env_violations(t: types_pb2.TaskSpec, where: str, limits: Limits):
    env_bytes = 0
    for key, value in t.env.items():
        size = len(value.encode())
        env_bytes += len(key.encode()) + size
        if not ENV_NAME.match(key):
            yield FieldViolation(f"{where}.env.{key}", "not a valid environment variable name")
        elif "\0" in value:
            yield FieldViolation(f"{where}.env.{key}", "must not contain a NUL byte")
        elif size > limits.max_env_value_bytes:
            yield FieldViolation(
                f"{where}.env.{key}",
                f"value is {size} bytes; at most {limits.max_env_value_bytes} "
                "(limit max_env_value_bytes)",
            )
    if env_bytes > limits.max_env_bytes:
        yield FieldViolation(
            f"{where}.env",
            f"{env_bytes} bytes in all; at most {limits.max_env_bytes} (limit max_env_bytes)",
        )


_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")


def _scheduling_violations(t: types_pb2.TaskSpec, where: str, limits: Limits):
    if t.HasField("priority") and not 0 <= t.priority <= 100:
        yield FieldViolation(f"{where}.priority", f"must be in 0..100, got {t.priority}")
    if not 0 <= t.replicas <= limits.max_replicas:
        yield FieldViolation(
            f"{where}.replicas", f"must be in 0..{limits.max_replicas}, got {t.replicas}"
        )
    d = t.expected_duration
    if bad := _bad_duration(d):
        yield FieldViolation(f"{where}.expected_duration", bad)
    elif d.seconds < 0 or d.seconds > limits.max_timeout_seconds:
        yield FieldViolation(f"{where}.expected_duration", "must be between 0 and 30 days")
    n = limits.max_label_length
    for key, value in t.node_selector.items():
        if not 0 < len(key) <= n or not 0 < len(value) <= n:
            yield FieldViolation(
                f"{where}.node_selector.{key[:64]}", f"keys and values must be 1-{n} characters"
            )
    if len(t.affinity) > limits.max_affinity_terms:
        yield FieldViolation(
            f"{where}.affinity",
            f"{len(t.affinity)} expressions; at most {limits.max_affinity_terms}",
        )
        return
    for j, a in enumerate(t.affinity):
        at = f"{where}.affinity[{j}]"
        if not 0 < len(a.key) <= n:
            yield FieldViolation(f"{at}.key", f"must be 1-{n} characters")
        if a.operator not in _OPERATORS:
            yield FieldViolation(
                f"{at}.operator",
                f"unknown operator {a.operator[:32]!r}; use {', '.join(_OPERATORS)}",
            )
        elif a.operator in ("In", "NotIn") and not a.values:
            yield FieldViolation(f"{at}.values", f"{a.operator} needs at least one value")
        elif a.operator in ("Exists", "DoesNotExist") and a.values:
            yield FieldViolation(f"{at}.values", f"{a.operator} takes no values")
        if any(not 0 < len(v) <= n for v in a.values):
            yield FieldViolation(f"{at}.values", f"values must be 1-{n} characters")
        if not 0 <= a.weight <= 100:
            yield FieldViolation(f"{at}.weight", f"must be in 0..100, got {a.weight}")


def _bad_duration(d) -> str:
    """Why a Duration is malformed (nanos outside 0..999,999,999), or ""."""
    if not 0 <= d.nanos < 1_000_000_000:
        return f"nanos must be in 0..999999999, got {d.nanos}"
    return ""


def _find_cycle(spec: types_pb2.WorkflowSpec, index: dict[str, int]) -> list[str] | None:
    """Return one dependency cycle as a list of names (first == last), or None."""
    deps = {t.name: [d for d in t.depends_on if d in index and d != t.name] for t in spec.tasks}
    color: dict[str, int] = {}  # 1 = on the DFS stack, 2 = done
    for root in deps:
        if root in color:
            continue
        stack: list[tuple[str, int]] = [(root, 0)]
        path: list[str] = []
        while stack:
            node, i = stack.pop()
            if i == 0:
                color[node] = 1
                path.append(node)
            children = deps[node]
            if i < len(children):
                stack.append((node, i + 1))
                child = children[i]
                if color.get(child) == 1:
                    return [*path[path.index(child) :], child]
                if child not in color:
                    stack.append((child, 0))
            else:
                color[node] = 2
                path.pop()
    return None
