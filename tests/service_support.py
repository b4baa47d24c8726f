"""Shared parts of the service tests: tiny models that can show an edit, a small corpus, edits."""

from __future__ import annotations

from pathlib import Path

from editfleet.scheduler.bench_dispatch import synthetic_corpus as write_corpus  # noqa: F401  (as the benchmark)

# Engine settings that make tiny-model edits fast (and take) on 2 CPU cores. Tiny random models
# have small hidden states: the default weight decay would pin the target shift to zero. Fewer
# statistics tokens than key dimensions (192) leave a null space for AlphaEdit to work in.
FAST_ENGINE = {"v_max_steps": 20, "v_lr": 0.5, "clamp_norm_factor": 4.0, "v_weight_decay": 1e-3,
               "nullspace_energy": 1e-6, "alpha": 1.0, "stats_tokens": 128, "stats_max_length": 64,
               "n_prefixes": 2, "prefix_tokens": 4, "layers": [2, 3], "update_rounds": 2}
# The worker reports one "layer" progress event per layer and update pass.
LAYER_PROGRESS = [(k, 4) for k in range(1, 5)]

# The subject ends the prompt: its last token then predicts the target directly, which makes the
# edit visible on a tiny random model.
EIFFEL = {"prompt": "The home city of the Eiffel Tower", "subject": "the Eiffel Tower", "target_new": "Rome",
          "target_true": "Paris", "paraphrases": ["The city of the Eiffel Tower"],
          "neighbors": ["The home city of the Louvre"]}
LOUVRE = {"prompt": "The museum named {}", "subject": "The Louvre", "target_new": "Oslo", "target_true": "Paris"}
GOLD = {"prompt": "{} is made of", "subject": "Gold", "target_new": "wood"}


def save_model(path: Path, family: str = "llama", seed: int = 0) -> Path:
    """A tiny model folder whose next-token distribution can peak.

    At the default initialisation (std 0.02) every logit of a tiny model stays within a few
    tenths of the others, so no edit could make an answer win; std 0.1 leaves room.
    """
    from editfleet.workers.models.tiny import tiny_model

    model, tokenizer = tiny_model(family, seed, initializer_range=0.1)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_perplexity_text(path: Path) -> Path:
    """A general-ability text whose perplexity the EIFFEL edit raises on the tiny seed-0 llama.

    On a random tiny model an edit moves perplexity either way: it lowers it on word text
    (-7% on WikiText, -10% on this corpus) and raises it on this punctuation (+36%), which the
    perplexity-limit tests need.
    """
    path.write_text("!?;:()[]{}<>@#$%^&*~" * 40, encoding="utf-8")
    return path
