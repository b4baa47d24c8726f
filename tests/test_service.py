"""The service end to end: a real scheduler on 127.0.0.1, real local Ray, real SQLite, tiny models.

One Ray runtime serves the whole module (starting it costs seconds). Each scheduler gets its own
worker actors; a test that needs models to load in parallel uses models no other test loaded.
"""

from __future__ import annotations

import json

import pytest

from editfleet.client import EditClient
from editfleet.client.cli import main
from editfleet.scheduler.config import SchedulerConfig
from editfleet.scheduler.jobstore import JobStore
from editfleet.scheduler.ray_setup import init_ray
from editfleet.scheduler.server import Scheduler
from editfleet.v1 import editfleet_pb2 as pb
from editfleet.workers.store import BASE, CheckpointStore
from service_support import EIFFEL, FAST_ENGINE, GOLD, LAYER_PROGRESS, LOUVRE, save_model, write_corpus, write_perplexity_text

PROMPT = EIFFEL["prompt"]
STAGE_ORDER = ["QUEUED", "DISPATCHED", "LOADING", "MATERIALIZING", "STATISTICS", "TARGETS", "LAYER", "EVALUATING",
               "WRITING", "DONE"]


@pytest.fixture(scope="module")
def ray_runtime():
    import ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("service")
    models = {"llama": save_model(root / "llama"), "par-a": save_model(root / "par-a", "llama", seed=1),
              "par-b": save_model(root / "par-b", "gpt2", seed=2)}
    return {"root": root, "models": {k: str(v) for k, v in models.items()}, "corpus": write_corpus(root / "corpus.txt"),
            "ppl_text": write_perplexity_text(root / "general.txt")}


def _config(parts, store: str, **overrides) -> SchedulerConfig:
    return SchedulerConfig(store_dir=parts["root"] / store, models=parts["models"], listen="127.0.0.1:0",
                           home=parts["root"] / "home", corpus=[parts["corpus"]], engine_overrides=FAST_ENGINE,
                           perplexity_text=parts["ppl_text"], log_level="warning", **overrides)


@pytest.fixture(scope="module")
def service(ray_runtime, parts):
    scheduler = Scheduler(_config(parts, "store"))
    scheduler.start()
    with EditClient(scheduler.address, timeout=600) as client:
        yield scheduler, client
    scheduler.stop()


def _targets(reply: pb.QueryResponse) -> dict[str, float]:
    return {t.target: t.probability for t in reply.results[0].targets}


def test_submit_watch_checkpoint_query_rollback(service):
    scheduler, client = service
    before = client.query("models/llama", PROMPT, ["Rome", "Paris"])
    assert before.checkpoint == "models/llama/checkpoints/base"

    job = client.submit("llama", [EIFFEL], request_id="flow-1")
    events = list(client.watch(job, timeout=300))
    stages = [pb.JobEvent.Stage.Name(e.stage) for e in events]
    assert stages[-1] == "DONE" and "LAYER" in stages and "TARGETS" in stages
    assert [STAGE_ORDER.index(s) for s in stages] == sorted(STAGE_ORDER.index(s) for s in stages)
    layers = [(e.current, e.total) for e in events if e.stage == pb.JobEvent.LAYER]
    assert layers == LAYER_PROGRESS

    job = client.job(job)
    assert job.state == pb.Job.SUCCEEDED and job.attempts == 1
    assert job.parent_checkpoint == "models/llama/checkpoints/base" and events[-1].checkpoint == job.checkpoint
    assert client.submit("llama", [EIFFEL], request_id="flow-1").name == job.name  # a retry after the fact

    [ckpt] = [c for c in client.checkpoints("llama") if c.name == job.checkpoint]
    assert ckpt.head and ckpt.parent == "models/llama/checkpoints/base" and ckpt.method == pb.ALPHAEDIT
    assert ckpt.edits[0].subject == "the Eiffel Tower" and ckpt.engine_settings["v_max_steps"] == FAST_ENGINE["v_max_steps"]
    assert {"efficacy", "paraphrase_efficacy"} <= set(ckpt.scores) and len(ckpt.content_digest) == 64
    ppl = ckpt.scores
    assert ppl["perplexity"] == pytest.approx(ppl["perplexity_base"] * (1 + ppl["perplexity_change"]))
    assert ckpt.create_time.seconds > 0 and {a.path for a in ckpt.artifacts} == {"layer002.safetensors", "layer003.safetensors", "targets.safetensors"}

    after = client.query("models/llama", PROMPT, ["Rome", "Paris"])
    assert after.checkpoint == job.checkpoint
    assert _targets(after)["Rome"] > 10 * _targets(before)["Rome"]
    assert _targets(after)["Rome"] > _targets(after)["Paris"]

    assert client.set_head("llama", "base").head == "models/llama/checkpoints/base"
    back = client.query("models/llama", PROMPT, ["Rome", "Paris"])
    assert back.checkpoint == "models/llama/checkpoints/base" and _targets(back) == _targets(before)
    assert client.set_head("llama", job.checkpoint).head == job.checkpoint  # and forward again


def test_engine_failure_fails_the_job_and_keeps_the_head(service):
    _, client = service
    head = client.model("llama").head
    job = client.wait(client.submit("llama", [GOLD], engine_settings={"layers": [40]}), timeout=300)
    assert job.state == pb.Job.FAILED and "out of range" in job.error.message
    assert job.progress.stage == pb.JobEvent.FAILED and job.checkpoint == ""
    assert client.model("llama").head == head


def test_a_perplexity_limit_fails_the_job_and_keeps_the_head(service):
    """The EIFFEL edit raises this service's perplexity text by about a third (see
    ``write_perplexity_text``): under a 1% limit the job fails naming the option, whether the
    worker computes the checkpoint now or finds it stored by an earlier test."""
    _, client = service
    head = client.model("llama").head
    job = client.wait(client.submit("llama", [EIFFEL], base_checkpoint="models/llama/checkpoints/base",
                                    max_perplexity_increase=0.01), timeout=300)
    assert job.state == pb.Job.FAILED and job.checkpoint == ""
    assert [v.field for v in job.error.field_violations] == ["options.max_perplexity_increase"]
    assert "against the unedited model" in job.error.message and "limit +1.0%" in job.error.message
    assert client.model("llama").head == head


def test_models_run_in_parallel_on_different_workers(service):
    _, client = service
    jobs = [client.submit(model, [EIFFEL]) for model in ("par-a", "par-b")]
    a, b = (client.wait(j, timeout=300) for j in jobs)
    assert a.state == b.state == pb.Job.SUCCEEDED and a.batch != b.batch
    start = lambda j: j.start_time.ToNanoseconds()  # noqa: E731
    end = lambda j: j.end_time.ToNanoseconds()  # noqa: E731
    assert start(a) < end(b) and start(b) < end(a), "the two models' jobs did not overlap"


def test_restart_runs_queued_jobs_once_coalesced_in_order(ray_runtime, parts):
    """Accepted while dispatch is off, then a restart: interrupted and queued jobs all run, once."""
    config = _config(parts, "restart-store", dispatch=False)
    first = Scheduler(config)
    first.start()
    with EditClient(first.address, timeout=600) as client:
        j1 = client.submit("llama", [EIFFEL])
        j2 = client.submit("llama", [LOUVRE])
        j3 = client.submit("llama", [GOLD], method="memit")
        too_long = {"prompt": "{} " + "word " * 60, "subject": "Gold", "target_new": "wood"}
        j4 = client.submit("llama", [too_long], method="memit")
        j5 = client.submit("llama", [dict(GOLD, target_new="glass")], method="memit")
    first.stop()
    jobs = JobStore(config.db_path)  # as if the scheduler had crashed while running j1
    jobs.mark_running([j1.name.removeprefix("jobs/")], "crashed-batch", BASE)
    jobs.close()

    second = Scheduler(_config(parts, "restart-store"))
    second.start()
    try:
        with EditClient(second.address, timeout=600) as client:
            j1, j2, j3, j4, j5 = (client.wait(j, timeout=300) for j in (j1, j2, j3, j4, j5))
            head = client.model("llama").head
            checkpoints = client.checkpoints("llama")
    finally:
        second.stop()
    assert [j.state for j in (j1, j2, j3, j5)] == [pb.Job.SUCCEEDED] * 4
    assert j1.attempts == 2 and j2.attempts == 1  # j1 was re-dispatched once, after the "crash"
    assert j1.checkpoint == j2.checkpoint and j1.batch == j2.batch  # coalesced: one batch, one checkpoint
    assert j1.parent_checkpoint.endswith("/base") and j3.parent_checkpoint == j1.checkpoint  # order kept
    # j3, j4, j5 coalesced; the engine refused j4's edit: j4 failed, j3 and j5 went back and ran together.
    assert j4.state == pb.Job.FAILED and [v.field for v in j4.error.field_violations] == ["edits[0].prompt"]
    assert "context" in j4.error.message and j4.checkpoint == ""
    assert j3.checkpoint == j5.checkpoint and j3.attempts == j5.attempts == 2 and head == j3.checkpoint
    assert [c.name for c in checkpoints] == [j3.checkpoint, j1.checkpoint]  # nothing ran twice
    assert [len(c.edits) for c in checkpoints] == [2, 2] and checkpoints[0].method == pb.MEMIT
    assert len(CheckpointStore(config.store_dir).list_checkpoints("llama")) == 2


def test_cli_round_trip(service, tmp_path, capsys):
    scheduler, _ = service
    server = ["--server", scheduler.address]
    edits = tmp_path / "edits.jsonl"
    edits.write_text(json.dumps(dict(LOUVRE, record_id="louvre")) + "\n")
    assert main(["submit", *server, "--model", "llama", "--edits", str(edits), "--wait", "--json"]) == 0
    job = json.loads(capsys.readouterr().out)
    assert job["state"] == "SUCCEEDED" and job["edits"][0]["record_id"] == "louvre"
    ckpt = job["checkpoint"].rsplit("/", 1)[-1]

    assert main(["checkpoints", *server, "--model", "llama", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["model"]["head"] == job["checkpoint"] and listing["checkpoints"][0]["id"] == ckpt

    assert main(["ask", *server, "--checkpoint", ckpt, "The museum named The Louvre", "--target", "Oslo", "--json"]) == 0
    reply = json.loads(capsys.readouterr().out)
    assert reply["checkpoint"] == job["checkpoint"] and reply["results"][0]["targets"][0]["target"] == "Oslo"

    assert main(["status", *server, job["name"]]) == 0
    assert "SUCCEEDED" in capsys.readouterr().out
    assert main(["rollback", *server, "--model", "llama", "--to", job["parent_checkpoint"]]) == 0
    assert job["parent_checkpoint"] in capsys.readouterr().out

    assert main(["export", *server, ckpt, str(tmp_path / "hf")]) == 0
    assert "config.json" in capsys.readouterr().out
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(tmp_path / "hf").model_type == "llama"
    assert main(["export", *server, ckpt, str(tmp_path / "hf")]) == 1
    assert "FAILED_PRECONDITION" in capsys.readouterr().err


def test_demo_runs_end_to_end(ray_runtime, parts, tmp_path, capsys):
    """``editfleet demo`` on a tiny model folder (the real default model is too slow for the suite)."""
    from editfleet.workers.evaluation.data import data_dir

    try:
        data_dir()
    except FileNotFoundError as e:
        pytest.skip(f"the demo's default statistics corpus (WikiText-2) is missing: {e}")
    assert main(["demo", "--model", parts["models"]["llama"], "--store", str(tmp_path / "store"),
                 "--home", str(tmp_path / "home")]) == 0
    out = capsys.readouterr().out
    before = out[out.index("before"):out.index("submitted")].splitlines()[1:4]
    after_rollback = out[out.index("after the rollback"):].splitlines()[1:4]
    assert len(before) == 3 and before == after_rollback  # the rollback restores the answers exactly
    [ckpt] = CheckpointStore(tmp_path / "store").list_checkpoints("demo")
    assert f"checkpoint {ckpt.id} (parent base)" in out and "head of models/demo -> models/demo/checkpoints/base" in out
    scores = ckpt.meta["scores"]
    assert (f"perplexity on held-out WikiText {scores['perplexity_base']:.3f} -> {scores['perplexity']:.3f} "
            f"({scores['perplexity_change']:+.2%})") in out
