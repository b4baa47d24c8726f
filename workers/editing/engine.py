"""The editor: validates a batch, then statistics -> targets -> per-layer constrained updates.

An ``Editor`` owns a loaded model while it edits it. It keeps copies of the base weights of the
edited projections (so any checkpoint can be materialised as base + replayed deltas) and the
sequential-editing memory K_p. A batch is applied whole or not at all.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from editfleet.workers.editing import ENGINE_VERSION
from editfleet.workers.editing.batching import Rows, target_ids
from editfleet.workers.editing.config import EditConfig, Method, default_config
from editfleet.workers.editing.contexts import generate_contexts
from editfleet.workers.editing.requests import (EditRequest, EditValidationError, FieldViolation,
                                                parse_requests, prompts_digest, read_protected_prompts)
from editfleet.workers.editing.runner import SubjectReplay
from editfleet.workers.editing.statistics import (CorpusText, LayerStats, StatsCache, accumulate_key_moments, checked_corpus,
                                                  compute_second_moments, file_digest, paragraph_starts,
                                                  params_digest, text_moments)
from editfleet.workers.editing.targets import context_rows, optimise_targets, resolve_target_dtype
from editfleet.workers.editing.update import solve_update, spectral_clip
from editfleet.workers.models.adapters import FamilyAdapter, adapter_for
from editfleet.workers.models.forward import context_length, model_device
from editfleet.workers.models.scoring import score_targets

Progress = Callable[[str, int, int], None]
# Rows per forward pass when the prompt memory is gathered (bounds its memory, not its result).
PROMPT_MEMORY_ROWS = 64
LowRank = dict[int, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class BatchResult:
    """What one applied batch changed: enough to replay it onto the base model."""

    deltas: LowRank                  # layer -> (U (d_model, m), V (d_ff, m)); weight += U @ V.T
    keys: dict[int, torch.Tensor]    # layer -> (d_ff, m) keys on the edited model (added to K_p);
                                     # m = requests, or requests x contexts (key_contexts="each")
    target_prob: list[float]         # per request, target probability reached by the optimisation
    target_steps: list[int]          # per request, optimisation steps taken
    value_gap: list[float]           # per request, ||h - z|| / ||h0 - z|| at the last edited layer after
                                     # the update (0: the weights reproduce the target value exactly)
    z: torch.Tensor                  # (requests, d_model) target values at the last edited layer
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class StoredBatch:
    """An applied batch as the editing state keeps it."""

    deltas: LowRank
    keys: dict[int, torch.Tensor]
    requests: list[EditRequest] | None = None   # with ``z``: lets the batch rejoin later updates
    z: torch.Tensor | None = None               # (requests, d_model) target values at ``z_layer``
    z_layer: int | None = None


def _joined(deltas: LowRank, more: LowRank) -> LowRank:
    """Each layer's factors with ``more``'s columns appended (one product, one delta)."""
    return {i: (torch.cat([u, more[i][0]], 1), torch.cat([v, more[i][1]], 1)) for i, (u, v) in deltas.items()}


def default_corpus() -> list[CorpusText]:
    """The WikiText-2 files of the data folder (see workers/evaluation/data.py), less the head
    of wiki.test.raw that the perplexity is measured on."""
    from editfleet.workers.evaluation.data import data_dir
    from editfleet.workers.evaluation.metrics import PERPLEXITY_CHARS, WIKITEXT_TEST

    root = data_dir()
    return checked_corpus([CorpusText(root / "wikitext-2-raw" / "wiki.valid.raw"),
                           CorpusText(root / WIKITEXT_TEST, PERPLEXITY_CHARS)])


class Editor:
    """Applies batches of edits to ``model`` in place (see module docstring).

    Args:
        model, tokenizer: a loaded causal LM (float32) and its tokenizer (right padding).
        config: the engine settings.
        cache_dir: where statistics and projectors are cached.
        corpus: text files for the preserved-knowledge statistics (default: WikiText-2).
        protect: text files of protected prompts, one per line: every token's key joins each
            update's solve with ``config.protect_weight`` (see ``protected_moments``).
    """

    def __init__(self, model: nn.Module, tokenizer, config: EditConfig, cache_dir: str | Path,
                 corpus: Sequence[str | Path | CorpusText] | None = None,
                 protect: Sequence[str | Path] | None = None):
        # Everything the editor holds (base copies, K_p, projectors, batches) lives on the model's
        # device; what comes from files is moved there, what goes to files is moved to the CPU.
        self.device = model_device(model)
        self.model, self.tokenizer, self.config = model, tokenizer, resolve_target_dtype(config, self.device)
        self.adapter: FamilyAdapter = adapter_for(model)
        n_layers = self.adapter.num_layers(model)
        bad = [i for i in config.layers if not 0 <= i < n_layers]
        if bad:
            raise ValueError(f"layers {bad} out of range: the model has {n_layers} layers")
        if max(config.layers) >= n_layers - 1:
            raise ValueError(f"the last edited layer must be below the model's last layer ({n_layers - 1}): "
                             "a value at the subject reaches the answer only through later layers")
        self.cache = StatsCache(Path(cache_dir))
        self.corpus = checked_corpus(corpus) if corpus is not None else None
        self.protect = read_protected_prompts(protect) if protect else None
        self._base = {i: self.adapter.weight(model, i).detach().clone() for i in config.layers}
        # K_p K_p^T per layer: the keys of earlier batches that do not rejoin updates by target.
        self.memory = {i: torch.zeros(w.shape[1], w.shape[1], device=self.device) for i, w in self._base.items()}
        self.history: list[StoredBatch] = []
        self.contexts: list[str] | None = None
        self.round_contexts: list[str] | None = None  # retarget_prefixes="fresh" only
        self._stats: dict[int, LayerStats] | None = None
        self._projectors: dict[int, torch.Tensor] | None = None
        self._protected: dict[int, torch.Tensor] | None = None
        self.projector_info: dict[int, dict] = {}

    @classmethod
    def for_model(cls, model: nn.Module, tokenizer, method: Method = "alphaedit", *, cache_dir: str | Path,
                  corpus: Sequence[str | Path | CorpusText] | None = None,
                  protect: Sequence[str | Path] | None = None, **overrides: Any) -> "Editor":
        """An editor with the family's default settings for ``method``, ``overrides`` on top."""
        adapter = adapter_for(model)
        config = default_config(adapter.family, method, adapter.num_layers(model), **overrides)
        return cls(model, tokenizer, config, cache_dir, corpus, protect)

    # -- validation -------------------------------------------------------------------------

    def validate(self, records: Sequence[EditRequest | Mapping[str, Any]]) -> list[EditRequest]:
        """Requests from records, or ``EditValidationError`` naming each bad record and field."""
        if not records:
            raise EditValidationError([FieldViolation(0, "edits", "the batch is empty")])
        requests = [r if isinstance(r, EditRequest) else None for r in records]
        if any(r is None for r in requests):
            parsed = iter(parse_requests([r for r in records if not isinstance(r, EditRequest)]))
            requests = [r if r is not None else next(parsed) for r in requests]
        limit = context_length(self.model) or 2048
        prefix = (self.config.prefix_tokens + 8) if self.config.n_prefixes else 0
        violations = []
        for i, req in enumerate(requests):
            try:
                tgt = target_ids(self.tokenizer, req.target_new)
            except ValueError as exc:
                violations.append(FieldViolation(i, "target_new", str(exc), req.record_id))
                continue
            used = len(self.tokenizer(req.text)["input_ids"]) + len(tgt) + prefix
            if used > limit:
                violations.append(FieldViolation(
                    i, "prompt", f"prompt and target need {used} tokens with context prefixes; "
                    f"the model's context is {limit}", req.record_id))
            try:
                context_rows(self.tokenizer, [req], ["{}"])
            except ValueError as exc:
                violations.append(FieldViolation(i, "subject", str(exc), req.record_id))
        if violations:
            raise EditValidationError(violations)
        return requests

    # -- statistics and projectors ------------------------------------------------------------

    def _corpus(self) -> list[CorpusText]:
        if self.corpus is None:
            self.corpus = default_corpus()
        return self.corpus

    def _weights_digest(self) -> str:
        """Digest of the base weights the keys of the edited layers depend on (part of cache keys)."""
        return params_digest(self.model, self.adapter, max(self.config.layers), self._base)

    def statistics(self, progress: Progress | None = None) -> dict[int, LayerStats]:
        """Second moments of the preserved keys per edited layer, on the base weights (cached)."""
        if self._stats is None:
            cfg, corpus = self.config, self._corpus()
            weights = self._weights_digest()
            corpus_digest = file_digest(corpus)
            self._stat_keys = {i: StatsCache.key(kind="moment", weights=weights, layer=i, corpus=corpus_digest,
                                                 tokens=cfg.stats_tokens, length=cfg.stats_max_length)
                               for i in cfg.layers}

            def compute(layers: list[int]) -> dict[int, LayerStats]:
                with self._base_weights():
                    return compute_second_moments(self.model, self.tokenizer, self.adapter, layers, corpus,
                                                  cfg.stats_tokens, cfg.stats_max_length, cfg.stats_batch_size,
                                                  progress)

            self._stats = {i: LayerStats(s.moment.to(self.device), s.count)
                           for i, s in self.cache.moments(self._stat_keys, compute).items()}
        return self._stats

    def projectors(self, progress: Progress | None = None) -> dict[int, torch.Tensor]:
        """Null-space projectors per edited layer (cached)."""
        if self._projectors is None:
            stats = self.statistics(progress)
            self._projectors = {}
            for i in self.config.layers:
                p, info = self.cache.projector(self._stat_keys[i], stats[i], self.config.nullspace_threshold,
                                               self.config.nullspace_energy)
                if info["kept"] == 0:
                    raise ValueError(f"layer {i}: the preserved keys span every direction (no null space at "
                                     f"threshold {self.config.nullspace_threshold}, energy "
                                     f"{self.config.nullspace_energy}); an AlphaEdit update would be zero")
                self._projectors[i], self.projector_info[i] = p.to(self.device), info
        return self._projectors

    def text_moments(self, text: str) -> dict[int, LayerStats]:
        """Second moments of ``text``'s keys at the edited layers, on the base weights: what
        ``output_change`` needs to say how much the edits move that text."""
        with self._base_weights():
            return text_moments(self.model, self.tokenizer, self.adapter, self.config.layers, text,
                                self.config.stats_max_length, self.config.stats_batch_size)

    def output_change(self, moments: dict[int, LayerStats]) -> dict[int, float]:
        """Per edited layer, the mean squared change of the projection's output over the keys of
        ``moments`` (from ``statistics`` or ``text_moments``), tr(D M D^T) with D every edit's
        delta so far: the edits' leak onto that text, before later layers act on it."""
        out = {}
        for i, stats in moments.items():
            delta = (self.adapter.weight(self.model, i).detach() - self._base[i]).to(torch.float64)
            # A float32 moment is PSD up to rounding: a trace a hair below 0 is 0.
            out[i] = max(0.0, float(torch.trace(delta @ stats.moment.to(delta) @ delta.T)))
        return out

    @property
    def protect_digest(self) -> str | None:
        """sha256 of the protected prompts (None without): they decide what the next batch computes."""
        return prompts_digest(self.protect) if self.protect else None

    def protected_moments(self) -> dict[int, torch.Tensor] | None:
        """Per edited layer, ``protect_weight`` times K K^T of the keys at every token (BOS left
        out), on the base weights, of the protected prompts and of ``protect_starts`` paragraph
        starts of the statistics corpus; None when there are neither.

        The statistics' moment is a mean over its corpus, so a shape of text the corpus hardly
        holds (a question, the line after it, the start of a text) is hardly protected, and an
        edit may change how every such prompt continues (docs/engine.md, Known limits). Computed
        once (one forward pass per ``PROMPT_MEMORY_ROWS`` prompts) and cached on disk beside the
        statistics, keyed by the base weights, the layer and the prompts."""
        cfg = self.config
        if self._protected is None:
            prompts = list(self.protect or [])
            if cfg.protect_starts:
                prompts += paragraph_starts(self._corpus(), cfg.protect_starts, cfg.protect_start_words)
            if not prompts:
                self._protected = {}
                return None
            weights, digest = self._weights_digest(), prompts_digest(prompts)
            keys = {i: StatsCache.key(kind="protected", weights=weights, layer=i, prompts=digest,
                                      length=cfg.stats_max_length) for i in cfg.layers}

            def compute(layers: list[int]) -> dict[int, LayerStats]:
                enc = self.tokenizer(prompts, return_tensors="pt", padding=True, truncation=True,
                                     max_length=cfg.stats_max_length).to(self.device)
                with self._base_weights():
                    sums = self._token_moments(enc["input_ids"], enc["attention_mask"])
                return {i: LayerStats(sums[i].cpu(), len(prompts)) for i in layers}

            self._protected = {i: cfg.protect_weight * s.moment.to(self.device)
                               for i, s in self.cache.moments(keys, compute).items()}
        return self._protected or None

    def context_templates(self) -> list[str]:
        """The context prefixes, generated once from the base weights (so any replica rebuilding
        a checkpoint gets the same ones) and then kept in the editing state."""
        if self.contexts is None:
            cfg = self.config
            fresh = cfg.retarget_prefixes == "fresh"
            rounds = cfg.retarget_rounds if fresh else 0
            with self._base_weights():
                made = generate_contexts(self.model, self.tokenizer, cfg.n_prefixes * (1 + rounds),
                                         cfg.prefix_tokens, cfg.seed)
            # One generator draws the first optimisation's prefixes first, then each round's in
            # turn: none depends on how many rounds follow it.
            self.contexts = made[:1 + cfg.n_prefixes]
            self.round_contexts = made[:1] + made[1 + cfg.n_prefixes:] if fresh else None
        return self.contexts

    def _round_prefixes(self, round_: int) -> list[str]:
        """The prefixes retarget round ``round_`` (from 0) optimises in: the first optimisation's,
        or with ``retarget_prefixes="fresh"`` the bare prompt and that round's own block."""
        if self.round_contexts is None:
            return self.contexts
        n = self.config.n_prefixes
        return self.round_contexts[:1] + self.round_contexts[1 + round_ * n:1 + (round_ + 1) * n]

    # -- editing --------------------------------------------------------------------------------

    def apply(self, records: Sequence[EditRequest | Mapping[str, Any]], progress: Progress | None = None) -> BatchResult:
        """Validate, then apply the batch to the model's weights; all or nothing."""
        cfg, model, tok, adapter = self.config, self.model, self.tokenizer, self.adapter
        requests = self.validate(records)
        timings: dict[str, float] = {}
        t = time.perf_counter()
        alphaedit = cfg.method == "alphaedit"
        projectors = self.projectors(progress) if alphaedit else None
        stats = self.statistics(progress) if not alphaedit or cfg.null_moment_weight > 0 else None
        protected = self.protected_moments()
        self.context_templates()
        timings["stats_seconds"] = time.perf_counter() - t

        snapshot = {i: adapter.weight(model, i).detach().clone() for i in cfg.layers}
        try:
            t = time.perf_counter()
            targets = optimise_targets(model, tok, adapter, requests, self.contexts, cfg, progress)
            timings["targets_seconds"] = time.perf_counter() - t
            t = time.perf_counter()
            # One recording pass per length group serves the per-layer updates and the final keys:
            # the layers below the first edited one never change, so their output is replayed from
            # a cache.
            rejoin = self._rejoining()
            earlier = [r for b in rejoin for r in b.requests]
            rows = context_rows(tok, earlier + requests, self.contexts).to(self.device)
            replay = SubjectReplay(model, adapter, rows, cfg.layers)
            z = torch.cat([b.z for b in rejoin] + [targets.z])
            deltas, start_values = self._update(rows, replay, z, projectors, stats, protected, self.memory, progress)
            again_cfg = cfg.replace(clamp_norm_factor=cfg.retarget_clamp_norm_factor or cfg.clamp_norm_factor)
            for round_ in range(cfg.retarget_rounds):
                # The KL term keeps the distribution before the batch, not the one the update left.
                again = optimise_targets(model, tok, adapter, requests, self._round_prefixes(round_),
                                         again_cfg, progress, kl_reference=targets.kl_reference)
                if not any(again.steps):  # the edited model holds every target
                    break
                # The first round's shift and KL reference stay; z is what the update and the store use.
                targets = dataclasses.replace(targets, z=again.z, nll=again.nll,
                                              steps=[a + b for a, b in zip(targets.steps, again.steps)])
                z = torch.cat([b.z for b in rejoin] + [targets.z])
                deltas = _joined(deltas, self._update(rows, replay, z, projectors, stats, protected, self.memory,
                                                      progress)[0])
            if self.repairs:
                deltas = self._repair(deltas, requests, targets.z, rows, replay, projectors, stats, protected, progress)
            if cfg.spectral_cap is not None:
                deltas = self._clip_spectrum(deltas, snapshot)
            # The passes added their deltas one by one; apply the batch's factors exactly as a
            # replay does (one U @ V^T per layer on the weights before the batch), so a
            # checkpoint rebuilt from its factors is bitwise the model that made it.
            self._set_weights(snapshot)
            for i, (u, v) in deltas.items():
                adapter.add_delta(model, i, u @ v.T)
            replay.changed(cfg.layers[0])
            replay.refresh()
            # This batch's own columns: its requests follow the rejoining earlier ones.
            first = len(earlier) * (len(self.contexts) if cfg.key_contexts == "each" else 1)
            keys = {i: self._batch_keys(replay.keys[i], rows)[:, first:].contiguous() for i in cfg.layers}
            end_values = replay.hidden[torch.arange(0, rows.size, len(self.contexts), device=self.device)][len(earlier):]
            start_values = start_values[len(earlier):]
            prompt_moments = self._prompt_moments(requests) if self.uses_prompt_memory else None
            timings["update_seconds"] = time.perf_counter() - t
        except BaseException:
            self._set_weights(snapshot)
            raise
        self._remember(StoredBatch(deltas, keys, list(requests), targets.z, cfg.layers[-1]), prompt_moments)
        if progress:
            progress("done", len(requests), len(requests))
        return BatchResult(deltas=deltas, keys=keys, target_prob=[float(torch.exp(torch.tensor(-x))) for x in targets.nll],
                           target_steps=targets.steps,
                           value_gap=((end_values - targets.z).norm(dim=-1)
                                      / (start_values - targets.z).norm(dim=-1).clamp_min(1e-12)).tolist(),
                           z=targets.z, timings=timings)

    def _update(self, rows: Rows, replay: SubjectReplay, z: torch.Tensor, projectors: dict | None,
                stats: dict | None, protected: dict | None, memory: dict[int, torch.Tensor],
                progress: Progress | None) -> tuple[LowRank, torch.Tensor]:
        """Per layer, shallow to deep: the residual still missing at the last layer, spread over
        the remaining layers, mapped to this projection's output and solved for; repeated for
        ``update_rounds`` passes over the layers (each pass solves for what the previous ones left).
        Returns the factors (one column block per pass) and the last layer's values before the
        first update."""
        cfg, model, adapter = self.config, self.model, self.adapter
        bare = torch.arange(0, rows.size, len(self.contexts), device=self.device)
        # One column per key: per request, or per (request, context) with the same shift.
        at = bare if cfg.key_contexts == "mean" else torch.arange(rows.size, device=self.device)
        dtype = torch.float64 if cfg.solve_dtype == "float64" else torch.float32
        factors: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {layer: [] for layer in cfg.layers}
        start = None
        steps = cfg.update_rounds * len(cfg.layers)
        for step in range(steps):
            i = step % len(cfg.layers)
            layer = cfg.layers[i]
            replay.refresh()
            keys = self._batch_keys(replay.keys[layer], rows)
            h_now = replay.hidden[bare]
            if start is None:
                start = h_now
            r = ((z - h_now) / (len(cfg.layers) - i))[rows.owner[at]]
            norm = adapter.post_norm_module(model, layer)
            if norm is not None:
                value = replay.values[layer][at]
                with torch.no_grad():
                    r = adapter.invert_post_norm(norm, norm(value) + r, value, cfg.post_norm_iterations) - value
            u, v = solve_update(
                keys, r.T, projector=projectors[layer] if projectors else None,
                memory=memory[layer] if cfg.sequential_memory else None,
                moment=stats[layer].moment if stats else None,
                moment_weight=cfg.null_moment_weight if projectors else cfg.mom2_update_weight,
                memory_weight=cfg.memory_weight, protected=protected[layer] if protected else None,
                alpha=cfg.alpha if projectors else 0.0, dtype=dtype,
            )
            delta = u @ v.T
            if not torch.isfinite(delta).all():
                raise FloatingPointError(f"the update of layer {layer} is not finite; nothing was applied")
            adapter.add_delta(model, layer, delta)
            replay.changed(layer)
            factors[layer].append((u, v))
            if progress:
                progress("layer", step + 1, steps)
        deltas = {layer: (torch.cat([u for u, _ in fs], 1), torch.cat([v for _, v in fs], 1))
                  for layer, fs in factors.items()}
        return deltas, start

    def _repair(self, deltas: LowRank, requests: list[EditRequest], z_own: torch.Tensor, rows: Rows,
                replay: SubjectReplay, projectors: dict | None, stats: dict | None, protected: dict | None,
                progress: Progress | None) -> LowRank:
        """``repair_limit``: with the batch's passes applied, the earlier requests the model holds
        least surely are solved back to their stored targets; they leave K_p for this solve. The
        batch's own requests (``rows``, ``z_own``) join it as keys as they are now
        (``repair_batch="keys"``) or are solved again beside them (``"targets"``). Returns the
        batch's factors with the repair's appended."""
        cfg = self.config
        batches = [b for b in self.history if self._repairable(b)]
        earlier = [r for b in batches for r in b.requests]
        chosen = self._least_sure(earlier)
        if not len(chosen):
            return deltas
        held = cfg.repair_batch == "keys"  # the batch's own keys held in K_p, not solved again
        if held:
            replay.changed(cfg.layers[0])
            replay.refresh()
        # Stored keys: one column per request, or one per (request, context) with key_contexts="each".
        per = len(self.contexts) if cfg.key_contexts == "each" else 1
        cols = (chosen[:, None] * per + torch.arange(per, device=self.device)).flatten()
        memory = {}
        for i in cfg.layers:
            leaving = torch.cat([b.keys[i] for b in batches], 1)[:, cols]
            memory[i] = self.memory[i] - leaving @ leaving.T
            if held:
                kept = self._batch_keys(replay.keys[i], rows)
                memory[i] = memory[i] + kept @ kept.T
        solved = [earlier[j] for j in chosen.tolist()] + ([] if held else list(requests))
        z = torch.cat([torch.cat([b.z for b in batches])[chosen]] + ([] if held else [z_own]))
        rows = context_rows(self.tokenizer, solved, self.contexts).to(self.device)
        repair, _ = self._update(rows, SubjectReplay(self.model, self.adapter, rows, cfg.layers), z,
                                 projectors, stats, protected, memory, progress)
        return _joined(deltas, repair)

    def _least_sure(self, requests: list[EditRequest]) -> torch.Tensor:
        """Indices, in order, of up to ``repair_limit`` requests whose new target leads their true
        answer by the least (bare prompt, mean token NLL), within ``repair_margin``."""
        cfg = self.config
        if not requests:
            return torch.empty(0, dtype=torch.long, device=self.device)
        # Each prompt runs once; its new target and true answer share its KV cache.
        scores = score_targets(self.model, self.tokenizer, [r.text for r in requests],
                               [[r.target_new] + ([r.target_true] if r.target_true else []) for r in requests])
        lead = torch.tensor([sum(s.nll for s in pair[1:]) - pair[0].nll for pair in scores], dtype=torch.float64)
        chosen = (-lead).topk(min(cfg.repair_limit, len(requests))).indices
        chosen = chosen[lead[chosen] < cfg.repair_margin]
        return chosen.sort().values.to(self.device)

    @functools.cached_property
    def _clip_limit(self) -> float:
        """``spectral_cap`` times the base weight's largest singular value (the base never changes)."""
        base = self._base[self.config.layers[-1]]
        return self.config.spectral_cap * float(torch.linalg.matrix_norm(base.to(torch.float64), 2))

    def _clip_spectrum(self, deltas: LowRank, snapshot: dict[int, torch.Tensor]) -> LowRank:
        """The batch's factors with the last layer's ``spectral_cap`` correction appended: it acts
        on the delta of every batch so far, and keys of the edited layers do not depend on it."""
        last = self.config.layers[-1]
        u, v = deltas[last]
        correction = spectral_clip(snapshot[last] + u @ v.T - self._base[last], self._clip_limit)
        if correction is None:
            return deltas
        return {**deltas, last: (torch.cat([u, correction[0]], 1), torch.cat([v, correction[1]], 1))}

    def _batch_keys(self, at: torch.Tensor, rows: Rows) -> torch.Tensor:
        """Keys (``at``: one per row, at the subject's last token) averaged over each request's
        contexts, (d_ff, n), or one per row, (d_ff, rows), as ``key_contexts`` says."""
        if self.config.key_contexts == "each":
            return at.T.contiguous()
        n = int(rows.owner.max()) + 1
        total = torch.zeros(n, at.shape[1], device=at.device).index_add(0, rows.owner, at)
        return (total / torch.bincount(rows.owner, minlength=n)[:, None]).T.contiguous()

    # -- state ----------------------------------------------------------------------------------

    @property
    def uses_targets(self) -> bool:
        """Whether earlier batches rejoin updates by their stored targets (``earlier_edits``)."""
        return self.config.sequential_memory and self.config.earlier_edits == "targets"

    def _rejoins(self, batch: StoredBatch) -> bool:
        """Whether ``batch`` takes part in later updates by its targets rather than in K_p."""
        return self.uses_targets and self._repairable(batch)

    def _rejoining(self) -> list[StoredBatch]:
        return [b for b in self.history if self._rejoins(b)]

    @property
    def repairs(self) -> bool:
        """Whether each batch repairs earlier requests by target (``repair_limit``; K_p mode only)."""
        cfg = self.config
        return cfg.repair_limit > 0 and cfg.sequential_memory and cfg.earlier_edits == "keys"

    @property
    def needs_targets(self) -> bool:
        """Whether updates read earlier batches' requests and target values (to rejoin or repair)."""
        return self.uses_targets or self.repairs

    def _repairable(self, batch: StoredBatch) -> bool:
        """Whether ``batch`` can rejoin or be repaired by target: stored with its requests and
        target values at the current last edited layer."""
        return batch.z is not None and batch.requests is not None and batch.z_layer == self.config.layers[-1]

    @property
    def uses_prompt_memory(self) -> bool:
        """Whether K_p also holds every token of earlier edits' prompts (``prompt_memory_weight``)."""
        return self.config.sequential_memory and self.config.prompt_memory_weight > 0

    def _remember(self, batch: StoredBatch, prompt_moments: dict[int, torch.Tensor] | None = None) -> None:
        """Add an applied batch to the memory; without ``prompt_moments`` (when the prompt memory
        is on) they are computed here, so the model must hold the weights the batch left."""
        if self.uses_prompt_memory and prompt_moments is None:  # replay has checked the requests
            prompt_moments = self._prompt_moments(batch.requests)
        if not self._rejoins(batch):
            for i, k in batch.keys.items():
                self.memory[i] += k @ k.T
        if prompt_moments is not None:
            for i, moment in prompt_moments.items():
                self.memory[i] += self.config.prompt_memory_weight * moment
        self.history.append(batch)

    def _prompt_moments(self, requests: Sequence[EditRequest]) -> dict[int, torch.Tensor]:
        """Per edited layer, K K^T of the keys at every token of the requests' bare prompts and
        their targets' leading tokens (BOS left out: every text shares it), on the current weights."""
        rows = context_rows(self.tokenizer, requests, ["{}"], with_targets=True).to(self.device)
        return self._token_moments(rows.input_ids, rows.attention_mask)

    def _token_moments(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[int, torch.Tensor]:
        """Per edited layer, K K^T of the keys at every real token of ``ids`` but BOS (every text
        shares it), on the current weights, ``PROMPT_MEMORY_ROWS`` rows per forward pass."""
        layers = list(self.config.layers)
        keep = mask.bool()
        if self.tokenizer.bos_token_id is not None:
            keep &= ids != self.tokenizer.bos_token_id
        moments = {i: torch.zeros_like(self.memory[i]) for i in layers}
        for chunk in torch.arange(ids.shape[0], device=self.device).split(PROMPT_MEMORY_ROWS):
            accumulate_key_moments(self.model, self.adapter, layers, ids[chunk], mask[chunk], moments, keep[chunk])
        return moments

    def replay(self, deltas: LowRank, keys: dict[int, torch.Tensor], requests: Sequence[EditRequest] | None = None,
               z: torch.Tensor | None = None, z_layer: int | None = None) -> None:
        """Re-apply a stored batch: its deltas to the weights; its keys to K_p, or, with
        ``earlier_edits="targets"``, its requests and target values (``z`` at ``z_layer``) to
        the updates to come (a batch stored without them, or with targets at another layer, falls
        back to K_p). With ``prompt_memory_weight`` the requests are required: their prompts'
        keys are recomputed on the weights the batch left, which the model must otherwise hold
        (every earlier batch replayed, on every layer)."""
        if self.uses_prompt_memory and requests is None:
            raise ValueError("prompt_memory_weight needs every earlier batch's requests; replay was given none")
        to = lambda t: t.to(self.device)  # noqa: E731
        deltas = {i: (to(u), to(v)) for i, (u, v) in deltas.items()}
        for i, (u, v) in deltas.items():
            self.adapter.add_delta(self.model, i, u @ v.T)
        self._remember(StoredBatch(deltas, {i: to(k) for i, k in keys.items()},
                                   list(requests) if requests is not None else None,
                                   None if z is None else to(z), z_layer))

    def restore_base(self) -> None:
        """Back to the base weights with an empty editing memory."""
        self._set_weights(self._base)
        for m in self.memory.values():
            m.zero_()
        self.history.clear()

    def _set_weights(self, weights: dict[int, torch.Tensor]) -> None:
        with torch.no_grad():
            for i, w in weights.items():
                self.adapter.weight(self.model, i).copy_(w)

    @contextmanager
    def _base_weights(self) -> Iterator[None]:
        """The edited projections hold their base weights inside this block (for statistics)."""
        saved = {i: self.adapter.weight(self.model, i).detach().clone() for i in self._base}
        self._set_weights(self._base)
        try:
            yield
        finally:
            self._set_weights(saved)

    def save_state(self, folder: str | Path) -> Path:
        """Write everything needed to continue editing: settings, contexts, K_p and the batches."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"memory.{i}": m for i, m in self.memory.items()}
        batch_meta = []
        for b, batch in enumerate(self.history):
            for i, (u, v) in batch.deltas.items():
                tensors[f"batch{b}.{i}.U"], tensors[f"batch{b}.{i}.V"] = u, v
                tensors[f"batch{b}.{i}.K"] = batch.keys[i]
            if batch.z is not None:
                tensors[f"batch{b}.Z"] = batch.z
            batch_meta.append({"z_layer": batch.z_layer,
                               "requests": [dataclasses.asdict(r) for r in batch.requests] if batch.requests else None})
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, folder / "state.safetensors")
        meta = {"engine_version": ENGINE_VERSION, "config": self.config.to_dict(), "contexts": self.contexts,
                "round_contexts": self.round_contexts,
                "batches": len(self.history), "batch_requests": batch_meta,
                "protected_prompts": self.protect_digest}
        (folder / "state.json").write_text(json.dumps(meta, indent=2))
        return folder

    @classmethod
    def load_state(cls, model: nn.Module, tokenizer, folder: str | Path, cache_dir: str | Path,
                   corpus: Sequence[str | Path | CorpusText] | None = None,
                   protect: Sequence[str | Path] | None = None) -> "Editor":
        """An editor for the BASE ``model`` with a saved state's batches replayed and K_p restored."""
        folder = Path(folder)
        meta = json.loads((folder / "state.json").read_text())
        if meta["engine_version"] != ENGINE_VERSION:
            raise ValueError(f"state from engine version {meta['engine_version']}, this is {ENGINE_VERSION}")
        editor = cls(model, tokenizer, EditConfig.from_dict(meta["config"]), cache_dir, corpus, protect)
        if meta.get("protected_prompts") != editor.protect_digest:  # the next batch would differ
            raise ValueError(f"the state was written with protected prompts {meta.get('protected_prompts')}, "
                             f"this editor has {editor.protect_digest}: pass the same --protect files")
        editor.contexts = meta["contexts"]
        editor.round_contexts = meta.get("round_contexts")
        tensors = load_file(folder / "state.safetensors", device=str(editor.device))
        for b in range(meta["batches"]):
            deltas = {i: (tensors[f"batch{b}.{i}.U"], tensors[f"batch{b}.{i}.V"]) for i in editor.config.layers}
            keys = {i: tensors[f"batch{b}.{i}.K"] for i in editor.config.layers}
            for i, (u, v) in deltas.items():
                editor.adapter.add_delta(model, i, u @ v.T)
            stored = meta.get("batch_requests", [{}] * meta["batches"])[b]  # older states: keys only
            requests = parse_requests(stored["requests"]) if stored.get("requests") else None
            editor.history.append(StoredBatch(deltas, keys, requests, tensors.get(f"batch{b}.Z"), stored.get("z_layer")))
        for i in editor.config.layers:
            editor.memory[i] = tensors[f"memory.{i}"].clone()
        return editor
