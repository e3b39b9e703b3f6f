"""The tracked parameters as one flat vector, and curvature-vector products on it.

The reference estimators (docs/method.md §7) work on the canonical parameters
W̄ = (W b) of the tracked layers (docs/method.md §2), flattened row-major layer after
layer into θ ∈ R^D. On θ they apply the Gauss-Newton matrix

    G = (1/N) Σ_n J_nᵀ H_n J_n,   J_n = ∂ output_n / ∂θ,   H_n = ∂² L_n / ∂ output_n²

(docs/method.md §1; Schraudolph 2002; Grosse et al. 2023, Eq. 9), or the Hessian of
the loss, to vectors without forming it, jointly across layers or restricted to its
per-layer blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from datasleuth.curvature import Curvature
from datasleuth.errors import DatasleuthError, listed
from datasleuth.estimators.outputs import OutputTask, output_adapter
from datasleuth.layers import TrackedLayer, layers_by_name, resolve_layers, suspend_capture
from datasleuth.preconditioner import DEFAULT_DAMPING_SCALE, resolve_damping
from datasleuth.streaming import evaluation
from datasleuth.task import Task
from datasleuth.utils import to_device

__all__ = [
    "CHUNK",
    "CurvatureOperator",
    "GradientLayout",
    "JointPreconditioner",
    "ParameterSpace",
    "ReferenceDamping",
    "ggn_products",
    "hessian_products",
    "isolated",
]

# λ, {layer: λ_ℓ}, "match" (a fitted curvature's λ_ℓ) or None (scale × mean eigenvalue)
ReferenceDamping = float | str | Mapping[str, float] | None
CHUNK = 256  # vectors pushed through the curvature at once when building it densely


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
                f"gradients of layers {listed(missing)} are missing; score with the same tracked "
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
        self, damping: ReferenceDamping, reference: Curvature | None, dtype: torch.dtype,
        device: torch.device | str, means: Mapping[str, float] | None = None,
        scale: float = DEFAULT_DAMPING_SCALE,
    ) -> Tensor:
        """(D,) damping λ_ℓ(i) of the layer holding each coordinate (docs/method.md §3, §7).

        ``damping``: a number for every layer, a mapping {layer: λ_ℓ}, ``"match"``
        for the λ_ℓ of the fitted ``reference`` curvature, so that an exact estimate and
        EK-FAC solve the same damped system, or ``None`` for ``scale`` × the mean
        eigenvalue of each layer's block G_ℓ (``means``), EK-FAC's own rule. Each λ_ℓ
        goes through :func:`~datasleuth.preconditioner.resolve_damping`; zero is allowed
        for explicit numbers.
        """
        per_layer = self._per_layer(damping, reference)
        vec = torch.empty(self.dim, dtype=dtype, device=device)  # (D,)
        for n, sl in zip(self.names, self.slices):
            mean = None if means is None else means[n]
            vec[sl] = resolve_damping(per_layer, n, mean, scale, allow_zero=per_layer is not None)
        return vec

    def layer_means(self, diagonal: Tensor) -> dict[str, float]:
        """{layer: mean of ``diagonal`` (D,) over its coordinates}: tr(G_ℓ)/D_ℓ from diag G."""
        return {n: float(diagonal[sl].mean()) for n, sl in zip(self.names, self.slices)}

    def _per_layer(
        self, damping: ReferenceDamping, reference: Curvature | None
    ) -> float | Mapping[str, float] | None:
        """``damping`` with "match" turned into the reference's {layer: λ_ℓ}, checked."""
        if damping is None:
            return None
        if isinstance(damping, str):
            if damping != "match":
                raise DatasleuthError(f"damping must be a number, a mapping or 'match', "
                                      f"not {damping!r}")
            if reference is None:
                raise DatasleuthError("damping='match' needs the fitted curvature to match; "
                                      "pass reference=<Curvature>")
            missing = [n for n in self.names if n not in reference.layers]
            if missing:
                raise DatasleuthError(f"the reference curvature has no layers {listed(missing)}; "
                                      "fit it on the same tracked layers")
            return {n: reference.layers[n].damping for n in self.names}
        if isinstance(damping, Mapping):
            missing = [n for n in self.names if n not in damping]
            if missing:
                raise DatasleuthError(f"damping has no value for layers {listed(missing)}; give "
                                      "one per tracked layer")
        return damping


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

    @classmethod
    def resolve(
        cls, model: nn.Module, layers: Sequence[str] | Sequence[TrackedLayer] | None = None,
        reference: Curvature | None = None,
    ) -> ParameterSpace:
        """The space of ``layers`` (tracked layers, glob patterns, or None for every
        supported layer; with a ``reference`` curvature and no ``layers``, its layers)."""
        if layers is None and reference is not None:
            return cls(model, layers_by_name(model, reference.layer_names))
        return cls(model, resolve_layers(model, layers))

    @property
    def dim(self) -> int:
        return self.layout.dim

    def vector(self) -> Tensor:
        """θs: the current canonical parameters, flattened, (D,)."""
        return torch.cat([la.canonical_weight().detach().reshape(-1) for la in self.layers])

    def damping(self, damping: ReferenceDamping, reference: Curvature | None,
                means: Mapping[str, float] | None = None,
                scale: float = DEFAULT_DAMPING_SCALE) -> Tensor:
        """(D,) λ per coordinate (:meth:`GradientLayout.damping_vector`), on the model."""
        p = next(self.model.parameters())
        return self.layout.damping_vector(damping, reference, p.dtype, p.device, means, scale)

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


def ggn_products(
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


def hessian_products(
    space: ParameterSpace, task: Task, theta: Tensor, batch: Any, tangents: Tensor
) -> Tensor:
    """∇²_θ Σ_{n∈batch} L_n · v for each row of ``tangents`` (K, D) -> (K, D)."""
    loss_grad = grad(lambda th: space.call(task.loss, th, batch).sum())
    return vmap(lambda v: jvp(loss_grad, (theta,), (v,))[1])(tangents)


class CurvatureOperator:
    """v ↦ (G_batches + diag(λ)) v, optionally restricted to the per-layer blocks of G.

    ``curvature``: ``"ggn"`` (needs the task's outputs, :func:`output_adapter`) or
    ``"hessian"``; ``block_diagonal`` keeps only the blocks G_ℓ, the structure EK-FAC
    approximates (docs/method.md §3).
    """

    def __init__(self, space: ParameterSpace, task: Task, damping: Tensor,
                 block_diagonal: bool, curvature: str = "ggn"):
        self.space = space
        self.task = task
        self.adapter = output_adapter(task) if curvature == "ggn" else None
        self.damping = damping  # (D,)
        self.block_diagonal = block_diagonal
        self.device = damping.device
        self.theta = space.vector().to(damping.dtype)  # (D,)
        self.masks = space.layout.layer_masks(damping.dtype, self.device)  # (L, D)

    def _batch(self, batch: Any, v: Tensor) -> Tensor:
        if self.adapter is None:
            return hessian_products(self.space, self.task, self.theta, batch, v)
        return ggn_products(self.space, self.adapter, self.theta, batch, v)

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
            total = total.sum(0)  # (K, D)
        return total, count

    def dense(self, batches: Sequence[Any]) -> tuple[Tensor, int]:
        """(Σ_batches G_b (D, D), number of examples): G e_i for all i, CHUNK at a time."""
        dim, dtype = self.space.dim, self.damping.dtype
        eye = torch.eye(dim, dtype=dtype, device=self.device)  # (D, D)
        rows, count = [], 0
        for start in range(0, dim, CHUNK):
            part, count = self.curvature(batches, eye[start:start + CHUNK])  # (K, D)
            rows.append(part)
        return torch.cat(rows).t(), count

    def layer_means(self, batches: Iterable[Any], probes: int = 32, seed: int = 0
                    ) -> dict[str, float]:
        """{layer: tr(G_ℓ)/D_ℓ}, estimated as E[zᵀG_ℓz]/D_ℓ over ``probes`` seeded
        Rademacher vectors z (Hutchinson 1989): one pass over ``batches``."""
        g = torch.Generator().manual_seed(seed)
        z = (torch.randint(0, 2, (probes, self.space.dim), generator=g) * 2 - 1).to(
            self.damping)  # (K, D)
        gz, count = self.curvature(batches, z)
        if count == 0:
            raise DatasleuthError("the training data yielded no examples; give a non-empty "
                                  "loader or dataset")
        return self.space.layout.layer_means((z * gz).mean(0) / count)

    def mean(self, batches: Iterable[Any], v: Tensor) -> Tensor:
        """(G + diag(λ)) v with G averaged over the examples of ``batches``."""
        total, count = self.curvature(batches, v)
        if count == 0:
            raise DatasleuthError("the training data yielded no examples; give a non-empty "
                                  "loader or dataset")
        return total / count + self.damping * v


@contextmanager
def isolated(model: nn.Module) -> Iterator[None]:
    """Eval mode, and every capture context suspended, inside a with-block.

    :func:`~datasleuth.scoring.self_influence` calls ``precondition`` while its capture
    hooks are installed on the tracked layers; the estimators' own forward passes must
    not reach those hooks (they would see a layer run twice). Attention runs its plain
    math kernel: the fused ones (flash, memory-efficient) have no forward-mode derivative,
    which Gauss-Newton-vector products need.
    """
    with evaluation(model), suspend_capture(), sdpa_kernel([SDPBackend.MATH]):
        yield


class JointPreconditioner:
    """Base of the estimators: a solve of (G + λI) x = v on θ, applied to layer gradients.

    A :class:`~datasleuth.preconditioner.Preconditioner` that is joint across layers:
    subclasses set ``kind`` and ``layout`` and implement :meth:`solve` and ``to``.
    """

    kind: str
    layout: GradientLayout

    @property
    def layer_names(self) -> list[str]:
        return list(self.layout.names)

    def solve(self, v: Tensor) -> Tensor:
        """x with (G + λI) x = v for each row of ``v`` (B, D)."""
        raise NotImplementedError

    def precondition(self, grads: dict[str, Tensor]) -> dict[str, Tensor]:
        """(G + λI)⁻¹ applied jointly over layers to {name: (B, P, M+1)}."""
        return self.layout.unflatten(self.solve(self.layout.flatten(grads)))
