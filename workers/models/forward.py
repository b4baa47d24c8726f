"""Forward passes that read logits only where they are needed.

Gemma 3 has a 262k-token vocabulary: full logits for a batch of prompts cost gigabytes, while
scoring and target optimisation read a handful of positions. These helpers run the decoder to
its final hidden states and apply the LM head to the gathered positions only.
"""

from __future__ import annotations

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    """Where the model's weights live: every tensor the engine builds for it is made there."""
    return next(model.parameters()).device


def context_length(model: nn.Module) -> int | None:
    """How many positions the model takes (GPT-2's ``n_positions`` reads through the same name);
    None when its config does not say. Prompts, perplexity windows and ``describe`` all ask here."""
    return getattr(model.config, "max_position_embeddings", None)


def final_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden states after the final norm, (batch, seq, d_model)."""
    out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def head_logits(model: nn.Module, hidden: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """LM-head logits for already-normed hidden states of any leading shape (float32).

    ``weight``: the head matrix in another precision (e.g. a bfloat16 copy made once, instead of
    autocast re-casting a large vocabulary's matrix at every call).
    """
    head = model.get_output_embeddings()
    if weight is None:
        logits = head(hidden).float()
    else:
        bias = None if head.bias is None else head.bias.to(weight.dtype)
        logits = torch.nn.functional.linear(hidden.to(weight.dtype), weight, bias).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def logits_at(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Logits (n, vocab) at positions ``(rows[i], cols[i])`` of a padded batch."""
    hidden = final_hidden(model, input_ids, attention_mask)
    return head_logits(model, hidden[rows, cols])
