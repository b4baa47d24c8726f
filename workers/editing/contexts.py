"""Context prefixes: the fact is written in several short contexts so the edit does not hinge on
the prompt starting the text. As in the reference code, a few short generations from the model
itself, plus the bare prompt; generated once (seeded) and then kept in the editing state, so a
resumed editor uses exactly the same ones.
"""

from __future__ import annotations

import torch
from torch import nn

STARTS = ("The", "Therefore", "Because", "I", "You")


def generate_contexts(model: nn.Module, tokenizer, n: int, tokens: int, seed: int) -> list[str]:
    """``["{}"]`` followed by ``n`` templates ``"<generated text>. {}"``."""
    out = ["{}"]
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(seed)
        for i in range(n):
            enc = tokenizer(STARTS[i % len(STARTS)], return_tensors="pt")
            gen = model.generate(**enc, max_new_tokens=tokens, do_sample=True, top_k=5,
                                 pad_token_id=tokenizer.pad_token_id)
            text = tokenizer.decode(gen[0], skip_special_tokens=True)
            text = " ".join(text.replace("{", " ").replace("}", " ").split())
            out.append(text + ". {}")
    return out
