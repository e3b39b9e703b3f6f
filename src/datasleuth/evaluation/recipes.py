"""Evaluation problems ("recipes"): a model, its data, and how to retrain it (docs/method.md §8).

A :class:`Recipe` says everything :func:`datasleuth.evaluation.suite.evaluate` needs:

* ``build() -> Problem``: the model trained on the full training set, its task, the
  training and query datasets (map-style, scored in order), how to batch them, and which
  training examples were corrupted (if any, for mislabel detection);
* ``train(indices, seed) -> state_dict``: retrain **from scratch** on the training
  examples ``indices`` (sorted int64), deterministically by ``seed``;
* ``measure(state_dict) -> (Q,)``: the query measurements of a retrained model — the
  same quantity the task's ``measurement`` computes (e.g. log p(label | x)).

Built-in recipes (offline, CPU, seconds per retraining):

``digits``
    scikit-learn's ``load_digits`` (8×8 images, ships with scikit-learn), standardised;
    an MLP 64→32→10 (tanh, float64) trained full-batch with L-BFGS to convergence on
    mean cross-entropy + (wd/2)‖θ‖² (wd = 0.01), 1000 training images; the recommended
    damping is wd, since the Hessian of that objective is G + wd·I; queries: 50 test images,
    measurement log p(true label | x).
``digits-mislabeled``
    the same with 10% of the training labels flipped to another class (``is_corrupt``
    marks them): self-influence should rank them first (Koh & Liang 2017, §5.4).
``fact-tracing``
    a 2-block GPT-2 on synthetic facts with paraphrased teaching documents and keyword
    decoys; queries in training wording and reworded; ``Problem.relevant`` marks each
    query's teaching documents (:mod:`datasleuth.evaluation.fact_tracing`).
``tiny-lm``
    a one-block GPT-2 (transformers ``GPT2LMHeadModel``, d=24, float64) trained with
    full-batch Adam on 128 procedurally generated sequences of word tokens ("alice in
    paris . bob likes tea ."), where 30% of the stated facts are noise; queries: 8
    prompt/completion pairs such as "alice in" → "paris", measurement
    log p(completion | prompt) via
    :class:`~datasleuth.lm.task.CausalLMTask`. The MLP layers are tracked.

User recipes: ``load_recipe("path/to/file.py")`` **executes that Python file** (it is
the user's own code, named explicitly) and takes its module-level ``recipe`` (a
:class:`Recipe`), or else its module-level functions ``build``, ``train`` and
``measure`` (plus optional ``NAME``, ``DESCRIPTION``, ``FINGERPRINT``)::

    # my_recipe.py
    from datasleuth.evaluation.recipes import Problem, Recipe

    def build() -> Problem: ...
    def train(indices, seed): ...          # -> state_dict of the retrained model
    def measure(state_dict): ...           # -> (Q,) measurements
    recipe = Recipe("mine", build, train, measure, fingerprint="data-v1")
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from datasleuth.errors import DatasleuthError
from datasleuth.task import ClassificationTask, Task

__all__ = [
    "Problem",
    "Recipe",
    "BUILTIN_RECIPES",
    "load_recipe",
    "digits_recipe",
    "tiny_lm_recipe",
    "measure_state",
    "train_full_batch",
]

StateDict = dict[str, Tensor]


@dataclass
class Problem:
    """What one evaluation works on: the trained model, its task and data.

    ``train`` and ``queries`` are map-style datasets, batched in order (no shuffling)
    with ``collate`` (default: torch's; ``query_collate`` for the queries if given) and
    ``batch_size``, so score column i is training example i. ``layers``: glob patterns of
    the tracked layers (None = every Linear/Conv1D layer). ``is_corrupt``: (N,) bool mask
    of corrupted training examples, or None. ``damping``: an absolute damping the recipe
    recommends for every estimator (None = each estimator's default, see
    :func:`datasleuth.evaluation.suite.evaluate`). ``estimator_options``: keyword
    arguments per estimator name (e.g. LiSSA's ``depth``). ``relevant``: per query, the
    training examples known to teach it (fact tracing: the suite then reports recall@k
    and MRR of them), with ``query_groups`` naming each query's group (e.g. its wording).
    """

    model: nn.Module
    task: Task
    train: Dataset
    queries: Dataset
    collate: Callable[[list[Any]], Any] | None = None
    batch_size: int = 64
    layers: Sequence[str] | None = None
    is_corrupt: np.ndarray | None = None
    damping: float | None = None
    estimator_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    query_collate: Callable[[list[Any]], Any] | None = None
    relevant: Sequence[Sequence[int]] | None = None
    query_groups: Sequence[str] | None = None

    def loader(self, which: str = "train") -> DataLoader:
        """In-order DataLoader over the ``"train"`` or ``"queries"`` dataset."""
        if which == "train":
            data, collate = self.train, self.collate
        else:
            data, collate = self.queries, self.query_collate or self.collate
        return DataLoader(data, batch_size=self.batch_size, shuffle=False, collate_fn=collate)

    @property
    def n_train(self) -> int:
        return len(self.train)  # type: ignore[arg-type]


@dataclass
class Recipe:
    """An evaluation problem: ``build``, ``train(indices, seed)``, ``measure(state)``.

    ``fingerprint`` names everything that determines a retraining result (data, model,
    training settings); the LDS cache refuses entries made under another fingerprint.
    :meth:`problem` builds once and keeps the result.
    """

    name: str
    build: Callable[[], Problem]
    train: Callable[[np.ndarray, int], StateDict]
    measure: Callable[[StateDict], np.ndarray]
    description: str = ""
    fingerprint: str = ""
    _problem: Problem | None = field(default=None, init=False, repr=False)

    def problem(self) -> Problem:
        """The built :class:`Problem` (built on first use, then reused)."""
        if self._problem is None:
            problem = self.build()
            if not isinstance(problem, Problem):
                raise DatasleuthError(
                    f"recipe {self.name!r}: build() returned a {type(problem).__name__}, not a "
                    "Problem; return datasleuth.evaluation.recipes.Problem(...)"
                )
            self._problem = problem
        return self._problem


def measure_state(
    make_model: Callable[[], nn.Module], task: Task, queries: DataLoader, state: StateDict
) -> np.ndarray:
    """Load ``state`` into a fresh ``make_model()`` and return its query measurements (Q,)."""
    model = make_model()
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        values = [task.measurement(model, batch).reshape(-1) for batch in queries]
    return torch.cat(values).double().numpy()


# ----------------------------------------------------------------------------- digits


class _Digits:
    """load_digits + a tanh MLP trained to convergence with full-batch L-BFGS."""

    def __init__(self, mislabeled: bool, n_train: int = 1000, n_queries: int = 50,
                 hidden: int = 32, weight_decay: float = 1e-2, max_iter: int = 300,
                 flip_fraction: float = 0.1, seed: int = 0):
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)  # (1797, 64), (1797,)
        if n_train + n_queries > len(x):
            raise DatasleuthError(f"digits has {len(x)} images; n_train + n_queries must not "
                                  "exceed it")
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(x))
        tr, te = order[:n_train], order[n_train:n_train + n_queries]
        mean, std = x[tr].mean(0), x[tr].std(0)
        std[std == 0] = 1.0
        self.x = torch.from_numpy((x[tr] - mean) / std)  # (N, 64) float64
        self.y = torch.from_numpy(y[tr]).long()  # (N,)
        self.is_corrupt: np.ndarray | None = None
        if mislabeled:
            flip = rng.choice(n_train, size=round(flip_fraction * n_train), replace=False)
            shift = torch.from_numpy(rng.integers(1, 10, size=flip.size))
            self.y[flip] = (self.y[flip] + shift) % 10  # always a different class
            self.is_corrupt = np.zeros(n_train, dtype=bool)
            self.is_corrupt[flip] = True
        self.xq = torch.from_numpy((x[te] - mean) / std)  # (Q, 64)
        self.yq = torch.from_numpy(y[te]).long()  # (Q,) true labels
        self.hidden, self.weight_decay, self.max_iter = hidden, weight_decay, max_iter
        self.task = ClassificationTask()
        self.fingerprint = (f"digits:mislabeled={mislabeled}:n={n_train}:q={n_queries}:"
                            f"h={hidden}:wd={weight_decay}:it={max_iter}:flip={flip_fraction}:"
                            f"seed={seed}:v1")

    def make_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(64, self.hidden), nn.Tanh(),
                             nn.Linear(self.hidden, 10)).double()

    def train(self, indices: np.ndarray, seed: int) -> StateDict:
        """Minimise mean CE + (wd/2)‖θ‖² on ``indices`` from a ``seed``-determined init."""
        torch.manual_seed(int(seed))
        model = self.make_model()
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        x, y = self.x[idx], self.y[idx]
        params = list(model.parameters())
        opt = torch.optim.LBFGS(params, lr=1.0, max_iter=self.max_iter,
                                max_eval=2 * self.max_iter, tolerance_grad=1e-9,
                                tolerance_change=1e-14, history_size=50,
                                line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            opt.zero_grad()
            penalty = sum(p.square().sum() for p in params)
            loss = F.cross_entropy(model(x), y) + 0.5 * self.weight_decay * penalty
            loss.backward()
            return loss

        opt.step(closure)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def build(self) -> Problem:
        model = self.make_model()
        model.load_state_dict(self.train(np.arange(len(self.x)), 0))
        model.eval()
        return Problem(model, self.task, TensorDataset(self.x, self.y),
                       TensorDataset(self.xq, self.yq), batch_size=250,
                       is_corrupt=self.is_corrupt, damping=self.weight_decay,
                       estimator_options={"lissa": {"depth": 300, "batch_size": 250},
                                          "cg": {"tol": 1e-8, "max_iter": 300}})

    def measure(self, state: StateDict) -> np.ndarray:
        queries = DataLoader(TensorDataset(self.xq, self.yq), batch_size=len(self.xq))
        return measure_state(self.make_model, self.task, queries, state)


def digits_recipe(mislabeled: bool = False, **options: Any) -> Recipe:
    """The built-in ``digits`` (or ``digits-mislabeled``) recipe; options as in the module doc."""
    d = _Digits(mislabeled, **options)
    name = "digits-mislabeled" if mislabeled else "digits"
    text = (f"load_digits, MLP 64-{d.hidden}-10 tanh, L-BFGS full batch, wd={d.weight_decay}, "
            f"{len(d.x)} training images" + (", 10% labels flipped" if mislabeled else "")
            + f", {len(d.xq)} test queries, f = log p(true label | x)")
    return Recipe(name, d.build, d.train, d.measure, text, d.fingerprint)


# ----------------------------------------------------------------------------- tiny LM

_NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy",
          "kim", "liam", "mona", "nina", "oscar", "peggy"]
_CITIES = ["paris", "rome", "oslo", "lima", "cairo", "delhi", "tokyo", "quito"]
_FOODS = ["tea", "rice", "soup", "bread", "figs", "plums", "corn", "beans"]
_SPECIAL = ["<bos>", "<pad>", "in", "likes", "."]


class _TinyWorld(Dataset):
    """Word-level sequences of facts, packed to at most ``seq_len`` tokens (CONTRACT batches)."""

    def __init__(self, rows: list[list[int]], pad: int):
        self.rows, self.pad = rows, pad

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.rows[i], "index": i}


def _collate_lm(pad: int, prompt_lengths: Sequence[int] | None = None):
    """Collate rows into CONTRACT batches; queries get labels only after their prompt."""

    def collate(items: list[dict[str, Any]]) -> dict[str, Tensor]:
        width = max(len(it["input_ids"]) for it in items)
        b = len(items)
        ids = torch.full((b, width), pad, dtype=torch.long)  # (B, T)
        mask = torch.zeros((b, width), dtype=torch.long)  # (B, T)
        for r, it in enumerate(items):
            ids[r, : len(it["input_ids"])] = torch.tensor(it["input_ids"])
            mask[r, : len(it["input_ids"])] = 1
        labels = ids.masked_fill(mask == 0, -100)  # (B, T)
        if prompt_lengths is not None:
            for r, it in enumerate(items):
                labels[r, : prompt_lengths[it["index"]]] = -100
        index = torch.tensor([it["index"] for it in items], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "index": index}

    return collate


class _TinyLM:
    """Facts about people, some of them noise; a one-block GPT-2 trained full-batch."""

    def __init__(self, n_sequences: int = 128, seq_len: int = 24, noise: float = 0.3,
                 n_embd: int = 24, n_inner: int = 48, steps: int = 300, lr: float = 1e-2,
                 seed: int = 0):
        from datasleuth.lm.task import CausalLMTask

        rng = np.random.default_rng(seed)
        self.vocab = {w: i for i, w in enumerate(_SPECIAL + _NAMES + _CITIES + _FOODS)}
        v = self.vocab
        home = {n: _CITIES[int(rng.integers(len(_CITIES)))] for n in _NAMES}
        food = {n: _FOODS[int(rng.integers(len(_FOODS)))] for n in _NAMES}

        def sentence() -> list[int]:
            name = _NAMES[int(rng.integers(len(_NAMES)))]
            noisy = rng.random() < noise
            if rng.random() < 0.5:
                city = _CITIES[int(rng.integers(len(_CITIES)))] if noisy else home[name]
                return [v[name], v["in"], v[city], v["."]]
            dish = _FOODS[int(rng.integers(len(_FOODS)))] if noisy else food[name]
            return [v[name], v["likes"], v[dish], v["."]]

        rows = []
        for _ in range(n_sequences):
            row = [v["<bos>"]]
            while True:
                s = sentence()
                if len(row) + len(s) > seq_len:
                    break
                row += s
            rows.append(row)
        self.train_data = _TinyWorld(rows, v["<pad>"])
        queries, prompt_lengths = [], []
        for i, name in enumerate(_NAMES[:8]):
            if i % 2 == 0:
                prompt, completion = [name, "in"], [home[name]]
            else:
                prompt, completion = [name, "likes"], [food[name]]
            ids = [v["<bos>"]] + [v[w] for w in prompt + completion]
            queries.append(ids)
            prompt_lengths.append(1 + len(prompt))
        self.query_text = [
            (" ".join(_word(v, q[1:p])), " ".join(_word(v, q[p:])))
            for q, p in zip(queries, prompt_lengths)
        ]
        self.query_data = _TinyWorld(queries, v["<pad>"])
        self.collate = _collate_lm(v["<pad>"])
        self.query_collate = _collate_lm(v["<pad>"], prompt_lengths)
        self.seq_len, self.n_embd, self.n_inner = seq_len, n_embd, n_inner
        self.steps, self.lr = steps, lr
        self.task = CausalLMTask()
        self.fingerprint = (f"tiny-lm:n={n_sequences}:T={seq_len}:noise={noise}:d={n_embd}:"
                            f"ff={n_inner}:steps={steps}:lr={lr}:seed={seed}:v1")

    def make_model(self) -> nn.Module:
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(vocab_size=len(self.vocab), n_positions=self.seq_len,
                         n_embd=self.n_embd, n_layer=1, n_head=2, n_inner=self.n_inner,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                         bos_token_id=self.vocab["<bos>"], eos_token_id=self.vocab["<bos>"],
                         pad_token_id=self.vocab["<pad>"])
        return GPT2LMHeadModel(cfg).double()

    def train(self, indices: np.ndarray, seed: int) -> StateDict:
        """Full-batch Adam with cosine decay on ``indices``, from a ``seed``-determined init."""
        torch.manual_seed(int(seed))
        batch = self.collate([self.train_data[int(i)] for i in indices])
        return train_full_batch(self.make_model(), self.task, batch, self.steps, self.lr)

    def build(self) -> Problem:
        model = self.make_model()
        model.load_state_dict(self.train(np.arange(len(self.train_data)), 0))
        model.eval()
        return Problem(model, self.task, self.train_data, self.query_data,
                       collate=self.collate, batch_size=64,
                       layers=["transformer.h.*.mlp.*"],
                       estimator_options={"lissa": {"depth": 200, "batch_size": 64},
                                          "cg": {"tol": 1e-6, "max_iter": 100}},
                       query_collate=self.query_collate)

    def measure(self, state: StateDict) -> np.ndarray:
        queries = DataLoader(self.query_data, batch_size=len(self.query_data),
                             collate_fn=self.query_collate)
        return measure_state(self.make_model, self.task, queries, state)


def train_full_batch(model: nn.Module, task: Task, batch: Any, steps: int, lr: float
                     ) -> StateDict:
    """``steps`` of full-batch Adam (cosine-decayed ``lr``) on the mean of ``task``'s
    per-example losses over ``batch``; the trained state."""
    model.train()
    n = task.batch_size(batch)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * s / steps)))
    for _ in range(steps):
        loss = task.loss(model, batch).sum() / n
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _word(vocab: dict[str, int], ids: Sequence[int]) -> list[str]:
    inverse = {i: w for w, i in vocab.items()}
    return [inverse[i] for i in ids]


def tiny_lm_recipe(**options: Any) -> Recipe:
    """The built-in ``tiny-lm`` recipe; options as in :class:`_TinyLM`."""
    t = _TinyLM(**options)
    text = (f"1-block GPT-2 (d={t.n_embd}, ff={t.n_inner}) on {len(t.train_data)} sequences of "
            f"word-level facts, full-batch Adam {t.steps} steps; {len(t.query_data)} queries "
            "such as " + repr(" -> ".join(t.query_text[0]))
            + ", f = log p(completion | prompt)")
    return Recipe("tiny-lm", t.build, t.train, t.measure, text, t.fingerprint)


# ----------------------------------------------------------------------------- loading

BUILTIN_RECIPES: dict[str, Callable[[], Recipe]] = {
    "digits": lambda: digits_recipe(False),
    "digits-mislabeled": lambda: digits_recipe(True),
    "tiny-lm": tiny_lm_recipe,
    "fact-tracing": lambda: _fact_tracing(),
}


def _fact_tracing() -> Recipe:
    from datasleuth.evaluation.fact_tracing import fact_tracing_recipe

    return fact_tracing_recipe()


def load_recipe(spec: str | Recipe) -> Recipe:
    """A built-in recipe by name, or the recipe defined by the Python file at ``spec``.

    Loading a file **executes it** (see the module docstring for what it must define).
    """
    if isinstance(spec, Recipe):
        return spec
    spec = str(spec)
    if spec in BUILTIN_RECIPES:
        return BUILTIN_RECIPES[spec]()
    path = Path(spec)
    if path.suffix != ".py":
        raise DatasleuthError(
            f"unknown recipe {spec!r}; choose one of {', '.join(BUILTIN_RECIPES)} or give the "
            "path of a .py file that defines `recipe = Recipe(...)`"
        )
    if not path.is_file():
        raise DatasleuthError(f"recipe file {path} does not exist; check the path")
    module_spec = importlib.util.spec_from_file_location(f"datasleuth_recipe_{path.stem}", path)
    if module_spec is None or module_spec.loader is None:
        raise DatasleuthError(f"cannot import {path} as Python; give a .py file")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as e:
        raise DatasleuthError(f"{path}:{e.lineno}: syntax error in the recipe ({e.msg}); fix "
                              "the file") from None
    except Exception as e:  # the user's own code failed while defining the recipe
        raise DatasleuthError(f"running the recipe file {path} failed ({type(e).__name__}: "
                              f"{e}); fix the file") from e
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    found = getattr(module, "recipe", None)
    if isinstance(found, Recipe):
        if not found.fingerprint:
            found.fingerprint = f"file:{digest}"
        return found
    missing = [f for f in ("build", "train", "measure") if not callable(getattr(module, f, None))]
    if missing:
        raise DatasleuthError(
            f"{path} defines neither `recipe = Recipe(...)` nor the functions "
            f"{', '.join(missing)}; add them (see datasleuth.evaluation.recipes)"
        )
    return Recipe(
        str(getattr(module, "NAME", path.stem)), module.build, module.train, module.measure,
        str(getattr(module, "DESCRIPTION", "")),
        str(getattr(module, "FINGERPRINT", f"file:{digest}")),
    )
