"""Merge whole checkpoints one tensor at a time, reading lazily (SPEC §5).

Checkpoints are `TensorSource`s (`keys()`, `get(key)`; an optional `shape(key)` avoids loading a
tensor just to check its shape): `SafetensorsSource` reads a `.safetensors` file (or a folder of
shards) through `safetensors.safe_open`, `MappingSource` wraps an in-memory state dict.
`merge_state_dicts` / `merge_to_safetensors` check that all checkpoints share keys and shapes,
then, per key, load θ0 and the K checkpoint tensors, form Δk = θk − θ0 and call the registered
per-tensor method, so peak memory is about (K + 2) tensors plus the output. Non-float tensors and
buffers (`copy_keys`, plus well-known buffer names) are copied from the first checkpoint.
`greedy_soup` builds a soup by validation score on top of this.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from codiemb_pl.errors import InputError
from codiemb_pl.fusion.methods import check_method_params, compute_dtype, get_merge_method

# Float state-dict entries that are buffers, not trained weights: copied from the first checkpoint.
BUFFER_NAME_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked", "position_ids",
                        "token_type_ids", "inv_freq")
# `...layer.<n>.`, `...layers.<n>.`, `...h.<n>.` (BERT, Llama/Qwen, GPT-2): one transformer layer.
LAYER_PATTERN = re.compile(r"^(.*?(?:^|\.)(?:layer|layers|h)\.\d+)\.")


@runtime_checkable
class TensorSource(Protocol):
    """A checkpoint that yields its tensors one at a time."""

    def keys(self) -> Iterable[str]: ...

    def get(self, key: str) -> Tensor: ...


class MappingSource:
    """A `TensorSource` over an in-memory state dict."""

    def __init__(self, state_dict: Mapping[str, Tensor], name: str = "state dict"):
        self.state_dict, self.name = state_dict, name

    def keys(self) -> list[str]:
        return list(self.state_dict.keys())

    def get(self, key: str) -> Tensor:
        return self.state_dict[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.state_dict[key].shape)


class SafetensorsSource:
    """A lazy `TensorSource` over a `.safetensors` file or a folder of `*.safetensors` shards."""

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open

        self.name = str(path)
        root = Path(path)
        if root.is_dir():
            files = sorted(root.glob("*.safetensors"))
        elif root.is_file():
            files = [root]
        else:
            raise InputError(self.name, "checkpoint not found", "give a .safetensors file or a folder holding one")
        if not files:
            raise InputError(self.name, "folder holds no *.safetensors file", "save the checkpoint as safetensors")
        self._handles = [safe_open(str(f), framework="pt") for f in files]
        self._file_of: dict[str, int] = {}
        for index, handle in enumerate(self._handles):
            for key in handle.keys():
                if key in self._file_of:
                    raise InputError(self.name, f"key {key!r} appears in two shards", "remove the duplicate shard")
                self._file_of[key] = index

    def keys(self) -> list[str]:
        return list(self._file_of)

    def _handle(self, key: str):
        if key not in self._file_of:
            raise InputError(self.name, f"no tensor named {key!r}", "check the checkpoint's keys")
        return self._handles[self._file_of[key]]

    def get(self, key: str) -> Tensor:
        return self._handle(key).get_tensor(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(key).get_slice(key).get_shape())


def as_source(checkpoint: TensorSource | Mapping[str, Tensor] | str | os.PathLike, name: str) -> TensorSource:
    """Wrap a state dict (`MappingSource`) or a safetensors path (`SafetensorsSource`); sources pass through."""
    if isinstance(checkpoint, (str, os.PathLike)):
        return SafetensorsSource(checkpoint)
    if isinstance(checkpoint, Mapping):
        return MappingSource(checkpoint, name)
    if isinstance(checkpoint, TensorSource):
        return checkpoint
    raise InputError(name, f"cannot read a checkpoint from {type(checkpoint).__name__}",
                     "pass a state dict, a .safetensors path or an object with keys() and get(key)")


def _name(source: TensorSource, default: str) -> str:
    return getattr(source, "name", None) or default


def _shape(source: TensorSource, key: str) -> tuple[int, ...]:
    shape = getattr(source, "shape", None)
    return tuple(shape(key)) if callable(shape) else tuple(source.get(key).shape)


def check_compatible(base: TensorSource, models: Sequence[TensorSource]) -> list[str]:
    """The base's keys, after checking every model has the same keys and shapes (else InputError)."""
    base_name = _name(base, "base")
    keys = list(base.keys())
    key_set = set(keys)
    for index, model in enumerate(models):
        model_name = _name(model, f"models[{index}]")
        model_keys = set(model.keys())
        missing = [k for k in keys if k not in model_keys]
        extra = sorted(model_keys - key_set)
        if missing or extra:
            key = missing[0] if missing else extra[0]
            side = f"in {base_name} but not in {model_name}" if missing else f"in {model_name} but not in {base_name}"
            raise InputError(model_name, f"key {key!r} is {side} ({len(missing)} missing, {len(extra)} extra)",
                             "do these checkpoints share the same base architecture?")
    for key in keys:
        base_shape = _shape(base, key)
        for index, model in enumerate(models):
            model_shape = _shape(model, key)
            if model_shape != base_shape:
                raise InputError(_name(model, f"models[{index}]"),
                                 f"key {key!r} has shape {list(model_shape)} but {list(base_shape)} in {base_name}",
                                 "do these checkpoints share the same base architecture?")
    return keys


def layer_of(key: str) -> str:
    """Group id of a key: the `...layer.<n>` / `...layers.<n>` / `...h.<n>` prefix, else the key itself."""
    match = LAYER_PATTERN.match(key)
    return match.group(1) if match else key


def is_buffer_key(key: str, copy_keys: Collection[str] = ()) -> bool:
    """True for keys copied verbatim: listed in `copy_keys` or ending in a well-known buffer name."""
    return key in copy_keys or key.rsplit(".", 1)[-1] in BUFFER_NAME_SUFFIXES


def key_seed(seed: int, key: str) -> int:
    """Deterministic per-key seed: blake2b of f"{seed}:{key}" (stable across runs and processes)."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def _mergeable(base_tensor: Tensor, first_tensor: Tensor) -> bool:
    """Float in the base and in the first checkpoint: merged; anything else is copied from the first."""
    return base_tensor.is_floating_point() and first_tensor.is_floating_point()


def _deltas(base_tensor: Tensor, model_tensors: Iterable[Tensor]) -> list[Tensor]:
    """Δk = θk − θ0 in the compute dtype (float64 for float64 bases, float32 otherwise)."""
    dtype = compute_dtype(base_tensor)
    base_compute = base_tensor.to(dtype)
    return [tensor.to(dtype) - base_compute for tensor in model_tensors]


def _model_tensors(models: Sequence[TensorSource], key: str, first: Tensor) -> Iterable[Tensor]:
    yield first
    for model in models[1:]:
        yield model.get(key)


def layer_norms(base: TensorSource, models: Sequence[TensorSource], keys: Iterable[str],
                copy_keys: Collection[str] = ()) -> dict[str, list[float]]:
    """First pass for granularity='layer': {layer id: [‖Δk over all merged tensors of the layer‖ for k]}."""
    squares: dict[str, list[float]] = {}
    for key in keys:
        if is_buffer_key(key, copy_keys):
            continue
        base_tensor, first = base.get(key), models[0].get(key)
        if not _mergeable(base_tensor, first):
            continue
        total = squares.setdefault(layer_of(key), [0.0] * len(models))
        for k, delta in enumerate(_deltas(base_tensor, _model_tensors(models, key, first))):
            total[k] += float(torch.sum(delta.double() ** 2))
    return {layer: [value ** 0.5 for value in values] for layer, values in squares.items()}


@dataclass
class _MergePlan:
    base: TensorSource
    models: list[TensorSource]
    keys: list[str]
    copy_keys: Collection[str]
    method: Callable[..., Tensor]
    params: dict
    weights: list[float] | None
    seed: int
    norms: dict[str, list[float]] = field(default_factory=dict)


def _plan(base, models, method: str, params: dict | None, weights, seed: int,
          copy_keys: Collection[str]) -> _MergePlan:
    params = dict(params or {})
    fn = get_merge_method(method)
    check_method_params(method, params)
    if "magnitudes" in params:
        raise InputError(f"fusion.{method}", "`magnitudes` is computed by the streaming merge",
                         "set granularity='layer' instead of passing magnitudes")
    if not models:
        raise InputError("fusion.models", "no checkpoints to merge", "pass at least one checkpoint")
    base_source = as_source(base, "base")
    sources = [as_source(model, f"models[{i}]") for i, model in enumerate(models)]
    keys = check_compatible(base_source, sources)
    plan = _MergePlan(base_source, sources, keys, frozenset(copy_keys), fn, params,
                      None if weights is None else list(weights), int(seed))
    if params.get("granularity") == "layer":
        plan.norms = layer_norms(base_source, sources, keys, plan.copy_keys)
    return plan


def _merge_key(plan: _MergePlan, key: str) -> Tensor:
    first = plan.models[0].get(key)
    if is_buffer_key(key, plan.copy_keys):
        return first.clone()
    base_tensor = plan.base.get(key)
    if not _mergeable(base_tensor, first):
        return first.clone()
    deltas = _deltas(base_tensor, _model_tensors(plan.models, key, first))
    del first
    params = dict(plan.params)
    if params.get("granularity") == "layer":
        params["magnitudes"] = plan.norms[layer_of(key)]
    generator = torch.Generator().manual_seed(key_seed(plan.seed, key))
    return plan.method(base_tensor, deltas, weights=plan.weights, generator=generator, **params)


def _merged_tensors(plan: _MergePlan) -> Iterable[tuple[str, Tensor]]:
    for key in plan.keys:
        yield key, _merge_key(plan, key)


def merge_state_dicts(base: TensorSource | Mapping[str, Tensor] | str | os.PathLike,
                      models: Sequence[TensorSource | Mapping[str, Tensor] | str | os.PathLike],
                      method: str, params: dict | None = None, *, weights: Sequence[float] | None = None,
                      seed: int = 0, copy_keys: Collection[str] = ()) -> dict[str, Tensor]:
    """Merge `models` (fine-tuned from `base` = θ0) key by key with the registered `method`.

    Per key: θ*[key] = method(θ0[key], [θk[key] − θ0[key]], weights=weights, generator=G(seed, key), **params),
    in the base dtype. Keys in `copy_keys`, well-known buffers and non-float tensors come from
    models[0]. granularity='layer' (delta_guided) runs a first pass for per-layer delta norms.
    DARE's generator is seeded per key with `key_seed(seed, key)`, so results do not depend on key order.
    """
    plan = _plan(base, models, method, params, weights, seed, copy_keys)
    return dict(_merged_tensors(plan))


_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


def _tensor_bytes(tensor: Tensor) -> bytes:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def merge_to_safetensors(base: TensorSource | Mapping[str, Tensor] | str | os.PathLike,
                         models: Sequence[TensorSource | Mapping[str, Tensor] | str | os.PathLike],
                         method: str, params: dict | None, out_path: str | os.PathLike, *,
                         weights: Sequence[float] | None = None, seed: int = 0,
                         copy_keys: Collection[str] = (), metadata: Mapping[str, str] | None = None) -> Path:
    """`merge_state_dicts`, written straight to a `.safetensors` file without holding the merged model.

    Each merged tensor's bytes go to a temporary data file as soon as it is computed; the header
    (8-byte little-endian length + JSON {key: dtype, shape, data_offsets}) is then written with the
    data copied behind it, and the result moved into place atomically.
    """
    plan = _plan(base, models, method, params, weights, seed, copy_keys)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    header: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(dir=out_path.parent) as scratch:
        data_path = Path(scratch) / "data.bin"
        offset = 0
        with open(data_path, "wb") as data:
            for key, tensor in _merged_tensors(plan):
                if tensor.dtype not in _SAFETENSORS_DTYPES:
                    raise InputError(key, f"dtype {tensor.dtype} cannot be stored in safetensors",
                                     "cast the checkpoint to a standard dtype")
                payload = _tensor_bytes(tensor)
                data.write(payload)
                header[key] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                               "data_offsets": [offset, offset + len(payload)]}
                offset += len(payload)
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        header_bytes = json.dumps(header, separators=(",", ":")).encode()
        header_bytes += b" " * (-len(header_bytes) % 8)
        partial = Path(scratch) / "merged.safetensors"
        with open(partial, "wb") as out, open(data_path, "rb") as data:
            out.write(struct.pack("<Q", len(header_bytes)))
            out.write(header_bytes)
            shutil.copyfileobj(data, out, length=16 * 1024 * 1024)
        os.replace(partial, out_path)
    return out_path


@dataclass
class GreedySoupResult:
    """The chosen soup, the indices (into the candidate list) it averages and the score after each try."""

    state_dict: dict[str, Tensor]
    chosen: list[int]
    score: float
    scores: list[float]


def greedy_soup(candidates_in_score_order: Sequence[TensorSource | Mapping[str, Tensor] | str | os.PathLike],
                evaluate: Callable[[dict[str, Tensor]], float], *,
                copy_keys: Collection[str] = ()) -> GreedySoupResult:
    """Greedy soup (Wortsman et al. 2022): walk candidates best-first, keep one if the uniform soup improves.

        soup = {c_0};  for c in c_1..c_n: if evaluate(mean(soup ∪ {c})) > evaluate(mean(soup)): soup ∪= {c}

    `candidates_in_score_order` must be sorted by the caller, best individual validation score first;
    `evaluate` takes a merged state dict and returns a score (higher is better). A candidate that does
    not strictly improve the score is skipped (later ones are still tried). `scores[i]` is the score of
    the soup tried at step i (step 0: the best candidate alone).
    """
    if not candidates_in_score_order:
        raise InputError("fusion.greedy_soup", "no candidates", "pass at least one checkpoint")
    sources = [as_source(c, f"candidates[{i}]") for i, c in enumerate(candidates_in_score_order)]

    def soup_of(indices: list[int]) -> dict[str, Tensor]:
        members = [sources[i] for i in indices]
        return merge_state_dicts(members[0], members, "uniform_soup", {}, copy_keys=copy_keys)

    chosen = [0]
    best_state = soup_of(chosen)
    best_score = float(evaluate(best_state))
    scores = [best_score]
    for index in range(1, len(sources)):
        trial_state = soup_of(chosen + [index])
        trial_score = float(evaluate(trial_state))
        scores.append(trial_score)
        if trial_score > best_score:
            chosen, best_state, best_score = chosen + [index], trial_state, trial_score
        del trial_state
    return GreedySoupResult(best_state, chosen, best_score, scores)
