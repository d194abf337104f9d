"""Load any local Hugging Face causal LM and write checkpoints atomically (safetensors)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
from safetensors import SafetensorError

from zorefine.errors import ModelError
from zorefine.files import umask, write_json_atomic
from zorefine.models.checkpoint_dir import check_causal_lm_dir

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """``"auto"`` picks CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cache_root(cache_dir: str | None) -> Path:
    """Where built and converted models live: the config value, else $ZOREFINE_CACHE, else ~/.cache/zorefine."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("ZOREFINE_CACHE", Path.home() / ".cache" / "zorefine"))


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a local tokenizer, with a pad token (falls back to EOS) for batched work."""
    # Imported here: transformers' model stack takes seconds to import, and a run that stops at a
    # config or path error (or only compares finished runs) should not wait for it.
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except (ValueError, OSError) as error:
        raise ModelError(f"{path}: cannot load its tokenizer ({error})") from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    path: str | Path,
    dtype: str = "float32",
    device: str = "auto",
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load model and tokenizer from a local directory, in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM

    directory = check_causal_lm_dir(path, trust_remote_code)
    tokenizer = load_tokenizer(directory, trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            directory,
            dtype=DTYPES[dtype],
            local_files_only=True,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
        )
    except (ValueError, OSError, SafetensorError) as error:
        raise ModelError(f"{directory}: cannot load the model ({error})") from error
    model.to(resolve_device(device))
    model.eval()
    return model, tokenizer


# Staging folders of checkpoints being written; one left behind was killed mid-write.
STAGING_PREFIX = "."


def remove_stale_staging(directory: str | Path) -> list[Path]:
    """Delete what killed checkpoint writes left in ``directory`` (call before any write starts)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = [p for p in directory.iterdir() if p.is_dir() and p.name.startswith(STAGING_PREFIX) and (".partial-" in p.name or p.name.endswith(".old"))]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def holds_checkpoint(directory: Path) -> bool:
    """Whether ``directory`` holds a saved model (its config and safetensors weights)."""
    return (directory / "config.json").is_file() and any(directory.glob("*.safetensors"))


def save_checkpoint(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    info: Mapping[str, Any] | None = None,
) -> Path:
    """Save model (safetensors) + tokenizer (+ ``zorefine.json``) atomically.

    Everything is written into a temporary sibling directory that is renamed into place
    at the end, so a crash or a kill never leaves a half-written checkpoint at ``out_dir``.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{out_dir.name}.partial-", dir=out_dir.parent))
    # mkdtemp makes a private (0700) folder; a checkpoint on shared storage follows the umask.
    os.chmod(staging, 0o777 & ~umask())
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if info is not None:
            write_json_atomic(staging / "zorefine.json", info)
        if out_dir.exists():
            retired = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(retired, ignore_errors=True)
            os.replace(out_dir, retired)
            os.replace(staging, out_dir)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir
