"""Find the tracked layers of a model and capture what influence needs from them.

Influence with block-diagonal curvature needs, per tracked linear layer and per token,
the homogeneous input ā = (a, 1) and the pseudo-gradient of the output pre-activation
Ds = ∂(objective)/∂s (docs/method.md §2). The per-example weight gradient is then
DW̄ = Σ_t Ds_t ā_tᵀ (shape P×(M+1)), never materialised for the whole model.

Supported layers: ``torch.nn.Linear`` (weight P×M), transformers' GPT-2 ``Conv1D``
(weight stored transposed, M×P), and each expert's slice W_e (P×M) of a fused 3-D
mixture-of-experts parameter (:mod:`datasleuth.experts`). No model rewriting: forward
hooks record ā, and a tensor hook on each layer output receives Ds during the backward
pass.
"""

from __future__ import annotations

import fnmatch
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from datasleuth.errors import DatasleuthError, listed
from datasleuth.experts import (
    ExpertMode,
    check_index,
    eager_experts,
    expert_params,
    is_transposed,
    parse_expert_name,
    restore_experts,
    scatter_rows,
)

__all__ = [
    "TrackedLayer",
    "find_layers",
    "layers_by_name",
    "resolve_layers",
    "capture",
    "backward_to_outputs",
    "gather_mask",
    "live_rows",
    "live_tokens",
    "per_example_gradients",
    "suspend_capture",
]


@dataclass(frozen=True)
class TrackedLayer:
    """A linear map s = W a + b inside the model, in canonical (P, M) orientation."""

    name: str
    module: nn.Module
    kind: str  # "linear", "conv1d" or "expert"
    in_features: int  # M
    out_features: int  # P
    has_bias: bool
    param: str = "weight"  # the expert parameter's name (kind "expert")
    expert: int | None = None  # e of the slice W_e (kind "expert")
    transposed: bool = False  # the expert parameter holds W_eᵀ (E, M, P)

    @property
    def grad_shape(self) -> tuple[int, int]:
        """Shape of the canonical layer gradient DW̄: (P, M + has_bias)."""
        return (self.out_features, self.in_features + int(self.has_bias))

    def weight_gradient(self, grad: Tensor) -> dict[str, Tensor]:
        """Split a canonical gradient (..., P, M[+1]) into the module's parameter shapes."""
        if self.kind == "expert":
            raise DatasleuthError(
                f"layer {self.name!r} is one expert's slice of a 3-D parameter, which exact "
                "estimators cannot replace; exclude the expert layers (e.g. '*.experts.*')"
            )
        m = self.in_features
        w = grad[..., :m]
        out = {"weight": w if self.kind == "linear" else w.transpose(-1, -2)}
        if self.has_bias:
            out["bias"] = grad[..., m]
        return out

    def canonical_weight(self) -> Tensor:
        """The layer's W̄ = (W b) as a (P, M[+1]) tensor."""
        if self.kind == "expert":
            w = getattr(self.module, self.param)[self.expert]
            return w.t() if self.transposed else w
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
    def wanted(name: str) -> bool:
        return (any(fnmatch.fnmatchcase(name, p) for p in include)
                and not any(fnmatch.fnmatchcase(name, p) for p in exclude))

    candidates = [layer for name, module in model.named_modules()
                  for layer in _module_layers(name, module)]
    layers = [layer for layer in candidates if wanted(layer.name)]
    if not layers:
        supported = [layer.name or "(root)" for layer in candidates]
        hint = ", ".join(supported[:6]) + (" ..." if len(supported) > 6 else "")
        raise DatasleuthError(
            f"no Linear/Conv1D/expert layer matches include={list(include)} "
            f"exclude={list(exclude)}; "
            f"choose patterns matching layer names such as: {hint or '(the model has none)'}"
        )
    _warn_shared(layers)
    return layers


def _warn_shared(layers: Sequence[TrackedLayer]) -> None:
    """Warn when distinct tracked modules use one weight tensor (docs/method.md §2)."""
    groups: dict[tuple[int, int | None], list[str]] = {}
    for layer in layers:
        weight = getattr(layer.module, layer.param if layer.kind == "expert" else "weight")
        groups.setdefault((id(weight), layer.expert), []).append(layer.name)
    shared = [names for names in groups.values() if len(names) > 1]
    if shared:
        shown = "; ".join(" = ".join(names) for names in shared[:3])
        warnings.warn(
            f"tracked layers share weights ({shown}{' ...' if len(shared) > 3 else ''}): each "
            "use is treated as its own layer, so scores leave out the cross terms between "
            "uses; track one use per weight (--layers) to drop the others", stacklevel=3)


def _module_layers(name: str, module: nn.Module) -> list[TrackedLayer]:
    """The trackable layers of one module: itself, or one per expert of its 3-D weights."""
    info = _describe(module)
    if info is not None:
        kind, m, p, bias = info
        return [TrackedLayer(name, module, kind, m, p, bias)]
    return [_expert_layer(f"{name}.{pname}.{e}", module, pname, w, e)
            for pname, w in expert_params(module) for e in range(w.shape[0])]


def _expert_layer(name: str, module: nn.Module, pname: str, w: Tensor, e: int
                  ) -> TrackedLayer:
    """Expert ``e``'s W_e (P×M) in the fused 3-D parameter ``w``: (E, P, M), or (E, M, P)."""
    if is_transposed(module):
        return TrackedLayer(name, module, "expert", int(w.shape[1]), int(w.shape[2]), False,
                            pname, e, transposed=True)
    return TrackedLayer(name, module, "expert", int(w.shape[2]), int(w.shape[1]), False,
                        pname, e)


def _named_layer(modules: dict[str, nn.Module], name: str) -> TrackedLayer | None:
    if name in modules and _describe(modules[name]) is not None:
        return _module_layers(name, modules[name])[0]
    parsed = parse_expert_name(name)
    if parsed is None or parsed[0] not in modules:
        return None
    module_name, pname, e = parsed
    params = dict(expert_params(modules[module_name]))
    if pname not in params:
        return None
    check_index(params[pname], e, name)
    return _expert_layer(name, modules[module_name], pname, params[pname], e)


def layers_by_name(model: nn.Module, names: Sequence[str]) -> list[TrackedLayer]:
    """The tracked layers with exactly these names, in this order."""
    modules = dict(model.named_modules())
    layers = []
    for name in names:
        layer = _named_layer(modules, name)
        if layer is None:
            raise DatasleuthError(
                f"the model has no Linear/Conv1D/expert layer named {name!r}; the curvature was "
                "fitted on a different model, re-fit it for this one"
            )
        layers.append(layer)
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


def _check_plain(layer: TrackedLayer, module: nn.Module, inputs: tuple, output: object) -> None:
    """Refuse a tracked module whose forward is not s = W a + b on its first input."""
    x = inputs[0] if inputs else None
    if (isinstance(output, Tensor) and isinstance(x, Tensor) and output.dim() >= 1
            and x.shape[-1:] == (layer.in_features,) and output.shape[-1] == layer.out_features):
        return
    got = f"shape {tuple(output.shape)}" if isinstance(output, Tensor) else type(output).__name__
    raise DatasleuthError(
        f"layer {layer.name!r} ({type(module).__name__}) is not a plain linear map of its "
        f"input: it returned {got}; leave it out of the tracked layers (--layers patterns)"
    )


class _Capture:
    """State shared by the hooks of one :func:`capture` context."""

    def __init__(self, layers: Sequence[TrackedLayer], on_layer: LayerFn, dtype: torch.dtype):
        self.layers = list(layers)
        self.on_layer = on_layer
        self.dtype = dtype
        self.mask: Tensor | None = None  # (B, T) bool, set per batch
        self._padded = False  # the mask has a False: padding positions to zero
        self.outputs: list[Tensor] = []
        self._seen: set[str] = set()
        self._emitted: dict[str, tuple[int, int]] = {}  # layer -> (B, T) reported this batch
        self.reached: set[str] = set()  # layers a gradient reached in some batch
        self._widths: dict[str, int] = {}  # T of each layer's last real report
        self._modes: dict[int, ExpertMode] = {}  # experts modules running forward now
        self.discard = False  # a replayed batch (datasleuth.fsdp.lockstep): report nothing

    def set_batch(self, mask: Tensor | None, discard: bool = False) -> None:
        self.mask = mask
        self._padded = mask is not None and not bool(mask.all())  # one check a batch
        self.discard = discard
        self.outputs = []
        self._seen = set()
        self._emitted = {}

    def _as_tokens(self, x: Tensor, layer: TrackedLayer) -> Tensor:
        """Reshape (B, ..., D) or flattened (B*T, D) to (B, T, D); zero padding positions."""
        m = self.mask
        if m is not None and x.dim() == 2 and x.shape[0] == m.numel() != m.shape[0]:
            x = x.reshape(*m.shape, x.shape[-1])  # tokens flattened by the model (MoE blocks)
        x = x.reshape(x.shape[0], -1, x.shape[-1]).to(self.dtype)
        if self.mask is not None:
            if self.mask.shape != x.shape[:2]:
                raise DatasleuthError(
                    f"layer {layer.name!r} sees {tuple(x.shape[:2])} (batch, tokens) but the "
                    f"task's mask is {tuple(self.mask.shape)}; return a mask shaped like the "
                    "layer inputs, or None"
                )
            if self._padded:  # an all-real batch skips a pass over every captured tensor
                x = x * self.mask[..., None].to(x.dtype)
        return x

    def _emit(self, layer: TrackedLayer, a: Tensor, g: Tensor) -> None:
        self._emitted[layer.name] = (a.shape[0], a.shape[1])
        if not self.discard:
            self.on_layer(layer, a, g)

    def emit_silent(self) -> None:
        """Report zeros for the layers that got no gradient in this batch: they did not
        run (a vision tower on text) or did not reach the objective, so DW̄ = 0."""
        self.reached.update(self._emitted)
        self._widths.update((name, bt[1]) for name, bt in self._emitted.items())
        if not self._emitted:
            return
        b, t = self.mask.shape if self.mask is not None else next(iter(self._emitted.values()))
        device = self.outputs[0].device  # backward_to_outputs refuses a pass without any
        for layer in self.layers:
            if layer.name not in self._emitted:
                # no mask fixes T: the layer's own, as last seen
                n = t if self.mask is not None else self._widths.get(layer.name, t)
                m = layer.in_features + int(layer.has_bias)
                self._emit(layer, torch.zeros(b, n, m, dtype=self.dtype, device=device),
                           torch.zeros(b, n, layer.out_features, dtype=self.dtype,
                                       device=device))

    @staticmethod
    def _idle() -> bool:
        return bool(getattr(_suspended, "depth", 0)) or not torch.is_grad_enabled()

    def _first_call(self, layer: TrackedLayer) -> None:
        if layer.name in self._seen:
            raise DatasleuthError(
                f"layer {layer.name!r} ran twice in one forward pass; weight sharing is not "
                "supported, exclude that layer"
            )
        self._seen.add(layer.name)

    def forward_hook(self, layer: TrackedLayer):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            if self._idle():
                return
            _check_plain(layer, module, inputs, output)
            if not output.requires_grad:
                return
            self._first_call(layer)
            a = self._as_tokens(inputs[0].detach(), layer)  # (B, T, M)
            if layer.has_bias:
                a = torch.cat([a, a.new_ones(a.shape[:2] + (1,))], dim=-1)  # (B, T, M+1)
                if self.mask is not None:
                    a[..., -1] = self.mask.to(a.dtype)

            def grad_hook(g: Tensor) -> None:
                self._emit(layer, a, self._as_tokens(g.detach(), layer))  # g: (B, T, P)

            output.register_hook(grad_hook)
            self.outputs.append(output)

        return hook

    def _expert_call(self, layer: TrackedLayer, x: Tensor, positions: Tensor, out: Tensor,
                     total: int) -> None:
        """Expert e's routed tokens (n, M) and later their gradients, at their positions."""
        if not out.requires_grad:
            return
        self._first_call(layer)
        a = self._as_tokens(scatter_rows(x.detach(), positions, total), layer)  # (B, T, M)

        def grad_hook(g: Tensor) -> None:  # g: (n, P) -> (B, T, P)
            self._emit(layer, a, self._as_tokens(scatter_rows(g.detach(), positions, total),
                                                    layer))

        out.register_hook(grad_hook)
        self.outputs.append(out)

    def _dense_call(self, group: list[tuple[int, TrackedLayer]], x: Tensor, out: Tensor
                    ) -> None:
        """Every expert's rows of one bmm: x (E, N, M) -> out (E, N, P), N = B*T tokens."""
        if not out.requires_grad or not group:
            return
        inputs = []
        for e, layer in group:
            self._first_call(layer)
            inputs.append(self._as_tokens(x[e].detach(), layer))  # (B, T, M)

        def grad_hook(g: Tensor) -> None:  # g: (E, N, P)
            for (e, layer), a in zip(group, inputs):
                self._emit(layer, a, self._as_tokens(g[e].detach(), layer))

        out.register_hook(grad_hook)
        self.outputs.append(out)

    def expert_hooks(self, module: nn.Module, layers: list[TrackedLayer]):
        """Pre/post forward hooks of one experts module (datasleuth.experts)."""
        by_key = {(layer.param, layer.expert): layer for layer in layers}

        def pre(mod: nn.Module, args: tuple) -> None:
            if self._idle() or not args or args[0].dim() != 2:
                return
            total = args[0].shape[0]  # B*T flattened tokens

            def on_call(pname: str, e: int, x: Tensor, positions: Tensor, out: Tensor) -> None:
                if (pname, e) in by_key:
                    self._expert_call(by_key[(pname, e)], x, positions, out, total)

            def on_dense(pname: str, x: Tensor, out: Tensor) -> None:
                group = [(e, by_key[(pname, e)]) for e in range(x.shape[0])
                         if (pname, e) in by_key]
                self._dense_call(group, x, out)

            mode = ExpertMode(mod, {layer.param for layer in layers}, args[0], on_call, on_dense)
            mode.__enter__()
            self._modes[id(mod)] = mode

        def post(mod: nn.Module, args: tuple, output: Tensor) -> None:
            mode = self._modes.pop(id(mod), None)
            if mode is None:
                return
            mode.__exit__(None, None, None)
            if mode.calls == 0 and args[0].shape[0] > 0 and output.requires_grad:
                raise DatasleuthError(
                    f"the experts of {type(mod).__name__} (layer {layers[0].name!r}) ran without "
                    "the per-expert loop datasleuth reads (param[e] applied to routed tokens); "
                    "leave these expert layers out of the tracked layers"
                )
            # Experts no token was routed to report zeros after the backward pass, as every
            # layer no gradient reached does (:meth:`emit_silent`).

        return pre, post

    def close(self) -> None:
        """Leave any expert mode a failed forward pass left active."""
        for mode in reversed(list(self._modes.values())):
            mode.__exit__(None, None, None)
        self._modes = {}


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
    experts: dict[int, tuple[nn.Module, list[TrackedLayer]]] = {}
    configs = []
    try:
        for p, _ in saved:
            p.requires_grad_(id(p) in tracked)
        for layer in layers:
            if layer.kind == "expert":
                experts.setdefault(id(layer.module), (layer.module, []))[1].append(layer)
            else:
                handles.append(layer.module.register_forward_hook(state.forward_hook(layer)))
        for module, group in experts.values():
            pre, post = state.expert_hooks(module, group)
            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
        configs = eager_experts([module for module, _ in experts.values()])
        yield state
    finally:
        state.close()
        restore_experts(configs)
        for h in handles:
            h.remove()
        for p, flag in saved:
            p.requires_grad_(flag)


def warn_unreached(state: _Capture) -> None:
    """Warn of tracked layers no gradient reached in any batch: their scores are zero."""
    missing = [layer.name for layer in state.layers if layer.name not in state.reached]
    if missing and state.reached:
        warnings.warn(
            f"no gradient reached tracked layers {listed(missing)} in any batch (they did not "
            "run, e.g. a vision tower on text, or do not affect the loss): they score zero; "
            "leave them out of the tracked layers", stacklevel=3)


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
    state.emit_silent()
    state.outputs = []


SPARSE_SHARE = 0.875
"""Rows are gathered (:func:`gather_mask`) only when at most this share of them is kept;
denser batches are used whole."""


def gather_mask(keep: Tensor) -> Tensor | None:
    """``keep`` (a boolean row mask) when gathering its rows pays, else None."""
    return keep if int(keep.sum()) <= SPARSE_SHARE * keep.numel() else None


def live_tokens(a: Tensor, g: Tensor) -> Tensor | None:
    """(B, T) mask of the tokens whose ā and Ds are both nonzero, the only ones adding to
    DW̄ = Σ_t Ds_t ā_tᵀ, or None when few are not (:func:`gather_mask`).

    Zero tokens are padding and, for an expert tracked on its own, the tokens not routed
    to it (6 of 8 at top-2 of 8 experts, docs/method.md §2). A token holding NaN is not
    zero and is kept.
    """
    return gather_mask(~(a == 0).all(-1) & ~(g == 0).all(-1))


def live_rows(a: Tensor, g: Tensor, keep: Tensor | None
              ) -> tuple[Tensor, Tensor, list[tuple[int, slice]]]:
    """ā (rows, M+1) and Ds (rows, P) with the rows of each sequence b as (b, rows): the
    ``keep`` tokens (:func:`live_tokens`), or every token when ``keep`` is None.
    Sequences without a row are left out of the list."""
    b, t = a.shape[:2]
    if keep is None:
        spans = [(i, slice(i * t, (i + 1) * t)) for i in range(b)] if t else []
        return a.reshape(b * t, -1), g.reshape(b * t, -1), spans
    spans, start = [], 0
    for i, n in enumerate(keep.sum(1).tolist()):
        if n:
            spans.append((i, slice(start, start + n)))
        start += n
    return a[keep], g[keep], spans


def per_example_gradients(a: Tensor, g: Tensor, keep: Tensor | None | str = "find"
                          ) -> Tensor:
    """DW̄_b = Σ_t Ds_{b,t} ā_{b,t}ᵀ: (B,T,M+1), (B,T,P) -> (B,P,M+1), over the live
    tokens of each sequence only when many are zero (``keep`` of :func:`live_tokens`,
    found here unless the caller passes it)."""
    if isinstance(keep, str):
        keep = live_tokens(a, g)
    if keep is None:
        return torch.einsum("btp,btm->bpm", g, a)
    out = a.new_empty(a.shape[0], g.shape[-1], a.shape[-1])  # every row written below
    a_live, g_live, spans = live_rows(a, g, keep)
    done = 0
    for b, rows in spans:
        out[done:b].zero_()  # sequences without a live token
        torch.mm(g_live[rows].t(), a_live[rows], out=out[b])
        done = b + 1
    out[done:].zero_()
    return out
