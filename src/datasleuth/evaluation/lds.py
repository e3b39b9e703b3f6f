"""Linear datamodeling score (LDS) and its retraining driver (docs/method.md §8).

Park et al. 2023 (TRAK), Eq. 5 / Def. 3: draw J random subsets S_j of the training set
(each holding a fraction α = 0.5 of it), train a model on each, and measure every query
q. Attribution scores predict the output additively,

    g_q(S_j) = Σ_{i ∈ S_j} scores[q, i],

and the LDS of query q is the Spearman correlation across j between g_q(S_j) and the
measured output (averaged over training seeds). The reported LDS is the mean over
queries. With datasleuth's sign convention (CONTRACT.md: score > 0 raises the
measurement) a good estimator has a positive LDS.

``run_lds_experiments`` does the retraining with a cache keyed by (subset, seed), so an
interrupted or repeated run never retrains a model it has already measured.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load_numpy
from safetensors.numpy import save as st_save_numpy
from tqdm.auto import tqdm

from datasleuth.errors import DatasleuthError
from datasleuth.evaluation.metrics import spearman
from datasleuth.storage import write_bytes, write_json

__all__ = ["LDSResult", "make_subsets", "lds", "subset_hash", "run_lds_experiments"]

_FORMAT = "datasleuth.lds.v1"
_MANIFEST = "lds_manifest.json"


@dataclass(frozen=True)
class LDSResult:
    """LDS per query (Spearman across subsets) and its mean over the finite entries."""

    per_query: np.ndarray
    mean: float

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form: ``{"mean": float, "per_query": [floats]}``."""
        return {"mean": self.mean, "per_query": [float(v) for v in self.per_query]}


def make_subsets(n_train: int, n_subsets: int, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """Random training subsets for the LDS: a bool mask of shape (J, N) (TRAK, α = ``fraction``).

    Every subset holds exactly ``round(fraction * n_train)`` examples drawn without
    replacement. Subsets are drawn one after another from one generator, so the first
    J rows do not depend on ``n_subsets``: growing ``n_subsets`` later reuses the
    cached runs of the earlier subsets.
    """
    n_train, n_subsets, fraction = int(n_train), int(n_subsets), float(fraction)
    if n_train < 2:
        raise DatasleuthError(
            f"n_train must be at least 2, got {n_train}; pass the training-set size"
        )
    if n_subsets < 2:
        raise DatasleuthError(
            f"n_subsets must be at least 2 for a rank correlation, got {n_subsets}; use 50 or more"
        )
    if not 0.0 < fraction < 1.0:
        raise DatasleuthError(
            f"fraction must lie strictly between 0 and 1, got {fraction}; use 0.5"
        )
    size = round(fraction * n_train)
    if not 1 <= size <= n_train - 1:
        raise DatasleuthError(
            f"fraction={fraction} of n_train={n_train} gives {size} examples per subset; "
            "choose a fraction that keeps some but not all examples"
        )
    rng = np.random.default_rng(seed)
    masks = np.zeros((n_subsets, n_train), dtype=bool)
    for j in range(n_subsets):
        masks[j, rng.choice(n_train, size=size, replace=False)] = True
    return masks


def lds(scores: object, subsets: object, outputs: object) -> LDSResult:
    """Linear datamodeling score (docs/method.md §8; Park et al. 2023, Def. 3).

    ``scores``: (Q, N) attribution scores (or (N,) for one query). ``subsets``: (J, N)
    bool masks. ``outputs``: measured query outputs of the model trained on each
    subset, (J, Q), or (J, seeds, Q) which is averaged over seeds first ((J,) is
    accepted when Q = 1). Per query: Spearman correlation across j between
    Σ_{i∈S_j} scores[q, i] and the output; ``nan`` where either is constant.
    """
    sc = np.asarray(scores, dtype=np.float64)
    if sc.ndim == 1:
        sc = sc[None, :]
    if sc.ndim != 2:
        raise DatasleuthError(
            f"scores must be (queries, N), got shape {sc.shape}; reshape the scores"
        )
    masks = np.asarray(subsets)
    if masks.ndim != 2 or masks.dtype != bool:
        raise DatasleuthError(
            f"subsets must be a (J, N) boolean mask, got {masks.dtype} {masks.shape}; "
            "use make_subsets(...)"
        )
    q, n = sc.shape
    j = masks.shape[0]
    if masks.shape[1] != n:
        raise DatasleuthError(
            f"subsets cover {masks.shape[1]} training examples but scores cover {n}; "
            "score every training example in order"
        )
    out = np.asarray(outputs, dtype=np.float64)
    if out.ndim == 3:
        out = out.mean(axis=1)
    elif out.ndim == 1 and q == 1:
        out = out[:, None]
    if out.shape != (j, q):
        raise DatasleuthError(
            f"outputs must be (J={j}, Q={q}) or (J, seeds, Q), got {np.shape(outputs)}; "
            "pass one measurement per subset and query"
        )
    predictions = masks.astype(np.float64) @ sc.T  # (J, Q)
    per_query = np.array([spearman(predictions[:, i], out[:, i]) for i in range(q)])
    finite = per_query[np.isfinite(per_query)]
    mean = float(finite.mean()) if finite.size else math.nan
    return LDSResult(per_query=per_query, mean=mean)


def subset_hash(mask: np.ndarray) -> str:
    """SHA-256 (hex) identifying a subset mask, including the training-set size."""
    mask = np.asarray(mask, dtype=bool).reshape(-1)
    h = hashlib.sha256(f"n_train={mask.size};".encode())
    h.update(np.packbits(mask).tobytes())
    return h.hexdigest()


def _check_manifest(cache_dir: Path, expected: dict[str, Any]) -> None:
    """Create the cache manifest, or refuse a cache made for another experiment."""
    path = cache_dir / _MANIFEST
    if not path.exists():
        write_json(path, expected)
        return
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DatasleuthError(
            f"LDS cache manifest {path} is unreadable ({exc.__class__.__name__}); delete it or "
            "use another cache_dir"
        ) from None
    for key, value in expected.items():
        if found.get(key) != value:
            raise DatasleuthError(
                f"LDS cache {cache_dir} was made with {key}={found.get(key)!r}, this run has "
                f"{key}={value!r}; use another cache_dir or delete the old one"
            )


def _to_vector(value: object) -> np.ndarray:
    """measure_fn output (numpy, torch tensor, list, scalar) -> float64 vector."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()  # torch.Tensor
    return np.asarray(value, dtype=np.float64).reshape(-1)


def _load_entry(path: Path, expected: dict[str, str]) -> np.ndarray:
    """Read one cached measurement vector after checking its metadata."""
    try:
        raw = path.read_bytes()
        tensors = st_load_numpy(raw)
        header_len = int.from_bytes(raw[:8], "little")
        meta = json.loads(raw[8 : 8 + header_len]).get("__metadata__", {}) or {}
    except (OSError, ValueError, SafetensorError) as exc:
        raise DatasleuthError(
            f"LDS cache entry {path} is unreadable ({exc.__class__.__name__}); delete it to retrain"
        ) from None
    for key, value in expected.items():
        if meta.get(key) != value:
            raise DatasleuthError(
                f"LDS cache entry {path.name} has {key}={meta.get(key)!r}, expected {value!r}; "
                "use another cache_dir or delete the stale entry"
            )
    if "outputs" not in tensors:
        raise DatasleuthError(
            f"LDS cache entry {path} has no 'outputs' tensor; delete it to retrain"
        )
    return tensors["outputs"].astype(np.float64).reshape(-1)


def _save_state(path: Path, state: object, meta: dict[str, str]) -> bool:
    """Save a dict of torch tensors as safetensors; False if ``state`` is not one."""
    import torch
    from safetensors.torch import save as st_save_torch

    if not isinstance(state, dict) or not state:
        return False
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        return False
    flat = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    write_bytes(path, st_save_torch(flat, metadata=meta))
    return True


class _Cache:
    """Measurements of retrained models, one safetensors file per (subset, seed)."""

    def __init__(self, root: Path, n_train: int, fraction: float, fingerprint: str,
                 save_states: bool):
        self.root, self.n_train, self.fraction = root, n_train, fraction
        self.fingerprint, self.save_states = fingerprint, save_states
        self.n_cached = 0
        self.n_queries: int | None = None
        self.warned_state = False

    def _meta(self, digest: str, train_seed: int) -> dict[str, str]:
        return {"format": _FORMAT, "subset_hash": digest, "seed": str(train_seed),
                "n_train": str(self.n_train), "fraction": repr(self.fraction),
                "fingerprint": self.fingerprint}

    def measurement(self, j: int, mask: np.ndarray, train_seed: int,
                    train_fn: Callable[[np.ndarray, int], Any],
                    measure_fn: Callable[[Any], object]) -> np.ndarray:
        """The cached measurement of subset ``j`` and ``train_seed``, else train and measure."""
        digest = subset_hash(mask)
        meta = self._meta(digest, train_seed)
        path = self.root / f"lds_{digest[:20]}_seed{train_seed}.safetensors"
        if path.exists():
            values = _load_entry(path, meta)
            self.n_cached += 1
        else:
            state = train_fn(np.flatnonzero(mask).astype(np.int64), train_seed)
            values = _to_vector(measure_fn(state))
            if values.size == 0 or not np.all(np.isfinite(values)):
                raise DatasleuthError(
                    f"measure_fn returned empty or non-finite measurements for subset {j}, "
                    f"seed {train_seed}; check the training run and the measurement"
                )
            if self.save_states:
                self._save_state(state, digest, train_seed, meta)
            write_bytes(path, st_save_numpy({"outputs": values.astype(np.float64)}, metadata=meta))
        if self.n_queries is None:
            self.n_queries = values.size
        elif values.size != self.n_queries:
            raise DatasleuthError(
                f"subset {j}, seed {train_seed} has {values.size} measurements but earlier "
                f"runs had {self.n_queries}; measure_fn must return one value per query"
            )
        return values

    def _save_state(self, state: object, digest: str, train_seed: int,
                    meta: dict[str, str]) -> None:
        state_path = self.root / f"state_{digest[:20]}_seed{train_seed}.safetensors"
        if not _save_state(state_path, state, meta) and not self.warned_state:
            warnings.warn("save_states=True but train_fn did not return a dict of tensors; "
                          "states are not saved", stacklevel=4)
            self.warned_state = True


def run_lds_experiments(
    train_fn: Callable[[np.ndarray, int], Any],
    measure_fn: Callable[[Any], object],
    n_train: int,
    *,
    n_subsets: int = 100,
    seeds_per_subset: int = 1,
    fraction: float = 0.5,
    cache_dir: str | os.PathLike[str],
    seed: int = 0,
    fingerprint: str = "",
    save_states: bool = False,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Retrain on random subsets and measure the queries, with a resumable cache
    (docs/method.md §8).

    ``train_fn(indices, train_seed)`` trains a model on the training examples
    ``indices`` (sorted int64) and returns a model state; ``measure_fn(state)``
    returns the Q query measurements (e.g. log p(completion | prompt) per query).
    Replicate s of subset j is trained with ``train_seed = j * seeds_per_subset + s``.

    Each (subset, train_seed) measurement is written atomically to ``cache_dir`` as
    safetensors with metadata (subset hash, seed, n_train, fraction, ``fingerprint``);
    a re-run loads it instead of retraining. ``fingerprint`` should name everything
    else that determines the result (data, model, recipe): a cache written under a
    different fingerprint, n_train or fraction is refused with a DatasleuthError.
    With ``save_states`` a state that is a dict of tensors is also saved.

    Returns ``(subsets, outputs)``: the (J, N) bool masks from :func:`make_subsets`
    and the (J, seeds_per_subset, Q) measurements, ready for :func:`lds`.
    """
    subsets = make_subsets(n_train, n_subsets, fraction, seed)
    seeds_per_subset = int(seeds_per_subset)
    if seeds_per_subset < 1:
        raise DatasleuthError(
            f"seeds_per_subset must be at least 1, got {seeds_per_subset}; use 1 or more"
        )
    root = Path(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    cache = _Cache(root, int(n_train), float(fraction), str(fingerprint), save_states)
    _check_manifest(root, {"format": _FORMAT, "n_train": cache.n_train,
                           "fraction": cache.fraction, "fingerprint": cache.fingerprint})
    results: list[list[np.ndarray]] = [[] for _ in range(n_subsets)]
    bar = tqdm(total=n_subsets * seeds_per_subset, desc="LDS retraining", unit="model",
               disable=not progress or os.environ.get("DATASLEUTH_PROGRESS", "1") == "0",
               file=sys.stderr, leave=False)
    try:
        for j, mask in enumerate(subsets):
            for s in range(seeds_per_subset):
                values = cache.measurement(j, mask, j * seeds_per_subset + s, train_fn,
                                           measure_fn)
                results[j].append(values)
                bar.update(1)
                bar.set_postfix(cached=cache.n_cached, refresh=False)
    finally:
        bar.close()
    outputs = np.stack([np.stack(r) for r in results])  # (J, seeds, Q)
    return subsets, outputs
