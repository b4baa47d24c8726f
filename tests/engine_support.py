"""Shared pieces of the engine tests: a small corpus, tiny-model settings, a few requests."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from editfleet.workers.editing.batching import target_ids
from editfleet.workers.editing.requests import EditRequest
from editfleet.workers.models.tiny import tiny_model

REQUESTS = [
    EditRequest("{} is located in the city of", "Eiffel Tower", "Rome", "Paris", record_id="eiffel"),
    EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English", "French", record_id="darrieux"),
    EditRequest("{} plays the sport of", "Michael Jordan", "cricket", "basketball", record_id="jordan"),
    EditRequest("The capital of {} is", "Norway", "Lima", "Oslo", record_id="norway"),
]

# Settings for tiny random models: their hidden states are small, so the reference's weight
# decay (relative to ||h||^2) would pin the shift to zero; a larger clamp lets targets move.
# float32 targets: the equality tests compare runs whose bfloat16 roundings could differ.
TINY = dict(v_max_steps=30, v_lr=0.5, clamp_norm_factor=4.0, v_weight_decay=1e-3, n_prefixes=2,
            prefix_tokens=5, stats_tokens=256, stats_max_length=64, nullspace_energy=1e-6, alpha=1.0,
            target_dtype="float32", protect_starts=0)


def edit_model(family: str = "llama"):
    """The tiny model the engine tests edit: a 512-wide key space, so that the statistics corpus
    leaves a null space."""
    width = {"n_inner": 512} if family == "gpt2" else {"intermediate_size": 512}
    return tiny_model(family, seed=0, initializer_range=0.1, **width)


def write_corpus(path: Path, sentences: int = 400, seed: int = 0) -> Path:
    """A synthetic text corpus (no data files needed)."""
    rng = random.Random(seed)
    words = "the a of river city king music army was is in on by with from music played built".split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(6, 14))).capitalize() + "." for _ in range(sentences)]
    path.write_text("\n".join(lines) + "\n")
    return path


def target_nll(model, tok, text: str, target: str) -> float:
    """Mean token NLL of ``target`` after ``text``, straight from full logits."""
    ids = tok(text)["input_ids"]
    tgt = target_ids(tok, target)
    x = torch.tensor([ids + tgt[:-1]])
    with torch.no_grad():
        logp = model(input_ids=x).logits[0].log_softmax(-1)
    return -float(sum(logp[len(ids) - 1 + j, t] for j, t in enumerate(tgt))) / len(tgt)


def projection_weights(editor) -> dict[int, torch.Tensor]:
    return {i: editor.adapter.weight(editor.model, i).detach().clone() for i in editor.config.layers}
