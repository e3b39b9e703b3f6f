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
import struct
from pathlib import Path
from typing import Any

import torch
from torch import nn

from datasleuth.errors import DatasleuthError
from datasleuth.finite import check_weights
from datasleuth.layers import TrackedLayer, find_layers
from datasleuth.lm.hub import resolve_model_path
from datasleuth.storage import safetensors_header

__all__ = ["load_model", "default_layers", "context_length", "check_device", "check_tokenizer",
           "check_token_ids", "embedding_rows", "MLP_PATTERNS", "ATTENTION_PATTERNS",
           "TOKENIZER_FILES", "PROBE_TEXT", "check_checkpoint", "separator_token"]

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
# GPT-NeoX (mlp.dense_*), Phi, Falcon, OPT/BLOOM (fc1/fc2, dense_h_to_4h), RecurrentGemma
# (mlp_block), Mixtral experts.
MLP_PATTERNS = (
    "*.mlp.*",
    "*.mlp_block.*",
    "*.feed_forward.*",
    "*.ffn.*",
    "*.fc1",
    "*.fc2",
    "*.dense_h_to_4h",
    "*.dense_4h_to_h",
    "*.block_sparse_moe.experts.*",
)
ATTENTION_PATTERNS = ("*.attn.*", "*.attention.*", "*.self_attn.*", "*.self_attention.*")
# Routers are not feed-forward weights; some (Llama 4, PhiMoE) subclass nn.Linear but
# return (scores, indices) tuples.
_NEVER_BY_DEFAULT = ("lm_head", "*.lm_head", "*embed_out", "*.wte", "*.embed_tokens",
                     "*.router", "*.router.*")
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
            model, tok_path = _pretrained(path, kwargs), path
        if tokenizer is not None:
            tok_path = resolve_model_path(tokenizer, download=download, what="tokenizer",
                                          option="--tokenizer")
        tok = _load_tokenizer(tok_path, trust_remote_code, explicit=tokenizer is not None)
    except DatasleuthError:
        raise
    except Exception as e:  # transformers, safetensors and torch each raise their own types
        raise DatasleuthError(f"cannot load the model from {path}: {_first_line(e)}"
                              f"{_load_hint(str(e), trust_remote_code)}") from e
    check_weights(model)  # a NaN/Inf weight is named now, not met as NaN scores later
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
    base = json.loads(adapter.read_text()).get("base_model_name_or_path")
    if not base:
        raise DatasleuthError(f"{adapter} names no base_model_name_or_path; set it to the base "
                              "checkpoint's folder or Hub id")
    base_path = resolve_model_path(base, download=download, what="the adapter's base model")
    model = _pretrained(base_path, kwargs)
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
    instead of the frozen base weights. Only the text decoder's layers are defaults
    (:func:`_decoder_prefix`): a multimodal model's vision tower does not run on text.
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
    prefix = _decoder_prefix(model)
    layers = [ly for ly in layers if ly.name.startswith(prefix)]
    if not layers:
        raise DatasleuthError(
            "found no MLP layers to track in this model; name them with --layers "
            "(glob patterns over module names, e.g. 'model.layers.*.mlp.*')"
        )
    return layers


def _decoder_prefix(model: nn.Module) -> str:
    """``"<name>."`` of the module ``model.get_decoder()`` returns when it is a proper
    submodule (Gemma 3's ``model.language_model``), else ``""`` (the whole model)."""
    get = getattr(model, "get_decoder", None)
    try:
        decoder = get() if callable(get) else None
    except (AttributeError, NotImplementedError, TypeError):
        return ""
    if not isinstance(decoder, nn.Module) or decoder is model:
        return ""
    return next((f"{n}." for n, m in model.named_modules() if m is decoder and n), "")


def _matches_block(name: str, patterns: list[str]) -> bool:
    import fnmatch

    parent = name.split(".lora_")[0]
    return any(fnmatch.fnmatchcase(parent, p) for p in patterns)


#: Weight files that hold pickles (loading them can run arbitrary code): never loaded.
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_SAVE_HINT = ("load it once where you trust it and save it with "
              "model.save_pretrained(folder, safe_serialization=True)")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _load_hint(message: str, trust_remote_code: bool) -> str:
    """The fix appended to a transformers loading error."""
    text = message.lower()
    if not trust_remote_code and ("remote code" in text or "trust_remote_code" in text
                                  or "does not recognize this architecture" in text):
        return ("; if the checkpoint ships its own model code, pass --trust-remote-code (only "
                "if you trust it), else upgrade transformers")
    if "size mismatch" in text or "mismatch" in text:
        return "; use the config.json saved with these weights"
    return "; check the checkpoint folder (config.json and *.safetensors)"


def _pretrained(folder: Path, kwargs: dict) -> nn.Module:
    """``AutoModelForCausalLM`` from ``folder`` (safetensors only), refused unless every
    weight the config names is in the checkpoint and every weight is used."""
    from transformers import AutoModelForCausalLM

    check_checkpoint(folder, bool(kwargs.get("trust_remote_code")))
    model, info = AutoModelForCausalLM.from_pretrained(
        str(folder), use_safetensors=True, output_loading_info=True, **kwargs)
    problems = []
    for key, what in (("missing_keys", "missing from the weights"),
                      ("unexpected_keys", "in the weights but not in config.json"),
                      ("mismatched_keys", "of another shape than config.json says")):
        names = sorted(str(k if isinstance(k, str) else k[0]) for k in info.get(key) or [])
        if names:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3
                                            else "")
            problems.append(f"{len(names)} weights {what} ({shown})")
    if problems:
        raise DatasleuthError(f"the model in {folder} does not match its config.json: "
                              f"{'; '.join(problems)}; use the config.json saved with these "
                              "weights")
    return model


def check_checkpoint(folder: Path, trust_remote_code: bool = False) -> None:
    """Refuse, before loading, a checkpoint folder that cannot be loaded safely.

    Refused: a ``config.json`` that is not JSON; custom model code (``auto_map``)
    without ``trust_remote_code``; a folder whose weights are only pickles
    (``pytorch_model.bin`` and the like, never unpickled); a ``*.safetensors`` file
    whose header is garbage or whose tensors run past its end (a truncated download).
    """
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DatasleuthError(f"{folder / 'config.json'} is not readable JSON ({e}); save the "
                              "model again with model.save_pretrained(folder)") from e
    if isinstance(config, dict) and config.get("auto_map") and not trust_remote_code:
        raise DatasleuthError(f"cannot load the model from {folder}: it ships its own model "
                              "code (auto_map in config.json), "
                              "which datasleuth does not run by default; pass "
                              "--trust-remote-code if you trust it")
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        found = f"only {', '.join(pickles)}, a pickle format datasleuth never loads" \
            if pickles else "no weights"
        raise DatasleuthError(f"{folder} holds {found}; it needs model.safetensors: "
                              f"{_SAVE_HINT}")
    for path in weights:
        _check_safetensors(path)


def _check_safetensors(path: Path) -> None:
    """Refuse a safetensors file with a garbage header or tensors past its end."""
    try:
        n, header, size = safetensors_header(path)
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
                  default=0)
        if 8 + n + end > size:
            raise ValueError(f"{size} bytes, the tensors need {8 + n + end}")
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError,
            struct.error) as e:
        raise DatasleuthError(f"{path} is not a complete safetensors file ({e}); download or "
                              "save the checkpoint again") from e


def separator_token(tokenizer: Any, separator: int | str | None, rows: int | None
                    ) -> int | None:
    """The id of ``separator`` (a token string or an id, as int or digits), checked
    against the vocabulary; ``None`` keeps the tokenizer's EOS token."""
    if separator is None:
        return None
    text = str(separator)
    if isinstance(separator, int) or text.isdigit():
        token_id = int(text)
    else:
        token_id = tokenizer.convert_tokens_to_ids(text)
        unk = getattr(tokenizer, "unk_token", None)
        if token_id is None or (token_id == tokenizer.unk_token_id and text != unk):
            raise DatasleuthError(f"--separator {text!r} is not a token of the tokenizer's "
                                  "vocabulary; give one token (e.g. its EOS token "
                                  f"{getattr(tokenizer, 'eos_token', None)!r}) or a token id")
    check_token_ids(rows if rows is not None else len(tokenizer), [token_id],
                    "--separator is token id", "give a token id inside the vocabulary")
    return int(token_id)
