"""Open checkpoints for fusion as lazy `TensorSource`s, all named like a Hugging Face model (`X`).

    folder (sentence-transformers or Hugging Face)  -> its transformer's *.safetensors (read lazily;
                                                        pytorch_model.bin is memory-mapped instead)
    file.safetensors                                -> that file
    file.ckpt (Lightning, CoDiEmbModule)            -> `state_dict` memory-mapped, `encoder.model.` stripped

Every source reads row ranges (`rows(key, start, stop)`) without loading the whole tensor, so a merge
can work on slices of the largest tensors (see `fusion.chunked`). A `.ckpt` is a pickle: it is opened
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
from codiemb_pl.fusion.streaming import MappingSource, SafetensorsSource, TensorSource
from codiemb_pl.paths import resolve_location

LIGHTNING_PREFIX = "encoder.model."
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
WEIGHT_INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# config.json fields that must agree between checkpoints fused together.
ARCHITECTURE_FIELDS = ("model_type", "architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
                       "intermediate_size", "vocab_size", "max_position_embeddings", "d_model", "n_layer", "n_embd")
# ‖θk − θ0‖ / ‖θ0‖ above this: θk was not fine-tuned from θ0 (an unrelated initialisation gives ~1.4).
MAX_RELATIVE_DISTANCE = 0.5
ROW_CHUNK_ELEMENTS = 1 << 20

_SAFETENSORS_TO_TORCH = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsRowSource(SafetensorsSource):
    """`SafetensorsSource` that also reads row ranges and dtypes without loading whole tensors."""

    def rows(self, key: str, start: int, stop: int) -> Tensor:
        tensor_slice = self._handle(key).get_slice(key)
        return tensor_slice[start:stop] if tensor_slice.get_shape() else self.get(key)

    def dtype(self, key: str) -> torch.dtype:
        return _SAFETENSORS_TO_TORCH[self._handle(key).get_slice(key).get_dtype()]


class MappedStateDictSource(MappingSource):
    """A state dict (memory-mapped from a .ckpt / .bin) with row and dtype access."""

    def rows(self, key: str, start: int, stop: int) -> Tensor:
        tensor = self.state_dict[key]
        return tensor[start:stop] if tensor.dim() else tensor

    def dtype(self, key: str) -> torch.dtype:
        return self.state_dict[key].dtype


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
            base_rows = read_rows(base, key, start, stop).double()
            model_rows = read_rows(model, key, start, stop).double()
            moved += float(((model_rows - base_rows) ** 2).sum())
            total += float((base_rows ** 2).sum())
    return math.sqrt(moved / total) if total > 0 else math.sqrt(moved)


def check_shares_base(base: OpenedCheckpoint, models: Sequence[OpenedCheckpoint], keys: Iterable[str],
                      max_distance: float = MAX_RELATIVE_DISTANCE) -> None:
    """InputError when a model is so far from the base that it cannot have been fine-tuned from it."""
    keys = list(keys)
    for model in models:
        distance = relative_distance(base.source, model.source, keys)
        if distance > max_distance:
            raise InputError(model.path, f"is not a fine-tuned copy of the base {base.path} (relative distance "
                                         f"‖θ−θ0‖/‖θ0‖ = {distance:.2f} > {max_distance})",
                             "use the model these checkpoints were trained from as the base")
