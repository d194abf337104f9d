"""The zeroth-order engine: SPSA / MeZO-style optimisation with the seed trick.

A direction ``z`` is never stored. Each selected tensor regenerates its own direction from
a seed derived from the direction seed and the tensor's name (:mod:`zorefine.zo.directions`), so
two tensors never share a direction and any tensor (or a process holding it) can perturb
itself alone. Weights are written in place from an fp32 master copy of the selected tensors
only (:class:`~zorefine.zo.weight_store.MasterCopy`), or, for fp32 weights with
``store="compensated"``, moved in place with about half a byte per weight kept to undo the rounding
(:class:`~zorefine.zo.weight_store.CompensatedShift`). Either way restores are exact (bit for bit),
and bf16/fp16 models do not lose small updates.

Cost per step with q directions: 2q forward passes (one more, for L(θ), when the step evaluates
the clean loss: the curvature unit schedule) and 3q regenerations of a direction: each direction
is drawn for ``+εz``, for ``-εz``, and once more by the update, which is fused with the restore
(:func:`step_cost`). A step with ``settle=False`` (what ``refine`` runs) leaves its update to
the next step's first move, which applies it in the same pass over the weights: one read of θ
and one write of the weights fewer per step, the same θ bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence, Tuple

import torch

from zorefine import distributed
from zorefine.distributed.partitions import LocalEntries, is_partitioned, local_entries, whole_rms
from zorefine.zo.directions import DIRECTIONS, Direction, tensor_seed
from zorefine.zo.entry_store import EntryStore
from zorefine.zo.weight_store import STORES, MasterCopy, make_store

_STEP_SEED_SPACE = 2**31 - 1
OPTIMIZERS = ("sgd", "momentum", "adam", "sign")
# Optimizers whose step size does not depend on the gradient's scale.
NORMALIZED_OPTIMIZERS = ("adam", "sign")


def step_seed(run_seed: int, step: int) -> int:
    """The seed of one step, derived from the run seed (reproducible, no state)."""
    return tensor_seed(run_seed, f"step:{step}") % _STEP_SEED_SPACE


def direction_seed(seed: int, index: int) -> int:
    """The seed of direction ``index`` within a step (index 0 is the step seed itself)."""
    return seed if index == 0 else tensor_seed(seed, f"direction:{index}") % _STEP_SEED_SPACE


def step_cost(num_directions: int, evaluate_clean: bool = False) -> tuple[int, int]:
    """``(forward passes, direction regenerations)`` of one :meth:`ZOEngine.step`."""
    return 2 * num_directions + int(evaluate_clean), 3 * num_directions


@dataclass
class ZOSettings:
    """How the engine perturbs and updates (the pipeline's values: ``refine.zo`` in the config)."""

    # The perturbation radius.
    eps: float = 1e-3
    # "absolute": the same ε for every tensor; "relative": ε × each tensor's RMS at the start
    # (a smoothing radius on the scale of the weight-noise threat).
    eps_mode: str = "absolute"
    # n-SPSA: directions averaged per step (2 forward passes each).
    num_directions: int = 1
    # "rademacher" (±1 entries: one random bit each, ~6x cheaper to regenerate than a Gaussian on
    # CPU, same expected gradient, lower variance), "gaussian" (as in MeZO) or "tiled" (±1 entries
    # read as signed shifts of one pool per step: unbiased with the same mean squared error, and
    # nearly free to regenerate; see zorefine.zo.directions.Direction).
    direction: str = "rademacher"
    # "sgd" | "momentum" | "adam" | "sign" (state, if any, only for the selected tensors).
    optimizer: str = "sgd"
    momentum: float = 0.9
    adam_betas: Tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    # "copy": an fp32 master copy of the selected weights (fastest, 4 bytes per weight);
    # "compensated": fp32 weights are moved in place and restored exactly from ~half a byte per
    # weight (for models where memory is the limit); "inplace": fp32 weights are moved in place
    # and nothing is kept (no extra memory, as fast as "copy"; θ picks up a few ulp of rounding
    # per step, which replay reproduces bit for bit). Half-precision weights always keep a copy.
    store: str = "copy"

    def __post_init__(self) -> None:
        if self.eps <= 0:
            raise ValueError("eps must be > 0")
        if self.eps_mode not in ("absolute", "relative"):
            raise ValueError(f"eps_mode must be 'absolute' or 'relative', got {self.eps_mode!r}")
        if self.num_directions < 1:
            raise ValueError("num_directions must be >= 1")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {sorted(DIRECTIONS)}, got {self.direction!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.store not in STORES:
            raise ValueError(f"store must be one of {STORES}, got {self.store!r}")


@dataclass
class ZOStepRecord:
    """What one ZO step did: enough to replay it from the previous weights and state."""

    step: int
    seed: int
    projected_grad: float  # mean over directions (for logs)
    lr: float
    loss_plus: float
    loss_minus: float
    skipped: bool = False
    projected_grads: list[float] = field(default_factory=list)  # one per direction
    eps: float | None = None
    loss_clean: float | None = None
    # The one unit this step perturbed and updated (curvature schedule); None = the whole selection.
    unit: str | None = None

    @property
    def loss(self) -> float:
        """The smoothed loss estimate at the current weights: mean of the ± evaluations."""
        return 0.5 * (self.loss_plus + self.loss_minus)

    def grads(self) -> list[float]:
        """Per-direction projected gradients (older logs hold a single scalar)."""
        return self.projected_grads or [self.projected_grad]


class ZOEngine:
    """ZO optimisation of a fixed set of parameters, evaluated by a loss closure.

    Args:
        params: the parameters the engine may touch, by full name.
        eps: perturbation radius (kept for the short form ``ZOEngine(params, eps)``).
        settings: everything else; ``settings.eps`` is overridden by ``eps`` when given.
    """

    def __init__(
        self,
        params: Mapping[str, torch.nn.Parameter],
        eps: float | None = None,
        settings: ZOSettings | None = None,
        entries: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        if not params:
            raise ValueError("ZOEngine needs at least one parameter to refine")
        # A copy: the caller's settings may configure several engines (and stay as given).
        self.settings = dataclasses.replace(settings or ZOSettings())
        if eps is not None:
            self.settings.eps = float(eps)
        self.params = dict(params)
        # Flat positions of the selected entries of a tensor (a unit set); absent: the whole tensor.
        self.entries = dict(entries or {})
        # What each process holds of each tensor: all of it, its ZeRO-3 partition, or the entries.
        self.local = {name: self._local(name, p) for name, p in self.params.items()}
        self.stores = {name: self._store(name) for name in self.params}
        # Per-tensor perturbation scale: 1 (absolute ε) or the tensor's RMS at the start
        # (relative ε), fixed for the run so replay can recompute it from the base weights.
        processes = distributed.current()
        self.scales = {
            name: (whole_rms(self.local[name], processes) or 1.0) if self.settings.eps_mode == "relative" else 1.0
            for name in self.params
        }
        self.state: dict[str, dict[str, torch.Tensor | int]] = {}
        self.updates = 0

    def _local(self, name: str, param: torch.nn.Parameter) -> LocalEntries:
        if name not in self.entries:
            return local_entries(param)
        if is_partitioned(param):
            raise ValueError(f"{name}: a unit selection cannot refine a ZeRO-3 partitioned tensor")
        # A copy of the selected values: the direction's shape and the relative-ε scale are theirs.
        selected = param.detach().reshape(-1)[self.entries[name].to(param.device)]
        return LocalEntries(selected, 0, selected.shape, False)

    def _store(self, name: str):
        if name in self.entries:
            return EntryStore(self.params[name], self.entries[name], self._direction_of(name))
        return make_store(self.settings.store, self.local[name].tensor, self._direction_of(name))

    @property
    def moves_define_theta(self) -> bool:
        """Whether θ depends on the ± moves too (``store="inplace"``): replay must make them."""
        return any(store.replays_moves for store in self.stores.values())

    @property
    def num_parameters(self) -> int:
        """How many scalar weights the engine refines."""
        return sum(entries.shape.numel() for entries in self.local.values())

    def _direction_of(self, name: str) -> Callable[[int], Direction]:
        """The direction of tensor ``name`` for a direction seed (fp32, on the tensor's device).

        On a ZeRO-3 partition it is the partition's window of the whole tensor's direction.
        """
        entries = self.local[name]
        kind, shape, device, window = self.settings.direction, entries.shape, entries.tensor.device, entries.window()
        return lambda seed: Direction(kind, shape, device, tensor_seed(seed, name), window, pool_seed=seed)

    def theta(self, name: str) -> torch.Tensor:
        """The exact fp32 value of a selected tensor (settles its weight first if needed)."""
        return self.stores[name].theta()

    def _active(self, names: Sequence[str] | None) -> list[str]:
        """The tensors a step works on: ``names`` (a subset of the selection) or all of them."""
        if names is None:
            return list(self.stores)
        unknown = [name for name in names if name not in self.stores]
        if unknown:
            raise KeyError(f"not refined by this engine: {unknown[:3]}")
        return list(names)

    @torch.no_grad()
    def _write(self, seed: int, eps: float, names: Sequence[str] | None = None) -> None:
        """Set the selected weights (or ``names``) to ``θ + eps * scale * z`` in place."""
        for name in self._active(names):
            self.stores[name].shift(seed, eps * self.scales[name])

    def weight(self, name: str) -> torch.Tensor:
        """The exact current value of a refined tensor, whole (what the model holds once settled).

        Unlike :meth:`theta`, never a subset: a unit set's tensor is the weight itself, and
        the weights are not written, so a step left unsettled stays that way.
        """
        store = self.stores[name]
        if isinstance(store, MasterCopy):
            return store.theta()
        store.settle()
        return self.params[name].detach()

    def weights(self) -> Mapping[str, torch.Tensor]:
        """:meth:`weight` of every refined tensor, as a read-only mapping read when looked up."""
        return _Weights(self)

    @torch.no_grad()
    def restore(self) -> None:
        """Bring every selected weight back to θ (exact), applying any update a step left pending."""
        for store in self.stores.values():
            store.settle()

    @torch.no_grad()
    def _settle_pending(self, keep: Sequence[str] = ()) -> None:
        """Write θ into every weight with a pending update, except ``keep`` (their next move applies it)."""
        kept = set(keep)
        for name, store in self.stores.items():
            if name not in kept and store.pending:
                store.settle()

    @torch.no_grad()
    def estimate(
        self, seed: int, eps: float, loss_fn: Callable[[], torch.Tensor | float], names: Sequence[str] | None = None
    ) -> tuple[list[float], list[float], list[float]]:
        """Projected gradients along each direction of a step: ``(L(θ+εz) − L(θ−εz)) / 2ε``.

        Only ``names`` (default: every selected tensor) are perturbed. Leaves the weights
        perturbed; callers restore or update afterwards.
        """
        grads, plus, minus = [], [], []
        for index in range(self.settings.num_directions):
            seed_d = direction_seed(seed, index)
            self._write(seed_d, eps, names)
            loss_plus = float(loss_fn())
            self._write(seed_d, -eps, names)
            loss_minus = float(loss_fn())
            plus.append(loss_plus)
            minus.append(loss_minus)
            grads.append((loss_plus - loss_minus) / (2.0 * eps))
        return grads, plus, minus

    @torch.no_grad()
    def apply_update(
        self,
        seed: int,
        projected_grads: float | Sequence[float],
        lr: float,
        names: Sequence[str] | None = None,
        defer: bool = False,
    ) -> None:
        """Update θ (of ``names``, default all) from a step's projected gradients and write the weights.

        The restore is fused into the update: the weights are written once, from the new θ.
        ``defer``: where the store can, leave the writing to the next move (see :meth:`step`).
        Used by :meth:`step` and by replay, so both run the very same arithmetic on θ.
        """
        grads = [float(projected_grads)] if isinstance(projected_grads, (int, float)) else [float(g) for g in projected_grads]
        optimizer = self.settings.optimizer
        self.updates += 1
        for name in self._active(names):
            store, scale = self.stores[name], self.scales[name]
            if optimizer == "sgd" and len(grads) == 1:
                # The common case in one pass: no gradient tensor is materialised.
                store.update_along(seed, -lr * grads[0] * scale, defer=defer)
            else:
                direction_of = self._direction_of(name)
                local = self.local[name].tensor
                grad = torch.zeros(local.numel(), dtype=torch.float32, device=local.device)
                for index, g in enumerate(grads):
                    for start, end, z in direction_of(direction_seed(seed, index)).chunks():
                        grad[start:end].add_(z, alpha=g * scale / len(grads))
                grad = grad.view(local.shape)
                update = self._optimizer_step(name, grad)
                if optimizer in NORMALIZED_OPTIMIZERS:
                    # Adam and sign steps have unit size per entry whatever the gradient's scale,
                    # so the tensor's scale is applied after them: under relative ε a step of
                    # lr moves each weight by lr x its tensor's RMS, as it does for SGD.
                    update = update.mul_(scale)
                store.update_by(update, -lr)

    @torch.no_grad()
    def replay(self, record: ZOStepRecord, names: Sequence[str] | None = None) -> bool:
        """Redo a logged step on θ (no forward passes); returns whether it changed θ.

        With exact stores that is the update alone. With ``store="inplace"`` the step's moves
        round θ too, so they are made again first, in the order :meth:`step` made them.
        """
        if self.moves_define_theta:
            eps = self.settings.eps if record.eps is None else record.eps
            self._settle_pending(() if record.loss_clean is not None else self._active(names))
            self.estimate(record.seed, eps, lambda: 0.0, names)
            if record.skipped:
                self.restore()
        if record.skipped:
            return False
        self.apply_update(record.seed, record.grads(), record.lr, names)
        return True

    def _optimizer_step(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        """The update direction for one tensor (its state lives only for selected tensors)."""
        s = self.settings
        if s.optimizer == "sgd":
            return grad
        if s.optimizer == "sign":
            return grad.sign()
        state = self.state.setdefault(name, {})
        if s.optimizer == "momentum":
            buf = state.setdefault("momentum", torch.zeros_like(grad))
            buf.mul_(s.momentum).add_(grad)
            return buf
        beta1, beta2 = s.adam_betas
        m = state.setdefault("m", torch.zeros_like(grad))
        v = state.setdefault("v", torch.zeros_like(grad))
        m.mul_(beta1).add_(grad, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        # Per-tensor step count: with one unit per step (unit_schedule=curvature) a tensor is
        # updated less often than the engine, and its bias correction must follow its own count.
        count = state["count"] = state.get("count", 0) + 1
        m_hat = m / (1 - beta1**count)
        v_hat = v / (1 - beta2**count)
        return m_hat / (v_hat.sqrt() + s.adam_eps)

    @torch.no_grad()
    def step(
        self,
        step: int,
        seed: int,
        lr: float,
        loss_fn: Callable[[], torch.Tensor | float],
        eps: float | None = None,
        names: Sequence[str] | None = None,
        evaluate_clean: bool = False,
        settle: bool = True,
    ) -> ZOStepRecord:
        """One (n-)SPSA step: 2 forward passes per direction, then update along the directions.

        ``names`` restricts the step to a subset of the selected tensors. ``evaluate_clean``
        also evaluates L(θ) first (one more forward), which with the ± evaluations gives the
        curvature along the direction. A non-finite loss skips the update and leaves the
        weights exactly as they were.

        ``settle=False`` may leave the weights where the last evaluation put them, with the
        update pending: the next step applies it in its first move. θ (:meth:`theta`,
        :meth:`weight`) is exact either way; call :meth:`restore` before using the model.
        """
        eps = self.settings.eps if eps is None else eps
        # Every forward of this step must see θ wherever it does not perturb.
        self._settle_pending(() if evaluate_clean else self._active(names))
        clean = float(loss_fn()) if evaluate_clean else None
        grads, plus, minus = self.estimate(seed, eps, loss_fn, names)
        mean_plus, mean_minus = sum(plus) / len(plus), sum(minus) / len(minus)
        if not all(math.isfinite(v) for v in plus + minus + ([clean] if clean is not None else [])):
            self.restore()
            return ZOStepRecord(step, seed, float("nan"), lr, mean_plus, mean_minus, skipped=True, eps=eps, loss_clean=clean)
        self.apply_update(seed, grads, lr, names, defer=not settle)
        return ZOStepRecord(
            step, seed, sum(grads) / len(grads), lr, mean_plus, mean_minus, projected_grads=grads, eps=eps, loss_clean=clean
        )


class _Weights(Mapping):
    """The refined tensors' exact values, looked up through :meth:`ZOEngine.weight`."""

    def __init__(self, engine: ZOEngine) -> None:
        self._engine = engine

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._engine.weight(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._engine.stores)

    def __len__(self) -> int:
        return len(self._engine.stores)
