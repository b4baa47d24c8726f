"""The EditService implementation (see protos/editfleet/v1/editfleet.proto for the contract)."""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator

import grpc

from editfleet.v1 import editfleet_pb2 as pb
from editfleet.workers.editing.requests import MAX_TEXT_CHARS
from editfleet.workers.executor import WorkerDied
from editfleet.workers.store import BASE, CheckpointNotFound, CheckpointStore, CorruptArtifact, canonical_json, sha256

from . import convert
from .config import SchedulerConfig
from .dispatcher import Busy, Dispatcher
from .errors import ApiError, failed_precondition, invalid, not_found
from .events import Event, EventBus
from .jobstore import CANCELLED, QUEUED, RUNNING, JobStore
from .logs import job_logger
from .pool import WorkerPool
from .validation import CheckpointRef, check_submit, checkpoint_ref, job_id, model_from_name

MAX_QUERY_PROMPTS = 64
MAX_QUERY_TARGETS = 16
MAX_TOP_K = 50


class EditService:
    """One method per RPC; each raises ``ApiError`` for anything the caller got wrong."""

    def __init__(self, config: SchedulerConfig, jobs: JobStore, store: CheckpointStore, bus: EventBus,
                 pool: WorkerPool, dispatcher: Dispatcher, stopping: Callable[[], bool]):
        self.config, self.jobs, self.store, self.bus = config, jobs, store, bus
        self.pool, self.dispatcher, self.stopping = pool, dispatcher, stopping

    # -- jobs ------------------------------------------------------------------------------------

    def SubmitEditJob(self, request: pb.SubmitEditJobRequest, context: grpc.ServicerContext) -> pb.Job:
        sub = check_submit(request, self.config.max_edits_per_job)
        self._served(sub.model, "model")
        base = ""
        if sub.base is not None:
            base = self._existing_checkpoint(sub.base, sub.model, "base_checkpoint")
        digest = sha256(canonical_json({"model": sub.model, "base": base, "edits": sub.edits,
                                        "method": sub.method, "options": sub.options}))
        job, created = self.jobs.submit(request_id=sub.request_id, request_digest=digest, model=sub.model,
                                        base_checkpoint=base, edits=sub.edits, method=sub.method, options=sub.options)
        if not created and job.request_digest != digest:
            raise ApiError(grpc.StatusCode.ALREADY_EXISTS,
                           f"request_id {sub.request_id!r} was used by jobs/{job.id} for a different request",
                           [("request_id", f"already used by jobs/{job.id} with different content")])
        if created:
            self.bus.publish(Event(job=job.id, state=QUEUED, stage="QUEUED"))
            job_logger(job.id, job.model, base).info("job accepted", edits=len(job.edits), method=job.method,
                                                     request_id=job.request_id)
            self.dispatcher.wake()
        return convert.job_message(job, self.bus.latest(job.id))

    def GetJob(self, request: pb.GetJobRequest, context: grpc.ServicerContext) -> pb.Job:
        job = self._job(request.name)
        return convert.job_message(job, self.bus.latest(job.id))

    def ListJobs(self, request: pb.ListJobsRequest, context: grpc.ServicerContext) -> pb.ListJobsResponse:
        model = model_from_name(request.model, "model") if request.model else ""
        size = _page_size(request.page_size, 50)
        before = None
        if request.page_token:
            if not request.page_token.isdigit():
                raise invalid([("page_token", "is not a token returned by ListJobs")])
            before = int(request.page_token)
        page = self.jobs.list(model, size + 1, before)
        more = len(page) > size
        page = page[:size]
        return pb.ListJobsResponse(jobs=[convert.job_message(j, self.bus.latest(j.id)) for j in page],
                                   next_page_token=str(page[-1].seq) if more else "")

    def CancelJob(self, request: pb.CancelJobRequest, context: grpc.ServicerContext) -> pb.Job:
        job = self._job(request.name)
        if job.state == RUNNING:
            raise failed_precondition(f"jobs/{job.id} is running; only queued jobs can be cancelled", "name")
        if job.state != QUEUED or not self.dispatcher.cancel(job.id):
            job = self.jobs.get(job.id)
            if job.state != CANCELLED:
                raise failed_precondition(f"jobs/{job.id} is {job.state}; only queued jobs can be cancelled", "name")
        return convert.job_message(self.jobs.get(job.id), self.bus.latest(job.id))

    def WatchJob(self, request: pb.WatchJobRequest, context: grpc.ServicerContext) -> Iterator[pb.JobEvent]:
        job = self._job(request.name)
        cursor = self.bus.cursor()
        job = self.jobs.get(job.id)
        yield convert.event_message(convert.job_event(job, self.bus.latest(job.id)))
        if job.terminal:
            return
        while context.is_active() and not self.stopping():
            events = self.bus.wait(job.id, cursor, timeout=1.0)
            for event in events:
                yield convert.event_message(event)
                cursor = event.seq
                if event.terminal:
                    return
            if not events:
                if self.stopping():  # the queue closes once the server has stopped
                    break
                job = self.jobs.get(job.id)
                if job.terminal:  # ended without a live event (e.g. failed at recovery)
                    yield convert.event_message(convert.job_event(job, None))
                    return
        if self.stopping():
            # Not OK: a stream that ends without a terminal event would read as a finished job.
            raise ApiError(grpc.StatusCode.UNAVAILABLE, f"the scheduler is stopping; {request.name} keeps its "
                           "state in the queue and resumes when it starts again: watch it again then")

    # -- models and checkpoints ---------------------------------------------------------------

    def GetModel(self, request: pb.GetModelRequest, context: grpc.ServicerContext) -> pb.Model:
        model = model_from_name(request.name, "name")
        self._served(model, "name")
        return self._model(model)

    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[self._model(m) for m in sorted(self.config.models)])

    def GetCheckpoint(self, request: pb.GetCheckpointRequest, context: grpc.ServicerContext) -> pb.Checkpoint:
        ref = checkpoint_ref(request.name, "name")
        model = self._model_of(ref, "name")
        ckpt = self._existing_checkpoint(ref, model, "name")
        head = self.store.head(model)
        if ckpt == BASE:
            return pb.Checkpoint(name=convert.checkpoint_name(model, BASE), id=BASE, model=f"models/{model}",
                                 head=head == BASE)
        return convert.checkpoint_message(self.store.read(model, ckpt), head)

    def ListCheckpoints(self, request: pb.ListCheckpointsRequest, context: grpc.ServicerContext) -> pb.ListCheckpointsResponse:
        model = model_from_name(request.parent, "parent")
        if model not in self.config.models and model not in self.store.models():
            raise not_found(f"model {model} is not served here and has no checkpoints", "parent")
        size = _page_size(request.page_size, 100)
        start = 0
        if request.page_token:
            if not request.page_token.isdigit():
                raise invalid([("page_token", "is not a token returned by ListCheckpoints")])
            start = int(request.page_token)
        records = self.store.list_checkpoints(model)
        head = self.store.head(model)
        page = records[start:start + size]
        more = start + size < len(records)
        return pb.ListCheckpointsResponse(checkpoints=[convert.checkpoint_message(r, head) for r in page],
                                          next_page_token=str(start + size) if more else "")

    def SetHead(self, request: pb.SetHeadRequest, context: grpc.ServicerContext) -> pb.Model:
        model = model_from_name(request.name, "name")
        self._served(model, "name")
        ckpt = self._existing_checkpoint(checkpoint_ref(request.checkpoint, "checkpoint"), model, "checkpoint")
        previous = self.store.head(model)
        try:
            self.dispatcher.set_head(model, ckpt)
        except Busy as e:
            raise failed_precondition(str(e), "name") from None
        job_logger("", model, ckpt).info("head moved", previous=previous)
        return self._model(model)

    def ExportCheckpoint(self, request: pb.ExportCheckpointRequest, context: grpc.ServicerContext) -> pb.ExportCheckpointResponse:
        ref = checkpoint_ref(request.name, "name")
        model = self._model_of(ref, "name")
        self._served(model, "name")
        ckpt = self._existing_checkpoint(ref, model, "name")
        if not request.output_dir or not os.path.isabs(request.output_dir):
            raise invalid([("output_dir", "must be an absolute folder path on the worker's host")])
        if os.path.exists(request.output_dir):
            raise failed_precondition(f"{request.output_dir} already exists; export writes a new folder", "output_dir")
        files = self._call(model, "export", ckpt, request.output_dir)
        job_logger("", model, ckpt).info("checkpoint exported", output_dir=request.output_dir)
        return pb.ExportCheckpointResponse(checkpoint=convert.checkpoint_name(model, ckpt),
                                           output_dir=request.output_dir, files=files)

    def Query(self, request: pb.QueryRequest, context: grpc.ServicerContext) -> pb.QueryResponse:
        violations = []
        if not request.prompts:
            violations.append(("prompts", "at least one prompt is required"))
        if len(request.prompts) > MAX_QUERY_PROMPTS:
            violations.append(("prompts", f"{len(request.prompts)} prompts, limit {MAX_QUERY_PROMPTS}"))
        if len(request.targets) > MAX_QUERY_TARGETS:
            violations.append(("targets", f"{len(request.targets)} targets, limit {MAX_QUERY_TARGETS}"))
        for name, texts in (("prompts", request.prompts), ("targets", request.targets)):
            for i, text in enumerate(texts):
                if not text.strip():
                    violations.append((f"{name}[{i}]", "is empty"))
                elif len(text) > MAX_TEXT_CHARS:
                    violations.append((f"{name}[{i}]", f"is {len(text)} characters, limit {MAX_TEXT_CHARS}"))
        if not 0 <= request.top_k <= MAX_TOP_K:
            violations.append(("top_k", f"must be between 1 and {MAX_TOP_K} (0: the default, 5)"))
        ref = None
        try:
            ref = checkpoint_ref(request.checkpoint, "checkpoint", allow_model=True)
        except ApiError as e:
            violations.extend(e.violations)
        if violations:
            raise invalid(violations, "query")
        model = self._model_of(ref, "checkpoint")
        self._served(model, "checkpoint")
        ckpt = self._existing_checkpoint(ref, model, "checkpoint") if ref.id else self.store.head(model)
        results = self._call(model, "query", ckpt, list(request.prompts), list(request.targets), request.top_k or 5)
        return pb.QueryResponse(checkpoint=convert.checkpoint_name(model, ckpt), results=[
            pb.PromptResult(prompt=r["prompt"], top_tokens=[pb.TokenProbability(**t) for t in r["top_tokens"]],
                            targets=[pb.TargetProbability(**t) for t in r["targets"]]) for r in results])

    # -- helpers ---------------------------------------------------------------------------------

    def _job(self, name: str):
        job = self.jobs.get(job_id(name))
        if job is None:
            raise not_found(f"{name} does not exist", "name")
        return job

    def _served(self, model: str, field: str) -> None:
        if model not in self.config.models:
            served = ", ".join(sorted(self.config.models)) or "none"
            raise not_found(f"model {model} is not served here (served: {served})", field)

    def _model(self, model: str) -> pb.Model:
        return convert.model_message(model, self.config.models.get(model, ""), self.store.head(model),
                                     len(self.store.list_checkpoints(model)))

    def _model_of(self, ref: CheckpointRef, field: str) -> str:
        """The model a checkpoint reference points into (a bare id is looked up in the store)."""
        if ref.model:
            return ref.model
        if ref.id == BASE:
            raise invalid([(field, "'base' needs its model: models/{model}/checkpoints/base")])
        holders = self.store.models_holding(ref.id)
        if not holders:
            raise not_found(f"checkpoint {ref.id} does not exist", field)
        if len(holders) > 1:
            raise invalid([(field, f"checkpoint {ref.id} exists in models {', '.join(holders)}: name the model")])
        return holders[0]

    def _existing_checkpoint(self, ref: CheckpointRef, model: str, field: str) -> str:
        """``ref``'s id after checking it exists and belongs to ``model``."""
        if ref.model and ref.model != model:
            raise failed_precondition(f"checkpoint models/{ref.model}/checkpoints/{ref.id} belongs to model "
                                      f"{ref.model}, not {model}", field)
        if self.store.exists(model, ref.id):
            return ref.id
        holders = self.store.models_holding(ref.id)
        if holders:
            raise failed_precondition(f"checkpoint {ref.id} belongs to model {', '.join(holders)}, not {model}", field)
        raise not_found(f"checkpoint {ref.id} of model {model} does not exist", field)

    def _call(self, model: str, method: str, *args: Any) -> Any:
        """One worker call, its failures mapped to status codes."""
        replica, _ = self.pool.get(model)
        try:
            return replica.collective_rpc(method, *args)[0]
        except WorkerDied as e:
            self.pool.drop(model)
            raise ApiError(grpc.StatusCode.UNAVAILABLE, f"the worker of model {model} died: {e}") from None
        except FileExistsError as e:
            raise failed_precondition(str(e)) from None
        except CorruptArtifact as e:
            raise ApiError(grpc.StatusCode.DATA_LOSS, str(e)) from None
        except CheckpointNotFound as e:
            raise not_found(str(e)) from None


def _page_size(value: int, default: int) -> int:
    if value < 0:
        raise invalid([("page_size", "must not be negative")])
    return min(value or default, 1000)
