"""Tokenised, right-padded batches of edit prompts with the positions the engine reads.

For every row it records where the subject's last token is (the key position, found through
the tokenizer's character offsets, so leading-space conventions do not matter) and which
positions predict the target tokens (teacher forcing).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


def target_ids(tokenizer, target: str) -> list[int]:
    """Token ids of a target as it follows a prompt: one space, then the target."""
    ids = tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"target {target!r} tokenises to nothing")
    return ids


@dataclass
class Rows:
    """A padded batch. Index tensors are all 1-D over rows unless noted."""

    input_ids: torch.Tensor          # (B, T)
    attention_mask: torch.Tensor     # (B, T)
    subject_pos: torch.Tensor        # position of the subject's last token
    last_pos: torch.Tensor           # position of the last prompt token (before any target)
    owner: torch.Tensor              # which request each row belongs to
    loss_row: torch.Tensor           # (P,) rows of positions that predict target tokens
    loss_col: torch.Tensor           # (P,) their positions
    loss_label: torch.Tensor         # (P,) the token each should predict

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> "Rows":
        """The same rows with every tensor on ``device`` (built on the CPU, used where the model is)."""
        return Rows(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))


def encode(tokenizer, texts: list[str], subject_ends: list[int], owners: list[int],
           targets: list[list[int] | None] | None = None) -> Rows:
    """Encode texts (subject ending at character ``subject_ends[i]``), appending targets[:-1].

    Raises ValueError naming the row when the subject cannot be located among the tokens.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    targets = targets or [None] * len(texts)
    seqs, subj, last, lrow, lcol, llab = [], [], [], [], [], []
    for r, (text, end, tgt) in enumerate(zip(texts, subject_ends, targets)):
        enc = tokenizer(text, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
        pos = [i for i, (s, e) in enumerate(offsets) if e > s and s < end]
        if not pos:
            raise ValueError(f"cannot locate the subject in the tokens of {text!r}")
        subj.append(pos[-1])
        last.append(len(ids) - 1)
        if tgt:
            for j, token in enumerate(tgt):
                lrow.append(r)
                lcol.append(len(ids) - 1 + j)
                llab.append(token)
            ids = ids + tgt[:-1]
        seqs.append(ids)
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        input_ids[r, : len(s)] = torch.tensor(s)
        mask[r, : len(s)] = 1
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)
    return Rows(input_ids, mask, as_long(subj), as_long(last), as_long(owners), as_long(lrow), as_long(lcol), as_long(llab))


def prompt_rows(tokenizer, prompts: list[str], subjects: list[str], owners: list[int],
                targets: list[list[int] | None] | None = None) -> Rows:
    """Rows for prompts with a ``{}`` subject slot (context prefixes already applied)."""
    texts, ends = [], []
    for prompt, subject in zip(prompts, subjects):
        head = prompt.split("{}", 1)[0]
        texts.append(prompt.replace("{}", subject, 1))
        ends.append(len(head) + len(subject))
    return encode(tokenizer, texts, ends, owners, targets)


# Length groups of a batch (each padded to its own longest row; see length_groups): at most 4,
# and a group must save more padded tokens than this to be split off (measured on smollm2:
# splitting a single request's four rows made the per-request loop 1.6x slower).
MAX_GROUPS = 4
GROUP_COST = 256


def length_groups(lengths: torch.Tensor, max_groups: int, group_cost: int = 0) -> list[torch.Tensor]:
    """Row indices split into at most ``max_groups`` groups of similar length, chosen to
    minimise the padded tokens (each group is padded to its own longest row) plus
    ``group_cost`` tokens per group (what one more, smaller forward pass costs).

    A batch of edit prompts pads half its tokens when padded to the longest row (short KL
    prompts beside prefixed ones); a few groups recover most of that, while the four rows of a
    single request are not worth splitting. Groups come shortest first, rows in their original
    order within a group.
    """
    widths, counts = torch.unique(lengths, return_counts=True)
    w, c = widths.tolist(), counts.tolist()
    m = len(w)
    inf = float("inf")
    # best[g][j]: least padded tokens for the first j widths in g groups; cut[g][j]: start of the last
    best = [[inf] * (m + 1) for _ in range(max_groups + 1)]
    cut = [[0] * (m + 1) for _ in range(max_groups + 1)]
    best[0][0] = 0.0
    for g in range(1, max_groups + 1):
        for j in range(1, m + 1):
            rows = 0
            for a in range(j, 0, -1):  # the last group holds widths a-1 .. j-1
                rows += c[a - 1]
                cost = best[g - 1][a - 1] + rows * w[j - 1] + group_cost
                if cost < best[g][j]:
                    best[g][j], cut[g][j] = cost, a - 1
    g = min(range(1, max_groups + 1), key=lambda k: (best[k][m], k))
    bounds, j = [], m
    while j > 0:
        bounds.append((cut[g][j], j))
        j, g = cut[g][j], g - 1
    groups = []
    for a, b in reversed(bounds):
        member = (lengths >= w[a]) & (lengths <= w[b - 1])
        groups.append(torch.nonzero(member).flatten())
    return groups
