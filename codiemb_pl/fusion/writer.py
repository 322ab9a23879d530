"""Write a `.safetensors` file piece by piece, atomically: it appears complete under its name, or not at all.

The layout (key -> dtype, shape) is known before any tensor is computed, so the header is written
first and each tensor's bytes follow as its pieces (consecutive dim-0 slices) arrive; nothing holds
the whole model. File format: 8-byte little-endian header length, the JSON header
{key: {dtype, shape, data_offsets}, "__metadata__": {...}} padded with spaces to a multiple of 8,
then the data. The file is written beside the target, flushed to disk and moved into place
(`atomic.atomic_file`); on any error the partial file is removed and a previous file of that name is left
untouched (a full disk: one `InputError` line).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor

from codiemb_pl.errors import InputError
from codiemb_pl.storage.atomic import atomic_file
from codiemb_pl.storage.weight_checks import SAFETENSORS_DTYPES, check_finite

DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
Layout = Mapping[str, tuple[torch.dtype, tuple[int, ...]]]


def _tensor_bytes(tensor: Tensor) -> bytes:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def _header(layout: Layout, metadata: Mapping[str, str] | None) -> tuple[bytes, dict[str, dict]]:
    header: dict[str, dict] = {}
    offset = 0
    for key, (dtype, shape) in layout.items():
        if dtype not in DTYPE_NAMES:
            raise InputError(key, f"dtype {dtype} cannot be stored in safetensors", "cast the checkpoint to a standard dtype")
        size = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    entries = dict(header)
    entries["__metadata__"] = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}
    encoded = json.dumps(entries, separators=(",", ":")).encode()
    return encoded + b" " * (-len(encoded) % 8), header


def write_safetensors(out_path: str | os.PathLike, layout: Layout, pieces: Callable[[str], Iterable[Tensor]],
                      metadata: Mapping[str, str] | None = None) -> Path:
    """Write `layout`'s tensors to `out_path`; `pieces(key)` yields each one's consecutive dim-0 slices.

    Each piece is cast to the key's dtype. A key whose pieces do not add up to its shape's byte size, or
    a piece holding NaN / inf (`weight_checks.check_finite`, naming `out_path` and the key), is an error
    (nothing is written).
    """
    out_path = Path(out_path)
    header_bytes, header = _header(layout, metadata)
    with atomic_file(out_path) as partial, open(partial, "wb") as out:
        out.write(len(header_bytes).to_bytes(8, "little"))
        out.write(header_bytes)
        for key, (dtype, _) in layout.items():
            written = 0
            for piece in pieces(key):
                payload = _tensor_bytes(check_finite(piece.to(dtype), str(out_path), key))
                out.write(payload)
                written += len(payload)
            start, stop = header[key]["data_offsets"]
            if written != stop - start:
                raise RuntimeError(f"{key}: wrote {written} bytes, expected {stop - start}")
    return out_path


def save_state_dict(state: Mapping[str, Tensor], out_path: str | os.PathLike,
                    metadata: Mapping[str, str] | None = None) -> Path:
    """Write an in-memory state dict to `out_path` (atomically, as `write_safetensors`)."""
    layout = {key: (tensor.dtype, tuple(tensor.shape)) for key, tensor in state.items()}
    return write_safetensors(out_path, layout, lambda key: (state[key],), metadata)
