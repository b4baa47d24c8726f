"""The worker behind the service, in process: edits, checkpoints, materialising chains, query, export.

These go through ``InProcessExecutor``: the same worker code the Ray actors run, minus Ray.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from editfleet.scheduler.convert import checkpoint_message
from editfleet.workers.editing.requests import MAX_TEXT_CHARS
from editfleet.workers.executor import InProcessExecutor
from editfleet.workers.store import BASE, CheckpointStore, CorruptArtifact
from editfleet.workers.evaluation.metrics import perplexity
from service_support import EIFFEL, FAST_ENGINE, GOLD, LAYER_PROGRESS, LOUVRE, save_model, write_corpus, write_perplexity_text


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("worker")
    return {"model": save_model(root / "tiny-llama"), "corpus": write_corpus(root / "corpus.txt"),
            "home": root / "home", "root": root, "ppl_text": write_perplexity_text(root / "general.txt")}


def _executor(parts, store_dir, **extra) -> InProcessExecutor:
    return InProcessExecutor({"model": str(parts["model"]), "name": "tiny", "store_dir": str(store_dir),
                              "home": str(parts["home"]), "corpus": [str(parts["corpus"])],
                              "engine_overrides": FAST_ENGINE, "perplexity_text": str(parts["ppl_text"]), **extra})


def _run(executor, parent, edits, method="alphaedit", options=None, limit=None) -> tuple[list[dict], dict]:
    events = list(executor.collective_stream("run_edit", parent, edits, method, options or {}, limit))
    assert [e["kind"] for e in events[:-1]] == ["progress"] * (len(events) - 1)
    return events[:-1], events[-1]


def _edited_weights(executor) -> dict[int, torch.Tensor]:
    worker = executor._workers[0]
    return {i: worker.adapter.weight(worker.model, i).detach().clone() for i in FAST_ENGINE["layers"]}


@pytest.fixture(scope="module")
def chain(parts):
    """Two sequential edits on the base model by one warm worker."""
    executor = _executor(parts, parts["root"] / "store")
    progress, first = _run(executor, BASE, [EIFFEL])
    _, second = _run(executor, first["checkpoint"], [LOUVRE])
    return {"executor": executor, "progress": progress, "first": first, "second": second,
            "weights": _edited_weights(executor)}


def test_edit_streams_progress_and_writes_a_checkpoint(chain, parts):
    stages = [e["stage"] for e in chain["progress"]]
    # A fresh worker first measures the unedited model's perplexity (once, part of loading).
    assert stages[:2] == ["loading", "materializing"] and stages[-2:] == ["evaluating", "writing"]
    assert {"statistics", "targets", "layer"} <= set(stages)
    layers = [(e["current"], e["total"]) for e in chain["progress"] if e["stage"] == "layer"]
    assert layers == LAYER_PROGRESS
    first = chain["first"]
    assert first["kind"] == "result" and not first["reused"]
    assert {"efficacy", "paraphrase_efficacy", "neighborhood_specificity", "target_prob_mean"} <= set(first["scores"])
    record = CheckpointStore(parts["root"] / "store").read("tiny", first["checkpoint"])
    assert record.parent == BASE and record.meta["layers"] == FAST_ENGINE["layers"]
    assert record.meta["edits"][0]["prompt"] == "The home city of {}"
    assert record.meta["engine_settings"]["v_max_steps"] == FAST_ENGINE["v_max_steps"]
    tensors = load_file(parts["root"] / "store" / "models" / "tiny" / "checkpoints" / first["checkpoint"] / "layer002.safetensors")
    # Low rank: one column per edit and update pass; one key per edit.
    rank = FAST_ENGINE["update_rounds"]
    assert tensors["U"].shape == (64, rank) and tensors["V"].shape == (192, rank) and tensors["K"].shape == (192, 1)
    targets = load_file(parts["root"] / "store" / "models" / "tiny" / "checkpoints" / first["checkpoint"] / "targets.safetensors")
    assert targets["Z"].shape == (1, 64) and record.meta["target_layer"] == FAST_ENGINE["layers"][-1]


def test_the_edit_shows_in_queries(chain):
    executor = chain["executor"]
    prompt = EIFFEL["prompt"]
    [before] = executor.collective_rpc("query", BASE, [prompt], ["Rome", "Paris"], 3)[0]
    [after] = executor.collective_rpc("query", chain["first"]["checkpoint"], [prompt], ["Rome", "Paris"], 3)[0]
    p = {t["target"]: t["probability"] for t in before["targets"]}
    q = {t["target"]: t["probability"] for t in after["targets"]}
    assert q["Rome"] > 10 * p["Rome"] and q["Rome"] > q["Paris"]
    assert len(after["top_tokens"]) == 3 and after["top_tokens"][0]["probability"] >= after["top_tokens"][1]["probability"]
    [again] = executor.collective_rpc("query", BASE, [prompt], ["Rome", "Paris"], 3)[0]
    assert again["targets"] == before["targets"]  # back to base exactly


def test_checkpoints_score_general_ability_against_the_unedited_model(chain, parts):
    """perplexity_base is the unedited model's perplexity on the worker's text, perplexity the
    checkpoint's own (re-measured on the materialised chain), perplexity_change their ratio - 1."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = perplexity(AutoModelForCausalLM.from_pretrained(parts["model"]),
                      AutoTokenizer.from_pretrained(parts["model"]), parts["ppl_text"])["perplexity"]
    worker = chain["executor"]._workers[0]
    for result in (chain["first"], chain["second"]):
        scores = result["scores"]
        assert scores["perplexity_base"] == pytest.approx(base, rel=1e-5)
        worker._materialise(result["checkpoint"])
        own = perplexity(worker.model, worker.tokenizer, parts["ppl_text"])["perplexity"]
        assert scores["perplexity"] == pytest.approx(own, rel=1e-5)
        assert scores["perplexity_change"] == pytest.approx(own / base - 1, rel=1e-5)
    # The text states the fact the first edit rewrites: the edit must show as a loss.
    assert chain["first"]["scores"]["perplexity_change"] > 0.01


def test_a_perplexity_limit_lands_nothing(chain, parts):
    """A result above the limit is not stored and the next call starts from the right weights;
    a stored checkpoint above a new job's limit is not handed out either."""
    change = chain["first"]["scores"]["perplexity_change"]
    store = parts["root"] / "store-limit"
    executor = _executor(parts, store)
    [before] = executor.collective_rpc("query", BASE, [EIFFEL["prompt"]], ["Rome", "Paris"])[0]
    _, over = _run(executor, BASE, [EIFFEL], limit=change / 2)
    assert over["kind"] == "over_limit" and over["field"] == "max_perplexity_increase"
    assert f"{change:+.1%}" in over["message"] and "nothing was stored" in over["message"]
    assert not (store / "models" / "tiny" / "checkpoints").exists() or \
        list((store / "models" / "tiny" / "checkpoints").iterdir()) == []
    [after] = executor.collective_rpc("query", BASE, [EIFFEL["prompt"]], ["Rome", "Paris"])[0]
    assert after["targets"] == before["targets"]
    _, landed = _run(executor, BASE, [EIFFEL], limit=change * 2)  # the same edit under a looser limit
    assert landed["kind"] == "result" and landed["checkpoint"] == chain["first"]["checkpoint"]
    _, reused = _run(executor, BASE, [EIFFEL], limit=change / 2)
    assert reused["kind"] == "over_limit"


def test_same_job_on_same_parent_reuses_the_checkpoint(chain):
    progress, again = _run(chain["executor"], BASE, [dict(EIFFEL, record_id="another id")])
    assert again == {**chain["first"], "reused": True} and progress == []


def test_a_fresh_worker_materialises_the_chain_and_continues_identically(chain, parts):
    """Rollback/resume property: base + replayed deltas + rebuilt K_p == the warm worker's state."""
    copy = parts["root"] / "store-copy"
    shutil.copytree(parts["root"] / "store", copy)
    fresh = _executor(parts, copy)
    second = chain["second"]["checkpoint"]
    fresh.collective_rpc("query", second, ["x"])
    for layer, weight in _edited_weights(fresh).items():
        torch.testing.assert_close(weight, chain["weights"][layer], rtol=1e-6, atol=1e-7)
    _, warm_third = _run(chain["executor"], second, [GOLD])
    _, fresh_third = _run(fresh, second, [GOLD])
    assert warm_third["checkpoint"] == fresh_third["checkpoint"] and not fresh_third["reused"]
    for layer in FAST_ENGINE["layers"]:
        name = f"models/tiny/checkpoints/{warm_third['checkpoint']}/layer{layer:03d}.safetensors"
        warm, cold = load_file(parts["root"] / "store" / name), load_file(copy / name)
        for key in ("U", "V", "K"):
            torch.testing.assert_close(cold[key], warm[key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name, options, columns", [
    ("targets", {"earlier_edits": "targets"}, 3),
    ("repair", {"repair_limit": 1, "repair_margin": 1e9}, 2),
    ("repair-batch-targets", {"repair_limit": 1, "repair_margin": 1e9, "repair_batch": "targets"}, 3),
    ("prompt-memory", {"prompt_memory_weight": 1.0}, 1),
    ("retarget", {"retarget_rounds": 1}, 2)])
def test_earlier_edits_by_target_or_prompt_continue_identically_in_a_fresh_worker(parts, name, options, columns):
    """With ``earlier_edits="targets"`` the stored requests and target values rejoin each later
    update; with ``repair_limit`` the least sure of them are solved back after it; with
    ``prompt_memory_weight`` the stored requests' prompts are replayed into K_p; with
    ``retarget_rounds`` each batch's targets are found again on the model it edited: a worker
    rebuilding the chain from the store computes the same next checkpoint."""
    warm_store, fresh_store = parts["root"] / f"store-{name}", parts["root"] / f"store-{name}-copy"
    warm = _executor(parts, warm_store)
    _, first = _run(warm, BASE, [EIFFEL], options=options)
    _, second = _run(warm, first["checkpoint"], [LOUVRE], options=options)
    shutil.copytree(warm_store, fresh_store)
    fresh = _executor(parts, fresh_store)
    _, warm_third = _run(warm, second["checkpoint"], [GOLD], options=options)
    _, fresh_third = _run(fresh, second["checkpoint"], [GOLD], options=options)
    assert warm_third["checkpoint"] == fresh_third["checkpoint"] and not fresh_third["reused"]
    for layer in FAST_ENGINE["layers"]:
        path = f"models/tiny/checkpoints/{warm_third['checkpoint']}/layer{layer:03d}.safetensors"
        a, b = load_file(warm_store / path), load_file(fresh_store / path)
        for key in ("U", "V", "K"):
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)
    # With targets each later batch solved for the earlier requests too, with repair for one of
    # them after it (and the batch's own again with repair_batch="targets"); a retarget round
    # solves the batch's request a second time: one factor column per request and pass; the
    # prompt memory only constrains.
    rank = load_file(warm_store / path)["U"].shape[1]
    assert rank == columns * FAST_ENGINE["update_rounds"]


def test_protected_prompts_are_part_of_the_checkpoint_identity(chain, parts):
    """A worker with protected prompts computes other weights for the same job, so it gives the
    job another checkpoint id (same store: nothing is wrongly reused) and records the prompts' digest."""
    protect = parts["root"] / "protect.txt"
    protect.write_text("The home city of the Louvre is Paris\nThe home city of Big Ben is London\n")
    store = parts["root"] / "store"
    protected = _executor(parts, store, protect=[str(protect)])
    _, result = _run(protected, BASE, [EIFFEL])
    assert result["checkpoint"] != chain["first"]["checkpoint"] and not result["reused"]
    record = CheckpointStore(store).read("tiny", result["checkpoint"])
    assert len(record.meta["protected_prompts"]) == 64
    shown = checkpoint_message(record, head="")
    assert shown.protected_prompts == record.meta["protected_prompts"]  # the API shows which prompts were kept
    name = "models/tiny/checkpoints/{}/layer002.safetensors"
    plain, kept = (load_file(store / name.format(c)) for c in (chain["first"]["checkpoint"], result["checkpoint"]))
    assert not torch.allclose(plain["V"], kept["V"])


def test_refused_edits_change_nothing(chain):
    executor = chain["executor"]
    head = chain["second"]["checkpoint"]
    executor.collective_rpc("query", head, ["x"])
    weights = _edited_weights(executor)
    too_long = {"prompt": "{} " + "word " * 60, "subject": "Gold", "target_new": "wood"}  # > 256 byte-tokens
    progress, rejected = _run(executor, head, [EIFFEL, too_long])
    assert rejected["kind"] == "rejected"
    assert [(v["index"], v["field"]) for v in rejected["violations"]] == [(1, "prompt")]
    assert "context" in rejected["violations"][0]["description"]
    for layer, weight in _edited_weights(executor).items():
        assert torch.equal(weight, weights[layer])
    _, bad_field = _run(executor, head, [{"prompt": "x" * (MAX_TEXT_CHARS + 1), "subject": "x", "target_new": "y"}])
    assert bad_field["kind"] == "rejected" and bad_field["violations"][0]["field"] == "prompt"


def test_export_writes_a_loadable_folder(chain, parts, tmp_path):
    from transformers import AutoModelForCausalLM

    executor = chain["executor"]
    second = chain["second"]["checkpoint"]
    files = executor.collective_rpc("export", second, str(tmp_path / "export"))[0]
    assert "config.json" in files and "editfleet-checkpoint.json" in files
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    for layer, weight in chain["weights"].items():
        torch.testing.assert_close(model.model.layers[layer].mlp.down_proj.weight, weight)
    with pytest.raises(FileExistsError):
        executor.collective_rpc("export", second, str(tmp_path / "export"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary leftovers


def test_a_corrupted_artifact_stops_materialising(chain, parts, tmp_path):
    copy = tmp_path / "store"
    shutil.copytree(parts["root"] / "store", copy)
    first = chain["first"]["checkpoint"]
    path = copy / "models" / "tiny" / "checkpoints" / first / "layer003.safetensors"
    path.write_bytes(path.read_bytes()[:-1] + b"\0")
    fresh = _executor(parts, copy)
    with pytest.raises(CorruptArtifact, match="layer003.safetensors"):
        fresh.collective_rpc("query", chain["second"]["checkpoint"], ["x"])
