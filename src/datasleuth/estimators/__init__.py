"""Reference estimators of (G + λI)⁻¹v for comparison and small models (docs/method.md §7).

Every estimator here is a :class:`~datasleuth.preconditioner.Preconditioner`, so
:func:`~datasleuth.scoring.pairwise_scores` and :func:`~datasleuth.scoring.self_influence`
use it unchanged. They work on the canonical parameters W̄ = (W b) of the tracked layers
(:meth:`TrackedLayer.canonical_weight`), flattened row-major layer after layer into one
vector θ ∈ R^D, and they are **joint across layers**: G is the full D×D Gauss-Newton
matrix, not its per-layer blocks. ``block_diagonal=True`` keeps only the per-layer blocks
G_ℓ, which is the structure EK-FAC approximates (docs/method.md §3), so the two can be
compared exactly.

The Gauss-Newton matrix of the per-example summed loss (docs/method.md §1;
Schraudolph 2002; Grosse et al. 2023, Eq. 9) is

    G = (1/N) Σ_n J_nᵀ H_n J_n,   J_n = ∂ output_n / ∂θ,   H_n = ∂² L_n / ∂ output_n²,

which needs the model output and the loss as a function of that output: see
:class:`OutputTask` and :func:`output_adapter`.

Modules: :mod:`~datasleuth.estimators.outputs` (a task's model output),
:mod:`~datasleuth.estimators.space` (flat θ, curvature-vector products),
:mod:`~datasleuth.estimators.exact` (dense matrix) and
:mod:`~datasleuth.estimators.iterative` (CG, LiSSA).

Costs (D tracked parameters, N training examples, K outputs per example, Q queries):

=====================  ========================================  =============================
estimator              cost                                      stops scaling at
=====================  ========================================  =============================
gradient dot product   one pass over the data, O(D) per example  never (cheapest baseline, but
(curvature="identity"  and query; no curvature                   it ignores curvature)
in FitConfig)
ExactInfluence         O(D²) memory; D curvature-vector          D ≈ 10⁴: the D×D float64
(exact_ggn,            products per example to build it          matrix is 0.8 GB and the
exact_hessian)         (O(N·D·K)); O(D³) Cholesky/eigh           O(D³) solve dominates
ConjugateGradient      per iteration one pass over the data      large D, but each solve costs
(cg)                   with one jvp + one vjp per query vector;  tens to thousands of passes
                       ≤ D iterations; O(Q·D) memory             over the data
LiSSA (lissa)          depth × repeats mini-batch GGN products;  like CG; depth ≫ (λ_max+λ)/λ,
                       O(Q·D) memory                             so small damping is costly
EK-FAC                 two passes over the data; (M² + P² + MP)  52B-parameter models (Grosse
(datasleuth.fitting)   numbers per layer; block-diagonal only    et al. 2023)
refined EK-FAC         EK-FAC, then per step one GGN-vector      like CG, but EK-FAC as start
(datasleuth.refine)    product per query (× L layers for the     and preconditioner: tens of
                       per-layer blocks) on the step's batches   steps, not thousands
=====================  ========================================  =============================

Damping: ``None`` (default) for ``damping_scale`` × the mean eigenvalue tr(G_ℓ)/D_ℓ of each
layer's block — EK-FAC's own rule, exact for :class:`ExactInfluence`, estimated with seeded
Hutchinson probes by CG and LiSSA; an absolute λ (float), a mapping {layer name: λ_ℓ}, or
``"match"`` to take each layer's λ_ℓ from a fitted :class:`~datasleuth.curvature.Curvature`
(``reference=``), so that an exact estimate and EK-FAC are compared at the same damping. In
every case the damped matrix is G + diag(λ_ℓ(i)), with λ_ℓ(i) the damping of the layer
holding parameter i.

Example (a tiny classifier; every estimator plugs into the same scoring calls)::

    >>> import torch
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> from datasleuth import ClassificationTask, pairwise_scores
    >>> from datasleuth.estimators import ConjugateGradient, ExactInfluence
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(),
    ...                             torch.nn.Linear(5, 3)).double()
    >>> data = TensorDataset(torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,)))
    >>> train, task = DataLoader(data, batch_size=8), ClassificationTask()
    >>> exact = ExactInfluence.fit(model, task, train, damping=1e-2)
    >>> cg = ConjugateGradient(model, task, train, damping=1e-2, tol=1e-12)
    >>> a = pairwise_scores(model, task, exact, [data[:2]], train, progress=False).total
    >>> b = pairwise_scores(model, task, cg, [data[:2]], train, progress=False).total
    >>> bool(torch.allclose(a, b, rtol=1e-6))
    True
"""

from datasleuth.estimators.exact import EXACT_KINDS, ExactInfluence
from datasleuth.estimators.iterative import CGInfo, ConjugateGradient, LiSSA, LiSSAInfo
from datasleuth.estimators.outputs import OutputTask, output_adapter
from datasleuth.estimators.space import GradientLayout, ParameterSpace

__all__ = [
    "OutputTask",
    "output_adapter",
    "GradientLayout",
    "ParameterSpace",
    "ExactInfluence",
    "ConjugateGradient",
    "CGInfo",
    "LiSSA",
    "LiSSAInfo",
    "ESTIMATOR_KINDS",
]

ESTIMATOR_KINDS = (*EXACT_KINDS, ConjugateGradient.kind, LiSSA.kind)
