"""Checks that checkpoints belong together before anything is merged or written.

    check_compatible         same tensor names and shapes as the base (else InputError naming the key)
    check_same_architecture  config.json fields that define tensor layouts agree with the base's
    check_shares_base        every model is close to the base (‖θ − θ0‖/‖θ0‖ ≤ 0.5): fine-tuned from it
    drop_unshared_untrained_keys  untrained tensors only some inputs carry (BERT pooler, position_ids) left out
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from codiemb_pl.errors import InputError
from codiemb_pl.fusion.keys import is_untrained_key
from codiemb_pl.fusion.sources import KeySubsetSource, OpenedCheckpoint, TensorSource, row_ranges

# config.json fields that must agree between checkpoints fused together.
ARCHITECTURE_FIELDS = ("model_type", "architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
                       "intermediate_size", "vocab_size", "max_position_embeddings", "d_model", "n_layer", "n_embd")
# ‖θk − θ0‖ / ‖θ0‖ above this: θk was not fine-tuned from θ0 (an unrelated initialisation gives ~1.4).
MAX_RELATIVE_DISTANCE = 0.5
DISTANCE_ROW_ELEMENTS = 1 << 18


def check_compatible(base: TensorSource, models: Sequence[TensorSource]) -> list[str]:
    """The base's keys, after checking every model has the same keys and shapes (else InputError)."""
    keys = list(base.keys())
    key_set = set(keys)
    for model in models:
        model_keys = set(model.keys())
        missing = [k for k in keys if k not in model_keys]
        extra = sorted(model_keys - key_set)
        if missing or extra:
            key = missing[0] if missing else extra[0]
            side = f"in {base.name} but not in {model.name}" if missing else f"in {model.name} but not in {base.name}"
            raise InputError(model.name, f"key {key!r} is {side} ({len(missing)} missing, {len(extra)} extra)",
                             "do these checkpoints share the same base architecture?")
    for key in keys:
        base_shape = base.shape(key)
        for model in models:
            model_shape = model.shape(key)
            if model_shape != base_shape:
                raise InputError(model.name, f"key {key!r} has shape {list(model_shape)} but {list(base_shape)} "
                                             f"in {base.name}", "do these checkpoints share the same base architecture?")
    return keys


def drop_unshared_untrained_keys(sources: Sequence[TensorSource]) -> list[TensorSource]:
    """Leave out untrained keys that not every source has (an HF save with a pooler vs a codiemb export)."""
    key_sets = [set(source.keys()) for source in sources]
    shared = set.intersection(*key_sets)
    dropped = {key for keys in key_sets for key in keys - shared if is_untrained_key(key)}
    if not dropped:
        return list(sources)
    return [KeySubsetSource(source, keys - dropped) for source, keys in zip(sources, key_sets)]


def architecture_of(config: dict[str, Any]) -> dict[str, Any]:
    """The config.json fields that define tensor layouts (those present)."""
    return {name: config[name] for name in ARCHITECTURE_FIELDS if name in config}


def check_same_architecture(base: OpenedCheckpoint, models: Iterable[OpenedCheckpoint]) -> None:
    """InputError when a model's config.json names another architecture or size than the base's."""
    if base.config is None:
        return
    expected = architecture_of(base.config)
    for model in models:
        if model.config is None:
            continue
        found = architecture_of(model.config)
        for name in expected:
            if name in found and found[name] != expected[name]:
                raise InputError(model.path, f"architecture differs from the base {base.path}: config.json "
                                             f"{name} is {found[name]!r}, base has {expected[name]!r}",
                                 "fuse only checkpoints fine-tuned from the same base model")


def relative_distance(base: TensorSource, model: TensorSource, keys: Iterable[str],
                      max_elements: int = DISTANCE_ROW_ELEMENTS) -> float:
    """‖θ − θ0‖ / ‖θ0‖ over the floating-point tensors of `keys`, read in row chunks."""
    moved = total = 0.0
    for key in keys:
        if not base.dtype(key).is_floating_point:
            continue
        for start, stop in row_ranges(base.shape(key), max_elements):
            base_rows = base.rows(key, start, stop).float()
            model_rows = model.rows(key, start, stop).float()
            moved += float(torch.sum((model_rows - base_rows) ** 2, dtype=torch.float64))
            total += float(torch.sum(base_rows ** 2, dtype=torch.float64))
    return math.sqrt(moved / total) if total > 0 else math.sqrt(moved)


def check_shares_base(base: TensorSource, models: Sequence[TensorSource], keys: Iterable[str],
                      names: Sequence[str], max_distance: float = MAX_RELATIVE_DISTANCE) -> None:
    """InputError when a model is so far from the base that it cannot have been fine-tuned from it."""
    keys = list(keys)
    for model, name in zip(models, names):
        distance = relative_distance(base, model, keys)
        if distance > max_distance:
            raise InputError(name, f"is not a fine-tuned copy of the base {base.name} (relative distance "
                                   f"‖θ−θ0‖/‖θ0‖ = {distance:.2f} > {max_distance})",
                             "use the model these checkpoints were trained from as the base")
