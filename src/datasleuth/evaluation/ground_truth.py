"""Ground truth for influence estimates on small models (docs/method.md §8).

Two references an estimator is scored against (with :func:`compare`):

* The proximal Bregman response function, PBRF (Bae et al. 2022, Eq. 14): starting
  from the trained θs, minimise over the tracked layers' parameters

      (1/N) Σ_i KL(p(·|x_i; θs) ‖ p(·|x_i; θ)) + ε L(z_m, θ) + (λ/2)‖θ − θs‖²

  and report (f(θ_ε) − f(θs)) / ε. Linearising the stationarity condition at θs gives
  (G + λI) Δθ = −ε ∇L(z_m), because the KL term has zero gradient at θs and its Hessian
  there is the Gauss-Newton matrix G (docs/method.md §1). Hence

      (f(θ_ε) − f(θs)) / ε  →  ∇fᵀ (G + λI)⁻¹ (−∇L(z_m))   as ε → 0,

  which is **exactly** datasleuth's pairwise score with damping λ (same sign: the PBRF
  *up-weights* z_m's loss, i.e. adds it; same scale: not divided by N). The PBRF is the
  quantity the damped-GGN influence estimates, for any network, not only linear ones.
* Leave-one-out retraining (Koh & Liang 2017): f(trained on all) − f(trained without
  z_i). For a mean-loss objective over N examples it is ≈ score / N.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from datasleuth.errors import DatasleuthError
from datasleuth.estimators import ParameterSpace, output_adapter
from datasleuth.evaluation.metrics import correlations, pearson, spearman
from datasleuth.layers import TrackedLayer, resolve_layers
from datasleuth.task import Task
from datasleuth.utils import to_device

__all__ = ["PBRF", "pbrf_response", "pbrf_scores", "leave_one_out", "compare"]


class PBRF:
    """The proximal Bregman response of a model to up-weighting training examples.

    Holds what every response shares: the training batches, their outputs at θs (the
    KL reference), the queries and f(θs). :meth:`response` then solves one PBRF
    problem. The problem is solved in rescaled coordinates θ = θs + ε δ with the
    objective divided by ε² (and the constant ε L(z_m, θs) removed), so that δ is O(1)
    and the optimiser's tolerances do not depend on ε.

    Args:
        model, task: the trained model and its task (the task must expose its output,
            see :class:`datasleuth.estimators.OutputTask`).
        train: the N training batches (iterated once and kept in memory).
        queries: the query batches; f is ``task.measurement``.
        layers: tracked layers (the only parameters that move); None = all supported.
        damping: λ, a number or {layer name: λ_ℓ}.
        method: ``"newton"`` (default: Newton's method with the dense D×D Hessian of the
            objective — the precise choice for the small models ground truth is for, up
            to D of a few thousand), ``"lbfgs"`` (full-batch L-BFGS, strong-Wolfe line
            search; its line search limits the precision to about the rounding of the
            objective, ~1e-16/ε², relative) or ``"adam"``.
        steps, lr: iterations and step size (1.0 for Newton and L-BFGS).
        tol: stop when the largest entry of the gradient in δ is below this.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        train: Iterable[Any],
        queries: Iterable[Any],
        layers: Sequence[str] | Sequence[TrackedLayer] | None = None,
        *,
        damping: float | Mapping[str, float] = 1e-3,
        method: str = "newton",
        steps: int = 500,
        lr: float = 1.0,
        tol: float = 1e-10,
    ):
        if method not in ("newton", "lbfgs", "adam"):
            raise DatasleuthError(f"method must be 'newton', 'lbfgs' or 'adam', not {method!r}")
        if steps < 1 or not lr > 0 or not tol > 0:
            raise DatasleuthError("steps must be >= 1 and lr, tol > 0; use e.g. steps=500, "
                                  "lr=1.0, tol=1e-10")
        self.model, self.task = model, task
        self.adapter = output_adapter(task)
        self.space = ParameterSpace(model, resolve_layers(model, layers))
        self.method, self.steps, self.lr, self.tol = method, steps, lr, tol
        p = next(model.parameters())
        self.device = p.device
        self.theta = self.space.vector()  # θs, (D,)
        self.damping = self.space.layout.damping_vector(damping, None, p.dtype, p.device)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                self.train = [to_device(b, self.device) for b in train]
                self.reference = [self.space.call(self.adapter.output, self.theta, b)
                                  for b in self.train]  # outputs at θs
                self.queries = [to_device(q, self.device) for q in queries]
                self.f0 = self._measure(self.theta)
        finally:
            model.train(was_training)
        self.n = sum(task.batch_size(b) for b in self.train)
        if self.n == 0 or not self.queries:
            raise DatasleuthError("the PBRF needs a non-empty training set and at least one "
                                  "query batch")

    def _measure(self, theta: Tensor) -> Tensor:
        """f(θ) for every query, (Q,)."""
        return torch.cat([self.space.call(self.task.measurement, theta, q).reshape(-1)
                          for q in self.queries])

    def _objective(self, delta: Tensor, weight: float, epsilon: float, example: Any,
                   loss0: Tensor) -> Tensor:
        """[PBRF objective at θs + εδ − weight·L(z_m, θs)] / ε², differentiable in δ."""
        theta = self.theta + epsilon * delta
        kl = sum(self.adapter.output_divergence(self.space.call(self.adapter.output, theta, b),
                                                ref, b).sum()
                 for b, ref in zip(self.train, self.reference))
        loss = self.space.call(self.task.loss, theta, example).sum()
        proximal = 0.5 * (self.damping * delta.square()).sum()
        return kl / (self.n * epsilon**2) + weight * (loss - loss0) / epsilon**2 + proximal

    def _solve(self, example: Any, weight: float, epsilon: float) -> Tensor:
        """θ_ε − θs for the loss weight ``weight`` (±ε)."""
        with torch.no_grad():
            loss0 = self.space.call(self.task.loss, self.theta, example).sum()
        delta = torch.zeros_like(self.theta, requires_grad=True)

        def closure() -> Tensor:
            optimizer.zero_grad()
            value = self._objective(delta, weight, epsilon, example, loss0)
            value.backward()
            return value

        if self.method == "newton":
            self._newton(delta, lambda d: self._objective(d, weight, epsilon, example, loss0))
            optimizer = torch.optim.SGD([delta], lr=0.0)  # only to clear the gradient
        elif self.method == "lbfgs":
            optimizer = torch.optim.LBFGS(
                [delta], lr=self.lr, max_iter=self.steps, max_eval=2 * self.steps,
                tolerance_grad=self.tol, tolerance_change=0.0, history_size=100,
                line_search_fn="strong_wolfe")
            optimizer.step(closure)
        else:
            optimizer = torch.optim.Adam([delta], lr=self.lr)
            for _ in range(self.steps):
                optimizer.step(closure)
        closure()
        gmax = float(delta.grad.abs().max())
        if not gmax <= max(self.tol, 1e-6):
            warnings.warn(f"the PBRF optimisation stopped with gradient {gmax:.2g}; raise "
                          "steps (or lower lr for adam) for an accurate response",
                          RuntimeWarning, stacklevel=3)
        return epsilon * delta.detach()

    def _newton(self, delta: Tensor, objective: Callable[[Tensor], Tensor]) -> None:
        """Newton's method on δ (in place) with the dense Hessian (torch.func.hessian).

        Steps are halved until the gradient norm decreases; it relies on gradients only,
        never on objective values, whose rounding (KL of nearly equal distributions
        divided by ε²) would stall a line search long before the gradient vanishes.
        """
        def gradient(d: Tensor) -> Tensor:
            return torch.func.grad(objective)(d)

        with torch.no_grad():
            d = delta.detach().clone()
            g = gradient(d)
            for _ in range(self.steps):
                if float(g.abs().max()) <= self.tol:
                    break
                h = torch.func.hessian(objective)(d)
                step = torch.linalg.lstsq(0.5 * (h + h.t()), g[:, None]).solution[:, 0]
                for _ in range(40):
                    trial = d - self.lr * step
                    g_trial = gradient(trial)
                    if g_trial.norm() < g.norm():
                        break
                    step = 0.5 * step
                else:
                    break  # no step reduces the gradient: converged to rounding
                d, g = trial, g_trial
            delta.copy_(d)

    def response(self, example: Any, epsilon: float = 1e-3, central: bool = False) -> Tensor:
        """(f(θ_ε) − f(θs)) / ε for every query, (Q,), with ``example`` up-weighted by ε.

        ``example`` is a batch; its summed loss is up-weighted (a group of examples if
        the batch holds several). ``central=True`` also solves with −ε and returns the
        central difference (f(θ_ε) − f(θ_−ε)) / 2ε, whose error is O(ε²) instead of O(ε).
        """
        if not (epsilon > 0 and math.isfinite(epsilon)):
            raise DatasleuthError(f"epsilon must be a small positive number, got {epsilon}")
        example = to_device(example, self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            up = self._measure(self.theta + self._solve(example, epsilon, epsilon))
            if not central:
                return ((up - self.f0) / epsilon).detach()
            down = self._measure(self.theta + self._solve(example, -epsilon, epsilon))
            return ((up - down) / (2 * epsilon)).detach()
        finally:
            self.model.train(was_training)


def pbrf_response(
    model: nn.Module,
    task: Task,
    train_loader: Iterable[Any],
    query_loader: Iterable[Any],
    example_batch: Any,
    *,
    epsilon: float = 1e-3,
    damping: float | Mapping[str, float] = 1e-3,
    steps: int = 500,
    lr: float = 1.0,
    layers: Sequence[str] | Sequence[TrackedLayer] | None = None,
    method: str = "newton",
    tol: float = 1e-10,
    central: bool = False,
) -> Tensor:
    """PBRF response of every query to up-weighting ``example_batch``: (Q,).

    Directly comparable to a column of :func:`~datasleuth.scoring.pairwise_scores` made
    with the exact damped GGN at the same damping (see the module docstring).
    """
    pbrf = PBRF(model, task, train_loader, query_loader, layers, damping=damping,
                method=method, steps=steps, lr=lr, tol=tol)
    return pbrf.response(example_batch, epsilon, central)


def _example_getter(train: Any, example_fn: Callable[[int], Any] | None) -> Callable[[int], Any]:
    if example_fn is not None:
        return example_fn
    if isinstance(train, DataLoader) and hasattr(train.dataset, "__getitem__"):
        return lambda i: train.collate_fn([train.dataset[i]])
    raise DatasleuthError("cannot pick training example i from this loader; pass a DataLoader "
                          "over a map-style dataset or example_fn=lambda i: <batch of example i>")


def pbrf_scores(
    model: nn.Module,
    task: Task,
    train: Iterable[Any],
    queries: Iterable[Any],
    indices: Sequence[int],
    *,
    example_fn: Callable[[int], Any] | None = None,
    epsilon: float = 1e-3,
    damping: float | Mapping[str, float] = 1e-3,
    steps: int = 500,
    lr: float = 1.0,
    layers: Sequence[str] | Sequence[TrackedLayer] | None = None,
    method: str = "newton",
    tol: float = 1e-10,
    central: bool = False,
) -> Tensor:
    """PBRF responses (Q, len(indices)), comparable to ``pairwise_scores(...).total[:, indices]``.

    Example i is ``train.dataset[i]`` collated alone (``train`` a DataLoader without
    shuffling, so i is also its column in ``pairwise_scores``) or ``example_fn(i)``.
    """
    get = _example_getter(train, example_fn)
    pbrf = PBRF(model, task, train, queries, layers, damping=damping, method=method,
                steps=steps, lr=lr, tol=tol)
    cols = [pbrf.response(get(int(i)), epsilon, central) for i in indices]
    if not cols:
        raise DatasleuthError("indices is empty; give the training examples to score")
    return torch.stack(cols, dim=1)


def leave_one_out(
    train_fn: Callable[[np.ndarray, int], Any],
    measure_fn: Callable[[Any], Any],
    n_train: int,
    indices: Sequence[int],
    *,
    seeds: int | Sequence[int] = 1,
) -> Tensor:
    """Leave-one-out retraining in datasleuth's sign convention: (Q, len(indices)).

    Entry (q, j) is f_q(trained on all) − f_q(trained without example indices[j]) — the
    effect of *adding* the example — averaged over seeds, each seed training the full
    and the reduced model alike (paired). ``train_fn(keep, seed)`` trains on the sorted
    example indices ``keep`` and returns any state; ``measure_fn(state)`` returns the Q
    measurements. For a model trained on a mean loss over N examples this is
    ≈ score / N (Koh & Liang 2017, §2.1).
    """
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list:
        raise DatasleuthError("seeds must be a positive count or a non-empty list of seeds")
    idx = [int(i) for i in indices]
    bad = [i for i in idx if not 0 <= i < n_train]
    if bad or not idx:
        raise DatasleuthError(f"indices must be non-empty and in [0, {n_train}), got bad "
                              f"{bad[:5]}; pass row numbers of the training set")
    everything = np.arange(n_train)
    total: np.ndarray | None = None
    for seed in seed_list:
        full = _measurements(measure_fn(train_fn(everything, seed)))
        cols = [full - _measurements(measure_fn(train_fn(np.delete(everything, i), seed)))
                for i in idx]
        diff = np.stack(cols, axis=1)  # (Q, len(indices))
        total = diff if total is None else total + diff
    return torch.from_numpy(total / len(seed_list))


def _measurements(value: Any) -> np.ndarray:
    if isinstance(value, Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float64).reshape(-1)


def compare(estimate: Any, truth: Any) -> dict[str, Any]:
    """Agreement of influence estimates with a ground truth, both (Q, N) or (N,).

    Returns :func:`~datasleuth.evaluation.metrics.correlations` (per-query and mean
    Pearson/Spearman) plus, over all entries: ``pearson_all``, ``spearman_all``,
    ``relative_error`` = ‖estimate − truth‖/‖truth‖, and ``scale``, the least-squares c
    in truth ≈ c · estimate (≈ 1 against the PBRF, ≈ 1/N against leave-one-out).
    """
    e = np.asarray(torch.as_tensor(estimate).detach().cpu(), dtype=np.float64)
    t = np.asarray(torch.as_tensor(truth).detach().cpu(), dtype=np.float64)
    out = correlations(e, t)
    ef, tf = e.reshape(-1), t.reshape(-1)
    tnorm, enorm = float(np.linalg.norm(tf)), float(np.dot(ef, ef))
    out.update(
        pearson_all=pearson(ef, tf),
        spearman_all=spearman(ef, tf),
        relative_error=float(np.linalg.norm(ef - tf)) / tnorm if tnorm > 0 else math.nan,
        scale=float(np.dot(ef, tf)) / enorm if enorm > 0 else math.nan,
    )
    return out
