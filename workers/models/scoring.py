"""Teacher-forced scoring of targets after prompts, batched, with logits only where needed.

Why this shape: CounterFact compares two targets after each prompt, and the prompt is most of
the tokens. Each prompt runs once; its KV cache is then shared by all its targets, whose
remaining tokens run as a short continuation (about half the compute of scoring every
(prompt, target) sequence separately). Logits are computed only at positions that predict a
target token (gemma3's vocabulary is 262k: full logits would be GBs). Positions are passed
explicitly, so padding and batch composition do not change the maths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from editfleet.workers.models.forward import head_logits, model_device


@dataclass(frozen=True)
class TargetScore:
    """How a model scores one target after one prompt.

    Attributes:
        nll: mean negative log-likelihood per target token (nats).
        top1: the greedy (argmax) token equals the target at every target position.
        token_accuracy: share of target positions whose argmax is the target token (zsRE).
        n_tokens: number of target tokens.
    """

    nll: float
    top1: bool
    token_accuracy: float
    n_tokens: int


def prompt_prefix(tok) -> list[int]:
    """Special tokens the tokenizer puts before a text (gemma/llama3: BOS; gpt2/smollm2: none).

    Prompts are tokenized without special tokens and given this prefix, so an EOS some
    tokenizers append never ends up between a prompt and its target.
    """
    with_special = tok("x")["input_ids"]
    plain = tok("x", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start:start + len(plain)] == plain:
            return list(with_special[:start])
    return []


def encode_prompts(tok, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of prompts as the model sees them (with the tokenizer's leading special tokens)."""
    prefix = prompt_prefix(tok)
    out = [prefix + ids for ids in tok(list(prompts), add_special_tokens=False)["input_ids"]]
    for prompt, ids in zip(prompts, out):
        if not ids:
            raise ValueError(f"prompt {prompt!r} tokenizes to no tokens")
    return out


def encode_targets(tok, targets: Sequence[str]) -> list[list[int]]:
    """Token ids of targets that follow a prompt after one space (``tok(" " + target)``).

    A target that already starts with a space is used as is. Byte-level BPE (gpt2, llama3,
    qwen, smollm2) and gemma3's tokenizer (no dummy prefix) both map " x" to the same tokens
    that " x" gets inside "prompt x".
    """
    texts = [t if t.startswith(" ") else " " + t for t in targets]
    out = tok(texts, add_special_tokens=False)["input_ids"]
    for target, ids in zip(targets, out):
        if not ids:
            raise ValueError(f"target {target!r} tokenizes to no tokens")
    return out


def pad_id(tok) -> int:
    """The id used to fill padded slots (never attended to, so any real id works)."""
    for candidate in (tok.pad_token_id, tok.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def _pad(seqs: Sequence[Sequence[int]], pad: int, left: bool = False,
         device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        cols = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[row, cols] = torch.tensor(seq, dtype=torch.long)
        mask[row, cols] = 1
    return ids.to(device), mask.to(device)


def run_prompts(model: nn.Module, prompt_ids: Sequence[Sequence[int]], pad: int):
    """One forward pass over left-padded prompts, keeping the KV cache for continuations.

    Left padding puts every prompt's last token in the same column, so a continuation's distance
    (in cache columns) to each prompt token equals its distance in positions: sliding-window
    layers (gemma3) then see exactly the tokens they would see unpadded. Positions are explicit.
    Returns ``(last_hidden, mask, lengths, cache)``: the final hidden state at each prompt's
    last token (batch, d_model), the attention mask, the prompt lengths and the cache.
    """
    ids, mask = _pad(prompt_ids, pad, left=True, device=model_device(model))
    lengths = mask.sum(1)
    positions = (torch.arange(ids.shape[1], device=ids.device) - (ids.shape[1] - lengths)[:, None]).clamp(min=0)
    out = model.base_model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    return out.last_hidden_state[:, -1], mask, lengths, out.cache


def continue_rows(model: nn.Module, cache, rows: torch.Tensor, prompt_mask: torch.Tensor,
                  prompt_lengths: torch.Tensor, new_ids: torch.Tensor, new_mask: torch.Tensor,
                  offset: int = 0) -> torch.Tensor:
    """Run ``new_ids`` after the cached prompts ``rows`` (repeats allowed); final hidden states.

    ``new_ids`` is right-padded (``new_mask``). ``offset`` is how many tokens after the prompt
    the cache already holds (earlier generation steps); ``new_mask`` then starts with ``offset``
    columns of ones for them. The cache is re-indexed in place to ``rows`` and grows by ``new_ids``.
    """
    device = prompt_mask.device
    rows, new_ids, new_mask = rows.to(device), new_ids.to(device), new_mask.to(device)
    if not torch.equal(rows, torch.arange(prompt_mask.shape[0], device=device)):
        cache.batch_select_indices(rows)
    mask = torch.cat([prompt_mask[rows], new_mask], dim=1)
    positions = prompt_lengths[rows, None] + offset + torch.arange(new_ids.shape[1], device=device)
    out = model.base_model(input_ids=new_ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
    return out.last_hidden_state


def _score_batch(model: nn.Module, prompt_ids: Sequence[Sequence[int]],
                 target_ids: Sequence[Sequence[Sequence[int]]], pad: int) -> list[list[TargetScore]]:
    last, prompt_mask, lengths, cache = run_prompts(model, prompt_ids, pad)
    first_logp = torch.log_softmax(head_logits(model, last), dim=-1)
    first_best = first_logp.argmax(-1)

    # Per (prompt, target): log-probs and correctness of each target token, filled in two steps.
    logps: list[list[list[float]]] = []
    hits: list[list[list[bool]]] = []
    cont_rows, cont_seqs, cont_slots = [], [], []
    for row, targets in enumerate(target_ids):
        logps.append([])
        hits.append([])
        for j, ids in enumerate(targets):
            logps[row].append([first_logp[row, ids[0]].item()])
            hits[row].append([first_best[row].item() == ids[0]])
            if len(ids) > 1:
                cont_rows.append(row)
                cont_seqs.append(ids[:-1])
                cont_slots.append((row, j))
    if cont_rows:
        new_ids, new_mask = _pad(cont_seqs, pad, device=prompt_mask.device)
        hidden = continue_rows(model, cache, torch.tensor(cont_rows), prompt_mask, lengths, new_ids, new_mask)
        q_idx, col_idx = new_mask.nonzero(as_tuple=True)
        logp = torch.log_softmax(head_logits(model, hidden[q_idx, col_idx]), dim=-1)
        best = logp.argmax(-1)
        for k, (q, col) in enumerate(zip(q_idx.tolist(), col_idx.tolist())):
            row, j = cont_slots[q]
            token = target_ids[row][j][col + 1]
            logps[row][j].append(logp[k, token].item())
            hits[row][j].append(best[k].item() == token)
    return [
        [TargetScore(nll=-sum(lp) / len(lp), top1=all(h), token_accuracy=sum(h) / len(h), n_tokens=len(lp))
         for lp, h in zip(logps[row], hits[row])]
        for row in range(len(target_ids))
    ]


@torch.no_grad()
def score_targets(model: nn.Module, tok, prompts: Sequence[str], targets: Sequence[Sequence[str]],
                  batch_size: int = 32) -> list[list[TargetScore]]:
    """Score ``targets[i]`` (any number of strings) after ``prompts[i]``, teacher forced.

    ``batch_size`` is the number of prompts per forward pass. Prompts are grouped by length to
    limit padding; results come back in input order. Deterministic for a given input.
    """
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} target lists")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prompt_ids = encode_prompts(tok, prompts)
    flat = encode_targets(tok, [t for group in targets for t in group]) if any(targets) else []
    target_ids, at = [], 0
    for group in targets:
        target_ids.append(flat[at:at + len(group)])
        at += len(group)
    pad = pad_id(tok)
    order = sorted(range(len(prompts)), key=lambda i: len(prompt_ids[i]))
    results: list[list[TargetScore]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        idx = [i for i in order[start:start + batch_size] if target_ids[i]]
        if not idx:
            continue
        scores = _score_batch(model, [prompt_ids[i] for i in idx], [target_ids[i] for i in idx], pad)
        for i, s in zip(idx, scores):
            results[i] = s
    return results
