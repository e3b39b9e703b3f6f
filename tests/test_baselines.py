"""Baselines against bare-bones references in float64 (datasleuth.baselines)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import lm_batch, loader, tiny_gpt2
from oracles import loop_gradients
from torch.utils.data import DataLoader

from datasleuth import ClassificationTask, FitConfig, fit_curvature, pairwise_scores
from datasleuth.baselines import (
    bm25_scores,
    cosine_matrix,
    gradient_cosine_scores,
    gradient_norms,
    module_input_representation,
    representation_scores,
)
from datasleuth.cli import main
from datasleuth.layers import find_layers
from datasleuth.lm.task import CausalLMTask
from datasleuth.report import load_results
from datasleuth.scale.bm25 import CandidateFilter


def _flat_grads(model, layers, x, y, sign=-1.0):
    """Per-example gradients of log p (sign -1 on the loss) over all layers: (N, D)."""
    def logp(m, ex):
        return sign * F.cross_entropy(m(ex[0][None]), ex[1][None], reduction="sum")

    grads = loop_gradients(model, layers, list(zip(x, y)), logp)
    return torch.cat([g.reshape(len(x), -1) for g in grads.values()], 1)


def test_cosine_equals_loop_cosine_for_any_batch_size(mlp_data):
    model, x, y = mlp_data
    task = ClassificationTask()
    layers = find_layers(model)
    train_flat = _flat_grads(model, layers, x, y)  # (23, D)
    query_flat = _flat_grads(model, layers, x[:5], y[:5])  # f = log p(label | x)
    norms = torch.outer(query_flat.norm(dim=1), train_flat.norm(dim=1))
    want = query_flat @ train_flat.t() / norms  # (5, 23)
    for batch_size in (4, 23):
        got = gradient_cosine_scores(model, task, loader(x[:5], y[:5], 3),
                                     loader(x, y, batch_size), progress=False)
        torch.testing.assert_close(got.total, want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got.per_layer.sum(-1), got.total)
        assert got.layer_names == [layer.name for layer in layers]
    # an example scored against itself has cosine 1
    torch.testing.assert_close(got.total[torch.arange(5), torch.arange(5)],
                               torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(gradient_norms(model, task, loader(x, y, 7),
                                              [la.name for la in layers]),
                               train_flat.norm(dim=1))


def test_dot_product_is_the_identity_curvature(mlp_data):
    model, x, y = mlp_data
    task = ClassificationTask()
    layers = find_layers(model)
    identity = fit_curvature(model, task, [], None, FitConfig(curvature="identity"),
                             progress=False)  # no pass over the data
    got = pairwise_scores(model, task, identity, loader(x[:3], y[:3]), loader(x, y, 6),
                          progress=False)
    want = _flat_grads(model, layers, x[:3], y[:3]) @ _flat_grads(model, layers, x, y).t()
    torch.testing.assert_close(got.total, want, rtol=1e-10, atol=1e-12)


def test_zero_vectors_have_cosine_zero_not_nan():
    a = torch.tensor([[0.0, 0.0], [3.0, 4.0]], dtype=torch.float64)
    b = torch.tensor([[0.0, 0.0], [6.0, 8.0], [-4.0, 3.0]], dtype=torch.float64)
    got = cosine_matrix(a, b)
    torch.testing.assert_close(got, torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
                                                 dtype=torch.float64))


def test_representation_of_an_mlp_is_its_last_hidden_layer(mlp_data):
    model, x, y = mlp_data
    task = ClassificationTask()
    represent = module_input_representation(task, model[2])
    got = representation_scores(model, represent, loader(x[:4], y[:4]), loader(x, y, 5),
                                progress=False)
    hidden = torch.tanh(model[0](x)).detach()  # the input of the last Linear, (23, 6)
    want = F.normalize(hidden[:4], dim=1) @ F.normalize(hidden, dim=1).t()
    torch.testing.assert_close(got.total, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.per_layer[..., 0], got.total)


def test_lm_representation_is_the_masked_mean_of_the_last_hidden_state():
    model = tiny_gpt2()
    task = CausalLMTask()
    rows = [[1, 2, 3, 4, 5], [6, 7], [3, 3, 9, 1]]
    represent = module_input_representation(task, model.get_output_embeddings())
    padded = represent(model, lm_batch(rows, pad=10))  # (3, 8), padding masked out
    for r, ids in enumerate(rows):
        alone = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(padded[r], alone[0].mean(0).detach(), rtol=1e-9, atol=1e-10)


def test_bm25_scores_are_the_candidate_filter_scores():
    train = [[1, 2, 3], [2, 2, 5], [7, 8], [1, 5, 9, 9]]
    queries = [[1, 5], np.array([8, 2, 0])]
    got = bm25_scores(queries, train, ignore_ids=[0])
    index = CandidateFilter.build(train, ignore_ids=[0])
    for q, tokens in enumerate(queries):
        np.testing.assert_allclose(got.total[q].numpy(), index.scores(list(tokens)))
    assert got.total.shape == (2, 4) and got.total[0, 2] == 0.0  # no shared token
    assert got.total[0, 3] > got.total[0, 0] > 0  # both query tokens beat one
    with pytest.raises(Exception, match="no training sequences"):
        bm25_scores(queries, [])


def test_lm_cosine_matches_loop_with_padding():
    model = tiny_gpt2()
    task = CausalLMTask()
    rows = [[1, 2, 3, 4, 5], [6, 7, 2], [3, 3, 9, 1], [4, 4]]
    layers = find_layers(model, ["*.mlp.*"])
    grads = loop_gradients(model, layers, [lm_batch([r]) for r in rows],
                           lambda m, b: task.loss(m, b).sum())  # ∇L = −∇log p
    flat = -torch.cat([g.reshape(len(rows), -1) for g in grads.values()], 1)
    want = F.normalize(flat[:2], dim=1) @ F.normalize(flat, dim=1).t()
    batches = DataLoader(rows, batch_size=3, collate_fn=lambda b: lm_batch(b, pad=10))
    got = gradient_cosine_scores(model, task, [lm_batch(rows[:2])], batches, layers,
                                 progress=False)
    torch.testing.assert_close(got.total, want, rtol=1e-9, atol=1e-11)


# ------------------------------------------------------------------ `datasleuth trace --method`


@pytest.fixture(scope="module")
def lm_world(tmp_path_factory):
    from datasleuth.demo import TINY_CONFIG, build_demo_world

    root = tmp_path_factory.mktemp("methods")
    w = build_demo_world(root / "world", config=TINY_CONFIG, progress=False)
    queries = root / "queries.jsonl"
    queries.write_text(w.queries_path.read_text() + json.dumps(
        {"id": "second", "prompt": "How do I reset", "completion": " my password?"}) + "\n")
    return {"root": root, "model": w.model_dir, "corpus": w.corpus_path, "queries": queries}


def _trace(lm_world, tmp_path, method, *extra):
    out = tmp_path / method
    code = main(["trace", "--model", str(lm_world["model"]), "--corpus", str(lm_world["corpus"]),
                 "--queries", str(lm_world["queries"]), "--seq-len", "32", "--top-k", "4",
                 "--bottom-k", "2", "--workdir", str(lm_world["root"] / "work"),
                 "--out", str(out), "--method", method, "--all-scores", "--no-progress",
                 *extra])
    assert code == 0
    return load_results(out / "results.json"), out


def _engine_scores(lm_world, method):
    """The same scores from the engine's functions on the packed corpus (no CLI)."""
    from datasleuth.lm import load_model, prepare_corpus, query_batches
    from datasleuth.lm.queries import load_queries

    model, tok = load_model(lm_world["model"])
    corpus = prepare_corpus(lm_world["corpus"], tok, lm_world["root"] / "work", 32,
                            progress=False)
    _, batches = query_batches(load_queries(lm_world["queries"]), tok, 8)
    train = DataLoader(list(range(len(corpus))), batch_size=5, collate_fn=corpus.collate)
    task, layers = CausalLMTask(), find_layers(model, ["*.mlp.*"])
    if method == "cosine":
        return gradient_cosine_scores(model, task, batches, train, layers, progress=False)
    if method == "repsim":
        represent = module_input_representation(task, model.get_output_embeddings())
        return representation_scores(model, represent, batches, train, progress=False)
    rows = [corpus.input_ids(i)[: corpus.length(i)] for i in range(len(corpus))]
    queries = [b["input_ids"][r][b["attention_mask"][r].bool()] for b in batches
               for r in range(len(b["input_ids"]))]
    return bm25_scores(queries, rows, ignore_ids=[tok.eos_token_id, tok.pad_token_id])


@pytest.mark.parametrize("method", ["cosine", "repsim", "bm25"])
def test_trace_with_a_baseline_method_equals_the_engine(lm_world, tmp_path, method):
    results, out = _trace(lm_world, tmp_path, method)
    assert results["config"]["method"] == method
    want = _engine_scores(lm_world, method).total.double()  # (Q, N)
    table = pd.read_parquet(out / "scores").sort_values("sequence")
    for q, query in enumerate(results["queries"]):
        got = torch.tensor(table[f"query:{query['id']}"].to_numpy(), dtype=torch.float64)
        torch.testing.assert_close(got, want[q], rtol=2e-4, atol=2e-5)
        best = torch.argsort(-want[q], stable=True)[:4].tolist()
        assert [row["index"] for row in query["top"]] == best
        for row in query["top"] + query["bottom"]:  # token scores sum to the score
            assert sum(row["token_scores"]) == pytest.approx(row["score"], rel=1e-3, abs=1e-4)
            assert len(row["layer_scores"]) == len(query["layer_names"])
    assert (out / "report.html").is_file()


def test_dot_method_is_identity_influence_and_baselines_refuse_rank(lm_world, tmp_path, capsys):
    results, _ = _trace(lm_world, tmp_path, "dot")
    assert results["config"]["curvature"]["curvature"] == "identity"
    assert results["config"]["corpus_fingerprint"] and results["config"]["seq_len"] == 32
    code = main(["trace", "--model", str(lm_world["model"]), "--corpus", str(lm_world["corpus"]),
                 "--queries", str(lm_world["queries"]), "--method", "repsim", "--rank", "4"])
    assert code == 2 and "drop them for --method repsim" in capsys.readouterr().err
    code = main(["trace", "--model", str(lm_world["model"]), "--corpus", str(lm_world["corpus"]),
                 "--queries", str(lm_world["queries"]), "--method", "tfidf"])
    assert code == 2 and "unknown method 'tfidf'" in capsys.readouterr().err
