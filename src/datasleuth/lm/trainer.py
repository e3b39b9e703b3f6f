"""Fit the curvature during training: a transformers ``TrainerCallback`` (docs/method.md §3).

How a two-pass method fits into training. EK-FAC needs the Kronecker factors A and S
(pass 1) before their eigenbases exist, and the eigenvalue correction (pass 2) must
rotate gradients into those bases. The callback records the batches of the last
``last_steps`` optimizer steps (their token ids, labels and masks, on the CPU, as the
training loop feeds them to the model: every micro-batch of gradient accumulation),
and when training ends runs both passes over those recorded batches with the final
weights: factors, eigendecomposition, eigenvalue correction, as
:func:`datasleuth.fit_curvature` would on the same batches, with labels sampled from
the model (the true Fisher) unless ``FitConfig(fisher="empirical")``. So

* the factors describe the weights the influence queries will use, not an average
  over weights that moved during the window;
* the result is exactly that of a separate fit on the same batches (tested in float64);
* nothing is read twice from the corpus; the cost is the fit's own passes over the
  window's batches (EK-FAC: two forward+backward passes per batch), after training,
  and memory for the window's token ids.

The alternative of accumulating per step (pass 1 on steps [a, b), eigendecomposition,
pass 2 on [b, c)) saves storing the batches but mixes statistics of different weights,
and its pass 2 would see other batches than pass 1; it is not what this callback does.

The factors are written as a curvature file that the CLI takes with ``--factors FILE``
(``datasleuth trace``, ``self-influence``), instead of fitting on the corpus.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers.trainer_callback import TrainerCallback

from datasleuth.curvature import Curvature
from datasleuth.distributed import barrier, world
from datasleuth.errors import DatasleuthError
from datasleuth.fitting import FitConfig, fit_curvature
from datasleuth.layers import layers_by_name
from datasleuth.lm.model import default_layers
from datasleuth.lm.task import CausalLMTask
from datasleuth.storage import load_curvature, load_tensors, save_curvature
from datasleuth.task import Task

__all__ = ["CurvatureCallback", "load_factors"]


def _batch_of(kwargs: dict[str, Any]) -> dict[str, Tensor] | None:
    """The docs/CONTRACT.md batch of one model call (CPU copies), or None if not an LM call."""
    ids = kwargs.get("input_ids")
    if not isinstance(ids, Tensor) or ids.dim() != 2:
        return None
    mask = kwargs.get("attention_mask")
    mask = torch.ones_like(ids) if not isinstance(mask, Tensor) else mask
    labels = kwargs.get("labels")
    if not isinstance(labels, Tensor):
        labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids.detach().cpu(), "attention_mask": mask.detach().cpu().long(),
            "labels": labels.detach().cpu(), "index": torch.arange(ids.shape[0])}


class CurvatureCallback(TrainerCallback):
    """Fit curvature on the batches of the last ``last_steps`` training steps (module doc).

    ``last_epochs`` (instead of ``last_steps``) counts epochs of
    ``state.max_steps / state.num_train_epochs`` steps. ``layers`` are glob patterns
    (default: the MLP layers, as the CLI). The fitted :class:`Curvature` is kept as
    ``self.curvature`` and written to ``output`` (rank 0) when training ends.
    """

    def __init__(self, output: str | os.PathLike, last_steps: int | None = None, *,
                 last_epochs: float | None = None, layers: Sequence[str] | None = None,
                 config: FitConfig | None = None, task: Task | None = None):
        if (last_steps is None) == (last_epochs is None):
            raise DatasleuthError("give last_steps or last_epochs (one of them), e.g. "
                                  "CurvatureCallback('factors.safetensors', last_steps=200)")
        if (last_steps is not None and last_steps < 1) or (last_epochs is not None
                                                           and not last_epochs > 0):
            raise DatasleuthError("last_steps must be >= 1 and last_epochs > 0")
        self.output = Path(output)
        self.last_steps, self.last_epochs = last_steps, last_epochs
        self.layers = list(layers) if layers else None
        self.config = config or FitConfig()
        self.task = task or CausalLMTask()
        self.batches: list[dict[str, Tensor]] = []
        self.curvature: Curvature | None = None
        self._first = 0  # first step (global_step before it) of the window
        self._recording = False
        self._handle: Any = None

    def on_train_begin(self, args, state, control, model: nn.Module | None = None, **kwargs):
        if model is None:
            raise DatasleuthError("the Trainer passed no model to the callback")
        steps = self.last_steps if self.last_steps is not None else round(
            self.last_epochs * state.max_steps / max(state.num_train_epochs, 1))
        self._first = max(0, state.max_steps - max(int(steps), 1))
        self.batches = []
        self._handle = model.register_forward_pre_hook(self._record, with_kwargs=True)

    def on_step_begin(self, args, state, control, **kwargs):
        self._recording = state.global_step >= self._first

    def on_step_end(self, args, state, control, **kwargs):
        self._recording = False

    def _record(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._recording and module.training and torch.is_grad_enabled():
            batch = _batch_of(kwargs)
            if batch is not None:
                self.batches.append(batch)

    def on_train_end(self, args, state, control, model: nn.Module | None = None, **kwargs):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if not self.batches:
            raise DatasleuthError("the callback recorded no batch: the model was not called "
                                  "with input_ids in the last steps")
        layers = default_layers(model, include=self.layers)
        curvature = fit_curvature(model, self.task, self.batches, layers, self.config,
                                  progress=False)
        curvature.metadata.update(source="trainer", steps=[self._first, state.global_step])
        if world()[0] == 0:
            self.output.parent.mkdir(parents=True, exist_ok=True)
            save_curvature(curvature, self.output)
        barrier()
        self.curvature = curvature
        self.batches = []


def load_factors(path: str | os.PathLike, model: nn.Module) -> Curvature:
    """A curvature file (e.g. from :class:`CurvatureCallback`) for ``model``, checked
    against the model's weights and the file's own layers."""
    if not Path(path).is_file():
        raise DatasleuthError(f"--factors {path} does not exist; pass a curvature file written "
                              "by datasleuth (fit or the Trainer callback)")
    _, meta = load_tensors(path)
    names = list(meta.get("layers", {}))
    return load_curvature(path, model, layers_by_name(model, names))
