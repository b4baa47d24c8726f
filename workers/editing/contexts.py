"""Context prefixes: the fact is written in several short contexts so the edit does not hinge on
the prompt starting the text. As in the reference code, a few short generations from the model
itself, plus the bare prompt; generated once (seeded) and then kept in the editing state, so a
resumed editor uses exactly the same ones.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from editfleet.workers.models.forward import final_hidden, head_logits, model_device

STARTS = ("The", "Therefore", "Because", "I", "You")
# What a plain prefix token may decode to: a word, with spaces and light punctuation around it.
# Gemma 3 often samples HTML tags, digits, line breaks or bare spaces here ("The <strong>201."),
# and every edit of a state shares the same few prefixes.
PLAIN = re.compile(r"[ ,;:'-]*[A-Za-z][ A-Za-z,;:'-]*")
# Candidates searched for plain tokens, best first.
PLAIN_CANDIDATES = 64


@torch.no_grad()
def generate_contexts(model: nn.Module, tokenizer, n: int, tokens: int, seed: int, top_k: int = 5,
                      plain: bool = False) -> list[str]:
    """``["{}"]`` followed by ``n`` templates ``"<generated text>. {}"`` (top-k sampling).

    ``plain`` samples among the ``top_k`` most likely tokens that are plain words (``PLAIN``),
    searched in the model's first ``PLAIN_CANDIDATES`` choices; a step with no plain candidate
    keeps the unfiltered top-k.

    A plain loop over a few short sequences: cheaper than ``generate``'s cache set-up, which for
    Gemma 3 allocates for its whole context window. Sampling runs on the CPU (one seeded
    generator), so a model on a GPU writes the same contexts.
    """
    device = model_device(model)
    generator = torch.Generator().manual_seed(seed)
    out = ["{}"]
    for i in range(n):
        ids = torch.tensor([tokenizer(STARTS[i % len(STARTS)])["input_ids"]], device=device)
        prompt_len = ids.shape[1]
        for _ in range(tokens):
            logits = head_logits(model, final_hidden(model, ids, torch.ones_like(ids))[:, -1])
            values, indices = _candidates(logits[0], tokenizer, top_k, plain)
            choice = torch.multinomial(values.cpu().softmax(-1), 1, generator=generator)
            ids = torch.cat([ids, indices[choice.to(device)].view(1, 1)], dim=1)
        text = tokenizer.decode(ids[0, prompt_len:], skip_special_tokens=True)
        text = STARTS[i % len(STARTS)] + text
        text = " ".join(text.replace("{", " ").replace("}", " ").split())
        out.append(text + ". {}")
    return out


def _candidates(logits: torch.Tensor, tokenizer, top_k: int, plain: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits and ids sampling chooses among: the top-k, or the top-k plain tokens."""
    if not plain:
        return logits.topk(top_k)
    values, indices = logits.topk(min(PLAIN_CANDIDATES, logits.numel()))
    keep = [j for j, t in enumerate(indices.tolist()) if PLAIN.fullmatch(tokenizer.decode([t]))][:top_k]
    if not keep:
        return values[:top_k], indices[:top_k]
    keep_t = torch.tensor(keep, device=values.device)
    return values[keep_t], indices[keep_t]
