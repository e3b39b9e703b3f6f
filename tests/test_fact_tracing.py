"""The fact-tracing recipe, retrieval metrics and their sections of the suite (§10)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch.utils.data import DataLoader, TensorDataset

from datasleuth.cli.evaluate import evaluate as evaluate_command
from datasleuth.errors import DatasleuthError
from datasleuth.evaluation.fact_tracing import (
    GROUPS,
    TEMPLATES,
    TINY_FACTS,
    FactConfig,
    _FactWorld,
    _fill,
    fact_tracing_recipe,
)
from datasleuth.evaluation.methods import token_rows
from datasleuth.evaluation.metrics import retrieval_scores
from datasleuth.evaluation.retrieval import TEACHING, retrieval_table, tail_patch_group_table
from datasleuth.evaluation.suite import evaluate
from datasleuth.evaluation.tail_patch import TailPatchConfig

METHODS = ["ekfac", "identity", "cosine", "repsim", "bm25"]


def test_retrieval_scores_by_hand():
    scores = np.array([[0.1, 0.9, 0.5, 0.9], [4.0, 3.0, 2.0, 1.0]])
    got = retrieval_scores(scores, [[2, 3], [0]], ks=(1, 2, 3))
    assert got["ranks"] == [[2, 3], [1]]  # the tie at 0.9 goes to the lower index
    assert got["recall"] == {1: [0.0, 1.0], 2: [0.5, 1.0], 3: [1.0, 1.0]}
    assert got["reciprocal_rank"] == [0.5, 1.0] and got["mrr"] == 0.75
    with pytest.raises(DatasleuthError, match="among 0..3"):
        retrieval_scores(scores, [[4], [0]])
    with pytest.raises(DatasleuthError, match="2 queries"):
        retrieval_scores(scores, [[1]])


def test_world_teaches_each_fact_in_paraphrase_and_decoys_share_every_query_word():
    world = _FactWorld(FactConfig())  # 48 people: every value is shared by several
    for f, group, template in world.queries:
        p, r, v = world.facts[f]
        query = set(_fill(TEMPLATES[r][template], p=p, v=v))
        relevant = set(world.relevant_of[f])
        taught = [_fill(t, p=p, v=v) for t in TEMPLATES[r]]
        for i in relevant:  # a relevant document states the fact in one of its templates
            assert any(world.docs[i][: len(s)] == s for s in taught)
        used = {t for t, s in enumerate(taught) for i in relevant if world.docs[i][: len(s)] == s}
        if group == GROUPS[1]:  # reworded: no teaching document uses this wording
            assert template not in used
        else:
            assert template in used
            decoys = [i for i, d in enumerate(world.docs)
                      if query <= set(d) and i not in relevant]
            assert len(decoys) >= 2  # keyword decoys hold every word of the query
    assert [g for _, g, _ in world.queries] == list(GROUPS) * FactConfig().queried


@pytest.fixture(scope="module")
def suite_doc():
    return evaluate(fact_tracing_recipe(TINY_FACTS), METHODS, n_subsets=0, detection=False,
                    tail_patch=TailPatchConfig(k=2, draws=2, warmup=2, lr=1e-3))


def test_suite_reports_recall_mrr_and_tail_patch_per_wording(suite_doc):
    retrieval = suite_doc["retrieval"]
    assert list(retrieval["groups"]) == list(GROUPS)
    for group in GROUPS:
        for name in METHODS:
            row = retrieval["groups"][group][name]
            assert 0.0 < row["mrr"] <= 1.0 and 0.0 <= row["recall@10"] <= 1.0
    assert "| bm25 |" in retrieval_table(retrieval)
    patch = suite_doc["tail_patch"]
    assert set(patch["summary"]) == {*METHODS, TEACHING, "random"}
    assert len(patch["queries"]) == 2 * TINY_FACTS.queried
    assert all(np.isfinite(r["gains"][TEACHING]) for r in patch["queries"])
    assert "random (2 draws per query)" in tail_patch_group_table(patch)
    assert suite_doc["estimators"]["bm25"]["description"].startswith("BM25")
    json.dumps(suite_doc)  # JSON-ready


def test_cli_runs_the_fact_recipe_with_baselines(tmp_path):
    recipe = tmp_path / "facts.py"
    recipe.write_text("from datasleuth.evaluation.fact_tracing import TINY_FACTS, "
                      "fact_tracing_recipe\nrecipe = fact_tracing_recipe(TINY_FACTS)\n")
    result = CliRunner().invoke(evaluate_command, [
        "--recipe", str(recipe), "--estimators", "repsim,bm25", "--subsets", "0",
        "--tail-k", "2", "--tail-draws", "1", "--tail-warmup", "1", "--out",
        str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "recall@10 (training wording)" in result.output
    assert "mean Δ f (reworded)" in result.output
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert doc["config"]["tail_patch"]["k"] == 2 and doc["retrieval"]["ks"] == [1, 5, 10]


def test_bm25_needs_token_batches():
    x = torch.zeros(4, 3)
    with pytest.raises(DatasleuthError, match="no 'input_ids'"):
        token_rows(DataLoader(TensorDataset(x, x), batch_size=2))
    rows = token_rows([{"input_ids": torch.tensor([[5, 6, 0], [7, 0, 0]]),
                        "attention_mask": torch.tensor([[1, 1, 0], [1, 0, 0]])}])
    assert [r.tolist() for r in rows] == [[5, 6], [7]]
