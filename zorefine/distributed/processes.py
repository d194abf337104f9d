"""The processes of a run: which one this is, its share of the work, and the few collectives zorefine needs.

zorefine is launched the usual ways (``torchrun``, ``accelerate launch``, ``deepspeed``); the
process group is set up by accelerate's :class:`~accelerate.PartialState` from the launcher's
environment (NCCL on GPUs, gloo on CPU). A plain ``zorefine`` is one process and every
collective here is then free.

What is shared, and why it is so little:

- ZO refinement is data parallel with *shared seeds*: every process draws the same directions
  and applies the same update, so only each loss evaluation's two numbers (the weighted sum of
  token losses and the total weight over the process's share of the batch) are summed across
  processes, 16 bytes per forward pass, whatever the model size.
- Evaluation and analysis split their independent trials (threat × seed) between processes
  and gather the results on every process, in the order one process would have produced them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

# One float64 = 8 bytes: what a summed number costs on the wire (per process, per all-reduce).
_FLOAT64_BYTES = 8


@dataclass
class Processes:
    """This process's place in the run, and a tally of what it sent to the others."""

    rank: int = 0
    world_size: int = 1
    bytes_communicated: int = field(default=0, compare=False)

    @property
    def is_main(self) -> bool:
        """The process that writes logs, checkpoints and reports."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, items: Sequence[T]) -> list[T]:
        """This process's share of ``items``: every ``world_size``-th one, starting at its rank."""
        return list(items[self.rank :: self.world_size])

    def sum(self, values: Sequence[float]) -> list[float]:
        """``values`` summed elementwise over all processes (float64, so the sum does not drift)."""
        if not self.distributed:
            return [float(v) for v in values]
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_collective_device())
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        self.bytes_communicated += tensor.numel() * _FLOAT64_BYTES
        return tensor.cpu().tolist()

    def gather(self, value: Any) -> list[Any]:
        """Every process's ``value``, in rank order, on every process."""
        if not self.distributed:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def broadcast(self, value: T) -> T:
        """The main process's ``value``, on every process."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        """Wait until every process gets here (e.g. before reading what the main process wrote)."""
        if self.distributed:
            dist.barrier()

    def map_sharded(self, items: Sequence[T], fn: Callable[[T], Any]) -> list[Any]:
        """``[fn(x) for x in items]``, each process computing its share, the results in item order."""
        if not self.distributed:
            return [fn(item) for item in items]
        mine = [(index, fn(item)) for index, item in zip(range(self.rank, len(items), self.world_size), self.shard(items))]
        results: list[Any] = [None] * len(items)
        for share in self.gather(mine):
            for index, value in share:
                results[index] = value
        return results


def _collective_device() -> torch.device:
    """NCCL needs CUDA tensors; gloo takes CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def launched_distributed() -> bool:
    """Whether a launcher (torchrun, accelerate, deepspeed) started several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


_CURRENT: Processes | None = None


def current() -> Processes:
    """This run's processes; the process group is set up on first use when a launcher started several."""
    global _CURRENT
    if _CURRENT is None:
        if launched_distributed() and not dist.is_initialized():
            from accelerate import PartialState

            PartialState()
        if dist.is_available() and dist.is_initialized():
            _CURRENT = Processes(dist.get_rank(), dist.get_world_size())
        else:
            _CURRENT = Processes()
    return _CURRENT
