"""Tests for the BM25 candidate filter (docs/method.md §5, Grosse et al. 2023 §3.2.1)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import bm25s
import numpy as np
import pytest

from datasleuth.errors import DatasleuthError
from datasleuth.scale.bm25 import (
    DEFAULT_B,
    DEFAULT_K1,
    METADATA_NAME,
    CandidateFilter,
)

PAD = 0
VOCAB = 12  # token 9 and 11 never occur in TOY

# Sequences with repeated tokens, the pad id, and two identical token sets (rows 3 and 5).
TOY: list[list[int]] = [
    [1, 2, 3, 3, 3, PAD, PAD],
    [2, 2, 4, 5],
    [6, 7, 8, 1, 1, 1, 1, 10],
    [3, 4, 4],
    [PAD, PAD],
    [4, 3, 3, 4],
    [5, 6, 7, 8, 10, 2, 1, 3],
]


def brute_force_scores(
    corpus: list[list[int]], query: list[int], *, k1: float, b: float, ignore: set[int]
) -> np.ndarray:
    """The docs/method.md §5 formula written out loop by loop, in float64."""
    docs = [set(seq) - ignore for seq in corpus]
    count = len(docs)
    avg_len = sum(len(d) for d in docs) / count
    out = np.zeros(count)
    for t in set(query) - ignore:
        n_t = sum(t in d for d in docs)
        idf = math.log((count - n_t + 0.5) / (n_t + 0.5) + 1.0)
        for i, doc in enumerate(docs):
            present = 1.0 if t in doc else 0.0
            length = 1.0 - b + b * len(doc) / avg_len
            out[i] += idf * (k1 + 1.0) * present / (present + k1 * length)
    return out


QUERIES = [
    [3, 3, 3, 2],  # repeated query token
    [9, 11, 3],  # tokens absent from the corpus
    [PAD, 1, 10, 10],  # ignored token in the query
    [1, 2, 3, 4, 5, 6, 7, 8, 10],
    [100, 4],  # id beyond the vocabulary
    [],
]


@pytest.mark.parametrize("k1,b", [(DEFAULT_K1, DEFAULT_B), (1.5, 0.75), (0.9, 0.3)])
def test_scores_match_brute_force_formula(k1: float, b: float) -> None:
    cf = CandidateFilter.build(TOY, k1=k1, b=b, ignore_ids=(PAD,), vocab_size=VOCAB)
    assert cf.num_sequences == len(TOY)
    for query in QUERIES:
        got = cf.scores(query)
        want = brute_force_scores(TOY, query, k1=k1, b=b, ignore={PAD})
        assert got.shape == (len(TOY),)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    # The padding-only sequence never scores; absent tokens add nothing.
    assert cf.scores([1, 2, 3, 4, 5])[4] == 0.0
    np.testing.assert_array_equal(cf.scores([9, 11]), np.zeros(len(TOY)))


def test_default_b_gives_summed_idf_and_repeats_count_once() -> None:
    cf = CandidateFilter.build(TOY, ignore_ids=(PAD,))
    assert (cf.k1, cf.b) == (1.5, 0.0)
    # With b = 0 the presence weight is (k1 + 1)/(1 + k1) = 1: score = sum of IDFs present.
    count = len(TOY)
    n_3 = sum(3 in seq for seq in TOY)
    idf_3 = math.log((count - n_3 + 0.5) / (n_3 + 0.5) + 1.0)
    scores = cf.scores([3])
    np.testing.assert_allclose(scores, [idf_3 if 3 in s else 0.0 for s in TOY], rtol=1e-6)
    np.testing.assert_array_equal(cf.scores([3, 3, 3, 2]), cf.scores([2, 3]))


def test_index_equals_the_one_bm25s_builds_itself() -> None:
    """method='atire' + idf_method='lucene' over distinct ids is the §5 formula."""
    for b in (0.0, 0.75):
        cf = CandidateFilter.build(TOY, b=b, ignore_ids=(PAD,), vocab_size=VOCAB)
        reference = bm25s.BM25(k1=1.5, b=b, method="atire", idf_method="lucene")
        distinct = [sorted(set(seq) - {PAD}) for seq in TOY]
        ref = reference.build_index_from_ids(
            unique_token_ids=list(range(VOCAB)), corpus_token_ids=distinct, show_progress=False
        )
        ours = cf._retriever.scores
        np.testing.assert_array_equal(ours["indptr"], ref["indptr"])
        np.testing.assert_array_equal(ours["indices"], ref["indices"])
        np.testing.assert_allclose(ours["data"], ref["data"], rtol=1e-6)
        assert ours["num_docs"] == ref["num_docs"]


def test_streaming_in_chunks_equals_one_shot_build() -> None:
    rng = np.random.default_rng(0)
    corpus = [rng.integers(0, 60, size=rng.integers(0, 40)) for _ in range(157)]
    kwargs = {"b": 0.75, "ignore_ids": (0, 59), "vocab_size": 64}
    one_shot = CandidateFilter.build(corpus, chunk_size=10_000, **kwargs)
    queries = [rng.integers(0, 64, size=12) for _ in range(5)]
    for chunk_size in (1, 7, 64):
        streamed = CandidateFilter.build((s for s in corpus), chunk_size=chunk_size, **kwargs)
        for key in ("data", "indices", "indptr"):
            np.testing.assert_array_equal(
                streamed._retriever.scores[key], one_shot._retriever.scores[key]
            )
        for query in queries:
            np.testing.assert_array_equal(streamed.scores(query), one_shot.scores(query))
    for query in queries:
        want = brute_force_scores(
            [list(s) for s in corpus], list(query), k1=1.5, b=0.75, ignore={0, 59}
        )
        np.testing.assert_allclose(one_shot.scores(query), want, rtol=1e-5, atol=1e-6)


def test_packed_2d_array_is_read_row_by_row() -> None:
    packed = np.array([[1, 2, 2, 0], [3, 1, 0, 0], [4, 4, 4, 4]], dtype=np.int64)
    from_array = CandidateFilter.build(packed, ignore_ids=(0,), chunk_size=2)
    from_lists = CandidateFilter.build(packed.tolist(), ignore_ids=(0,))
    np.testing.assert_array_equal(from_array.scores([1, 4]), from_lists.scores([1, 4]))


def test_top_k_orders_by_score_then_index() -> None:
    cf = CandidateFilter.build(TOY, ignore_ids=(PAD,))
    query = [3, 4]
    scores = cf.scores(query)
    # Rows 3 and 5 hold exactly {3, 4}: a tie at the top, broken by the lower index.
    assert scores[3] == scores[5] == scores.max()
    idx, top = cf.top_k(query, k=3)
    assert idx.dtype == np.int64
    assert idx.tolist()[:2] == [3, 5]
    np.testing.assert_array_equal(top, scores[idx])
    full_order = sorted(range(len(TOY)), key=lambda i: (-scores[i], i))
    assert idx.tolist() == full_order[:3]
    # k > C returns every sequence, zero scores last and by index.
    idx_all, top_all = cf.top_k(query, k=10_000)
    assert idx_all.tolist() == full_order
    assert np.all(np.diff(top_all) <= 0)
    # A tie straddling the cut keeps the lower indices.
    zeros = [i for i in full_order if scores[i] == 0]
    cut = len(TOY) - len(zeros) + 1
    assert cf.top_k(query, k=cut)[0].tolist()[-1] == zeros[0] == min(zeros)
    assert cf.top_k(query, k=0)[0].size == 0
    with pytest.raises(DatasleuthError):
        cf.top_k(query, k=-1)


def test_top_k_is_exact_on_a_random_corpus_with_many_ties() -> None:
    rng = np.random.default_rng(1)
    corpus = [rng.integers(1, 8, size=5) for _ in range(300)]  # tiny vocab: many ties
    cf = CandidateFilter.build(corpus)
    query = [1, 2, 3]
    scores = cf.scores(query)
    for k in (1, 17, 150, 299, 300, 301):
        idx, top = cf.top_k(query, k=k)
        want = sorted(range(len(corpus)), key=lambda i: (-scores[i], i))[:k]
        assert idx.tolist() == want
        np.testing.assert_array_equal(top, scores[want])


def test_save_load_round_trip(tmp_path: Path) -> None:
    cf = CandidateFilter.build(TOY, b=0.75, ignore_ids=(PAD,), corpus_fingerprint="sha256:abc")
    target = tmp_path / "bm25"
    cf.save(target)
    loaded = CandidateFilter.load(target, corpus_fingerprint="sha256:abc")
    mapped = CandidateFilter.load(target, mmap=True)
    for query in QUERIES:
        np.testing.assert_array_equal(loaded.scores(query), cf.scores(query))
        np.testing.assert_array_equal(mapped.scores(query), cf.scores(query))
        assert [a.tolist() for a in loaded.top_k(query, 4)] == [
            a.tolist() for a in cf.top_k(query, 4)
        ]
    assert (loaded.k1, loaded.b, loaded.ignore_ids) == (1.5, 0.75, (PAD,))
    meta = json.loads((target / METADATA_NAME).read_text())
    assert meta["format_version"] == 1
    assert meta["num_sequences"] == len(TOY) and meta["vocab_size"] == 11
    assert meta["corpus_fingerprint"] == "sha256:abc"
    assert meta["bm25s"]["method"] == "atire" and meta["bm25s"]["idf_method"] == "lucene"
    # No pickle anywhere: every array loads with allow_pickle=False.
    index_dir = target / meta["index_dir"]
    for npy in index_dir.glob("*.npy"):
        np.load(npy, allow_pickle=False)
    # Saving again replaces the index and leaves no stale or temporary directories.
    CandidateFilter.build(TOY[:3], corpus_fingerprint="sha256:abc").save(target)
    entries = sorted(p.name for p in target.iterdir())
    assert len(entries) == 2 and METADATA_NAME in entries
    assert CandidateFilter.load(target).num_sequences == 3


def test_mismatched_fingerprint_is_refused(tmp_path: Path) -> None:
    CandidateFilter.build(TOY, corpus_fingerprint="corpus-A").save(tmp_path)
    with pytest.raises(DatasleuthError) as info:
        CandidateFilter.load(tmp_path, corpus_fingerprint="corpus-B")
    message = str(info.value)
    assert "\n" not in message
    assert "corpus-A" in message and "corpus-B" in message and "rebuild" in message


def test_load_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(DatasleuthError, match="no BM25 candidate filter"):
        CandidateFilter.load(tmp_path / "missing")
    CandidateFilter.build(TOY).save(tmp_path)
    meta_path = tmp_path / METADATA_NAME
    meta = json.loads(meta_path.read_text())
    meta["format_version"] = 99
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DatasleuthError, match="format version"):
        CandidateFilter.load(tmp_path)


@pytest.mark.parametrize(
    "corpus,kwargs",
    [
        ([], {}),
        ([[1, -2]], {}),
        ([[1.5, 2.0]], {}),
        ([[1, 2]], {"b": 1.5}),
        ([[1, 2]], {"k1": -1.0}),
        ([[1, 20]], {"vocab_size": 10}),
    ],
)
def test_bad_input_raises_user_error(corpus: list, kwargs: dict) -> None:
    with pytest.raises(DatasleuthError):
        CandidateFilter.build(corpus, **kwargs)
