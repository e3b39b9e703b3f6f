"""Tail-patch (docs/method.md §10) on toy models in float64."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import lm_batch, tiny_gpt2

from datasleuth import ClassificationTask
from datasleuth.cli import main
from datasleuth.errors import DatasleuthError
from datasleuth.evaluation.tail_patch import TailPatchConfig, tail_patch, tail_patch_table
from datasleuth.lm.task import CausalLMTask
from datasleuth.report import load_results

PROMPT, COMPLETION = [1, 4, 2], [7, 9, 3]


def _lm_world():
    """A tiny GPT-2, 12 random training sequences of which number 5 is the query's text."""
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 11, (int(torch.randint(4, 9, (1,), generator=g)),),
                          generator=g).tolist() for _ in range(12)]
    rows[5] = PROMPT + COMPLETION
    query = lm_batch([PROMPT + COMPLETION])
    query["labels"][0, : len(PROMPT)] = -100  # f = log p(completion | prompt)
    return tiny_gpt2(), rows, query


def test_patching_on_the_query_text_beats_random_examples():
    model, rows, query = _lm_world()
    before = [p.detach().clone() for p in model.parameters()]
    doc = tail_patch(model, CausalLMTask(), [query], {"oracle": [[5]]},
                     lambda idx: lm_batch([rows[i] for i in idx]), len(rows),
                     TailPatchConfig(k=1, lr=1e-3, draws=8, seed=3))
    row = doc["queries"][0]
    assert row["gains"]["oracle"] > 0
    assert row["gains"]["oracle"] > 1.5 * max(row["random"]["gains"])
    assert doc["summary"]["oracle"]["beats_random"] == 1.0
    # the model is restored exactly, and no gradient is left behind
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b) and p.grad is None
    # seeded: the same draws and gains again
    again = tail_patch(model, CausalLMTask(), [query], {"oracle": [[5]]},
                       lambda idx: lm_batch([rows[i] for i in idx]), len(rows),
                       TailPatchConfig(k=1, lr=1e-3, draws=8, seed=3))
    assert again["queries"] == doc["queries"]
    assert "random (8 draws per query)" in tail_patch_table(doc)


def test_one_sgd_step_changes_f_by_lr_times_the_mean_gradient_dot_product():
    model, rows, query = _lm_world()
    task, picked, lr = CausalLMTask(), [2, 7, 9], 1e-7
    params = list(model.parameters())
    grad_f = torch.autograd.grad(task.measurement(model, query).sum(), params)
    dots = []
    for i in picked:  # ⟨∇f, ∇log p(z_m)⟩ over every parameter, one example at a time
        grad_logp = torch.autograd.grad(-task.loss(model, lm_batch([rows[i]])).sum(), params)
        dots.append(sum((a * b).sum() for a, b in zip(grad_f, grad_logp)))
    want = lr * float(torch.stack(dots).mean())
    for batch_size in (1, 2, 3):  # micro-batching must not change the step
        doc = tail_patch(model, task, [query], {"m": [picked]},
                         lambda idx: lm_batch([rows[i] for i in idx], pad=10), len(rows),
                         TailPatchConfig(k=3, optimizer="sgd", lr=lr, draws=0,
                                         batch_size=batch_size))
        assert doc["queries"][0]["gains"]["m"] == pytest.approx(want, rel=1e-4)


def test_warm_adam_steps_each_parameter_by_lr_over_its_gradient_scale():
    model, rows, query = _lm_world()
    task, lr, train = CausalLMTask(), 1e-7, rows[:3]
    params = list(model.parameters())
    grad_f = torch.autograd.grad(task.measurement(model, query).sum(), params)
    grad_loss = torch.autograd.grad(task.loss(model, lm_batch(train, pad=10)).sum() / 3, params)
    # every warm-up batch is the whole training set, so v = g² and the step is
    # lr · g / (√(0.999 g² + 0.001 g²) + ε) = lr · g / (|g| + ε)
    want = -lr * sum((f * g / (g.abs() + 1e-8)).sum() for f, g in zip(grad_f, grad_loss))
    doc = tail_patch(model, task, [query], {"all": [[0, 1, 2]]},
                     lambda idx: lm_batch([train[i] for i in idx], pad=10), 3,
                     TailPatchConfig(k=3, lr=lr, warmup=4, draws=0))
    assert doc["queries"][0]["gains"]["all"] == pytest.approx(float(want), rel=1e-4)


def test_generic_task_and_several_methods(mlp_data):
    model, x, y = mlp_data
    queries = [(x[i : i + 1], y[i : i + 1]) for i in range(3)]
    rankings = {"self": [[0], [1], [2]], "empty": [[], [4], [5]]}
    doc = tail_patch(model, ClassificationTask(), queries, rankings,
                     lambda idx: (x[list(idx)], y[list(idx)]), len(x),
                     TailPatchConfig(k=1, steps=2, lr=1e-2, draws=3))
    assert [r["query"] for r in doc["queries"]] == [0, 1, 2]
    assert doc["queries"][0]["gains"]["empty"] is None
    assert all(r["gains"]["self"] > 0 for r in doc["queries"])  # training on x raises p(y|x)
    assert doc["summary"]["empty"]["n"] == 2 and len(doc["queries"][1]["random"]["gains"]) == 3


@pytest.mark.parametrize("kwargs, fragment", [
    ({"k": 0}, "k must be an integer >= 1"),
    ({"optimizer": "lbfgs"}, "optimizer must be one of adam, sgd"),
    ({"lr": float("nan")}, "learning rate must be finite"),
    ({"draws": -1}, "draws must be an integer >= 0"),
    ({"warmup": 1.5}, "warmup must be an integer >= 0"),
])
def test_bad_settings_are_one_line_errors(kwargs, fragment):
    with pytest.raises(DatasleuthError, match=fragment):
        TailPatchConfig(**kwargs)


def test_rankings_must_fit_the_data(mlp_data):
    model, x, y = mlp_data
    queries = [(x[:1], y[:1])]
    batch = lambda idx: (x[list(idx)], y[list(idx)])  # noqa: E731
    with pytest.raises(DatasleuthError, match="outside 0..22"):
        tail_patch(model, ClassificationTask(), queries, {"m": [[99]]}, batch, len(x))
    with pytest.raises(DatasleuthError, match="ranks 2 queries but there are 1"):
        tail_patch(model, ClassificationTask(), queries, {"m": [[0], [1]]}, batch, len(x))


# ------------------------------------------------------------ `datasleuth evaluate --tail-patch`


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    """A tiny demo world traced with EK-FAC and with the dot product."""
    from datasleuth.demo import TINY_CONFIG, build_demo_world

    root = tmp_path_factory.mktemp("tailpatch")
    w = build_demo_world(root / "world", config=TINY_CONFIG, progress=False)
    common = ["--model", str(w.model_dir), "--corpus", str(w.corpus_path), "--queries",
              str(w.queries_path), "--seq-len", "32", "--top-k", "3", "--bottom-k", "0",
              "--workdir", str(root / "work"), "--no-progress"]
    for method in ("ekfac", "dot"):
        assert main(["trace", *common, "--method", method, "--out", str(root / method)]) == 0
    return root, w


def test_cli_tail_patches_traces_beside_random_bm25_and_repsim(traced, capsys):
    root, w = traced
    out = root / "patched"
    # model, corpus, workdir and packing come from the trace's config.resolved.json
    code = main(["evaluate", "--tail-patch", str(root / "ekfac" / "results.json"),
                 "--tail-patch", str(root / "dot" / "results.json"), "--tail-k", "3",
                 "--tail-draws", "2", "--tail-warmup", "2", "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    doc = json.loads((out / "tail_patch.json").read_text())
    assert doc["methods"] == ["ekfac", "dot", "bm25", "repsim"]
    assert doc["config"]["k"] == 3 and len(doc["queries"]) == 1
    assert all(np.isfinite(g) for g in doc["queries"][0]["gains"].values())
    merged = load_results(out / "results.json")  # the trace's results, still valid
    rows = merged["queries"][0]["tail_patch"]["rows"]
    assert [r["method"] for r in rows] == ["ekfac", "dot", "bm25", "repsim", "random"]
    assert rows[-1]["draws"] == 2
    html = (out / "report.html").read_text()
    assert "Tail-patch" in html and "repsim" in html
    assert "| random (2 draws per query) |" in printed


def test_cli_tail_patch_refuses_another_packing(traced, capsys):
    root, w = traced
    code = main(["evaluate", "--tail-patch", str(root / "ekfac" / "results.json"),
                 "--seq-len", "48", "--workdir", str(root / "other"), "--no-progress"])
    assert code == 2
    assert "another corpus or packing" in capsys.readouterr().err


# --------------------------------------------------------------------- the report's table


def _patched_results() -> dict:
    from test_report import EVIL, _results

    doc = _results()
    doc["queries"][0]["tail_patch"] = {
        "k": 3, "steps": 1, "optimizer": "adam", "lr": 1e-4, "before": -2.5,
        "rows": [{"method": "ekfac", "gain": 0.25, "std": None, "draws": None},
                 {"method": f"mine {EVIL}", "gain": None, "std": None, "draws": None},
                 {"method": "random", "gain": -0.01, "std": 0.02, "draws": 5}]}
    return doc


def test_report_shows_the_tail_patch_table_escaped(tmp_path):
    from test_report import EVIL

    from datasleuth.report import render_report, validate_results

    html = render_report(_patched_results(), tmp_path / "r.html").read_text()
    assert "Tail-patch" in html and "<b>+0.25</b>" in html  # the best gain stands out
    assert "(mean of 5 draws)" in html and "± 0.02" in html
    assert EVIL not in html  # the method name is user text: escaped
    old = _patched_results()
    del old["queries"][0]["tail_patch"]
    validate_results(old)  # results without the field stay valid
    assert "Tail-patch" not in render_report(old, tmp_path / "o.html").read_text()


@pytest.mark.parametrize("mutate, fragment", [
    (lambda tp: tp.update(k=0), "tail_patch.k must be >= 1"),
    (lambda tp: tp["rows"][0].update(gain="big"), "rows[0].gain must be a number"),
    (lambda tp: tp["rows"][0].pop("method"), "rows[0].method is missing"),
    (lambda tp: tp.pop("before"), "tail_patch.before is missing"),
])
def test_malformed_tail_patch_is_refused(mutate, fragment):
    from datasleuth.report import validate_results

    doc = _patched_results()
    mutate(doc["queries"][0]["tail_patch"])
    with pytest.raises(DatasleuthError, match=re.escape(fragment)):
        validate_results(doc)
