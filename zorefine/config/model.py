"""The ``model`` group: which model a run starts from (a local checkpoint or the built-in one)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import DictConfig

from zorefine.config.checks import require

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class BuiltinModelConfig:
    """The built-in tiny Llama-architecture model, pretrained on benign instructions only."""

    seed: int = 0
    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 8
    num_heads: int = 4
    max_position_embeddings: int = 512
    pretrain_epochs: float = 10.0
    pretrain_lr: float = 3e-3
    pretrain_batch_size: int = 16
    pretrain_max_length: int = 128
    # Where built models are kept between runs; null = $ZOREFINE_CACHE or ~/.cache/zorefine.
    cache_dir: Optional[str] = None


@dataclass
class GGUFModelConfig:
    """A model shipped as a GGUF file, converted once into the cache (see ``zorefine.models.gguf``)."""

    # The GGUF file: a name inside ``package`` or a path; null = no GGUF model.
    file: Optional[str] = None
    # An installed Python package that ships the file (found without importing it).
    package: Optional[str] = None
    # Replaces the chat template's default system message ("" = none); null = as shipped.
    system_prompt: Optional[str] = None
    # Where conversions are kept; null = $ZOREFINE_CACHE or ~/.cache/zorefine.
    cache_dir: Optional[str] = None


@dataclass
class ModelConfig:
    """Which model to start from."""

    # A local Hugging Face causal-LM directory; null = the built-in model.
    path: Optional[str] = None
    dtype: str = "float32"
    device: str = "auto"
    trust_remote_code: bool = False
    builtin: BuiltinModelConfig = field(default_factory=BuiltinModelConfig)
    gguf: GGUFModelConfig = field(default_factory=GGUFModelConfig)


def check_model(cfg: DictConfig) -> None:
    """Ranges the ``model`` group's types cannot express."""
    require(cfg.dtype in DTYPES, f"model.dtype must be one of {sorted(DTYPES)}, got {cfg.dtype!r}")
    require(cfg.path is None or cfg.gguf.file is None, "set model.path or model.gguf.file, not both")
    require(cfg.gguf.package is None or cfg.gguf.file is not None, "model.gguf.package needs model.gguf.file")
    builtin = cfg.builtin
    require(builtin.hidden_size % builtin.num_heads == 0, "model.builtin.hidden_size must be divisible by num_heads")
    require(builtin.num_layers >= 1, "model.builtin.num_layers must be >= 1")
