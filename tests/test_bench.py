"""``editfleet bench`` end to end on a tiny local model: the JSON it writes, the per-batch
perplexity it tracks and the state it saves (which must rebuild exactly the model it scored)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from editfleet.workers import bench
from editfleet.workers.editing.engine import Editor
from editfleet.workers.evaluation.data import data_dir
from editfleet.workers.evaluation.metrics import perplexity
from editfleet.workers.models.registry import load_model
from editfleet.workers.models.tiny import save_tiny

FACTS = [
    ("The mother tongue of {} is", "Danielle Darrieux", "French", "English"),
    ("{} is located in the continent of", "Kerguelen Islands", "Antarctica", "Asia"),
    ("{} plays the position of", "Brian Dawkins", "safety", "goaltender"),
    ("The capital of {} is", "Norway", "Oslo", "Lyon"),
    ("{} was created in the country of", "Toyota", "Japan", "Italy"),
]


def _write_counterfact(path: Path) -> Path:
    records = [{"case_id": i, "prompt": prompt, "subject": subject, "ground_truth": true, "target_new": new,
                "rephrase_prompt": "In short, " + prompt.replace("{}", subject), "locality_prompt": "The sky is",
                "locality_ground_truth": "blue"}
               for i, (prompt, subject, true, new) in enumerate(FACTS)]
    records.insert(2, {**records[0], "case_id": 99, "target_new": ""})  # refused, before the 3rd case
    path.write_text(json.dumps(records))
    return path


def _tiny_model_dir(tmp_path: Path) -> Path:
    """A tiny llama saved as a local model folder; skips when the evaluation data is absent."""
    try:
        data_dir()
    except FileNotFoundError as exc:
        pytest.skip(f"evaluation data not available: {exc}")
    return save_tiny(tmp_path / "model", "llama", seed=1)


def test_bench_writes_figures_tracks_perplexity_and_saves_a_rebuildable_state(tmp_path):
    model_dir = _tiny_model_dir(tmp_path)
    out, state = tmp_path / "bench.json", tmp_path / "state"
    threads = torch.get_num_threads()
    try:
        assert bench.main([
            "--model", str(model_dir), "--data", str(_write_counterfact(tmp_path / "cf.json")),
            "--edits", "4", "--batch", "2", "--seed", "0", "--threads", "1", "--fluency-cases", "2",
            "--cache-dir", str(tmp_path / "stats"), "--set", "stats_tokens=2000", "--set", "v_max_steps=3",
            "--track-perplexity", "--compare-loop", "--save-state", str(state), "--json", str(out),
        ]) == 0
    finally:
        torch.set_num_threads(threads)
    report = json.loads(out.read_text())
    for phase in ("pre", "post"):
        assert all(0 <= report[phase][k] <= 1 for k in ("efficacy", "generalization", "specificity"))
        assert report[phase]["fluency"] > 0 and report[phase]["perplexity"] > 1 and report[phase]["perplexity_heldout"] > 1
        # Per batch: two batches of two cases, whose means are the whole run's figures.
        by_batch = report[phase]["by_batch"]
        assert len(by_batch) == 2
        for k in ("efficacy", "generalization", "specificity"):
            assert (by_batch[0][k] + by_batch[1][k]) / 2 == pytest.approx(report[phase][k])
    assert report["edits"] == 4 and report["rejected_records"] == 1
    # The one valid case after the four edited ones is the unedited prompt whose fluency is scored.
    assert report["fluency_unedited_cases"] == 1
    assert report["pre"]["fluency_unedited"] > 0 and report["post"]["fluency_unedited"] > 0
    # What the model says after each subject's name moved, for the edited subjects and the untouched one.
    drift = report["post"]["subject_drift"]
    assert set(drift) == {"edited", "unedited"} and drift["edited"]["kl"] > 0
    assert all(d["kl"] >= 0 and 0 <= d["top1_kept"] <= 1 for d in drift.values())
    assert set(report["timing"]) >= {"seconds_per_edit", "stats_seconds", "targets_seconds", "update_seconds",
                                     "eval_seconds", "track_seconds", "warmup_targets_seconds"}
    t = report["timing"]
    assert t["batched_speedup"] == pytest.approx(t["loop_targets_seconds"] / t["batched_targets_seconds"])
    assert report["device"] == "cpu"
    # How much the edits moved each edited projection's output, on the statistics' keys and on the held-out text's.
    change = report["post"]["output_change"]
    assert set(change) == {str(i) for i in report["config"]["layers"]}
    assert all(c["heldout"] > 0 and c["ratio"] == pytest.approx(c["heldout"] / c["statistics"]) for c in change.values())
    # One perplexity per batch; the last is the model the post-edit evaluation scored.
    assert len(report["perplexity_by_batch"]) == 2
    assert report["perplexity_by_batch"][-1] == pytest.approx(report["post"]["perplexity"], rel=1e-6)
    assert report["perplexity_by_batch"][-1] != pytest.approx(report["pre"]["perplexity"], rel=1e-9)
    assert report["post"]["perplexity_heldout"] != pytest.approx(report["pre"]["perplexity_heldout"], rel=1e-9)
    # The saved state rebuilds, on the base model, exactly the model that was scored.
    base, tok = load_model(str(model_dir))
    editor = Editor.load_state(base, tok, state, cache_dir=tmp_path / "stats")
    assert len(editor.history) == 2 and report["state"] == str(state)
    assert perplexity(base, tok)["perplexity"] == pytest.approx(report["post"]["perplexity"], rel=1e-6)


def test_bench_reads_the_statistics_from_the_corpus_and_the_protected_prompts_it_is_given(tmp_path):
    model_dir = _tiny_model_dir(tmp_path)
    corpus = tmp_path / "facts.txt"
    corpus.write_text(" ".join(f"{s} speaks {t}." for _, s, t, _ in FACTS * 200))
    with pytest.raises(SystemExit, match="--corpus: statistics corpus not found: .*missing.txt"):
        bench.main(["--model", str(model_dir), "--corpus", str(tmp_path / "missing.txt")])
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(SystemExit, match="--protect: protected prompts file .*blank.txt has no prompt"):
        bench.main(["--model", str(model_dir), "--protect", str(tmp_path / "blank.txt")])
    protect = tmp_path / "protect.txt"
    protect.write_text("Which language does Danielle Darrieux speak? French\nWhere is Norway?\n")
    out, stats = tmp_path / "bench.json", tmp_path / "stats"
    threads = torch.get_num_threads()
    try:
        assert bench.main([
            "--model", str(model_dir), "--data", str(_write_counterfact(tmp_path / "cf.json")), "--edits", "2",
            "--batch", "2", "--threads", "1", "--fluency-cases", "2", "--cache-dir", str(stats),
            "--corpus", str(corpus), "--set", "stats_tokens=1000", "--set", "v_max_steps=2", "--json", str(out),
            "--protect", str(protect),
        ]) == 0
    finally:
        torch.set_num_threads(threads)
    report = json.loads(out.read_text())
    assert report["corpus"] == [str(corpus)]
    assert report["protect"] == {"files": [str(protect)], "prompts": 2}
    # An editor given the same corpus finds every statistic in the cache: the bench read that file.
    cached = sorted(stats.rglob("*.safetensors"))
    model, tok = load_model(str(model_dir))
    editor = Editor.for_model(model, tok, cache_dir=stats, corpus=[corpus], stats_tokens=1000)
    editor.projectors()
    assert sorted(stats.rglob("*.safetensors")) == cached
    Editor.for_model(model, tok, cache_dir=stats, stats_tokens=1000).statistics()  # the default corpus
    assert len(sorted(stats.rglob("*.safetensors"))) > len(cached)
    with pytest.raises(FileNotFoundError, match="statistics corpus not found: .*missing.txt"):
        Editor.for_model(model, tok, cache_dir=stats, corpus=[corpus, tmp_path / "missing.txt"])
