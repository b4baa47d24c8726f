"""The paper's evaluation protocol (ALGORITHM.md section 4), as fractions in 0..1.

Meant to run once over all cases after a whole stream of edits (scoring each edit right
after itself inflates the numbers): every prompt of every case goes through one batched,
teacher-forced scoring pass. Per metric, each case's score is the mean over its prompts and the
result is the mean over cases, as in the reference ``summarize`` (CounterFact and zsRE here
have one prompt of each kind per case, so this is also the share of prompts).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from editfleet.workers.evaluation.data import EvalCase, data_dir
from editfleet.workers.evaluation.fluency import fluency, greedy_generate
from editfleet.workers.models.forward import context_length, final_hidden, head_logits, model_device
from editfleet.workers.models.scoring import TargetScore, prompt_prefix, score_targets

WIKITEXT_TEST = Path("wikitext-2-raw") / "wiki.test.raw"
# The default perplexity text is read from this head of WIKITEXT_TEST only, and the default
# statistics corpus starts past it (workers/editing/engine.py): the two never share a token.
PERPLEXITY_CHARS = 50_000


def _case_means(cases: Sequence[EvalCase], scores: Sequence[Sequence[Sequence[TargetScore]]],
                value: Callable[[Sequence[TargetScore]], float]) -> float:
    """Mean over cases (with prompts of this kind) of the mean over their prompts."""
    per_case = [sum(value(s) for s in prompts) / len(prompts) for prompts in scores if prompts]
    if not per_case:
        raise ValueError(f"none of the {len(cases)} cases has prompts of this kind")
    return sum(per_case) / len(per_case)


def _score_kinds(model: nn.Module, tok, cases: Sequence[EvalCase], targets_for: Callable[[EvalCase, str], list[str]],
                 batch_size: int) -> dict[str, list[list[list[TargetScore]]]]:
    """Score every prompt of every case in one batched pass; split back per kind and case."""
    kinds = ("rewrite", "paraphrase", "neighborhood")
    prompts, targets, slots = [], [], []
    for c, case in enumerate(cases):
        by_kind = (case.rewrite_prompts, case.paraphrase_prompts, case.neighborhood_prompts)
        for kind, kind_prompts in zip(kinds, by_kind):
            for prompt in kind_prompts:
                prompts.append(prompt)
                targets.append(targets_for(case, kind))
                slots.append((kind, c))
    scored = score_targets(model, tok, prompts, targets, batch_size)
    out: dict[str, list[list[list[TargetScore]]]] = {k: [[] for _ in cases] for k in kinds}
    for (kind, c), result in zip(slots, scored):
        out[kind][c].append(result)
    return out


def _by_group(cases: Sequence[EvalCase], scores: dict[str, list[list[list[TargetScore]]]], group: int,
              metrics: dict[str, tuple[str, Callable[[Sequence[TargetScore]], float]]]) -> list[dict[str, float]]:
    """The metrics again per run of ``group`` consecutive cases (one per batch of a sequential
    stream: the first group's figures after the whole stream say how well early edits held)."""
    if group < 1:
        raise ValueError(f"group must be >= 1, got {group}")
    return [{name: _case_means(cases[at:at + group], scores[kind][at:at + group], value)
             for name, (kind, value) in metrics.items()} for at in range(0, len(cases), group)]


def evaluate_counterfact(model: nn.Module, tok, cases: Sequence[EvalCase], batch_size: int = 32,
                         fluency_cases: int | None = 100, gen_tokens: int = 48,
                         gen_batch_size: int = 128, group: int | None = None) -> dict[str, Any]:
    """CounterFact efficacy / generalization / specificity (+ top-1 variants) and fluency.

    NLL comparisons use mean token NLL of ``target_new`` vs ``target_true`` (neighbourhood
    prompts: vs ``neighborhood_answer``). ``*_top1``: the target is the greedy teacher-forced
    answer (neighbourhood: the neighbour's answer still is). ``fluency`` is the raw weighted
    n-gram entropy (paper x100) of ``gen_tokens`` greedy tokens after the rewrite prompts of the
    first ``fluency_cases`` cases (None: all cases; 0: not measured, reported as None).
    ``batch_size`` counts prompts per scoring pass; generation runs ``gen_batch_size`` rows per
    step (one token per row per step: wide batches mean fewer, better-filled matrix products).
    ``group``: also report efficacy, generalization and specificity per run of that many
    consecutive cases, as ``by_group`` (a list).
    """
    if not cases:
        raise ValueError("no cases to evaluate")
    missing = [c.case_id for c in cases if c.target_true is None]
    if missing:
        raise ValueError(f"CounterFact cases need target_true; missing in cases {missing[:10]}")

    def targets_for(case: EvalCase, kind: str) -> list[str]:
        return [case.target_new, case.neighborhood_answer if kind == "neighborhood" else case.target_true]

    scores = _score_kinds(model, tok, cases, targets_for, batch_size)
    new_wins = lambda s: float(s[0].nll < s[1].nll)  # noqa: E731
    true_wins = lambda s: float(s[1].nll < s[0].nll)  # noqa: E731
    main = {"efficacy": ("rewrite", new_wins), "generalization": ("paraphrase", new_wins),
            "specificity": ("neighborhood", true_wins)}
    result: dict[str, Any] = {
        **{name: _case_means(cases, scores[kind], value) for name, (kind, value) in main.items()},
        "efficacy_top1": _case_means(cases, scores["rewrite"], lambda s: float(s[0].top1)),
        "generalization_top1": _case_means(cases, scores["paraphrase"], lambda s: float(s[0].top1)),
        "specificity_top1": _case_means(cases, scores["neighborhood"], lambda s: float(s[1].top1)),
        "fluency": None,
        "n_cases": len(cases),
    }
    if group is not None:
        result["by_group"] = _by_group(cases, scores, group, main)
    chosen = cases if fluency_cases is None else cases[:fluency_cases]
    prompts = [p for case in chosen for p in case.rewrite_prompts]
    if prompts:
        result["fluency"] = fluency(greedy_generate(model, tok, prompts, gen_tokens, gen_batch_size))
    return result


def evaluate_zsre(model: nn.Module, tok, cases: Sequence[EvalCase], batch_size: int = 32,
                  group: int | None = None) -> dict[str, Any]:
    """zsRE: mean teacher-forced per-token top-1 accuracy of ``target_new`` on the question
    (efficacy) and its rephrasing (generalization), and of ``loc_ans`` on the unrelated
    question (specificity); ``group`` as in ``evaluate_counterfact``."""
    if not cases:
        raise ValueError("no cases to evaluate")

    def targets_for(case: EvalCase, kind: str) -> list[str]:
        return [case.neighborhood_answer if kind == "neighborhood" else case.target_new]

    scores = _score_kinds(model, tok, cases, targets_for, batch_size)
    accuracy = lambda s: s[0].token_accuracy  # noqa: E731
    main = {"efficacy": ("rewrite", accuracy), "generalization": ("paraphrase", accuracy),
            "specificity": ("neighborhood", accuracy)}
    result: dict[str, Any] = {name: _case_means(cases, scores[kind], value) for name, (kind, value) in main.items()}
    result["n_cases"] = len(cases)
    if group is not None:
        result["by_group"] = _by_group(cases, scores, group, main)
    return result


def _first_tokens(tok, text: str, max_tokens: int) -> list[int]:
    """The first ``max_tokens`` tokens of ``text``, tokenizing only a prefix long enough for them."""
    chars = max_tokens * 8
    while True:
        ids = tok(text[:chars], add_special_tokens=False)["input_ids"]
        # A margin keeps the cut (which may split a word) clear of the tokens we keep.
        if len(ids) > max_tokens + 16 or chars >= len(text):
            return ids[:max_tokens]
        chars *= 2


def heldout_text() -> str:
    """The default perplexity text: the first ``PERPLEXITY_CHARS`` characters of ``WIKITEXT_TEST``
    in the data folder (four articles), which the default statistics corpus leaves out."""
    return (data_dir() / WIKITEXT_TEST).read_text(encoding="utf-8")[:PERPLEXITY_CHARS]


@torch.no_grad()
def perplexity(model: nn.Module, tok, text_or_path: str | Path | None = None, max_tokens: int | None = 1024,
               window: int = 512, batch_size: int = 2, head_chunk: int = 256) -> dict[str, float | int]:
    """Perplexity on a fixed text: the same tokens every call, so pre/post-edit values compare.

    ``text_or_path``: a ``Path`` is read as a file, a ``str`` is the text itself; default
    the first ``PERPLEXITY_CHARS`` characters of ``<data_dir>/wikitext-2-raw/wiki.test.raw``,
    which the default statistics corpus leaves out. Its first ``max_tokens`` tokens (None: all of
    them; the default 1024 tokens are the held-out text's first article alone) are cut into
    non-overlapping windows of ``window`` tokens (fewer if the model's context is shorter), each preceded by the tokenizer's BOS when it
    uses one (then every token is predicted; otherwise each window's first token is context).
    The LM head runs on ``head_chunk`` positions at a time to bound memory (262k vocab).
    """
    if (max_tokens is not None and max_tokens < 2) or window < 2:
        raise ValueError(f"max_tokens and window must be >= 2, got {max_tokens} and {window}")
    held_out = text_or_path is None
    if held_out:
        text = heldout_text()
    else:
        text = text_or_path.read_text(encoding="utf-8") if isinstance(text_or_path, Path) else text_or_path
    ids = _first_tokens(tok, text, max_tokens) if max_tokens is not None else \
        tok(text, add_special_tokens=False)["input_ids"]
    if held_out and max_tokens is not None and len(ids) < max_tokens:
        raise ValueError(f"max_tokens={max_tokens}: the held-out perplexity text ({PERPLEXITY_CHARS} characters "
                         f"of {WIKITEXT_TEST}) has only {len(ids)} tokens")
    prefix = prompt_prefix(tok)
    context = context_length(model)
    if context:  # a window never runs past the model's positions (tiny test models have 256)
        window = min(window, context - len(prefix))
    windows = [prefix + ids[i:i + window] for i in range(0, len(ids), window)]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise ValueError(f"text too short: {len(ids)} tokens")
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(windows), batch_size):
        chunk = windows[start:start + batch_size]
        width = max(len(w) for w in chunk)
        input_ids = torch.zeros((len(chunk), width), dtype=torch.long, device=model_device(model))
        mask = torch.zeros_like(input_ids)
        for row, w in enumerate(chunk):
            input_ids[row, :len(w)] = torch.tensor(w)
            mask[row, :len(w)] = 1
        hidden = final_hidden(model, input_ids, mask)
        rows, cols = mask[:, 1:].nonzero(as_tuple=True)  # positions cols + 1 are predicted from cols
        for at in range(0, len(rows), head_chunk):
            r, c = rows[at:at + head_chunk], cols[at:at + head_chunk]
            logits = head_logits(model, hidden[r, c])
            total_nll += torch.nn.functional.cross_entropy(logits, input_ids[r, c + 1], reduction="sum").item()
        total_tokens += len(rows)
    nll = total_nll / total_tokens
    return {"nll": nll, "perplexity": math.exp(nll), "tokens": total_tokens}
