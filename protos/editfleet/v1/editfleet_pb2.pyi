import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Method(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    METHOD_UNSPECIFIED: _ClassVar[Method]
    ALPHAEDIT: _ClassVar[Method]
    MEMIT: _ClassVar[Method]
METHOD_UNSPECIFIED: Method
ALPHAEDIT: Method
MEMIT: Method

class Edit(_message.Message):
    __slots__ = ("prompt", "subject", "target_new", "target_true", "paraphrases", "neighbors", "record_id")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    TARGET_NEW_FIELD_NUMBER: _ClassVar[int]
    TARGET_TRUE_FIELD_NUMBER: _ClassVar[int]
    PARAPHRASES_FIELD_NUMBER: _ClassVar[int]
    NEIGHBORS_FIELD_NUMBER: _ClassVar[int]
    RECORD_ID_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    subject: str
    target_new: str
    target_true: str
    paraphrases: _containers.RepeatedScalarFieldContainer[str]
    neighbors: _containers.RepeatedScalarFieldContainer[str]
    record_id: str
    def __init__(self, prompt: _Optional[str] = ..., subject: _Optional[str] = ..., target_new: _Optional[str] = ..., target_true: _Optional[str] = ..., paraphrases: _Optional[_Iterable[str]] = ..., neighbors: _Optional[_Iterable[str]] = ..., record_id: _Optional[str] = ...) -> None: ...

class EditOptions(_message.Message):
    __slots__ = ("engine_settings", "max_perplexity_increase")
    ENGINE_SETTINGS_FIELD_NUMBER: _ClassVar[int]
    MAX_PERPLEXITY_INCREASE_FIELD_NUMBER: _ClassVar[int]
    engine_settings: _struct_pb2.Struct
    max_perplexity_increase: float
    def __init__(self, engine_settings: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., max_perplexity_increase: _Optional[float] = ...) -> None: ...

class FieldViolation(_message.Message):
    __slots__ = ("field", "description")
    FIELD_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    field: str
    description: str
    def __init__(self, field: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class JobError(_message.Message):
    __slots__ = ("message", "field_violations")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FIELD_VIOLATIONS_FIELD_NUMBER: _ClassVar[int]
    message: str
    field_violations: _containers.RepeatedCompositeFieldContainer[FieldViolation]
    def __init__(self, message: _Optional[str] = ..., field_violations: _Optional[_Iterable[_Union[FieldViolation, _Mapping]]] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("name", "request_id", "model", "base_checkpoint", "edits", "method", "options", "state", "progress", "error", "checkpoint", "parent_checkpoint", "create_time", "start_time", "end_time", "attempts", "batch")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[Job.State]
        QUEUED: _ClassVar[Job.State]
        RUNNING: _ClassVar[Job.State]
        SUCCEEDED: _ClassVar[Job.State]
        FAILED: _ClassVar[Job.State]
        CANCELLED: _ClassVar[Job.State]
    STATE_UNSPECIFIED: Job.State
    QUEUED: Job.State
    RUNNING: Job.State
    SUCCEEDED: Job.State
    FAILED: Job.State
    CANCELLED: Job.State
    NAME_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BASE_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    EDITS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    PARENT_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    name: str
    request_id: str
    model: str
    base_checkpoint: str
    edits: _containers.RepeatedCompositeFieldContainer[Edit]
    method: Method
    options: EditOptions
    state: Job.State
    progress: JobEvent
    error: JobError
    checkpoint: str
    parent_checkpoint: str
    create_time: _timestamp_pb2.Timestamp
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    attempts: int
    batch: str
    def __init__(self, name: _Optional[str] = ..., request_id: _Optional[str] = ..., model: _Optional[str] = ..., base_checkpoint: _Optional[str] = ..., edits: _Optional[_Iterable[_Union[Edit, _Mapping]]] = ..., method: _Optional[_Union[Method, str]] = ..., options: _Optional[_Union[EditOptions, _Mapping]] = ..., state: _Optional[_Union[Job.State, str]] = ..., progress: _Optional[_Union[JobEvent, _Mapping]] = ..., error: _Optional[_Union[JobError, _Mapping]] = ..., checkpoint: _Optional[str] = ..., parent_checkpoint: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., attempts: _Optional[int] = ..., batch: _Optional[str] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("job", "state", "stage", "current", "total", "message", "time", "checkpoint")
    class Stage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STAGE_UNSPECIFIED: _ClassVar[JobEvent.Stage]
        QUEUED: _ClassVar[JobEvent.Stage]
        DISPATCHED: _ClassVar[JobEvent.Stage]
        LOADING: _ClassVar[JobEvent.Stage]
        MATERIALIZING: _ClassVar[JobEvent.Stage]
        STATISTICS: _ClassVar[JobEvent.Stage]
        TARGETS: _ClassVar[JobEvent.Stage]
        LAYER: _ClassVar[JobEvent.Stage]
        EVALUATING: _ClassVar[JobEvent.Stage]
        WRITING: _ClassVar[JobEvent.Stage]
        DONE: _ClassVar[JobEvent.Stage]
        FAILED: _ClassVar[JobEvent.Stage]
        CANCELLED: _ClassVar[JobEvent.Stage]
    STAGE_UNSPECIFIED: JobEvent.Stage
    QUEUED: JobEvent.Stage
    DISPATCHED: JobEvent.Stage
    LOADING: JobEvent.Stage
    MATERIALIZING: JobEvent.Stage
    STATISTICS: JobEvent.Stage
    TARGETS: JobEvent.Stage
    LAYER: JobEvent.Stage
    EVALUATING: JobEvent.Stage
    WRITING: JobEvent.Stage
    DONE: JobEvent.Stage
    FAILED: JobEvent.Stage
    CANCELLED: JobEvent.Stage
    JOB_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    job: str
    state: Job.State
    stage: JobEvent.Stage
    current: int
    total: int
    message: str
    time: _timestamp_pb2.Timestamp
    checkpoint: str
    def __init__(self, job: _Optional[str] = ..., state: _Optional[_Union[Job.State, str]] = ..., stage: _Optional[_Union[JobEvent.Stage, str]] = ..., current: _Optional[int] = ..., total: _Optional[int] = ..., message: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., checkpoint: _Optional[str] = ...) -> None: ...

class SubmitEditJobRequest(_message.Message):
    __slots__ = ("request_id", "model", "base_checkpoint", "edits", "method", "options")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BASE_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    EDITS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    base_checkpoint: str
    edits: _containers.RepeatedCompositeFieldContainer[Edit]
    method: Method
    options: EditOptions
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., base_checkpoint: _Optional[str] = ..., edits: _Optional[_Iterable[_Union[Edit, _Mapping]]] = ..., method: _Optional[_Union[Method, str]] = ..., options: _Optional[_Union[EditOptions, _Mapping]] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("model", "page_size", "page_token")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    model: str
    page_size: int
    page_token: str
    def __init__(self, model: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class Model(_message.Message):
    __slots__ = ("name", "head", "source", "checkpoint_count")
    NAME_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_COUNT_FIELD_NUMBER: _ClassVar[int]
    name: str
    head: str
    source: str
    checkpoint_count: int
    def __init__(self, name: _Optional[str] = ..., head: _Optional[str] = ..., source: _Optional[str] = ..., checkpoint_count: _Optional[int] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[Model]
    def __init__(self, models: _Optional[_Iterable[_Union[Model, _Mapping]]] = ...) -> None: ...

class Artifact(_message.Message):
    __slots__ = ("path", "sha256", "size_bytes")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    path: str
    sha256: str
    size_bytes: int
    def __init__(self, path: _Optional[str] = ..., sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class Checkpoint(_message.Message):
    __slots__ = ("name", "id", "model", "parent", "edits", "method", "engine_settings", "engine_version", "scores", "create_time", "content_digest", "artifacts", "head", "protected_prompts")
    class ScoresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    EDITS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    ENGINE_SETTINGS_FIELD_NUMBER: _ClassVar[int]
    ENGINE_VERSION_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    CONTENT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    PROTECTED_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    id: str
    model: str
    parent: str
    edits: _containers.RepeatedCompositeFieldContainer[Edit]
    method: Method
    engine_settings: _struct_pb2.Struct
    engine_version: str
    scores: _containers.ScalarMap[str, float]
    create_time: _timestamp_pb2.Timestamp
    content_digest: str
    artifacts: _containers.RepeatedCompositeFieldContainer[Artifact]
    head: bool
    protected_prompts: str
    def __init__(self, name: _Optional[str] = ..., id: _Optional[str] = ..., model: _Optional[str] = ..., parent: _Optional[str] = ..., edits: _Optional[_Iterable[_Union[Edit, _Mapping]]] = ..., method: _Optional[_Union[Method, str]] = ..., engine_settings: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., engine_version: _Optional[str] = ..., scores: _Optional[_Mapping[str, float]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., content_digest: _Optional[str] = ..., artifacts: _Optional[_Iterable[_Union[Artifact, _Mapping]]] = ..., head: _Optional[bool] = ..., protected_prompts: _Optional[str] = ...) -> None: ...

class GetCheckpointRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListCheckpointsRequest(_message.Message):
    __slots__ = ("parent", "page_size", "page_token")
    PARENT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    parent: str
    page_size: int
    page_token: str
    def __init__(self, parent: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListCheckpointsResponse(_message.Message):
    __slots__ = ("checkpoints", "next_page_token")
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    checkpoints: _containers.RepeatedCompositeFieldContainer[Checkpoint]
    next_page_token: str
    def __init__(self, checkpoints: _Optional[_Iterable[_Union[Checkpoint, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class SetHeadRequest(_message.Message):
    __slots__ = ("name", "checkpoint")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    name: str
    checkpoint: str
    def __init__(self, name: _Optional[str] = ..., checkpoint: _Optional[str] = ...) -> None: ...

class ExportCheckpointRequest(_message.Message):
    __slots__ = ("name", "output_dir")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DIR_FIELD_NUMBER: _ClassVar[int]
    name: str
    output_dir: str
    def __init__(self, name: _Optional[str] = ..., output_dir: _Optional[str] = ...) -> None: ...

class ExportCheckpointResponse(_message.Message):
    __slots__ = ("checkpoint", "output_dir", "files")
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DIR_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    checkpoint: str
    output_dir: str
    files: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, checkpoint: _Optional[str] = ..., output_dir: _Optional[str] = ..., files: _Optional[_Iterable[str]] = ...) -> None: ...

class QueryRequest(_message.Message):
    __slots__ = ("checkpoint", "prompts", "targets", "top_k")
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    checkpoint: str
    prompts: _containers.RepeatedScalarFieldContainer[str]
    targets: _containers.RepeatedScalarFieldContainer[str]
    top_k: int
    def __init__(self, checkpoint: _Optional[str] = ..., prompts: _Optional[_Iterable[str]] = ..., targets: _Optional[_Iterable[str]] = ..., top_k: _Optional[int] = ...) -> None: ...

class TokenProbability(_message.Message):
    __slots__ = ("token", "token_id", "probability")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    token: str
    token_id: int
    probability: float
    def __init__(self, token: _Optional[str] = ..., token_id: _Optional[int] = ..., probability: _Optional[float] = ...) -> None: ...

class TargetProbability(_message.Message):
    __slots__ = ("target", "probability", "log_probability")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    LOG_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    target: str
    probability: float
    log_probability: float
    def __init__(self, target: _Optional[str] = ..., probability: _Optional[float] = ..., log_probability: _Optional[float] = ...) -> None: ...

class PromptResult(_message.Message):
    __slots__ = ("prompt", "top_tokens", "targets")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    TOP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    top_tokens: _containers.RepeatedCompositeFieldContainer[TokenProbability]
    targets: _containers.RepeatedCompositeFieldContainer[TargetProbability]
    def __init__(self, prompt: _Optional[str] = ..., top_tokens: _Optional[_Iterable[_Union[TokenProbability, _Mapping]]] = ..., targets: _Optional[_Iterable[_Union[TargetProbability, _Mapping]]] = ...) -> None: ...

class QueryResponse(_message.Message):
    __slots__ = ("checkpoint", "results")
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    checkpoint: str
    results: _containers.RepeatedCompositeFieldContainer[PromptResult]
    def __init__(self, checkpoint: _Optional[str] = ..., results: _Optional[_Iterable[_Union[PromptResult, _Mapping]]] = ...) -> None: ...
