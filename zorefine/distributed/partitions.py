"""Where a parameter's entries live on this process: all of them, or its ZeRO-3 partition.

DeepSpeed ZeRO-3 keeps each parameter as one flat partition per process (``param.ds_tensor``:
entries ``rank × n .. (rank + 1) × n`` of the flattened tensor, the last one padded) and
gathers the whole tensor for each forward pass. ZO only adds seeded directions to weights and
reads their scale, so each process moves its own partition along the matching window of the
whole tensor's direction: the gathered weights are exactly those one unpartitioned process
would have, and no weight ever crosses the network for the update.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from zorefine.distributed.processes import Processes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalEntries:
    """The part of one parameter this process holds and writes."""

    tensor: torch.Tensor  # the parameter itself, or its flat ZeRO-3 partition
    offset: int  # index of ``tensor``'s first entry in the flattened parameter
    shape: torch.Size  # the whole parameter's shape
    partitioned: bool

    @property
    def valid(self) -> int:
        """How many of ``tensor``'s entries are real weights (the rest are partition padding)."""
        return max(0, min(self.tensor.numel(), self.shape.numel() - self.offset))

    def window(self) -> tuple[int, int] | None:
        """The ``(offset, length)`` of the whole tensor's direction this process uses (None: all)."""
        return (self.offset, self.tensor.numel()) if self.partitioned else None


def is_partitioned(param: torch.Tensor) -> bool:
    """Whether DeepSpeed ZeRO-3 has partitioned ``param`` across processes."""
    return getattr(param, "ds_tensor", None) is not None and getattr(param, "ds_numel", None) is not None


def num_entries(param: torch.Tensor) -> int:
    """How many weights ``param`` has, partitioned or not (a ZeRO-3 parameter's local size is 0)."""
    return int(param.ds_numel) if is_partitioned(param) else param.numel()


def local_entries(param: torch.Tensor) -> LocalEntries:
    """This process's entries of ``param``."""
    if not is_partitioned(param):
        return LocalEntries(param, 0, param.shape, False)
    partition = param.ds_tensor
    # DeepSpeed partitions the flattened tensor in rank order, equal sizes, padding the last.
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    return LocalEntries(partition, rank * partition.numel(), torch.Size(param.ds_shape), True)


def whole_rms(entries: LocalEntries, processes: Processes) -> float:
    """RMS of the whole parameter, from every process's partition (no weights are gathered)."""
    valid = entries.tensor.detach().reshape(-1)[: entries.valid].float()
    squares = float(valid.pow(2).sum())
    if entries.partitioned:
        squares = processes.sum([squares])[0]
    count = entries.shape.numel()
    return (squares / count) ** 0.5 if count else 0.0


def _without_auto(config: dict) -> dict:
    """A DeepSpeed config with the Trainer's ``"auto"`` placeholders dropped (no Trainer fills them here)."""
    return {
        key: _without_auto(value) if isinstance(value, dict) else value
        for key, value in config.items()
        if value != "auto"
    }


def partition_model(model: torch.nn.Module, config_path: str) -> torch.nn.Module:
    """Hand ``model`` to DeepSpeed with the ZeRO config at ``config_path`` and return it.

    With ZeRO stage 3 its parameters are then partitioned across processes and gathered on
    the fly for each forward pass (no optimizer: ZO updates the partitions itself). Lower
    stages leave the parameters whole, and the ZO step is plain data parallel.
    """
    import json
    from pathlib import Path

    import deepspeed

    from zorefine.errors import ConfigError

    path = Path(config_path)
    if not path.is_file():
        raise ConfigError(f"refine.deepspeed: no DeepSpeed config at {path}")
    try:
        config = _without_auto(json.loads(path.read_text()))
    except json.JSONDecodeError as error:
        raise ConfigError(f"refine.deepspeed: {path} is not JSON ({error})") from None
    zero = config.setdefault("zero_optimization", {})
    if zero.get("stage3_param_persistence_threshold", 0) != 0 or zero.get("model_persistence_threshold", 0) != 0:
        # ZeRO-3 keeps small tensors whole ("persistent") and never re-gathers them from the
        # partitions ZO moves, so every tensor must be partitioned for the updates to count.
        log.info("[refine] ZeRO-3 persistence thresholds set to 0: ZO moves every tensor through its partition")
    zero["stage3_param_persistence_threshold"] = 0
    zero["model_persistence_threshold"] = 0
    # DeepSpeed insists on a batch size; ZO never lets DeepSpeed step, so any value is right.
    config.setdefault("train_micro_batch_size_per_gpu", 1)
    config.pop("train_batch_size", None)
    config.pop("gradient_accumulation_steps", None)
    deepspeed.initialize(model=model, config=config)
    return model


def gathered(model: torch.nn.Module):
    """A context in which a ZeRO-3-partitioned model holds whole weights on every process (to save it)."""
    import contextlib

    params = [p for p in model.parameters() if is_partitioned(p)]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
