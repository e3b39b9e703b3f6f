"""Fit per-layer curvature by streaming over a data loader (docs/method.md §3).

Pass 1 (K-FAC, EK-FAC): accumulate the token-averaged factors A = E[ā āᵀ] and
S = E[Ds Dsᵀ] (optionally only their O diagonal blocks), then eigendecompose them,
batched on the model's device (float64 on CPUs, checked float32 on GPUs). Pass 2
(EK-FAC) or the only pass (diagonal): accumulate per-sequence summed pseudo-gradients
DW̄_seq = Σ_t Ds_t ā_tᵀ rotated into the eigenbasis, per token or per sequence
whichever costs less, and squared (George et al. 2018; Grosse et al. 2023, Eq. 20).
Pseudo-gradients come from labels sampled from the model (true Fisher = Gauss-Newton
for matching losses), or from the true labels when ``fisher="empirical"``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from datasleuth.curvature import (
    CURVATURES,
    Basis,
    Curvature,
    LayerCurvature,
    eigh_batched,
)
from datasleuth.distributed import active, all_reduce_int, all_reduce_sum, rank_seed, world
from datasleuth.errors import DatasleuthError
from datasleuth.finite import check_sums, check_weights
from datasleuth.layers import TrackedLayer, resolve_layers
from datasleuth.memory import blocks_for_budget
from datasleuth.preconditioner import DEFAULT_DAMPING_SCALE, resolve_damping
from datasleuth.progress import stop_requested
from datasleuth.storage import load_tensors, model_fingerprint, save_tensors
from datasleuth.streaming import BatchEnd, evaluation, stream
from datasleuth.sums import (
    Workspace,
    add_gram,
    add_widened,
    nonzero_rows,
    sum_of_squares,
    symmetrize,
)
from datasleuth.task import Task
from datasleuth.utils import compute_dtype

__all__ = ["EIGH_PRECISIONS", "FitConfig", "fit_curvature", "pass_seed"]

EIGH_PRECISIONS = ("device", "auto", "float64", "float32")


@dataclass(frozen=True)
class FitConfig:
    """How curvature is fitted. Written into the metadata of every fitted artifact.

    Attributes:
        curvature: ``"ekfac"`` (default), ``"kfac"``, ``"diagonal"`` or ``"identity"``.
        damping: absolute damping λ for every layer; ``None`` means
            ``damping_scale`` × mean eigenvalue of each layer (Grosse et al. use 0.1).
        damping_scale: relative damping used when ``damping`` is ``None``.
        fisher: ``"sampled"`` labels from the model (true Fisher, default) or
            ``"empirical"`` (the data's own labels).
        blocks: split A and S into this many diagonal blocks (1 = no split).
        seed: seed of the label sampler. Each pass draws its own labels from a stream
            derived from ``seed`` and the pass (:func:`pass_seed`), so the eigenvalues
            are not fitted on the very labels that chose the eigenbasis.
        max_batches: stop each pass after this many batches (``None`` = all).
        max_factor_memory: bytes a layer's factor sums may take; a layer over it gets
            more blocks than ``blocks`` (:func:`datasleuth.memory.blocks_for_budget`).
        shared_labels: ``True`` reproduces fits made before passes had their own labels
            (both passes draw the same labels, which biases the eigenvalues); for
            before/after comparisons only.
        eigh_precision: precision of the eigendecompositions of A and S. ``"device"``
            (default): ``"auto"`` on GPUs for float32/bf16/fp16 models, else ``"float64"``;
            ``"auto"``: float32, each result checked and redone in float64 where its error
            exceeds :data:`datasleuth.curvature.EIGH_TOLERANCE` (on a CPU about half the
            time of float64; scores then differ from one process count to another at about
            1e-3 where eigenvalues cluster); ``"float64"``; ``"float32"`` (unchecked).
    """

    curvature: str = "ekfac"
    damping: float | None = None
    damping_scale: float = DEFAULT_DAMPING_SCALE
    fisher: str = "sampled"
    blocks: int = 1
    seed: int = 0
    max_batches: int | None = None
    max_factor_memory: int | None = None
    shared_labels: bool = False
    eigh_precision: str = "device"

    def __post_init__(self) -> None:
        if self.curvature not in CURVATURES:
            raise DatasleuthError(
                f"unknown curvature {self.curvature!r}; choose one of {', '.join(CURVATURES)}"
            )
        if self.fisher not in ("sampled", "empirical"):
            raise DatasleuthError(f"fisher must be 'sampled' or 'empirical', not {self.fisher!r}")
        if self.eigh_precision not in EIGH_PRECISIONS:
            raise DatasleuthError(f"eigh_precision must be one of {', '.join(EIGH_PRECISIONS)}, "
                                  f"not {self.eigh_precision!r}")
        if self.damping is not None:
            resolve_damping(self.damping, "every layer")  # finite and > 0, or a clear error
        if not (math.isfinite(self.damping_scale) and self.damping_scale > 0):
            raise DatasleuthError(f"damping_scale must be finite and > 0, got "
                                  f"{self.damping_scale}; use e.g. 0.1")
        if not (isinstance(self.blocks, int) and self.blocks >= 1):
            raise DatasleuthError(f"blocks must be a positive integer, got {self.blocks!r}")
        if self.max_batches is not None and self.max_batches < 1:
            raise DatasleuthError("max_batches must be >= 1 or None")
        if self.max_factor_memory is not None and self.max_factor_memory <= 0:
            raise DatasleuthError(f"max_factor_memory must be > 0 bytes or None, got "
                                  f"{self.max_factor_memory}; e.g. 4 * 2**30 for 4 GiB")


def pass_seed(config: FitConfig, phase: str) -> int:
    """Seed of the label sampler of one fitting pass (``"factors"`` or ``"eigenvalues"``).

    The factor pass uses ``config.seed``; the eigenvalue pass a seed hashed from it, so the
    two passes draw independent labels yet every fit with the same seed draws the same
    ones (``shared_labels``: both use ``config.seed``). Distinct per process
    (:func:`~datasleuth.distributed.rank_seed`).
    """
    if phase == "factors" or config.shared_labels:
        return rank_seed(config.seed)
    digest = hashlib.sha256(f"datasleuth/{phase}/{config.seed}".encode()).digest()
    return rank_seed(int.from_bytes(digest[:8], "little") >> 4)


def _block_bounds(n: int, blocks: int) -> list[tuple[int, int]]:
    """Split range(n) into ``min(blocks, n)`` near-equal contiguous pieces."""
    k = min(blocks, n)
    edges = [round(i * n / k) for i in range(k + 1)]
    return list(zip(edges[:-1], edges[1:]))


class _Stats:
    """Streaming sums for one layer."""

    def __init__(self, layer: TrackedLayer, blocks: int):
        p, m = layer.grad_shape
        self.in_bounds = _block_bounds(m, blocks)
        self.out_bounds = _block_bounds(p, blocks)
        self.a_cov = [torch.zeros(e - s, e - s, dtype=torch.float64) for s, e in self.in_bounds]
        self.s_cov = [torch.zeros(e - s, e - s, dtype=torch.float64) for s, e in self.out_bounds]
        self.lam = torch.zeros(p, m, dtype=torch.float64)
        self.tokens = 0  # unmasked tokens seen by the factor pass
        self.sequences = 0  # sequences seen by the eigenvalue pass (or factor pass for K-FAC)

    def on(self, device: torch.device) -> _Stats:
        """Keep the sums where the activations are (the model's device), in float64."""
        if self.lam.device != device:
            self.a_cov = [c.to(device) for c in self.a_cov]
            self.s_cov = [c.to(device) for c in self.s_cov]
            self.lam = self.lam.to(device)
        return self


def _layer_blocks(layer: TrackedLayer, config: FitConfig) -> int:
    """``config.blocks``, or more where the layer's factors would exceed the budget."""
    if config.curvature not in ("kfac", "ekfac"):
        return config.blocks
    return blocks_for_budget(layer.grad_shape, config.max_factor_memory, config.blocks,
                             layer.name)


def fit_curvature(
    model: nn.Module,
    task: Task,
    loader: Iterable[Any],
    layers: Sequence[str] | Sequence[TrackedLayer] | None = None,
    config: FitConfig | None = None,
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_seconds: float = 300.0,
    checkpoint_key: str = "",
    keep_checkpoint: bool = False,
) -> Curvature:
    """Fit curvature of every tracked layer on the batches of ``loader``.

    ``loader`` is iterated once (identity: never; diagonal: once; K-FAC: once;
    EK-FAC: twice), in the model's train-free (eval) mode, and must yield the same
    batches in the same order every time. With ``checkpoint``, the running sums (and
    the label sampler's state) are saved there every ``checkpoint_seconds``; a killed
    fit re-run with the same model, layers, configuration and ``checkpoint_key``
    resumes after the last saved batch and gives the result of an uninterrupted fit.
    ``keep_checkpoint`` leaves the last snapshot for the caller to delete once the
    result is safely saved.
    """
    config = config or FitConfig()
    tracked = resolve_layers(model, layers)
    check_weights(model)  # NaN/Inf weights: named here, not as NaN factors later
    rank, size = world()
    key = json.dumps([checkpoint_key, model_fingerprint(model, tracked), asdict(config),
                      [layer.name for layer in tracked], rank, size], sort_keys=True)
    saver = _Checkpoint(checkpoint, key, checkpoint_seconds)
    with evaluation(model):
        stats = {layer.name: _Stats(layer, _layer_blocks(layer, config)) for layer in tracked}
        bases = _fit_passes(model, task, loader, tracked, stats, config, saver, progress)
    if not keep_checkpoint:
        saver.clear()
    layers_out = {layer.name: _layer_curvature(layer, stats[layer.name], bases[layer.name],
                                               config) for layer in tracked}
    some = next(iter(stats.values()))
    metadata = {
        "config": asdict(config),
        "fingerprint": model_fingerprint(model, tracked),
        "layer_shapes": {layer.name: list(layer.grad_shape) for layer in tracked},
        "sequences": some.sequences,
        "tokens": some.tokens,
    }
    return Curvature(config.curvature, layers_out, metadata)


def _fit_passes(
    model: nn.Module, task: Task, loader: Iterable[Any], tracked: list[TrackedLayer],
    stats: dict[str, _Stats], config: FitConfig, saver: _Checkpoint, progress: bool,
) -> dict[str, tuple]:
    """Run the factor pass (K-FAC, EK-FAC) and the eigenvalue pass (EK-FAC, diagonal).

    Returns each layer's (Q_S, Q_A, Λ_S, Λ_A), all None without Kronecker factors.
    """
    objective = "sampled" if config.fisher == "sampled" else "loglik"
    phase, done, bases = saver.restore(stats)
    if config.curvature in ("kfac", "ekfac") and phase == "factors":
        gen = saver.generator(config, "factors")
        on_layer, on_batch = _covariance_callbacks(stats)
        stream(model, task, loader, tracked, on_layer, objective=objective,
               on_batch=lambda end: (on_batch(end), saver.save("factors", end.position + 1,
                                                               stats, None, gen)),
               generator=gen, start=done, max_batches=config.max_batches,
               desc="fit factors", progress=progress)
        _reduce(stats, model, factors=True)
        bases = _eigenbases(stats, _eigh_precision(model, config.eigh_precision))
        phase, done = "eigenvalues", 0
        if config.curvature == "ekfac":
            saver.save("eigenvalues", 0, stats, bases, None, force=True)
    elif bases is None:
        bases = {name: (None, None, None, None) for name in stats}
    if config.curvature in ("ekfac", "diagonal"):
        gen = saver.generator(config, "eigenvalues")
        if done == 0:  # the eigenvalue pass counts its own sequences
            for s in stats.values():
                s.sequences = 0
        stream(model, task, loader, tracked, _eigenvalue_fn(stats, bases), objective=objective,
               on_batch=lambda end: _count_and_save(stats, end, saver, bases, gen),
               generator=gen, start=done, max_batches=config.max_batches,
               desc="fit eigenvalues", progress=progress)
        _reduce(stats, model, factors=False)
    return bases


def _count_and_save(stats: dict[str, _Stats], end: BatchEnd, saver: _Checkpoint,
                    bases: dict, generator: torch.Generator) -> None:
    for s in stats.values():
        s.sequences += end.size
    check_sums({n: [s.lam] for n, s in stats.items()}, "the eigenvalue sum", end.position)
    saver.save("eigenvalues", end.position + 1, stats, bases, generator)


def _layer_curvature(layer: TrackedLayer, s: _Stats, basis: tuple,
                     config: FitConfig) -> LayerCurvature:
    """The fitted eigenvalues Λ and damping λ_ℓ of one layer, on the CPU (§3)."""
    q_out, q_in, lam_s, lam_a = basis
    if config.curvature == "identity":
        lam, damping = torch.zeros(layer.grad_shape, dtype=torch.float64), 1.0
    else:
        if config.curvature == "kfac":
            _require(s.tokens, layer)
            lam = (s.tokens / s.sequences) * torch.outer(lam_s, lam_a)  # T̄ · (Λ_S ⊗ Λ_A)
        else:
            _require(s.sequences, layer)
            lam = s.lam / s.sequences  # E_seq[(Q_Sᵀ DW̄ Q_A)^∘2]
        damping = resolve_damping(config.damping, layer.name, float(lam.mean()),
                                  config.damping_scale)
    # Fitted artifacts live on the CPU; scoring moves them to the model's device.
    return LayerCurvature(lam, float(damping), q_out, q_in, lam_s, lam_a).to("cpu")


class _Checkpoint:
    """Snapshots of a fit in progress (safetensors + JSON header, atomic writes)."""

    def __init__(self, path: str | os.PathLike | None, key: str, seconds: float):
        self.path = Path(path) if path is not None else None
        self.key = key
        self.seconds = seconds
        self.last = time.monotonic()
        self.state: torch.Tensor | None = None
        self.state_phase = ""

    def generator(self, config: FitConfig, phase: str) -> torch.Generator:
        """The label sampler of a pass: seeded, or where a resumed pass left it."""
        gen = torch.Generator().manual_seed(pass_seed(config, phase))
        if self.state is not None and self.state_phase == phase:
            gen.set_state(self.state)
        return gen

    def restore(self, stats: dict[str, _Stats]) -> tuple[str, int, dict | None]:
        """(phase, batches done, eigenbases or None) of a matching snapshot, else a fresh start."""
        if self.path is None or not self.path.is_file():
            return "factors", 0, None
        try:
            tensors, meta = load_tensors(self.path)
        except DatasleuthError:
            return "factors", 0, None
        if meta.get("key") != self.key:
            return "factors", 0, None
        bases: dict | None = None
        for name, s in stats.items():
            if f"{name}/a_cov/0" in tensors:  # absent once the factors were decomposed
                s.a_cov = [tensors[f"{name}/a_cov/{i}"] for i in range(len(s.in_bounds))]
                s.s_cov = [tensors[f"{name}/s_cov/{i}"] for i in range(len(s.out_bounds))]
            s.lam = tensors[f"{name}/lam"]
            s.tokens, s.sequences = meta["counts"][name]
        if meta["phase"] == "eigenvalues" and f"{next(iter(stats))}/lam_s" in tensors:
            bases = {}
            for name, s in stats.items():
                q_in = Basis([tensors[f"{name}/q_in/{i}"] for i in range(len(s.in_bounds))])
                q_out = Basis([tensors[f"{name}/q_out/{i}"] for i in range(len(s.out_bounds))])
                bases[name] = (q_out, q_in, tensors[f"{name}/lam_s"], tensors[f"{name}/lam_a"])
        if "generator" in tensors:
            self.state, self.state_phase = tensors["generator"], meta["phase"]
        return meta["phase"], int(meta["batches"]), bases

    def save(self, phase: str, batches: int, stats: dict[str, _Stats], bases: dict | None,
             generator: torch.Generator | None, force: bool = False) -> None:
        stop = stop_requested()  # SIGINT/SIGTERM: snapshot now, then stop
        if self.path is None or (not force and not stop and
                                 time.monotonic() - self.last < self.seconds):
            if stop:
                raise KeyboardInterrupt
            return
        tensors: dict[str, Tensor] = {}
        for name, s in stats.items():
            for i, c in enumerate(s.a_cov):
                tensors[f"{name}/a_cov/{i}"] = c
            for i, c in enumerate(s.s_cov):
                tensors[f"{name}/s_cov/{i}"] = c
            tensors[f"{name}/lam"] = s.lam
            if bases is not None and bases[name][0] is not None:
                q_out, q_in, lam_s, lam_a = bases[name]
                tensors.update({f"{name}/q_in/{i}": b for i, b in enumerate(q_in.blocks)})
                tensors.update({f"{name}/q_out/{i}": b for i, b in enumerate(q_out.blocks)})
                tensors[f"{name}/lam_s"], tensors[f"{name}/lam_a"] = lam_s, lam_a
        if generator is not None:
            tensors["generator"] = generator.get_state()
        meta = {"key": self.key, "phase": phase, "batches": batches,
                "counts": {n: [s.tokens, s.sequences] for n, s in stats.items()}}
        save_tensors(self.path, tensors, meta)
        self.last = time.monotonic()
        if stop:
            raise KeyboardInterrupt

    def clear(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def _reduce(stats: dict[str, _Stats], model: nn.Module, factors: bool) -> None:
    """Sum one pass's statistics over processes (datasleuth.distributed); no-op alone."""
    if not active():
        return
    device = next(model.parameters()).device
    for s in stats.values():
        s.on(device)
        if factors:
            all_reduce_sum(s.a_cov + s.s_cov)
            s.tokens = all_reduce_int(s.tokens, device)
        else:
            all_reduce_sum([s.lam])
        s.sequences = all_reduce_int(s.sequences, device)


def _require(count: int, layer: TrackedLayer) -> None:
    if count == 0:
        raise DatasleuthError(
            f"layer {layer.name!r} saw no data while fitting; pass a non-empty loader"
        )


def _covariance_callbacks(stats: dict[str, _Stats]):
    """Accumulate A and S (their diagonal blocks) over unmasked tokens (§3)."""
    positions: dict[str, int] = {}
    work = Workspace()

    def on_layer(layer: TrackedLayer, a: Tensor, g: Tensor) -> None:
        s = stats[layer.name].on(a.device)
        # (B*T, M+1) and (B*T, P) less their all-zero rows (padding, unrouted tokens)
        a2 = nonzero_rows(a.reshape(-1, a.shape[-1]))
        g2 = nonzero_rows(g.reshape(-1, g.shape[-1]))
        for i, (lo, hi) in enumerate(s.in_bounds):
            add_gram(s.a_cov[i], a2[:, lo:hi], work)
        for i, (lo, hi) in enumerate(s.out_bounds):
            add_gram(s.s_cov[i], g2[:, lo:hi], work)
        positions[layer.name] = a.shape[0] * a.shape[1]

    def on_batch(end: BatchEnd) -> None:
        masked = int(end.mask.sum()) if end.mask is not None else None
        for name, s in stats.items():
            s.tokens += masked if masked is not None else positions[name]
            s.sequences += end.size
        check_sums({n: s.a_cov for n, s in stats.items()}, "the input covariance", end.position)
        check_sums({n: s.s_cov for n, s in stats.items()}, "the gradient covariance",
                   end.position)

    return on_layer, on_batch


def _eigh_precision(model: nn.Module, choice: str = "device") -> str:
    """The precision of :func:`~datasleuth.curvature.eigh_batched` for ``choice``
    (:attr:`FitConfig.eigh_precision`). ``"device"``: float32 checked (``"auto"``) on
    GPUs for float32/bf16/fp16 models, else float64.

    On a CPU float64 costs about twice float32 (a 3072-wide factor: 3.1 s against 1.6 s
    on 2 threads), and float32's rounding moves EK-FAC's eigenvalues within
    near-degenerate clusters enough to change token scores at 1e-3 between one and two
    processes, so CPUs keep float64 unless asked.
    """
    if choice != "device":
        return choice
    p = next(model.parameters())
    return "auto" if p.device.type != "cpu" and compute_dtype(model) != torch.float64 else "float64"


def _eigenbases(stats: dict[str, _Stats], precision: str) -> dict[str, tuple]:
    """(Q_S, Q_A, Λ_S, Λ_A) of every layer; frees the accumulated factors.

    Every block of every layer's token-averaged A and S goes to one batched
    eigendecomposition per size, on the device the sums are on, at ``precision``
    (:func:`_eigh_precision`; float32 is checked against
    :data:`datasleuth.curvature.EIGH_TOLERANCE`).
    """
    names = list(stats)
    mats = [symmetrize(c).div_(max(stats[n].tokens, 1)) for n in names
            for c in stats[n].a_cov + stats[n].s_cov]  # in place; add_gram kept the lower half
    counts = {n: (len(stats[n].a_cov), len(stats[n].s_cov)) for n in names}
    for n in names:  # ``mats`` holds the only references: each is freed once decomposed
        stats[n].a_cov, stats[n].s_cov = [], []
    pairs = iter(eigh_batched(mats, precision, consume=True))
    bases = {}
    for name in names:
        ins = [next(pairs) for _ in range(counts[name][0])]
        outs = [next(pairs) for _ in range(counts[name][1])]
        bases[name] = (Basis([q for _, q in outs]), Basis([q for _, q in ins]),
                       torch.cat([lam for lam, _ in outs]), torch.cat([lam for lam, _ in ins]))
    return bases


def _eigenvalue_fn(stats: dict[str, _Stats], bases: dict):
    """Accumulate Σ_seq (Q_Sᵀ DW̄_seq Q_A)^∘2 (diagonal Fisher: Q = I) (§3)."""
    cast: dict[tuple, tuple] = {}  # the bases in the activations' dtype, converted once
    work = Workspace()

    def on_layer(layer: TrackedLayer, a: Tensor, g: Tensor) -> None:
        s = stats[layer.name].on(a.device)
        key = (layer.name, a.dtype, a.device)
        if key not in cast:
            cast[key] = tuple(None if q is None else q.to(a.device, a.dtype)
                              for q in bases[layer.name][:2])
        q_out, q_in = cast[key]
        add_widened(s.lam, sum_of_squares(a, g, q_out, q_in, work))

    return on_layer
