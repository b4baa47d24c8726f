"""Engine settings: one documented dataclass, with per-family, per-method defaults."""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass
from typing import Any, Literal

Method = Literal["alphaedit", "memit"]


@dataclass(frozen=True)
class EditConfig:
    """Everything that decides what an edit computes (and so belongs in a checkpoint's ID).

    Attributes:
        method: ``alphaedit`` (null-space projected update with sequential memory) or ``memit``
            (covariance-weighted update, no projection).
        layers: indices of the decoder layers whose MLP output projection is edited.
        v_lr: Adam learning rate of the target-vector optimisation.
        v_max_steps: upper bound on optimisation steps; requests stop early on convergence.
        v_loss_threshold: a request has converged once its target NLL is below this.
        clamp_norm_factor: the target shift is clamped to this fraction of the value's norm.
            Larger shifts reach more paraphrases and more neighbours (one gemma3 batch at 1.5:
            generalization 0.82 instead of 0.71, specificity 0.70 instead of 0.79); over 500
            edits the later batches erode most of the gain (docs/benchmarks.md, thirteenth session).
        kl_factor: weight of KL(original || edited) on "{subject} is a" (essence drift). At 0 a
            gemma3 stream gains a little efficacy and generalization, and what the model says
            after an edited subject's name on other prompts moves about half as much again
            (docs/benchmarks.md, twenty-fifth session), so the paper's 0.0625 stays.
        v_weight_decay: weight of ||delta|| / ||value||^2.
        n_prefixes: generated context prefixes (plus the bare prompt) per request.
        prefix_tokens: length of each generated prefix, in tokens.
        nullspace_threshold: absolute eigenvalue threshold: directions of the preserved key second
            moment with eigenvalue below it form the null space (AlphaEdit's released code: 2e-2).
        nullspace_energy: relative alternative: keep the smallest directions whose eigenvalues sum
            to at most this fraction of the trace. Used instead of ``nullspace_threshold`` when set.
        alpha: ridge term of the AlphaEdit solve (released code: 10).
        update_rounds: passes of the per-layer update over the edited layers; each pass solves
            for the residual the previous ones left (a first pass leaves 5-10% of the distance to
            the target value on Gemma 3, and its target probabilities fall off a cliff within
            that margin; see docs/benchmarks.md). The deltas' rank grows with the passes.
        post_norm_iterations: L-BFGS iterations that map a shift after a post-projection norm
            (Gemma 3) back to the projection output. Fewer leave each batch short of its
            targets; more land it better but erode a stream's earlier batches faster (500
            gemma3 edits at 200: CounterFact generalization +0.058, zsRE efficacy -0.081,
            perplexity +3.5 points; docs/benchmarks.md). Unused by families without such a norm.
        key_contexts: ``mean``: one key per request, averaged over its contexts (the reference);
            ``each``: one key per (request, context), all asked for the same shift, so the update
            realises the target in every context rather than for their average key.
        mom2_update_weight: MEMIT's weight on the preserved second moment.
        null_moment_weight: AlphaEdit's weight on the preserved second moment inside the null
            space (0: the paper's hard projection alone). The projector keeps every direction
            below the threshold equally free, yet on small models they still carry 5-17% of the
            preserved key energy; weighting them by that energy steers the update to the quietest
            ones, as MEMIT does over the whole space.
        spectral_cap: after each batch, the singular values of the last edited layer's accumulated
            delta (every batch so far) are clipped at this fraction of the base weight's largest
            singular value (None: off, the default), as PRUNE restrains an edited matrix's
            spectrum. On CounterFact the largest directions of that delta cost general text more
            than they carry the edits (gemma3 at 0.4, 500 edits: perplexity +9.7% instead of
            +13.4% at the same efficacy); on zsRE they carry more (efficacy 0.501 instead of
            0.603), hence opt-in (docs/benchmarks.md, twelfth session). The clip is stored as extra
            columns of the batch's factors, and its rows lie in the update's row space, so the
            null-space property holds for it.
        sequential_memory: earlier batches take part in each new batch's solve (without it, a
            new batch may undo them).
        earlier_edits: how they take part. ``keys``: the paper's K_p, the earlier edits' keys as
            stored, whose outputs the update keeps where they were. ``targets``: every earlier
            request rejoins the update with its stored target value and its keys recomputed on
            the current model, so an edit whose subject keys drifted under later batches is
            pulled back to its target (the update's cost then grows with every edit so far).
        retarget_rounds: after the batch's update passes, its targets are optimised again on the
            edited model (the KL term still holding the distribution before the batch) and the
            update solves for the new ones, this many times (0: the paper's single target). The
            weights realise a shift made at one position in a few contexts, and they also move
            the prompt's other tokens, so an edit whose target the shift reached may still miss
            it on the edited model. A request the edited model already holds (mean target NLL
            below ``v_loss_threshold``) keeps its value; a round where every request holds ends
            the loop early. Cost: one target optimisation and one update per round. One zsRE
            batch of 100 on gemma3 with 1: efficacy 0.989 instead of 0.787, generalization 0.763
            instead of 0.514, at perplexity +2.9% instead of +1.5% and fluency -8.5% instead of
            -2.2%; 500 gemma3 CounterFact edits: generalization 0.812 instead of 0.716, but
            perplexity +18.8% instead of +9.6% and specificity -0.106 instead of -0.052
            (docs/benchmarks.md, thirty-third and thirty-fourth sessions), hence opt-in.
        retarget_clamp_norm_factor: the clamp of a retarget round's shift, as a fraction of the
            value's norm on the edited model (None: ``clamp_norm_factor``). The first shift sits at
            the clamp for every gemma3 CounterFact request, and so does the round's for every
            request it moves (30 edits probed), even one a single step holds: the round adds a
            second push of the full size on top of the first. At 0.375, 500 gemma3 CounterFact
            edits keep the full round's efficacy and generalization (0.996, 0.816) at
            specificity -0.094 instead of -0.106 and perplexity +15.2% instead of +18.8%; at
            0.2, generalization 0.784 at +12.7%. On records 500-999 and on seed 1 the 0.375
            round reaches 0.790 and 0.814 at +10.7% and +17.9%, the 0.2 round 0.782 and 0.764
            at +8.8% and +17.1% (seed 2: 0.798 at +11.2%); 500 zsRE edits with the 0.375
            round (protected questions, earlier edits by target): efficacy 0.969 at +13.1%
            (docs/benchmarks.md, thirty-fifth to thirty-seventh sessions).
        retarget_prefixes: the context prefixes a retarget round optimises in. ``same``: the
            first optimisation's. ``fresh``: each round as many others of its own, sampled after
            them from the same seed (so the first optimisation keeps its prefixes, and a round
            its own whatever follows it), so the round tests the edit in contexts it was not
            made in, as a paraphrase does. With the 0.2 round over 500 gemma3 CounterFact edits,
            on six samples (seeds 0-4 on records 0-499, records 500-999): generalization +0.011
            on average (0.794 against 0.783; from -0.018 on seed 3 to +0.032 on seed 2, which
            reaches 0.830), efficacy within 0.012, perplexity +0.5 points on average (held-out
            +0.6): about the price per point of generalization a larger round clamp pays, and
            less than the seeds' spread. Two rounds at half the clamp land where one round at
            three quarters of it does (seed 2). On 500 zsRE edits (0.375 round): efficacy the
            same, fluency 3 points lower (docs/benchmarks.md, thirty-eighth to fortieth
            sessions).
        repair_limit: after each batch, up to this many earlier requests are solved back to their
            stored target values (keys recomputed on the model the batch left, every other edit's
            keys in K_p, the batch's own included) and the repair's factors join the batch's. Which
            ones: those the model now holds least surely, by how far their new target's mean token
            NLL on the bare prompt leads the true answer's (a request without a true answer counts
            its new target's NLL alone). Later batches erode earlier edits through their margin,
            not through how far their values moved (docs/engine.md). At 100 on gemma3, 500
            CounterFact edits: efficacy 0.980-0.986 instead of 0.944-0.958 at the defaults'
            perplexity (three runs), for 1.1-1.6 times the update time; on zsRE efficacy 0.574
            instead of 0.628 (the newest batch pushed off its targets), hence opt-in
            (docs/benchmarks.md, twenty-ninth session). 0: off (the paper). Unused
            without ``sequential_memory`` or with ``earlier_edits="targets"`` (every earlier
            request rejoins each update then).
        repair_margin: only earlier requests whose new target leads by less than this many nats
            (or trails) are repaired: those already far ahead are left alone, and each batch's
            repair costs only what it fixes (500 gemma3 edits: perplexity +10.8% instead of
            +16.1% repairing 100 regardless, at efficacy 0.986; docs/benchmarks.md).
        repair_batch: how the batch's own requests take part in the repair. ``keys``: their keys,
            as the batch left them, join K_p, so the repair keeps their values where they are.
            ``targets``: they are solved again to their target values beside the repaired ones,
            so a repair that pulls similar earlier keys back cannot push the new batch off its
            targets (zsRE's question templates, whose keys lie close together). On gemma3
            CounterFact it raises generalization 0.014-0.046 for 0.6-1.3 points of held-out
            perplexity; on zsRE it won on one seed and lost on the other, within the seeds' own
            spread (docs/benchmarks.md, twenty-ninth to thirty-second sessions).
        memory_weight: weight of K_p K_p^T in the solve (the paper: 1, the same weight as the batch's
            own keys, so a new batch may move earlier edits' values as much as it misses its own).
        prompt_memory_weight: weight, per token, of the keys at every token of earlier edits'
            prompts and target prefixes (on the model they left), added to K_p beside their
            subject keys (0: the paper's subject keys only). A later batch then keeps the whole
            computation of an earlier edit's answer in place, not only its subject's value, where
            the subject key's drift through the prompt's other tokens erodes it (see
            docs/benchmarks.md). Rebuilt from the stored requests when a chain is replayed.
        protect_weight: weight, per token, of the keys at every token of the editor's protected
            prompts (``Editor(protect=...)``, ``--protect FILE``: prompts whose continuations must
            not change, one per line), on the base weights, in every update's solve beside K_p.
            Unused without protected prompts. The statistics' moment weighs all its tokens
            together as ``null_moment_weight`` tokens, so a shape the corpus hardly holds
            (questions, say) is hardly protected; a protected token weighs this fraction of an
            earlier edit's key (docs/engine.md).
        protect_starts: how many paragraph starts of the statistics corpus (their first
            ``protect_start_words`` words) join every update's solve like protected prompts, each
            token with ``protect_weight``. The statistics read the corpus packed into 256-token
            sequences, so keys near the start of a text, where a short prompt's subject sits, are
            hardly in the projector's moment, and an edit moves what the model says after the names
            of subjects no edit touched (gemma3, 200 CounterFact edits: 0.49 nats of next-token KL
            after "{subject} is" and the like without starts, 0.11 with 400; docs/benchmarks.md, twenty-sixth
            session). 0: the paper's update; the default but on gemma3 (AlphaEdit), whose
            edits move such continuations most.
        protect_start_words: words of each paragraph start.
        stats_tokens: preserved-knowledge tokens to accumulate for the second moment.
        stats_max_length: tokens per statistics sequence.
        stats_batch_size: sequences per statistics forward pass (bounds memory).
        solve_dtype: ``float32`` or ``float64`` for the linear solve.
        target_dtype: precision of the target optimisation's forward/backward passes:
            ``bfloat16`` (autocast, for GPUs), ``float32``, or ``auto`` (bfloat16 on GPUs that
            have it, else float32; the editor stores the resolved value). The final target values
            and their reported probabilities are always computed in float32, as are statistics,
            keys and the update.
        seed: seeds prefix generation and anything else random.
    """

    method: Method = "alphaedit"
    layers: tuple[int, ...] = (4, 5, 6, 7, 8)
    v_lr: float = 0.5
    v_max_steps: int = 25
    v_loss_threshold: float = 5e-2
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    v_weight_decay: float = 0.5
    n_prefixes: int = 5
    prefix_tokens: int = 10
    nullspace_threshold: float = 2e-2
    nullspace_energy: float | None = None
    alpha: float = 10.0
    key_contexts: Literal["mean", "each"] = "mean"
    update_rounds: int = 3
    post_norm_iterations: int = 100
    mom2_update_weight: float = 15000.0
    null_moment_weight: float = 0.0
    spectral_cap: float | None = None
    sequential_memory: bool = True
    earlier_edits: Literal["keys", "targets"] = "keys"
    retarget_rounds: int = 0
    retarget_clamp_norm_factor: float | None = None
    retarget_prefixes: Literal["same", "fresh"] = "same"
    repair_limit: int = 0
    repair_margin: float = 1.0
    repair_batch: Literal["keys", "targets"] = "keys"
    memory_weight: float = 1.0
    prompt_memory_weight: float = 0.0
    protect_weight: float = 0.1
    protect_starts: int = 0
    protect_start_words: int = 8
    stats_tokens: int = 100_000
    stats_max_length: int = 256
    stats_batch_size: int = 8
    solve_dtype: Literal["float32", "float64"] = "float32"
    target_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        for name, choices in _choices().items():
            if getattr(self, name) not in choices:
                allowed = " or ".join([", ".join(choices[:-1]), choices[-1]])
                raise ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}")
        if not self.layers or sorted(set(self.layers)) != list(self.layers):
            raise ValueError(f"layers must be non-empty, increasing and unique, got {self.layers!r}")
        if self.nullspace_energy is not None and not 0 < self.nullspace_energy < 1:
            raise ValueError(f"nullspace_energy must be in (0, 1), got {self.nullspace_energy}")
        for name, unset in (("spectral_cap", "off"), ("retarget_clamp_norm_factor", "clamp_norm_factor")):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive (or None: {unset}), got {getattr(self, name)}")
        for name in ("memory_weight", "prompt_memory_weight", "protect_weight", "null_moment_weight", "kl_factor",
                     "v_weight_decay", "v_loss_threshold", "n_prefixes", "nullspace_threshold", "alpha",
                     "mom2_update_weight", "protect_starts", "retarget_rounds", "repair_limit", "repair_margin"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("v_lr", "v_max_steps", "update_rounds", "post_norm_iterations", "clamp_norm_factor", "prefix_tokens",
                     "protect_start_words", "stats_tokens", "stats_max_length", "stats_batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EditConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown engine settings: {', '.join(unknown)}")
        d = dict(d)
        if "layers" in d:
            d["layers"] = tuple(int(i) for i in d["layers"])
        return cls(**d)

    def replace(self, **changes: Any) -> "EditConfig":
        return dataclasses.replace(self, **changes) if changes else self


@functools.cache
def _choices() -> dict[str, tuple[str, ...]]:
    """The allowed values of every ``Literal`` setting, read from the annotations so a new one is
    checked without a check of its own."""
    hints = typing.get_type_hints(EditConfig)
    return {name: typing.get_args(hint) for name, hint in hints.items() if typing.get_origin(hint) is Literal}


# Per family (as named by the model adapter) and method; tuned by measurement on the built-in
# models, see docs/benchmarks.md. Families not listed use the dataclass defaults.
# Two short prefixes instead of the reference's five of ten tokens: the target optimisation's
# cost is proportional to the tokens it replays, and on 2 CPU cores that decides whether a
# 100-edit batch takes minutes or half an hour. Gemma 3 reaches its targets with a lighter ridge,
# and its leaky null space is weighted by the preserved energy: over 500 edits that took the
# perplexity increase from +31% to +12% at 0.01 of efficacy. Its target is optimised at layer 6,
# not 7: paraphrases follow a shift made lower in the stack (500 edits: generalization 0.684
# instead of 0.636, with efficacy, specificity, fluency and perplexity all as good or better at
# four passes and weight 3000). On smollm2 (llama family), 500 CounterFact edits with weight 6000
# and statistics from 250k tokens instead of 3000 and 100k: efficacy 0.982 (0.978), fluency -3.2%
# (-7.8%), perplexity +14.1% (+22.5%), specificity -0.032 (-0.058). Those 250k tokens lie inside
# wiki.valid.raw (267k smollm2 tokens); the default corpus never reaches the perplexity text.
# The spectral cap of the last edited layer is off by default (twelfth session, 500 edits): gemma3
# at 0.4 took CounterFact perplexity from +13.4% to +9.7% at the same efficacy and generalization,
# but zsRE efficacy from 0.603 to 0.501; smollm2 at 0.55 meets all five CounterFact targets on
# the held-out text for the first 500 records, not for the next 500 (fluency -6.5%, +10.4%); its
# zsRE was not measured with it.
# Paragraph starts (twenty-sixth session) on gemma3 only: 500 CounterFact edits with 400 of them
# gained on every figure but fluency (perplexity +9.6% instead of +15.3%, untouched-subject drift
# 0.60 nats instead of 1.34); on smollm2 they bought nothing measurable (drift 0.26 instead of
# 0.28) and cost a little (efficacy 0.978 instead of 0.988, perplexity +14.8% instead of +14.1%).
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(layers=(4, 5, 6, 7, 8), n_prefixes=2, prefix_tokens=5, null_moment_weight=6000.0,
                  stats_tokens=250_000),
    "gemma3": dict(layers=(2, 3, 4, 5, 6), n_prefixes=2, prefix_tokens=5, alpha=1.0, null_moment_weight=3000.0,
                   update_rounds=4, protect_starts=400),
    "gpt2": dict(layers=(1, 2)),
}
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "alphaedit": dict(sequential_memory=True),
    "memit": dict(sequential_memory=False, protect_starts=0, repair_limit=0),
}


def default_config(family: str, method: Method = "alphaedit", num_layers: int | None = None, **overrides: Any) -> EditConfig:
    """Defaults for a family and method, clipped to the model's depth, with overrides on top."""
    values: dict[str, Any] = {"method": method, **FAMILY_DEFAULTS.get(family, {}), **METHOD_DEFAULTS[method]}
    if num_layers is not None and "layers" not in overrides:
        layers = tuple(i for i in values.get("layers", EditConfig.layers) if i < num_layers)
        # Small models (tests): two layers in the lower part, below the last layer (a shift at the
        # subject reaches the predicted tokens only through the attention of later layers).
        values["layers"] = layers if layers and max(layers) < num_layers - 1 else (num_layers // 4, num_layers // 4 + 1)
    values.update(overrides)
    return EditConfig(**values)
