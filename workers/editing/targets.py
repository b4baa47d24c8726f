"""Target values: the shift of the last edited layer's value that makes each fact come out.

All requests of a batch are optimised together, one Adam step for the whole batch. Everything
below the last edited layer is constant during the optimisation, so it is computed once
and only the layers from the last edited one upward run at each step; the LM head's part of the
loss is computed only at the positions the loss reads, for all of them in one pass over the
vocabulary that yields its gradient directly (head.py). The shift is added at the subject's last
token, so the positions before it never change either: each step replays every row from its
subject's last token on, attending to the earlier positions' keys and values recorded once
(``SuffixRunner``).
The rows are replayed in a few groups of similar suffix length, each padded to its own longest
suffix. They are replayed with autograd in waves of at most ``WAVE_ROWS`` rows, each
back-propagated before the next runs, so memory is bounded by the wave, not the batch.
Requests are independent (each has its own shift, loss and Adam moments, which are elementwise),
so the batched result equals the per-request loop up to float32 summation order; a request that
has converged is frozen while the others go on.

The optimisation steps may run under bfloat16 autocast (``EditConfig.target_dtype``, by default
on GPUs only); the shift found is then checked in float32: the target values ``z`` and the
reported NLLs always come from a float32 pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from editfleet.workers.editing.batching import GROUP_COST, MAX_GROUPS, Rows, length_groups, prompt_rows, target_ids
from editfleet.workers.editing.config import EditConfig
from editfleet.workers.editing.head import head_matrix, softmax_moments, target_nll
from editfleet.workers.editing.requests import EditRequest
from editfleet.workers.editing.runner import SuffixRunner, add_at_projection, capture_projection
from editfleet.workers.models.adapters import FamilyAdapter
from editfleet.workers.models.forward import model_device

KL_PROMPT = "{} is a"
# Rows replayed with autograd at once (a wave): each wave's graph is freed after its backward, so
# this, not the batch size, bounds the optimisation's memory. A 100-request batch (400 rows with
# the default contexts) is two waves: as fast as one on gemma3-270m, with 1 GB less at the peak;
# 128 rows took 1.45x longer (docs/benchmarks.md, twenty-third session).
WAVE_ROWS = 256


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
    kl_reference: torch.Tensor  # (n, d_model) E_p0[W_v] at each KL row: the distribution the KL term keeps


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


class _Groups:
    """The batch's rows in groups of similar suffix length (``length_groups``) cut into chunks of
    at most ``WAVE_ROWS`` rows, each with its own recorded pass, and the chunks in waves of at
    most ``WAVE_ROWS`` rows.

    Maps every row to its group and its index there, and every position the optimisation reads
    to its slot in the group's replayed suffix, so that they can be found in its hidden states.
    """

    def __init__(self, model: nn.Module, adapter: FamilyAdapter, rows: Rows, layer: int):
        lengths = rows.attention_mask.sum(1)
        device = rows.input_ids.device
        self.members = [chunk for member in length_groups(lengths - rows.subject_pos, MAX_GROUPS, GROUP_COST)
                        for chunk in member.tensor_split(-(-len(member) // WAVE_ROWS))]
        self.waves: list[list[int]] = []
        wave_rows = WAVE_ROWS
        for g, member in enumerate(self.members):
            if wave_rows + len(member) > WAVE_ROWS:
                self.waves.append([])
                wave_rows = 0
            self.waves[-1].append(g)
            wave_rows += len(member)
        self.group = torch.empty(rows.size, dtype=torch.long, device=device)
        self.local = torch.empty(rows.size, dtype=torch.long, device=device)
        self.split = torch.zeros(rows.size, dtype=torch.long, device=device)  # per row: slot 0's position
        self.runners: list[SuffixRunner] = []
        self.value0: torch.Tensor | None = None  # per row: ``layer``'s projection output at the subject
        for g, member in enumerate(self.members):
            self.group[member], self.local[member] = g, torch.arange(len(member), device=device)
            width = int(lengths[member].max())
            with capture_projection(model, adapter, [layer], inputs=False, outputs=True) as seen:
                runner = SuffixRunner(model, adapter, rows.input_ids[member, :width],
                                      rows.attention_mask[member, :width], rows.subject_pos[member], start=layer)
            self.runners.append(runner)
            self.split[member] = runner.split
            out = seen["out"][layer][torch.arange(len(member), device=device), rows.subject_pos[member]]
            if self.value0 is None:
                self.value0 = out.new_empty(rows.size, out.shape[-1])
            self.value0[member] = out
        self.subject_slot = rows.subject_pos - self.split
        self.last_slot = rows.last_pos - self.split
        self.loss_slot = rows.loss_col - self.split[rows.loss_row]


def optimise_targets(model: nn.Module, tokenizer, adapter: FamilyAdapter, requests: Sequence[EditRequest],
                     contexts: Sequence[str], config: EditConfig,
                     progress: Callable[[str, int, int], None] | None = None,
                     kl_reference: torch.Tensor | None = None) -> Targets:
    """Optimise the shifts of all ``requests`` together (see module docstring). The KL term keeps
    the model's own distribution at the start, or ``kl_reference`` (an earlier result's, so a
    retarget round on the edited model still holds the unedited one)."""
    layer = config.layers[-1]
    n = len(requests)
    n_ctx = len(contexts)
    prompts, subjects, owners, targets = _context_inputs(tokenizer, requests, contexts, with_targets=True)
    n_ctx_rows = len(prompts)
    device = model_device(model)
    # The KL rows ("{subject} is a", no target) follow the context rows in the same batch.
    rows = prompt_rows(tokenizer, prompts + [KL_PROMPT] * n, subjects + [r.subject for r in requests],
                       owners + list(range(n)), targets + [None] * n).to(device)
    kl_rows = torch.arange(n_ctx_rows, rows.size, device=device)
    bare = torch.arange(0, n_ctx_rows, n_ctx, device=device)  # context 0 of each request

    groups = _Groups(model, adapter, rows, layer)
    value0 = groups.value0[bare]
    h0 = torch.empty_like(value0)
    with torch.no_grad():
        for g in groups.group[bare].unique().tolist():  # the groups holding a bare prompt
            mine = bare[groups.group[bare] == g]
            h = groups.runners[g].run(end=layer)
            h0[mine // n_ctx] = h[groups.local[mine], groups.subject_slot[mine]]
    ref_norm = (value0 if adapter.post_norm else h0).norm(dim=-1)
    final_norm = adapter.final_norm_module(model)

    shift = torch.zeros(n, value0.shape[-1], requires_grad=True, device=device)
    opt = torch.optim.Adam([shift], lr=config.v_lr)
    low = resolve_target_dtype(config, device).target_dtype == "bfloat16"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=low)
    full_weight, head_bias = head_matrix(model)
    head_weight = full_weight.to(torch.bfloat16) if low else full_weight
    replayed = torch.arange(0, device=device)  # global rows of the group being replayed, in replay order

    def add_shift(out: torch.Tensor) -> torch.Tensor:
        at = (torch.arange(len(replayed), device=device), groups.subject_slot[replayed])
        return out.index_put(at, (out[at] + shift[rows.owner[replayed]]).to(out.dtype))

    tokens_per_row = torch.bincount(rows.loss_row, minlength=n_ctx_rows).clamp_min(1)

    def request_nll(token_nll: torch.Tensor) -> torch.Tensor:
        """Per request: the mean over its contexts of each row's mean target-token NLL."""
        return (torch.zeros(n_ctx_rows, device=device).index_add(0, rows.loss_row, token_nll) / tokens_per_row).view(n, n_ctx).mean(1)

    # The loss is a sum over requests, each a weighted sum of its token NLLs and its KL term. A
    # wave of chunks is replayed with autograd, the LM head's part (head.py) is computed for all of
    # the wave's read positions in one pass over the vocabulary, and the wave is back-propagated
    # from its read positions with that part's gradient: only one wave's graph is alive at a time.
    token_weight = 1.0 / (tokens_per_row[rows.loss_row] * n_ctx)
    position_owner = rows.owner[rows.loss_row]
    position_group = groups.group[rows.loss_row]
    kl_group = groups.group[kl_rows]
    active = torch.ones(n, dtype=torch.bool, device=device)
    steps = [0] * n
    # Per request: E_p0[W_v] under the unedited distribution p0 at its KL row (set at step 0
    # unless given).
    fixed_reference = kl_reference is not None
    kl_reference = kl_reference.clone() if fixed_reference else torch.zeros_like(value0)
    token_nll = torch.zeros(len(rows.loss_row), device=device)
    for step in range(config.v_max_steps):
        # Only the rows of requests still optimising are replayed, and the LM head (the dominant
        # cost with a large vocabulary) runs only at their positions: a converged request's shift,
        # and so its loss, is frozen. Gradients are taken for every request active at the start of
        # the step; those that turn out converged are restored below, so they never move.
        last = step == config.v_max_steps - 1
        opt.zero_grad()
        for wave in groups.waves:
            position_reads, kl_reads, positions, kls = [], [], [], []
            with torch.set_grad_enabled(not last):
                for g in wave:
                    member = groups.members[g]
                    live_local = torch.nonzero(active[rows.owner[member]]).flatten()
                    if len(live_local) == 0:
                        continue
                    replayed = member[live_local]
                    in_live = torch.full((len(member),), -1, dtype=torch.long, device=device)
                    in_live[live_local] = torch.arange(len(live_local), device=device)
                    with autocast, add_at_projection(model, adapter, layer, add_shift):
                        h = final_norm(groups.runners[g].run(rows=live_local))
                    pos = torch.nonzero((position_group == g) & active[position_owner]).flatten()
                    kl = torch.nonzero((kl_group == g) & active).flatten()  # request r's KL row is kl_rows[r]
                    position_reads.append(h[in_live[groups.local[rows.loss_row[pos]]], groups.loss_slot[pos]])
                    kl_reads.append(h[in_live[groups.local[kl_rows[kl]]], groups.last_slot[kl_rows[kl]]])
                    positions.append(pos)
                    kls.append(kl)
            if not positions:
                continue
            pos, kl = torch.cat(positions), torch.cat(kls)
            read = torch.cat(position_reads + kl_reads)
            moments = softmax_moments(read.detach(), head_weight, head_bias)
            nll, nll_grad = target_nll(read.detach()[: len(pos)], rows.loss_label[pos], moments[: len(pos)],
                                       head_weight, head_bias)
            kl_moments = moments[len(pos):]
            if step == 0 and not fixed_reference:  # every request is active at step 0
                kl_reference[kl] = kl_moments.mean
            token_nll[pos] = nll
            if not last:
                # d KL(p0 || p)/dh = E_p[W_v] - E_p0[W_v] (head.py)
                grad = torch.cat([token_weight[pos, None] * nll_grad,
                                  config.kl_factor * (kl_moments.mean - kl_reference[kl])])
                read.backward(grad.to(read.dtype))
        nll = request_nll(token_nll)
        was_active = active.clone()
        active &= nll >= config.v_loss_threshold
        if progress:
            progress("targets", step + 1, config.v_max_steps)
        if not active.any() or last:
            break
        for r in torch.nonzero(active).flatten().tolist():
            steps[r] += 1
        decay = shift.norm(dim=-1) / ref_norm.pow(2)
        (config.v_weight_decay * decay[was_active]).sum().backward()
        before = shift.detach().clone()
        opt.step()
        with torch.no_grad():
            shift[~active] = before[~active]
            limit = config.clamp_norm_factor * ref_norm
            norms = shift.norm(dim=-1)
            over = norms > limit
            shift[over] *= (limit[over] / norms[over])[:, None]

    z = torch.empty_like(value0)
    token_nll = torch.zeros(len(rows.loss_row), device=device)
    with torch.no_grad():
        for g, member in enumerate(groups.members):
            mine = bare[groups.group[bare] == g]
            if len(mine) == 0 and not low:  # nothing to read in this group
                continue
            replayed = member
            with add_at_projection(model, adapter, layer, add_shift):
                h = groups.runners[g].run(end=layer)
            z[mine // n_ctx] = h[groups.local[mine], groups.subject_slot[mine]]
            if low:  # what the shift achieves in float32
                h = final_norm(groups.runners[g].run(start=layer + 1, hidden=h))
                pos = torch.nonzero(position_group == g).flatten()
                read = h[groups.local[rows.loss_row[pos]], groups.loss_slot[pos]]
                token_nll[pos] = target_nll(read, rows.loss_label[pos], softmax_moments(read, full_weight, head_bias),
                                            full_weight, head_bias)[0]
    if low:
        nll = request_nll(token_nll)
    return Targets(shift=shift.detach(), z=z.detach(), nll=nll.detach().tolist(), steps=steps,
                   kl_reference=kl_reference)


def optimise_targets_loop(model: nn.Module, tokenizer, adapter: FamilyAdapter, requests: Sequence[EditRequest],
                          contexts: Sequence[str], config: EditConfig) -> Targets:
    """The reference code's schedule, one request at a time (for comparison and tests)."""
    parts = [optimise_targets(model, tokenizer, adapter, [r], contexts, config) for r in requests]
    return Targets(
        shift=torch.cat([p.shift for p in parts]), z=torch.cat([p.z for p in parts]),
        nll=[x for p in parts for x in p.nll], steps=[x for p in parts for x in p.steps],
        kl_reference=torch.cat([p.kl_reference for p in parts]),
    )
