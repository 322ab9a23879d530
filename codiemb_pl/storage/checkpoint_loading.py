"""The one rule for opening pickled checkpoint files (`.ckpt`, `pytorch_model.bin`): no code from data files.

A torch checkpoint is a zip of tensor records plus a pickle, and unpickling can call any function the
file names. Every such file the project opens goes through `load_checkpoint_file`:

1. every zip record is read once through its CRC-32 (`verify_zip_records`; torch's reader checks none,
   so a flipped byte in the weights would load as is); a truncated or garbled file is one `InputError`;
2. the pickle is read with `torch.load(weights_only=True)`: tensors, plain containers and `pathlib` paths
   only, plus the classes the caller names (`allowed_classes`: a codiemb_pl Lightning checkpoint holds the
   settings dataclasses the Python API stores in its hyper-parameters, which `fusion.sources`
   (`LIGHTNING_CHECKPOINT_CLASSES`, `load_lightning_checkpoint`) names for every reader of `.ckpt` files).
   Anything else stops with one `InputError` naming the file and the refused global.

Trust is the explicit opt-in for files from a known source: `load_checkpoint_file(path, trust=True)`,
or `trusted_checkpoints()` around a whole command (`--trust-checkpoint`; `fit/validate/test/predict`:
Lightning's own `--weights_only false`, see `checkpoint_io.py`). A trusted file is unpickled fully,
after the same CRC check.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import pathlib
import pickle
import re
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from codiemb_pl.errors import InputError

TRUST_HINT = ("pass --trust-checkpoint (fit/validate/test/predict: --weights_only false) only if you trust "
              "where the file came from")
_CRC_CHUNK_BYTES = 1 << 20
_trusted = contextvars.ContextVar("codiemb_trusted_checkpoints", default=False)
_verified: dict[tuple[str, int, int], None] = {}   # (path, size, mtime_ns) of files whose CRCs passed


PATH_CLASSES = (pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath, pathlib.PureWindowsPath)
"""Allowed in every weights-only load: paths stored in hyper-parameters."""


def allowed_globals(allowed_classes: Iterable[type] = ()) -> list[type]:
    """What a weights-only unpickle may build beyond tensors and plain containers: `pathlib` paths and the
    caller's `allowed_classes`."""
    return [*allowed_classes, *PATH_CLASSES]


def checkpoints_trusted() -> bool:
    """Whether checkpoint files opened in this context are unpickled fully (`trusted_checkpoints`)."""
    return _trusted.get()


@contextlib.contextmanager
def trusted_checkpoints(enabled: bool = True) -> Iterator[None]:
    """Within the block, `load_checkpoint_file(trust=None)` trusts (`enabled`) or vets every file."""
    token = _trusted.set(bool(enabled))
    try:
        yield
    finally:
        _trusted.reset(token)


def verify_zip_records(path: str | os.PathLike) -> None:
    """Read every record of the zip at `path` through its CRC-32; a bad record or a cut-off file is an
    `InputError` naming the file (and the record). One sequential pass over the file."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _verified:
        return
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                with archive.open(info) as record:   # reading to the end checks the record's CRC-32
                    while record.read(_CRC_CHUNK_BYTES):
                        pass
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise InputError(str(path), f"the checkpoint is corrupt or truncated ({_one_line(exc)})",
                         "re-save or re-download it; a damaged file is not repaired") from exc
    _verified[key] = None


def load_checkpoint_file(path: str | os.PathLike, *, trust: bool | None = None, map_location: Any = "cpu",
                         mmap: bool = False, check_records: bool = True, allowed_classes: Iterable[type] = ()) -> Any:
    """`torch.load(path)` under this module's rule (CRC check, then a weights-only unpickle with
    `allowed_globals(allowed_classes)`, or a full one when trusted); every failure is one `InputError` naming
    the file.

    `trust=None` follows the enclosing `trusted_checkpoints()` block (untrusted outside one).
    `check_records=False` skips the CRC pass, for a caller that only looks inside candidates (memory-mapped)
    and verifies the one it picks (`resume.resolve_last_checkpoint`).
    """
    import torch

    path = Path(path)
    trust = checkpoints_trusted() if trust is None else trust
    if not path.is_file():
        raise InputError(str(path), "no such checkpoint file", "check the path")
    if zipfile.is_zipfile(path):
        if check_records:
            verify_zip_records(path)
    elif _starts_like_a_zip(path):   # a zip whose directory (at the end) is missing: cut off
        raise InputError(str(path), "the checkpoint is truncated (its zip directory is missing)",
                         "re-save or re-download it")
    elif mmap:   # torch's legacy (pre-1.6) format: no CRCs to check, and it cannot be memory-mapped
        mmap = False
    try:
        if trust:
            return torch.load(path, map_location=map_location, mmap=mmap, weights_only=False)
        with torch.serialization.safe_globals(allowed_globals(allowed_classes)):
            return torch.load(path, map_location=map_location, mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as exc:
        if trust:
            raise InputError(str(path), f"cannot read the checkpoint ({_one_line(exc)})",
                             "re-save or re-download it") from exc
        raise refused_checkpoint(path, exc) from exc
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, ImportError) as exc:
        raise InputError(str(path), f"cannot read the checkpoint ({type(exc).__name__}: {_one_line(exc)})",
                         "re-save or re-download it") from exc


def vet_checkpoint_location(path: str | os.PathLike, trust: bool | None = None,
                            allowed_classes: Iterable[type] = ()) -> None:
    """Check what a loader outside this module (a Lightning strategy that reads checkpoints itself) is about
    to unpickle, under the same rule: a file as `load_checkpoint_file` reads it (memory-mapped, so only its
    pickle is parsed); a checkpoint folder file by file, `torch.distributed.checkpoint`'s `.metadata` with
    `DistributedMetadataUnpickler`. Raises the same one-line `InputError`s; returns nothing."""
    path = Path(path)
    trust = checkpoints_trusted() if trust is None else trust
    if not path.is_dir():
        load_checkpoint_file(path, trust=trust, mmap=True, allowed_classes=allowed_classes)
        return
    for file in sorted(item for item in path.rglob("*") if item.is_file()):
        if file.name == DISTRIBUTED_METADATA_NAME and not trust:
            read_distributed_metadata(file)
        elif file.suffix in PICKLED_SUFFIXES:   # `.distcp` shards: raw tensor bytes, weights-only byte items
            load_checkpoint_file(file, trust=trust, mmap=True, allowed_classes=allowed_classes)


DISTRIBUTED_METADATA_NAME = ".metadata"
PICKLED_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_DISTRIBUTED_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "TensorProperties",
                                              "ChunkStorageMetadata", "BytesStorageMetadata", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size", "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8",
              "bool", "complex64", "complex128", "float8_e4m3fn", "float8_e5m2"},
    "collections": {"OrderedDict"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},   # StorageMeta.checkpoint_id
}


class DistributedMetadataUnpickler(pickle.Unpickler):
    """Reads `torch.distributed.checkpoint`'s `.metadata` (a plain pickle, which torch itself loads with
    `pickle.load`), resolving only the metadata classes, dtypes and `torch.Size` it legitimately holds."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _DISTRIBUTED_METADATA_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name} was not an allowed global")


def read_distributed_metadata(file: Path) -> Any:
    """The `.metadata` of a sharded checkpoint folder, read by `DistributedMetadataUnpickler` (else InputError)."""
    try:
        with open(file, "rb") as handle:
            return DistributedMetadataUnpickler(handle).load()
    except pickle.UnpicklingError as exc:
        raise refused_checkpoint(file, exc) from exc
    except (EOFError, OSError, ValueError, TypeError, AttributeError, ImportError) as exc:
        raise InputError(str(file), f"cannot read the checkpoint metadata ({type(exc).__name__}: {_one_line(exc)})",
                         "re-save or re-download the checkpoint folder") from exc


def refused_checkpoint(path: str | os.PathLike, error: BaseException) -> InputError:
    """The `InputError` for a weights-only unpickle that `error` stopped: it names the refused global."""
    text = str(error)
    found = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"unrecognized function (\S+)", text)
    if found:
        problem = (f"names {found.group(1)}, a function or class no codiemb_pl checkpoint holds: unpickling "
                   "it could run code from the file, so it was not loaded")
    else:
        detail = text.rsplit("WeightsUnpickler error:", 1)[-1].split("Check the documentation")[0]
        problem = f"holds something a weights-only load refuses ({_one_line(detail)}), so it was not loaded"
    return InputError(str(path), problem, TRUST_HINT)


def _starts_like_a_zip(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == b"PK\x03\x04"


def _one_line(error: BaseException | str) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 300 else text[:297] + "..."
