"""Non-finite values caught where they are made, named by layer and stage.

Influence scores are inner products of gradients with a preconditioner fitted from the
same gradients (docs/method.md §1, §3), so one NaN or Inf in a weight, an activation or a
gradient spreads to every factor, eigenvalue and score downstream, and a ranking made of
them looks fine while meaning nothing. These checks run where values are made, cheaply:
once on the weights before any pass, once per batch on each layer's *running sums*
(a NaN anywhere in a batch reaches the sum), once per batch on the scores, never per
element in the hot path. Each failure is a :class:`DatasleuthError` naming the layer,
the stage and the fix.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from datasleuth.errors import DatasleuthError

__all__ = ["WEIGHTS_FIX", "all_finite", "check_finite", "check_weights", "check_sums",
           "check_scores"]

#: The remedy named when non-finite values come from the model itself.
WEIGHTS_FIX = ("check the model's weights (a damaged or diverged checkpoint; try --dtype "
               "float32 if it overflows in half precision)")


def _kind(value: Tensor) -> str | None:
    """``"NaN"``, ``"Inf"`` or ``None`` when every entry of ``value`` is finite."""
    if bool(torch.isfinite(value).all()):
        return None
    return "NaN" if bool(torch.isnan(value).any()) else "Inf"


def check_finite(value: Tensor, layer: str, what: str, when: str = "",
                 fix: str = WEIGHTS_FIX) -> None:
    """Refuse ``value`` if it holds NaN or Inf: "layer L: <what> has NaN <when>; <fix>"."""
    kind = _kind(value)
    if kind is not None:
        where = f" {when}" if when else ""
        raise DatasleuthError(f"layer {layer}: {what} holds {kind}{where}; {fix}")


def check_weights(model: nn.Module, layers: Iterable[str] | None = None) -> None:
    """Refuse a model with a NaN or Inf parameter, naming it (one pass over the weights).

    ``layers`` (module names) restricts the check to those modules' parameters;
    by default every parameter is checked.
    """
    prefixes = None if layers is None else tuple(f"{name}." for name in layers)
    for name, p in model.named_parameters():
        if prefixes is not None and not name.startswith(prefixes):
            continue
        kind = _kind(p.detach())
        if kind is not None:
            layer = name.rsplit(".", 1)[0]
            raise DatasleuthError(f"layer {layer}: the weight {name} holds {kind}; {WEIGHTS_FIX}")


def all_finite(x: Tensor) -> bool:
    """Whether every entry is finite: by the total first (one cheap pass, 16× faster than
    ``isfinite`` on a wide factor; NaN or Inf anywhere makes it non-finite), by the
    entries only when the total is not (it can overflow with every entry finite)."""
    return bool(torch.isfinite(x.sum(dtype=torch.float64))) or bool(torch.isfinite(x).all())


def check_sums(sums: Mapping[str, Sequence[Tensor]], what: str, batch: int) -> None:
    """Refuse the first layer whose running sums (``{layer: [tensors]}``) hold NaN or Inf.

    ``what`` names the statistic (e.g. "the input covariance"); ``batch`` is the
    0-based position of the batch just added.
    """
    flat = [t for tensors in sums.values() for t in tensors]
    if not flat:
        return
    device = flat[0].device
    totals = torch.stack([t.sum(dtype=torch.float64).to(device) for t in flat])
    if bool(torch.isfinite(totals).all()):
        return  # the usual case: one read of each sum and one host-device sync per batch
    # A NaN or Inf anywhere makes its tensor's total non-finite; a total can also overflow
    # with every entry finite, so the entries decide.
    for layer, tensors in sums.items():
        for t in tensors:
            check_finite(t, layer, what, f"after batch {batch}")


def check_scores(scores: Tensor, layers: Sequence[str], first: int, stage: str = "scores"
                 ) -> None:
    """Refuse a batch of per-layer scores (..., L) with NaN or Inf, naming the layer.

    ``first`` is the position of the batch's first example; the fix names both the
    model's weights and the damping (a tiny damping can overflow the preconditioner).
    """
    if _kind(scores) is None:
        return
    for i, layer in enumerate(layers):
        check_finite(scores[..., i], layer, f"the {stage}",
                     f"in the batch starting at sequence {first}",
                     f"{WEIGHTS_FIX}, and that --damping is not tiny")
    raise DatasleuthError(f"the {stage} hold NaN or Inf in the batch starting at sequence "
                          f"{first}; {WEIGHTS_FIX}")
