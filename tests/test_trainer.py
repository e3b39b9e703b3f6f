"""The Trainer callback's factors equal a separate fit on the same batches (float64).

A tiny GPT-2 trains for 5 steps with a sequential sampler and gradient accumulation
(2 micro-batches a step); the callback records the last 3 steps and fits EK-FAC at the
end. The reference: :func:`fit_curvature` of the trained model on the 6 micro-batches
of those steps, built here from the dataset.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import lm_batch, tiny_gpt2
from torch.utils.data import SequentialSampler

from datasleuth import FitConfig, fit_curvature
from datasleuth.demo import build_tokenizer
from datasleuth.errors import DatasleuthError
from datasleuth.lm import CurvatureCallback
from datasleuth.lm.task import CausalLMTask
from datasleuth.lm.trainer import load_factors

STEPS, LAST, MICRO, ACCUMULATE = 5, 3, 2, 2


def _collate(rows):
    batch = lm_batch([r["ids"] for r in rows])
    batch.pop("index")  # the model's forward takes no index
    return batch


def _train(tmp_path, callback):
    from transformers import Trainer, TrainingArguments

    class SequentialTrainer(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    g = torch.Generator().manual_seed(4)
    rows = [{"ids": torch.randint(0, 11, (int(n),), generator=g).tolist()}
            for n in torch.randint(3, 9, (STEPS * MICRO * ACCUMULATE,), generator=g)]
    tok = build_tokenizer(["the cat sat on a mat while dogs ran"] * 4, vocab_size=300)
    model = tiny_gpt2(vocab=len(tok))
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=STEPS,
                             per_device_train_batch_size=MICRO,
                             gradient_accumulation_steps=ACCUMULATE, learning_rate=0.05,
                             report_to=[], save_strategy="no", logging_strategy="no",
                             use_cpu=True, disable_tqdm=True, remove_unused_columns=False)
    SequentialTrainer(model=model, args=args, train_dataset=rows, data_collator=_collate,
                      callbacks=[callback]).train()
    return model.eval(), rows, tok


def test_callback_factors_equal_a_fit_on_the_same_batches(tmp_path):
    config = FitConfig(seed=3)  # sampled labels, the default Fisher
    callback = CurvatureCallback(tmp_path / "factors.safetensors", last_steps=LAST,
                                 layers=["*.mlp.*"], config=config)
    model, rows, tok = _train(tmp_path, callback)
    first = (STEPS - LAST) * MICRO * ACCUMULATE
    batches = [lm_batch([r["ids"] for r in rows[i:i + MICRO]])
               for i in range(first, len(rows), MICRO)]
    want = fit_curvature(model, CausalLMTask(), batches, ["*.mlp.*"], config, progress=False)
    got = load_factors(tmp_path / "factors.safetensors", model)
    assert got.metadata["sequences"] == LAST * MICRO * ACCUMULATE
    assert got.metadata["steps"] == [STEPS - LAST, STEPS]
    assert got.layer_names == want.layer_names
    for name, layer in want.layers.items():
        torch.testing.assert_close(got.layers[name].dense(), layer.dense(), rtol=1e-9,
                                   atol=1e-12)
        torch.testing.assert_close(callback.curvature.layers[name].eigenvalues,
                                   layer.eigenvalues, rtol=1e-9, atol=1e-14)
    # the factors belong to the trained weights: another model's are refused
    with pytest.raises(DatasleuthError, match="different model"):
        load_factors(tmp_path / "factors.safetensors", tiny_gpt2(vocab=len(tok), seed=1))
    _cli_uses_the_factors(tmp_path, model, tok)


def _cli_uses_the_factors(tmp_path, model, tok):
    """`self-influence --factors FILE` scores with the callback's factors, fitting nothing;
    `--fsdp` outside torchrun is one error line."""
    from datasleuth.cli import main

    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    lines = ["the cat sat on a mat", "dogs ran while the cat sat", "a mat"]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    common = ["--model", str(tmp_path / "model"), "--corpus", str(tmp_path / "docs.jsonl"),
              "--workdir", str(tmp_path / "work"), "--seq-len", "8"]
    assert main(["self-influence", *common, "--factors", str(tmp_path / "factors.safetensors"),
                 "--out", str(tmp_path / "si")]) == 0
    doc = json.loads((tmp_path / "si" / "self_influence.json").read_text())
    assert doc["n_sequences"] >= 2 and doc["top"][0]["self_influence"] > 0
    assert not list((tmp_path / "work").glob("factors-*.safetensors"))  # nothing was fitted
    assert main(["fit", *common, "--fsdp"]) == 2


def test_callback_needs_a_window():
    with pytest.raises(DatasleuthError, match="last_steps or last_epochs"):
        CurvatureCallback("f.safetensors")
    with pytest.raises(DatasleuthError, match=">= 1"):
        CurvatureCallback("f.safetensors", last_steps=0)


def test_last_epochs_counts_steps_of_an_epoch():
    from types import SimpleNamespace

    callback = CurvatureCallback("f.safetensors", last_epochs=1.5)
    state = SimpleNamespace(max_steps=40, num_train_epochs=4, global_step=0)
    model = tiny_gpt2()
    callback.on_train_begin(None, state, None, model=model)
    assert callback._first == 40 - 15  # 1.5 epochs of 10 steps
    for step, recording in ((24, False), (25, True)):
        state.global_step = step
        callback.on_step_begin(None, state, None)
        assert callback._recording is recording
    callback._handle.remove()
