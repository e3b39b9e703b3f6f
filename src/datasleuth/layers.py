"""Find the tracked layers of a model and capture what influence needs from them.

Influence with block-diagonal curvature needs, per tracked linear layer and per token,
the homogeneous input ā = (a, 1) and the pseudo-gradient of the output pre-activation
Ds = ∂(objective)/∂s (METHOD.md §2). The per-example weight gradient is then
DW̄ = Σ_t Ds_t ā_tᵀ (shape P×(M+1)), never materialised for the whole model.

Supported layers: ``torch.nn.Linear`` (weight P×M) and transformers' GPT-2 ``Conv1D``
(weight stored transposed, M×P). No model rewriting: forward hooks record ā, and a
tensor hook on each layer output receives Ds during the backward pass.
"""

from __future__ import annotations

import fnmatch
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from datasleuth.errors import DatasleuthError

__all__ = [
    "TrackedLayer",
    "find_layers",
    "layers_by_name",
    "resolve_layers",
    "capture",
    "backward_to_outputs",
    "per_example_gradients",
    "suspend_capture",
]


@dataclass(frozen=True)
class TrackedLayer:
    """A linear map s = W a + b inside the model, in canonical (P, M) orientation."""

    name: str
    module: nn.Module
    kind: str  # "linear" or "conv1d"
    in_features: int  # M
    out_features: int  # P
    has_bias: bool

    @property
    def grad_shape(self) -> tuple[int, int]:
        """Shape of the canonical layer gradient DW̄: (P, M + has_bias)."""
        return (self.out_features, self.in_features + int(self.has_bias))

    def weight_gradient(self, grad: Tensor) -> dict[str, Tensor]:
        """Split a canonical gradient (..., P, M[+1]) into the module's parameter shapes."""
        m = self.in_features
        w = grad[..., :m]
        out = {"weight": w if self.kind == "linear" else w.transpose(-1, -2)}
        if self.has_bias:
            out["bias"] = grad[..., m]
        return out

    def canonical_weight(self) -> Tensor:
        """The layer's W̄ = (W b) as a (P, M[+1]) tensor."""
        w = self.module.weight
        w = w if self.kind == "linear" else w.t()
        if self.has_bias:
            return torch.cat([w, self.module.bias[:, None]], dim=1)
        return w


def _describe(module: nn.Module) -> tuple[str, int, int, bool] | None:
    if isinstance(module, nn.Linear):
        return "linear", module.in_features, module.out_features, module.bias is not None
    # transformers.pytorch_utils.Conv1D, matched by name to avoid importing transformers here.
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2:
        m, p = module.weight.shape
        return "conv1d", int(m), int(p), module.bias is not None
    return None


def find_layers(
    model: nn.Module,
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
) -> list[TrackedLayer]:
    """Tracked layers: supported modules whose name matches an ``include`` glob pattern.

    Patterns are ``fnmatch`` globs over module names from ``model.named_modules()``,
    e.g. ``"*.mlp.*"`` for the MLP layers of a transformer.
    """
    layers = []
    for name, module in model.named_modules():
        info = _describe(module)
        if info is None:
            continue
        if not any(fnmatch.fnmatchcase(name, p) for p in include):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        kind, m, p, bias = info
        layers.append(TrackedLayer(name, module, kind, m, p, bias))
    if not layers:
        supported = [
            n or "(root)" for n, mod in model.named_modules() if _describe(mod) is not None
        ]
        hint = ", ".join(supported[:6]) + (" ..." if len(supported) > 6 else "")
        raise DatasleuthError(
            f"no Linear/Conv1D layer matches include={list(include)} exclude={list(exclude)}; "
            f"choose patterns matching layer names such as: {hint or '(the model has none)'}"
        )
    return layers


def layers_by_name(model: nn.Module, names: Sequence[str]) -> list[TrackedLayer]:
    """The tracked layers with exactly these module names, in this order."""
    modules = dict(model.named_modules())
    layers = []
    for name in names:
        info = _describe(modules[name]) if name in modules else None
        if info is None:
            raise DatasleuthError(
                f"the model has no Linear/Conv1D layer named {name!r}; the curvature was fitted "
                "on a different model, re-fit it for this one"
            )
        kind, m, p, bias = info
        layers.append(TrackedLayer(name, modules[name], kind, m, p, bias))
    return layers


def resolve_layers(
    model: nn.Module, layers: Sequence[str] | Sequence[TrackedLayer] | None
) -> list[TrackedLayer]:
    """Accept tracked layers, glob patterns, or None (= every supported layer)."""
    if layers is None:
        return find_layers(model)
    layers = list(layers)
    if layers and all(isinstance(x, TrackedLayer) for x in layers):
        return layers  # type: ignore[return-value]
    return find_layers(model, include=[str(x) for x in layers])


LayerFn = Callable[[TrackedLayer, Tensor, Tensor], None]
_suspended = threading.local()


@contextmanager
def suspend_capture() -> Iterator[None]:
    """Inside the block, active :func:`capture` contexts ignore forward passes.

    For model calls nested inside a capture that are not part of its batch, e.g. an
    exact estimator's own Gauss-Newton products when :func:`datasleuth.self_influence`
    preconditions the gradients it has just captured.
    """
    _suspended.depth = getattr(_suspended, "depth", 0) + 1
    try:
        yield
    finally:
        _suspended.depth -= 1


class _Capture:
    """State shared by the hooks of one :func:`capture` context."""

    def __init__(self, layers: Sequence[TrackedLayer], on_layer: LayerFn, dtype: torch.dtype):
        self.layers = list(layers)
        self.on_layer = on_layer
        self.dtype = dtype
        self.mask: Tensor | None = None  # (B, T) bool, set per batch
        self.outputs: list[Tensor] = []
        self._seen: set[str] = set()

    def set_batch(self, mask: Tensor | None) -> None:
        self.mask = mask
        self.outputs = []
        self._seen = set()

    def _as_tokens(self, x: Tensor, layer: TrackedLayer) -> Tensor:
        """Reshape (B, ..., D) to (B, T, D) and zero masked (padding) positions."""
        x = x.reshape(x.shape[0], -1, x.shape[-1]).to(self.dtype)
        if self.mask is not None:
            if self.mask.shape != x.shape[:2]:
                raise DatasleuthError(
                    f"layer {layer.name!r} sees {tuple(x.shape[:2])} (batch, tokens) but the "
                    f"task's mask is {tuple(self.mask.shape)}; return a mask shaped like the "
                    "layer inputs, or None"
                )
            x = x * self.mask[..., None].to(x.dtype)
        return x

    def forward_hook(self, layer: TrackedLayer):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            if (getattr(_suspended, "depth", 0) or not torch.is_grad_enabled()
                    or not output.requires_grad):
                return
            if layer.name in self._seen:
                raise DatasleuthError(
                    f"layer {layer.name!r} ran twice in one forward pass; weight sharing is not "
                    "supported, exclude that layer"
                )
            self._seen.add(layer.name)
            a = self._as_tokens(inputs[0].detach(), layer)  # (B, T, M)
            if layer.has_bias:
                a = torch.cat([a, a.new_ones(a.shape[:2] + (1,))], dim=-1)  # (B, T, M+1)
                if self.mask is not None:
                    a[..., -1] = self.mask.to(a.dtype)

            def grad_hook(g: Tensor) -> None:
                self.on_layer(layer, a, self._as_tokens(g.detach(), layer))  # g: (B, T, P)

            output.register_hook(grad_hook)
            self.outputs.append(output)

        return hook


@contextmanager
def capture(
    model: nn.Module,
    layers: Sequence[TrackedLayer],
    on_layer: LayerFn,
    dtype: torch.dtype = torch.float32,
) -> Iterator[_Capture]:
    """Call ``on_layer(layer, a_bar (B,T,M+1), Ds (B,T,P))`` for each layer in each backward.

    Inside the context only the tracked layers' parameters require gradients (restored
    on exit), so the graph reaches every tracked output; use :func:`backward_to_outputs`
    to run the backward pass without computing any weight gradient.
    """
    state = _Capture(layers, on_layer, dtype)
    tracked = {id(p) for layer in layers for p in layer.module.parameters(recurse=False)}
    saved = [(p, p.requires_grad) for p in model.parameters()]
    handles = []
    try:
        for p, _ in saved:
            p.requires_grad_(id(p) in tracked)
        for layer in layers:
            handles.append(layer.module.register_forward_hook(state.forward_hook(layer)))
        yield state
    finally:
        for h in handles:
            h.remove()
        for p, flag in saved:
            p.requires_grad_(flag)


def backward_to_outputs(objective: Tensor, state: _Capture) -> None:
    """Back-propagate ``objective`` only as far as the tracked layer outputs.

    ``torch.autograd.grad`` with the layer outputs as inputs prunes every weight-gradient
    computation, so a pass costs less than a training backward pass.
    """
    if not state.outputs:
        raise DatasleuthError(
            "no tracked layer took part in the forward pass; check the layer patterns and "
            "that the task's forward calls the model"
        )
    torch.autograd.grad(objective, state.outputs, allow_unused=True)
    state.outputs = []


def per_example_gradients(a: Tensor, g: Tensor) -> Tensor:
    """DW̄_b = Σ_t Ds_{b,t} ā_{b,t}ᵀ: (B,T,M+1), (B,T,P) -> (B,P,M+1)."""
    return torch.einsum("btp,btm->bpm", g, a)
