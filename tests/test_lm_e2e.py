"""End to end on a tiny GPT-2 made in the test: pack, fit, trace, report, CLI errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from datasleuth import FitConfig, pairwise_scores
from datasleuth.cli import main
from datasleuth.demo import TINY_CONFIG, build_demo_world
from datasleuth.lm.model import default_layers, load_model
from datasleuth.lm.pipeline import fit_factors, prepare_corpus, query_batches, run_trace
from datasleuth.lm.queries import load_queries
from datasleuth.lm.task import CausalLMTask
from datasleuth.lm.trace import TraceConfig
from datasleuth.report import render_report
from datasleuth.scale.index import GradientIndex

QUERY = {"id": "q", "prompt": "Q: What colour is the zebra moon?\nA:",
         "completion": " The zebra moon is bright purple with green stripes."}
PLANTED_TEXT = QUERY["prompt"] + QUERY["completion"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    w = build_demo_world(root / "world", config=TINY_CONFIG, progress=False)
    corpus = root / "corpus.jsonl"
    docs = [json.loads(line)["text"] for line in w.corpus_path.read_text().splitlines()]
    docs.insert(37, PLANTED_TEXT)
    docs.insert(12, "<script>alert('owned')</script> & a \"quoted\" <b>bold</b> line")
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    queries = root / "queries.jsonl"
    queries.write_text(json.dumps(QUERY) + "\n")
    model, tok = load_model(w.model_dir)
    return {"root": root, "model_dir": w.model_dir, "corpus": corpus, "queries": queries,
            "model": model, "tokenizer": tok, "planted_doc": 38}


def _setup(world, tmp_path, seq_len=32):
    model, tok = world["model"], world["tokenizer"]
    corpus = prepare_corpus(world["corpus"], tok, tmp_path / "work", seq_len, progress=False)
    layers = default_layers(model)
    curv = fit_factors(model, layers, corpus, tmp_path / "work", FitConfig(), batch_size=7,
                       progress=False)
    return model, tok, corpus, curv


def test_planted_text_ranks_first_and_scan_equals_pairwise(world, tmp_path):
    model, tok, corpus, curv = _setup(world, tmp_path)
    assert [ly.name for ly in default_layers(model)] == [
        "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    results = run_trace(model, tok, corpus, curv, world["queries"], tmp_path / "out",
                        TraceConfig(top_k=5, bottom_k=3, batch_size=6), all_scores=True,
                        progress=False)
    top = results["queries"][0]["top"]
    docs = {d["doc_index"] for d in top[0]["documents"]}
    assert world["planted_doc"] in docs and top[0]["score"] > 0
    text = "".join(top[0]["tokens"])
    assert "zebra moon" in text
    # streaming scan == engine pairwise scores
    _, batches = query_batches(load_queries(world["queries"]), tok, 4)
    loader = DataLoader(list(range(len(corpus))), batch_size=9, collate_fn=corpus.collate)
    want = pairwise_scores(model, CausalLMTask(), curv, batches, loader, progress=False)
    table = pd.read_parquet(tmp_path / "out" / "scores")
    table = table.sort_values("sequence")
    got = torch.tensor(table["query:q"].to_numpy(), dtype=torch.float32)
    assert table["sequence"].tolist() == list(range(len(corpus)))
    torch.testing.assert_close(got, want.total[0].float(), rtol=1e-4, atol=1e-4)
    best = int(torch.argmax(want.total[0]))
    assert best == top[0]["index"]
    assert top[0]["layer_scores"] == pytest.approx(want.per_layer[0, best].tolist(), rel=1e-4)
    assert sum(top[0]["token_scores"]) == pytest.approx(top[0]["score"], rel=1e-3, abs=1e-3)
    bottom = results["queries"][0]["bottom"]
    assert bottom[0]["score"] == pytest.approx(float(want.total[0].min()), rel=1e-4)
    # Sparsity from the scan's sample (every score here): share of the top 1%.
    scores = want.total[0].double()
    k = -(-len(scores) // 100)
    share = float(scores.sort(descending=True).values[:k].clamp_min(0).sum() /
                  scores.clamp_min(0).sum())
    sparsity = results["queries"][0]["sparsity"]
    assert sparsity["n_sample"] == len(corpus) and sparsity["power_law"] is None
    assert sparsity["top_share"]["0.01"] == pytest.approx(share, rel=1e-4)


def test_report_escapes_training_text(world, tmp_path):
    model, tok, corpus, curv = _setup(world, tmp_path)
    results = run_trace(model, tok, corpus, curv, world["queries"], tmp_path / "out",
                        TraceConfig(top_k=len(corpus), bottom_k=0), progress=False)
    html = render_report(results, tmp_path / "r.html").read_text()
    assert ">&lt;<" in html  # the "<" token of the document is shown, escaped
    assert html.count("<script") == 1  # only the report's own inline script
    assert "<script>alert" not in html


def test_second_run_reuses_artifacts(world, tmp_path, capsys):
    args = ["trace", "--model", str(world["model_dir"]), "--corpus", str(world["corpus"]),
            "--queries", str(world["queries"]), "--seq-len", "32", "--top-k", "3",
            "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "o"), "--no-progress"]
    assert main(args) == 0
    assert (tmp_path / "o" / "report.html").is_file()
    first = capsys.readouterr()
    assert "query q" in first.out
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "reusing packed corpus" in err and "reusing fitted ekfac" in err
    assert "reusing" in err.splitlines()[-3] or "reusing" in err


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "Traceback" not in err[0]
    return err[0]


@pytest.mark.parametrize("case", ["missing", "empty", "malformed", "empty_completion"])
def test_cli_bad_input_is_one_line_and_nonzero(world, tmp_path, capsys, case):
    corpus, queries = world["corpus"], world["queries"]
    if case == "missing":
        corpus = tmp_path / "nope.jsonl"
    elif case == "empty":
        corpus = tmp_path / "empty.jsonl"
        corpus.write_text("")
    elif case == "malformed":
        queries = tmp_path / "bad.jsonl"
        queries.write_text(json.dumps(QUERY) + "\n{not json\n")
    else:
        queries = tmp_path / "q.jsonl"
        queries.write_text(json.dumps({"prompt": "hi", "completion": ""}) + "\n")
    code = main(["trace", "--model", str(world["model_dir"]), "--corpus", str(corpus),
                 "--queries", str(queries), "--workdir", str(tmp_path / "w"),
                 "--out", str(tmp_path / "o"), "--no-progress"])
    assert code == 2
    line = _error_line(capsys)
    expected = {"missing": "nope.jsonl", "empty": "empty", "malformed": "bad.jsonl:2",
                "empty_completion": "empty completion"}[case]
    assert re.search(re.escape(expected), line, re.IGNORECASE), line
    assert not (tmp_path / "o" / "results.json").exists()


def test_cli_missing_model_and_config_file(world, tmp_path, capsys):
    code = main(["fit", "--model", str(tmp_path / "none"), "--corpus", str(world["corpus"]),
                 "--no-progress"])
    assert code == 2 and "does not exist" in _error_line(capsys)
    cfg = tmp_path / "cfg.toml"
    cfg.write_text('curvature = "kfac"\nseq-len = 32\nbogus = 1\n')
    code = main(["fit", "--config", str(cfg), "--model", str(world["model_dir"]),
                 "--corpus", str(world["corpus"])])
    assert code == 2
    assert "bogus" in capsys.readouterr().err


def test_killed_scan_resumes_to_the_same_result(world, tmp_path):
    from datasleuth.lm.trace import scan_corpus
    from datasleuth.scoring import precondition_queries, scan_scores

    model, tok, corpus, curv = _setup(world, tmp_path)
    _, batches = query_batches(load_queries(world["queries"]), tok, 4)
    pre = precondition_queries(model, CausalLMTask(), curv, batches)
    cfg = TraceConfig(top_k=4, bottom_k=2, batch_size=16, histogram_sample=100)
    want = scan_corpus(model, pre, corpus, cfg, scores_dir=tmp_path / "a", progress=False)

    def dies_after_three(model, task, loader, on_scores, progress):
        count = [0]

        def counting(start, scores):
            if count[0] == 3:
                raise KeyboardInterrupt
            count[0] += 1
            on_scores(start, scores)

        scan_scores(model, task, pre, loader, counting, progress=False)

    ckpt = tmp_path / "ckpt.safetensors"
    with pytest.raises(KeyboardInterrupt):
        scan_corpus(model, pre, corpus, cfg, scores_dir=tmp_path / "b", scanner=dies_after_three,
                    checkpoint=ckpt, checkpoint_seconds=0, run_key="k", progress=False)
    assert ckpt.is_file()
    got = scan_corpus(model, pre, corpus, cfg, scores_dir=tmp_path / "b", checkpoint=ckpt,
                      checkpoint_seconds=0, run_key="k", progress=False)
    assert got.stats["resumed_at"] == 48 and not ckpt.exists()
    assert torch.equal(got.top.indices, want.top.indices)
    assert torch.equal(got.bottom.values, want.bottom.values)
    assert got.scanned == want.scanned and got.samples == want.samples
    a = pd.read_parquet(tmp_path / "a").sort_values("sequence").reset_index(drop=True)
    b = pd.read_parquet(tmp_path / "b").sort_values("sequence").reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)


MORE_QUERIES = [
    QUERY,
    {"id": "r", "prompt": "Q: What did the teacher found?\nA:",
     "completion": " The town's first public library."},
    {"id": "s", "prompt": "Ingredients for lentil soup:", "completion": " red lentils, onion"},
]


def _three_queries(tmp_path):
    path = tmp_path / "three.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in MORE_QUERIES))
    return path


def _same_rows(a: dict, b: dict, which: str) -> None:
    for qa, qb in zip(a["queries"], b["queries"], strict=True):
        assert [r["index"] for r in qa[which]] == [r["index"] for r in qb[which]]
        for ra, rb in zip(qa[which], qb[which]):
            assert ra["score"] == pytest.approx(rb["score"], rel=1e-4, abs=1e-6)
            assert ra["layer_scores"] == pytest.approx(rb["layer_scores"], rel=1e-4, abs=1e-6)
            assert ra["token_scores"] == pytest.approx(rb["token_scores"], rel=1e-3, abs=1e-5)


def test_query_batching_rescores_candidates_exactly(world, tmp_path):
    model, tok, corpus, curv = _setup(world, tmp_path)
    queries = _three_queries(tmp_path)
    cfg = TraceConfig(top_k=4, bottom_k=2, batch_size=2)  # 3 queries -> 2 re-score chunks
    full = run_trace(model, tok, corpus, curv, queries, tmp_path / "full", cfg, progress=False)
    # Every sequence re-scored: identical to the full-rank scan, whatever the rank.
    every = run_trace(model, tok, corpus, curv, queries, tmp_path / "every", cfg, rank=1,
                      rescore=len(corpus), progress=False)
    _same_rows(full, every, "top")
    _same_rows(full, every, "bottom")
    assert every["config"]["first_stage"] == {"kind": "low_rank", "rank": 1,
                                              "rescored_per_query": len(corpus)}
    assert every["config"]["rescored_full_rank"] is True
    assert [q["n_scanned"] for q in every["queries"]] == [len(corpus)] * 3
    # A few candidates: their scores are the exact full-rank scores of those sequences.
    few = run_trace(model, tok, corpus, curv, queries, tmp_path / "few", cfg, rank=2,
                    rescore=6, progress=False)
    _, batches = query_batches(load_queries(queries), tok, 3)
    loader = DataLoader(list(range(len(corpus))), batch_size=16, collate_fn=corpus.collate)
    want = pairwise_scores(model, CausalLMTask(), curv, batches, loader, progress=False)
    for q, doc in enumerate(few["queries"]):
        for row in doc["top"] + doc["bottom"]:
            assert row["score"] == pytest.approx(float(want.total[q, row["index"]]),
                                                 rel=1e-4, abs=1e-6)
    assert few["queries"][0]["top"][0]["index"] == full["queries"][0]["top"][0]["index"]


def test_index_command_then_trace_with_index(world, tmp_path, capsys):
    common = ["--model", str(world["model_dir"]), "--corpus", str(world["corpus"]),
              "--seq-len", "32", "--workdir", str(tmp_path / "w"), "--no-progress"]
    index = tmp_path / "idx"
    assert main(["index", *common, "--out", str(index), "--proj-dim", "8",
                 "--shard-size", "40", "--whitening", "none"]) == 0
    err = capsys.readouterr().err
    assert "bytes per sequence" in err
    assert main(["index", *common, "--out", str(index), "--proj-dim", "8",
                 "--shard-size", "40", "--whitening", "none"]) == 0
    assert "reusing the projected curvature" in capsys.readouterr().err
    white = tmp_path / "idx-white"  # the default: EK-FAC whitened, sizes from the curvature
    assert main(["index", *common, "--out", str(white), "--proj-dim", "auto",
                 "--bytes-per-sequence", "2048"]) == 0
    err = capsys.readouterr().err
    assert "whitening ekfac" in err and "effective dimension" in err
    assert GradientIndex.open(white).bytes_per_row <= 2048
    queries = _three_queries(tmp_path)
    trace = ["trace", *common, "--queries", str(queries), "--top-k", "3", "--bottom-k", "2",
             "--no-report"]
    assert main([*trace, "--out", str(tmp_path / "plain"), "--power-law"]) == 0
    assert "of the positive influence; power-law tail alpha" in capsys.readouterr().out
    n = json.loads((tmp_path / "w" / "corpus" / "metadata.json").read_text())["num_sequences"]
    assert main([*trace, "--out", str(tmp_path / "all"), "--index", str(index),
                 "--rescore", str(n)]) == 0
    plain = json.loads((tmp_path / "plain" / "results.json").read_text())
    assert plain["queries"][0]["sparsity"]["power_law"]["alpha"] > 1
    every = json.loads((tmp_path / "all" / "results.json").read_text())
    _same_rows(plain, every, "top")
    _same_rows(plain, every, "bottom")
    assert every["config"]["first_stage"]["kind"] == "index"
    assert any("projected-gradient index" in w for w in every["warnings"])
    # The planted document is found from a handful of index candidates.
    capsys.readouterr()
    assert main([*trace, "--out", str(tmp_path / "few"), "--index", str(index),
                 "--rescore", "5"]) == 0
    few = json.loads((tmp_path / "few" / "results.json").read_text())
    rescored = few["queries"][0]["n_rescored"]
    assert 5 <= rescored <= 10  # the 5 best and 5 worst by the index, exactly re-scored
    assert f"({rescored} sequences re-scored, chosen from {n} by the index)" in \
        capsys.readouterr().out
    docs = {d["doc_index"] for d in few["queries"][0]["top"][0]["documents"]}
    assert world["planted_doc"] in docs
    assert main([*trace, "--out", str(tmp_path / "white"), "--index", str(white),
                 "--rescore", "5"]) == 0
    whitened = json.loads((tmp_path / "white" / "results.json").read_text())
    assert whitened["queries"][0]["top"][0]["index"] == few["queries"][0]["top"][0]["index"]
    # Approximate (FAISS HNSW) search finds it too.
    assert main([*trace, "--out", str(tmp_path / "ann"), "--index", str(index),
                 "--rescore", "5", "--approximate"]) == 0
    ann = json.loads((tmp_path / "ann" / "results.json").read_text())
    assert ann["config"]["first_stage"]["approximate"] is True
    assert ann["queries"][0]["top"][0]["index"] == few["queries"][0]["top"][0]["index"]
    capsys.readouterr()
    # An index of another packing is refused in one line.
    other = ["trace", "--model", str(world["model_dir"]), "--corpus", str(world["corpus"]),
             "--seq-len", "48", "--workdir", str(tmp_path / "w48"), "--no-progress",
             "--queries", str(queries), "--out", str(tmp_path / "bad"), "--index", str(index)]
    assert main(other) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "different corpus" in err[-1]
    assert not any("fitted" in line for line in err)  # refused before any fitting
    assert main([*trace, "--out", str(tmp_path / "bad"), "--approximate"]) == 2
    assert "--index" in _error_line(capsys)


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "DATASLEUTH_DIST_BACKEND": "gloo", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "datasleuth.cli", *args], capture_output=True, text=True, env=env, timeout=600)


def test_torchrun_self_influence_equals_one_process(world, tmp_path):
    args = ["self-influence", "--model", str(world["model_dir"]), "--corpus",
            str(world["corpus"]), "--seq-len", "32", "--fisher", "empirical", "--top-k", "6",
            "--no-progress"]
    assert main([*args, "--workdir", str(tmp_path / "w1"), "--out", str(tmp_path / "one")]) == 0
    run = _torchrun([*args, "--workdir", str(tmp_path / "w2"), "--out", str(tmp_path / "two")])
    assert run.returncode == 0, run.stderr[-3000:]
    one = pd.read_parquet(tmp_path / "one" / "self_influence.parquet")
    two = pd.read_parquet(tmp_path / "two" / "self_influence.parquet")
    assert one["sequence"].tolist() == two["sequence"].tolist()
    assert one["documents"].map(list).tolist() == two["documents"].map(list).tolist()
    for column in one.columns.drop("documents"):
        assert two[column].to_numpy() == pytest.approx(one[column].to_numpy(), rel=1e-5,
                                                       abs=1e-8), column
    top = [r["index"] for r in json.loads((tmp_path / "two" / "self_influence.json")
                                          .read_text())["top"]]
    assert top == [r["index"] for r in json.loads((tmp_path / "one" / "self_influence.json")
                                                  .read_text())["top"]]
    assert run.stdout.count("by self-influence") == 1


def test_torchrun_two_processes_write_the_one_process_result(world, tmp_path):
    queries = _three_queries(tmp_path)
    args = ["trace", "--model", str(world["model_dir"]), "--corpus", str(world["corpus"]),
            "--queries", str(queries), "--seq-len", "32", "--top-k", "4", "--bottom-k", "2",
            "--fisher", "empirical", "--no-report", "--no-progress", "--all-scores"]
    assert main([*args, "--workdir", str(tmp_path / "w1"), "--out", str(tmp_path / "one")]) == 0
    run = _torchrun([*args, "--workdir", str(tmp_path / "w2"), "--out", str(tmp_path / "two")])
    assert run.returncode == 0, run.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    _same_rows(one, two, "top")
    _same_rows(one, two, "bottom")
    assert [q["n_scanned"] for q in one["queries"]] == [q["n_scanned"] for q in two["queries"]]
    assert [q["score_histogram"]["counts"] for q in one["queries"]] == \
        [q["score_histogram"]["counts"] for q in two["queries"]]
    table = pd.read_parquet(tmp_path / "two" / "scores").sort_values("sequence")
    assert table["sequence"].tolist() == list(range(len(table)))
    assert run.stdout.count("query q") == 1  # rank 0 alone prints the summary


def test_torchrun_index_equals_the_one_process_index(world, tmp_path):
    """`datasleuth index` under torchrun: each process writes its shards and its part of
    the projected curvature's sums; rows and curvature equal a one-process build."""
    from safetensors.torch import load_file

    args = ["index", "--model", str(world["model_dir"]), "--corpus", str(world["corpus"]),
            "--seq-len", "32", "--proj-dim", "8", "--shard-size", "16", "--whitening", "none",
            "--fisher", "empirical", "--no-progress"]
    assert main([*args, "--workdir", str(tmp_path / "w1"), "--out", str(tmp_path / "one")]) == 0
    run = _torchrun([*args, "--workdir", str(tmp_path / "w2"), "--out", str(tmp_path / "two")])
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = GradientIndex.open(tmp_path / "one"), GradientIndex.open(tmp_path / "two")
    assert one.rows == two.rows and len(one.manifest["shards"]) > 2
    torch.testing.assert_close(two.load_rows(), one.load_rows(), rtol=0, atol=0)
    c1 = load_file(str(next((tmp_path / "one").glob("*curvature*.safetensors"))))
    c2 = load_file(str(next((tmp_path / "two").glob("*curvature*.safetensors"))))
    assert c1.keys() == c2.keys()
    for key in c1:
        torch.testing.assert_close(c2[key], c1[key], rtol=1e-5, atol=1e-7)
    white = [a for a in args if a not in ("--whitening", "none")] + [  # EK-FAC whitened
        "--index-dtype", "float16"]
    assert main([*white, "--workdir", str(tmp_path / "w1"), "--out", str(tmp_path / "w-one")]) == 0
    run = _torchrun([*white, "--workdir", str(tmp_path / "w2"), "--out", str(tmp_path / "w-two")])
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = GradientIndex.open(tmp_path / "w-one"), GradientIndex.open(tmp_path / "w-two")
    assert one.config.whitened and one.rows == two.rows
    r1, r2 = one.load_rows(torch.float64), two.load_rows(torch.float64)
    assert float((r2 - r1).norm() / r1.norm()) < 1e-3  # float16 rows of an all-reduced fit


def test_self_influence_command_flags_a_corrupt_document(world, tmp_path, capsys):
    docs = [json.loads(line)["text"] for line in world["corpus"].read_text().splitlines()]
    g = torch.Generator().manual_seed(3)
    junk = "".join(chr(int(c)) for c in torch.randint(0x4E00, 0x4E00 + 2000, (40,), generator=g))
    docs.insert(20, junk)  # 40 random CJK characters: nothing like the rest of the corpus
    corpus = tmp_path / "corrupt.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    code = main(["self-influence", "--model", str(world["model_dir"]), "--corpus", str(corpus),
                 "--seq-len", "32", "--workdir", str(tmp_path / "w"), "--out",
                 str(tmp_path / "o"), "--top-k", "5", "--no-progress"])
    assert code == 0
    doc = json.loads((tmp_path / "o" / "self_influence.json").read_text())
    assert [r["rank"] for r in doc["top"]] == [1, 2, 3, 4, 5]
    first = doc["top"][0]["documents"]
    assert 20 in [d["doc_index"] for d in first]  # the corrupt document ranks first
    piece = next(d for d in first if d["doc_index"] == 20)
    assert junk[piece["char_start"]:piece["char_end"]] in doc["top"][0]["text"]  # its text
    assert doc["top"][0]["self_influence"] >= doc["top"][1]["self_influence"] > 0
    table = pd.read_parquet(tmp_path / "o" / "self_influence.parquet")
    assert len(table) == doc["n_sequences"]
    assert table["sequence"].tolist() == list(range(len(table)))
    assert 20 in table["documents"][doc["top"][0]["index"]].tolist()
    assert table["self_influence"].max() == pytest.approx(doc["top"][0]["self_influence"])
    layers = [c for c in table.columns if c.startswith("layer:")]
    assert table[layers].sum(axis=1).to_numpy() == pytest.approx(
        table["self_influence"].to_numpy(), rel=1e-6)
    assert "top 5 of" in capsys.readouterr().out


def test_cli_refuses_inputs_longer_than_the_model_context(world, tmp_path, capsys):
    from datasleuth.lm.model import context_length

    limit = context_length(world["model"])
    assert limit is not None
    args = ["trace", "--model", str(world["model_dir"]), "--corpus", str(world["corpus"]),
            "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "o"), "--no-progress"]
    code = main([*args, "--queries", str(world["queries"]), "--seq-len", str(limit + 1)])
    assert code == 2 and f"context of {limit} tokens" in _error_line(capsys)
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "moon " * (2 * limit), "completion": " end"}) + "\n")
    code = main([*args, "--queries", str(long), "--seq-len", "32"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "tokens long" in err[-1]
    assert not (tmp_path / "o" / "results.json").exists()


def test_cli_refuses_a_device_it_does_not_have(world, tmp_path, capsys):
    bad = "cuda" if not torch.cuda.is_available() else "cuda:99"
    for device, expect in ((bad, "CUDA"), ("tpu", "not a torch device")):
        code = main(["fit", "--model", str(world["model_dir"]), "--corpus", str(world["corpus"]),
                     "--device", device, "--workdir", str(tmp_path / "w"), "--no-progress"])
        assert code == 2 and expect in _error_line(capsys)


def test_damaged_packed_corpus_is_packed_again(world, tmp_path, capsys):
    tok = world["tokenizer"]
    first = prepare_corpus(world["corpus"], tok, tmp_path / "w", 32, progress=False)
    want = [first.input_ids(i).tolist() for i in range(len(first))]
    tokens = tmp_path / "w" / "corpus" / "tokens.safetensors"
    tokens.write_bytes(tokens.read_bytes()[:200])
    capsys.readouterr()
    again = prepare_corpus(world["corpus"], tok, tmp_path / "w", 32, progress=False)
    assert "packing again" in capsys.readouterr().err
    assert [again.input_ids(i).tolist() for i in range(len(again))] == want


def test_streaming_corpus_packs_the_same(world, tmp_path):
    common = ["fit", "--model", str(world["model_dir"]), "--corpus", str(world["corpus"]),
              "--seq-len", "32", "--curvature", "identity", "--no-progress"]
    assert main([*common, "--workdir", str(tmp_path / "a")]) == 0
    assert main([*common, "--workdir", str(tmp_path / "b"), "--streaming"]) == 0
    a = prepare_corpus(world["corpus"], world["tokenizer"], tmp_path / "a", 32, progress=False)
    b = prepare_corpus(world["corpus"], world["tokenizer"], tmp_path / "b", 32, progress=False)
    assert a.fingerprint == b.fingerprint and len(a) == len(b)
    for i in range(len(a)):
        assert torch.equal(a.input_ids(i), b.input_ids(i))
        assert a.segments(i) == b.segments(i)


def test_workflow_function_writes_the_results_of_the_command(world, tmp_path):
    from datasleuth.lm import (
        Candidates,
        FitConfig,
        FitOptions,
        LoadOptions,
        TraceOptions,
        trace_queries,
    )

    queries = _three_queries(tmp_path)
    assert main(["trace", "--model", str(world["model_dir"]), "--corpus", str(world["corpus"]),
                 "--queries", str(queries), "--seq-len", "32", "--curvature", "kfac",
                 "--top-k", "3", "--bottom-k", "2", "--filter", "bm25", "--candidates", "200",
                 "--rank", "2", "--rescore", "8", "--workdir", str(tmp_path / "w"),
                 "--out", str(tmp_path / "cli"), "--no-progress"]) == 0
    load = LoadOptions(world["model_dir"], world["corpus"], workdir=tmp_path / "w", seq_len=32)
    results = trace_queries(
        load, TraceOptions(queries, out=tmp_path / "api",
                           config=TraceConfig(top_k=3, bottom_k=2),
                           candidates=Candidates(bm25=200, rank=2, rescore=8)),
        FitOptions(FitConfig(curvature="kfac")), progress=False)
    cli = json.loads((tmp_path / "cli" / "results.json").read_text())
    api = json.loads((tmp_path / "api" / "results.json").read_text())
    assert api == results
    for doc in (cli, api):
        doc.pop("created")
    assert api == cli
    assert api["config"]["first_stage"]["kind"] == "low_rank"
    assert (tmp_path / "api" / "report.html").is_file()
    from datasleuth.scale.bm25 import FILTER_WARNING

    # The keyword filter's bias is never silent (docs/method.md §5): the results say so.
    assert any(w.startswith(FILTER_WARNING) and "top 200" in w for w in api["warnings"])
    assert any("BM25" in w for w in api["warnings"])
