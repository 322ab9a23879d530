"""The merge engine: one per-key loop that merges checkpoints with any registered method (SPEC §5).

    Merge(base, models, method, params, weights=..., seed=..., max_elements=...)
    per key:  θ*[key] = method(θ0[key], [θk[key] − θ0[key]], weights, generator=G(seed, key), **params, **statistic)

Checkpoints are `fusion.sources.TensorSource`s (or state dicts / locations, wrapped by `as_source`),
checked for equal keys and shapes. What a method needs comes from its registration
(`fusion.methods.merge_needs`): a `sliceable` method merges each tensor in dim-0 row ranges of about
`max_elements` elements, read straight from the sources, so memory stays at about (K + 2) row ranges
plus the method's statistic instead of (K + 2) whole tensors; other methods get whole tensors. A
first-pass statistic is computed by the engine and passed as a keyword: layer norms
(`DeltaNorms("layer")`) in one pass over the model before any merge (also for whole tensors), tensor
norms / `TrimThresholds` per tensor just before its slices. Non-float tensors and buffers (`copy_keys`, plus well-known buffer names) are
copied from the first checkpoint. DARE's generator is seeded per key (`key_seed`), so results do not
depend on key order.

`max_elements=None` merges every tensor whole (the reference the slices are tested against, used by
`merge_state_dicts`); results of the two paths are equal bit for bit except for float rounding of the
tensor / layer norms. `Merge.write` streams the merge into a `.safetensors` file (`fusion.writer`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from codiemb_pl.errors import InputError
from codiemb_pl.fusion.compatibility import check_compatible
from codiemb_pl.fusion.keys import is_buffer_key, key_seed, layer_of
from codiemb_pl.fusion.methods import (
    STATISTIC_PARAMETERS,
    DeltaNorms,
    TrimThresholds,
    check_method_params,
    compute_dtype,
    get_merge_method,
    merge_needs,
)
from codiemb_pl.fusion.sources import TensorSource, as_source, row_ranges
from codiemb_pl.fusion.writer import write_safetensors

# Row slices of about 256k elements (1 MB in float32): the word embeddings of a MiniLM in ~45 slices.
ROW_CHUNK_ELEMENTS = 1 << 18
Checkpoint = TensorSource | Mapping[str, Tensor] | str | os.PathLike


class Merge:
    """One merge (`method`, `params`, `weights`) of `models` against `base`, produced key by key."""

    def __init__(self, base: Checkpoint, models: Sequence[Checkpoint], method: str, params: dict | None = None, *,
                 weights: Sequence[float] | None = None, seed: int = 0, copy_keys: Collection[str] = (),
                 max_elements: int | None = ROW_CHUNK_ELEMENTS):
        self.params = dict(params or {})
        self.fn = get_merge_method(method)
        supplied = sorted(set(self.params) & set(STATISTIC_PARAMETERS))
        if supplied:
            raise InputError(f"fusion.{method}", f"`{supplied[0]}` is computed by the merge engine",
                             "set granularity='layer' (or the density) instead of passing it")
        check_method_params(method, self.params)
        if not models:
            raise InputError("fusion.models", "no checkpoints to merge", "pass at least one checkpoint")
        self.method = method
        self.base = as_source(base, "base")
        self.models = [as_source(model, f"models[{index}]") for index, model in enumerate(models)]
        self.keys = check_compatible(self.base, self.models)
        self.weights = None if weights is None else list(weights)
        self.seed, self.copy_keys = int(seed), frozenset(copy_keys)
        self.max_elements = None if max_elements is None else int(max_elements)
        self.needs = merge_needs(method, self.params)
        self.layer_norms = self._layer_norms() if self.needs.statistic == DeltaNorms("layer") else {}

    # -- what each key is ------------------------------------------------------------------------------
    def is_merged(self, key: str) -> bool:
        """Float in the base and in the first checkpoint and not a buffer: merged; else copied from the first."""
        return (not is_buffer_key(key, self.copy_keys) and self.base.dtype(key).is_floating_point
                and self.models[0].dtype(key).is_floating_point)

    def layout(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """{key: (dtype, shape)} of the result: the base's dtype for merged keys, the first checkpoint's otherwise."""
        return {key: (self.base.dtype(key) if self.is_merged(key) else self.models[0].dtype(key), self.base.shape(key))
                for key in self.keys}

    def _ranges(self, key: str) -> list[tuple[int, int]]:
        return row_ranges(self.base.shape(key), self.max_elements)

    def _deltas(self, key: str, start: int, stop: int, models: Sequence[TensorSource] | None = None
                ) -> tuple[Tensor, list[Tensor]]:
        """θ0 rows and Δk = θk − θ0 rows in the compute dtype (float64 for float64 bases, float32 otherwise)."""
        base_rows = self.base.rows(key, start, stop)
        dtype = compute_dtype(base_rows)
        base_compute = base_rows.to(dtype)
        return base_rows, [model.rows(key, start, stop).to(dtype) - base_compute for model in models or self.models]

    # -- first-pass statistics -------------------------------------------------------------------------
    def _squared_norms(self, key: str) -> list[float]:
        """Σ Δk² over the whole tensor, per checkpoint, in float64, read by row ranges."""
        totals = [0.0] * len(self.models)
        for start, stop in self._ranges(key):
            _, deltas = self._deltas(key, start, stop)
            for k, delta in enumerate(deltas):
                totals[k] += float(torch.sum(delta.double() ** 2))
        return totals

    def _layer_norms(self) -> dict[str, list[float]]:
        """{layer id: [‖Δk over all merged tensors of the layer‖ for k]} (a first pass over the model)."""
        squares: dict[str, list[float]] = {}
        for key in self.keys:
            if self.is_merged(key):
                total = squares.setdefault(layer_of(key), [0.0] * len(self.models))
                for k, value in enumerate(self._squared_norms(key)):
                    total[k] += value
        return {layer: [math.sqrt(v) for v in values] for layer, values in squares.items()}

    def _trim_threshold(self, model: TensorSource, key: str, density: float) -> float | None:
        """The keep-th largest |Δ| of one checkpoint's tensor (`trim_to_density`'s threshold); None keeps all."""
        shape = self.base.shape(key)
        numel = math.prod(shape)
        if density >= 1.0 or numel == 0:
            return None
        magnitude = torch.empty(numel, dtype=compute_dtype(torch.empty(0, dtype=self.base.dtype(key))))
        offset = 0
        for start, stop in self._ranges(key):
            _, (delta,) = self._deltas(key, start, stop, [model])
            magnitude[offset:offset + delta.numel()] = delta.abs().reshape(-1)
            offset += delta.numel()
        keep = max(1, math.ceil(density * numel))
        values = magnitude.numpy()
        values.partition(numel - keep)      # in place: no sorted copy or index tensor (unlike kthvalue)
        return float(values[numel - keep])  # == kthvalue(magnitude, numel - keep + 1)

    def _tensor_statistic(self, key: str) -> list[float | None]:
        statistic = self.needs.statistic
        if isinstance(statistic, TrimThresholds):
            return [self._trim_threshold(model, key, statistic.density) for model in self.models]
        if statistic == DeltaNorms("tensor"):
            return [math.sqrt(v) for v in self._squared_norms(key)]
        return self.layer_norms[layer_of(key)]

    # -- merging ---------------------------------------------------------------------------------------
    def slices(self, key: str) -> Iterator[Tensor]:
        """The merged tensor `key` as consecutive dim-0 slices (one piece for whole-tensor merges)."""
        if not self.is_merged(key):
            for start, stop in self._ranges(key):
                yield self.models[0].rows(key, start, stop).clone()
            return
        if not self.needs.sliceable or self.max_elements is None or not self.base.shape(key):
            yield self._whole(key)
            return
        params = dict(self.params)
        if self.needs.statistic is not None:
            params[self.needs.statistic.keyword] = self._tensor_statistic(key)
        for start, stop in self._ranges(key):
            base_rows, deltas = self._deltas(key, start, stop)
            yield self.fn(base_rows, deltas, weights=self.weights, generator=None, **params)

    def _whole(self, key: str) -> Tensor:
        shape = self.base.shape(key)
        base_tensor, deltas = self._deltas(key, 0, shape[0] if shape else 1)
        params = dict(self.params)
        if self.needs.statistic == DeltaNorms("layer"):
            params[DeltaNorms.keyword] = self.layer_norms[layer_of(key)]
        generator = torch.Generator().manual_seed(key_seed(self.seed, key))
        return self.fn(base_tensor, deltas, weights=self.weights, generator=generator, **params)

    def tensor(self, key: str) -> Tensor:
        """The whole merged tensor `key`."""
        pieces = list(self.slices(key))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def state_dict(self) -> dict[str, Tensor]:
        """The whole merged state dict in memory (in the base's key order)."""
        return {key: self.tensor(key) for key in self.keys}

    def write(self, out_path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> Path:
        """Stream the merge into a `.safetensors` file, slice by slice, atomically (`fusion.writer`)."""
        layout = self.layout()
        return write_safetensors(out_path, layout, lambda key: (piece.to(layout[key][0]) for piece in self.slices(key)),
                                 metadata)


def merge_state_dicts(base: Checkpoint, models: Sequence[Checkpoint], method: str, params: dict | None = None, *,
                      weights: Sequence[float] | None = None, seed: int = 0,
                      copy_keys: Collection[str] = ()) -> dict[str, Tensor]:
    """Merge `models` (fine-tuned from `base` = θ0) key by key with `method`, whole tensors, in memory.

    Per key: θ*[key] = method(θ0[key], [θk[key] − θ0[key]], weights=weights, generator=G(seed, key), **params),
    in the base dtype. Keys in `copy_keys`, well-known buffers and non-float tensors come from
    models[0]. granularity='layer' (delta_guided) runs a first pass for per-layer delta norms.
    """
    return Merge(base, models, method, params, weights=weights, seed=seed, copy_keys=copy_keys,
                 max_elements=None).state_dict()


def merge_to_safetensors(base: Checkpoint, models: Sequence[Checkpoint], method: str, params: dict | None,
                         out_path: str | os.PathLike, *, weights: Sequence[float] | None = None, seed: int = 0,
                         copy_keys: Collection[str] = (), metadata: Mapping[str, str] | None = None,
                         max_elements: int | None = ROW_CHUNK_ELEMENTS) -> Path:
    """The merge written straight to a `.safetensors` file (row slices where the method allows), atomically."""
    merge = Merge(base, models, method, params, weights=weights, seed=seed, copy_keys=copy_keys,
                  max_elements=max_elements)
    return merge.write(out_path, metadata)
