"""Context prefixes: the fact is written in several short contexts so the edit does not hinge on
the prompt starting the text. As in the reference code, a few short generations from the model
itself, plus the bare prompt; generated once (seeded) and then kept in the editing state, so a
resumed editor uses exactly the same ones.
"""

from __future__ import annotations

import torch
from torch import nn

from editfleet.workers.models.forward import final_hidden, head_logits, model_device

STARTS = ("The", "Therefore", "Because", "I", "You")


@torch.no_grad()
def generate_contexts(model: nn.Module, tokenizer, n: int, tokens: int, seed: int, top_k: int = 5) -> list[str]:
    """``["{}"]`` followed by ``n`` templates ``"<generated text>. {}"`` (top-k sampling).

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
            top = logits.topk(top_k, dim=-1)
            choice = torch.multinomial(top.values.cpu().softmax(-1), 1, generator=generator)
            ids = torch.cat([ids, top.indices.gather(1, choice.to(device))], dim=1)
        text = tokenizer.decode(ids[0, prompt_len:], skip_special_tokens=True)
        text = STARTS[i % len(STARTS)] + text
        text = " ".join(text.replace("{", " ").replace("}", " ").split())
        out.append(text + ". {}")
    return out
