"""Target values: the shift of the last edited layer's value that makes each fact come out.

All requests of a batch are optimised together in one batched forward/backward. Everything
below the last edited layer is constant during the optimisation, so it is computed once
(``LayerRunner``) and only the layers from the last edited one upward run at each step; the LM
head is applied only at the positions the loss reads. Requests are independent (each has its
own shift, loss and Adam moments, which are elementwise), so the batched result equals the
per-request loop; a request that has converged is frozen while the others go on.

The optimisation steps may run under bfloat16 autocast (``EditConfig.target_dtype``, by default
on GPUs only); the shift found is then checked in float32: the target values ``z`` and the
reported NLLs always come from a float32 pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from editfleet.workers.editing.batching import Rows, prompt_rows, target_ids
from editfleet.workers.editing.config import EditConfig
from editfleet.workers.editing.requests import EditRequest
from editfleet.workers.editing.runner import LayerRunner, add_at_projection, capture_projection
from editfleet.workers.models.adapters import FamilyAdapter
from editfleet.workers.models.forward import head_logits

KL_PROMPT = "{} is a"


def native_bfloat16(device: torch.device | str = "cpu") -> bool:
    """Whether bfloat16 matrix products run natively (fast) on ``device``."""
    device = torch.device(device)
    # CPUs are left out even with AMX: on the development machine (docs/benchmarks.md) the steps
    # were not reliably faster (elementwise work dominates at these sizes) and the shifts reached
    # slightly lower float32 target probabilities.
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def resolve_target_dtype(config: EditConfig, device: torch.device | str) -> EditConfig:
    """``config`` with ``target_dtype='auto'`` replaced by what ``device`` runs fast."""
    if config.target_dtype != "auto":
        return config
    return config.replace(target_dtype="bfloat16" if native_bfloat16(device) else "float32")


@dataclass
class Targets:
    """Per request: the optimised shift at the projection output and the resulting target z."""

    shift: torch.Tensor      # (n, d_model), added to the last edited projection's output
    z: torch.Tensor          # (n, d_model), last edited layer's output at the subject, with the shift
    nll: list[float]         # final mean target NLL
    steps: list[int]         # optimisation steps each request took


def _context_inputs(tokenizer, requests: Sequence[EditRequest], contexts: Sequence[str], with_targets: bool):
    prompts, subjects, owners, targets = [], [], [], []
    for r, req in enumerate(requests):
        tgt = target_ids(tokenizer, req.target_new) if with_targets else None
        for ctx in contexts:
            prompts.append(ctx.replace("{}", req.prompt))
            subjects.append(req.subject)
            owners.append(r)
            targets.append(tgt)
    return prompts, subjects, owners, targets


def context_rows(tokenizer, requests: Sequence[EditRequest], contexts: Sequence[str], with_targets: bool = False) -> Rows:
    """One row per (request, context template); context 0 must be the bare ``"{}"``."""
    return prompt_rows(tokenizer, *_context_inputs(tokenizer, requests, contexts, with_targets))


def optimise_targets(model: nn.Module, tokenizer, adapter: FamilyAdapter, requests: Sequence[EditRequest],
                     contexts: Sequence[str], config: EditConfig,
                     progress: Callable[[str, int, int], None] | None = None) -> Targets:
    """Optimise the shifts of all ``requests`` together (see module docstring)."""
    layer = config.layers[-1]
    n = len(requests)
    n_ctx = len(contexts)
    prompts, subjects, owners, targets = _context_inputs(tokenizer, requests, contexts, with_targets=True)
    n_ctx_rows = len(prompts)
    # The KL rows ("{subject} is a", no target) follow the context rows in the same batch.
    rows = prompt_rows(tokenizer, prompts + [KL_PROMPT] * n, subjects + [r.subject for r in requests],
                       owners + list(range(n)), targets + [None] * n)
    kl_rows = torch.arange(n_ctx_rows, rows.size)
    bare = torch.arange(0, n_ctx_rows, n_ctx)  # context 0 of each request

    with capture_projection(model, adapter, [layer], inputs=False, outputs=True) as seen:
        runner = LayerRunner(model, adapter, rows.input_ids, rows.attention_mask, start=layer)
    value0 = seen["out"][layer][bare, rows.subject_pos[bare]]
    with torch.no_grad():
        h0 = runner.run(end=layer)[bare, rows.subject_pos[bare]]
    ref_norm = (value0 if adapter.post_norm else h0).norm(dim=-1)
    final_norm = adapter.final_norm_module(model)

    shift = torch.zeros(n, value0.shape[-1], requires_grad=True)
    opt = torch.optim.Adam([shift], lr=config.v_lr)
    live_rows = torch.arange(rows.size)  # rows replayed at this step: those of unconverged requests
    device = rows.input_ids.device
    low = resolve_target_dtype(config, device).target_dtype == "bfloat16"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=low)
    head_weight = model.get_output_embeddings().weight.to(torch.bfloat16) if low else None

    def add_shift(out: torch.Tensor) -> torch.Tensor:
        at = (torch.arange(len(live_rows)), rows.subject_pos[live_rows])
        return out.index_put(at, (out[at] + shift[rows.owner[live_rows]]).to(out.dtype))

    tokens_per_row = torch.bincount(rows.loss_row, minlength=n_ctx_rows).clamp_min(1)

    def request_nll(token_nll: torch.Tensor) -> torch.Tensor:
        """Per request: the mean over its contexts of each row's mean target-token NLL."""
        return (torch.zeros(n_ctx_rows).index_add(0, rows.loss_row, token_nll) / tokens_per_row).view(n, n_ctx).mean(1)

    position_owner = rows.owner[rows.loss_row]
    active = torch.ones(n, dtype=torch.bool)
    steps = [0] * n
    kl_init = None
    token_nll = torch.zeros(len(rows.loss_row))
    kl_each = torch.zeros(n)
    for step in range(config.v_max_steps):
        # Only the rows of requests still optimising are replayed, and the LM head (the dominant
        # cost with a large vocabulary) runs only at their positions: a converged request's shift,
        # and so its loss, is frozen.
        live_rows = torch.nonzero(active[rows.owner]).flatten()
        in_live = torch.full((rows.size,), -1, dtype=torch.long)
        in_live[live_rows] = torch.arange(len(live_rows))
        at = torch.nonzero(active[position_owner]).flatten()
        live = torch.nonzero(active).flatten()
        with autocast, add_at_projection(model, adapter, layer, add_shift):
            h = final_norm(runner.run(rows=live_rows))
            # One LM-head call for the target positions and the KL positions.
            read = torch.cat([h[in_live[rows.loss_row[at]], rows.loss_col[at]],
                              h[in_live[kl_rows[live]], rows.last_pos[kl_rows[live]]]])
            logp_all = head_logits(model, read, head_weight).log_softmax(-1)
        logp, kl_logp = logp_all[: len(at)], logp_all[len(at):]
        token_nll = token_nll.detach().index_put((at,), -logp.gather(1, rows.loss_label[at, None]).squeeze(1))
        nll = request_nll(token_nll)
        if kl_init is None:
            kl_init = kl_logp.detach()
        kl_each = kl_each.detach().index_put((live,), F.kl_div(kl_logp, kl_init[live], log_target=True,
                                                                 reduction="none").sum(-1))
        decay = shift.norm(dim=-1) / ref_norm.pow(2)
        loss = nll + config.kl_factor * kl_each + config.v_weight_decay * decay
        active &= nll.detach() >= config.v_loss_threshold
        if progress:
            progress("targets", step + 1, config.v_max_steps)
        if not active.any() or step == config.v_max_steps - 1:
            break
        for r in torch.nonzero(active).flatten().tolist():
            steps[r] += 1
        before = shift.detach().clone()
        opt.zero_grad()
        loss[active].sum().backward()
        opt.step()
        with torch.no_grad():
            shift[~active] = before[~active]
            limit = config.clamp_norm_factor * ref_norm
            norms = shift.norm(dim=-1)
            over = norms > limit
            shift[over] *= (limit[over] / norms[over])[:, None]

    live_rows = torch.arange(rows.size)
    with torch.no_grad(), add_at_projection(model, adapter, layer, add_shift):
        h = runner.run(end=layer)
        z = h[bare, rows.subject_pos[bare]]
        if low:  # what the shift achieves in float32
            h = final_norm(runner.run(start=layer + 1, hidden=h))
            logp = head_logits(model, h[rows.loss_row, rows.loss_col]).log_softmax(-1)
            nll = request_nll(-logp.gather(1, rows.loss_label[:, None]).squeeze(1))
    return Targets(shift=shift.detach(), z=z.detach(), nll=nll.detach().tolist(), steps=steps)


def optimise_targets_loop(model: nn.Module, tokenizer, adapter: FamilyAdapter, requests: Sequence[EditRequest],
                          contexts: Sequence[str], config: EditConfig) -> Targets:
    """The reference code's schedule, one request at a time (for comparison and tests)."""
    parts = [optimise_targets(model, tokenizer, adapter, [r], contexts, config) for r in requests]
    return Targets(
        shift=torch.cat([p.shift for p in parts]), z=torch.cat([p.z for p in parts]),
        nll=[x for p in parts for x in p.nll], steps=[x for p in parts for x in p.steps],
    )
