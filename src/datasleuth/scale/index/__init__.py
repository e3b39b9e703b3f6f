"""A projected-gradient index of a training corpus (docs/method.md §7 "Projected gradients";
Choe et al. 2024, LoGra).

Per tracked layer ℓ with homogeneous input ā ∈ R^(M+1) and output pre-activation
s ∈ R^P, two fixed random matrices P_in (k_in×(M+1)) and P_out (k_out×P) compress the
per-sequence layer gradient DW̄ = Σ_t Ds_t ā_tᵀ (P×(M+1)) to

    G̃ = P_out DW̄ P_inᵀ = Σ_t (P_out Ds_t)(P_in ā_t)ᵀ          (k_out×k_in)

computed right-hand side first: inputs and output gradients are projected per token and
only then summed as outer products, so DW̄ is never formed (Choe et al. 2024, Eq. 4-5).
The row of a sequence is the row-major flattening of every layer's G̃, layers in the
index's order: D = Σ_ℓ k_out,ℓ·k_in,ℓ numbers.

Sign and scale: like every gradient in datasleuth (:mod:`datasleuth.streaming`), a
stored row is the projected gradient of the log-likelihood −L(z_m), so the influence
on a query is directly

    score(q, m) = q̃ᵀ row_m,   q̃ = (G̃ + λI)⁻¹ P ∇θ f_q        (per layer, summed)

with G̃ = E_seq[g̃ g̃ᵀ] the Gauss-Newton matrix in the projected space (true Fisher with
sampled labels by default) and λ = 0.1 × its mean eigenvalue per layer. A positive score
means adding z_m raises f_q; scores are not divided by N. With ``projection="identity"``
and k equal to the layer sizes this is exactly the influence of docs/method.md §1 under
a dense per-layer curvature.

Whitened indices (``IndexConfig(whitening="ekfac")`` or ``"kron"``, docs/method.md §11) multiply
each layer gradient by a square root of the fitted damped curvature before projecting,
so a stored row's inner product with a query's row estimates the influence itself and
queries need no projected curvature (:mod:`.projection`); :mod:`.sizing` reports each
layer's effective dimension and picks projection sizes within a byte budget.

Modules: :mod:`.config` (what an index stores), :mod:`.projection` (the seeded
projections and the projected scorer), :mod:`.curvature` (the projected Gauss-Newton,
a :class:`~datasleuth.preconditioner.Preconditioner` over projected rows),
:mod:`.codec` (float or int8/int4 rows), :mod:`.store` (the directory on disk),
:mod:`.search` (exact and FAISS search),
:mod:`.build` (streaming the corpus into shards, resumable).

Example::

    index = build_index(model, task, corpus.as_torch_dataset(), ["*.mlp.*"], "idx",
                        IndexConfig(k_in=16, k_out=16), batch_size=8,
                        collate_fn=corpus.collate)
    fit_projected_curvature(model, task, fit_loader, index)
    q = precondition_queries(model, task, index.curvature, query_batches,
                             features=index.features)             # {layer: (Q, D_ℓ)}
    rows, scores = index.search(q, k=100)                          # (Q, 100) each

    # whitened (the CLI's default): no projected curvature; sizes from a byte budget
    curv = fit_curvature(model, task, fit_loader, ["*.mlp.*"])     # EK-FAC
    config, sizes = auto_config(IndexConfig(whitening="ekfac", projection="eigen"),
                                find_layers(model, ["*.mlp.*"]), curv, 16384)
    index = build_index(model, task, dataset, ["*.mlp.*"], "idx-w", config, curvature=curv)
    q = precondition_queries(model, task, index.curvature, query_batches,
                             features=index.features)             # identity preconditioner
"""

from __future__ import annotations

from datasleuth.scale.index.build import build_index
from datasleuth.scale.index.config import INDEX_FORMAT_VERSION, STORAGE, WHITENINGS, IndexConfig
from datasleuth.scale.index.curvature import (
    ProjectedCurvature,
    Whitened,
    fit_projected_curvature,
)
from datasleuth.scale.index.projection import LayerProjection, ProjectedScorer, kron_root
from datasleuth.scale.index.sizing import (
    auto_config,
    auto_dims,
    effective_dimension,
    size_report,
)
from datasleuth.scale.index.store import GradientIndex

__all__ = [
    "INDEX_FORMAT_VERSION",
    "GradientIndex",
    "IndexConfig",
    "LayerProjection",
    "ProjectedCurvature",
    "ProjectedScorer",
    "STORAGE",
    "WHITENINGS",
    "Whitened",
    "auto_config",
    "auto_dims",
    "build_index",
    "effective_dimension",
    "fit_projected_curvature",
    "kron_root",
    "size_report",
]
