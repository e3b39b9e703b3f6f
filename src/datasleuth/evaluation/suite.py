"""The evaluation suite: every estimator on one recipe, scored by LDS and more (docs/method.md §8).

:func:`evaluate` fits each estimator on the recipe's trained model, scores every query
against every training example, and reports per estimator

* the LDS (Park et al. 2023) against models retrained on random subsets — retraining
  goes through :func:`~datasleuth.evaluation.lds.run_lds_experiments` and its cache, so a
  re-run with the same ``cache_dir`` retrains nothing;
* the time to fit it and to compute the scores;
* agreement with the exact damped-GGN influence (Pearson / Spearman per query, when
  ``exact_ggn`` is among the estimators) and with the PBRF on a few training examples
  (``pbrf_examples > 0``; Bae et al. 2022);
* for recipes with corrupted labels, mislabel detection by self-influence against the
  training-loss baseline (Koh & Liang 2017, §5.4);
* the sparsity of the EK-FAC scores (power-law tail, top-1% share);
* recall@k / MRR of known teaching examples and tail-patch (docs/method.md §10, retrieval.py).

Baselines (``cosine``, ``repsim``, ``bm25``; methods.py) give scores without a
preconditioner and take part in every section that needs only scores.

Each estimator is one entry of :data:`ESTIMATORS`: a name and a function that builds a
:class:`~datasleuth.scoring.Preconditioner`. Damping: ``damping=None`` keeps each
curvature's default (0.1 × mean eigenvalue per layer) and gives the reference
estimators (exact GGN, CG, LiSSA) the same per-layer damping as EK-FAC, so that they
solve the same damped system; a number sets that absolute damping for all of them.
"""

from __future__ import annotations

import math
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datasleuth.curvature import Curvature
from datasleuth.errors import DatasleuthError
from datasleuth.evaluation.lds import lds, run_lds_experiments
from datasleuth.evaluation.methods import (
    BASELINES,
    DEFAULT_ESTIMATORS,
    ESTIMATORS,
    EstimatorSpec,
    _Context,
)
from datasleuth.evaluation.metrics import compare_detectors, correlations
from datasleuth.evaluation.recipes import Problem, Recipe, load_recipe
from datasleuth.evaluation.retrieval import retrieval_section, tail_patch_section
from datasleuth.evaluation.sparsity import sparsity_report
from datasleuth.evaluation.tail_patch import TailPatchConfig
from datasleuth.fitting import resolve_layers
from datasleuth.layers import TrackedLayer
from datasleuth.scoring import Preconditioner, pairwise_scores, self_influence
from datasleuth.storage import write_json

__all__ = [
    "ESTIMATORS",
    "DEFAULT_ESTIMATORS",
    "EstimatorSpec",
    "evaluate",
    "parse_estimators",
    "markdown_table",
    "detection_table",
]

FORMAT = "datasleuth.evaluate.v1"


def parse_estimators(names: str | Iterable[str]) -> list[str]:
    """Validate estimator/baseline names (a list or a comma string), keeping their order."""
    items = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    items = [n for n in items if n]
    unknown = [n for n in items if n not in ESTIMATORS and n not in BASELINES]
    if unknown or not items:
        raise DatasleuthError(
            f"unknown estimator(s) {', '.join(map(repr, unknown)) or '(none given)'}; choose "
            f"from {', '.join([*ESTIMATORS, *BASELINES])}"
        )
    return list(dict.fromkeys(items))


def _finite_stats(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return math.nan, math.nan
    return float(finite.mean()), float(finite.std())


def _clean(obj: Any) -> Any:
    """JSON-ready copy: numpy to Python, non-finite floats to None."""
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if math.isfinite(value) else None
    return obj


def _dampings(precond: Preconditioner, ctx: _Context) -> dict[str, float] | float | None:
    if isinstance(precond, Curvature):
        if precond.kind == "identity":
            return None
        return {name: lc.damping for name, lc in precond.layers.items()}
    if ctx.damping is not None:
        return ctx.damping
    return {name: lc.damping for name, lc in ctx.reference().layers.items()}


def _train_losses(problem: Problem) -> np.ndarray:
    """Training loss of every example under the trained model: the detection baseline."""
    model = problem.model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            losses = [problem.task.loss(model, b).reshape(-1).double().cpu()
                      for b in problem.loader("train")]
    finally:
        model.train(was_training)
    return torch.cat(losses).numpy()


def _pbrf(problem: Problem, layers: list[TrackedLayer], damping: Any, n_examples: int,
          seed: int, method: str) -> tuple[np.ndarray, np.ndarray, float, list[str]]:
    """PBRF responses (Q, n) for ``n_examples`` random training examples, and the
    optimiser's warnings (kept in the results rather than printed)."""
    from datasleuth.evaluation.ground_truth import pbrf_scores

    rng = np.random.default_rng(seed)
    n = problem.n_train
    indices = np.sort(rng.choice(n, size=min(n_examples, n), replace=False))
    collate = problem.collate or torch.utils.data.default_collate
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        truth = pbrf_scores(problem.model, problem.task, problem.loader("train"),
                            problem.loader("queries"), indices.tolist(),
                            example_fn=lambda i: collate([problem.train[i]]),
                            damping=damping, layers=layers, method=method)
    notes = sorted({str(w.message) for w in caught})
    return indices, truth.double().cpu().numpy(), time.perf_counter() - start, notes


def evaluate(
    recipe: str | Recipe,
    estimators: str | Sequence[str] = DEFAULT_ESTIMATORS,
    *,
    n_subsets: int = 32,
    seeds_per_subset: int = 1,
    fraction: float = 0.5,
    cache_dir: str | Path | None = None,
    damping: float | None = None,
    pbrf_examples: int = 0,
    pbrf_method: str = "lbfgs",
    detection: bool = True,
    seed: int = 0,
    keep_scores: bool = False,
    tail_patch: TailPatchConfig | None = None,
    out: str | Path | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Evaluate influence estimators on ``recipe`` (a :class:`Recipe`, built-in name or file).

    ``n_subsets`` random ``fraction``-subsets, each retrained ``seeds_per_subset`` times,
    give the LDS (``n_subsets=0`` skips retraining and the LDS). ``cache_dir`` keeps the
    retrained measurements (default: a temporary folder, i.e. no reuse).
    ``pbrf_examples`` training examples get PBRF ground truth (0 = none). ``detection``
    runs self-influence mislabel detection when the recipe marks corrupted examples.
    ``keep_scores`` adds every estimator's (Q, N) scores under ``"scores"`` (large).
    ``tail_patch`` tail-patches every method's top-k per query (docs/method.md §10).
    Returns a JSON-serialisable dict; with ``out`` it is also written atomically to
    ``out/results.json``.
    """
    names = parse_estimators(estimators)
    _check_settings(n_subsets, damping)
    say = log or (lambda message: None)
    recipe = load_recipe(recipe)
    say(f"building recipe {recipe.name!r}")
    problem = recipe.problem()
    ctx = _Context(problem, resolve_layers(problem.model, problem.layers),
                   damping if damping is not None else problem.damping)
    run = _fit_and_score(ctx, names, say)
    n_queries = next(iter(run.scores.values())).shape[0]
    retraining = None
    if n_subsets:
        retraining = _lds_section(run, recipe, problem.n_train, n_queries, say,
                                  n_subsets=n_subsets, seeds_per_subset=seeds_per_subset,
                                  fraction=fraction, cache_dir=cache_dir, seed=seed,
                                  progress=progress)
    _vs_exact(run)
    pbrf = _pbrf_section(run, ctx, pbrf_examples, seed, pbrf_method, say)
    detect = _detection_section(run, problem, say) if detection else None
    patch = tail_patch_section(problem, run.scores, tail_patch) if tail_patch else None
    doc = _clean({
        "format": FORMAT,
        "recipe": {"name": recipe.name, "description": recipe.description,
                   "fingerprint": recipe.fingerprint, "n_train": problem.n_train,
                   "n_queries": n_queries, "layers": [la.name for la in ctx.layers]},
        "config": {"estimators": names, "n_subsets": n_subsets,
                   "seeds_per_subset": seeds_per_subset, "fraction": fraction,
                   "damping": damping, "pbrf_examples": pbrf_examples, "seed": seed,
                   "tail_patch": asdict(tail_patch) if tail_patch else None},
        "estimators": run.results,
        "retraining": retraining,
        "pbrf": pbrf,
        "detection": detect,
        "sparsity": _sparsity_section(run.scores),
        "retrieval": retrieval_section(problem, run.scores),
        "tail_patch": patch,
        **({"scores": run.scores} if keep_scores else {}),
    })
    if out is not None:
        write_json(Path(out) / "results.json", doc)
    return doc


def _check_settings(n_subsets: int, damping: float | None) -> None:
    if n_subsets != 0 and n_subsets < 2:
        raise DatasleuthError(f"n_subsets={n_subsets}: use 0 (no LDS) or at least 2; "
                              "30-100 are typical")
    if damping is not None and not damping > 0:
        raise DatasleuthError(f"damping must be > 0, got {damping}; or leave it unset")


@dataclass
class _Run:
    """Each estimator's fitted preconditioner, (Q, N) scores and result entry."""

    names: list[str]
    results: dict[str, dict[str, Any]]
    scores: dict[str, np.ndarray]
    preconditioners: dict[str, Preconditioner]


def _fit_and_score(ctx: _Context, names: list[str], say: Callable[[str], None]) -> _Run:
    """Fit every estimator and score every query against every training example."""
    problem = ctx.problem
    run = _Run(names, {}, {}, {})
    for name in names:
        say(f"estimator {name}: fitting and scoring")
        options = dict(problem.estimator_options.get(name, {}))
        start = time.perf_counter()
        if name in BASELINES:
            run.scores[name], run.results[name] = BASELINES[name].run(problem, ctx.layers)
            continue
        precond = ESTIMATORS[name].make(ctx, options)
        fitted = time.perf_counter()
        total = pairwise_scores(problem.model, problem.task, precond, problem.loader("queries"),
                                problem.loader("train"), progress=False).total
        done = time.perf_counter()
        run.scores[name] = total.double().cpu().numpy()  # (Q, N)
        run.preconditioners[name] = precond
        run.results[name] = {
            "description": ESTIMATORS[name].description,
            "seconds": {"fit": fitted - start, "score": done - fitted, "total": done - start},
            "damping": _dampings(precond, ctx),
        }
        info = getattr(precond, "info", None)
        if hasattr(info, "summary"):  # refined EK-FAC: products and residuals per query
            run.results[name]["refine"] = info.summary()
        elif isinstance(getattr(info, "residual", None), torch.Tensor):  # CG, LiSSA
            run.results[name]["max_residual"] = float(info.residual.max())
    return run


def _lds_section(
    run: _Run, recipe: Recipe, n_train: int, n_queries: int, say: Callable[[str], None], *,
    n_subsets: int, seeds_per_subset: int, fraction: float, cache_dir: str | Path | None,
    seed: int, progress: bool,
) -> dict[str, Any]:
    """Retrain on random subsets (cached), add each estimator's LDS; the retraining record."""
    calls = [0]

    def train(indices: np.ndarray, train_seed: int) -> Any:
        calls[0] += 1
        return recipe.train(indices, train_seed)

    say(f"LDS: {n_subsets} subsets x {seeds_per_subset} seed(s) of retraining")
    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        subsets, outputs = run_lds_experiments(
            train, recipe.measure, n_train, n_subsets=n_subsets,
            seeds_per_subset=seeds_per_subset, fraction=fraction,
            cache_dir=cache_dir if cache_dir is not None else scratch, seed=seed,
            fingerprint=recipe.fingerprint, progress=progress)
        seconds = time.perf_counter() - start
    if outputs.shape[-1] != n_queries:
        raise DatasleuthError(
            f"recipe {recipe.name!r}: measure() returned {outputs.shape[-1]} values but the "
            f"task scored {n_queries} queries; measure the same queries in the same order"
        )
    models = n_subsets * seeds_per_subset
    retraining = {"models": models, "trained": calls[0], "cached": models - calls[0],
                  "seconds": seconds, "output_mean": float(outputs.mean())}
    if seeds_per_subset > 1:
        seed_var = outputs.var(axis=1, ddof=1).mean(0)  # (Q,) within-subset
        subset_var = outputs.mean(axis=1).var(axis=0, ddof=1)  # (Q,) across subsets
        retraining["seed_to_subset_variance"] = float(np.median(
            seed_var / np.maximum(subset_var, 1e-300)))
    for name in run.names:
        result = lds(run.scores[name], subsets, outputs)
        mean, std = _finite_stats(result.per_query)
        run.results[name]["lds"] = {"mean": mean, "std": std,
                                    "per_query": result.per_query.tolist()}
    return retraining


def _vs_exact(run: _Run) -> None:
    """Each estimator's agreement with exact damped-GGN influence, when it was run."""
    if "exact_ggn" not in run.scores:
        return
    for name in run.names:
        agreement = correlations(run.scores[name], run.scores["exact_ggn"])
        run.results[name]["vs_exact"] = {k: agreement[k] for k in (
            "mean_pearson", "mean_spearman", "pearson", "spearman")}


def _pbrf_section(run: _Run, ctx: _Context, n_examples: int, seed: int, method: str,
                  say: Callable[[str], None]) -> dict[str, Any] | None:
    """PBRF ground truth on a few training examples and each estimator's agreement.

    ``None`` for ``n_examples <= 0`` (no ground truth asked for).
    """
    from datasleuth.evaluation.ground_truth import compare

    if n_examples <= 0:
        return None
    say(f"PBRF ground truth on {n_examples} training examples ({method})")
    ref_damping = (ctx.damping if ctx.damping is not None
                   else {n: lc.damping for n, lc in ctx.reference().layers.items()})
    indices, truth, seconds, notes = _pbrf(ctx.problem, ctx.layers, ref_damping, n_examples,
                                           seed, method)
    for name in run.names:
        agreement = compare(run.scores[name][:, indices], truth)
        run.results[name]["vs_pbrf"] = {k: agreement[k] for k in (
            "mean_pearson", "mean_spearman", "pearson_all", "spearman_all", "scale")}
    return {"indices": indices.tolist(), "seconds": seconds, "method": method,
            "optimiser_warnings": notes}


def _detection_section(run: _Run, problem: Problem, say: Callable[[str], None]
                       ) -> dict[str, Any] | None:
    """Mislabel detection by each estimator's self-influence against the training loss.

    ``None`` when the recipe marks no corrupted examples.
    """
    if problem.is_corrupt is None:
        return None
    say("mislabel detection: self-influence of every training example")
    suspicion = {}
    for name in run.preconditioners:  # baselines have no self-influence
        start = time.perf_counter()
        suspicion[name] = self_influence(problem.model, problem.task, run.preconditioners[name],
                                         problem.loader("train"), progress=False
                                         ).total.double().cpu().numpy()
        run.results[name]["seconds"]["self_influence"] = time.perf_counter() - start
    suspicion["train_loss"] = _train_losses(problem)
    return compare_detectors(suspicion, problem.is_corrupt)


def _sparsity_section(scores: dict[str, np.ndarray]) -> dict[str, Any] | None:
    """Heavy-tail summary of the EK-FAC scores (power-law alpha, top-1% share)."""
    if "ekfac" not in scores:
        return None
    per_query = sparsity_report(scores["ekfac"])["per_query"]
    alphas = [r["power_law"]["alpha"] for r in per_query if r.get("power_law")]
    shares = [r["top_share"].get("0.01") for r in per_query]
    return {
        "median_alpha": float(np.median(alphas)) if alphas else math.nan,
        "mean_top1_share": float(np.nanmean([s if s is not None else math.nan
                                             for s in shares])),
        "per_query": per_query,
    }


def _fmt(value: Any, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def markdown_table(doc: Mapping[str, Any]) -> str:
    """Estimator | LDS mean | ± std | seconds | Pearson vs exact (| vs PBRF), as Markdown."""
    with_pbrf = doc.get("pbrf") is not None
    head = ["estimator", "LDS mean", "± std", "seconds", "Pearson vs exact"]
    head += ["Pearson vs PBRF"] if with_pbrf else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in doc["estimators"].items():
        lds_part = r.get("lds") or {}
        row = [name, _fmt(lds_part.get("mean")), _fmt(lds_part.get("std")),
               _fmt(r["seconds"]["total"], 2),
               _fmt((r.get("vs_exact") or {}).get("mean_pearson"))]
        if with_pbrf:
            row.append(_fmt((r.get("vs_pbrf") or {}).get("mean_pearson")))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def detection_table(doc: Mapping[str, Any]) -> str:
    """Mislabel detection: AUC and share found after inspecting the top x%, as Markdown."""
    det = doc.get("detection")
    if not det:
        return ""
    fractions = det["fractions"]
    head = ["score", "AUC"] + [f"found @ {f:.0%}" for f in fractions]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, d in det["detectors"].items():
        label = name if name == "train_loss" else f"self-influence ({name})"
        lines.append("| " + " | ".join([label, _fmt(d["auc"])]
                                       + [_fmt(v, 2) for v in d["found"]]) + " |")
    lines.append("| " + " | ".join(["random", "0.500"] + [_fmt(v, 2) for v in det["random"]])
                 + " |")
    return "\n".join(lines)
