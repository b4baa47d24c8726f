"""The thin Python client of the edit service (grpcio + protobuf only).

Calls retry on UNAVAILABLE through gRPC's own retry policy; that is safe for SubmitEditJob
because every submission carries a request_id (generated when not given), which makes the
server return the same job for a repeated request.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import grpc
from google.protobuf.struct_pb2 import Struct
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from editfleet.v1 import editfleet_pb2 as pb
from editfleet.v1 import editfleet_pb2_grpc as pb_grpc

from .records import to_edits

TERMINAL = (pb.Job.SUCCEEDED, pb.Job.FAILED, pb.Job.CANCELLED)
_METHODS = {"alphaedit": pb.ALPHAEDIT, "memit": pb.MEMIT}
_RETRY = json.dumps({"methodConfig": [{
    "name": [{"service": "editfleet.v1.EditService"}],
    "retryPolicy": {"maxAttempts": 4, "initialBackoff": "0.2s", "maxBackoff": "2s", "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"]},
}]})


class EditFleetError(Exception):
    """A failed call: the status code, the server's message, and the fields at fault."""

    def __init__(self, code: grpc.StatusCode, message: str, violations: Sequence[tuple[str, str]] = ()):
        self.code, self.message, self.violations = code, message, list(violations)
        super().__init__(f"{code.name}: {message}")

    @classmethod
    def from_rpc(cls, error: grpc.RpcError) -> "EditFleetError":
        violations = []
        status = rpc_status.from_call(error)
        if status is not None:
            for detail in status.details:
                if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    bad = error_details_pb2.BadRequest()
                    detail.Unpack(bad)
                    violations.extend((v.field, v.description) for v in bad.field_violations)
        return cls(error.code(), error.details() or "", violations)


def model_name(model: str) -> str:
    return model if model.startswith("models/") else f"models/{model}"


def job_name(job: str | pb.Job) -> str:
    job = job.name if isinstance(job, pb.Job) else job
    return job if job.startswith("jobs/") else f"jobs/{job}"


class EditClient:
    """``EditClient("127.0.0.1:50051")``: submit edits, follow jobs, inspect and use checkpoints.

    Args:
        address: ``host:port`` of the scheduler.
        token: bearer token, when the server requires one.
        timeout: seconds per unary call (``watch``/``wait`` have their own).
    """

    def __init__(self, address: str, token: str | None = None, timeout: float | None = 120.0):
        self.address = address
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._channel = grpc.insecure_channel(address, options=[("grpc.enable_retries", 1),
                                                                ("grpc.service_config", _RETRY)])
        self._stub = pb_grpc.EditServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "EditClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        try:
            return getattr(self._stub, method)(request, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise EditFleetError.from_rpc(e) from None

    # -- jobs ------------------------------------------------------------------------------------

    def submit(self, model: str, edits: Iterable[Mapping[str, Any] | pb.Edit], *, method: str = "alphaedit",
               base_checkpoint: str = "", engine_settings: Mapping[str, Any] | None = None,
               request_id: str | None = None, max_perplexity_increase: float | None = None) -> pb.Job:
        """Queue an edit job; returns it at once (state QUEUED). See ``wait`` and ``watch``.

        ``max_perplexity_increase`` (0.1 = +10%): the job fails, landing nothing, if its
        checkpoint's perplexity on the held-out text would exceed the unedited model's by more.
        """
        if method not in _METHODS:
            raise ValueError(f"method must be one of {', '.join(_METHODS)}, got {method!r}")
        options = pb.EditOptions()
        if max_perplexity_increase is not None:
            options.max_perplexity_increase = max_perplexity_increase
        if engine_settings:
            settings = Struct()
            settings.update(dict(engine_settings))
            options.engine_settings.CopyFrom(settings)
        request = pb.SubmitEditJobRequest(
            request_id=request_id or uuid.uuid4().hex, model=model_name(model), base_checkpoint=base_checkpoint,
            edits=to_edits(edits), method=_METHODS[method], options=options)
        return self._call("SubmitEditJob", request)

    def job(self, job: str | pb.Job) -> pb.Job:
        return self._call("GetJob", pb.GetJobRequest(name=job_name(job)))

    def jobs(self, model: str | None = None, limit: int = 100) -> list[pb.Job]:
        """Jobs, newest first (at most ``limit``)."""
        out, token = [], ""
        while len(out) < limit:
            page = self._call("ListJobs", pb.ListJobsRequest(model=model_name(model) if model else "",
                                                              page_size=min(limit - len(out), 1000), page_token=token))
            out.extend(page.jobs)
            token = page.next_page_token
            if not token:
                break
        return out

    def cancel(self, job: str | pb.Job) -> pb.Job:
        return self._call("CancelJob", pb.CancelJobRequest(name=job_name(job)))

    def watch(self, job: str | pb.Job, timeout: float | None = None) -> Iterator[pb.JobEvent]:
        """The job's progress events until it ends (the first event is its current state)."""
        try:
            yield from self._stub.WatchJob(pb.WatchJobRequest(name=job_name(job)), timeout=timeout,
                                           metadata=self._metadata)
        except grpc.RpcError as e:
            raise EditFleetError.from_rpc(e) from None

    def wait(self, job: str | pb.Job, timeout: float | None = None,
             on_event: Callable[[pb.JobEvent], None] | None = None) -> pb.Job:
        """Block until the job ends and return it (check ``state``; ``error`` says why it failed)."""
        for event in self.watch(job, timeout):
            if on_event is not None:
                on_event(event)
        return self.job(job)

    # -- models and checkpoints ---------------------------------------------------------------

    def models(self) -> list[pb.Model]:
        return list(self._call("ListModels", pb.ListModelsRequest()).models)

    def model(self, model: str) -> pb.Model:
        return self._call("GetModel", pb.GetModelRequest(name=model_name(model)))

    def checkpoints(self, model: str) -> list[pb.Checkpoint]:
        """All checkpoints of a model, newest first."""
        out, token = [], ""
        while True:
            page = self._call("ListCheckpoints", pb.ListCheckpointsRequest(parent=model_name(model), page_token=token))
            out.extend(page.checkpoints)
            token = page.next_page_token
            if not token:
                return out

    def checkpoint(self, name: str) -> pb.Checkpoint:
        return self._call("GetCheckpoint", pb.GetCheckpointRequest(name=name))

    def query(self, checkpoint: str, prompts: Sequence[str] | str, targets: Sequence[str] = (),
              top_k: int = 5) -> pb.QueryResponse:
        """Top-k next tokens and target probabilities; ``checkpoint`` may be ``models/{m}`` (its head)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return self._call("Query", pb.QueryRequest(checkpoint=checkpoint, prompts=prompts, targets=list(targets),
                                                   top_k=top_k))

    def set_head(self, model: str, checkpoint: str) -> pb.Model:
        """Roll the model's head back (or forward) to ``checkpoint``; later edits continue from it."""
        return self._call("SetHead", pb.SetHeadRequest(name=model_name(model), checkpoint=checkpoint))

    def export(self, checkpoint: str, output_dir: str) -> pb.ExportCheckpointResponse:
        """Write the checkpoint as a Hugging Face folder (a new absolute path on the worker's host)."""
        return self._call("ExportCheckpoint", pb.ExportCheckpointRequest(name=checkpoint, output_dir=output_dir),
                          timeout=max(self.timeout or 0, 600))

