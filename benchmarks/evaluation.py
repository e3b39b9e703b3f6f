"""Regenerate docs/evaluation.md: how right is each influence estimator? (docs/method.md §8)

Runs the evaluation suite (``datasleuth.evaluation.suite.evaluate``) on the built-in
recipes and writes the Markdown it prints, verbatim, to ``docs/evaluation.md``, plus
plots in ``docs/img/``:

* ``digits``: LDS of every estimator (40 random 50% subsets, 1 training seed each);
* ``digits-mislabeled``: mislabel detection by self-influence vs the training loss;
* ``tiny-lm``: LDS (24 subsets × 2 seeds) and agreement with the PBRF on 30 training
  sequences.

    python benchmarks/evaluation.py            # ~8-10 minutes on 2 shared CPU cores
    python benchmarks/evaluation.py --quick    # smoke run (~2 minutes), writes nothing

Retrained measurements are cached in ``--cache-dir``; a re-run retrains nothing.
torch runs on one thread: for these tiny models more threads only add contention.
Needs matplotlib for the plots (`pip install -e ".[bench]"`).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("DATASLEUTH_PROGRESS", "0")

from datasleuth.evaluation.methods import REFINE_STEPS  # noqa: E402
from datasleuth.evaluation.suite import (  # noqa: E402
    DEFAULT_ESTIMATORS,
    detection_table,
    evaluate,
    markdown_table,
)

ROOT = Path(__file__).resolve().parent.parent
FULL = {
    "digits": {"n_subsets": 40, "seeds_per_subset": 1},
    "digits-mislabeled": {"n_subsets": 0},
    "tiny-lm": {"n_subsets": 24, "seeds_per_subset": 2, "pbrf_examples": 30},
}
QUICK = {
    "digits": {"n_subsets": 6, "seeds_per_subset": 1},
    "digits-mislabeled": {"n_subsets": 0},
    "tiny-lm": {"n_subsets": 4, "seeds_per_subset": 1, "pbrf_examples": 3},
}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} logical CPUs (shared), torch {torch.__version__} on 1 "
            f"thread, Python {platform.python_version()}, {platform.system()}")


def plot_lds(docs: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    recipes = [r for r in ("digits", "tiny-lm") if docs[r].get("retraining")]
    names = list(docs["digits"]["estimators"])
    width = 0.8 / len(recipes)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for k, recipe in enumerate(recipes):
        est = docs[recipe]["estimators"]
        means = [est[n]["lds"]["mean"] for n in names]
        stds = [est[n]["lds"]["std"] for n in names]
        ax.bar(np.arange(len(names)) + k * width, means, width, yerr=stds, capsize=2,
               label=recipe)
    ax.set_xticks(np.arange(len(names)) + width * (len(recipes) - 1) / 2, names)
    ax.set_ylabel("LDS (mean ± std over queries)")
    ax.axhline(0, color="black", lw=0.5)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_detection(doc: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    det = doc["detection"]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for name, d in det["detectors"].items():
        style = "--" if name == "train_loss" else "-"
        label = name if name == "train_loss" else f"self-influence ({name})"
        ax.plot(det["fractions"], d["found"], style, marker="o", ms=3, label=label)
    ax.plot(det["fractions"], det["random"], ":", color="gray", label="random")
    ax.set_xlabel("fraction of training set inspected")
    ax.set_ylabel("fraction of flipped labels found")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scatter(doc: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    exact = np.asarray(doc["scores"]["exact_ggn"]).reshape(-1)
    ekfac = np.asarray(doc["scores"]["ekfac"]).reshape(-1)
    pick = np.random.default_rng(0).choice(exact.size, size=min(5000, exact.size),
                                           replace=False)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.scatter(exact[pick], ekfac[pick], s=2, alpha=0.4)
    lim = np.abs(np.concatenate([exact[pick], ekfac[pick]])).max()
    ax.plot([-lim, lim], [-lim, lim], color="gray", lw=0.5)
    ax.set_xlabel("exact damped-GGN influence")
    ax.set_ylabel("EK-FAC influence")
    ax.set_title("digits: 5000 (query, train) pairs", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def retraining_line(doc: dict) -> str:
    r = doc["retraining"]
    line = (f"Retraining: {r['models']} models ({r['trained']} trained now, {r['cached']} from "
            f"the cache) in {r['seconds']:.0f} s")
    if "seed_to_subset_variance" in r:
        line += (f"; training-seed variance / subset variance of the measurements (median "
                 f"over queries): {r['seed_to_subset_variance']:.2f}")
    return line + "."


REFINE_ROWS = ("ekfac_shared_labels", "ekfac", "ekfac_refined", "ekfac_astra",
               "exact_ggn_layers", "exact_ggn")


def refine_section(docs: dict) -> list[str]:
    """Markdown: EK-FAC before/after the sampling fix, refined, against the exact blocks."""
    lines = [
        "## Beyond EK-FAC: independent labels per pass, and refinement (docs/method.md §9)",
        "",
        "`ekfac_shared_labels` is EK-FAC fitted as before issue 9 (the eigenvalue pass "
        "re-drew the factor pass's sampled labels; `FitConfig(shared_labels=True)`); "
        "`ekfac` draws independent seeded labels per pass. `ekfac_refined` starts from "
        f"EK-FAC and runs {REFINE_STEPS} steps of EK-FAC-preconditioned CG on the per-layer "
        "Gauss-Newton blocks with the full training set (`trace --refine "
        f"{REFINE_STEPS}`); `ekfac_astra` runs {REFINE_STEPS} stochastic preconditioned "
        "Richardson steps, one training batch per step, iterates averaged "
        "(`--refine-scheme richardson --refine-batches 1`). Residual: ‖v − (G + λI)x‖/‖v‖ "
        "per query on the full training set (richardson: on the fixed sample of one batch), "
        "max over queries; EK-FAC's own residual in brackets.",
        "",
        "| recipe | estimator | LDS mean | ± std | seconds | GGN-vector products per query "
        "| residual: max (EK-FAC's) |",
        "|---|---|---|---|---|---|---|",
    ]
    for recipe in ("digits", "tiny-lm"):
        est = docs[recipe]["estimators"]
        for name in REFINE_ROWS:
            if name not in est:
                continue
            e, info = est[name], est[name].get("refine") or {}
            lds = e.get("lds") or {}
            residual = (f"{info['max_residual']:.2g} ({max(info['start']):.2g})"
                        if info.get("residual") else "")
            lines.append(f"| {recipe} | {name} | {_num(lds.get('mean'))} | "
                         f"{_num(lds.get('std'))} | {e['seconds']['total']:.2f} | "
                         f"{info.get('products', '')} | {residual} |")
    lines.append("")
    for recipe in ("digits", "tiny-lm"):
        est = docs[recipe]["estimators"]
        if all("lds" in est.get(n, {}) for n in ("ekfac_refined", "exact_ggn_layers", "ekfac",
                                                  "ekfac_shared_labels")):
            gap = est["ekfac_refined"]["lds"]["mean"] - est["exact_ggn_layers"]["lds"]["mean"]
            fix = est["ekfac"]["lds"]["mean"] - est["ekfac_shared_labels"]["lds"]["mean"]
            verdict = "within" if abs(gap) <= 0.02 else "NOT within"
            lines.append(f"* {recipe}: refined EK-FAC − exact per-layer GGN blocks = "
                         f"{gap:+.3f} LDS ({verdict} the 0.02 target); the sampling fix "
                         f"changes EK-FAC's LDS by {fix:+.3f}.")
    lines += [
        "* Cost: one refinement step costs one Gauss-Newton-vector product per query on the "
        "step's batches: a `jvp` and a `vjp` per training example and per tracked layer "
        "(per-layer blocks; once for all layers with `--refine-cross-layer`). CG adds one "
        "product for its start residual (steps + 1 in all); Richardson adds one for the "
        "start and one for the final residual, and 10 products once per run for its "
        "step size (power iteration on M⁻¹(G + λI)).",
        "",
    ]
    return lines


def _num(value) -> str:
    return "" if value is None else f"{value:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny settings; writes no docs")
    ap.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "datasleuth-eval"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    settings = QUICK if args.quick else FULL
    start = time.perf_counter()
    docs = {}
    for recipe, kw in settings.items():
        estimators = ("identity", "kfac", "ekfac", "exact_ggn", "ekfac_refined") \
            if args.quick else DEFAULT_ESTIMATORS
        if recipe == "digits-mislabeled":  # refining 1000 self-influence vectors: too slow
            estimators = tuple(n for n in estimators if n not in ("ekfac_refined",
                                                                   "ekfac_astra"))
        print(f"running {recipe} ...", file=sys.stderr, flush=True)
        docs[recipe] = evaluate(recipe, estimators, cache_dir=Path(args.cache_dir) / recipe,
                                keep_scores=recipe == "digits", **kw)
    elapsed = time.perf_counter() - start
    command = "python benchmarks/evaluation.py" + (" --quick" if args.quick else "")
    d, dm, lm = docs["digits"], docs["digits-mislabeled"], docs["tiny-lm"]
    sp = d["sparsity"]
    lines = [
        "# How right is it? Evaluation of the influence estimators",
        "",
        "Generated by the command below; every number is from that run "
        "(docs/method.md §8: LDS, agreement with exact influence and the PBRF, mislabel "
        "detection, sparsity).",
        "",
        f"* Command: `{command}`",
        f"* Date: {datetime.date.today().isoformat()}",
        f"* Machine: {machine()}",
        f"* Total runtime: {elapsed:.0f} s",
        "",
        "Re-run any single recipe with `datasleuth evaluate --recipe NAME` "
        "(options `--estimators`, `--subsets`, `--seeds`, `--pbrf`, `--damping`).",
        "",
        "## digits: LDS of every estimator",
        "",
        f"Recipe: {d['recipe']['description']}. LDS over {d['config']['n_subsets']} random "
        f"50% subsets with {d['config']['seeds_per_subset']} training seed each; damping "
        "= the weight decay 0.01 for every estimator (the Hessian of the training objective "
        "is G + wd·I). Seconds: fit + score all queries against all 1000 training images.",
        "",
        markdown_table(d),
        "",
        retraining_line(d) + f" EK-FAC scores: median power-law exponent α = "
        f"{sp['median_alpha']:.2f}, the top 1% of training images hold "
        f"{sp['mean_top1_share']:.0%} of the positive influence (mean over queries).",
        "",
        "![LDS per estimator](img/eval_lds.png)",
        "",
        "![EK-FAC vs exact influence on digits](img/eval_scatter.png)",
        "",
        "## digits-mislabeled: finding flipped labels",
        "",
        f"{dm['detection']['n_corrupt']} of {dm['detection']['n']} training labels flipped. "
        "Training examples ranked by self-influence ∇Lᵀ(G + λI)⁻¹∇L (per estimator) or "
        "by their training loss; share of the flipped labels found after inspecting the "
        "top x% (Koh & Liang 2017, §5.4).",
        "",
        detection_table(dm),
        "",
        "![Detection curves](img/eval_detection.png)",
        "",
        "## tiny-lm: LDS and agreement with the PBRF",
        "",
        f"Recipe: {lm['recipe']['description']}. LDS over {lm['config']['n_subsets']} subsets "
        f"× {lm['config']['seeds_per_subset']} seeds (measurements averaged over seeds); "
        "damping 0.1 × mean eigenvalue per layer (EK-FAC's), matched by exact GGN, CG and "
        f"LiSSA. PBRF on {lm['config']['pbrf_examples']} random training sequences at the "
        "same damping (Bae et al. 2022), Pearson over queries.",
        "",
        markdown_table(lm),
        "",
        retraining_line(lm),
        "",
        *refine_section(docs),
        "## Choices",
        "",
        "* Subsets: 40 (digits) and 24 × 2 seeds (tiny-lm) keep the whole run under ten "
        "minutes on two shared cores; per-query LDS is a Spearman correlation over that "
        "many points, so differences below ~0.05 in the mean are within noise.",
        "* digits is trained to convergence with full-batch L-BFGS and weight decay, so "
        "the training seed changes the measurements far less than the subset does. The "
        "tiny LM is non-convex and trained with Adam: its training-seed noise is of the "
        "order of the subset effect (ratio above), which caps its LDS; averaging two "
        "seeds per subset helps.",
        "* `± std` is the spread of the per-query LDS over queries, not an error bar of "
        "the mean.",
    ]
    report = "\n".join(lines) + "\n"
    print(report, end="")
    if args.quick:
        return
    img = ROOT / "docs" / "img"
    img.mkdir(parents=True, exist_ok=True)
    plot_lds(docs, img / "eval_lds.png")
    plot_detection(dm, img / "eval_detection.png")
    plot_scatter(d, img / "eval_scatter.png")
    path = ROOT / "docs" / "evaluation.md"
    kept = re.search(r"<!-- fact-tracing:begin -->.*?<!-- fact-tracing:end -->\n",
                     path.read_text(), re.DOTALL) if path.is_file() else None
    path.write_text(report + ("\n" + kept.group(0) if kept else ""))  # fact_tracing.py's


if __name__ == "__main__":
    main()
