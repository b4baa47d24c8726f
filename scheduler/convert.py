"""Internal records -> API messages."""

from __future__ import annotations

from typing import Any

from google.protobuf.struct_pb2 import Struct
from google.protobuf.timestamp_pb2 import Timestamp

from editfleet.v1 import editfleet_pb2 as pb
from editfleet.workers.store import BASE, CheckpointRecord

from .events import Event
from .jobstore import JobRecord
from .validation import METHOD_ENUMS


def checkpoint_name(model: str, ckpt_id: str) -> str:
    return f"models/{model}/checkpoints/{ckpt_id}"


def _timestamp(seconds: float | None) -> Timestamp | None:
    if seconds is None:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def _struct(value: dict[str, Any]) -> Struct:
    s = Struct()
    s.update(value)
    return s


def edit_message(record: dict[str, Any]) -> pb.Edit:
    edit = pb.Edit(prompt=record["prompt"], subject=record["subject"], target_new=record["target_new"],
                   paraphrases=record.get("paraphrases", ()), neighbors=record.get("neighbors", ()),
                   record_id=record.get("record_id", ""))
    if record.get("target_true") is not None:
        edit.target_true = record["target_true"]
    return edit


def event_message(event: Event) -> pb.JobEvent:
    return pb.JobEvent(job=f"jobs/{event.job}", state=pb.Job.State.Value(event.state),
                       stage=pb.JobEvent.Stage.Value(event.stage), current=event.current, total=event.total,
                       message=event.message, time=_timestamp(event.time), checkpoint=event.checkpoint)


def job_event(job: JobRecord, latest: Event | None) -> Event:
    """The job's progress: the live event while it runs, else what the queue recorded."""
    if latest is not None and latest.state == job.state:
        return latest
    checkpoint = checkpoint_name(job.model, job.checkpoint) if job.checkpoint else ""
    when = job.end_time or job.start_time or job.create_time
    return Event(job=job.id, state=job.state, stage=job.stage, message=job.message, checkpoint=checkpoint, time=when)


def job_message(job: JobRecord, latest: Event | None = None) -> pb.Job:
    options = pb.EditOptions()
    if job.options.get("engine_settings"):
        options.engine_settings.CopyFrom(_struct(job.options["engine_settings"]))
    if job.options.get("max_perplexity_increase") is not None:
        options.max_perplexity_increase = job.options["max_perplexity_increase"]
    msg = pb.Job(
        name=f"jobs/{job.id}", request_id=job.request_id, model=f"models/{job.model}",
        base_checkpoint=checkpoint_name(job.model, job.base_checkpoint) if job.base_checkpoint else "",
        edits=[edit_message(e) for e in job.edits], method=METHOD_ENUMS[job.method], options=options,
        state=pb.Job.State.Value(job.state), progress=event_message(job_event(job, latest)),
        checkpoint=checkpoint_name(job.model, job.checkpoint) if job.checkpoint else "",
        parent_checkpoint=checkpoint_name(job.model, job.parent_checkpoint) if job.parent_checkpoint else "",
        create_time=_timestamp(job.create_time), start_time=_timestamp(job.start_time),
        end_time=_timestamp(job.end_time), attempts=job.attempts, batch=job.batch,
    )
    if job.error:
        msg.error.message = job.error.get("message", "")
        msg.error.field_violations.extend(pb.FieldViolation(field=f, description=d)
                                          for f, d in job.error.get("violations", ()))
    return msg


def checkpoint_message(record: CheckpointRecord, head: str) -> pb.Checkpoint:
    meta = record.meta
    return pb.Checkpoint(
        name=checkpoint_name(record.model, record.id), id=record.id, model=f"models/{record.model}",
        parent=checkpoint_name(record.model, record.parent), edits=[edit_message(e) for e in meta["edits"]],
        method=METHOD_ENUMS[meta["method"]], engine_settings=_struct(meta["engine_settings"]),
        engine_version=meta["engine_version"], scores={k: float(v) for k, v in meta.get("scores", {}).items()},
        create_time=_timestamp(meta["created"]), content_digest=meta["content_digest"],
        artifacts=[pb.Artifact(path=name, sha256=a["sha256"], size_bytes=a["size_bytes"])
                   for name, a in sorted(record.artifacts.items())],
        head=record.id == head, protected_prompts=meta.get("protected_prompts", ""),
    )


def model_message(name: str, source: str, head: str, count: int) -> pb.Model:
    return pb.Model(name=f"models/{name}", head=checkpoint_name(name, head or BASE), source=source,
                    checkpoint_count=count)

