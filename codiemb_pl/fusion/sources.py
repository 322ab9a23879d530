"""Checkpoints as lazily read tensor sources: one type for model folders, .safetensors, .ckpt and state dicts.

A `TensorSource` names its tensors like a Hugging Face model and answers, without loading a tensor,
its `shape` and `dtype`; `rows(key, start, stop)` reads one dim-0 row range (the whole of a 0-d
tensor) and `get(key)` the whole tensor, so a merge can work on row slices of the largest tensors:

    SafetensorsSource   a .safetensors file or a folder of shards, read with plain file reads (no memory
                        map: untouched weights never enter the resident set), only the requested rows
    MappingSource       an in-memory (or memory-mapped) state dict
    KeySubsetSource     another source restricted to some of its keys

Every tensor a source hands out (`rows`, `get`) is checked to be finite (`weight_checks.check_finite`):
NaN or inf stops the merge with the file and the tensor named, before anything is written.

`open_checkpoint(location)` opens what users point at, all named like a Hugging Face model (`X`):

    folder (sentence-transformers or Hugging Face)  -> its transformer's *.safetensors (pytorch_model.bin
                                                        is memory-mapped instead)
    file.safetensors                                -> that file
    file.ckpt (Lightning, CoDiEmbModule)            -> `state_dict` memory-mapped, `encoder.model.` stripped

A `.ckpt` (or `pytorch_model.bin`) is a pickle, read by `checkpoint_loading.load_checkpoint_file`
(CRCs checked, weights-only unpickling unless trusted), memory-mapped: tensor bytes are read when touched.
A codiemb_pl `.ckpt` may also hold the settings objects of `LIGHTNING_CHECKPOINT_CLASSES`; every reader of
those files in the package (resume, checkpoint IO, the export, the CLI's `--ckpt_path`, and this module)
opens them with `load_lightning_checkpoint`. `as_source` turns a state dict, a location or a source into a
source.
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from codiemb_pl.data.sources import SourceConfig
from codiemb_pl.errors import InputError
from codiemb_pl.losses.distillation import DistillationConfig
from codiemb_pl.losses.sts import STSLossConfig
from codiemb_pl.model.layers import select_layer_state
from codiemb_pl.model.lora import LoraSettings, check_lora_settings, is_adapter_state, merge_adapters
from codiemb_pl.model.st_folder import folder_trained_dims, read_json_file, transformer_folder
from codiemb_pl.model.teacher import TeacherSettings
from codiemb_pl.paths import resolve_location
from codiemb_pl.storage.checkpoint_loading import load_checkpoint_file
from codiemb_pl.storage.weight_checks import SAFETENSORS_DTYPES, check_finite, check_safetensors_file

LIGHTNING_PREFIX = "encoder.model."
"""Where a `CoDiEmbModule` checkpoint's `state_dict` keeps the transformer's weights."""
LIGHTNING_CHECKPOINT_CLASSES: tuple[type, ...] = (LoraSettings, STSLossConfig, SourceConfig, DistillationConfig,
                                                  TeacherSettings)
"""The non-tensor classes a codiemb_pl Lightning checkpoint may hold (found by saving real ones: LightningCLI
runs store plain dicts; the Python API stores these settings objects in `hyper_parameters`)."""


def load_lightning_checkpoint(path: str | os.PathLike, **options: Any) -> Any:
    """A codiemb_pl `.ckpt` read by `checkpoint_loading.load_checkpoint_file(path, **options)` with
    `LIGHTNING_CHECKPOINT_CLASSES` allowed."""
    return load_checkpoint_file(path, allowed_classes=LIGHTNING_CHECKPOINT_CLASSES, **options)


def row_ranges(shape: Sequence[int], max_elements: int | None) -> list[tuple[int, int]]:
    """Dim-0 ranges of at most ~`max_elements` elements each; one range for 0-d tensors or `max_elements=None`."""
    if len(shape) == 0 or shape[0] == 0 or max_elements is None:
        return [(0, shape[0] if shape else 0)]
    per_row = max(1, math.prod(shape[1:]))
    step = max(1, max_elements // per_row)
    return [(start, min(start + step, shape[0])) for start in range(0, shape[0], step)]


class TensorSource(ABC):
    """A checkpoint whose tensors are read one at a time, or one dim-0 row range at a time."""

    name: str = "checkpoint"

    @abstractmethod
    def keys(self) -> list[str]:
        """Tensor names, in the checkpoint's order."""

    @abstractmethod
    def shape(self, key: str) -> tuple[int, ...]:
        """The tensor's shape, without reading it."""

    @abstractmethod
    def dtype(self, key: str) -> torch.dtype:
        """The tensor's dtype, without reading it."""

    @abstractmethod
    def _read_rows(self, key: str, start: int, stop: int) -> Tensor:
        """Rows `[start, stop)` as stored (unchecked)."""

    def rows(self, key: str, start: int, stop: int) -> Tensor:
        """Rows `[start, stop)` along dim 0 (the whole tensor when it is 0-d); NaN / inf is an InputError
        naming the checkpoint file and the tensor (`weight_checks.check_finite`)."""
        return check_finite(self._read_rows(key, start, stop), self.file_of(key), key)

    def file_of(self, key: str) -> str:
        """Where `key` is stored, for messages: the checkpoint's name unless a subclass knows the file."""
        return self.name

    def get(self, key: str) -> Tensor:
        """The whole tensor (checked like `rows`)."""
        shape = self.shape(key)
        return self.rows(key, 0, shape[0] if shape else 1)


class MappingSource(TensorSource):
    """An in-memory (or memory-mapped) state dict."""

    def __init__(self, state_dict: Mapping[str, Tensor], name: str = "state dict"):
        self.state_dict, self.name = state_dict, name

    def keys(self) -> list[str]:
        return list(self.state_dict.keys())

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.state_dict[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self.state_dict[key].dtype

    def _read_rows(self, key: str, start: int, stop: int) -> Tensor:
        tensor = self.state_dict[key]
        return tensor[start:stop] if tensor.dim() else tensor

    def get(self, key: str) -> Tensor:
        return check_finite(self.state_dict[key], self.name, key)


class SafetensorsSource(TensorSource):
    """A `.safetensors` file (or a folder of shards) read with plain file reads, row range by row range.

    Unlike `safe_open`, which memory-maps the file (every page touched stays in the resident set while
    the file is open), only the bytes of the requested rows are read, into a fresh tensor.
    """

    def __init__(self, path: str | os.PathLike):
        self.name = str(path)
        root = Path(path)
        files = sorted(root.glob("*.safetensors")) if root.is_dir() else [root] if root.is_file() else []
        if not files:
            raise InputError(self.name, "no .safetensors file found", "give a .safetensors file or a folder holding one")
        self._entries: dict[str, tuple[Path, int, dict[str, Any]]] = {}
        for file in files:
            data_start, header = check_safetensors_file(file)   # a cut-off or garbled file: one line naming it
            for key, entry in header.items():
                if key in self._entries:
                    raise InputError(self.name, f"key {key!r} appears in two shards", "remove the duplicate shard")
                self._entries[key] = (file, data_start, entry)

    def keys(self) -> list[str]:
        return list(self._entries)

    def file_of(self, key: str) -> str:
        return str(self._entry(key)[0])

    def _entry(self, key: str) -> tuple[Path, int, dict[str, Any]]:
        if key not in self._entries:
            raise InputError(self.name, f"no tensor named {key!r}", "check the checkpoint's keys")
        return self._entries[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entry(key)[2]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        name = self._entry(key)[2]["dtype"]
        if name not in SAFETENSORS_DTYPES:
            raise InputError(self.name, f"tensor {key!r} has unsupported dtype {name}", "convert it to float32")
        return SAFETENSORS_DTYPES[name]

    def _read_rows(self, key: str, start: int, stop: int) -> Tensor:
        file, data_start, entry = self._entry(key)
        shape, dtype = list(entry["shape"]), self.dtype(key)
        item_size = torch.empty(0, dtype=dtype).element_size()
        row_bytes = math.prod(shape[1:]) * item_size
        if shape:
            stop = min(stop, shape[0])
            start = min(start, stop)
            shape[0] = stop - start
        else:
            start, stop, row_bytes = 0, 1, item_size
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


class KeySubsetSource(TensorSource):
    """Another source restricted to some of its keys (rows, shapes and dtypes pass through)."""

    def __init__(self, source: TensorSource, keys: Iterable[str]):
        wanted = set(keys)
        self.source, self._keys = source, [k for k in source.keys() if k in wanted]
        self.name = source.name

    def keys(self) -> list[str]:
        return list(self._keys)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.source.shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self.source.dtype(key)

    def _read_rows(self, key: str, start: int, stop: int) -> Tensor:
        return self.source._read_rows(key, start, stop)

    def file_of(self, key: str) -> str:
        return self.source.file_of(key)

    def get(self, key: str) -> Tensor:
        return self.source.get(key)


@dataclass
class OpenedCheckpoint:
    """A checkpoint ready for fusion: its tensors, its config.json, and where its model files live."""

    path: str
    source: TensorSource
    config: dict[str, Any] | None
    model_folder: str | None  # a folder holding config.json / tokenizer (the checkpoint's own, or its base's)
    encoder_settings: dict[str, Any] = field(default_factory=dict)  # pooling etc. from a .ckpt's hparams
    lora: bool = False  # a LoRA run's .ckpt (read as its base weights with the adapters merged in)
    trained_dims: list[int] | None = None  # Matryoshka widths: a folder's record or a .ckpt's matryoshka_dims


def _read_config(folder: str | os.PathLike | None) -> dict[str, Any] | None:
    """The config.json of `folder` (`st_folder.read_json_file`), None without a folder or the file."""
    return None if folder is None else read_json_file(Path(folder) / "config.json")


def _open_folder(folder: Path) -> OpenedCheckpoint:
    weights_folder = transformer_folder(folder)
    if list(weights_folder.glob("*.safetensors")):
        source: TensorSource = SafetensorsSource(weights_folder)
    elif (weights_folder / "pytorch_model.bin").is_file():
        state = load_checkpoint_file(weights_folder / "pytorch_model.bin", mmap=True)
        source = MappingSource(state, str(folder))
    else:
        raise InputError(str(folder), "folder holds no model.safetensors or pytorch_model.bin",
                         "give a sentence-transformers / Hugging Face model folder, a .safetensors or a .ckpt file")
    return OpenedCheckpoint(str(folder), source, _read_config(weights_folder), str(weights_folder),
                            trained_dims=folder_trained_dims(folder))


def read_lightning_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(transformer weights with `encoder.model.` stripped, hyper-parameters) of a `CoDiEmbModule` `.ckpt`.

    The tensors are memory-mapped (read on first touch); the file is read under `checkpoint_loading`'s rule.
    """
    checkpoint = load_lightning_checkpoint(path, mmap=True)
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    weights = {key[len(LIGHTNING_PREFIX):]: value for key, value in (state or {}).items()
               if key.startswith(LIGHTNING_PREFIX)}
    if not weights:
        raise InputError(str(path), f"the checkpoint has no {LIGHTNING_PREFIX}* weights",
                         "give a checkpoint of codiemb_pl's CoDiEmbModule")
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    if is_adapter_state(weights):  # a LoRA run (model.lora): its base with s·B·A merged in
        weights = merge_adapter_checkpoint(weights, hparams, str(path))
    return weights, hparams


def merge_adapter_checkpoint(adapters: Mapping[str, Tensor], hparams: Mapping[str, Any],
                             where: str) -> dict[str, Tensor]:
    """The full weights of a LoRA run's checkpoint: its base model (`hparams.model_name_or_path`, read
    whole) with `s·B·A` merged in, `s = lora.alpha / lora.r` from the checkpoint's `hparams.lora`."""
    settings = hparams.get("lora")
    base_name = hparams.get("model_name_or_path")
    if settings is None or not base_name:
        raise InputError(where, "holds LoRA adapters but no model.lora / model_name_or_path hyper-parameters",
                         "give a checkpoint written by `codiemb fit` with model.lora set")
    settings = check_lora_settings(settings if isinstance(settings, LoraSettings) else LoraSettings(**dict(settings)),
                                   where=f"{where}: model.lora")
    if settings.task_adapters:   # base + s·B·A of every set would add both task deltas: not the run's merge
        raise InputError(where, "is a task-routed LoRA checkpoint (model.lora.task_adapters), whose weights are the "
                         "shared adapters plus a fusion of the task adapters", "fuse or load the model folder that "
                         "ExportEncoder wrote (the fused merge) or its specialists_dirpath folders instead")
    source = open_checkpoint(base_name).source
    base = {key: source.get(key) for key in source.keys()}
    if hparams.get("num_layers") is not None:   # a student cut from its base's blocks (model.num_layers)
        base = select_layer_state(base, hparams["num_layers"], where=f"{where}: model.num_layers")
    return merge_adapters(base, adapters, settings.alpha / settings.r, where)


def _open_lightning(path: Path) -> OpenedCheckpoint:
    weights, hparams = read_lightning_checkpoint(path)
    base_name = hparams.get("model_name_or_path")
    model_folder = resolve_location(str(base_name)) if base_name else None
    if model_folder is not None and not Path(model_folder).is_dir():
        model_folder = None
    settings = {name: hparams[name] for name in ("pooling", "normalize", "max_seq_length", "num_layers")
                if hparams.get(name) is not None}
    return OpenedCheckpoint(str(path), MappingSource(weights, str(path)),
                            _read_config(model_folder), model_folder, settings, lora=hparams.get("lora") is not None,
                            trained_dims=list(hparams.get("matryoshka_dims") or []) or None)


def open_checkpoint(location: str | os.PathLike) -> OpenedCheckpoint:
    """Open a model folder, a `.safetensors` file or a Lightning `.ckpt` (else InputError)."""
    path = Path(resolve_location(str(location))).expanduser()
    if path.is_dir():
        return _open_folder(path)
    if path.is_file() and path.suffix == ".ckpt":
        return _open_lightning(path)
    if path.is_file() and path.suffix == ".safetensors":
        folder = path.parent
        return OpenedCheckpoint(str(path), SafetensorsSource(path), _read_config(folder),
                                str(folder) if (folder / "config.json").is_file() else None)
    if path.exists():
        raise InputError(str(location), "is not a model folder, a .safetensors or a .ckpt file",
                         "give one of those (convert other formats with save_pretrained)")
    raise InputError(str(location), "no such checkpoint", "check the path")


def as_source(checkpoint: TensorSource | Mapping[str, Tensor] | str | os.PathLike, name: str) -> TensorSource:
    """A source for a state dict (`MappingSource`) or a location (`open_checkpoint`); sources pass through."""
    if isinstance(checkpoint, TensorSource):
        return checkpoint
    if isinstance(checkpoint, Mapping):
        return MappingSource(checkpoint, name)
    if isinstance(checkpoint, (str, os.PathLike)):
        return open_checkpoint(checkpoint).source
    raise InputError(name, f"cannot read a checkpoint from {type(checkpoint).__name__}",
                     "pass a state dict, a model folder, a .safetensors or .ckpt path, or a TensorSource")
