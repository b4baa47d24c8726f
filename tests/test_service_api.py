"""The gRPC API at the door (no workers needed): bad input, idempotency, cancel, health, reflection, auth.

The scheduler runs for real on 127.0.0.1:0 with a real SQLite queue; dispatch is off, so every
accepted job stays QUEUED and the checks are about what the API accepts and refuses.
"""

from __future__ import annotations

import subprocess
import sys
import threading

import grpc
import pytest
from google.protobuf.struct_pb2 import Struct
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from editfleet.client import EditClient, EditFleetError
from editfleet.scheduler.config import SchedulerConfig
from editfleet.scheduler.server import Scheduler
from editfleet.scheduler.validation import coerce_settings
from editfleet.v1 import editfleet_pb2 as pb
from editfleet.v1 import editfleet_pb2_grpc as pb_grpc
from editfleet.workers.store import BASE, CheckpointStore, checkpoint_id
from service_support import EIFFEL

OTHER_CKPT = checkpoint_id("other", BASE, [], "alphaedit", {}, "1")
MAX_EDITS = 5


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    CheckpointStore(root / "store").write_checkpoint("other", OTHER_CKPT, {
        "parent": BASE, "edits": [], "method": "alphaedit", "engine_settings": {}, "engine_version": "1",
        "scores": {}, "layers": []}, {})
    config = SchedulerConfig(store_dir=root / "store", models={"tiny": str(root / "absent"), "other": str(root / "absent")},
                             listen="127.0.0.1:0", dispatch=False, max_edits_per_job=MAX_EDITS, log_level="warning")
    scheduler = Scheduler(config)
    scheduler.start()
    yield scheduler
    scheduler.stop()


@pytest.fixture(scope="module")
def client(server):
    with EditClient(server.address) as c:
        yield c


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.EditServiceStub(channel)


def _submit_error(stub, **fields) -> grpc.RpcError:
    request = pb.SubmitEditJobRequest(**{"model": "models/tiny", "edits": [pb.Edit(**EIFFEL)], **fields})
    with pytest.raises(grpc.RpcError) as caught:
        stub.SubmitEditJob(request)
    return caught.value


def _violations(error: grpc.RpcError) -> dict[str, str]:
    return dict(EditFleetError.from_rpc(error).violations)


def _settings(**values) -> pb.EditOptions:
    s = Struct()
    s.update(values)
    return pb.EditOptions(engine_settings=s)


BAD_SUBMISSIONS = [
    ("missing subject", dict(edits=[pb.Edit(prompt="The home city of the Eiffel Tower", target_new="Rome")]),
     grpc.StatusCode.INVALID_ARGUMENT, "edits[0].subject", "is empty"),
    ("subject not in prompt", dict(edits=[pb.Edit(**EIFFEL), pb.Edit(prompt="The Louvre is in", subject="Eiffel", target_new="Oslo")]),
     grpc.StatusCode.INVALID_ARGUMENT, "edits[1].subject", "does not occur in the prompt"),
    ("stray braces", dict(edits=[pb.Edit(prompt="{} is in {x}", subject="Gold", target_new="Oslo")]),
     grpc.StatusCode.INVALID_ARGUMENT, "edits[0].prompt", "braces"),
    ("target equals truth", dict(edits=[pb.Edit(**{**EIFFEL, "target_new": "Paris"})]),
     grpc.StatusCode.INVALID_ARGUMENT, "edits[0].target_new", "equals target_true"),
    ("empty edit list", dict(edits=[]), grpc.StatusCode.INVALID_ARGUMENT, "edits", "at least one edit"),
    ("too many edits", dict(edits=[pb.Edit(**EIFFEL)] * (MAX_EDITS + 1)),
     grpc.StatusCode.INVALID_ARGUMENT, "edits", f"limit {MAX_EDITS}"),
    ("oversized string", dict(edits=[pb.Edit(**{**EIFFEL, "prompt": "The very" * 300 + " home city of the Eiffel Tower"})]),
     grpc.StatusCode.INVALID_ARGUMENT, "edits[0].prompt", "characters, limit"),
    ("missing model", dict(model=""), grpc.StatusCode.INVALID_ARGUMENT, "model", "is required"),
    ("malformed model", dict(model="models/a/b"), grpc.StatusCode.INVALID_ARGUMENT, "model", "not a model name"),
    ("unknown model", dict(model="models/nope"), grpc.StatusCode.NOT_FOUND, "model", "not served"),
    ("unknown checkpoint", dict(base_checkpoint="models/tiny/checkpoints/00000000000000aa"),
     grpc.StatusCode.NOT_FOUND, "base_checkpoint", "does not exist"),
    ("malformed checkpoint", dict(base_checkpoint="models/tiny/checkpoints/xyz"),
     grpc.StatusCode.INVALID_ARGUMENT, "base_checkpoint", "not a checkpoint name"),
    ("checkpoint of another model", dict(base_checkpoint=f"models/other/checkpoints/{OTHER_CKPT}"),
     grpc.StatusCode.FAILED_PRECONDITION, "base_checkpoint", "belongs to model other"),
    ("bare id of another model", dict(base_checkpoint=OTHER_CKPT),
     grpc.StatusCode.FAILED_PRECONDITION, "base_checkpoint", "belongs to model other"),
    ("unknown engine setting", dict(options=_settings(steps=3)),
     grpc.StatusCode.INVALID_ARGUMENT, "options.engine_settings.steps", "not an engine setting"),
    ("badly typed engine setting", dict(options=_settings(v_max_steps=2.5)),
     grpc.StatusCode.INVALID_ARGUMENT, "options.engine_settings.v_max_steps", "must be an integer"),
    ("out-of-range engine setting", dict(options=_settings(kl_factor=-0.5)),
     grpc.StatusCode.INVALID_ARGUMENT, "options.engine_settings", "kl_factor must be >= 0"),
    ("negative perplexity limit", dict(options=pb.EditOptions(max_perplexity_increase=-0.1)),
     grpc.StatusCode.INVALID_ARGUMENT, "options.max_perplexity_increase", "must be a positive fraction"),
    ("zero perplexity limit", dict(options=pb.EditOptions(max_perplexity_increase=0.0)),
     grpc.StatusCode.INVALID_ARGUMENT, "options.max_perplexity_increase", "must be a positive fraction"),
    ("NaN perplexity limit", dict(options=pb.EditOptions(max_perplexity_increase=float("nan"))),
     grpc.StatusCode.INVALID_ARGUMENT, "options.max_perplexity_increase", "must be a positive fraction"),
    ("unknown method", dict(method=7), grpc.StatusCode.INVALID_ARGUMENT, "method", "unknown method"),
    ("long request id", dict(request_id="r" * 200), grpc.StatusCode.INVALID_ARGUMENT, "request_id", "limit 128"),
]


@pytest.mark.parametrize("case, fields, code, field, text", BAD_SUBMISSIONS, ids=[c[0] for c in BAD_SUBMISSIONS])
def test_bad_submissions_are_refused_with_field_details(stub, client, case, fields, code, field, text):
    before = len(client.jobs())
    error = _submit_error(stub, **fields)
    assert error.code() == code, error.details()
    violations = _violations(error)
    assert field in violations and text in violations[field], violations
    assert len(client.jobs()) == before  # nothing queued


def test_engine_settings_take_null_only_where_the_setting_is_optional():
    settings, violations = coerce_settings({"spectral_cap": None, "nullspace_energy": 0.1}, "options.engine_settings")
    assert violations == [] and settings == {"spectral_cap": None, "nullspace_energy": 0.1}
    _, violations = coerce_settings({"v_lr": None}, "options.engine_settings")
    assert violations == [("options.engine_settings.v_lr", "must be a number, got None")]


def test_non_utf8_text_is_invalid_argument_naming_the_field(server, client):
    request = pb.SubmitEditJobRequest(model="models/tiny", edits=[pb.Edit(**EIFFEL), pb.Edit(**{**EIFFEL, "subject": "SUBJ"})])
    data = request.SerializeToString().replace(b"SUBJ", b"\xff\xfe\xfd\xfc")
    before = len(client.jobs())
    with grpc.insecure_channel(server.address) as channel:
        call = channel.unary_unary("/editfleet.v1.EditService/SubmitEditJob", request_serializer=None,
                                   response_deserializer=pb.Job.FromString)
        with pytest.raises(grpc.RpcError) as caught:
            call(data)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _violations(caught.value) == {"edits[1].subject": "is not valid UTF-8"}
    assert len(client.jobs()) == before


def test_same_request_id_returns_the_same_job(client, stub):
    first = client.submit("tiny", [EIFFEL], request_id="retry-1")
    again = client.submit("tiny", [EIFFEL], request_id="retry-1")
    assert first.name == again.name and again.state == pb.Job.QUEUED
    assert sum(j.request_id == "retry-1" for j in client.jobs()) == 1
    error = _submit_error(stub, request_id="retry-1", method=pb.MEMIT)
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS and "request_id" in _violations(error)


def test_submitted_job_is_described_and_cancellable(client):
    job = client.submit("tiny", [EIFFEL, {"prompt": "{} is made of", "subject": "Gold", "target_new": "wood"}],
                        method="memit", engine_settings={"v_max_steps": 3, "layers": [1, 2]},
                        max_perplexity_increase=0.05)
    assert job.name.startswith("jobs/") and job.state == pb.Job.QUEUED and job.model == "models/tiny"
    assert job.options.HasField("max_perplexity_increase") and job.options.max_perplexity_increase == 0.05
    assert job.edits[0].prompt == "The home city of {}" and job.method == pb.MEMIT
    assert job.options.engine_settings["v_max_steps"] == 3 and job.progress.stage == pb.JobEvent.QUEUED
    assert client.job(job.name.removeprefix("jobs/")).name == job.name
    events = client.watch(job)
    assert next(events).stage == pb.JobEvent.QUEUED
    cancelled = client.cancel(job)
    assert cancelled.state == pb.Job.CANCELLED
    assert next(events).stage == pb.JobEvent.CANCELLED  # the watch ends with the cancellation
    assert list(events) == []
    assert client.cancel(job).state == pb.Job.CANCELLED


@pytest.mark.parametrize("call, code, field", [
    (lambda c: c.job("jobs/00000000000000ff"), grpc.StatusCode.NOT_FOUND, "name"),
    (lambda c: c.job("jobs/nope"), grpc.StatusCode.INVALID_ARGUMENT, "name"),
    (lambda c: c.set_head("tiny", "00000000000000ff"), grpc.StatusCode.NOT_FOUND, "checkpoint"),
    (lambda c: c.set_head("tiny", f"models/other/checkpoints/{OTHER_CKPT}"), grpc.StatusCode.FAILED_PRECONDITION, "checkpoint"),
    (lambda c: c.checkpoints("nope"), grpc.StatusCode.NOT_FOUND, "parent"),
    (lambda c: c.query("models/tiny", []), grpc.StatusCode.INVALID_ARGUMENT, "prompts"),
    (lambda c: c.query("models/tiny", ["x"], top_k=99), grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
    (lambda c: c.query("models/nope", ["x"]), grpc.StatusCode.NOT_FOUND, "checkpoint"),
    (lambda c: c.export(f"models/tiny/checkpoints/{BASE}", "relative/dir"), grpc.StatusCode.INVALID_ARGUMENT, "output_dir"),
])
def test_other_bad_calls(client, call, code, field):
    with pytest.raises(EditFleetError) as caught:
        call(client)
    assert caught.value.code == code and field in dict(caught.value.violations), caught.value


def test_models_and_checkpoints_are_listed(client):
    assert [m.name for m in client.models()] == ["models/other", "models/tiny"]
    other = client.model("other")
    assert other.head == "models/other/checkpoints/base" and other.checkpoint_count == 1
    [ckpt] = client.checkpoints("other")
    assert ckpt.name == f"models/other/checkpoints/{OTHER_CKPT}" and ckpt.parent == "models/other/checkpoints/base"
    assert client.checkpoint(OTHER_CKPT).id == OTHER_CKPT  # a bare id is found in its model
    assert client.set_head("other", OTHER_CKPT).head == ckpt.name
    assert client.checkpoint(ckpt.name).head


def test_health_and_reflection(server):
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "editfleet.v1.EditService"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        [reply] = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for s in reply.list_services_response.service}
        assert {"editfleet.v1.EditService", "grpc.health.v1.Health"} <= names


def test_token_is_required_when_configured(tmp_path):
    config = SchedulerConfig(store_dir=tmp_path, models={"tiny": "absent"}, listen="127.0.0.1:0", dispatch=False,
                             token="s3cret", log_level="warning")
    scheduler = Scheduler(config)
    scheduler.start()
    try:
        with EditClient(scheduler.address) as anonymous, pytest.raises(EditFleetError) as caught:
            anonymous.models()
        assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
        with EditClient(scheduler.address, token="s3cret") as client:
            assert [m.name for m in client.models()] == ["models/tiny"]
        with grpc.insecure_channel(scheduler.address) as channel:  # probes need no token
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status
            assert status == health_pb2.HealthCheckResponse.SERVING
    finally:
        scheduler.stop()


def test_scheduler_does_not_import_torch():
    code = ("import sys, editfleet.scheduler.server, editfleet.scheduler.dispatcher; "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"


def test_a_watch_open_when_the_scheduler_stops_ends_unavailable_not_ok(tmp_path):
    """A stream that ended OK without a terminal event would read as a finished job: on stop the
    watch fails UNAVAILABLE, and the job is still queued for the next start."""
    config = SchedulerConfig(store_dir=tmp_path / "store", models={"tiny": str(tmp_path / "absent")},
                             listen="127.0.0.1:0", dispatch=False, log_level="warning")
    scheduler = Scheduler(config)
    scheduler.start()
    with EditClient(scheduler.address) as c:
        job = c.submit("tiny", [EIFFEL])
        events = c.watch(job, timeout=60)
        assert next(events).state == pb.Job.QUEUED
        stopper = threading.Thread(target=scheduler.stop, kwargs={"grace": 10.0})
        stopper.start()
        with pytest.raises(EditFleetError) as caught:
            next(events)
        stopper.join()
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE and "stopping" in caught.value.message
    assert job.name.removeprefix("jobs/") in caught.value.message
    again = Scheduler(config)
    again.start()
    try:
        with EditClient(again.address) as c:
            assert c.job(job).state == pb.Job.QUEUED
    finally:
        again.stop()
