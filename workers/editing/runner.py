"""Run a model's decoder layers piecewise, reusing what does not change.

During target optimisation and per-layer key recomputation only the layers from some index on
are affected. One full pass records each layer's inputs (masks, rotary embeddings, position ids:
whatever the family passes), after which ``run`` replays a slice of the stack from a cached
hidden state. This is what keeps the layers below the edited ones out of every optimisation step;
``SuffixRunner`` also keeps out the positions before the one that changes.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from editfleet.workers.editing.batching import GROUP_COST, MAX_GROUPS, Rows, length_groups
from editfleet.workers.models.adapters import FamilyAdapter


class _Stop(Exception):
    """Raised inside a hook to end a forward pass early."""


@contextmanager
def hooks(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class LayerRunner:
    """Captures one forward pass of a padded batch and replays layer slices of it.

    Args:
        model, adapter: the model and its family adapter.
        input_ids, attention_mask: the (right-padded) batch.
        start: first layer whose input hidden state is kept (the slice start).
        stop: last layer the recording pass needs to reach (None: all layers).
        cache: a ``Cache`` stand-in handed, during the recording pass, to the layers from
            ``start`` on that take one by keyword (so it sees their keys and values).
    """

    def __init__(self, model: nn.Module, adapter: FamilyAdapter, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor, start: int, stop: int | None = None, cache: object | None = None):
        self.model, self.adapter = model, adapter
        self.layers = adapter.layer_modules(model)
        self.stop = len(self.layers) - 1 if stop is None else stop
        self.start = start
        self.calls: dict[int, tuple[bool, tuple, dict]] = {}
        self.hidden_in: torch.Tensor | None = None

        def pre_hook(index: int):
            def hook(module, args, kwargs):
                as_kw = not args
                hidden = kwargs["hidden_states"] if as_kw else args[0]
                kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                self.calls[index] = (as_kw, tuple(args[1:]), kw)
                if index == self.start:
                    self.hidden_in = hidden.detach()
                if cache is not None and "cache" in kwargs and len(args) <= 1:
                    return args, {**kwargs, "cache": cache}
            return hook

        def stop_hook(module, args, output):
            raise _Stop

        handles = [self.layers[j].register_forward_pre_hook(pre_hook(j), with_kwargs=True)
                   for j in range(start, self.stop + 1)]
        handles.append(self.layers[self.stop].register_forward_hook(stop_hook))
        with hooks(handles), torch.no_grad():
            try:
                model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            except _Stop:
                pass
        if self.hidden_in is None:
            raise RuntimeError("the recording pass did not reach the start layer")

    def run(self, end: int | None = None, hidden: torch.Tensor | None = None, start: int | None = None,
            rows: torch.Tensor | None = None, inputs: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """Hidden state output by layer ``end`` (default: the recorded stop), from ``start``'s input.

        ``rows``: replay only these rows of the batch (their masks and position inputs are taken
        from the recording), e.g. the rows of requests still being optimised. ``inputs``: filled
        with each replayed layer's input hidden state, so a later replay can start there.
        """
        start = self.start if start is None else start
        end = self.stop if end is None else end
        h = self.hidden_in if hidden is None else hidden
        if rows is not None:
            h = h[rows]
        for j in range(start, end + 1):
            as_kw, rest, kw = self.calls[j]
            if rows is not None:
                rest, kw = _take(rest, rows, self.hidden_in.shape[0]), _take(kw, rows, self.hidden_in.shape[0])
            if inputs is not None:
                inputs[j] = h
            out = self.layers[j](*rest, hidden_states=h, **kw) if as_kw else self.layers[j](h, *rest, **kw)
            h = out[0] if isinstance(out, tuple) else out
        return h


class _PrefixCache:
    """Stands in for a transformers ``Cache`` in a suffix replay: each attention layer gets the
    frozen positions' keys and values (recorded once) in front of the replayed ones."""

    def __init__(self, keys: dict[int, torch.Tensor], values: dict[int, torch.Tensor]):
        self.keys, self.values = keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        return (torch.cat([self.keys[layer_idx].to(key_states.dtype), key_states], -2),
                torch.cat([self.values[layer_idx].to(value_states.dtype), value_states], -2))


class _Recorder:
    """A ``Cache`` stand-in that keeps the first ``width`` positions' keys and values per layer."""

    def __init__(self, width: int):
        self.width = width
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.keys[layer_idx] = key_states[..., : self.width, :].detach()
        self.values[layer_idx] = value_states[..., : self.width, :].detach()
        return key_states, value_states


class SuffixRunner:
    """A ``LayerRunner`` that replays only each row's positions from ``split`` on.

    When only the positions from ``split[r]`` on can change (a target shift added at the
    subject's last token: causal attention keeps every earlier position as it was), the earlier
    positions' keys and values are recorded once per layer and each replay runs the suffix
    alone, attending to them. On CounterFact batches the suffixes hold a third of the padded
    tokens (docs/benchmarks.md). Hidden states come back in suffix coordinates: slot ``s`` of row
    ``r`` is position ``split[r] + s``.

    Families whose layers take other per-position inputs, or the attention mask positionally
    (GPT-2), are replayed whole: ``split`` is then all zeros and ``run`` is the plain replay.
    """

    def __init__(self, model: nn.Module, adapter: FamilyAdapter, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor, split: torch.Tensor, start: int):
        width = int(split.max())
        recorder = _Recorder(width)  # keys and values of the recording pass itself
        self.full = LayerRunner(model, adapter, input_ids, attention_mask, start=start, cache=recorder)
        self.start, self.stop, self.layers = start, self.full.stop, self.full.layers
        layers = range(start, self.stop + 1)
        if not all(self._reusable(j) for j in layers) or set(recorder.keys) != set(layers):
            self.split = torch.zeros_like(split)
            self.hidden_in = self.full.hidden_in
            return
        self.split = split
        self.keys, self.values = recorder.keys, recorder.values
        rows = torch.arange(len(split), device=split.device)[:, None]
        slots = int((attention_mask.sum(1) - split).max())
        pos = (split[:, None] + torch.arange(slots, device=split.device)).clamp(max=input_ids.shape[1] - 1)
        self.hidden_in = self.full.hidden_in[rows, pos]

        def gather(value: torch.Tensor) -> torch.Tensor:  # positions on dim 1, batch 1 or rows
            return value[0][pos] if value.shape[0] == 1 else value[rows, pos]

        # Mask (rows, 1, slots, width + slots): a row's own frozen positions, then the suffix
        # causally; per sliding window where a layer has one.
        k_prefix = torch.arange(width, device=split.device)
        prefix_ok = (k_prefix[None, None, :] < split[:, None, None]).expand(-1, slots, -1)
        suffix_ok = torch.ones(slots, slots, dtype=torch.bool, device=split.device).tril().expand(len(split), -1, -1)
        self.calls: dict[int, dict] = {}  # per layer: its keyword inputs at the suffix positions
        for j in layers:
            kw = dict(self.full.calls[j][2])
            window = getattr(getattr(self.layers[j], "self_attn", None), "sliding_window", None)
            p_ok, s_ok = prefix_ok, suffix_ok
            if window:
                p_ok = p_ok & (pos[:, :, None] - k_prefix[None, None, :] < window)
                s_ok = s_ok & (pos[:, :, None] - pos[:, None, :] < window)
            mask = torch.cat([p_ok, s_ok], -1)[:, None]
            recorded = kw.get("attention_mask")
            if recorded is not None and recorded.dtype != torch.bool:  # additive masks (eager)
                mask = torch.zeros(mask.shape, dtype=recorded.dtype, device=mask.device).masked_fill(
                    ~mask, torch.finfo(recorded.dtype).min)
            kw["attention_mask"] = mask
            if kw.get("position_embeddings") is not None:
                kw["position_embeddings"] = tuple(gather(t) for t in kw["position_embeddings"])
            if kw.get("position_ids") is not None:
                kw["position_ids"] = gather(kw["position_ids"])
            self.calls[j] = kw

    def _reusable(self, j: int) -> bool:
        """Whether layer ``j``'s recorded inputs can be cut to the suffix positions."""
        as_kw, rest, kw = self.full.calls[j]
        if rest or "cache" not in kw:
            return False
        return not any(isinstance(value, (torch.Tensor, tuple, list, dict)) for name, value in kw.items()
                       if name not in ("attention_mask", "position_embeddings", "position_ids", "cache"))

    def run(self, end: int | None = None, hidden: torch.Tensor | None = None, start: int | None = None,
            rows: torch.Tensor | None = None) -> torch.Tensor:
        """As ``LayerRunner.run``, in suffix coordinates."""
        if not self.split.any():
            return self.full.run(end=end, hidden=hidden, start=start, rows=rows)
        start = self.start if start is None else start
        end = self.stop if end is None else end
        batch = len(self.split)
        take = (lambda value: value) if rows is None else (lambda value: _take(value, rows, batch))
        h = take(self.hidden_in) if hidden is None else hidden
        cache = _PrefixCache(take(self.keys), take(self.values))
        for j in range(start, end + 1):
            out = self.layers[j](hidden_states=h, **{**take(self.calls[j]), "cache": cache})
            h = out[0] if isinstance(out, tuple) else out
        return h


class SubjectReplay:
    """The per-layer update's view of a batch: the rows in length groups (each padded to its own
    longest row), replayed over the edited layers only from the lowest layer changed since the
    last replay.

    Holds, per row at its subject's last token, the edited projection's input (key) and output
    (value) at every edited layer and the last edited layer's output (``hidden``). A change to the
    projection of layer j leaves everything below j and layer j's own keys as they were, so after
    ``changed(j)`` the next ``refresh`` replays layers j..stop alone (over five layers and three
    update passes, 49 layer replays instead of 75).
    """

    def __init__(self, model: nn.Module, adapter: FamilyAdapter, rows: Rows, layers: Sequence[int]):
        self.model, self.adapter, self.layers = model, adapter, list(layers)
        lengths = rows.attention_mask.sum(1)
        self.members = length_groups(lengths, MAX_GROUPS, GROUP_COST)
        self.runners, self.inputs = [], []
        for m in self.members:
            width = int(lengths[m].max())
            runner = LayerRunner(model, adapter, rows.input_ids[m, :width], rows.attention_mask[m, :width],
                                 start=self.layers[0], stop=self.layers[-1])
            self.runners.append(runner)
            self.inputs.append({runner.start: runner.hidden_in})
        self.pos = rows.subject_pos
        self.size = rows.size
        self.keys: dict[int, torch.Tensor] = {}    # layer -> (rows, d_ff)
        self.values: dict[int, torch.Tensor] = {}  # layer -> (rows, d_model)
        self.hidden = torch.empty(0)               # (rows, d_model)
        self._dirty: int | None = self.layers[0]

    def changed(self, layer: int) -> None:
        """Layer ``layer``'s projection weight changed: replay from there at the next refresh."""
        self._dirty = layer if self._dirty is None else min(self._dirty, layer)

    @torch.no_grad()
    def refresh(self) -> None:
        """Bring keys, values and ``hidden`` up to date with the current weights."""
        if self._dirty is None:
            return
        start = self._dirty
        ran = [i for i in self.layers if i >= start]
        for g, (member, runner) in enumerate(zip(self.members, self.runners)):
            at = (torch.arange(len(member), device=member.device), self.pos[member])
            with capture_projection(self.model, self.adapter, ran, inputs=True, outputs=True) as seen:
                h = runner.run(start=start, hidden=self.inputs[g][start], inputs=self.inputs[g])
            for i in ran:
                for store, part in ((self.keys, "in"), (self.values, "out")):
                    read = seen[part][i][at].to(torch.float32)
                    if i not in store:
                        store[i] = read.new_empty(self.size, read.shape[-1])
                    store[i][member] = read
            if g == 0:
                self.hidden = h.new_empty(self.size, h.shape[-1])
            self.hidden[member] = h[at]
        self._dirty = None


def _take(value, rows: torch.Tensor, batch: int):
    """``value`` with every per-row tensor (at least 2-D, first dimension = batch) cut to ``rows``."""
    if isinstance(value, torch.Tensor):
        return value[rows] if value.dim() >= 2 and value.shape[0] == batch else value
    if isinstance(value, tuple):
        return tuple(_take(v, rows, batch) for v in value)
    if isinstance(value, list):
        return [_take(v, rows, batch) for v in value]
    if isinstance(value, dict):
        return {k: _take(v, rows, batch) for k, v in value.items()}
    return value


@contextmanager
def capture_projection(model: nn.Module, adapter: FamilyAdapter, layers: list[int], inputs: bool = True,
                       outputs: bool = False) -> Iterator[dict[str, dict[int, torch.Tensor]]]:
    """Record the edited projection's input (keys) and/or output (values) at the given layers."""
    seen: dict[str, dict[int, torch.Tensor]] = {"in": {}, "out": {}}

    def hook(index: int):
        def record(module, args, output):
            if inputs:
                seen["in"][index] = args[0].detach()
            if outputs:
                seen["out"][index] = output.detach()
        return record

    handles = [adapter.projection_module(model, i).register_forward_hook(hook(i)) for i in layers]
    with hooks(handles):
        yield seen


@contextmanager
def add_at_projection(model: nn.Module, adapter: FamilyAdapter, layer: int,
                      shift: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace the projection output of ``layer`` by ``shift(output)`` (differentiably)."""
    handle = adapter.projection_module(model, layer).register_forward_hook(lambda m, a, out: shift(out))
    with hooks([handle]):
        yield
