"""Smaller students: keep some of a backbone's transformer blocks (`model.num_layers`).

`num_layers: k` keeps the first k blocks; `num_layers: [i, j, ...]` keeps the blocks at those indices (strictly
increasing, 0-based), the usual way a small embedder starts from its teacher's layers. The block list is found
generically: the `nn.ModuleList` of the model whose length is `config.num_hidden_layers` (BERT-style
`encoder.layer`, decoder `layers`, GPT-2 `h`, ...). After the cut the config says `num_hidden_layers = k` (and
keeps the per-layer lists that some configs carry, e.g. Qwen2's `layer_types`, for the kept blocks), every
block's `layer_idx` is its new position (decoder caches index by it), and `save_pretrained` writes a k-block
model that loads as such. `select_layer_state` applies the same cut to a state dict (a base model's weights).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Union

from torch import Tensor, nn

from codiemb_pl.errors import InputError

LayerSelection = Union[int, Sequence[int]]
PER_LAYER_CONFIG_LISTS = ("layer_types",)
_BLOCK_KEY = re.compile(r"^(.*?)\.(\d+)\.")


def kept_layer_indices(selection: LayerSelection, total: int, where: str = "model.num_layers") -> list[int]:
    """The block indices `selection` keeps out of `total` (an int k: 0..k-1; a list: itself), checked."""
    if isinstance(selection, bool) or not isinstance(selection, (int, list, tuple)):
        raise InputError(where, f"{selection!r} is neither a layer count nor a list of layer indices",
                         "use e.g. 3 (the first three layers) or [0, 2, 4]")
    if isinstance(selection, int):
        if not 1 <= selection <= total:
            raise InputError(where, f"{selection} layers asked of a model with {total}", f"use 1 to {total}")
        return list(range(selection))
    indices = list(selection)
    if not indices or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
        raise InputError(where, f"{selection!r} is not a non-empty list of layer indices", "use e.g. [0, 2, 4]")
    if any(i < 0 or i >= total for i in indices):
        raise InputError(where, f"{indices} names a layer outside 0..{total - 1}", f"use indices 0 to {total - 1}")
    if any(b <= a for a, b in zip(indices, indices[1:])):
        raise InputError(where, f"{indices} is not strictly increasing", "list each kept layer once, in model order")
    return indices


def block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(dotted name, module) of the model's transformer blocks: the shallowest `nn.ModuleList` holding
    `config.num_hidden_layers` modules."""
    total = getattr(model.config, "num_hidden_layers", None)
    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) == total]
    if not total or not found:
        raise InputError("model.num_layers", f"cannot find the {total} transformer blocks of "
                         f"{type(model).__name__}", "leave model.num_layers unset for this architecture")
    return min(found, key=lambda item: item[0].count("."))


def select_layers(model: nn.Module, selection: LayerSelection, where: str = "model.num_layers") -> list[int]:
    """Keep the blocks `selection` names in `model` (in place, see the module docstring); returns their
    original indices."""
    name, blocks = block_list(model)
    kept = kept_layer_indices(selection, len(blocks), where)
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    setattr(parent, name.rpartition(".")[2], nn.ModuleList([blocks[index] for index in kept]))
    for position, block in enumerate(getattr(parent, name.rpartition(".")[2])):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = position
    config = model.config
    for field in PER_LAYER_CONFIG_LISTS:
        values = getattr(config, field, None)
        if isinstance(values, (list, tuple)) and len(values) == len(blocks):
            setattr(config, field, [values[index] for index in kept])
    config.num_hidden_layers = len(kept)
    return kept


def select_layer_state(state: Mapping[str, Tensor], selection: LayerSelection,
                       where: str = "model.num_layers") -> dict[str, Tensor]:
    """`state` (a transformer's weights, Hugging Face names) with only the kept blocks, renumbered 0..k-1.

    The blocks are the keys `<prefix>.<i>.…` of the prefix whose indices run 0..n-1 over the most keys.
    """
    groups: dict[str, set[int]] = {}
    counts: dict[str, int] = {}
    for key in state:
        match = _BLOCK_KEY.match(key)
        if match:
            groups.setdefault(match.group(1), set()).add(int(match.group(2)))
            counts[match.group(1)] = counts.get(match.group(1), 0) + 1
    candidates = [prefix for prefix, found in groups.items() if found == set(range(len(found)))]
    if not candidates:
        raise InputError(where, "cannot find the transformer blocks among the weights", "leave model.num_layers unset")
    prefix = max(candidates, key=lambda name: counts[name])
    kept = kept_layer_indices(selection, len(groups[prefix]), where)
    renumber = {old: new for new, old in enumerate(kept)}
    selected: dict[str, Tensor] = {}
    for key, value in state.items():
        match = _BLOCK_KEY.match(key)
        if match and match.group(1) == prefix:
            index = int(match.group(2))
            if index in renumber:
                selected[f"{prefix}.{renumber[index]}.{key[match.end():]}"] = value
        else:
            selected[key] = value
    return selected
