"""Checking requests at the door: names, edits, methods, engine settings.

Edits are checked with the engine's own torch-free rules (``requests.parse_request``), so a
bad record is refused at submission with the field that is wrong, and nothing is queued. Checks
that need the model's tokenizer (a prompt longer than its context) happen in the worker and end
the job FAILED with the same kind of field violations.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format

from editfleet.v1 import editfleet_pb2 as pb
from editfleet.workers.editing.config import EditConfig
from editfleet.workers.editing.requests import parse_request
from editfleet.workers.store import is_checkpoint_id, validate_model_name

from .errors import ApiError, invalid

MAX_REQUEST_ID = 128
METHODS = {pb.METHOD_UNSPECIFIED: "alphaedit", pb.ALPHAEDIT: "alphaedit", pb.MEMIT: "memit"}
METHOD_ENUMS = {"alphaedit": pb.ALPHAEDIT, "memit": pb.MEMIT}
_SETTINGS = {f.name: f for f in dataclasses.fields(EditConfig) if f.name != "method"}
_CHECKPOINT_NAME = re.compile(r"^models/([^/]+)/checkpoints/([^/]+)$")


@dataclass(frozen=True)
class CheckpointRef:
    """A parsed checkpoint reference: model may be empty for a bare id; id empty means the head."""

    model: str
    id: str


def model_from_name(value: str, field: str) -> str:
    """``models/{model}`` (or a bare model name) -> the model name."""
    name = value.removeprefix("models/")
    if not value:
        raise invalid([(field, "is required")])
    try:
        validate_model_name(name)
    except ValueError as e:
        raise invalid([(field, f"{value!r} is not a model name ({e})")]) from None
    return name


def checkpoint_ref(value: str, field: str, allow_model: bool = False) -> CheckpointRef:
    """``models/{m}/checkpoints/{id}``, a bare id, or (``allow_model``) ``models/{m}`` for its head."""
    if not value:
        raise invalid([(field, "is required")])
    match = _CHECKPOINT_NAME.match(value)
    if match:
        model, ckpt = model_from_name(match.group(1), field), match.group(2)
    elif allow_model and value.startswith("models/") and value.count("/") == 1:
        return CheckpointRef(model_from_name(value, field), "")
    else:
        model, ckpt = "", value
    if not is_checkpoint_id(ckpt):
        expected = "models/{model}/checkpoints/{id}" + (" or models/{model}" if allow_model else "")
        raise invalid([(field, f"{value!r} is not a checkpoint name ({expected}; id: 16 hex digits or 'base')")])
    return CheckpointRef(model, ckpt)


def job_id(value: str, field: str = "name") -> str:
    job = value.removeprefix("jobs/")
    if not re.fullmatch(r"[0-9a-f]{16}", job):
        raise invalid([(field, f"{value!r} is not a job name (jobs/{{16 hex digits}})")])
    return job


def edit_to_record(edit: pb.Edit) -> dict[str, Any]:
    record: dict[str, Any] = {
        "prompt": edit.prompt, "subject": edit.subject, "target_new": edit.target_new,
        "paraphrases": list(edit.paraphrases), "neighbors": list(edit.neighbors), "record_id": edit.record_id,
    }
    if edit.HasField("target_true"):
        record["target_true"] = edit.target_true
    return record


def coerce_settings(settings: dict[str, Any], field: str) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Engine-setting overrides from a Struct (whose numbers are all doubles) to their real types."""
    out, violations = {}, []
    for key, value in settings.items():
        path = f"{field}.{key}"
        spec = _SETTINGS.get(key)
        if spec is None:
            known = ", ".join(sorted(_SETTINGS))
            violations.append((path, f"is not an engine setting (known: {known})"))
            continue
        default = spec.default
        try:
            out[key] = _coerce(value, default)
        except (TypeError, ValueError) as e:
            violations.append((path, str(e)))
    if not violations:
        try:
            EditConfig(**out)
        except (TypeError, ValueError) as e:
            violations.append((field, str(e)))
    return out, violations


def _coerce(value: Any, default: Any) -> Any:
    def integer(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or float(v) != int(v):
            raise ValueError(f"must be an integer, got {v!r}")
        return int(v)

    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        return integer(value)
    if default is None and value is None:  # an optional setting turned off (Struct null)
        return None
    if isinstance(default, float) or default is None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"must be a number, got {value!r}")
        return float(value)
    if isinstance(default, tuple):
        if not isinstance(value, list):
            raise ValueError(f"must be a list of integers, got {value!r}")
        return [integer(v) for v in value]
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {value!r}")
    return value


@dataclass(frozen=True)
class Submission:
    """A validated SubmitEditJob request, in the job store's terms."""

    request_id: str
    model: str
    base: CheckpointRef | None
    edits: list[dict[str, Any]]
    method: str
    options: dict[str, Any]


def check_submit(request: pb.SubmitEditJobRequest, max_edits: int) -> Submission:
    """Every INVALID_ARGUMENT problem of a submission at once (existence is checked by the caller)."""
    violations: list[tuple[str, str]] = []
    if len(request.request_id) > MAX_REQUEST_ID:
        violations.append(("request_id", f"is {len(request.request_id)} characters, limit {MAX_REQUEST_ID}"))
    elif request.request_id and not request.request_id.isprintable():
        violations.append(("request_id", "must be printable characters"))
    model = ""
    try:
        model = model_from_name(request.model, "model")
    except ApiError as e:
        violations.extend(e.violations)
    base = None
    if request.base_checkpoint:
        try:
            base = checkpoint_ref(request.base_checkpoint, "base_checkpoint")
        except ApiError as e:
            violations.extend(e.violations)
    if not request.edits:
        violations.append(("edits", "at least one edit is required"))
    elif len(request.edits) > max_edits:
        violations.append(("edits", f"{len(request.edits)} edits in one job, limit {max_edits}"))
    edits = []
    for i, edit in enumerate(request.edits[:max_edits]):
        record = edit_to_record(edit)
        parsed, problems = parse_request(record, i)
        violations.extend((f"edits[{i}].{v.field}" if v.field else f"edits[{i}]", v.description) for v in problems)
        if parsed is not None:
            edits.append(dataclasses.asdict(parsed))
    method = METHODS.get(request.method)
    if method is None:
        violations.append(("method", f"unknown method value {request.method}"))
    settings: dict[str, Any] = {}
    if request.options.HasField("engine_settings"):
        raw = json_format.MessageToDict(request.options.engine_settings)
        settings, problems = coerce_settings(raw, "options.engine_settings")
        violations.extend(problems)
    options: dict[str, Any] = {"engine_settings": settings} if settings else {}
    if request.options.HasField("max_perplexity_increase"):
        limit = request.options.max_perplexity_increase
        if not math.isfinite(limit) or limit <= 0:
            violations.append(("options.max_perplexity_increase",
                               f"must be a positive fraction (0.1 = +10% perplexity), got {limit}"))
        options["max_perplexity_increase"] = limit
    if violations:
        raise invalid(violations, "edit job")
    return Submission(request.request_id, model, base, edits, method, options)

