"""Open checkpoints for fusion as lazy `TensorSource`s, all named like a Hugging Face model (`X`).

    folder (sentence-transformers or Hugging Face)  -> its transformer's *.safetensors (read lazily;
                                                        pytorch_model.bin is memory-mapped instead)
    file.safetensors                                -> that file
    file.ckpt (Lightning, CoDiEmbModule)            -> `state_dict` memory-mapped, `encoder.model.` stripped

Every source reads row ranges (`rows(key, start, stop)`) without loading the whole tensor, so a merge
can work on slices of the largest tensors (see `fusion.chunked`); safetensors files are read with
plain file reads, not memory-mapped, so untouched weights never enter the resident set. A `.ckpt` is a pickle: it is opened
with `torch.load(mmap=True)`, which reads tensor bytes only when touched, but trusts the file (load only
checkpoints you trust). Compatibility checks: config.json architecture (`check_same_architecture`)
and distance from the base (`check_shares_base`); key and shape checks live in `fusion.streaming`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from codiemb_pl.errors import InputError
from codiemb_pl.fusion.streaming import MappingSource, TensorSource, is_buffer_key
from codiemb_pl.paths import resolve_location

LIGHTNING_PREFIX = "encoder.model."
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
WEIGHT_INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# config.json fields that must agree between checkpoints fused together.
ARCHITECTURE_FIELDS = ("model_type", "architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
                       "intermediate_size", "vocab_size", "max_position_embeddings", "d_model", "n_layer", "n_embd")
# ‖θk − θ0‖ / ‖θ0‖ above this: θk was not fine-tuned from θ0 (an unrelated initialisation gives ~1.4).
MAX_RELATIVE_DISTANCE = 0.5
ROW_CHUNK_ELEMENTS = 1 << 18
UNTRAINED_PREFIXES = ("pooler.",)

_SAFETENSORS_TO_TORCH = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsRowSource:
    """A `.safetensors` file (or a folder of shards) read with plain file reads, row range by row range.

    Unlike `safe_open`, which memory-maps the file (every page touched stays in the resident set while
    the file is open), only the bytes of the requested rows are read into a fresh tensor.
    """

    def __init__(self, path: str | os.PathLike):
        self.name = str(path)
        root = Path(path)
        files = sorted(root.glob("*.safetensors")) if root.is_dir() else [root] if root.is_file() else []
        if not files:
            raise InputError(self.name, "no .safetensors file found", "give a .safetensors file or a folder holding one")
        self._entries: dict[str, tuple[Path, int, dict[str, Any]]] = {}
        for file in files:
            data_start, header = _read_safetensors_header(file)
            for key, entry in header.items():
                if key in self._entries:
                    raise InputError(self.name, f"key {key!r} appears in two shards", "remove the duplicate shard")
                self._entries[key] = (file, data_start, entry)

    def keys(self) -> list[str]:
        return list(self._entries)

    def _entry(self, key: str) -> tuple[Path, int, dict[str, Any]]:
        if key not in self._entries:
            raise InputError(self.name, f"no tensor named {key!r}", "check the checkpoint's keys")
        return self._entries[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entry(key)[2]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        name = self._entry(key)[2]["dtype"]
        if name not in _SAFETENSORS_TO_TORCH:
            raise InputError(self.name, f"tensor {key!r} has unsupported dtype {name}", "convert it to float32")
        return _SAFETENSORS_TO_TORCH[name]

    def rows(self, key: str, start: int, stop: int) -> Tensor:
        file, data_start, entry = self._entry(key)
        shape, dtype = list(entry["shape"]), self.dtype(key)
        row_bytes = math.prod(shape[1:]) * torch.empty(0, dtype=dtype).element_size()
        if shape:
            stop = min(stop, shape[0])
            start = min(start, stop)
            shape[0] = stop - start
        else:
            start, stop, row_bytes = 0, 1, torch.empty(0, dtype=dtype).element_size()
        first, last = entry["data_offsets"]
        offset, size = data_start + first + start * row_bytes, (stop - start) * row_bytes
        if offset + size > data_start + last:
            raise InputError(self.name, f"tensor {key!r} is truncated", "re-save the checkpoint")
        buffer = bytearray(size)
        with open(file, "rb") as handle:
            handle.seek(offset)
            if handle.readinto(buffer) != size:
                raise InputError(self.name, f"tensor {key!r} is truncated", "re-save the checkpoint")
        if size == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape)

    def get(self, key: str) -> Tensor:
        shape = self.shape(key)
        return self.rows(key, 0, shape[0] if shape else 1)


def _read_safetensors_header(file: Path) -> tuple[int, dict[str, Any]]:
    """(offset of the data section, {key: {dtype, shape, data_offsets}}) of a safetensors file."""
    with open(file, "rb") as handle:
        prefix = handle.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        try:
            header = json.loads(handle.read(length)) if 0 < length < 100_000_000 else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            header = None
    if not isinstance(header, dict):
        raise InputError(str(file), "is not a safetensors file (bad header)", "re-save the checkpoint")
    header.pop("__metadata__", None)
    return 8 + length, header


class MappedStateDictSource(MappingSource):
    """A state dict (memory-mapped from a .ckpt / .bin) with row and dtype access."""

    def rows(self, key: str, start: int, stop: int) -> Tensor:
        tensor = self.state_dict[key]
        return tensor[start:stop] if tensor.dim() else tensor

    def dtype(self, key: str) -> torch.dtype:
        return self.state_dict[key].dtype


class KeySubsetSource:
    """Another source restricted to some of its keys (rows, shapes and dtypes pass through)."""

    def __init__(self, source: TensorSource, keys: Iterable[str]):
        self.source, self._keys = source, [k for k in source.keys() if k in set(keys)]
        self.name = getattr(source, "name", "checkpoint")

    def keys(self) -> list[str]:
        return list(self._keys)

    def get(self, key: str) -> Tensor:
        return self.source.get(key)

    def rows(self, key: str, start: int, stop: int) -> Tensor:
        return read_rows(self.source, key, start, stop)

    def shape(self, key: str) -> tuple[int, ...]:
        return tensor_shape(self.source, key)

    def dtype(self, key: str) -> torch.dtype:
        return tensor_dtype(self.source, key)


def is_untrained_key(key: str) -> bool:
    """Buffers (position_ids, ...) and the BERT pooler: present in some saves, never trained by codiemb."""
    return is_buffer_key(key) or key.startswith(UNTRAINED_PREFIXES)


def drop_unshared_untrained_keys(sources: Sequence[TensorSource]) -> list[TensorSource]:
    """Leave out untrained keys that not every source has (an HF save with a pooler vs a codiemb export)."""
    key_sets = [set(source.keys()) for source in sources]
    shared = set.intersection(*key_sets)
    dropped = {key for keys in key_sets for key in keys - shared if is_untrained_key(key)}
    if not dropped:
        return list(sources)
    return [KeySubsetSource(source, keys - dropped) for source, keys in zip(sources, key_sets)]


def read_rows(source: TensorSource, key: str, start: int, stop: int) -> Tensor:
    """Rows `[start, stop)` along dim 0 of `key`, the whole of a 0-d tensor (plain sources read it all)."""
    rows = getattr(source, "rows", None)
    if callable(rows):
        return rows(key, start, stop)
    tensor = source.get(key)
    return tensor[start:stop] if tensor.dim() else tensor


def tensor_dtype(source: TensorSource, key: str) -> torch.dtype:
    dtype = getattr(source, "dtype", None)
    return dtype(key) if callable(dtype) else source.get(key).dtype


def tensor_shape(source: TensorSource, key: str) -> tuple[int, ...]:
    shape = getattr(source, "shape", None)
    return tuple(shape(key)) if callable(shape) else tuple(source.get(key).shape)


def row_ranges(shape: Sequence[int], max_elements: int = ROW_CHUNK_ELEMENTS) -> list[tuple[int, int]]:
    """Dim-0 ranges holding at most ~`max_elements` elements each (one range for 0-d or small tensors)."""
    if len(shape) == 0 or shape[0] == 0:
        return [(0, shape[0] if shape else 0)]
    per_row = max(1, math.prod(shape[1:]))
    step = max(1, max_elements // per_row)
    return [(start, min(start + step, shape[0])) for start in range(0, shape[0], step)]


@dataclass
class OpenedCheckpoint:
    """A checkpoint ready for fusion: its tensors, its config.json, and where its model files live."""

    path: str
    source: TensorSource
    config: dict[str, Any] | None
    model_folder: str | None  # a folder holding config.json / tokenizer (the checkpoint's own, or its base's)
    encoder_settings: dict[str, Any] = field(default_factory=dict)  # pooling etc. from a .ckpt's hparams


def _read_config(folder: str | os.PathLike | None) -> dict[str, Any] | None:
    if folder is None:
        return None
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(str(path), f"is not valid JSON ({exc})", "repair or re-export the model folder") from exc


def transformer_folder(folder: Path) -> Path:
    """The folder holding the transformer weights: the root, or modules.json's Transformer path."""
    modules_file = folder / "modules.json"
    if modules_file.is_file():
        try:
            modules = json.loads(modules_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise InputError(str(modules_file), f"is not valid JSON ({exc})", "repair the model folder") from exc
        for module in modules:
            if str(module.get("type", "")).endswith("Transformer"):
                return folder / (module.get("path") or "")
    return folder


def _open_folder(folder: Path) -> OpenedCheckpoint:
    weights_folder = transformer_folder(folder)
    if list(weights_folder.glob("*.safetensors")):
        source: TensorSource = SafetensorsRowSource(weights_folder)
    elif (weights_folder / "pytorch_model.bin").is_file():
        state = torch.load(weights_folder / "pytorch_model.bin", map_location="cpu", mmap=True, weights_only=True)
        source = MappedStateDictSource(state, str(folder))
    else:
        raise InputError(str(folder), "folder holds no model.safetensors or pytorch_model.bin",
                         "give a sentence-transformers / Hugging Face model folder, a .safetensors or a .ckpt file")
    return OpenedCheckpoint(str(folder), source, _read_config(weights_folder), str(weights_folder))


def _open_lightning(path: Path) -> OpenedCheckpoint:
    try:  # a pickle: tensors are memory-mapped, read on first touch
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as exc:
        raise InputError(str(path), f"cannot read the checkpoint ({type(exc).__name__}: {exc})",
                         "give a .ckpt written by `codiemb fit`") from exc
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    weights = {key[len(LIGHTNING_PREFIX):]: value for key, value in (state or {}).items()
               if key.startswith(LIGHTNING_PREFIX)}
    if not weights:
        raise InputError(str(path), f"the checkpoint has no {LIGHTNING_PREFIX}* weights",
                         "give a checkpoint of codiemb_pl's CoDiEmbModule")
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    base_name = hparams.get("model_name_or_path")
    model_folder = resolve_location(str(base_name)) if base_name else None
    if model_folder is not None and not Path(model_folder).is_dir():
        model_folder = None
    settings = {name: hparams[name] for name in ("pooling", "normalize", "max_seq_length") if hparams.get(name) is not None}
    return OpenedCheckpoint(str(path), MappedStateDictSource(weights, str(path)),
                            _read_config(model_folder), model_folder, settings)


def open_checkpoint(location: str | os.PathLike) -> OpenedCheckpoint:
    """Open a model folder, a `.safetensors` file or a Lightning `.ckpt` (else InputError)."""
    path = Path(resolve_location(str(location))).expanduser()
    if path.is_dir():
        return _open_folder(path)
    if path.is_file() and path.suffix == ".ckpt":
        return _open_lightning(path)
    if path.is_file() and path.suffix == ".safetensors":
        folder = path.parent
        return OpenedCheckpoint(str(path), SafetensorsRowSource(path), _read_config(folder),
                                str(folder) if (folder / "config.json").is_file() else None)
    if path.exists():
        raise InputError(str(location), "is not a model folder, a .safetensors or a .ckpt file",
                         "give one of those (convert other formats with save_pretrained)")
    raise InputError(str(location), "no such checkpoint", "check the path")


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
                      max_elements: int = ROW_CHUNK_ELEMENTS) -> float:
    """‖θ − θ0‖ / ‖θ0‖ over the floating-point tensors of `keys`, read in row chunks."""
    moved = total = 0.0
    for key in keys:
        if not tensor_dtype(base, key).is_floating_point:
            continue
        for start, stop in row_ranges(tensor_shape(base, key), max_elements):
            base_rows = read_rows(base, key, start, stop).float()
            model_rows = read_rows(model, key, start, stop).float()
            moved += float(torch.sum((model_rows - base_rows) ** 2, dtype=torch.float64))
            total += float(torch.sum(base_rows ** 2, dtype=torch.float64))
    return math.sqrt(moved / total) if total > 0 else math.sqrt(moved)


def check_shares_base(base: TensorSource, models: Sequence[TensorSource], keys: Iterable[str],
                      names: Sequence[str], max_distance: float = MAX_RELATIVE_DISTANCE) -> None:
    """InputError when a model is so far from the base that it cannot have been fine-tuned from it."""
    keys = list(keys)
    base_name = getattr(base, "name", "base")
    for model, name in zip(models, names):
        distance = relative_distance(base, model, keys)
        if distance > max_distance:
            raise InputError(name, f"is not a fine-tuned copy of the base {base_name} (relative distance "
                                   f"‖θ−θ0‖/‖θ0‖ = {distance:.2f} > {max_distance})",
                             "use the model these checkpoints were trained from as the base")
