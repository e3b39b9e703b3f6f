"""Load a causal language model from disk and choose the layers to track.

Any ``AutoModelForCausalLM`` checkpoint in a local folder, its tokenizer from the same
folder; a PEFT/LoRA adapter folder on top of its base model. Nothing is downloaded
(``local_files_only``) and no remote code runs unless ``trust_remote_code=True``.

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

__all__ = ["load_model", "default_layers", "context_length", "check_device", "MLP_PATTERNS",
           "ATTENTION_PATTERNS"]

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
) -> tuple[nn.Module, object]:
    """(model in eval mode, tokenizer) from a local checkpoint or PEFT adapter folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_device(device)
    path = Path(path)
    if not path.is_dir():
        raise DatasleuthError(
            f"model folder {path} does not exist; give the local folder of a Hugging Face "
            "checkpoint (with config.json) or of a PEFT adapter"
        )
    torch_dtype = {"auto": "auto", "float32": torch.float32, "float64": torch.float64,
                   "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise DatasleuthError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    adapter = path / "adapter_config.json"
    kwargs = dict(local_files_only=True, trust_remote_code=trust_remote_code, dtype=torch_dtype)
    try:
        if adapter.is_file():
            model, tok_path = _load_peft(path, adapter, kwargs)
        else:
            if not (path / "config.json").is_file():
                raise DatasleuthError(
                    f"{path} has no config.json; point --model at a saved Hugging Face model"
                )
            model, tok_path = AutoModelForCausalLM.from_pretrained(str(path), **kwargs), path
        tokenizer = AutoTokenizer.from_pretrained(
            str(tok_path), local_files_only=True, trust_remote_code=trust_remote_code
        )
    except DatasleuthError:
        raise
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = "; pass --trust-remote-code if you trust it" if "remote code" in str(e) else ""
        raise DatasleuthError(f"cannot load the model from {path}: {first}{hint}") from e
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "model_type", None) is not None and model.dtype == torch.float16 \
            and device == "cpu":
        model = model.float()  # half-precision matmuls are slow or missing on CPU
    return model.to(device).eval(), tokenizer


def _load_peft(path: Path, adapter: Path, kwargs: dict) -> tuple[nn.Module, Path]:
    try:
        from peft import PeftModel
    except ImportError as e:
        raise DatasleuthError(
            f"{path} is a PEFT adapter; install peft (pip install 'datasleuth[peft]')"
        ) from e
    from transformers import AutoModelForCausalLM

    base = json.loads(adapter.read_text()).get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise DatasleuthError(
            f"the adapter's base model {base!r} is not a local folder; edit "
            f"base_model_name_or_path in {adapter} to point at the base checkpoint on disk"
        )
    model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    model = PeftModel.from_pretrained(model, str(path), is_trainable=False)
    tok = path if (path / "tokenizer_config.json").is_file() else Path(base)
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
