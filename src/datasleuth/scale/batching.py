"""Query batching: many queries share one pass over the training data (docs/method.md §4).

Grosse et al. 2023, §3.2.2. The preconditioned query gradient of a tracked layer,
Ṽ = (G_ℓ + λ_ℓ I)⁻¹ ∇f (P×(M+1)), is kept as a truncated SVD Ṽ ≈ L R with
L = U_k diag(σ_1..σ_k) (P×k) and R = V_kᵀ (k×(M+1)); k = 32 by default (Pearson 0.995
against full rank on a 52B model in the paper). With the engine's sign convention (the
captured Ds is the gradient of the log-likelihood, see :mod:`datasleuth.streaming`), the
score against a training sequence is then

    score = ⟨Ṽ, Σ_t Ds_t ā_tᵀ⟩ ≈ Σ_t (Ds_tᵀ L)(R ā_t)

so the per-sequence gradient DW̄ (P×(M+1)) is never formed. A layer whose gradient is
no larger than the rank, min(P, M+1) ≤ k, is kept exactly (full rank) and scored like
:func:`datasleuth.scoring.scan_scores` does.

Memory of Q queries (numbers; bytes = numbers × element size)::

    low rank:  Q × [ Σ_{ℓ: min(P_ℓ, M_ℓ+1) > k} k (P_ℓ + M_ℓ + 1)
                   + Σ_{ℓ: min(P_ℓ, M_ℓ+1) ≤ k} P_ℓ (M_ℓ + 1) ]
    full rank: Q × Σ_ℓ P_ℓ (M_ℓ + 1)

(:func:`memory_numbers`). For GPT-2 small's MLP (M = 768, P = 3072 and back) at k = 32
that is 2 × 32 × 3841 ≈ 0.25 M numbers per block and query instead of 4.7 M (19×).

Cost per training sequence of T tokens, per layer, in multiply-adds (B sequences a
batch)::

    low rank, tokens:       T Q k (P + M + 2)     (two GEMMs, a product summed over t, k)
    low rank, reconstruct:  Q k P (M+1) / B + (T + Q) P (M+1)
                            (rebuild L R for a chunk of queries, dot with DW̄)
    full rank:              (T + Q) P (M+1)       (form DW̄ once, one dot per query)

The low-rank queries save *memory*: hundreds of queries fit where a handful of
full-rank ones would, so one pass over the corpus serves them all. In time, the token
path (the formulation of Grosse et al.) never forms DW̄ but costs T Q k (P + M); the
reconstruct path forms the batch's DW̄, as the plain scan does, and rebuilds chunks of
Ṽ = L R transiently. Both give the same scores up to rounding. :func:`scan_low_rank`
picks per layer and batch by cost (``path="auto"``, the default): multiply-adds plus
the Q P (M+1) numbers the rebuild writes and reads, each weighted as
:data:`REBUILD_TRAFFIC` multiply-adds (at GPT-2-small width, 256 rank-32 queries and
sequences of 128 tokens on a 2-core CPU, the rebuild costs as much as the token path
at 64 sequences a batch, and less beyond). The rebuild goes a block of rows at a time
for all queries at once, so each DW̄ is read once. Large batches of long sequences
favour the rebuild, many queries of short sequences the tokens. Re-score the final top-N
candidates with full-rank query gradients (:func:`rescore`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from datasleuth.curvature import Curvature
from datasleuth.errors import DatasleuthError, listed
from datasleuth.layers import live_rows, live_tokens, per_example_gradients
from datasleuth.preconditioner import Preconditioner
from datasleuth.progress import progress_bar
from datasleuth.scale.rescore import rescore, subset_loader, top_candidates
from datasleuth.scale.svd import truncated_svd
from datasleuth.scoring import (
    Scores,
    collect_scores,
    precondition_queries,
    query_coordinates,
    scan,
)
from datasleuth.storage import load_tensors, save_tensors
from datasleuth.task import Task
from datasleuth.utils import compute_dtype

__all__ = [
    "DEFAULT_RANK",
    "LowRankQueries",
    "LowRankScorer",
    "compress_queries",
    "low_rank_scores",
    "memory_numbers",
    "rescore",
    "scan_low_rank",
    "subset_loader",
    "top_candidates",
]

DEFAULT_RANK = 32
FORMAT_NAME = "datasleuth.low_rank_queries"
FORMAT_VERSION = 1
_CHUNK_ELEMENTS = 1 << 24  # bound on (B·T) × (queries in a chunk) × k per scan intermediate


def _is_small(shape: tuple[int, int], rank: int) -> bool:
    """A layer kept at full rank: its gradient has rank ≤ k anyway (docs/method.md §4)."""
    return min(shape) <= rank


def memory_numbers(
    shapes: Mapping[str, tuple[int, int]], n_queries: int, rank: int | None = DEFAULT_RANK
) -> int:
    """Numbers stored for ``n_queries`` preconditioned queries over layers of ``shapes``.

    ``shapes`` maps layer names to gradient shapes (P, M+1). ``rank=None`` gives full
    rank, Q × Σ_ℓ P_ℓ (M_ℓ + 1); otherwise Q × Σ_ℓ k (P_ℓ + M_ℓ + 1) over the low-rank
    layers plus Q × P_ℓ (M_ℓ + 1) over the layers with min(P_ℓ, M_ℓ + 1) ≤ k (module
    docstring; Grosse et al. 2023, §3.2.2).
    """
    total = 0
    for p, m1 in shapes.values():
        if rank is None or _is_small((p, m1), rank):
            total += p * m1
        else:
            total += rank * (p + m1)
    return n_queries * total


@dataclass
class LowRankQueries:
    """Preconditioned query gradients of Q queries, compressed per layer (docs/method.md §4).

    Every name of ``layer_names`` is either in ``left`` and ``right`` (Ṽ ≈ left @ right,
    ``left`` (Q, P, k), ``right`` (Q, k, M+1)) or in ``full`` ((Q, P, M+1), kept exactly).
    ``rank`` is the k asked for; ``metadata`` says how the queries were made and is
    saved with them.

    Example:
        >>> pre = {"fc": torch.randn(3, 40, 41, dtype=torch.float64)}
        >>> lr = LowRankQueries.from_preconditioned(pre, rank=4)
        >>> lr.left["fc"].shape, lr.right["fc"].shape
        (torch.Size([3, 40, 4]), torch.Size([3, 4, 41]))
    """

    left: dict[str, Tensor]
    right: dict[str, Tensor]
    full: dict[str, Tensor]
    rank: int
    layer_names: list[str]
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (isinstance(self.rank, int) and self.rank >= 1):
            raise DatasleuthError(
                f"rank must be a positive integer, got {self.rank!r}; use e.g. 32"
            )
        names = list(self.layer_names)
        if not names:
            raise DatasleuthError(
                "LowRankQueries holds no layer; pass at least one layer's queries"
            )
        if set(self.left) != set(self.right):
            raise DatasleuthError(
                f"left and right factors cover different layers ({listed(sorted(self.left))} vs "
                f"{listed(sorted(self.right))}); give both factors of every low-rank layer"
            )
        stored = list(self.left) + list(self.full)
        if sorted(stored) != sorted(names) or len(set(stored)) != len(stored):
            raise DatasleuthError(
                f"layer_names ({listed(names)}) must list each layer of left/right "
                f"({listed(sorted(self.left))}) and full ({listed(sorted(self.full))}) exactly "
                "once; fix the layer lists"
            )
        counts = set()
        for name in names:
            if name in self.full:
                v = self.full[name]
                if v.dim() != 3:
                    raise DatasleuthError(
                        f"full queries of layer {name!r} must be (Q, P, M+1), got "
                        f"{tuple(v.shape)}; stack one (P, M+1) gradient per query"
                    )
                counts.add(v.shape[0])
                continue
            left, right = self.left[name], self.right[name]
            if (left.dim() != 3 or right.dim() != 3 or left.shape[0] != right.shape[0]
                    or left.shape[2] != right.shape[1]):
                raise DatasleuthError(
                    f"factors of layer {name!r} must be left (Q, P, k) and right (Q, k, M+1), "
                    f"got {tuple(left.shape)} and {tuple(right.shape)}; fix their shapes"
                )
            counts.add(left.shape[0])
        if len(counts) != 1:
            raise DatasleuthError(
                f"layers hold different numbers of queries {sorted(counts)}; give every "
                "layer the same queries"
            )

    @property
    def n_queries(self) -> int:
        """Q, the number of queries."""
        name = self.layer_names[0]
        return (self.full[name] if name in self.full else self.left[name]).shape[0]

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        """Gradient shape (P, M+1) of every layer, in layer order."""
        out = {}
        for name in self.layer_names:
            if name in self.full:
                out[name] = tuple(self.full[name].shape[1:])
            else:
                out[name] = (self.left[name].shape[1], self.right[name].shape[2])
        return out

    @classmethod
    def from_preconditioned(
        cls,
        preconditioned: Mapping[str, Tensor],
        rank: int = DEFAULT_RANK,
        metadata: dict | None = None,
    ) -> LowRankQueries:
        """Compress {name: Ṽ (Q, P, M+1)} by a truncated SVD per query and layer.

        One batched truncated SVD per layer, in the queries' own dtype (randomized for
        layers much larger than the rank, see :func:`_truncated_svd`). Layers with
        min(P, M+1) ≤ ``rank`` are kept exactly (docs/method.md §4; Grosse et al. 2023, §3.2.2).
        """
        if not (isinstance(rank, int) and rank >= 1):
            raise DatasleuthError(f"rank must be a positive integer, got {rank!r}; use e.g. 32")
        left: dict[str, Tensor] = {}
        right: dict[str, Tensor] = {}
        full: dict[str, Tensor] = {}
        for name, v in preconditioned.items():
            if v.dim() != 3:
                raise DatasleuthError(
                    f"preconditioned queries of layer {name!r} must be (Q, P, M+1), got "
                    f"{tuple(v.shape)}; pass the output of precondition_queries"
                )
            if _is_small(tuple(v.shape[1:]), rank):
                full[name] = v.detach()
            else:
                left[name], right[name] = truncated_svd(v.detach(), rank)
        meta = dict(metadata or {})
        return cls(left, right, full, rank, list(preconditioned), meta)

    @classmethod
    def cat(cls, parts: Sequence[LowRankQueries]) -> LowRankQueries:
        """Concatenate query sets with the same layers and rank along the query axis."""
        if not parts:
            raise DatasleuthError("no query sets to concatenate; pass at least one")
        first = parts[0]
        for p in parts[1:]:
            if p.layer_names != first.layer_names or p.rank != first.rank or (
                    sorted(p.full) != sorted(first.full)):
                raise DatasleuthError(
                    "query sets differ in layers or rank; compress them all with the same "
                    "curvature and rank"
                )

        def join(attr: str) -> dict[str, Tensor]:
            return {n: torch.cat([getattr(p, attr)[n] for p in parts])
                    for n in getattr(first, attr)}

        return cls(join("left"), join("right"), join("full"), first.rank,
                   list(first.layer_names), dict(first.metadata))

    def select(self, queries: Sequence[int] | Tensor) -> LowRankQueries:
        """The queries at these positions, in this order."""
        idx = torch.as_tensor(queries, dtype=torch.long)

        def pick(d: dict[str, Tensor]) -> dict[str, Tensor]:
            return {n: t[idx.to(t.device)] for n, t in d.items()}

        return LowRankQueries(pick(self.left), pick(self.right), pick(self.full), self.rank,
                              list(self.layer_names), dict(self.metadata))

    def dense(self) -> dict[str, Tensor]:
        """The approximated Ṽ ≈ L R of every layer, {name: (Q, P, M+1)}; for checks only."""
        return {
            n: self.full[n] if n in self.full else self.left[n] @ self.right[n]
            for n in self.layer_names
        }

    def memory_bytes(self) -> int:
        """Bytes held by the stored factors (= :func:`memory_numbers` × element size)."""
        tensors = [*self.left.values(), *self.right.values(), *self.full.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def to(self, device: torch.device | str) -> LowRankQueries:
        """A copy with every factor on ``device``."""

        def move(d: dict[str, Tensor]) -> dict[str, Tensor]:
            return {n: t.to(device) for n, t in d.items()}

        return LowRankQueries(move(self.left), move(self.right), move(self.full), self.rank,
                              list(self.layer_names), dict(self.metadata))

    def save(self, path: str | os.PathLike) -> None:
        """Write factors and metadata to one safetensors file, atomically."""
        tensors: dict[str, Tensor] = {}
        for name in self.layer_names:
            if name in self.full:
                tensors[f"{name}/full"] = self.full[name]
            else:
                tensors[f"{name}/left"] = self.left[name]
                tensors[f"{name}/right"] = self.right[name]
        meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "rank": self.rank,
            "layer_names": list(self.layer_names),
            "full_rank_layers": sorted(self.full),
            "metadata": self.metadata,
        }
        save_tensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> LowRankQueries:
        """Read what :meth:`save` wrote; refuse other files and format versions."""
        tensors, meta = load_tensors(path)
        if meta.get("format") != FORMAT_NAME:
            raise DatasleuthError(
                f"{path} holds {meta.get('format', 'something else')!r}, not low-rank queries; "
                "point to a file written by LowRankQueries.save"
            )
        if meta.get("format_version") != FORMAT_VERSION:
            raise DatasleuthError(
                f"{path} has format version {meta.get('format_version')}, this datasleuth reads "
                f"{FORMAT_VERSION}; compress the queries again"
            )
        full_layers = set(meta["full_rank_layers"])
        left, right, full = {}, {}, {}
        try:
            for name in meta["layer_names"]:
                if name in full_layers:
                    full[name] = tensors[f"{name}/full"]
                else:
                    left[name] = tensors[f"{name}/left"]
                    right[name] = tensors[f"{name}/right"]
        except KeyError as e:
            raise DatasleuthError(
                f"{path} lacks tensor {e}; the file is damaged, save the queries again"
            ) from e
        return cls(left, right, full, int(meta["rank"]), list(meta["layer_names"]),
                   dict(meta["metadata"]))


def compress_queries(
    model: nn.Module,
    task: Task,
    curvature: Preconditioner,
    queries: Iterable[Any],
    rank: int = DEFAULT_RANK,
    progress: bool = False,
) -> LowRankQueries:
    """Precondition and compress the queries batch by batch: only one batch is full rank.

    Same queries as :func:`datasleuth.scoring.precondition_queries`, then
    :meth:`LowRankQueries.from_preconditioned`; the metadata records the curvature kind
    and, when it has one, its model fingerprint. A block-diagonal :class:`Curvature`
    compresses in its eigenbasis (:func:`_compress_in_basis`).
    """
    parts = []
    for batch in progress_bar(queries, desc="compress queries", enabled=progress,
                              unit="query"):
        if isinstance(curvature, Curvature):
            parts.append(_compress_in_basis(model, task, curvature, batch, rank))
            continue
        pre = precondition_queries(model, task, curvature, [batch], progress=False)
        parts.append(LowRankQueries.from_preconditioned(pre, rank))
    if not parts:
        raise DatasleuthError("the query loader yielded no batches; give at least one query")
    out = LowRankQueries.cat(parts)
    out.metadata = {
        "curvature": curvature.kind,
        "fingerprint": getattr(curvature, "metadata", {}).get("fingerprint"),
    }
    return out


def _compress_in_basis(model: nn.Module, task: Task, curvature: Curvature, batch: Any,
                       rank: int) -> LowRankQueries:
    """Truncated SVD of C = Q_Sᵀ Ṽ Q_A, then L = Q_S L_C, R = R_C Q_Aᵀ (docs/method.md §4).

    Orthogonal rotations keep singular values, so this is Ṽ's own best rank-k
    approximation, at a cost of k (P² + (M+1)²) per query to rotate the factors back
    instead of P (M+1) (P + M + 1) to rotate Ṽ back and forth densely.
    """
    coords, curv = query_coordinates(model, task, curvature, [batch])
    low = LowRankQueries.from_preconditioned(coords, rank)
    for name, c in curv.layers.items():
        if name in low.full:
            low.full[name] = c.unrotate(low.full[name])
            continue
        if c.q_out is not None:
            low.left[name] = c.q_out.from_basis(low.left[name], -2).contiguous()
        if c.q_in is not None:
            low.right[name] = c.q_in.from_basis(low.right[name], -1).contiguous()
    return low


_PATHS = ("auto", "tokens", "reconstruct")
REBUILD_TRAFFIC = {"cpu": (180, 2.3), "other": (32, 1.0)}
"""By device type, the reconstruct path's costs in token-path multiply-adds: (extra cost
of one rebuilt number of Ṽ = L R, on top of its k multiply-adds; cost of one of its
per-sequence multiply-adds, forming DW̄ and the dot products). CPU: fitted on 2 cores
at GPT-2's MLP shapes, 256 rank-32 queries, 8 and 64 sequences of 128 tokens (the two
paths tie at 64); other devices: not measured (a GPU moves about 4 bytes per 30
multiply-adds)."""
_REBUILD_BLOCK = 1 << 22  # numbers of Ṽ rebuilt at once (all queries, a block of rows)


class LowRankScorer:
    """Scores one layer's captured (ā, Ds) against every query.

    Two exact evaluations of ⟨L R, DW̄⟩ for a low-rank layer, fixed by ``path`` or
    chosen per batch by cost (``path="auto"``; module docstring):

    * ``"tokens"`` (Grosse et al. 2023, §3.2.2): Σ_t (Ds_tᵀ L)(R ā_t); DW̄ is never
      formed; B T Q k (P + M + 1) per batch.
    * ``"reconstruct"``: rebuild Ṽ = L R for a chunk of queries at a time (transient
      memory of one chunk) and take dot products with the batch's DW̄, formed once as in
      the plain scan; Q k P (M+1) + B (T + Q) P (M+1) per batch. Cheaper when the batch is
      large and the sequences long.
    """

    def __init__(self, queries: LowRankQueries, name: str, dtype: torch.dtype,
                 device: torch.device, path: str = "auto"):
        self.q = queries.n_queries
        self.path = path
        if name in queries.full:
            self.full = queries.full[name].to(device, dtype).reshape(self.q, -1)  # (Q, P(M+1))
            return
        self.full = None
        left, right = queries.left[name], queries.right[name]
        self.k = left.shape[2]
        # Columns ordered (query, k), so one GEMM serves all queries; one copy on device.
        self.left = left.to(device, dtype).permute(1, 0, 2).reshape(left.shape[1], -1)  # (P,Qk)
        self.right = right.to(device, dtype).permute(2, 0, 1).reshape(right.shape[2], -1)
        # self.right: (M+1, Qk). Per-query views of the same storage, for "reconstruct":
        self.l3 = self.left.view(left.shape[1], self.q, self.k).permute(1, 0, 2)  # (Q, P, k)
        self.r3 = self.right.view(right.shape[2], self.q, self.k).permute(1, 2, 0)  # (Q,k,M+1)

    def __call__(self, a: Tensor, g: Tensor) -> Tensor:
        """Scores (B, Q) from ā (B, T, M+1) and Ds (B, T, P), padding already zero."""
        b, t, m1 = a.shape
        p = g.shape[2]
        keep = live_tokens(a, g)  # (B, T) when many tokens are zero (experts), else None
        if self.full is not None:
            # 2 B T P (M+1) FLOPs to form DW̄, then 2 B Q P (M+1) for the dot products.
            dw = per_example_gradients(a, g, keep)  # (B, P, M+1), gradient of log p
            return dw.reshape(b, -1) @ self.full.t()  # (B, Q)
        rows = b * t if keep is None else int(keep.sum())
        path = self.path
        if path == "auto":
            tokens = rows * self.q * self.k * (p + m1)
            traffic, per_seq = REBUILD_TRAFFIC["cpu" if a.device.type == "cpu" else "other"]
            rebuild = (self.q * (self.k + traffic) * p * m1
                       + per_seq * b * (t + self.q) * p * m1)
            path = "tokens" if tokens <= rebuild else "reconstruct"
        if path == "reconstruct":
            return self._rebuilt(per_example_gradients(a, g, keep))  # DW̄: (B, P, M+1)
        return self._tokens(a, g, keep)

    def _rebuilt(self, dw: Tensor) -> Tensor:
        """⟨L R, DW̄⟩ (B, Q): Ṽ = L R rebuilt for every query a block of rows at a time,
        each block dotted with the same rows of every DW̄ at once, so DW̄ is read once and
        each rebuilt block is used while it is fresh in cache (an (B × Q) GEMM per block)."""
        b, p, m1 = dw.shape
        step = max(1, _REBUILD_BLOCK // max(1, self.q * m1))
        out = dw.new_zeros(b, self.q)
        for p0 in range(0, p, step):
            v = torch.bmm(self.l3[:, p0:p0 + step], self.r3)  # (Q, rows, M+1)
            out.addmm_(dw[:, p0:p0 + step].reshape(b, -1), v.reshape(self.q, -1).t())
        return out

    def _tokens(self, a: Tensor, g: Tensor, keep: Tensor | None) -> Tensor:
        """Σ_t (Ds_tᵀ L)(R ā_t) per sequence, (B, Q), over the ``keep`` tokens if given.

        2 T Q k (P + M + 1) FLOPs per sequence for the two GEMMs, T Q k for the
        product-sum; queries in chunks so no intermediate exceeds _CHUNK_ELEMENTS.
        """
        b, t = a.shape[:2]
        a2, g2, spans = live_rows(a, g, keep)  # (rows, M+1), (rows, P)
        step = max(1, _CHUNK_ELEMENTS // max(1, a2.shape[0] * self.k))
        out = []
        for q0 in range(0, self.q, step):
            cols = slice(q0 * self.k, min(self.q, q0 + step) * self.k)
            u = g2 @ self.left[:, cols]  # Ds_tᵀ L, (rows, Qc k)
            w = a2 @ self.right[:, cols]  # R ā_t, (rows, Qc k)
            if keep is None:
                out.append(u.mul_(w).reshape(b, t, -1, self.k).sum((1, 3)))  # (B, Qc)
                continue
            per_token = u.mul_(w).reshape(a2.shape[0], -1, self.k).sum(2)  # (rows, Qc)
            chunk = per_token.new_zeros(b, per_token.shape[1])
            for i, rows in spans:
                chunk[i] = per_token[rows].sum(0)
            out.append(chunk)
        return torch.cat(out, dim=1)  # (B, Q)


def _scorers(model: nn.Module, queries: LowRankQueries, path: str) -> dict[str, LowRankScorer]:
    if path not in _PATHS:
        raise DatasleuthError(f"path must be one of {', '.join(_PATHS)}, not {path!r}")
    device = next(model.parameters()).device
    dtype = compute_dtype(model)
    return {n: LowRankScorer(queries, n, dtype, device, path) for n in queries.layer_names}


def scan_low_rank(
    model: nn.Module,
    task: Task,
    queries: LowRankQueries,
    train: Iterable[Any],
    on_scores: Callable[[int, Tensor], None],
    progress: bool = True,
    path: str = "auto",
) -> None:
    """Stream ``train`` once and call ``on_scores(first_index, scores (B, Q, L))`` per batch.

    :func:`datasleuth.scoring.scan` with a :class:`LowRankScorer` per layer: each
    low-rank layer is scored against the compressed queries Ṽ ≈ L R (docs/method.md §4;
    Grosse et al. 2023, §3.2.2), as Σ_t (Ds_tᵀ L)(R ā_t) or against the rebuilt L R,
    whichever costs less (``path``); layers kept at full rank take the per-example
    gradient path. The layer axis follows ``queries.layer_names``.
    """
    scan(model, task, train, _scorers(model, queries, path), on_scores, progress,
         "scoring (low rank)")


def low_rank_scores(
    model: nn.Module,
    task: Task,
    queries: LowRankQueries,
    train: Iterable[Any],
    progress: bool = True,
    path: str = "auto",
) -> Scores:
    """All scores of :func:`scan_low_rank`: total (Q, N), per layer (Q, N, L)."""
    return collect_scores(model, task, train, _scorers(model, queries, path), progress,
                          "scoring (low rank)")
