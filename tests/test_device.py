"""The engine, the evaluation and the worker on a GPU give what they give on the CPU.

The GPU tests run where CUDA is visible (skipped elsewhere, e.g. in CI); the device-name checks
run everywhere.
"""

from __future__ import annotations

import pytest
import torch

from editfleet.scheduler.config import SchedulerConfig
from editfleet.workers import bench
from editfleet.workers.editing.engine import Editor
from editfleet.workers.evaluation.data import EvalCase
from editfleet.workers.evaluation.fluency import greedy_generate
from editfleet.workers.evaluation.metrics import evaluate_counterfact, perplexity
from editfleet.workers.executor import InProcessExecutor
from editfleet.workers.models.registry import resolve_device
from editfleet.workers.models.tiny import tiny_model
from engine_support import REQUESTS, TINY, edit_model, projection_weights, write_corpus
from service_support import EIFFEL, FAST_ENGINE, LOUVRE, save_model

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


def _editor(family: str, device: str, cache, corpus, **overrides) -> Editor:
    model, tok = edit_model(family)
    model.to(device)
    return Editor.for_model(model, tok, cache_dir=cache, corpus=[corpus], **{**TINY, **overrides})


def _cases() -> list[EvalCase]:
    return [EvalCase(request=r, rewrite_prompts=(r.text,), paraphrase_prompts=(f"In short, {r.text}",),
                     neighborhood_prompts=(r.prompt.replace("{}", "Berlin"),), target_new=r.target_new,
                     target_true=r.target_true, neighborhood_answer=r.target_true, case_id=n, kind="counterfact")
            for n, r in enumerate(REQUESTS)]


def test_device_names_are_checked():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="not a torch device"):
        resolve_device("tpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(SystemExit, match="--device: device 'tpu-please' is not a torch device"):
        bench.main(["--device", "tpu-please"])
    with pytest.raises(ValueError, match="worker_device"):
        SchedulerConfig(store_dir="s", worker_device="gpu")
    assert SchedulerConfig(store_dir="s", worker_device="cuda").actor_options()["num_gpus"] == 1
    assert "num_gpus" not in SchedulerConfig(store_dir="s").actor_options()


@gpu
@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
@pytest.mark.parametrize("earlier_edits", ["keys", "targets"])
def test_editing_on_the_gpu_matches_the_cpu(tmp_path, corpus, family, earlier_edits):
    """Two sequential batches (float32 targets): the same weights up to float32 rounding, and a
    state saved from the GPU resumes on the CPU."""
    results = {}
    for device in ("cpu", "cuda"):
        editor = _editor(family, device, tmp_path / device, corpus, earlier_edits=earlier_edits)
        first = editor.apply(REQUESTS[:2])
        second = editor.apply(REQUESTS[2:])
        assert editor.contexts == results.get("cpu", {}).get("contexts", editor.contexts)
        results[device] = {"weights": {i: w.cpu() for i, w in projection_weights(editor).items()},
                           "probs": first.target_prob + second.target_prob, "contexts": editor.contexts,
                           "editor": editor}
    base = {i: w.cpu() for i, w in results["cpu"]["editor"]._base.items()}
    for i, w in results["cpu"]["weights"].items():
        delta_cpu, delta_gpu = w - base[i], results["cuda"]["weights"][i] - base[i]
        assert float((delta_gpu - delta_cpu).norm() / delta_cpu.norm()) < 1e-3, i
    assert results["cuda"]["probs"] == pytest.approx(results["cpu"]["probs"], abs=1e-3)

    gpu_editor = results["cuda"]["editor"]
    gpu_editor.save_state(tmp_path / "state")
    model, tok = edit_model(family)
    resumed = Editor.load_state(model, tok, tmp_path / "state", tmp_path / "cpu", [corpus])
    for i, w in projection_weights(resumed).items():
        assert torch.allclose(w, results["cuda"]["weights"][i], rtol=0, atol=1e-6), i


@gpu
def test_evaluation_on_the_gpu_matches_the_cpu():
    model, tok = tiny_model("gemma3", seed=0)
    cases = _cases()
    on_cpu = (evaluate_counterfact(model, tok, cases, fluency_cases=2), perplexity(model, tok, "a b c d " * 64),
              greedy_generate(model, tok, [c.request.text for c in cases], new_tokens=8))
    model.to("cuda")
    on_gpu = (evaluate_counterfact(model, tok, cases, fluency_cases=2), perplexity(model, tok, "a b c d " * 64),
              greedy_generate(model, tok, [c.request.text for c in cases], new_tokens=8))
    for key in ("efficacy", "generalization", "specificity", "fluency"):
        assert on_gpu[0][key] == pytest.approx(on_cpu[0][key], abs=1e-6), key
    assert on_gpu[1]["nll"] == pytest.approx(on_cpu[1]["nll"], rel=1e-4)
    assert on_gpu[2] == on_cpu[2]


@gpu
def test_a_gpu_worker_writes_checkpoints_a_cpu_worker_continues(tmp_path, corpus):
    """Checkpoint files hold CPU tensors: a chain edited on a GPU worker is materialised and
    continued by a CPU worker, and both see the same edited model."""
    model_dir = save_model(tmp_path / "tiny-llama")

    def executor(device: str) -> InProcessExecutor:
        return InProcessExecutor({"model": str(model_dir), "name": "tiny", "store_dir": str(tmp_path / "store"),
                                  "home": str(tmp_path / "home"), "corpus": [str(corpus)],
                                  "engine_overrides": {**FAST_ENGINE, "target_dtype": "float32"},
                                  "device": device})

    on_gpu, on_cpu = executor("cuda"), executor("cpu")
    first = list(on_gpu.collective_stream("run_edit", "base", [EIFFEL], "alphaedit", {}))[-1]
    assert first["kind"] == "result", first
    second = list(on_cpu.collective_stream("run_edit", first["checkpoint"], [LOUVRE], "alphaedit", {}))[-1]
    assert second["kind"] == "result", second
    prompt = EIFFEL["prompt"]

    def rome(executor, ckpt) -> float:
        [out] = executor.collective_rpc("query", ckpt, [prompt], ["Rome"])[0]
        return out["targets"][0]["probability"]

    assert first["scores"]["efficacy"] == 1.0
    edited = {device: rome(ex, second["checkpoint"]) for device, ex in (("cuda", on_gpu), ("cpu", on_cpu))}
    assert edited["cuda"] == pytest.approx(edited["cpu"], rel=1e-3)
    assert edited["cpu"] > 10 * rome(on_cpu, "base")
