"""Attention influence per head (datasleuth.heads) against dense math in float64.

Head h's share of a layer's score is ⟨Ṽ, DW̄⟩ over the coordinates of head h: its rows
in the q, k and v sections of GPT-2's ``c_attn``, its input columns (and the shared bias
column as its own group) in ``attn.c_proj``. The reference preconditions with the dense
damped EK-FAC matrix and sums explicit masks; the shares must also sum to the layer's
score, and the LM trace must carry them for its selected sequences.
"""

from __future__ import annotations

import json

import torch
from conftest import lm_batch, tiny_gpt2
from oracles import loop_gradients

from datasleuth import FitConfig, fit_curvature, pairwise_scores, precondition_queries
from datasleuth.heads import attention_heads, sequence_head_scores
from datasleuth.layers import layers_by_name
from datasleuth.lm.task import CausalLMTask

HEADS, DIM, WIDTH = 2, 4, 8  # tiny_gpt2: n_head=2, n_embd=8


def _data():
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, 11, (int(n),), generator=g).tolist() for n in (6, 4, 7, 5, 3)]
    train = [lm_batch(seqs[:3]), lm_batch(seqs[3:])]
    query = lm_batch([[1, 4, 2, 7, 3]])
    query["labels"][:, :2] = -100
    return train, [query]


def _masks(name: str, shape: tuple[int, int]) -> list[torch.Tensor]:
    """Head coordinates written out by hand, one (P, M+1) mask per group."""
    masks = []
    for h in range(HEADS):
        m = torch.zeros(shape, dtype=torch.bool)
        cols = slice(h * DIM, (h + 1) * DIM)
        if name.endswith("c_attn"):
            for section in range(3):
                m[section * WIDTH + h * DIM: section * WIDTH + (h + 1) * DIM, :] = True
        else:
            m[:, cols] = True
        masks.append(m)
    if name.endswith("c_proj"):
        bias = torch.zeros(shape, dtype=torch.bool)
        bias[:, WIDTH] = True
        masks.append(bias)
    return masks


def test_head_scores_equal_dense_math():
    model, task = tiny_gpt2(), CausalLMTask()
    train, queries = _data()
    curv = fit_curvature(model, task, train, ["*.attn.*"], FitConfig(fisher="empirical"),
                         progress=False)
    names = curv.layer_names
    splits = attention_heads(model, names)
    assert sorted(splits) == sorted(names) and len(names) == 4
    got = sequence_head_scores(model, task, precondition_queries(model, task, curv, queries,
                                                                 progress=False), train, splits)
    layers = layers_by_name(model, names)
    examples = [{k: v[i:i + 1] for k, v in b.items()}
                for b in train for i in range(len(b["index"]))]
    q_grads = loop_gradients(model, layers, queries, lambda m, ex: task.measurement(m, ex).sum())
    t_grads = loop_gradients(model, layers, examples, lambda m, ex: -task.loss(m, ex).sum())
    pairwise = pairwise_scores(model, task, curv, queries, train, progress=False)
    for j, name in enumerate(names):
        shape = q_grads[name].shape[1:]
        dense = curv.layers[name].dense()
        pre = torch.linalg.solve(dense, q_grads[name].reshape(1, -1).t()).t().reshape(shape)
        want = torch.stack([(pre * t_grads[name] * m).sum((-2, -1)) for m in _masks(name, shape)],
                           -1)  # (N, H)
        torch.testing.assert_close(got[name][:, 0], want, rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(got[name].sum(-1), pairwise.per_layer[..., j].t(),
                                   rtol=1e-8, atol=1e-12)
        assert want[:, :HEADS].abs().min() > 0


def test_trace_rows_carry_head_scores(tmp_path):
    from datasleuth.demo import build_tokenizer
    from datasleuth.lm.corpus import pack_corpus
    from datasleuth.lm.trace import TraceConfig, scan_corpus, trace_details

    words = ["the", "cat", "sat", "on", "a", "mat", "while", "dogs", "ran", "in", "parks"]
    tok = build_tokenizer([" ".join(words)] * 4, vocab_size=300)
    model, task = tiny_gpt2(vocab=len(tok)), CausalLMTask()
    lines = [" ".join(words[i:] + words[:i]) for i in range(6)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    corpus = pack_corpus(tmp_path / "d.jsonl", tok, seq_len=10, output_dir=tmp_path / "c",
                         progress=False)
    loader = [corpus.collate(list(range(len(corpus))))]
    curv = fit_curvature(model, task, loader, ["*.attn.*", "*.mlp.c_fc"],
                         FitConfig(fisher="empirical"), progress=False)
    ids = tok(" the cat sat", add_special_tokens=False)["input_ids"]
    query = lm_batch([ids])
    pre = precondition_queries(model, task, curv, [query], progress=False)
    config = TraceConfig(top_k=3, bottom_k=2, batch_size=4)
    scan = scan_corpus(model, pre, corpus, config, progress=False)
    doc = trace_details(model, pre, corpus, scan,
                        [{"id": "q", "prompt": " the cat", "completion": " sat"}], config, {})
    q = doc["queries"][0]
    assert set(q["head_labels"]) == {n for n in pre if ".attn." in n}
    for row in q["top"] + q["bottom"]:
        for name, shares in row["head_scores"].items():
            layer_score = row["layer_scores"][q["layer_names"].index(name)]
            assert abs(sum(shares) - layer_score) <= 1e-9 * max(1.0, abs(layer_score))


def test_llama_heads_with_grouped_query_attention_sum_to_the_layer_score():
    """q_proj rows per head, k/v rows per key/value head, o_proj columns per head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=11, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=4,
                      max_position_embeddings=16)
    model, task = LlamaForCausalLM(cfg).double().eval(), CausalLMTask()
    train, queries = _data()
    curv = fit_curvature(model, task, train, ["*.self_attn.*"], FitConfig(fisher="empirical"),
                         progress=False)
    splits = attention_heads(model, curv.layer_names)
    labels = {name.rsplit(".", 1)[1]: split.labels for name, split in splits.items()}
    assert labels == {"q_proj": ["h0", "h1", "h2", "h3"], "k_proj": ["kv0", "kv1"],
                      "v_proj": ["kv0", "kv1"], "o_proj": ["h0", "h1", "h2", "h3"]}
    o_proj = splits["model.layers.0.self_attn.o_proj"]
    assert o_proj.side == "in" and o_proj.index[2].tolist() == [8, 9, 10, 11]
    pre = precondition_queries(model, task, curv, queries, progress=False)
    got = sequence_head_scores(model, task, pre, train, splits)
    pairwise = pairwise_scores(model, task, curv, queries, train, progress=False)
    for j, name in enumerate(curv.layer_names):
        torch.testing.assert_close(got[name].sum(-1), pairwise.per_layer[..., j].t(),
                                   rtol=1e-8, atol=1e-12)
