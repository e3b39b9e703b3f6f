"""Tail-patch: do a method's top training examples really raise the query? (docs/method.md §10)

TrackStar's counterfactual check (Chang et al. 2024), on the user's own model: from the
trained parameters θs, take ``steps`` optimizer steps on the top-k training examples a
method returned for a query and measure the change of the query's measurement f (for a
language model log p(completion | prompt)); compare with k random training examples
(several draws: mean ± sd) and with other methods' top-k. A method whose top-k raise f
more found examples that matter more to the model.

Decisions (each written into the result's ``config``):

* The step minimises the **mean over the k examples of each example's summed loss**
  (docs/method.md §1), in eval mode (no dropout), over every parameter that requires a
  gradient; micro-batches of ``batch_size`` examples accumulate the gradient.
* The model is patched in place and restored from a copy of its parameters after each
  patch (same result as patching a copy, without allocating one per patch), also when a
  patch fails; every patch starts from the same optimizer state.
* ``adam`` (default, β = (0.9, 0.999), ε = 1e-8) continues from second moments v
  estimated on ``warmup`` random batches of k training examples (v = mean of their
  squared gradients), the state Adam holds at the end of training — TrackStar patches
  with the training optimizer's state. Its first step is θ −= lr · g / (√v + ε): each
  parameter moves in units of its usual gradient scale. ``warmup=0`` is a fresh Adam,
  whose first step is ≈ lr · sign(g) on every parameter: parameters whose gradient is
  negligible move as far as the others, which makes the patch noisy.
* ``sgd``: one step changes f by ≈ lr · mean_m ⟨∇f, ∇log p(z_m)⟩ to first order — the
  gradient dot product of the chosen examples — so SGD tail-patch favours the dot
  product method by construction.
* Random draws are k distinct training examples, drawn per query from a seeded
  generator, the same whatever methods are compared.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from datasleuth.errors import DatasleuthError
from datasleuth.streaming import evaluation
from datasleuth.task import Task
from datasleuth.utils import to_device

__all__ = ["OPTIMIZERS", "TailPatchConfig", "summarise", "tail_patch", "tail_patch_table"]

OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class TailPatchConfig:
    """How each patch is made: ``k`` examples, ``steps`` steps of ``optimizer`` at ``lr``
    (Adam's second moments from ``warmup`` random k-example batches), ``draws`` random
    k-subsets per query (seeded by ``seed``), ``batch_size`` examples per forward/backward
    pass (module docstring)."""

    k: int = 10
    steps: int = 1
    optimizer: str = "adam"
    lr: float = 1e-4
    warmup: int = 16
    draws: int = 5
    seed: int = 0
    batch_size: int = 8

    def __post_init__(self) -> None:
        for name, least in (("k", 1), ("steps", 1), ("batch_size", 1), ("draws", 0),
                            ("warmup", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise DatasleuthError(f"tail-patch {name} must be an integer >= {least}, got "
                                      f"{value!r}")
        if self.optimizer not in OPTIMIZERS:
            raise DatasleuthError(f"tail-patch optimizer must be one of {', '.join(OPTIMIZERS)}, "
                                  f"got {self.optimizer!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise DatasleuthError(f"tail-patch learning rate must be finite and > 0, got "
                                  f"{self.lr!r}; use e.g. 1e-4")


_BETAS, _EPS = (0.9, 0.999), 1e-8


class _Patcher:
    """Patches a model in place and restores its parameters afterwards."""

    def __init__(self, model: nn.Module, task: Task, example_batch: Callable[[Sequence[int]], Any],
                 config: TailPatchConfig):
        self.model, self.task, self.example_batch, self.config = model, task, example_batch, config
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise DatasleuthError("the model has no trainable parameters to patch; set "
                                  "requires_grad on them")
        self.saved = [p.detach().clone() for p in self.params]
        self.device = self.params[0].device
        self.moments: list[Tensor] | None = None  # Adam's warm second moments v

    def warm_up(self, n_train: int, rng: np.random.Generator) -> None:
        """v = mean squared gradient of ``warmup`` random batches of k training examples."""
        c = self.config
        if c.optimizer != "adam" or c.warmup == 0:
            return
        total = [torch.zeros_like(p) for p in self.params]
        for _ in range(c.warmup):
            grads = self._gradient(rng.choice(n_train, size=min(c.k, n_train), replace=False))
            for t, g in zip(total, grads):
                t.add_(g.square())
        self.moments = [t / c.warmup for t in total]

    def _gradient(self, indices: Sequence[int]) -> list[Tensor]:
        """∇ of the mean over ``indices`` of each example's summed loss (micro-batched)."""
        for p in self.params:
            p.grad = None
        for start in range(0, len(indices), self.config.batch_size):
            chunk = [int(i) for i in indices[start : start + self.config.batch_size]]
            batch = to_device(self.example_batch(chunk), self.device)
            (self.task.loss(self.model, batch).sum() / len(indices)).backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        for p in self.params:
            p.grad = None
        return grads

    def measure(self, query: Any) -> float:
        """The query's measurement f (its batch holds one query)."""
        with torch.no_grad():
            values = self.task.measurement(self.model, to_device(query, self.device))
        return float(values.reshape(-1)[0])

    def gain(self, query: Any, indices: Sequence[int], before: float) -> float:
        """f after ``steps`` steps on the examples ``indices``, minus ``before``."""
        c = self.config
        first = [torch.zeros_like(p) for p in self.params]  # Adam's m
        second = ([v.clone() for v in self.moments] if self.moments is not None
                  else [torch.zeros_like(p) for p in self.params])  # Adam's v
        try:
            for t in range(1, c.steps + 1):
                grads = self._gradient(indices)
                with torch.no_grad():
                    for p, g, m, v in zip(self.params, grads, first, second):
                        p.sub_(self._update(t, g, m, v))
            return self.measure(query) - before
        finally:
            self.restore()

    def _update(self, t: int, g: Tensor, m: Tensor, v: Tensor) -> Tensor:
        """The step of one parameter at step ``t`` (1-based); updates m and v in place."""
        lr = self.config.lr
        if self.config.optimizer == "sgd":
            return lr * g
        (b1, b2), warm = _BETAS, self.moments is not None
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        m_hat = m / (1 - b1**t)
        v_hat = v if warm else v / (1 - b2**t)  # warm moments need no bias correction
        return lr * m_hat / (v_hat.sqrt() + _EPS)

    def restore(self) -> None:
        with torch.no_grad():
            for p, s in zip(self.params, self.saved):
                p.copy_(s)
                p.grad = None


def _stats(values: Sequence[float]) -> dict[str, Any]:
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    return {"mean": float(arr.mean()) if arr.size else None,
            "std": float(arr.std(ddof=1)) if arr.size > 1 else None, "n": int(arr.size)}


def tail_patch(
    model: nn.Module,
    task: Task,
    queries: Sequence[Any],
    rankings: Mapping[str, Sequence[Sequence[int]]],
    example_batch: Callable[[Sequence[int]], Any],
    n_train: int,
    config: TailPatchConfig | None = None,
) -> dict[str, Any]:
    """Tail-patch every query with each method's top-k and with random k (module doc).

    ``queries``: one batch per query, holding that query alone. ``rankings``: per method
    name, per query, training example indices best first (the first ``k`` are used).
    ``example_batch(indices)`` batches training examples; ``n_train`` is the number of
    training examples random draws come from. Returns a JSON-ready dict: per query the
    measurement before (``before``), each method's ``gains`` and the ``random`` gains;
    ``summary`` gives each method's mean ± sd gain over queries and the share of
    queries on which it beat the mean random gain.
    """
    config = config or TailPatchConfig()
    _check_inputs(queries, rankings, n_train, config)
    rng = np.random.default_rng(config.seed)
    patcher = _Patcher(model, task, example_batch, config)
    rows = []
    with evaluation(model):
        try:
            patcher.warm_up(n_train, np.random.default_rng([config.seed, 1]))
            for q, query in enumerate(queries):
                before = patcher.measure(query)
                gains = {name: (patcher.gain(query, [int(i) for i in lists[q][: config.k]],
                                             before) if len(lists[q]) else None)
                         for name, lists in rankings.items()}
                draws = [rng.choice(n_train, size=min(config.k, n_train), replace=False)
                         for _ in range(config.draws)]
                random = [patcher.gain(query, d.tolist(), before) for d in draws]
                rows.append({"query": q, "before": before, "gains": gains,
                             "random": {"gains": random, **_stats(random)}})
        finally:
            patcher.restore()
    return {"config": asdict(config), "n_train": int(n_train), "queries": rows,
            "summary": summarise(rows, list(rankings))}


def _check_inputs(queries: Sequence[Any], rankings: Mapping[str, Sequence[Sequence[int]]],
                  n_train: int, config: TailPatchConfig) -> None:
    if not queries:
        raise DatasleuthError("no queries to tail-patch; give at least one")
    if n_train < 1:
        raise DatasleuthError("tail-patch needs training examples to draw from; n_train is 0")
    for name, lists in rankings.items():
        if len(lists) != len(queries):
            raise DatasleuthError(f"method {name!r} ranks {len(lists)} queries but there are "
                                  f"{len(queries)}; give one ranking per query")
        for q, ranked in enumerate(lists):
            bad = [int(i) for i in list(ranked)[: config.k] if not 0 <= int(i) < n_train]
            if bad:
                raise DatasleuthError(f"method {name!r} ranks training example {bad[0]} for "
                                      f"query {q}, outside 0..{n_train - 1}; check the indices")


def summarise(rows: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Per method: mean ± sd gain over queries, and how often it beat random's mean."""
    out: dict[str, Any] = {}
    for name in names:
        gains = [r["gains"][name] for r in rows]
        wins = [g > r["random"]["mean"] for g, r in zip(gains, rows)
                if g is not None and r["random"]["mean"] is not None]
        out[name] = {**_stats(gains), "beats_random": float(np.mean(wins)) if wins else None}
    out["random"] = _stats([r["random"]["mean"] for r in rows])
    return out


def _fmt(value: Any, digits: int = 4) -> str:
    return "—" if value is None else f"{value:+.{digits}f}"


def tail_patch_table(doc: Mapping[str, Any], labels: Mapping[str, str] | None = None) -> str:
    """Method | mean gain | ± sd over queries | beats random on, as Markdown."""
    c = doc["config"]
    head = [f"top-{c['k']} of", "mean Δ f", "± sd", "beats random on"]
    lines = ["| " + " | ".join(head) + " |", "|---|---:|---:|---:|"]
    for name, s in doc["summary"].items():
        label = (labels or {}).get(name, name)
        if name == "random":
            label = f"random ({c['draws']} draws per query)"
        share = "—" if s.get("beats_random") is None else f"{s['beats_random']:.0%}"
        sd = "—" if s["std"] is None else f"{s['std']:.4f}"
        lines.append(f"| {label} | {_fmt(s['mean'])} | {sd} | "
                     f"{share if name != 'random' else ''} |")
    return "\n".join(lines)
