"""Agreement with Kronfluence on the same model, data, damping and Fisher.

Two models made here (no download): an MLP classifier (64-32-10, tanh) trained on
scikit-learn's digits, and a 2-block Llama-style LM (``nn.Linear`` MLPs, the layer type
Kronfluence wraps) trained briefly on sequences from a random bigram chain. Both tools
fit each curvature (identity, diagonal, K-FAC, EK-FAC) with the empirical Fisher, so no
sampled labels differ, damp with their shared default heuristic (0.1 × mean eigenvalue
per layer) and score the same queries against the same training examples. Prints the
Pearson correlation over all (query, example) pairs, the mean per-query Pearson and
Spearman correlations, the mean top-10 overlap per query and the relative difference
of the score matrices (same scale and sign convention, so this can be small too).

Kronfluence's scores use the gradient of the training loss; datasleuth's that of the
log-likelihood (docs/CONTRACT.md), so its scores are negated before comparing.

    pip install --no-deps kronfluence==1.0.1 einconv && pip install accelerate einops \\
        opt-einsum scikit-learn
    python benchmarks/compare_kronfluence.py
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings

os.environ.setdefault("DATASLEUTH_PROGRESS", "0")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from kronfluence.analyzer import Analyzer, prepare_model  # noqa: E402
from kronfluence.arguments import FactorArguments, ScoreArguments  # noqa: E402
from kronfluence.task import Task as KronfluenceTask  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from datasleuth import ClassificationTask, FitConfig, fit_curvature, pairwise_scores  # noqa: E402
from datasleuth.evaluation.metrics import correlations, pearson, top_k_overlap  # noqa: E402
from datasleuth.lm.task import CausalLMTask  # noqa: E402

STRATEGIES = {"identity": "identity", "diagonal": "diagonal", "kfac": "kfac", "ekfac": "ekfac"}


class _Rows(Dataset):
    def __init__(self, rows: list) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        return self.rows[i]


class _KClassification(KronfluenceTask):
    def compute_train_loss(self, batch, model, sample=False):
        x, y = batch
        logits = model(x)
        if sample:  # not used: both tools run with the empirical Fisher here
            with torch.no_grad():
                y = torch.multinomial(F.softmax(logits, -1), 1).flatten()
        return F.cross_entropy(logits, y, reduction="sum")

    def compute_measurement(self, batch, model):
        x, y = batch
        return -F.cross_entropy(model(x), y, reduction="sum")


class _KLanguage(KronfluenceTask):
    def __init__(self, modules: list[str]) -> None:
        self.modules = modules

    def _nll(self, batch, model):
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=-100, reduction="sum")

    def compute_train_loss(self, batch, model, sample=False):
        return self._nll(batch, model)

    def compute_measurement(self, batch, model):
        return -self._nll(batch, model)

    def get_influence_tracked_modules(self):
        return self.modules


def _digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(),
                                torch.nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(model(x[:1000]), y[:1000]).backward()
        opt.step()
    train = [(x[i], y[i]) for i in range(1000)]
    queries = [(x[i], y[i]) for i in range(1000, 1030)]
    return model, train, queries


def _language():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    vocab, t = 64, 24
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=t, bos_token_id=None, eos_token_id=None,
                      pad_token_id=None)
    model = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(0)
    succ = torch.randint(0, vocab, (vocab, 3), generator=g)
    ids = torch.empty(300, t, dtype=torch.long)
    ids[:, 0] = torch.randint(0, vocab, (300,), generator=g)
    for j in range(1, t):
        ids[:, j] = succ[ids[:, j - 1], torch.randint(0, 3, (300,), generator=g)]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(150):
        b = ids[(step * 16) % 256:(step * 16) % 256 + 16]
        opt.zero_grad()
        model(input_ids=b, labels=b).loss.backward()
        opt.step()
    model.eval()

    def row(seq: torch.Tensor, prompt: int = 0) -> dict:
        labels = seq.clone()
        labels[:prompt] = -100
        return {"input_ids": seq, "attention_mask": torch.ones_like(seq), "labels": labels}

    train = [row(ids[i]) for i in range(256)]
    queries = [row(ids[i], prompt=t // 2) for i in range(256, 276)]
    return model, train, queries


def _datasleuth(model, task, train, queries, layers, kind):
    loader = DataLoader(_Rows(train), batch_size=32)
    curv = fit_curvature(model, task, loader, layers,
                         FitConfig(curvature=kind, fisher="empirical"), progress=False)
    return pairwise_scores(model, task, curv, DataLoader(_Rows(queries), batch_size=16),
                           loader, progress=False).total


def _kronfluence(model, task, train, queries, kind, workdir):
    model = prepare_model(model, task)
    analyzer = Analyzer(analysis_name=kind, model=model, task=task, cpu=True,
                        disable_tqdm=True, output_dir=workdir, log_level=logging.ERROR)
    analyzer.fit_all_factors(factors_name=kind, dataset=_Rows(train), per_device_batch_size=32,
                             factor_args=FactorArguments(strategy=STRATEGIES[kind],
                                                         use_empirical_fisher=True),
                             overwrite_output_dir=True)
    analyzer.compute_pairwise_scores(scores_name=kind, factors_name=kind,
                                     query_dataset=_Rows(queries), train_dataset=_Rows(train),
                                     per_device_query_batch_size=16,
                                     per_device_train_batch_size=32,
                                     score_args=ScoreArguments(damping_factor=None),
                                     overwrite_output_dir=True)
    return analyzer.load_pairwise_scores(kind)["all_modules"]


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    print("| model | curvature | Pearson, all pairs | Pearson per query | Spearman per query "
          "| top-10 overlap | ‖a − b‖ / ‖b‖ |")
    print("|---|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        cases = [("digits MLP", _digits, ClassificationTask(), _KClassification(), None)]
        mlp = ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj",
               "model.layers.0.mlp.down_proj", "model.layers.1.mlp.gate_proj",
               "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
        cases.append(("Llama-style LM", _language, CausalLMTask(), _KLanguage(mlp), mlp))
        for name, build, ours, theirs, layers in cases:
            model, train, queries = build()
            for kind in STRATEGIES:
                import copy

                a = _datasleuth(model, ours, train, queries, layers, kind)
                b = -_kronfluence(copy.deepcopy(model), theirs, train, queries, kind,
                                  os.path.join(tmp, name.replace(" ", "_")))
                c = correlations(a, b)
                print(f"| {name} | {kind} | {pearson(a.flatten(), b.flatten()):.4f} | "
                      f"{c['mean_pearson']:.4f} | {c['mean_spearman']:.4f} | "
                      f"{top_k_overlap(a, b, 10):.3f} | {float((a - b).norm() / b.norm()):.1e} |",
                      flush=True)


if __name__ == "__main__":
    main()
