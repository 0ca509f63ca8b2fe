import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from tether.api.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AttemptRef(_message.Message):
    __slots__ = ("run_id", "task", "attempt")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    task: str
    attempt: int
    def __init__(self, run_id: _Optional[str] = ..., task: _Optional[str] = ..., attempt: _Optional[int] = ...) -> None: ...

class AgentMessage(_message.Message):
    __slots__ = ("register", "heartbeat", "status", "event", "log_chunk", "proof", "batch")
    REGISTER_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    LOG_CHUNK_FIELD_NUMBER: _ClassVar[int]
    PROOF_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    register: Register
    heartbeat: Heartbeat
    status: TaskStatus
    event: TaskEventReport
    log_chunk: LogChunk
    proof: NodeProof
    batch: AgentBatch
    def __init__(self, register: _Optional[_Union[Register, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., status: _Optional[_Union[TaskStatus, _Mapping]] = ..., event: _Optional[_Union[TaskEventReport, _Mapping]] = ..., log_chunk: _Optional[_Union[LogChunk, _Mapping]] = ..., proof: _Optional[_Union[NodeProof, _Mapping]] = ..., batch: _Optional[_Union[AgentBatch, _Mapping]] = ...) -> None: ...

class AgentBatch(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[AgentMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[AgentMessage, _Mapping]]] = ...) -> None: ...

class TaskEventReport(_message.Message):
    __slots__ = ("ref", "event")
    REF_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    ref: AttemptRef
    event: _types_pb2.TaskEvent
    def __init__(self, ref: _Optional[_Union[AttemptRef, _Mapping]] = ..., event: _Optional[_Union[_types_pb2.TaskEvent, _Mapping]] = ...) -> None: ...

class LogChunk(_message.Message):
    __slots__ = ("stream_id", "stream", "data", "eof", "error")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    EOF_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    stream_id: str
    stream: str
    data: bytes
    eof: bool
    error: str
    def __init__(self, stream_id: _Optional[str] = ..., stream: _Optional[str] = ..., data: _Optional[bytes] = ..., eof: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...

class Register(_message.Message):
    __slots__ = ("node", "capacity", "gpus", "labels", "agent_version", "runtime", "running", "pending_reports", "max_tasks", "node_id", "certificate", "disconnect_grace", "draining", "address", "free_port", "batches")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NODE_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    PENDING_REPORTS_FIELD_NUMBER: _ClassVar[int]
    MAX_TASKS_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    DISCONNECT_GRACE_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    FREE_PORT_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    node: str
    capacity: _types_pb2.Resources
    gpus: _containers.RepeatedCompositeFieldContainer[_types_pb2.Gpu]
    labels: _containers.ScalarMap[str, str]
    agent_version: str
    runtime: str
    running: _containers.RepeatedCompositeFieldContainer[AttemptRef]
    pending_reports: _containers.RepeatedCompositeFieldContainer[TaskStatus]
    max_tasks: int
    node_id: str
    certificate: bytes
    disconnect_grace: _duration_pb2.Duration
    draining: bool
    address: str
    free_port: int
    batches: bool
    def __init__(self, node: _Optional[str] = ..., capacity: _Optional[_Union[_types_pb2.Resources, _Mapping]] = ..., gpus: _Optional[_Iterable[_Union[_types_pb2.Gpu, _Mapping]]] = ..., labels: _Optional[_Mapping[str, str]] = ..., agent_version: _Optional[str] = ..., runtime: _Optional[str] = ..., running: _Optional[_Iterable[_Union[AttemptRef, _Mapping]]] = ..., pending_reports: _Optional[_Iterable[_Union[TaskStatus, _Mapping]]] = ..., max_tasks: _Optional[int] = ..., node_id: _Optional[str] = ..., certificate: _Optional[bytes] = ..., disconnect_grace: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., draining: _Optional[bool] = ..., address: _Optional[str] = ..., free_port: _Optional[int] = ..., batches: _Optional[bool] = ...) -> None: ...

class NodeChallenge(_message.Message):
    __slots__ = ("challenge",)
    CHALLENGE_FIELD_NUMBER: _ClassVar[int]
    challenge: bytes
    def __init__(self, challenge: _Optional[bytes] = ...) -> None: ...

class NodeProof(_message.Message):
    __slots__ = ("signature",)
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    signature: bytes
    def __init__(self, signature: _Optional[bytes] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("seq", "running", "draining", "free_port")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    FREE_PORT_FIELD_NUMBER: _ClassVar[int]
    seq: int
    running: _containers.RepeatedCompositeFieldContainer[AttemptRef]
    draining: bool
    free_port: int
    def __init__(self, seq: _Optional[int] = ..., running: _Optional[_Iterable[_Union[AttemptRef, _Mapping]]] = ..., draining: _Optional[bool] = ..., free_port: _Optional[int] = ...) -> None: ...

class TaskStatus(_message.Message):
    __slots__ = ("ref", "state", "exit_code", "reason", "message", "outputs_json", "started_at", "finished_at", "stdout_tail", "stderr_tail")
    REF_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_JSON_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    STDOUT_TAIL_FIELD_NUMBER: _ClassVar[int]
    STDERR_TAIL_FIELD_NUMBER: _ClassVar[int]
    ref: AttemptRef
    state: _types_pb2.TaskState
    exit_code: int
    reason: str
    message: str
    outputs_json: str
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    stdout_tail: str
    stderr_tail: str
    def __init__(self, ref: _Optional[_Union[AttemptRef, _Mapping]] = ..., state: _Optional[_Union[_types_pb2.TaskState, str]] = ..., exit_code: _Optional[int] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ..., outputs_json: _Optional[str] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., stdout_tail: _Optional[str] = ..., stderr_tail: _Optional[str] = ...) -> None: ...

class ControllerMessage(_message.Message):
    __slots__ = ("registered", "assign", "cancel", "ack", "logs", "logs_cancel", "challenge", "heartbeat_ack", "batch")
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    ASSIGN_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    LOGS_FIELD_NUMBER: _ClassVar[int]
    LOGS_CANCEL_FIELD_NUMBER: _ClassVar[int]
    CHALLENGE_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_ACK_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    registered: Registered
    assign: AssignTask
    cancel: CancelTask
    ack: StatusAck
    logs: LogRequest
    logs_cancel: LogCancel
    challenge: NodeChallenge
    heartbeat_ack: HeartbeatAck
    batch: ControllerBatch
    def __init__(self, registered: _Optional[_Union[Registered, _Mapping]] = ..., assign: _Optional[_Union[AssignTask, _Mapping]] = ..., cancel: _Optional[_Union[CancelTask, _Mapping]] = ..., ack: _Optional[_Union[StatusAck, _Mapping]] = ..., logs: _Optional[_Union[LogRequest, _Mapping]] = ..., logs_cancel: _Optional[_Union[LogCancel, _Mapping]] = ..., challenge: _Optional[_Union[NodeChallenge, _Mapping]] = ..., heartbeat_ack: _Optional[_Union[HeartbeatAck, _Mapping]] = ..., batch: _Optional[_Union[ControllerBatch, _Mapping]] = ...) -> None: ...

class ControllerBatch(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ControllerMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[ControllerMessage, _Mapping]]] = ...) -> None: ...

class HeartbeatAck(_message.Message):
    __slots__ = ("seq",)
    SEQ_FIELD_NUMBER: _ClassVar[int]
    seq: int
    def __init__(self, seq: _Optional[int] = ...) -> None: ...

class LogRequest(_message.Message):
    __slots__ = ("stream_id", "ref", "follow")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    REF_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    stream_id: str
    ref: AttemptRef
    follow: bool
    def __init__(self, stream_id: _Optional[str] = ..., ref: _Optional[_Union[AttemptRef, _Mapping]] = ..., follow: _Optional[bool] = ...) -> None: ...

class LogCancel(_message.Message):
    __slots__ = ("stream_id",)
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    stream_id: str
    def __init__(self, stream_id: _Optional[str] = ...) -> None: ...

class Registered(_message.Message):
    __slots__ = ("heartbeat_interval", "lease_ttl", "batches")
    HEARTBEAT_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    heartbeat_interval: _duration_pb2.Duration
    lease_ttl: _duration_pb2.Duration
    batches: bool
    def __init__(self, heartbeat_interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., lease_ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., batches: _Optional[bool] = ...) -> None: ...

class AssignTask(_message.Message):
    __slots__ = ("ref", "spec", "upstream_outputs", "gpu_indices", "traceparent", "params", "secret_env")
    class UpstreamOutputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class SecretEnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REF_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    GPU_INDICES_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    SECRET_ENV_FIELD_NUMBER: _ClassVar[int]
    ref: AttemptRef
    spec: _types_pb2.TaskSpec
    upstream_outputs: _containers.ScalarMap[str, str]
    gpu_indices: _containers.RepeatedScalarFieldContainer[int]
    traceparent: str
    params: _containers.ScalarMap[str, str]
    secret_env: _containers.ScalarMap[str, str]
    def __init__(self, ref: _Optional[_Union[AttemptRef, _Mapping]] = ..., spec: _Optional[_Union[_types_pb2.TaskSpec, _Mapping]] = ..., upstream_outputs: _Optional[_Mapping[str, str]] = ..., gpu_indices: _Optional[_Iterable[int]] = ..., traceparent: _Optional[str] = ..., params: _Optional[_Mapping[str, str]] = ..., secret_env: _Optional[_Mapping[str, str]] = ...) -> None: ...

class CancelTask(_message.Message):
    __slots__ = ("ref", "reason", "grace", "requeue")
    REF_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    GRACE_FIELD_NUMBER: _ClassVar[int]
    REQUEUE_FIELD_NUMBER: _ClassVar[int]
    ref: AttemptRef
    reason: str
    grace: _duration_pb2.Duration
    requeue: bool
    def __init__(self, ref: _Optional[_Union[AttemptRef, _Mapping]] = ..., reason: _Optional[str] = ..., grace: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., requeue: _Optional[bool] = ...) -> None: ...

class StatusAck(_message.Message):
    __slots__ = ("ref",)
    REF_FIELD_NUMBER: _ClassVar[int]
    ref: AttemptRef
    def __init__(self, ref: _Optional[_Union[AttemptRef, _Mapping]] = ...) -> None: ...
