"""Checkpoint files whose pickle runs code when unpickled fully: it creates a marker file, so a test can
prove the code never ran. Two kinds (both ran code in `codiemb fuse` / `codiemb evaluate` before
issue 27): a zip-format `.ckpt` written by hand, and a real checkpoint with one extra object added."""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch


def marker_code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').close()"


def crafted_zip_checkpoint(path: Path, marker: Path) -> Path:
    """A torch zip checkpoint made by hand: `archive/data.pkl` is a protocol-2 pickle that calls
    `builtins.exec(code)` and then evaluates to an empty dict."""
    code = marker_code(marker).encode()
    pickle_bytes = (b"\x80\x02" + b"cbuiltins\nexec\n" + b"X" + len(code).to_bytes(4, "little") + code
                    + b"\x85R" + b"0" + b"}.")   # GLOBAL, BINUNICODE, TUPLE1, REDUCE, POP, EMPTY_DICT, STOP
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", pickle_bytes)
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")
    return path


class RunsCode:
    """Pickles as a call to `exec` that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (marker_code(self.marker),)


def with_extra_object(real_checkpoint: Path, path: Path, marker: Path) -> Path:
    """`real_checkpoint` re-saved with one more top-level entry, a `RunsCode`."""
    checkpoint = torch.load(real_checkpoint, map_location="cpu", weights_only=False)
    checkpoint["extra"] = RunsCode(marker)
    torch.save(checkpoint, path)
    return path
