"""Seeded per-tensor random directions: the one place random perturbations come from.

Every tensor draws its direction from its own seed, derived from a step (or trial)
seed and the tensor's name. A direction is therefore never stored: any tensor, or
any process holding it, can regenerate its own direction alone, and two tensors never
share a direction because they share a seed.

A :class:`Direction` is produced in fixed-size chunks written into a small reused scratch
buffer, so moving a weight along it never allocates (or page-faults) a temporary the size of
the tensor. The whole tensor, when one is needed, is by construction those chunks laid end to
end, so the chunked and the whole-tensor paths always agree.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from typing import Iterator

import torch

_SEED_MASK = (1 << 63) - 1
# Bumped whenever the weights a logged seed and gradient produce change (the direction
# generator, or the update arithmetic: v3 scales Adam and sign steps by the tensor's RMS under
# relative ε); replay refuses logs from another version.
DIRECTIONS_VERSION = 3
# Entries per chunk: small enough to stay in cache on CPU, large enough to keep GPU kernels busy.
# Fixed per device type, because CUDA generators give different numbers for other chunkings.
_CHUNK_BY_DEVICE_TYPE = {"cpu": 1 << 20}
_CHUNK_DEFAULT = 1 << 24
# Entries per block of a "tiled" direction: its tile pool (2 × 2 blocks of fp32) stays in cache on
# CPU; on a GPU a block is one kernel's worth of work.
_TILE_BY_DEVICE_TYPE = {"cpu": 1 << 18}
_TILE_DEFAULT = 1 << 22
# Tile pools kept per device: a move reads at most two directions at once (the pending update's
# and the new one), plus one for the next step's.
_TILE_POOLS_KEPT = 3


_MASK64 = (1 << 64) - 1
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15


def _splitmix64(state: int) -> int:
    """The splitmix64 output function (Steele et al. 2014): 64 well-mixed bits of ``state``."""
    z = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def tensor_seed(base_seed: int, tensor_name: str) -> int:
    """Derive the seed of one tensor's direction from a base seed and the tensor's name."""
    digest = hashlib.blake2b(f"{int(base_seed)}:{tensor_name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _SEED_MASK


def chunk_size(device: torch.device) -> int:
    """Entries per direction chunk on ``device`` (a multiple of 64)."""
    return _CHUNK_BY_DEVICE_TYPE.get(torch.device(device).type, _CHUNK_DEFAULT)


def tile_size(device: torch.device) -> int:
    """Entries per block of a ``"tiled"`` direction on ``device`` (a power of two)."""
    return _TILE_BY_DEVICE_TYPE.get(torch.device(device).type, _TILE_DEFAULT)


class _TilePools:
    """The ±1 pools that ``"tiled"`` directions read their blocks from, a few per device.

    A pool is one fresh random ±1 vector ``v`` of two blocks (row 0) and ``−v`` (row 1), drawn
    from a pool seed. Every tensor's direction under one direction seed reads the same pool, so
    the pool is drawn once per step instead of once per tensor and move.
    """

    def __init__(self) -> None:
        self._pools: dict[tuple[int, torch.device, int], torch.Tensor] = {}

    def get(self, seed: int, device: torch.device) -> torch.Tensor:
        """The pool of ``seed`` on ``device``: shape ``(2, 2 × tile_size)``, rows ``v`` and ``−v``."""
        key = (int(seed), torch.device(device), tile_size(device))
        pool = self._pools.pop(key, None)
        if pool is None:
            v = Direction("rademacher", (2 * key[2],), device, tensor_seed(seed, "tiled:pool")).full()
            pool = torch.stack([v, -v])
            while len(self._pools) >= _TILE_POOLS_KEPT:
                self._pools.pop(next(iter(self._pools)))
        self._pools[key] = pool  # most recent last
        return pool


_TILE_POOLS = _TilePools()


class _ScratchPool:
    """Reusable chunk buffers per device: a move never allocates one afresh."""

    def __init__(self) -> None:
        self._free: dict[torch.device, list[torch.Tensor]] = {}

    @contextmanager
    def buffer(self, device: torch.device) -> Iterator[torch.Tensor]:
        free = self._free.setdefault(device, [])
        scratch = free.pop() if free else None
        if scratch is None or scratch.numel() < chunk_size(device):
            scratch = torch.empty(chunk_size(device), dtype=torch.float32, device=device)
        try:
            yield scratch
        finally:
            free.append(scratch)


_SCRATCH = _ScratchPool()


def scratch_buffer(device: torch.device):
    """A reused fp32 buffer of one chunk on ``device`` (a context manager); never shared while held."""
    return _SCRATCH.buffer(torch.device(device))
_SIGN_TABLES: dict[torch.device, torch.Tensor] = {}


def _sign_table(device: torch.device) -> torch.Tensor:
    """Row ``b`` holds the 8 signs (bit i set → +1) that random byte ``b`` stands for."""
    if device not in _SIGN_TABLES:
        shifts = torch.arange(8, dtype=torch.uint8)
        bits = (torch.arange(256, dtype=torch.int32).to(torch.uint8).unsqueeze(1) >> shifts) & 1
        _SIGN_TABLES[device] = (bits.to(torch.float32) * 2 - 1).to(device)
    return _SIGN_TABLES[device]


class Direction:
    """The direction ``z(seed)`` of one tensor: Gaussian, ±1 (Rademacher) or tiled ±1, fp32.

    Args:
        kind: ``"gaussian"`` (standard normal entries), ``"rademacher"`` (independent ±1 entries,
            a valid SPSA direction with zero mean and identity covariance that costs one random
            bit per entry: several times cheaper to regenerate on CPU) or ``"tiled"`` (±1 entries
            read from a shared pool, see below: nearly free to regenerate).
        shape: the tensor's shape.
        device: where to draw it.
        seed: the tensor's seed (see :func:`tensor_seed`).
        window: ``(offset, length)``: only entries ``offset .. offset+length`` of the flattened
            tensor, re-indexed from 0 (a ZeRO-3 partition; entries past the tensor's end are
            padding and get no direction). The numbers are those of the whole direction.
        pool_seed: ``"tiled"`` only: the seed of the pool every tensor of one step reads (the
            engine passes the direction seed); default ``seed``.

    A tiled direction cuts the flattened tensor into blocks of :func:`tile_size` entries; block
    ``k`` is ``σ_k · v[r_k : r_k + block]`` with ``v`` the pool's ±1 vector (fresh per pool seed,
    two blocks long) and an offset ``r_k`` and sign ``σ_k`` drawn per block from the tensor's
    seed. Entries within a block are distinct entries of ``v``, and blocks carry independent
    signs, so ``E[z] = 0`` and ``E[z zᵀ] = I`` exactly, and ``|z|² = n`` as for Rademacher: the
    SPSA estimate is unbiased with the same mean squared error. Its higher moments differ
    (blocks are signed shifts of one vector; two blocks whose offsets coincide, about
    ``blocks² / (2 × block)`` pairs over a step, are signed copies), which is why it is an
    option, not the default.
    """

    def __init__(
        self,
        kind: str,
        shape: torch.Size | tuple[int, ...],
        device: torch.device,
        seed: int,
        window: tuple[int, int] | None = None,
        pool_seed: int | None = None,
    ) -> None:
        if kind not in DIRECTIONS:
            raise ValueError(f"direction must be one of {sorted(DIRECTIONS)}, got {kind!r}")
        self.kind, self.shape, self.device, self.seed = kind, torch.Size(shape), torch.device(device), int(seed)
        self.window = window
        self.pool_seed = self.seed if pool_seed is None else int(pool_seed)
        full_numel = self.shape.numel()
        self._first, self.numel = window if window is not None else (0, full_numel)
        self._last = min(self._first + self.numel, full_numel)  # entries past it are padding

    def chunks(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(start, end, z[start:end])`` over the flattened tensor (or window), in order.

        Each chunk lives in a shared scratch buffer that the next chunk overwrites: use it
        before advancing the iterator. A window still draws the chunks before it (one random
        stream per tensor), so a partition costs the draw of everything up to its end.
        """
        if self.kind == "tiled":
            yield from self._tiled_chunks()
            return
        generator = torch.Generator(device=self.device)
        generator.manual_seed(self.seed)
        step = chunk_size(self.device)
        first, last = self._first, self._last
        with _SCRATCH.buffer(self.device) as scratch:
            for start in range(0, last, step):
                end = min(start + step, self.shape.numel())
                z = self._fill(scratch, end - start, generator)
                if end <= first:
                    continue
                low, high = max(start, first), min(end, last)
                yield low - first, high - first, z[low - start : high - start]

    def _tiled_chunks(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        """The blocks of a tiled direction: views into the pool, no entry drawn or written."""
        block, numel = tile_size(self.device), self.shape.numel()
        pool = _TILE_POOLS.get(self.pool_seed, self.device)
        first, last = self._first, self._last
        state = self.seed
        for start in range(0, numel, block):
            # A block's offset and sign: 64 bits of a splitmix64 stream on the tensor's seed, in
            # plain Python (hundreds of small tensors make a torch generator per tensor the cost).
            state = (state + _GOLDEN_GAMMA) & _MASK64
            bits = _splitmix64(state)
            end = min(start + block, numel)
            if end <= first:
                continue
            if start >= last:
                return
            low, high = max(start, first), min(end, last)
            r = (bits & (block - 1)) + low - start
            yield low - first, high - first, pool[bits >> 63, r : r + high - low]

    def _fill(self, scratch: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
        if self.kind == "gaussian":
            return torch.randn(count, generator=generator, out=scratch[:count])
        # One random bit per entry: 64-bit words, read as bytes, each byte looked up as 8 signs.
        words = torch.randint(
            -(1 << 63), (1 << 63) - 1, ((count + 63) // 64,), dtype=torch.int64, generator=generator, device=self.device
        )
        num_bytes = (count + 7) // 8
        byte_index = words.view(torch.uint8)[:num_bytes].to(torch.int32)
        torch.index_select(_sign_table(self.device), 0, byte_index, out=scratch[: num_bytes * 8].view(num_bytes, 8))
        return scratch[:count]

    def full(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole direction as a new tensor (the chunks laid end to end)."""
        out = torch.zeros(self.numel, dtype=torch.float32, device=self.device)
        for start, end, chunk in self.chunks():
            out[start:end].copy_(chunk)
        out = out.view(self.shape) if self.window is None else out
        return out if dtype in (None, torch.float32) else out.to(dtype)


def gaussian_direction(reference: torch.Tensor, seed: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Standard normal tensor shaped like ``reference``, reproducible from ``seed``.

    Drawn on ``reference``'s device. The draw is made in float32 and cast, so a bf16 model and
    its fp32 master copy see the same direction.
    """
    return Direction("gaussian", reference.shape, reference.device, seed).full(dtype)


def rademacher_direction(reference: torch.Tensor, seed: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Random ±1 tensor shaped like ``reference``, reproducible from ``seed``."""
    return Direction("rademacher", reference.shape, reference.device, seed).full(dtype)


def tiled_direction(reference: torch.Tensor, seed: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Tiled ±1 tensor shaped like ``reference``, reproducible from ``seed`` (its own pool)."""
    return Direction("tiled", reference.shape, reference.device, seed).full(dtype)


def tensor_rms(tensor: torch.Tensor) -> float:
    """Root-mean-square of a tensor's entries, computed in float32 (0.0 for an empty tensor)."""
    if tensor.numel() == 0:
        return 0.0
    return float(tensor.detach().float().pow(2).mean().sqrt())


DIRECTIONS = {"gaussian": gaussian_direction, "rademacher": rademacher_direction, "tiled": tiled_direction}
