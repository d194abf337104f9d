"""Generic discovery of a transformer's decoder layers and of parameter subsets.

Every stage works on "units" of a model (a layer, a layer's attention or MLP, a named set of
tensors). Which module holds the layers differs between architectures (``model.layers``,
``transformer.h``, ``model.decoder.layers``, ``gpt_neox.layers``, ...). Instead of a table of
per-architecture paths, which rots with every new architecture, the decoder stack is found
structurally: it is the :class:`torch.nn.ModuleList` of identical blocks holding the most
parameters.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from zorefine.errors import ConfigError, ModelError
from zorefine.distributed.partitions import num_entries

__all__ = [
    "DecoderLayers",
    "decoder_parameters",
    "find_decoder_layers",
    "layer_submodules",
    "parameter_category",
    "parameter_subset",
]


@dataclass(frozen=True)
class DecoderLayers:
    """The repeated decoder blocks of a model, and how to name their parameters.

    ``path`` is the dotted module path of the ``ModuleList`` (e.g. ``"model.layers"``), so
    ``f"{path}.{i}.{local_name}"`` is exactly the name ``model.named_parameters()`` reports.
    """

    path: str
    modules: list[nn.Module]

    def __len__(self) -> int:
        """Number of decoder layers."""
        return len(self.modules)

    def name(self, index: int) -> str:
        """Dotted module name of layer ``index``, e.g. ``"model.layers.3"``."""
        self._check(index)
        return f"{self.path}.{index}" if self.path else str(index)

    def parameters(self, index: int) -> dict[str, nn.Parameter]:
        """Parameters of layer ``index`` keyed by their full names in the model."""
        prefix = self.name(index)
        return {f"{prefix}.{local}": param for local, param in self.modules[index].named_parameters()}

    def _check(self, index: int) -> None:
        if not -len(self.modules) <= index < len(self.modules):
            raise IndexError(f"layer index {index} out of range for {len(self.modules)} layers at {self.path!r}")
        if index < 0:
            # Negative indices would produce names like "model.layers.-1" that match no parameter.
            raise IndexError(f"layer index must be non-negative, got {index}")


def _count_parameters(module: nn.Module) -> int:
    # named_parameters deduplicates shared tensors, so a tied weight is counted once.
    return sum(num_entries(p) for p in module.parameters())


def find_decoder_layers(model: nn.Module) -> DecoderLayers:
    """Find the decoder stack of ``model`` without knowing its architecture.

    The stack is the ``ModuleList`` whose children all have one class (the repeated block) and
    which holds the most parameters; ties go to the shallower path. Raises :class:`ModelError`
    if the model has no such list.
    """
    best: tuple[int, int, str, nn.ModuleList] | None = None
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        classes = {type(child) for child in module}
        if len(classes) != 1:
            continue
        count = _count_parameters(module)
        if count == 0:
            continue
        depth = path.count(".") if path else -1
        # Most parameters first; among equals the shallower (outer) list, e.g. not an inner expert list.
        key = (count, -depth)
        if best is None or key > (best[0], best[1]):
            best = (count, -depth, path, module)
    if best is None:
        raise ModelError(
            f"could not find decoder layers in {type(model).__name__}: no torch.nn.ModuleList of "
            "identical blocks with parameters (is this a transformer language model?)"
        )
    _, _, path, module_list = best
    return DecoderLayers(path=path, modules=list(module_list))


# Submodule name heuristics. Each path component of a parameter's local name is tested in order,
# and the first component that matches any category decides, so "self_attn.q_norm" is attention
# (inside the attention block) but "post_attention_layernorm" is a norm ("other").
_NORM = re.compile(r"norm|^ln(_?[0-9a-z]+)?$")  # input_layernorm, ln_1, ln_f, q_norm
_ATTENTION = re.compile(r"attn|attention")  # self_attn, attn, attention, self_attention, crossattention
_MLP = re.compile(r"mlp|feed_?forward|ffn|moe|expert|^fc(\d+|_in|_out)?$")  # mlp, feed_forward, fc1, fc2


def parameter_category(local_name: str) -> str:
    """``"attention"``, ``"mlp"`` or ``"other"`` for a parameter's name inside its decoder layer."""
    for component in local_name.lower().split(".")[:-1]:
        if _NORM.search(component):
            return "other"
        if _ATTENTION.search(component):
            return "attention"
        if _MLP.search(component):
            return "mlp"
    return "other"


def layer_submodules(model: nn.Module, index: int) -> dict[str, dict[str, nn.Parameter]]:
    """Split layer ``index``'s parameters into ``"attention"``, ``"mlp"`` and ``"other"``.

    Uses generic name heuristics (``attn``/``attention``/``self_attn`` vs
    ``mlp``/``feed_forward``/``ffn``/``fc1``/``fc2``); norms and anything unrecognised go to
    ``"other"``. All three keys are always present. Keys of the inner dicts are full names.
    """
    layers = find_decoder_layers(model)
    prefix = layers.name(index) + "."
    groups: dict[str, dict[str, nn.Parameter]] = {"attention": {}, "mlp": {}, "other": {}}
    for name, param in layers.parameters(index).items():
        groups[parameter_category(name[len(prefix) :])][name] = param
    return groups


def decoder_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """All parameters of all decoder layers, keyed by full name, in layer order."""
    layers = find_decoder_layers(model)
    params: dict[str, nn.Parameter] = {}
    for index in range(len(layers)):
        params.update(layers.parameters(index))
    return params


def parameter_subset(model: nn.Module, names_or_regex: Sequence[str]) -> dict[str, nn.Parameter]:
    """Parameters selected by exact names or regular expressions (``re.fullmatch``).

    An entry that is an exact parameter name selects that parameter; any other entry is a
    pattern matched against every name. Raises :class:`ConfigError` if an entry is not a valid
    pattern or selects nothing (a typo must not silently select an empty set). The result keeps
    the model's parameter order.
    """
    if isinstance(names_or_regex, str):
        # A bare string would otherwise be iterated character by character.
        names_or_regex = [names_or_regex]
    named = dict(model.named_parameters())
    selected: set[str] = set()
    for entry in names_or_regex:
        if entry in named:
            selected.add(entry)
            continue
        try:
            pattern = re.compile(entry)
        except re.error as exc:
            raise ConfigError(f"invalid parameter pattern {entry!r}: {exc}") from None
        matches = [name for name in named if pattern.fullmatch(name)]
        if not matches:
            examples = ", ".join(list(named)[:3])
            raise ConfigError(
                f"parameter pattern {entry!r} matches no parameter of {type(model).__name__} "
                f"(patterns must match whole names, e.g. {examples})"
            )
        selected.update(matches)
    return {name: param for name, param in named.items() if name in selected}
