"""Independent labels per fitting pass, and refined inverse-curvature products (issue 9)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import lm_batch, loader, tiny_gpt2
from oracles import dense_ggn, layer_params, loop_gradients
from torch.func import functional_call, hessian, jacrev

from datasleuth import ClassificationTask, FitConfig, find_layers, fit_curvature, pairwise_scores
from datasleuth.cli import main
from datasleuth.demo import TINY_CONFIG, build_demo_world
from datasleuth.estimators import ConjugateGradient, ExactInfluence, LiSSA
from datasleuth.lm.task import CausalLMTask
from datasleuth.refine import RefineConfig, RefinedInfluence
from datasleuth.scoring import collect_gradients
from datasleuth.task import _sample_categorical


class _Recording(ClassificationTask):
    """Classification whose sampled labels are kept, one tensor per batch."""

    def __init__(self) -> None:
        self.drawn: list[torch.Tensor] = []

    def sampled_loss(self, model, batch, generator):
        logits = model(batch[0])
        drawn = _sample_categorical(logits, generator)
        self.drawn.append(drawn)
        return F.cross_entropy(logits, drawn, reduction="none")


@pytest.mark.parametrize("shared", [False, True])
def test_fitting_passes_draw_their_own_seeded_labels(mlp_data, shared):
    model, x, y = mlp_data
    cfg = FitConfig(curvature="ekfac", seed=5, shared_labels=shared)
    task = _Recording()
    fit = fit_curvature(model, task, loader(x, y), None, cfg, progress=False)
    factors, eigen = torch.cat(task.drawn[:5]), torch.cat(task.drawn[5:])
    assert len(task.drawn) == 10 and factors.shape == eigen.shape == (23,)
    assert torch.equal(factors, eigen) == shared  # before the fix both passes saw the same
    again = _Recording()
    repeat = fit_curvature(model, again, loader(x, y), None, cfg, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(task.drawn, again.drawn))
    for name, layer in fit.layers.items():
        torch.testing.assert_close(repeat.layers[name].dense(), layer.dense(), rtol=0, atol=0)


# -- refinement (docs/method.md §9) ---------------------------------------------------------


def _joint_ggn(model, layers, examples):
    """G = (1/N) Σ_n J_nᵀ H_n J_n over the tracked layers together, (D, D), by torch.func."""
    w0 = [layer.canonical_weight().detach() for layer in layers]
    sizes = [w.numel() for w in w0]
    theta = torch.cat([w.reshape(-1) for w in w0])

    def out_of(th, ex):
        params, start = {}, 0
        for layer, w, n in zip(layers, w0, sizes):
            params.update(layer_params(layer, th[start:start + n].reshape(w.shape)))
            start += n
        return functional_call(model, params, (ex[0],))

    g = torch.zeros(len(theta), len(theta), dtype=torch.float64)
    for ex in examples:
        out = out_of(theta, ex).detach()
        j = jacrev(lambda th, ex=ex: out_of(th, ex))(theta).reshape(out.numel(), -1)
        h = hessian(lambda o, ex=ex: F.cross_entropy(o, ex[1], reduction="sum"))(out)
        g += j.t() @ h.reshape(out.numel(), -1) @ j
    return g / len(examples)


@pytest.fixture
def refine_problem(mlp_data):
    model, x, y = mlp_data
    task = ClassificationTask()
    curv = fit_curvature(model, task, loader(x, y), None, FitConfig(), progress=False)
    layers = find_layers(model)
    examples = [(x[i:i + 1], y[i:i + 1]) for i in range(len(x))]
    blocks = [dense_ggn(model, layer, examples,
                        lambda m, params, ex: functional_call(m, params, (ex[0],)),
                        lambda out, ex: F.cross_entropy(out, ex[1], reduction="sum"))
              for layer in layers]
    lam = torch.cat([torch.full((layer.grad_shape[0] * layer.grad_shape[1],),
                                curv.layers[layer.name].damping, dtype=torch.float64)
                     for layer in layers])
    joint = _joint_ggn(model, layers, examples)
    v = torch.randn(5, joint.shape[0], generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)  # (Q, D) query gradients
    return model, task, curv, list(loader(x, y)), {
        "blocks": torch.block_diag(*blocks) + torch.diag(lam), "joint": joint + torch.diag(lam),
        "v": v}


def _grads(refined, v):
    return refined.layout.unflatten(v)


@pytest.mark.parametrize("scheme", ["cg", "richardson"])
def test_zero_steps_are_ekfac_exactly(refine_problem, scheme):
    model, task, curv, train, ref = refine_problem
    refined = RefinedInfluence(model, task, curv, train, RefineConfig(steps=0, scheme=scheme))
    grads = _grads(refined, ref["v"])
    got, want = refined.precondition(grads), curv.precondition(grads)
    for name in want:
        assert torch.equal(got[name], want[name])
    # the reported residual is EK-FAC's own: ‖v − (G + λ)M⁻¹v‖ / ‖v‖ with the dense G
    x = refined.layout.flatten(want)
    dense = (ref["v"] - x @ ref["blocks"]).norm(dim=1) / ref["v"].norm(dim=1)
    torch.testing.assert_close(torch.tensor(refined.info.residual, dtype=torch.float64), dense)
    assert float(dense.min()) > 1e-3  # EK-FAC alone is not the exact answer here


@pytest.mark.parametrize("scheme,steps,cross_layer,tol", [
    ("cg", 60, False, 1e-8), ("cg", 60, True, 1e-8), ("richardson", 120, False, 1e-5)])
def test_refinement_reaches_the_exact_damped_ggn_influence(refine_problem, cross_layer,
                                                           scheme, steps, tol):
    model, task, curv, train, ref = refine_problem
    matrix = ref["joint"] if cross_layer else ref["blocks"]
    exact = torch.linalg.solve(matrix, ref["v"].t()).t()  # (Q, D)
    config = RefineConfig(steps=steps, scheme=scheme, cross_layer=cross_layer)
    refined = RefinedInfluence(model, task, curv, train, config)
    got = refined.layout.flatten(refined.precondition(_grads(refined, ref["v"])))
    torch.testing.assert_close(got, exact, rtol=tol, atol=tol * float(exact.abs().max()))
    assert max(refined.info.residual) < tol < min(refined.info.start)
    # a few steps already beat EK-FAC, which solves neither system exactly
    few = RefinedInfluence(model, task, curv, train, RefineConfig(steps=3, scheme=scheme,
                                                                  cross_layer=cross_layer))
    x3 = few.layout.flatten(few.precondition(_grads(few, ref["v"])))
    x0 = refined.layout.flatten(curv.precondition(_grads(refined, ref["v"])))
    assert bool(((x3 - exact).norm(dim=1) < (x0 - exact).norm(dim=1)).all())


def test_stochastic_richardson_on_the_cross_layer_ggn_shrinks_the_residual(refine_problem):
    """Fresh batches each step (ASTRA), iterates averaged: the dense residual of the joint
    system falls well below EK-FAC's, though the batch noise keeps it from vanishing."""
    model, task, curv, train, ref = refine_problem
    config = RefineConfig(steps=100, scheme="richardson", cross_layer=True, batches=2, seed=2)
    refined = RefinedInfluence(model, task, curv, train, config)
    grads = _grads(refined, ref["v"])
    got = refined.layout.flatten(refined.precondition(grads))
    x0 = refined.layout.flatten(curv.precondition(grads))

    def dense(x):
        return (ref["v"] - x @ ref["joint"]).norm(dim=1) / ref["v"].norm(dim=1)

    assert bool((dense(got) < 0.5 * dense(x0)).all())
    assert refined.info.products == 102 and len(refined.info.residual) == 5


def test_refined_queries_go_through_the_ordinary_scan(refine_problem, mlp_data):
    """pairwise_scores with the refined preconditioner = ∇fᵀ (G_blocks + λ)⁻¹ ∇log p, dense."""
    model, task, curv, train, ref = refine_problem
    _, x, y = mlp_data
    refined = RefinedInfluence(model, task, curv, train, RefineConfig(steps=60))
    queries = [(x[:3], y[:3])]
    got = pairwise_scores(model, task, refined, queries, train, progress=False).total

    def loss(m, ex):
        return F.cross_entropy(m(ex[0]), ex[1], reduction="sum")

    layers = find_layers(model)
    grads = [refined.layout.flatten(loop_gradients(model, layers, [(x[i:i + 1], y[i:i + 1])
                                                                   for i in idx], loss))
             for idx in (range(3), range(len(x)))]  # loss gradients = −∇log p
    want = grads[0] @ torch.linalg.solve(ref["blocks"], grads[1].t())  # (3, N)
    torch.testing.assert_close(got.double(), want, rtol=1e-7, atol=1e-9)
    assert refined.kind == "ekfac+cg" and refined.metadata["config"]["refine"]["steps"] == 60


# -- language models (CausalLMTask, the CLI) ---------------------------------------------


def test_refinement_of_a_language_model_reaches_the_exact_ggn_blocks():
    model = tiny_gpt2()
    layers = ["transformer.h.0.mlp.c_proj", "transformer.h.1.attn.c_proj"]
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 11, (int(n),), generator=g).tolist() for n in (9, 7, 12, 5, 10, 8)]
    train = [lm_batch(seqs[i:i + 2]) for i in range(0, 6, 2)]
    task = CausalLMTask()
    curv = fit_curvature(model, task, train, layers, FitConfig(), progress=False)
    exact = ExactInfluence.fit(model, task, train, layers, damping="match", reference=curv,
                               block_diagonal=True)
    query = lm_batch([[1, 2, 3, 4, 5, 6]])
    query["labels"][:, :4] = -100  # the completion: the last two tokens
    grads = collect_gradients(model, task, [query], find_layers(model, layers))
    refined = RefinedInfluence(model, task, curv, train, RefineConfig(steps=30))
    want = exact.precondition(grads)
    got = refined.precondition(grads)
    ekfac = curv.precondition(grads)
    for name in layers:
        torch.testing.assert_close(got[name], want[name], rtol=1e-7, atol=1e-9)
        assert not torch.allclose(ekfac[name], want[name], rtol=1e-2)
    assert refined.info.residual[0] < 1e-6 < refined.info.start[0]


def test_cli_trace_refine_reports_residuals_per_query(tmp_path, capsys):
    world = build_demo_world(tmp_path / "world", config=TINY_CONFIG, progress=False)
    queries = tmp_path / "queries.jsonl"
    queries.write_text("".join(json.dumps(q) + "\n" for q in (
        {"id": "a", "prompt": "Q: Where does the fox live?\nA:", "completion": " In a den."},
        {"id": "b", "prompt": "The moon is", "completion": " bright."})))
    common = ["trace", "--model", str(world.model_dir), "--corpus", str(world.corpus_path),
              "--queries", str(queries), "--seq-len", "32", "--top-k", "3", "--no-report",
              "--workdir", str(tmp_path / "w"), "--no-progress", "--max-sequences", "24"]
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert main([*common, "--out", str(tmp_path / "r0"), "--refine", "0"]) == 0
    assert main([*common, "--out", str(tmp_path / "r"), "--refine", "4"]) == 0
    out = capsys.readouterr().out
    assert "refined: relative residual" in out
    plain, zero, refined = (json.loads((tmp_path / d / "results.json").read_text())
                            for d in ("plain", "r0", "r"))
    for p, z in zip(plain["queries"], zero["queries"]):  # zero steps: EK-FAC's own ranking
        assert [r["index"] for r in p["top"]] == [r["index"] for r in z["top"]]
        assert [r["score"] for r in p["top"]] == pytest.approx([r["score"] for r in z["top"]],
                                                               rel=1e-5)
    assert refined["refine"]["steps"] == 4 and refined["refine"]["products"] == 5
    assert refined["config"]["curvature"]["refine"]["scheme"] == "cg"
    for q, z in zip(refined["queries"], zero["queries"]):
        assert q["refine_residual"] < 0.5 * q["ekfac_residual"]
        assert z["refine_residual"] == z["ekfac_residual"] == pytest.approx(q["ekfac_residual"])
    from datasleuth.report import render_report

    html = Path(render_report(refined, tmp_path / "report.html")).read_text()  # residuals shown
    assert "after refinement" in html and f"{refined['queries'][0]['refine_residual']:.3g}" in html
    assert "after refinement" not in Path(render_report(plain, tmp_path / "p.html")).read_text()
    assert main([*common, "--out", str(tmp_path / "x"), "--refine", "2", "--method", "bm25"]) == 2
    assert "--refine refines influence" in capsys.readouterr().err


# -- reference estimators at EK-FAC's relative damping (issue 9) ---------------------------


def test_reference_estimators_take_ekfacs_relative_damping(refine_problem, mlp_data):
    """damping=None: 0.1 × tr(G_ℓ)/D_ℓ per layer, as EK-FAC; exact from the dense blocks."""
    model, task, curv, train, ref = refine_problem
    _, x, y = mlp_data
    ekfac_lam = torch.cat([torch.full((n,), curv.layers[name].damping, dtype=torch.float64)
                           for name, n in (("0", 30), ("2", 21))])  # inside ref's matrices
    ggn = ref["joint"] - torch.diag(ekfac_lam)  # undamped G, (51, 51)
    want = torch.cat([torch.full((e - s,), 0.1 * float(torch.trace(ggn[s:e, s:e])) / (e - s),
                                 dtype=torch.float64) for s, e in ((0, 30), (30, 51))])
    exact = ExactInfluence.fit(model, task, loader(x, y), block_diagonal=True)
    torch.testing.assert_close(exact.damping, want)
    other = ExactInfluence.fit(model, task, loader(x, y), damping_scale=0.5)
    torch.testing.assert_close(other.damping, 5 * want)
    torch.testing.assert_close(other.dense(), ggn + torch.diag(5 * want))
    cg = ConjugateGradient(model, task, loader(x, y), tol=1e-12)
    v = ref["v"][:2]
    got = cg.solve(v)  # λ_ℓ from Hutchinson's estimate of tr(G_ℓ)/D_ℓ: near, not equal
    est = cg.space.damping(None, None, cg._means)
    assert float((est / want - 1).abs().max()) < 0.3 and not torch.allclose(est, want)
    torch.testing.assert_close(got, torch.linalg.solve(ggn + torch.diag(est), v.t()).t(),
                               rtol=1e-6, atol=1e-8)


def test_lissa_warns_when_its_residual_shows_no_convergence(mlp_data):
    model, x, y = mlp_data
    task = ClassificationTask()
    v = torch.randn(2, 51, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    short = LiSSA(model, task, loader(x, y), damping=0.01, depth=3)
    with pytest.warns(RuntimeWarning, match="LiSSA has not converged"):
        short.solve(v)
    assert float(short.info.residual.min()) > 0.1
    long = LiSSA(model, task, loader(x, y), damping=0.1, depth=150)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = long.solve(v)
    exact = ExactInfluence.fit(model, task, loader(x, y), damping=0.1)
    want = exact.solve(v)
    residual = (v - got @ exact.dense()).norm(dim=1) / v.norm(dim=1)
    torch.testing.assert_close(long.info.residual, residual, rtol=1e-6, atol=1e-12)
    assert float(residual.max()) < 1e-3 and (got - want).norm() / want.norm() < 1e-3
