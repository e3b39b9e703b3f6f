"""Mixture-of-experts weights tracked per expert (docs/method.md §2).

transformers 5.x stores the experts of a sparse MoE block (Mixtral, Qwen2-MoE, OLMoE,
...) as fused 3-D parameters, e.g. ``gate_up_proj`` (E, 2F, D) and ``down_proj``
(E, D, F), and runs expert e on the tokens routed to it as
``F.linear(hidden[token_idx], gate_up_proj[e])``. Each slice W_e of such a parameter
is a linear map of its own, so each is tracked as its own layer, named
``<module>.<parameter>.<e>``, with its own factors.

Capture without rewriting the model: while an experts module runs forward, a
``TorchFunctionMode`` watches for a slice ``param[e]`` of a tracked parameter, the
gather ``hidden[token_idx]`` of the module's input, and ``F.linear(x, param[e])``.
The routed tokens' inputs and output gradients are scattered back to their (B, T)
positions, zeros elsewhere, so expert e is exactly a linear layer whose input is zero
on the tokens not routed to it: its factors are averaged over all tokens (as for any
layer) and its per-sequence gradient is Σ over the routed tokens of Ds_t ā_tᵀ.
A linear applied after the gather (``down_proj[e]`` on the expert's hidden state)
takes the positions of that expert's last gather.

Transposed layouts (``is_transposed``, e.g. GPT-OSS: ``gate_up_proj`` (E, D, 2F), run as
``hidden[token_idx] @ gate_up_proj[e]``) are tracked the same way, W_e being the slice's
transpose. Expert biases are not tracked.

Only the eager expert loop exposes the routing; inside :func:`datasleuth.layers.capture`
an experts module's ``config._experts_implementation`` is set to ``"eager"``.

Dense experts (:data:`DENSE_EXPERTS`, Llama 4) run every expert on every token with one
``torch.bmm(x (E, N, M), param (E, M, P))``, the router having scaled the input of the
tokens not routed to e by 0: expert e's input and output gradient are then the rows
x[e] and ∂/∂out[e], with nothing to scatter. Other modules with 3-D weights and no
``is_transposed`` flag of transformers' experts interface have no layout or routing
that can be read, and are left out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from datasleuth.errors import DatasleuthError

DENSE_EXPERTS = frozenset({"Llama4TextExperts"})
"""Class names of experts modules that multiply all experts at once (``torch.bmm``)."""

__all__ = ["DENSE_EXPERTS", "ExpertMode", "check_index", "eager_experts", "expert_params",
           "is_dense", "is_transposed", "parse_expert_name", "restore_experts", "scatter_rows"]


def expert_params(module: nn.Module) -> list[tuple[str, Tensor]]:
    """The 3-D expert parameters of a transformers experts module, E = ``num_experts``.

    (E, P, M), or (E, M, P) when :func:`is_transposed`; none for any other module.
    """
    experts = getattr(module, "num_experts", None)
    flagged = isinstance(getattr(module, "is_transposed", None), bool)
    if not isinstance(experts, int) or not (flagged or is_dense(module)):
        return []
    return [(n, p) for n, p in module.named_parameters(recurse=False)
            if p.dim() == 3 and p.shape[0] == experts]


def is_transposed(module: nn.Module) -> bool:
    """Whether the module stores each expert as W_eᵀ (M, P): ``x @ param[e]`` or bmm."""
    return bool(getattr(module, "is_transposed", False)) or is_dense(module)


def is_dense(module: nn.Module) -> bool:
    """Whether the module runs every expert on every token in one bmm (:data:`DENSE_EXPERTS`)."""
    return type(module).__name__ in DENSE_EXPERTS


def parse_expert_name(name: str) -> tuple[str, str, int] | None:
    """``"<module>.<param>.<e>"`` -> (module name, parameter name, e), else None."""
    parts = name.rsplit(".", 2)
    if len(parts) != 3 or not parts[2].isdigit():
        return None
    return parts[0], parts[1], int(parts[2])


def _is_index(idx: Any) -> bool:
    if isinstance(idx, int):
        return True
    return isinstance(idx, Tensor) and idx.dim() == 0 and not idx.is_floating_point()


class ExpertMode(TorchFunctionMode):
    """Active during one experts module's forward; reports each routed expert call.

    ``on_call(param_name, e, x (n, M), positions (n,), out (n, P))`` runs for every
    ``F.linear(x, param[e])`` of a tracked parameter, or ``x @ param[e]`` when the module
    :func:`is_transposed`; ``on_dense(param_name, x (E, N, M), out (E, N, P))`` for every
    ``torch.bmm(x, param)`` of a dense module (:func:`is_dense`).
    """

    def __init__(self, module: nn.Module, names: set[str], hidden: Tensor,
                 on_call: Callable[[str, int, Tensor, Tensor, Tensor], None],
                 on_dense: Callable[[str, Tensor, Tensor], None] | None = None):
        super().__init__()
        self.dense = on_dense if is_dense(module) else None
        self.params = {id(getattr(module, n)): n for n in names}
        self.hidden = hidden
        self.on_call = on_call
        self.apply = _MATMULS if is_transposed(module) else (F.linear,)
        self.slices: dict[int, tuple[str, int, Tensor]] = {}  # id(param[e]) -> (name, e, view)
        self.gathers: dict[int, tuple[Tensor, Tensor]] = {}  # id(hidden[idx]) -> (idx, x)
        self.last: dict[int, Tensor] = {}  # expert -> positions of its last gather
        self.calls = 0  # expert calls seen

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if (self.dense is not None and func in _BMMS and len(args) > 1
                and id(args[1]) in self.params):
            self.calls += 1
            self.dense(self.params[id(args[1])], args[0], out)
        elif func is Tensor.__getitem__:
            src, idx = args[0], args[1]
            if id(src) in self.params and _is_index(idx):
                self.slices[id(out)] = (self.params[id(src)], int(idx), out)
            elif src is self.hidden and isinstance(idx, Tensor) and idx.dim() == 1:
                self.gathers[id(out)] = (idx, out)
        elif func in self.apply and len(args) > 1 and id(args[1]) in self.slices:
            name, e, _ = self.slices[id(args[1])]
            x = args[0]
            if id(x) in self.gathers:
                self.last[e] = self.gathers[id(x)][0]
            positions = self.last.get(e)
            if positions is None or positions.shape[0] != x.shape[0]:
                raise DatasleuthError(
                    f"expert {e} of {name!r} ran on tokens whose positions are unknown; only the "
                    "eager expert loop (hidden[token_idx] -> F.linear or @) is supported, "
                    "exclude the expert layers"
                )
            self.calls += 1
            self.on_call(name, e, x, positions, out)
        return out


_MATMULS = (Tensor.__matmul__, Tensor.matmul, torch.matmul)
_BMMS = (torch.bmm, Tensor.bmm)


def scatter_rows(rows: Tensor, positions: Tensor, total: int) -> Tensor:
    """(n, D) rows placed at ``positions`` of a (total, D) zero tensor."""
    full = rows.new_zeros(total, rows.shape[-1])
    return full.index_copy(0, positions.to(rows.device), rows)


def eager_experts(modules: list[nn.Module]) -> list[tuple[Any, Any]]:
    """Switch the experts modules' configs to the eager loop; return (config, old) pairs."""
    saved = []
    for module in modules:
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_experts_implementation"):
            saved.append((config, config._experts_implementation))
            config._experts_implementation = "eager"
    return saved


def restore_experts(saved: list[tuple[Any, Any]]) -> None:
    for config, old in reversed(saved):
        config._experts_implementation = old


def check_index(param: Tensor, e: int, name: str) -> None:
    if not 0 <= e < param.shape[0]:
        raise DatasleuthError(f"expert layer {name!r} is out of range: the parameter has "
                              f"{param.shape[0]} experts; re-fit on this model")

