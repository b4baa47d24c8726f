"""Where the edited weights live in each model family.

The engine never branches on a model's name: it asks the family adapter for the decoder
layers, the edited projection (whose input is the *key* and output the *value*), an optional
norm applied to the projection output before the residual (Gemma 3), and the final norm.
Adding a family is adding one entry to ``ADAPTERS``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class FamilyAdapter:
    """Declarative description of one model family.

    Attributes:
        family: short name used for per-family engine defaults.
        model_types: ``config.model_type`` values this adapter serves.
        layers: dotted path of the ``ModuleList`` of decoder layers.
        projection: dotted path, inside one layer, of the edited MLP output projection.
        transposed: True when the projection stores its weight as (in, out) (GPT-2 ``Conv1D``).
        post_norm: dotted path, inside one layer, of a norm applied to the projection output
            before the residual add, or None. Gemma 3's ``post_feedforward_layernorm``.
        final_norm: dotted path of the norm before the LM head.
    """

    family: str
    model_types: tuple[str, ...]
    layers: str
    projection: str
    transposed: bool
    post_norm: str | None
    final_norm: str

    def layer_modules(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def num_layers(self, model: nn.Module) -> int:
        return len(self.layer_modules(model))

    def layer(self, model: nn.Module, index: int) -> nn.Module:
        return self.layer_modules(model)[index]

    def projection_module(self, model: nn.Module, index: int) -> nn.Module:
        return self.layer(model, index).get_submodule(self.projection)

    def projection_name(self, index: int) -> str:
        return f"{self.layers}.{index}.{self.projection}"

    def post_norm_module(self, model: nn.Module, index: int) -> nn.Module | None:
        return None if self.post_norm is None else self.layer(model, index).get_submodule(self.post_norm)

    def invert_post_norm(self, norm: nn.Module, target: torch.Tensor, reference: torch.Tensor,
                         max_iter: int) -> torch.Tensor:
        """A projection output whose normed value is as close as possible to ``target``.

        Solved numerically (L-BFGS on ||norm(x) - target||^2, starting from ``reference``, the
        current output): the target need not lie on the norm's output manifold at all (earlier
        layers' edits move the residual in ways an RMS-normed output cannot follow). ``max_iter``
        (the engine's ``post_norm_iterations``) is a trade, not a precision setting: few
        iterations fall short of the targets, many approach the exact minimiser, which matches
        the target also where Gemma 3's gains are near 0 by moves the update carries at a cost
        (docs/engine.md, "Where the target lives").
        """
        x = reference.detach().clone().requires_grad_(True)
        opt = torch.optim.LBFGS([x], max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                                line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = (norm(x) - target).pow(2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        return x.detach()

    def final_norm_module(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.final_norm)

    def weight(self, model: nn.Module, index: int) -> torch.Tensor:
        """The projection weight as (d_model, d_ff) = (out, in), a view when possible."""
        w = self.projection_module(model, index).weight
        return w.T if self.transposed else w

    def add_delta(self, model: nn.Module, index: int, delta: torch.Tensor) -> None:
        """Add a (d_model, d_ff) update to the projection weight in place."""
        w = self.projection_module(model, index).weight
        with torch.no_grad():
            w.add_((delta.T if self.transposed else delta).to(w.device, w.dtype))

    def key_dim(self, model: nn.Module, index: int) -> int:
        return self.weight(model, index).shape[1]


_LLAMA_LIKE = dict(layers="model.layers", projection="mlp.down_proj", transposed=False, final_norm="model.norm")

ADAPTERS: tuple[FamilyAdapter, ...] = (
    FamilyAdapter(family="llama", model_types=("llama", "qwen2", "mistral"), post_norm=None, **_LLAMA_LIKE),
    FamilyAdapter(
        family="gemma3",
        model_types=("gemma3_text", "gemma3"),
        post_norm="post_feedforward_layernorm",
        **_LLAMA_LIKE,
    ),
    FamilyAdapter(
        family="gpt2",
        model_types=("gpt2",),
        layers="transformer.h",
        projection="mlp.c_proj",
        transposed=True,
        post_norm=None,
        final_norm="transformer.ln_f",
    ),
)


def adapter_for(model: nn.Module) -> FamilyAdapter:
    """The adapter serving ``model.config.model_type``; a clear error for unknown families."""
    model_type = getattr(model.config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    known = sorted(t for a in ADAPTERS for t in a.model_types)
    raise ValueError(f"model_type {model_type!r} has no editing adapter; known: {', '.join(known)}")
