"""The fact-tracing recipe: which documents taught the model a fact? (docs/method.md §10)

A small GPT-2 is trained on a synthetic corpus of facts about people (where each lives,
what each likes to eat), built offline from word-level templates:

* **teaching documents**: each fact is stated by ``teaching`` documents, each in a
  different paraphrase (``teaching`` of the four templates of its relation, chosen at
  random per fact);
* **keyword decoys**: per fact, ``decoys`` documents that mention the same person and
  the same value in the query's own wording, but state *another* person's fact (one
  that has the same value) and merely mention the person: "bako lives in oslo . dumi
  waves to bako ." is a decoy for "dumi lives in oslo". A decoy states its own fact, so
  it counts as a teaching document of *that* fact.

Queries ask ``queried`` random facts twice: in **training wording** (the template of the
fact's first teaching document) and **reworded** (the template its teaching documents
left out, which the corpus uses only for other people's facts); the measurement is
log p(value | prompt). The ground truth of a query is every document that states its
fact (:attr:`Problem.relevant`); the suite reports recall@k and MRR of those documents
for every method (``query_groups`` splits the two wordings). Word overlap alone cannot
tell teaching documents from decoys: a decoy holds every word of the training-wording
query; influence should follow what the documents teach the model.

Document order is shuffled, so ties in a ranking are broken at random with respect to
relevance. Retraining on subsets (for the LDS) uses the same recipe from scratch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from datasleuth.errors import DatasleuthError
from datasleuth.evaluation.recipes import (
    _CITIES,
    _FOODS,
    Problem,
    Recipe,
    StateDict,
    _collate_lm,
    _TinyWorld,
    measure_state,
    train_full_batch,
)

__all__ = ["FactConfig", "TINY_FACTS", "fact_tracing_recipe", "GROUPS"]

TEMPLATES = {
    "city": ["{p} lives in {v} .", "the home of {p} is in {v} .", "{p} has a house in {v} .",
             "you can visit {p} at home in {v} ."],
    "food": ["{p} likes to eat {v} .", "the favourite food of {p} is {v} .",
             "{p} often cooks {v} .", "for dinner {p} always wants {v} ."],
}
VALUES = {"city": _CITIES, "food": _FOODS}
MENTIONS = ["{p} waves to {q} .", "{q} once met {p} .", "{p} writes to {q} ."]
GROUPS = ("training wording", "reworded")
_SPECIAL = ["<bos>", "<pad>"]


@dataclass(frozen=True)
class FactConfig:
    """Sizes of the fact world and of its model (defaults: the benchmark's world)."""

    people: int = 48
    teaching: int = 3  # documents stating each fact, each in another paraphrase (<= 3)
    decoys: int = 2  # keyword decoys per fact
    queried: int = 24  # facts asked, each in both wordings
    n_embd: int = 64
    n_layer: int = 2
    n_inner: int = 128
    steps: int = 120
    lr: float = 5e-3
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.teaching <= 3:
            raise DatasleuthError(f"teaching must be 1..3 (one template is kept for the "
                                  f"reworded query), got {self.teaching}")
        if self.people < 8 or self.decoys < 0 or self.steps < 1:
            raise DatasleuthError("people must be >= 8, decoys >= 0 and steps >= 1")
        if not 1 <= self.queried <= 2 * self.people:
            raise DatasleuthError(f"queried must be 1..{2 * self.people} (two facts per "
                                  f"person), got {self.queried}")


TINY_FACTS = FactConfig(people=10, teaching=2, decoys=1, queried=4, n_embd=16, n_layer=1,
                        n_inner=32, steps=60, lr=2e-2)
"""A world small enough for the test suite (seconds)."""


def _names(n: int, rng: np.random.Generator) -> list[str]:
    """``n`` distinct made-up two-syllable names ("bako", "dumi", ...)."""
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    names: list[str] = []
    while len(names) < n:
        name = str(rng.choice(syllables)) + str(rng.choice(syllables))
        if name not in names:
            names.append(name)
    return names


def _fill(template: str, **slots: str) -> list[str]:
    return template.format(**slots).split()


class _FactWorld:
    """The documents, queries and ground truth of one :class:`FactConfig`."""

    def __init__(self, config: FactConfig):
        c, rng = config, np.random.default_rng(config.seed)
        self.config = c
        self.names = _names(c.people, rng)
        self.facts = [(p, r, str(rng.choice(VALUES[r]))) for p in self.names for r in TEMPLATES]
        docs: list[tuple[list[str], list[int]]] = []  # (words, facts it states)
        kept = []  # per fact: the template left out of its teaching documents
        for f, (p, r, v) in enumerate(self.facts):
            order = rng.permutation(len(TEMPLATES[r]))
            kept.append(int(order[-1]))
            docs += [(_fill(TEMPLATES[r][int(t)], p=p, v=v), [f]) for t in order[: c.teaching]]
        firsts = [self._first_template(f, docs) for f in range(len(self.facts))]
        for f in range(len(self.facts)):
            docs += [self._decoy(f, firsts[f], kept, rng) for _ in range(c.decoys)]
        order = rng.permutation(len(docs))  # shuffled: ties fall at random
        self.docs = [docs[i][0] for i in order]
        self.relevant_of = {f: [] for f in range(len(self.facts))}
        for position, i in enumerate(order):
            for f in docs[i][1]:
                self.relevant_of[f].append(position)
        asked = rng.choice(len(self.facts), size=c.queried, replace=False)
        self.queries = [(int(f), g, firsts[f] if g == GROUPS[0] else kept[f])
                        for f in asked for g in GROUPS]
        self._vocabulary()

    def _first_template(self, f: int, docs: list[tuple[list[str], list[int]]]) -> int:
        p, r, v = self.facts[f]
        words = next(w for w, fs in docs if fs == [f])
        return next(t for t, tpl in enumerate(TEMPLATES[r]) if _fill(tpl, p=p, v=v) == words)

    def _decoy(self, f: int, template: int, kept: list[int], rng: np.random.Generator
               ) -> tuple[list[str], list[int]]:
        """Another person's fact with the same value, in the query's wording, plus a mention.

        The stated fact is one whose reworded query does not use this wording.
        """
        p, r, v = self.facts[f]
        others = [g for g, (q, s, _) in enumerate(self.facts)
                  if s == r and q != p and kept[g] != template]
        same = [g for g in others if self.facts[g][2] == v] or others
        g = int(rng.choice(same))
        q, _, w = self.facts[g]
        words = _fill(TEMPLATES[r][template], p=q, v=w)
        words += _fill(str(rng.choice(MENTIONS)), p=p, q=q)
        return words, [g]

    def _vocabulary(self) -> None:
        words = sorted({w for d in self.docs for w in d}
                       | {w for r in TEMPLATES for t in TEMPLATES[r] for w in t.split()
                          if not w.startswith("{")} | {v for vs in VALUES.values() for v in vs})
        self.vocab = {w: i for i, w in enumerate(_SPECIAL + words)}

    def ids(self, words: list[str]) -> list[int]:
        return [self.vocab["<bos>"]] + [self.vocab[w] for w in words]

    def query_rows(self) -> tuple[list[list[int]], list[int], list[tuple[str, str]]]:
        """Token rows, prompt lengths (with <bos>) and (prompt, completion) texts."""
        rows, lengths, texts = [], [], []
        for f, _, t in self.queries:
            p, r, v = self.facts[f]
            words = _fill(TEMPLATES[r][t], p=p, v=v)
            cut = words.index(v)
            rows.append(self.ids(words[: cut + 1]))
            lengths.append(cut + 1)
            texts.append((" ".join(words[:cut]), v))
        return rows, lengths, texts


class _FactRecipe:
    """The fact world as a :class:`Recipe`: build, retrain on subsets, measure."""

    def __init__(self, config: FactConfig):
        from datasleuth.lm.task import CausalLMTask

        self.world = _FactWorld(config)
        self.config = config
        pad = self.world.vocab["<pad>"]
        rows, lengths, self.query_text = self.world.query_rows()
        self.train_data = _TinyWorld([self.world.ids(d) for d in self.world.docs], pad)
        self.query_data = _TinyWorld(rows, pad)
        self.collate = _collate_lm(pad)
        self.query_collate = _collate_lm(pad, lengths)
        self.seq_len = max(len(r) for r in self.train_data.rows + rows)
        self.task = CausalLMTask()
        self.fingerprint = "facts:" + ":".join(f"{k}={v}" for k, v in asdict(config).items()) \
            + ":v1"

    def make_model(self) -> nn.Module:
        from transformers import GPT2Config, GPT2LMHeadModel

        c, v = self.config, self.world.vocab
        cfg = GPT2Config(vocab_size=len(v), n_positions=self.seq_len, n_embd=c.n_embd,
                         n_layer=c.n_layer, n_head=4 if c.n_embd % 4 == 0 else 1,
                         n_inner=c.n_inner, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                         bos_token_id=v["<bos>"], eos_token_id=v["<bos>"],
                         pad_token_id=v["<pad>"])
        return GPT2LMHeadModel(cfg)  # float32: training is the benchmark's cost

    def train(self, indices: np.ndarray, seed: int) -> StateDict:
        """Full-batch Adam with cosine decay on ``indices``, from a ``seed``-determined init."""
        torch.manual_seed(int(seed))
        batch = self.collate([self.train_data[int(i)] for i in indices])
        return train_full_batch(self.make_model(), self.task, batch, self.config.steps,
                                self.config.lr)

    def build(self) -> Problem:
        model = self.make_model()
        model.load_state_dict(self.train(np.arange(len(self.train_data)), 0))
        model.eval()
        w = self.world
        return Problem(model, self.task, self.train_data, self.query_data,
                       collate=self.collate, batch_size=64, layers=["transformer.h.*.mlp.*"],
                       estimator_options={"lissa": {"depth": 200, "batch_size": 64},
                                          "cg": {"tol": 1e-6, "max_iter": 100}},
                       query_collate=self.query_collate,
                       relevant=[list(w.relevant_of[f]) for f, _, _ in w.queries],
                       query_groups=[g for _, g, _ in w.queries])

    def measure(self, state: StateDict) -> np.ndarray:
        loader = torch.utils.data.DataLoader(self.query_data, batch_size=len(self.query_data),
                                             collate_fn=self.query_collate)
        return measure_state(self.make_model, self.task, loader, state)


def fact_tracing_recipe(config: FactConfig | None = None, **options: Any) -> Recipe:
    """The built-in ``fact-tracing`` recipe (module doc); ``options`` override
    :class:`FactConfig` fields."""
    config = FactConfig(**{**asdict(config or FactConfig()), **options})
    r = _FactRecipe(config)
    w = r.world
    prompt, value = r.query_text[0]
    text = (f"{config.n_layer}-block GPT-2 (d={config.n_embd}) on {len(w.docs)} documents "
            f"stating {len(w.facts)} facts about {config.people} people (per fact: "
            f"{config.teaching} paraphrased teaching documents, {config.decoys} keyword "
            f"decoys), full-batch Adam {config.steps} steps; {len(w.queries)} queries such as "
            f"{prompt + ' -> ' + value!r} in training wording and reworded, "
            "f = log p(value | prompt)")
    return Recipe("fact-tracing", r.build, r.train, r.measure, text, r.fingerprint)
