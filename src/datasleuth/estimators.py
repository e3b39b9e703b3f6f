"""Reference estimators of (G + λI)⁻¹v for comparison and small models (METHOD.md §7).

Every estimator here is a :class:`~datasleuth.scoring.Preconditioner`, so
:func:`~datasleuth.scoring.pairwise_scores` and :func:`~datasleuth.scoring.self_influence`
use it unchanged. They work on the canonical parameters W̄ = (W b) of the tracked layers
(:meth:`TrackedLayer.canonical_weight`), flattened row-major layer after layer into one
vector θ ∈ R^D, and they are **joint across layers**: G is the full D×D Gauss-Newton
matrix, not its per-layer blocks. ``block_diagonal=True`` keeps only the per-layer blocks
G_ℓ, which is the structure EK-FAC approximates (METHOD.md §3), so the two can be
compared exactly.

The Gauss-Newton matrix of the per-example summed loss (METHOD.md §1; Schraudolph 2002;
Grosse et al. 2023, Eq. 9) is

    G = (1/N) Σ_n J_nᵀ H_n J_n,   J_n = ∂ output_n / ∂θ,   H_n = ∂² L_n / ∂ output_n²,

which needs the model output and the loss as a function of that output: see
:class:`OutputTask` and :func:`output_adapter`.

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
=====================  ========================================  =============================

Damping: an absolute λ (float), a mapping {layer name: λ_ℓ}, or ``"match"`` to take each
layer's λ_ℓ from a fitted :class:`~datasleuth.curvature.Curvature` (``reference=``), so that
an exact estimate and EK-FAC are compared at the same damping. In every case the damped
matrix is G + diag(λ_ℓ(i)), with λ_ℓ(i) the damping of the layer holding parameter i.

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

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap
from torch.utils.data import DataLoader, default_collate

from datasleuth.curvature import Curvature
from datasleuth.errors import DatasleuthError
from datasleuth.fitting import resolve_layers
from datasleuth.layers import TrackedLayer, suspend_capture
from datasleuth.task import ClassificationTask, RegressionTask, Task
from datasleuth.utils import to_device

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

ESTIMATOR_KINDS = ("exact_ggn", "exact_hessian", "cg", "lissa")
Damping = float | str | Mapping[str, float]
_CHUNK = 256  # columns of the identity pushed through the GGN at once when building it


# --------------------------------------------------------------------------- output adapter


@runtime_checkable
class OutputTask(Protocol):
    """What the Gauss-Newton matrix and the PBRF need beyond :class:`~datasleuth.task.Task`.

    * ``output(model, batch)``: the network output z the loss is computed from (logits,
      predictions), shape (B, ...); examples must not interact.
    * ``loss_from_output(output, batch)``: L per example, (B,), with
      ``loss(model, batch) == loss_from_output(output(model, batch), batch)``.
    * ``output_divergence(output, reference, batch)``: KL(p(·|reference) ‖ p(·|output))
      per example, (B,), summed like the loss. For a matching loss (softmax +
      cross-entropy, Gaussian + squared error) its Hessian in ``output`` at
      ``output == reference`` is H_n, the Hessian of the loss (Bae et al. 2022, §3).
    """

    def output(self, model: nn.Module, batch: Any) -> Tensor: ...

    def loss_from_output(self, output: Tensor, batch: Any) -> Tensor: ...

    def output_divergence(self, output: Tensor, reference: Tensor, batch: Any) -> Tensor: ...


def _nll(logits: Tensor, targets: Tensor) -> Tensor:
    """−log softmax(logits)[target] over the last axis, (...).

    Written with ``gather`` rather than ``F.cross_entropy``: the same number, but
    ``torch.func`` batches its second derivatives about ten times faster.
    """
    return -F.log_softmax(logits, dim=-1).gather(-1, targets[..., None]).squeeze(-1)


def _softmax_kl(output: Tensor, reference: Tensor) -> Tensor:
    """KL(softmax(reference) ‖ softmax(output)) over the last axis, (...)."""
    log_ref = F.log_softmax(reference, dim=-1)
    return (log_ref.exp() * (log_ref - F.log_softmax(output, dim=-1))).sum(-1)


class _ClassificationOutputs:
    """Outputs of :class:`ClassificationTask`: logits (B, C), softmax cross-entropy."""

    def __init__(self, task: Task):
        self.task = task

    def output(self, model: nn.Module, batch: Any) -> Tensor:
        return model(batch[0])

    def loss_from_output(self, output: Tensor, batch: Any) -> Tensor:
        return _nll(output, batch[1])

    def output_divergence(self, output: Tensor, reference: Tensor, batch: Any) -> Tensor:
        return _softmax_kl(output, reference)


class _RegressionOutputs:
    """Outputs of :class:`RegressionTask`: ½‖z − y‖², Gaussian KL ½‖z − z_s‖²."""

    def __init__(self, task: Task):
        self.task = task

    def output(self, model: nn.Module, batch: Any) -> Tensor:
        return model(batch[0])

    def loss_from_output(self, output: Tensor, batch: Any) -> Tensor:
        y = batch[1].reshape(output.shape)
        return 0.5 * (output - y).pow(2).reshape(output.shape[0], -1).sum(1)

    def output_divergence(self, output: Tensor, reference: Tensor, batch: Any) -> Tensor:
        return 0.5 * (output - reference).pow(2).reshape(output.shape[0], -1).sum(1)


class _CausalLMOutputs:
    """Outputs of ``CausalLMTask``: logits (B, T, V); KL at the scored positions only."""

    def __init__(self, task: Task):
        self.task = task

    def output(self, model: nn.Module, batch: Any) -> Tensor:
        return self.task.logits(model, batch)  # type: ignore[attr-defined]

    def loss_from_output(self, output: Tensor, batch: Any) -> Tensor:
        targets = batch["labels"][:, 1:]  # HF-aligned: logits[t] predicts labels[t+1]
        scored = (targets != -100).to(output.dtype)  # (B, T-1)
        nll = _nll(output[:, :-1], targets.clamp_min(0))  # (B, T-1)
        return (nll * scored).sum(1)

    def output_divergence(self, output: Tensor, reference: Tensor, batch: Any) -> Tensor:
        scored = (batch["labels"][:, 1:] != -100).to(output.dtype)  # (B, T-1)
        kl = _softmax_kl(output[:, :-1], reference[:, :-1])  # (B, T-1)
        return (kl * scored).sum(1)


def _overrides(task: Task, base: type, *methods: str) -> bool:
    return any(getattr(type(task), m) is not getattr(base, m) for m in methods)


def output_adapter(task: Task) -> OutputTask:
    """``task`` itself if it implements :class:`OutputTask`, else a built-in adapter.

    Built-in adapters exist for :class:`ClassificationTask`, :class:`RegressionTask` and
    ``CausalLMTask`` and their subclasses that keep the base class's loss.
    """
    if isinstance(task, OutputTask):
        return task
    from datasleuth.lm.task import CausalLMTask

    for base, adapter in ((CausalLMTask, _CausalLMOutputs),
                          (ClassificationTask, _ClassificationOutputs),
                          (RegressionTask, _RegressionOutputs)):
        if isinstance(task, base):
            if _overrides(task, base, "loss", "sampled_loss") or (
                base is CausalLMTask and _overrides(task, base, "logits")
            ):
                break
            return adapter(task)
    raise DatasleuthError(
        f"{type(task).__name__} does not expose its model output; add the methods "
        "output(model, batch), loss_from_output(output, batch) and "
        "output_divergence(output, reference, batch) (see datasleuth.estimators.OutputTask)"
    )


# --------------------------------------------------------------------------- parameter space


class GradientLayout:
    """Layer gradients {name: (B, P, M+1)} <-> flat vectors (B, D), row-major per layer."""

    def __init__(self, names: Sequence[str], shapes: Sequence[tuple[int, int]]):
        self.names = list(names)
        self.shapes = [tuple(s) for s in shapes]
        sizes = [p * m for p, m in self.shapes]
        ends = [sum(sizes[: i + 1]) for i in range(len(sizes))]
        self.slices = [slice(e - s, e) for s, e in zip(sizes, ends)]
        self.dim = sum(sizes)

    def flatten(self, grads: Mapping[str, Tensor]) -> Tensor:
        """(B, D) from {name: (B, P, M+1)}, in this layout's layer order."""
        missing = [n for n in self.names if n not in grads]
        if missing:
            raise DatasleuthError(
                f"gradients of layers {missing} are missing; score with the same tracked "
                "layers the estimator was built for"
            )
        parts = [grads[n].reshape(grads[n].shape[0], -1) for n in self.names]
        return torch.cat(parts, dim=1)

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """{name: (B, P, M+1)} from (B, D)."""
        return {n: flat[:, sl].reshape(flat.shape[0], *shape)
                for n, sl, shape in zip(self.names, self.slices, self.shapes)}

    def layer_masks(self, dtype: torch.dtype, device: torch.device | str) -> Tensor:
        """(L, D) indicator of each layer's coordinates."""
        masks = torch.zeros(len(self.names), self.dim, dtype=dtype, device=device)
        for i, sl in enumerate(self.slices):
            masks[i, sl] = 1.0
        return masks

    def damping_vector(
        self, damping: Damping, reference: Curvature | None, dtype: torch.dtype,
        device: torch.device | str,
    ) -> Tensor:
        """(D,) damping λ_ℓ(i) of every coordinate (see the module docstring)."""
        if isinstance(damping, str):
            if damping != "match":
                raise DatasleuthError(f"damping must be a number, a mapping or 'match', "
                                      f"not {damping!r}")
            if reference is None:
                raise DatasleuthError("damping='match' needs the fitted curvature to match; "
                                      "pass reference=<Curvature>")
            missing = [n for n in self.names if n not in reference.layers]
            if missing:
                raise DatasleuthError(f"the reference curvature has no layers {missing}; fit "
                                      "it on the same tracked layers")
            per_layer = {n: reference.layers[n].damping for n in self.names}
        elif isinstance(damping, Mapping):
            missing = [n for n in self.names if n not in damping]
            if missing:
                raise DatasleuthError(f"damping has no value for layers {missing}; give one "
                                      "per tracked layer")
            per_layer = {n: float(damping[n]) for n in self.names}
        else:
            per_layer = {n: float(damping) for n in self.names}
        bad = {n: v for n, v in per_layer.items() if not v >= 0 or not math.isfinite(v)}
        if bad:
            raise DatasleuthError(f"damping must be finite and >= 0, got {bad}; use e.g. 1e-3")
        vec = torch.empty(self.dim, dtype=dtype, device=device)
        for n, sl in zip(self.names, self.slices):
            vec[sl] = per_layer[n]
        return vec


class _Call(nn.Module):
    """Module whose forward is ``fn(model, batch)``: lets functional_call reach any task."""

    def __init__(self, model: nn.Module, fn: Callable[[nn.Module, Any], Tensor]):
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, batch: Any) -> Tensor:
        return self.fn(self.model, batch)


def _param_name(layer: TrackedLayer, key: str) -> str:
    return f"model.{layer.name}.{key}" if layer.name else f"model.{key}"


class ParameterSpace:
    """The tracked layers' canonical parameters as one flat vector θ ∈ R^D.

    :meth:`call` evaluates ``fn(model, batch)`` with the tracked layers set from θ (and
    every other parameter held fixed, detached) through ``torch.func.functional_call``,
    so it composes with ``torch.func`` transforms and plain autograd alike.
    """

    def __init__(self, model: nn.Module, layers: Sequence[TrackedLayer]):
        self.model = model
        self.layers = list(layers)
        self.layout = GradientLayout([la.name for la in self.layers],
                                     [la.grad_shape for la in self.layers])
        self.frozen = {f"model.{n}": p.detach() for n, p in model.named_parameters()}

    @property
    def dim(self) -> int:
        return self.layout.dim

    def vector(self) -> Tensor:
        """θs: the current canonical parameters, flattened, (D,)."""
        return torch.cat([la.canonical_weight().detach().reshape(-1) for la in self.layers])

    def parameters(self, theta: Tensor) -> dict[str, Tensor]:
        """Parameter dict for functional_call: tracked layers from θ, the rest frozen."""
        params = dict(self.frozen)
        for layer, sl, shape in zip(self.layers, self.layout.slices, self.layout.shapes):
            parts = layer.weight_gradient(theta[sl].reshape(shape))  # same split as gradients
            for key, value in parts.items():
                params[_param_name(layer, key)] = value
        return params

    def call(self, fn: Callable[[nn.Module, Any], Tensor], theta: Tensor, batch: Any) -> Tensor:
        """``fn(model, batch)`` evaluated at θ for the tracked layers."""
        return functional_call(_Call(self.model, fn), self.parameters(theta), (batch,))


# --------------------------------------------------------------------------- curvature products


def _ggn_products(
    space: ParameterSpace, adapter: OutputTask, theta: Tensor, batch: Any, tangents: Tensor
) -> Tensor:
    """Σ_{n∈batch} J_nᵀ H_n J_n v for each row v of ``tangents`` (K, D) -> (K, D).

    Jv by forward mode (jvp), H(Jv) by forward-over-reverse on the loss of the output,
    Jᵀ(HJv) by reverse mode (vjp) — Schraudolph 2002; Martens 2010, §4.2.
    """
    def out_fn(th: Tensor) -> Tensor:
        return space.call(adapter.output, th, batch)

    out, pull = vjp(out_fn, theta)  # out: (B, ...)
    jv = vmap(lambda v: jvp(out_fn, (theta,), (v,))[1])(tangents)  # (K, B, ...)
    out = out.detach()
    loss_grad = grad(lambda o: adapter.loss_from_output(o, batch).sum())
    hjv = vmap(lambda u: jvp(loss_grad, (out,), (u,))[1])(jv)  # (K, B, ...)
    return vmap(pull)(hjv)[0]  # (K, D)


def _hessian_products(
    space: ParameterSpace, task: Task, theta: Tensor, batch: Any, tangents: Tensor
) -> Tensor:
    """∇²_θ Σ_{n∈batch} L_n · v for each row of ``tangents`` (K, D) -> (K, D)."""
    loss_grad = grad(lambda th: space.call(task.loss, th, batch).sum())
    return vmap(lambda v: jvp(loss_grad, (theta,), (v,))[1])(tangents)


class _Operator:
    """v ↦ (G_batches + diag(λ)) v, optionally restricted to the per-layer blocks of G."""

    def __init__(self, space: ParameterSpace, task: Task, damping: Tensor,
                 block_diagonal: bool, curvature: str = "ggn"):
        self.space = space
        self.task = task
        self.adapter = output_adapter(task) if curvature == "ggn" else None
        self.damping = damping
        self.block_diagonal = block_diagonal
        self.device = damping.device
        self.theta = space.vector().to(damping.dtype)
        self.masks = space.layout.layer_masks(damping.dtype, self.device)  # (L, D)

    def _batch(self, batch: Any, v: Tensor) -> Tensor:
        if self.adapter is None:
            return _hessian_products(self.space, self.task, self.theta, batch, v)
        return _ggn_products(self.space, self.adapter, self.theta, batch, v)

    def curvature(self, batches: Iterable[Any], v: Tensor) -> tuple[Tensor, int]:
        """(Σ_batches G_b v (K, D), number of examples); G block-diagonal if asked."""
        if self.block_diagonal:  # one product per layer, with v restricted to that layer
            k, n_layers = v.shape[0], self.masks.shape[0]
            v = (self.masks[:, None] * v[None]).reshape(n_layers * k, -1)  # (L*K, D)
        total, count = torch.zeros_like(v), 0
        for batch in batches:
            batch = to_device(batch, self.device)
            total += self._batch(batch, v)
            count += self.task.batch_size(batch)
        if self.block_diagonal:
            total = (total.reshape(self.masks.shape[0], -1, v.shape[1]) * self.masks[:, None])
            total = total.sum(0)
        return total, count

    def mean(self, batches: Iterable[Any], v: Tensor) -> Tensor:
        """(G + diag(λ)) v with G averaged over the examples of ``batches``."""
        total, count = self.curvature(batches, v)
        if count == 0:
            raise DatasleuthError("the training data yielded no examples; give a non-empty "
                                  "loader or dataset")
        return total / count + self.damping * v


@contextmanager
def _isolated(model: nn.Module) -> Iterator[None]:
    """Eval mode, and every capture context suspended, inside a with-block.

    :func:`~datasleuth.scoring.self_influence` calls ``precondition`` while its capture
    hooks are installed on the tracked layers; the estimators' own forward passes must
    not reach those hooks (they would see a layer run twice), so they run under
    :func:`~datasleuth.layers.suspend_capture`.
    """
    was_training = model.training
    model.eval()
    try:
        with suspend_capture():
            yield
    finally:
        model.train(was_training)


def _dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _check_kind(kind: str, allowed: Sequence[str]) -> None:
    if kind not in allowed:
        raise DatasleuthError(f"unknown kind {kind!r}; choose one of {', '.join(allowed)}")


# --------------------------------------------------------------------------- exact


class ExactInfluence:
    """Dense damped GGN or Hessian over all tracked parameters, solved by Cholesky.

    Build it with :meth:`fit`. ``kind="exact_ggn"`` uses G = (1/N) Σ_n J_nᵀ H_n J_n
    (METHOD.md §1, §7); ``kind="exact_hessian"`` the Hessian of the mean training loss
    (1/N) Σ_n ∇²L_n (Koh & Liang 2017, Eq. 2). The Hessian of a non-convex model is
    indefinite: ``negative`` decides what happens to its negative eigenvalues before
    damping — ``"raise"`` keeps the spectrum and refuses (G + λ) that is not positive
    definite (Koh & Liang's remedy: raise the damping), ``"clip"`` sets them to 0,
    ``"abs"`` flips their sign (the saddle-free Newton choice, Dauphin et al. 2014).

    Cost: O(D²) memory, D curvature-vector products per example (O(N·D·K) for K model
    outputs) to build the matrix, O(D³) to factor it — a reference for D up to ~10⁴.
    """

    def __init__(self, layout: GradientLayout, matrix: Tensor, damping: Tensor, kind: str,
                 block_diagonal: bool = False):
        _check_kind(kind, ("exact_ggn", "exact_hessian"))
        self.kind = kind
        self.layout = layout
        self.matrix = matrix  # (D, D), undamped, after block masking and spectrum handling
        self.damping = damping  # (D,)
        self.block_diagonal = block_diagonal
        damped = matrix + torch.diag(damping)
        self._chol, info = torch.linalg.cholesky_ex(0.5 * (damped + damped.t()))
        if int(info) != 0:
            low = float(torch.linalg.eigvalsh(damped)[0])
            raise DatasleuthError(
                f"the damped {kind[6:]} is not positive definite (smallest eigenvalue "
                f"{low:.3g}); raise the damping above {max(-low, 0):.3g} or pass "
                "negative='clip' or 'abs'"
            )

    @property
    def layer_names(self) -> list[str]:
        return list(self.layout.names)

    @classmethod
    def fit(
        cls,
        model: nn.Module,
        task: Task,
        loader: Iterable[Any],
        layers: Sequence[str] | Sequence[TrackedLayer] | None = None,
        *,
        kind: str = "exact_ggn",
        damping: Damping = 1e-3,
        reference: Curvature | None = None,
        block_diagonal: bool = False,
        negative: str = "raise",
    ) -> ExactInfluence:
        """Build the dense matrix from ``loader`` (iterated once) and factor it.

        ``layers``: tracked layers, glob patterns, or None for every supported layer;
        with ``damping="match"`` and no ``layers``, the reference curvature's layers.
        """
        _check_kind(kind, ("exact_ggn", "exact_hessian"))
        if negative not in ("raise", "clip", "abs"):
            raise DatasleuthError(f"negative must be 'raise', 'clip' or 'abs', not {negative!r}")
        space = _space(model, layers, reference)
        dtype, device = _dtype(model), next(model.parameters()).device
        lam = space.layout.damping_vector(damping, reference, dtype, device)
        op = _Operator(space, task, lam, block_diagonal,
                       "ggn" if kind == "exact_ggn" else "hessian")
        eye = torch.eye(space.dim, dtype=dtype, device=device)
        with _isolated(model):
            batches = list(loader)
            cols, count = [], 0
            for start in range(0, space.dim, _CHUNK):  # columns G e_i, chunk by chunk
                part, count = op.curvature(batches, eye[start:start + _CHUNK])
                cols.append(part)
        if count == 0:
            raise DatasleuthError("the loader yielded no examples; give a non-empty loader")
        matrix = torch.cat(cols).t().double() / count  # (D, D), float64 for the solve
        matrix = 0.5 * (matrix + matrix.t())
        if kind == "exact_hessian" and negative != "raise":
            evals, evecs = torch.linalg.eigh(matrix)
            evals = evals.clamp_min(0.0) if negative == "clip" else evals.abs()
            matrix = (evecs * evals) @ evecs.t()
        return cls(space.layout, matrix, lam.double(), kind, block_diagonal)

    def dense(self) -> Tensor:
        """The damped matrix G + diag(λ), (D, D)."""
        return self.matrix + torch.diag(self.damping)

    def precondition(self, grads: dict[str, Tensor]) -> dict[str, Tensor]:
        """(G + λI)⁻¹ applied jointly over layers to {name: (B, P, M+1)}."""
        flat = self.layout.flatten(grads)  # (B, D)
        sol = torch.cholesky_solve(flat.t().to(self._chol.dtype), self._chol).t()
        return self.layout.unflatten(sol.to(flat.dtype))

    def to(self, device: torch.device | str) -> ExactInfluence:
        return ExactInfluence(self.layout, self.matrix.to(device), self.damping.to(device),
                              self.kind, self.block_diagonal)


def _space(model: nn.Module, layers: Sequence[str] | Sequence[TrackedLayer] | None,
           reference: Curvature | None) -> ParameterSpace:
    if layers is None and reference is not None:
        from datasleuth.layers import layers_by_name

        return ParameterSpace(model, layers_by_name(model, reference.layer_names))
    return ParameterSpace(model, resolve_layers(model, layers))


# --------------------------------------------------------------------------- conjugate gradient


@dataclass
class CGInfo:
    """How the last :meth:`ConjugateGradient.precondition` call went."""

    iterations: int
    residual: Tensor  # (B,) relative residual ‖v − (G + λ)x‖ / ‖v‖, recomputed at the end
    converged: bool


class ConjugateGradient:
    """(G + λI)⁻¹v by conjugate gradient with Gauss-Newton-vector products (METHOD.md §7).

    Each iteration streams ``train`` once (it must be re-iterable: a DataLoader or a
    list of batches) and applies G to every still-unconverged query vector at once:
    Jv by ``torch.func.jvp``, then Jᵀ H (Jv) by ``torch.func.vjp`` (Schraudolph 2002).
    Stops when each query's relative residual is below ``tol`` or after ``max_iter``
    iterations; :attr:`info` reports the iterations and residuals. In exact arithmetic CG
    needs at most D iterations; convergence speed depends on the condition number
    (λ_max + λ)/λ.
    """

    kind = "cg"

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        train: Iterable[Any],
        layers: Sequence[str] | Sequence[TrackedLayer] | None = None,
        *,
        damping: Damping = 1e-3,
        reference: Curvature | None = None,
        block_diagonal: bool = False,
        tol: float = 1e-10,
        max_iter: int = 1000,
    ):
        if not tol > 0 or max_iter < 1:
            raise DatasleuthError("tol must be > 0 and max_iter >= 1; use e.g. tol=1e-10")
        self.model, self.task, self.train = model, task, train
        self.space = _space(model, layers, reference)
        self.damping, self.reference = damping, reference
        self.block_diagonal, self.tol, self.max_iter = block_diagonal, tol, max_iter
        self.info: CGInfo | None = None

    @property
    def layer_names(self) -> list[str]:
        return list(self.space.layout.names)

    def to(self, device: torch.device | str) -> ConjugateGradient:
        return self  # works wherever the model lives

    def _operator(self) -> _Operator:
        p = next(self.model.parameters())
        lam = self.space.layout.damping_vector(self.damping, self.reference, p.dtype, p.device)
        return _Operator(self.space, self.task, lam, self.block_diagonal)

    def solve(self, v: Tensor) -> Tensor:
        """x with (G + λI) x = v for each row of ``v`` (B, D)."""
        op = self._operator()
        b = v.to(op.damping.dtype)
        with _isolated(self.model):
            def apply(x: Tensor) -> Tensor:
                return op.mean(self.train, x)

            x = torch.zeros_like(b)
            r = b.clone()
            p = r.clone()
            rs = (r * r).sum(1)  # (B,)
            bnorm = b.norm(dim=1)
            active = rs.sqrt() > self.tol * bnorm
            it = 0
            while bool(active.any()) and it < self.max_iter:
                ap = torch.zeros_like(p)
                ap[active] = apply(p[active])
                alpha = torch.where(active, rs / (p * ap).sum(1).where(active, 1.0), 0.0)
                x = x + alpha[:, None] * p
                r = r - alpha[:, None] * ap
                rs_new = (r * r).sum(1)
                beta = torch.where(active, rs_new / rs.where(active, 1.0), 0.0)
                p = r + beta[:, None] * p
                rs = rs_new
                active = active & (rs.sqrt() > self.tol * bnorm)
                it += 1
            residual = (b - apply(x)).norm(dim=1) / bnorm.clamp_min(torch.finfo(b.dtype).tiny)
        self.info = CGInfo(it, residual, not bool(active.any()))
        return x.to(v.dtype)

    def precondition(self, grads: dict[str, Tensor]) -> dict[str, Tensor]:
        """(G + λI)⁻¹ applied jointly over layers to {name: (B, P, M+1)}."""
        layout = self.space.layout
        return layout.unflatten(self.solve(layout.flatten(grads)))


# --------------------------------------------------------------------------- LiSSA


@dataclass
class LiSSAInfo:
    """How the last :meth:`LiSSA.precondition` call went."""

    scale: float  # α
    depth: int
    repeats: int
    spread: Tensor  # (B,) relative standard deviation of the estimate across repeats


class LiSSA:
    """(G + λI)⁻¹v by the LiSSA recursion (Agarwal et al. 2017; Koh & Liang 2017; §7).

        r_0 = v,   r_j = v + (I − α(Ĝ_j + λI)) r_{j−1},   estimate α r_J,

    with Ĝ_j the GGN of a mini-batch of ``batch_size`` examples drawn uniformly without
    replacement (seeded), averaged over ``repeats`` independent recursions. The fixed
    point is r = (α(G + λI))⁻¹ v, so α r_J → (G + λI)⁻¹ v; the error of the undamped
    directions shrinks like (1 − αλ)^J. The recursion converges when every step is a
    contraction, α < 2/(λ_max(Ĝ) + λ); α < 1/(λ_max + λ) makes it monotone. With
    ``scale=None``, α = 1 / (2 (λ_max + λ_max(damping))) with λ_max of the full-data
    GGN from ``power_iterations`` steps of power iteration — the factor 2 leaves room for
    mini-batches whose curvature exceeds the full data's; pass a smaller ``scale`` if the
    recursion diverges. ``batch_size=None`` uses the full data at every step
    (deterministic: a truncated Neumann series).

    ``train`` is a map-style dataset or a DataLoader over one (its dataset and
    collate_fn are used).
    """

    kind = "lissa"

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        train: Any,
        layers: Sequence[str] | Sequence[TrackedLayer] | None = None,
        *,
        damping: Damping = 1e-3,
        reference: Curvature | None = None,
        block_diagonal: bool = False,
        depth: int = 1000,
        repeats: int = 1,
        batch_size: int | None = None,
        scale: float | None = None,
        seed: int = 0,
        power_iterations: int = 30,
        collate_fn: Callable[[list[Any]], Any] | None = None,
    ):
        if depth < 1 or repeats < 1 or (batch_size is not None and batch_size < 1):
            raise DatasleuthError("depth, repeats and batch_size must be >= 1; use e.g. "
                                  "depth=1000, repeats=4, batch_size=64")
        if scale is not None and not scale > 0:
            raise DatasleuthError(f"scale must be > 0, got {scale}; leave it None to choose")
        if isinstance(train, DataLoader):
            collate_fn = collate_fn or train.collate_fn
            train = train.dataset
        if not (hasattr(train, "__getitem__") and hasattr(train, "__len__")):
            raise DatasleuthError("LiSSA samples mini-batches: pass a map-style dataset (with "
                                  "__getitem__ and __len__) or a DataLoader over one")
        self.model, self.task, self.dataset = model, task, train
        self.collate = collate_fn or default_collate
        self.space = _space(model, layers, reference)
        self.damping, self.reference = damping, reference
        self.block_diagonal = block_diagonal
        self.depth, self.repeats, self.batch_size = depth, repeats, batch_size
        self.scale, self.seed, self.power_iterations = scale, seed, power_iterations
        self.info: LiSSAInfo | None = None

    @property
    def layer_names(self) -> list[str]:
        return list(self.space.layout.names)

    def to(self, device: torch.device | str) -> LiSSA:
        return self

    def _full(self) -> list[Any]:
        n = len(self.dataset)
        return [self.collate([self.dataset[i] for i in range(s, min(s + _CHUNK, n))])
                for s in range(0, n, _CHUNK)]

    def _sample(self, generator: torch.Generator) -> list[Any]:
        n = len(self.dataset)
        idx = torch.randperm(n, generator=generator)[: min(self.batch_size or n, n)]
        return [self.collate([self.dataset[int(i)] for i in idx])]

    def _largest_eigenvalue(self, op: _Operator, full: list[Any]) -> float:
        """λ_max of the full-data GGN by power iteration (a slight underestimate)."""
        g = torch.Generator().manual_seed(self.seed)
        v = torch.randn(1, self.space.dim, generator=g, dtype=op.damping.dtype).to(op.device)
        lam = 0.0
        for _ in range(self.power_iterations):
            v = v / v.norm()
            w, count = op.curvature(full, v)
            lam = float((v * w).sum()) / count
            if not lam > 0:
                break
            v = w
        return lam

    def solve(self, v: Tensor) -> Tensor:
        """Estimate of (G + λI)⁻¹ v for each row of ``v`` (B, D)."""
        p = next(self.model.parameters())
        lam = self.space.layout.damping_vector(self.damping, self.reference, p.dtype, p.device)
        op = _Operator(self.space, self.task, lam, self.block_diagonal)
        b = v.to(lam.dtype)
        with _isolated(self.model):
            full = self._full() if self.batch_size is None or self.scale is None else []
            alpha = self.scale if self.scale is not None else 1.0 / (
                2.0 * (self._largest_eigenvalue(op, full) + float(lam.max())))
            generator = torch.Generator().manual_seed(self.seed)
            estimates = []
            for _ in range(self.repeats):
                r = b.clone()
                for _ in range(self.depth):
                    batches = full if self.batch_size is None else self._sample(generator)
                    r = b + r - alpha * op.mean(batches, r)
                if not bool(torch.isfinite(r).all()):
                    raise DatasleuthError(f"LiSSA diverged with scale {alpha:.3g}; pass a "
                                          "smaller scale or a larger batch_size")
                estimates.append(alpha * r)
        est = torch.stack(estimates)  # (R, B, D)
        mean = est.mean(0)
        spread = (est.std(0, correction=0).norm(dim=1)
                  / mean.norm(dim=1).clamp_min(torch.finfo(mean.dtype).tiny))
        self.info = LiSSAInfo(alpha, self.depth, self.repeats, spread)
        return mean.to(v.dtype)

    def precondition(self, grads: dict[str, Tensor]) -> dict[str, Tensor]:
        """Estimated (G + λI)⁻¹ applied jointly over layers to {name: (B, P, M+1)}."""
        layout = self.space.layout
        return layout.unflatten(self.solve(layout.flatten(grads)))
