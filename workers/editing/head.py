"""The LM head's share of the target loss in one pass over the vocabulary, without autograd.

The loss reads log-softmax over the whole vocabulary (262k entries on Gemma 3) at a few positions
per row, yet its gradient with respect to a position's normed hidden state ``h`` is only
``d_model`` wide. With ``W`` the head matrix and ``p = softmax(W h)``:

    d(-log p_y)/dh = E_p[W_v] - W_y
    d KL(p0 || p)/dh = E_p[W_v] - E_p0[W_v]        (p0 fixed: the unedited distribution)

``softmax_moments`` computes ``log Z`` and ``E_p[W_v]`` together, block by block over the
vocabulary with the running-maximum rescaling of flash attention. The head matrix is read once
per step instead of twice (forward and backward), and no (rows, vocabulary) tensor is built for
autograd. On a CPU the head matrix (671 MB on Gemma 3) does not fit in cache, so reading it is
what a small batch of positions pays for (docs/benchmarks.md, twenty-third session).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Vocabulary entries per block (Gemma 3: 16 blocks). Both products of a block read it while it is
# still in cache; 4096 and 16384 took the same time within 15% on the development CPU.
BLOCK = 16384


def head_matrix(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head's weight (vocabulary, d_model) and bias.

    Refuses a soft-capped head: the cap's derivative would weight every row of ``W`` differently
    at every step, so the unedited distribution's term would no longer be a constant vector.
    """
    if getattr(model.config, "final_logit_softcapping", None):
        raise ValueError("target optimisation does not support final_logit_softcapping "
                         f"(model_type {model.config.model_type!r}); no family in ADAPTERS uses it")
    head = model.get_output_embeddings()
    return head.weight, head.bias


@dataclass
class Moments:
    """What the loss needs of the softmax distribution p at each of n positions."""

    log_z: torch.Tensor  # (n,) log of the softmax's normaliser
    mean: torch.Tensor   # (n, d) E_p[W_v], the mean of the head's rows under p

    def __getitem__(self, index) -> "Moments":
        return Moments(self.log_z[index], self.mean[index])


@torch.no_grad()
def softmax_moments(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    block: int = BLOCK) -> Moments:
    """The softmax ``Moments`` of the logits ``weight @ h + bias`` of each row of ``hidden`` (n, d),
    float32. ``weight`` may be a lower-precision copy: the products run in its dtype, the sums in
    float32."""
    h = hidden.to(weight.dtype)
    n = h.shape[0]
    peak = torch.full((n,), float("-inf"), device=h.device)
    total = torch.zeros(n, device=h.device)
    mean = torch.zeros(n, weight.shape[1], device=h.device)
    for lo in range(0, weight.shape[0], block):
        w = weight[lo:lo + block]
        logits = (h @ w.T).float()
        if bias is not None:
            logits += bias[lo:lo + block].float()
        new_peak = torch.maximum(peak, logits.amax(1))
        rescale = torch.exp(peak - new_peak)
        e = torch.exp(logits - new_peak[:, None])
        total = total * rescale + e.sum(1)
        mean = mean * rescale[:, None] + (e.to(w.dtype) @ w).float()
        peak = new_peak
    return Moments(log_z=peak + total.log(), mean=mean / total[:, None])


def target_nll(hidden: torch.Tensor, labels: torch.Tensor, moments: Moments, weight: torch.Tensor,
               bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``-log p(label)`` at each position (n,), and its gradient with respect to ``hidden`` (n, d)."""
    w_y = weight[labels].float()
    logit = (hidden.float() * w_y).sum(-1) + (0 if bias is None else bias[labels].float())
    return moments.log_z - logit, moments.mean - w_y
