"""Merge checkpoints into a `.safetensors` file slice by slice, so memory stays far below K models.

`fusion.streaming` merges one whole tensor at a time: for the word embeddings of a MiniLM (half the
model) and K = 5 checkpoints that alone is ~2K+3 copies of half a model. Here tensors are read and
merged in dim-0 row ranges of ~256k elements for every method whose result is element-wise given a few
per-tensor statistics, and written straight into the output file (the header is known in advance):

    uniform_soup, task_arithmetic, delta_guided (element, row)    row ranges as they are
    delta_guided (tensor, layer)   first pass: ‖Δk‖ per tensor / per layer, then granularity='layer'
    ties                           first pass: per-checkpoint magnitude threshold of the top-d fraction
                                   (one |Δk| buffer, partitioned in place), then ties(density=1) on
                                   pre-trimmed slices

Other methods (dare, slerp, multi_slerp) merge whole tensors exactly as `fusion.streaming` does.
Results equal `fusion.streaming.merge_state_dicts` (bit for bit, except float rounding of the
tensor / layer norms).
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

from codiemb_pl.fusion.checkpoints import ROW_CHUNK_ELEMENTS, read_rows, row_ranges, tensor_dtype, tensor_shape
from codiemb_pl.fusion.methods import check_method_params, compute_dtype, get_merge_method
from codiemb_pl.fusion.streaming import TensorSource, check_compatible, is_buffer_key, key_seed, layer_of

ROW_WISE_METHODS = frozenset({"uniform_soup", "task_arithmetic", "delta_guided", "ties"})
_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL"}


def _is_merged(base: TensorSource, first: TensorSource, key: str, copy_keys: Collection[str]) -> bool:
    return (not is_buffer_key(key, copy_keys) and tensor_dtype(base, key).is_floating_point
            and tensor_dtype(first, key).is_floating_point)


def _row_deltas(base: TensorSource, models: Sequence[TensorSource], key: str, start: int, stop: int
                ) -> tuple[Tensor, list[Tensor]]:
    base_rows = read_rows(base, key, start, stop)
    dtype = compute_dtype(base_rows)
    base_compute = base_rows.to(dtype)
    return base_rows, [read_rows(model, key, start, stop).to(dtype) - base_compute for model in models]


def _squared_delta_norms(base: TensorSource, models: Sequence[TensorSource], key: str,
                         max_elements: int = ROW_CHUNK_ELEMENTS) -> list[float]:
    """Σ Δk² over the whole tensor, per checkpoint, in float64, read by row ranges."""
    totals = [0.0] * len(models)
    for start, stop in row_ranges(tensor_shape(base, key), max_elements):
        _, deltas = _row_deltas(base, models, key, start, stop)
        for k, delta in enumerate(deltas):
            totals[k] += float(torch.sum(delta.double() ** 2))
    return totals


def ties_threshold(base: TensorSource, model: TensorSource, key: str, density: float,
                   max_elements: int = ROW_CHUNK_ELEMENTS) -> float | None:
    """The keep-th largest |Δ| of one checkpoint's tensor (`trim_to_density`'s threshold); None keeps all."""
    shape = tensor_shape(base, key)
    numel = math.prod(shape)
    if density >= 1.0 or numel == 0:
        return None
    magnitude = torch.empty(numel, dtype=compute_dtype(torch.empty(0, dtype=tensor_dtype(base, key))))
    offset = 0
    for start, stop in row_ranges(shape, max_elements):
        _, (delta,) = _row_deltas(base, [model], key, start, stop)
        magnitude[offset:offset + delta.numel()] = delta.abs().reshape(-1)
        offset += delta.numel()
    keep = max(1, math.ceil(density * numel))
    values = magnitude.numpy()
    values.partition(numel - keep)      # in place: no sorted copy or index tensor (unlike kthvalue)
    return float(values[numel - keep])  # == kthvalue(magnitude, numel - keep + 1)


class ChunkedMerge:
    """One merge (`method`, `params`, `weights`) of `models` against `base`, produced key by key in slices."""

    def __init__(self, base: TensorSource, models: Sequence[TensorSource], method: str, params: dict | None = None,
                 *, weights: Sequence[float] | None = None, seed: int = 0, copy_keys: Collection[str] = (),
                 max_elements: int = ROW_CHUNK_ELEMENTS):
        self.max_elements = int(max_elements)
        self.params = dict(params or {})
        self.fn = get_merge_method(method)
        check_method_params(method, self.params)
        self.method, self.base, self.models = method, base, list(models)
        self.weights = None if weights is None else list(weights)
        self.seed, self.copy_keys = int(seed), frozenset(copy_keys)
        self.keys = check_compatible(base, self.models)
        self.row_wise = method in ROW_WISE_METHODS
        self.layer_norms: dict[str, list[float]] = {}
        if method == "delta_guided" and self.params.get("granularity") == "layer":
            self.layer_norms = self._layer_norms()

    def _layer_norms(self) -> dict[str, list[float]]:
        squares: dict[str, list[float]] = {}
        for key in self.keys:
            if _is_merged(self.base, self.models[0], key, self.copy_keys):
                total = squares.setdefault(layer_of(key), [0.0] * len(self.models))
                for k, value in enumerate(_squared_delta_norms(self.base, self.models, key, self.max_elements)):
                    total[k] += value
        return {layer: [math.sqrt(v) for v in values] for layer, values in squares.items()}

    def output_dtype(self, key: str) -> torch.dtype:
        if _is_merged(self.base, self.models[0], key, self.copy_keys):
            return tensor_dtype(self.base, key)
        return tensor_dtype(self.models[0], key)

    def slices(self, key: str) -> Iterator[Tensor]:
        """The merged tensor `key` as consecutive dim-0 slices (one slice for whole-tensor methods)."""
        shape = tensor_shape(self.base, key)
        if not _is_merged(self.base, self.models[0], key, self.copy_keys):
            for start, stop in row_ranges(shape, self.max_elements):
                yield read_rows(self.models[0], key, start, stop).clone()
            return
        if not self.row_wise or len(shape) == 0:
            yield self._whole(key)
            return
        params = dict(self.params)
        thresholds: list[float | None] = []
        if self.method == "delta_guided" and params.get("granularity") == "tensor":
            params["granularity"] = "layer"
            params["magnitudes"] = [math.sqrt(v) for v in _squared_delta_norms(self.base, self.models, key, self.max_elements)]
        elif self.method == "delta_guided" and params.get("granularity") == "layer":
            params["magnitudes"] = self.layer_norms[layer_of(key)]
        elif self.method == "ties":
            density = float(params.get("density", 0.2))
            if 0.0 < density < 1.0:   # out-of-range densities are left to `ties` to reject
                thresholds = [ties_threshold(self.base, model, key, density, self.max_elements) for model in self.models]
                params["density"] = 1.0
        for start, stop in row_ranges(shape, self.max_elements):
            base_rows, deltas = _row_deltas(self.base, self.models, key, start, stop)
            if thresholds:
                deltas = [delta if threshold is None else torch.where(delta.abs() >= threshold, delta,
                                                                       torch.zeros_like(delta))
                          for delta, threshold in zip(deltas, thresholds)]
            yield self.fn(base_rows, deltas, weights=self.weights, generator=None, **params)

    def _whole(self, key: str) -> Tensor:
        base_tensor = self.base.get(key)
        dtype = compute_dtype(base_tensor)
        deltas = [model.get(key).to(dtype) - base_tensor.to(dtype) for model in self.models]
        params = dict(self.params)
        if params.get("granularity") == "layer":
            params["magnitudes"] = self.layer_norms[layer_of(key)]
        generator = torch.Generator().manual_seed(key_seed(self.seed, key))
        return self.fn(base_tensor, deltas, weights=self.weights, generator=generator, **params)

    def state_dict(self) -> dict[str, Tensor]:
        """The whole merged state dict in memory (tests, small models)."""
        return {key: torch.cat(list(self.slices(key))) if tensor_shape(self.base, key) else next(self.slices(key))
                for key in self.keys}


def _tensor_bytes(tensor: Tensor) -> bytes:
    flat = tensor.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def write_safetensors(merge: ChunkedMerge, out_path: str | os.PathLike,
                      metadata: dict[str, str] | None = None) -> Path:
    """Write the merge to `out_path` (safetensors), slice by slice, via a temporary file and a rename."""
    out_path = Path(out_path)
    header: dict[str, dict] = {}
    offset = 0
    for key in merge.keys:
        dtype, shape = merge.output_dtype(key), list(tensor_shape(merge.base, key))
        size = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        header[key] = {"dtype": _DTYPE_NAMES[dtype], "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt", **(metadata or {})}
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, partial = tempfile.mkstemp(prefix=f".{out_path.name}.tmp-", dir=out_path.parent)
    try:
        with os.fdopen(descriptor, "wb") as out:
            out.write(struct.pack("<Q", len(header_bytes)))
            out.write(header_bytes)
            for key in merge.keys:
                written = 0
                for piece in merge.slices(key):
                    payload = _tensor_bytes(piece.to(merge.output_dtype(key)))
                    out.write(payload)
                    written += len(payload)
                start, stop = header[key]["data_offsets"]
                if written != stop - start:
                    raise RuntimeError(f"{key}: wrote {written} bytes, expected {stop - start}")
        os.chmod(partial, 0o644)
        os.replace(partial, out_path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    return out_path
