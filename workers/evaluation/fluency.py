"""Generation fluency as in ROME / MEMIT / AlphaEdit: weighted n-gram entropy of generated text.

An edit that breaks the model shows up as repetitive generations ("Paris Paris Paris"),
whose bigram and trigram distributions have low entropy. Per text:
``mean([2/3 * H2, 4/3 * H3])`` with ``Hn = sum(-f log2 f)`` over the relative frequencies of word
n-grams; the score is the arithmetic mean over texts. The paper prints it x100 (about 600 for
an unedited LLaMA3-8B); editfleet reports the raw value (about 6).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

import torch
from torch import nn

from editfleet.workers.models.forward import head_logits
from editfleet.workers.models.scoring import continue_rows, encode_prompts, pad_id, run_prompts

NGRAM_ORDERS = (2, 3)
NGRAM_WEIGHTS = (2 / 3, 4 / 3)

# An approximation of nltk.word_tokenize (Treebank rules) without the nltk dependency:
# numbers with separators, dotted abbreviations, "n't" and clitics split off their word,
# hyphenated words kept whole, "..." and "--" as one token, any other symbol on its own.
_WORD = re.compile(
    r"""\d+(?:[.,]\d+)+
    | (?:[^\W\d_]\.){2,}
    | \w+(?=n't\b)
    | n't\b
    | '(?:s|m|d|ll|re|ve)\b
    | \w+(?:-\w+)*
    | \.\.\.
    | --
    | [^\w\s]""",
    re.VERBOSE | re.IGNORECASE,
)


def word_tokenize(text: str) -> list[str]:
    """Words and punctuation of ``text``, close to ``nltk.word_tokenize``."""
    return _WORD.findall(text)


def ngram_entropy(text: str, orders: Sequence[int] = NGRAM_ORDERS, weights: Sequence[float] = NGRAM_WEIGHTS) -> float:
    """Weighted n-gram entropy of one text (bits), ROME's ``compute_n_gram_entropy``.

    An order with no n-gram (text shorter than n words) contributes 0, as in the reference.
    """
    words = word_tokenize(text)
    terms = []
    for n, weight in zip(orders, weights):
        counts = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        total = sum(counts.values())
        entropy = -sum(c / total * math.log2(c / total) for c in counts.values())
        terms.append(weight * entropy)
    return sum(terms) / len(terms)


def fluency(texts: Sequence[str]) -> float:
    """Arithmetic mean of ``ngram_entropy`` over texts (raw; the paper prints x100)."""
    if not texts:
        raise ValueError("fluency needs at least one text")
    return sum(ngram_entropy(t) for t in texts) / len(texts)


@torch.no_grad()
def greedy_generate(model: nn.Module, tok, prompts: Sequence[str], new_tokens: int = 48,
                    batch_size: int = 128) -> list[str]:
    """Prompt plus exactly ``new_tokens`` greedy tokens per prompt, decoded without special tokens.

    Like the reference ``generate_fast``, generation does not stop at EOS (a fixed length keeps
    texts comparable) and the returned text includes the prompt. Logits are computed only for
    the last position of each row; deterministic.
    """
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    prompt_ids = encode_prompts(tok, prompts)
    pad = pad_id(tok)
    order = sorted(range(len(prompts)), key=lambda i: len(prompt_ids[i]))
    texts: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        last, prompt_mask, lengths, cache = run_prompts(model, [prompt_ids[i] for i in idx], pad)
        rows = torch.arange(len(idx), device=prompt_mask.device)
        steps = [head_logits(model, last).argmax(-1)]
        for step in range(1, new_tokens):
            new_ids = steps[-1][:, None]
            new_mask = torch.ones((len(idx), step), dtype=prompt_mask.dtype, device=prompt_mask.device)
            # The cache holds the previous steps: only the newest token runs, at offset step - 1.
            hidden = continue_rows(model, cache, rows, prompt_mask, lengths, new_ids, new_mask, offset=step - 1)
            steps.append(head_logits(model, hidden[:, -1]).argmax(-1))
        generated = torch.stack(steps, dim=1)
        for row, i in enumerate(idx):
            texts[i] = tok.decode(prompt_ids[i] + generated[row].tolist(), skip_special_tokens=True)
    return texts
