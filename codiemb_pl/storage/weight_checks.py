"""Checks on the weight files the project reads and the tensors it writes: one line naming the file, never a repair.

    read_safetensors_header(file)   (data offset, {key: {dtype, shape, data_offsets}}), else InputError
    check_safetensors_file(file)    the header parses and its tensors tile the data section exactly
                                    (a cut-off or padded file, overlapping or mis-sized tensors are refused)
    check_model_folder(folder)      config.json is JSON; its weights (*.safetensors, else pytorch_model*.bin
                                    under `checkpoint_loading`'s rule) are sound
    load_safetensors(file)          `safetensors.torch.load_file` after `check_safetensors_file`, every tensor finite
    check_finite(tensor, where, key) / check_finite_state(state, where)
                                    NaN or ±inf in a floating tensor is an InputError naming `where` and the key

safetensors has no checksum: garbage bytes that decode to finite numbers cannot be told from weights;
garbage that decodes to NaN / inf (4 KB of 0xFF is 1 024 float32 NaNs) is caught by the finiteness
checks, which every merge input, merge output, export and loaded model goes through (one pass over each
tensor, tensor by tensor).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from codiemb_pl.errors import InputError
from codiemb_pl.storage.checkpoint_loading import load_checkpoint_file

# safetensors dtype names <-> torch dtypes (read by `fusion.sources`, written by `fusion.writer`).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
MAX_HEADER_BYTES = 100_000_000
DAMAGED_FIX = "re-save or re-download it; a damaged file is not repaired"


def read_safetensors_header(file: Path) -> tuple[int, dict[str, Any]]:
    """(offset of the data section, {key: {dtype, shape, data_offsets}}) of a safetensors file."""
    with open(file, "rb") as handle:
        prefix = handle.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        try:
            header = json.loads(handle.read(length)) if 0 < length < MAX_HEADER_BYTES else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            header = None
    if not isinstance(header, dict):
        raise InputError(str(file), "is not a safetensors file (bad header)", DAMAGED_FIX)
    header.pop("__metadata__", None)
    return 8 + length, header


def check_safetensors_file(file: str | os.PathLike) -> tuple[int, dict[str, Any]]:
    """`read_safetensors_header(file)` once its tensors are known to tile the data section exactly (else
    InputError): one read of the header and a `stat`."""
    file = Path(file)
    data_start, header = read_safetensors_header(file)
    spans = []
    for key, entry in header.items():
        try:
            dtype, shape, (start, stop) = SAFETENSORS_DTYPES.get(entry["dtype"]), entry["shape"], entry["data_offsets"]
            size = math.prod(shape) * (torch.empty(0, dtype=dtype).element_size() if dtype is not None else 1)
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(str(file), f"tensor {key!r} has a malformed header entry", DAMAGED_FIX) from exc
        if dtype is not None and stop - start != size:
            raise InputError(str(file), f"tensor {key!r} spans {stop - start} bytes, its shape needs {size}",
                             DAMAGED_FIX)
        spans.append((start, stop, key))
    expected = data_start
    for start, stop, key in sorted(spans):
        if start != expected - data_start:
            raise InputError(str(file), f"tensor {key!r} starts at byte {start} of the data, expected "
                                        f"{expected - data_start} (overlapping or missing data)", DAMAGED_FIX)
        expected = data_start + stop
    actual = file.stat().st_size
    if actual != expected:
        what = "is truncated" if actual < expected else "has bytes after its last tensor"
        raise InputError(str(file), f"{what}: {actual} bytes, its header describes {expected}", DAMAGED_FIX)
    return data_start, header


def check_finite(tensor: Tensor, where: str, key: str) -> Tensor:
    """`tensor` (returned as given) when it holds no NaN / ±inf (non-floating tensors pass); else an
    InputError naming `where` and `key`.

    One `aminmax` pass decides (NaN propagates to both ends, ±inf shows at one end): ~12x faster than
    `isfinite(t).all()` on CPU; the exact count runs only for the message, or for dtypes `aminmax` lacks.
    """
    if not (tensor.is_floating_point() or tensor.is_complex()) or tensor.numel() == 0:
        return tensor
    given = tensor
    if tensor.element_size() == 1:   # float8: neither aminmax nor isfinite on CPU
        tensor = tensor.float()
    try:
        low, high = torch.aminmax(tensor)
        finite = math.isfinite(float(low)) and math.isfinite(float(high))
    except RuntimeError:   # complex: no aminmax
        finite = bool(torch.isfinite(tensor).all())
    if not finite:
        bad = int(tensor.numel() - torch.isfinite(tensor).sum())
        raise InputError(where, f"tensor {key!r} holds {bad} non-finite value(s) (NaN or inf)",
                         "the file is damaged or training diverged: use another checkpoint (nothing is repaired)")
    return given


def check_finite_state(state: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]], where: str) -> None:
    """`check_finite` on every tensor of a state dict (or `named_parameters()`-like pairs), one by one."""
    for key, tensor in state.items() if isinstance(state, Mapping) else state:
        check_finite(tensor.detach(), where, key)


def load_safetensors(file: str | os.PathLike) -> dict[str, Tensor]:
    """All tensors of a `.safetensors` file, after `check_safetensors_file`, each checked to be finite."""
    from safetensors.torch import load_file

    check_safetensors_file(file)
    state = load_file(str(file))
    check_finite_state(state, str(file))
    return state


def check_model_folder(folder: str | os.PathLike) -> None:
    """A local Hugging Face / sentence-transformers transformer folder, before transformers reads it:
    config.json must be JSON and its weight files sound (safetensors tiling; a pickled `.bin` under
    `checkpoint_loading`'s rule). Layouts this does not know are left to transformers."""
    folder = Path(folder)
    config = folder / "config.json"
    if config.is_file():
        try:
            json.loads(config.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(str(config), f"is not valid JSON ({exc})", "repair or re-download the model folder") from exc
    safetensors_files = sorted(folder.glob("*.safetensors"))
    for file in safetensors_files:
        check_safetensors_file(file)
    pickled_files = [] if safetensors_files else sorted(folder.glob("pytorch_model*.bin"))
    if not safetensors_files and not pickled_files and config.is_file() and not list(folder.glob("*.index.json")):
        raise InputError(str(folder), "holds config.json but no weights (model.safetensors or pytorch_model.bin)",
                         "copy the weight files into the folder or re-download the model")
    for file in pickled_files:
        load_checkpoint_file(file, mmap=True)   # vetted only: transformers reads it again (weights-only)


def weights_location(folder: str | os.PathLike) -> str:
    """The weights file of a model folder when it has exactly one, else the folder (for messages)."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    return str(files[0]) if len(files) == 1 else str(folder)
