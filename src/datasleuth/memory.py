"""Memory a run will need, stated before it starts; factor blocks that fit a budget.

Counted per tracked layer of gradient shape (P, M+1) (docs/method.md §3, §4):

* **factors** (fit): the running sums of A and S, Σ m_i² + Σ p_i² numbers over their
  diagonal blocks, and of the eigenvalues Λ, P (M+1), all float64 (8 bytes); the fitted
  bases Q_A, Q_S take the same room as A and S. The **fit's peak** is the eigenvalue
  pass of EK-FAC: the bases in float64 and once more in the compute dtype (converted
  once, not per batch) beside Λ; a K-FAC fit peaks at the sums (or the bases) and Λ.
* **queries** (trace): Q P (M+1) numbers at full rank, Q k (P + M + 1) at rank k
  (:func:`datasleuth.scale.batching.memory_numbers`), in the compute dtype (float32).
* **one batch**: the captured ā (B, T, M+1) and Ds (B, T, P) of a layer and the batch's
  per-sequence gradients (B, P, M+1), float32. The model's own weights and
  activations are not counted.

A layer whose factors exceed ``max_factor_memory`` is split into the fewest equal
blocks that fit (:func:`blocks_for_budget`): A and S become block-diagonal over
contiguous groups of input and output features, so the curvature ignores correlations
between features of different groups (a block-diagonal approximation within the layer,
as ``--blocks`` does for every layer). Λ, P (M+1) numbers, cannot be split; a budget
below it is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from datasleuth.errors import DatasleuthError

__all__ = ["MemoryEstimate", "blocks_for_budget", "estimate_memory", "factor_bytes"]

FLOAT64 = 8
FLOAT32 = 4


def _split(n: int, blocks: int) -> list[int]:
    k = min(blocks, n)
    edges = [round(i * n / k) for i in range(k + 1)]
    return [b - a for a, b in zip(edges[:-1], edges[1:])]


def factor_bytes(shape: tuple[int, int], blocks: int = 1, kronecker: bool = True) -> int:
    """Bytes of one layer's fit sums: blocks of A and S (if ``kronecker``) and Λ, float64."""
    p, m1 = shape
    numbers = p * m1
    if kronecker:
        numbers += sum(n * n for n in _split(m1, blocks)) + sum(n * n for n in _split(p, blocks))
    return numbers * FLOAT64


def blocks_for_budget(shape: tuple[int, int], budget: int | None, blocks: int = 1,
                      name: str = "layer") -> int:
    """The fewest blocks ≥ ``blocks`` whose factor sums fit ``budget`` bytes (None: no limit)."""
    if budget is None:
        return blocks
    p, m1 = shape
    if factor_bytes(shape, max(p, m1)) > budget:
        floor = factor_bytes(shape, max(p, m1))
        raise DatasleuthError(
            f"layer {name!r} ({p}x{m1}) needs at least {_fmt(floor)} for its factors even "
            f"split into single features, over the budget of {_fmt(budget)}; raise "
            "--max-factor-memory or track fewer layers"
        )
    lo, hi = blocks, max(blocks, p, m1)
    while lo < hi:  # the bytes fall as the blocks grow
        mid = (lo + hi) // 2
        if factor_bytes(shape, mid) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _fmt(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"  # pragma: no cover


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of the factors, of the queries and of one batch (module docstring)."""

    factors: int
    queries: int
    batch: int
    blocks: dict[str, int]
    fit_peak: int = 0

    def lines(self) -> list[str]:
        """Human-readable summary, one line per item."""
        split = {n: b for n, b in self.blocks.items() if b > 1}
        peak = f" (fit peak {_fmt(self.fit_peak)})" if self.fit_peak > self.factors else ""
        out = [f"memory estimate: factors {_fmt(self.factors)}{peak}, queries "
               f"{_fmt(self.queries)}, one batch {_fmt(self.batch)} (plus the model and its "
               "activations)"]
        if split:
            out.append("factors split into blocks to fit the budget: " + ", ".join(
                f"{n} x{b}" for n, b in split.items()))
        return out


def estimate_memory(
    shapes: dict[str, tuple[int, int]],
    *,
    curvature: str = "ekfac",
    blocks: int = 1,
    max_factor_memory: int | None = None,
    batch_size: int = 8,
    seq_len: int = 512,
    queries: int = 0,
    rank: int | None = None,
    element_bytes: int = FLOAT32,
) -> MemoryEstimate:
    """Estimate for layers {name: (P, M+1)} (module docstring); ``rank=None``: full rank."""
    from datasleuth.scale.batching import memory_numbers

    kron = curvature in ("kfac", "ekfac")
    per_layer = {n: blocks_for_budget(s, max_factor_memory, blocks, n) if kron else blocks
                 for n, s in shapes.items()}
    factors = 0 if curvature == "identity" else sum(
        factor_bytes(s, per_layer[n], kron) for n, s in shapes.items())
    b, t = batch_size, seq_len
    batch = max((b * t * (p + m1) + b * p * m1) * element_bytes for p, m1 in shapes.values())
    query_bytes = memory_numbers(shapes, queries, rank) * element_bytes if queries else 0
    peak = factors
    if curvature == "ekfac":  # Λ + the bases in float64 and in the compute dtype
        peak += sum(factor_bytes(s, per_layer[n]) - factor_bytes(s, kronecker=False)
                    for n, s in shapes.items()) * element_bytes // FLOAT64
    return MemoryEstimate(factors, query_bytes, batch, per_layer, peak)


def layer_shapes(layers: Sequence) -> dict[str, tuple[int, int]]:
    """{name: (P, M+1)} of tracked layers."""
    return {layer.name: tuple(layer.grad_shape) for layer in layers}


def print_estimate(layers: Sequence, config, batch_size: int, corpus=None,
                   queries: int = 0, rank: int | None = None) -> MemoryEstimate:
    """Print :func:`estimate_memory` of a fit (and trace) to stderr; return it."""
    import sys

    seq_len = int(getattr(corpus, "seq_len", 0) or 512)
    est = estimate_memory(layer_shapes(layers), curvature=config.curvature,
                          blocks=config.blocks, max_factor_memory=config.max_factor_memory,
                          batch_size=batch_size, seq_len=seq_len, queries=queries, rank=rank)
    for line in est.lines():
        print(line, file=sys.stderr)
    return est
