"""Subject drift: how far an edit stream moved what the model says right after a subject's name.

CounterFact's specificity reads one neighbour prompt per case, and efficacy and generalization
read the edited relation only. What the model says about an edited subject otherwise (its
"essence", which the target loss's KL term guards on ``"{subject} is a"``) and about subjects no
edit touched is measured here: the next-token distribution after a few generic prompts that no
loss reads, before and after, compared by KL(before || after) in nats and by whether the most
likely token stayed the same. Only the ``TOP`` tokens most likely before are kept, each as its
own outcome, and the rest of the vocabulary as one: the KL of those coarsened distributions,
a lower bound of the full one (merging outcomes never raises a KL), at 48 kB per prompt instead
of 1 MB on Gemma 3's 262k vocabulary, so every edited subject of a long stream can be kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from editfleet.workers.models.forward import head_logits
from editfleet.workers.models.scoring import encode_prompts, pad_id, run_prompts

# Generic continuations of a bare subject; "{} is a" is left out because the target loss holds it.
DRIFT_PROMPTS = ("{} is", "{} was", "{} is known for")
TOP = 4096


@dataclass
class SubjectSnapshot:
    """The next-token distribution after every (subject, prompt), taken before a stream."""

    prompts: list[str]
    top_logp: torch.Tensor   # (prompts, k) log-probabilities of the k tokens most likely before
    top_ids: torch.Tensor    # (prompts, k) their ids, most likely first
    rest_logp: torch.Tensor  # (prompts,) log of the probability of every other token together


def subject_prompts(subjects: Sequence[str], templates: Sequence[str] = DRIFT_PROMPTS) -> list[str]:
    return [t.format(s) for s in subjects for t in templates]


@torch.no_grad()
def next_token_logprobs(model: nn.Module, tok, prompts: Sequence[str], batch_size: int = 32) -> Iterator[torch.Tensor]:
    """Log-softmax of the next token after each prompt, float32 on the CPU, ``batch_size`` prompts
    at a time (a whole vocabulary per prompt: never all at once)."""
    pad = pad_id(tok)
    for at in range(0, len(prompts), batch_size):
        last = run_prompts(model, encode_prompts(tok, prompts[at:at + batch_size]), pad)[0]
        yield head_logits(model, last).log_softmax(-1).cpu()


def _rest(top_logp: torch.Tensor) -> torch.Tensor:
    return torch.log1p(-top_logp.exp().sum(-1).clamp(max=1.0)).clamp_min(-30.0)


def snapshot(model: nn.Module, tok, subjects: Sequence[str], top: int = TOP) -> SubjectSnapshot:
    prompts = subject_prompts(subjects)
    values, ids = [], []
    for logp in next_token_logprobs(model, tok, prompts):
        best = logp.topk(min(top, logp.shape[-1]), dim=-1)
        values.append(best.values)
        ids.append(best.indices)
    top_logp = torch.cat(values)
    return SubjectSnapshot(prompts, top_logp, torch.cat(ids), _rest(top_logp))


def drift(model: nn.Module, tok, before: SubjectSnapshot, batch_size: int = 32) -> dict[str, float]:
    """``kl``: mean KL(before || now) over the snapshot's prompts (coarsened as the module says);
    ``top1_kept``: the share whose most likely next token is unchanged."""
    kl, kept = [], []
    for at, now in zip(range(0, len(before.prompts), batch_size),
                       next_token_logprobs(model, tok, before.prompts, batch_size)):
        p0, ids, rest0 = (x[at:at + batch_size] for x in (before.top_logp, before.top_ids, before.rest_logp))
        now_top = now.gather(1, ids)
        kl.append((p0.exp() * (p0 - now_top)).sum(-1) + rest0.exp() * (rest0 - _rest(now_top)))
        kept.append(ids[:, 0] == now.argmax(-1))
    return {"kl": float(torch.cat(kl).clamp_min(0).mean()), "top1_kept": float(torch.cat(kept).float().mean())}
