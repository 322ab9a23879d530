"""Which torch device the stand-alone commands (`evaluate`, `mine-negatives`) run their model on."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from codiemb_pl.errors import InputError

if TYPE_CHECKING:  # torch is imported where it is used: a command's `--help` does not load it
    import torch

AUTO = "auto"


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """`--device` (default `auto`), to be turned into a torch device by `resolve_device`."""
    parser.add_argument("--device", default=AUTO, help="cpu, cuda, cuda:N, mps or auto (default: auto, a GPU if any)")


def resolve_device(name: str, flag: str = "--device") -> torch.device:
    """`auto` → the first of cuda, mps, cpu that this machine has; otherwise the named device, checked.

    A device this machine lacks (`cuda` without a GPU, `cuda:3` on a 2-GPU node) is one clear error rather
    than a failure deep inside the first forward pass.
    """
    import torch

    if name == AUTO:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise InputError(f"{flag} {name}", f"not a torch device ({exc})", "use auto, cpu, cuda, cuda:N or mps") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"{flag} {name}", "CUDA is not available on this machine", f"use {flag} cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"{flag} {name}", f"this machine has {torch.cuda.device_count()} CUDA device(s)",
                             f"use an index below {torch.cuda.device_count()}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"{flag} {name}", "MPS is not available on this machine", f"use {flag} cpu or auto")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"{flag} {name}", f"unsupported device type {device.type!r}", "use auto, cpu, cuda or mps")
    return device
