"""Load a causal language model and its tokenizer, check them, choose the layers to track.

Any ``AutoModelForCausalLM`` checkpoint in a local folder or the Hugging Face cache (a
Hub id, :mod:`datasleuth.lm.hub`), its tokenizer from the same folder (or another one);
a PEFT/LoRA adapter folder on top of its base model. Nothing is downloaded unless
``download=True`` and no remote code runs unless ``trust_remote_code=True``. A tokenizer
that cannot be the model's (no tokenizer at all, a vocabulary larger than the embedding,
text encoded to nothing, ids outside the embedding) is refused before any work.

Default tracked layers follow Grosse et al. 2023: the MLP (feed-forward) linear layers
of every block; attention projections only on request; embeddings, layer norms and
the unembedding (``lm_head``) are never tracked unless named explicitly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from datasleuth.errors import DatasleuthError
from datasleuth.layers import TrackedLayer, find_layers
from datasleuth.lm.hub import resolve_model_path

__all__ = ["load_model", "default_layers", "context_length", "check_device", "check_tokenizer",
           "check_token_ids", "embedding_rows", "MLP_PATTERNS", "ATTENTION_PATTERNS",
           "TOKENIZER_FILES", "PROBE_TEXT"]

#: Files of which a saved tokenizer has at least one.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "vocab.txt", "spiece.model", "sentencepiece.bpe.model", "tokenizer.tiktoken")
#: Text every tokenizer of a language model must encode to at least one token.
PROBE_TEXT = "The quick brown fox jumps over the lazy dog. 0123456789"

_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length",
                 "seq_length")


def context_length(model: Any) -> int | None:
    """The longest input the model's config admits (``None`` if it does not say)."""
    config = getattr(model, "config", None)
    for key in _CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None

# Module-name globs of feed-forward linear layers across common architectures:
# GPT-2 (mlp.c_fc, mlp.c_proj), Llama/Mistral/Qwen (mlp.gate/up/down_proj),
# GPT-NeoX (mlp.dense_*), Phi, Falcon, OPT/BLOOM (fc1/fc2, dense_h_to_4h), Mixtral experts.
MLP_PATTERNS = (
    "*.mlp.*",
    "*.feed_forward.*",
    "*.ffn.*",
    "*.fc1",
    "*.fc2",
    "*.dense_h_to_4h",
    "*.dense_4h_to_h",
    "*.block_sparse_moe.experts.*",
)
ATTENTION_PATTERNS = ("*.attn.*", "*.attention.*", "*.self_attn.*", "*.self_attention.*")
_NEVER_BY_DEFAULT = ("lm_head", "*.lm_head", "*embed_out", "*.wte", "*.embed_tokens")
_LORA = ("*.lora_A.*", "*.lora_B.*")


def check_device(device: str) -> torch.device:
    """Parse ``device`` and refuse one this torch build or machine does not have."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise DatasleuthError(f"--device {device!r} is not a torch device ({e}); use e.g. cpu "
                              "or cuda:0") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DatasleuthError(f"--device {device} asked for CUDA, but this torch "
                                  f"({torch.__version__}) sees no CUDA device; use --device cpu "
                                  "or install a CUDA build of torch")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DatasleuthError(f"--device {device}: only {torch.cuda.device_count()} CUDA "
                                  "device(s) here; pick an index below that")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise DatasleuthError(f"--device {device} is not available here; use --device cpu")
    return dev


def load_model(
    path: str | Path,
    *,
    dtype: str = "auto",
    device: str = "cpu",
    trust_remote_code: bool = False,
    download: bool = False,
    tokenizer: str | Path | None = None,
) -> tuple[nn.Module, object]:
    """(model in eval mode, tokenizer) from a local folder or a cached Hub id.

    ``path`` (and ``tokenizer``, default: the model's own folder) is a local folder of
    a Hugging Face checkpoint or PEFT adapter, or a Hub id found in the local Hugging
    Face cache; with ``download`` a missing Hub id is fetched. The tokenizer is checked
    against the model before anything else runs (:func:`check_tokenizer`).
    """
    from transformers import AutoModelForCausalLM

    check_device(device)
    path = resolve_model_path(path, download=download)
    torch_dtype = {"auto": "auto", "float32": torch.float32, "float64": torch.float64,
                   "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise DatasleuthError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    adapter = path / "adapter_config.json"
    kwargs = dict(local_files_only=True, trust_remote_code=trust_remote_code, dtype=torch_dtype)
    try:
        if adapter.is_file():
            model, tok_path = _load_peft(path, adapter, kwargs, download)
        else:
            if not (path / "config.json").is_file():
                raise DatasleuthError(
                    f"{path} has no config.json; point --model at a saved Hugging Face model"
                )
            model, tok_path = AutoModelForCausalLM.from_pretrained(str(path), **kwargs), path
        if tokenizer is not None:
            tok_path = resolve_model_path(tokenizer, download=download, what="tokenizer",
                                          option="--tokenizer")
        tok = _load_tokenizer(tok_path, trust_remote_code, explicit=tokenizer is not None)
    except DatasleuthError:
        raise
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = "; pass --trust-remote-code if you trust it" if "remote code" in str(e) else ""
        raise DatasleuthError(f"cannot load the model from {path}: {first}{hint}") from e
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    check_tokenizer(model, tok)
    if getattr(model.config, "model_type", None) is not None and model.dtype == torch.float16 \
            and device == "cpu":
        model = model.float()  # half-precision matmuls are slow or missing on CPU
    return model.to(device).eval(), tok


def _load_tokenizer(folder: Path, trust_remote_code: bool, explicit: bool) -> Any:
    """The tokenizer saved in ``folder``; refuse a folder that holds none."""
    from transformers import AutoTokenizer

    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        where = "the tokenizer folder" if explicit else "the model folder"
        raise DatasleuthError(
            f"{where} {folder} holds no tokenizer ({', '.join(TOKENIZER_FILES[:2])}); save the "
            "model's tokenizer there (tokenizer.save_pretrained(folder)) or name it with "
            "--tokenizer"
        )
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True,
                                         trust_remote_code=trust_remote_code)


def embedding_rows(model: nn.Module) -> int | None:
    """Rows of the model's input embedding: the token ids it can take (``None``: unknown)."""
    try:
        embedding = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        embedding = None
    rows = getattr(embedding, "num_embeddings", None)
    if isinstance(rows, int):
        return rows
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return size if isinstance(size, int) else None


def check_tokenizer(model: nn.Module, tokenizer: Any) -> None:
    """Refuse a tokenizer that cannot be this model's, before any work is done.

    Refused: more tokens than the model has embedding rows; text that encodes to no
    tokens (:data:`PROBE_TEXT`); token ids (of that text or of the EOS, BOS or pad
    token) outside the embedding. Each is one line naming the fix.
    """
    rows = embedding_rows(model)
    fix = "use the tokenizer saved with this model (--tokenizer FOLDER)"
    if rows is not None and len(tokenizer) > rows:
        raise DatasleuthError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding has {rows} "
            f"rows; {fix}, or resize the embedding (model.resize_token_embeddings) and save it"
        )
    ids = list(tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"])
    if not ids:
        raise DatasleuthError(f"the tokenizer encodes the text {PROBE_TEXT!r} to no tokens, so "
                              f"every document would be empty; {fix}")
    special = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("eos", "bos",
                                                                              "pad")}
    check_token_ids(rows, ids, "the tokenizer maps text to id", fix)
    for name, value in special.items():
        if value is not None:
            check_token_ids(rows, [value], f"the tokenizer's {name} token is id", fix)


def check_token_ids(rows: int | None, ids: Any, what: str, fix: str) -> None:
    """Refuse ids at or past ``rows`` (the embedding's size) or below zero."""
    if rows is None or len(ids) == 0:
        return
    top, low = int(max(ids)), int(min(ids))
    if top >= rows or low < 0:
        bad = top if top >= rows else low
        raise DatasleuthError(f"{what} {bad}, outside the model's vocabulary of {rows} "
                              f"embedding rows (ids 0..{rows - 1}); {fix}")


def _load_peft(path: Path, adapter: Path, kwargs: dict, download: bool
               ) -> tuple[nn.Module, Path]:
    try:
        from peft import PeftModel
    except ImportError as e:
        raise DatasleuthError(
            f"{path} is a PEFT adapter; install peft (pip install 'datasleuth[peft]')"
        ) from e
    from transformers import AutoModelForCausalLM

    base = json.loads(adapter.read_text()).get("base_model_name_or_path")
    if not base:
        raise DatasleuthError(f"{adapter} names no base_model_name_or_path; set it to the base "
                              "checkpoint's folder or Hub id")
    base_path = resolve_model_path(base, download=download, what="the adapter's base model")
    model = AutoModelForCausalLM.from_pretrained(str(base_path), **kwargs)
    model = PeftModel.from_pretrained(model, str(path), is_trainable=False)
    tok = path if any((path / name).is_file() for name in TOKENIZER_FILES) else base_path
    return model, tok


def default_layers(
    model: nn.Module,
    include: tuple[str, ...] | list[str] | None = None,
    attention: bool = False,
) -> list[TrackedLayer]:
    """MLP layers (plus attention if asked), or the user's patterns; LoRA-aware.

    For a PEFT model, the trainable LoRA matrices inside the chosen blocks are tracked
    instead of the frozen base weights.
    """
    if include:
        return find_layers(model, include=list(include))
    patterns = list(MLP_PATTERNS) + (list(ATTENTION_PATTERNS) if attention else [])
    names = {n for n, _ in model.named_modules()}
    has_lora = any(".lora_A." in n for n in names)
    if has_lora:
        layers = find_layers(model, include=list(_LORA))
        layers = [ly for ly in layers if _matches_block(ly.name, patterns)]
    else:
        layers = [
            ly for ly in find_layers(model, include=patterns, exclude=list(_NEVER_BY_DEFAULT))
            if ".base_layer" not in ly.name
        ]
    if not layers:
        raise DatasleuthError(
            "found no MLP layers to track in this model; name them with --layers "
            "(glob patterns over module names, e.g. 'model.layers.*.mlp.*')"
        )
    return layers


def _matches_block(name: str, patterns: list[str]) -> bool:
    import fnmatch

    parent = name.split(".lora_")[0]
    return any(fnmatch.fnmatchcase(parent, p) for p in patterns)
