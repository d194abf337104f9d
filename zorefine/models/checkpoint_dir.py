"""Is this folder a decoder-only causal LM zorefine can refine? One clear line when it is not.

Checked before any stage runs, from the files alone: ``config.json`` (read as JSON, so no
custom code runs before we know it is needed), the tokenizer files, and the header of every
safetensors file (a truncated or garbage file fails here, naming the file).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from transformers import AutoConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

from zorefine.errors import ModelError

# Any one of these makes a tokenizer that AutoTokenizer can load without inventing a vocabulary.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tokenizer.tiktoken")
_CAUSAL_CLASSES = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def _read_config(directory: Path) -> dict[str, Any]:
    try:
        raw = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise ModelError(f"{directory / 'config.json'}: unreadable model config ({error})") from error
    if not isinstance(raw, dict):
        raise ModelError(f"{directory / 'config.json'}: not a model config (a JSON object)")
    return raw


def _is_causal_architecture(name: str) -> bool:
    return name in _CAUSAL_CLASSES or name.endswith("ForCausalLM") or name.endswith("LMHeadModel")


def check_decoder_only(directory: Path, raw: dict[str, Any], trust_remote_code: bool) -> None:
    """Refuse encoder-only and encoder-decoder models, and models saved without their LM head."""
    model_type = raw.get("model_type")
    if "AutoModelForCausalLM" in (raw.get("auto_map") or {}):
        if not trust_remote_code:
            raise ModelError(
                f"{directory} needs its own code to load (auto_map); set model.trust_remote_code=true if you trust it"
            )
        return
    if raw.get("is_encoder_decoder") or (model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not raw.get("is_decoder")):
        raise ModelError(
            f"{directory} holds a '{model_type}' encoder model, not a decoder-only causal language model (chat model)"
        )
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelError(f"{directory} holds a '{model_type}' model, which is not a causal language model")
    architectures = raw.get("architectures") or []
    if architectures and not any(_is_causal_architecture(a) for a in architectures):
        raise ModelError(
            f"{directory} holds {', '.join(architectures)} without a language-model head: "
            "save the causal LM (e.g. AutoModelForCausalLM) instead"
        )


def check_weights(directory: Path) -> None:
    """Every safetensors file must have a readable header that covers the whole file."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelError(
            f"{directory} has no .safetensors weights; zorefine loads weights only from safetensors "
            "(convert with model.save_pretrained(dir, safe_serialization=True))"
        )
    for path in files:
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as error:
            raise ModelError(f"{path}: not a readable safetensors file ({error})") from error


def check_causal_lm_dir(path: str | Path, trust_remote_code: bool = False) -> Path:
    """Fail with one clear line unless ``path`` is a local directory holding a decoder-only causal LM."""
    directory = Path(path).expanduser()
    if not directory.exists():
        raise ModelError(f"model path not found: {directory}")
    if not directory.is_dir() or not (directory / "config.json").is_file():
        raise ModelError(f"{directory} holds no Hugging Face model (no config.json)")
    raw = _read_config(directory)
    check_decoder_only(directory, raw, trust_remote_code)
    try:
        AutoConfig.from_pretrained(directory, local_files_only=True, trust_remote_code=trust_remote_code)
    except (ValueError, OSError, KeyError) as error:
        raise ModelError(f"{directory}: unreadable model config ({error})") from error
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(
            f"{directory} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)}): save the tokenizer with the model"
        )
    check_weights(directory)
    return directory
