"""Durable checkpoints: a checkpoint appears under its final name complete, or not at all, on any filesystem.

Files. Lightning's `TorchCheckpointIO` (2.6, `fabric.utilities.cloud_io._atomic_save`) serialises the whole
checkpoint into memory and writes it through an fsspec transaction, which stages the bytes in
`tempfile.mkstemp()` (in `$TMPDIR`) and `shutil.move`s them onto the final name. When `$TMPDIR` is another
filesystem than the checkpoint folder (the usual cluster layout) that move is a copy into the final name,
so a kill or a full disk during it leaves a truncated checkpoint under the final name and a
checkpoint-sized orphan in `$TMPDIR`; nothing is flushed to disk either. `DurableCheckpointIO` streams
`torch.save` into a hidden temporary file in the checkpoint's own folder (`.NAME.tmp-XXXX`), flushes it,
renames it onto the final name and flushes the folder (`atomic.atomic_file`); a full disk is one
`InputError` line, with the previous checkpoint of that name untouched. Remote URLs (`s3://`, `gs://` ...)
keep Lightning's upload, which object stores make atomic.

Folders. A strategy that saves a checkpoint as a folder of shards (DeepSpeed; FSDP with
`state_dict_type="sharded"`; `ModelParallelStrategy` / `sharding.FSDP2Strategy` with
`save_distributed_checkpoint=True`) does not use the CheckpointIO. `DurableTrainer` (`trainer.py`) has it
write into a hidden staging folder beside the final name; when every rank has written, rank 0 flushes
every file, writes the completeness marker `FOLDER_MARKER` (step, epoch, weights-only flag and each file's
size, `seal_checkpoint_folder`) and renames the folder into place. `checkpoint_folder_problem` is the
reader's check.

Loads. `DurableCheckpointIO.load_checkpoint` reads a checkpoint file with
`fusion.sources.load_lightning_checkpoint` (`checkpoint_loading`'s rule: CRCs checked, weights-only unpickling
with the project's settings classes allowed, one `InputError` line naming the file and the refused type). The
opt-in is Lightning's own `--weights_only false` (config key `weights_only: false` of the subcommand), or an
enclosing `checkpoint_loading.trusted_checkpoints()` block (a sweep with `--trust-checkpoint`).
`install_safe_loading` (the CLI calls it for every subcommand) installs the CheckpointIO; a strategy that
reads checkpoints without it (`ModelParallelStrategy` and so `sharding.FSDP2Strategy`, `FSDPStrategy`,
`DeepSpeedStrategy`), or a CheckpointIO the user chose, gets every checkpoint vetted first
(`checkpoint_loading.vet_checkpoint_location`: a file, or a sharded folder file by file) and the allow-list
active while its own loader runs.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins import CheckpointIO, TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.strategies import Strategy

from codiemb_pl.fusion.sources import LIGHTNING_CHECKPOINT_CLASSES, load_lightning_checkpoint
from codiemb_pl.storage.atomic import atomic_file, fsync_tree
from codiemb_pl.storage.checkpoint_loading import (
    allowed_globals,
    checkpoints_trusted,
    refused_checkpoint,
    vet_checkpoint_location,
)

FOLDER_MARKER = "codiemb-complete.json"
"""Written last into a checkpoint folder: `{"global_step", "epoch", "weights_only", "files": {path: bytes}}`."""


def is_local_path(path: Any) -> bool:
    """Whether `path` is on the local filesystem (a plain path or `file://`), not an fsspec remote URL."""
    return isinstance(get_filesystem(str(path)), LocalFileSystem)


def trusted_by(weights_only: Optional[bool]) -> bool:
    """Lightning's `weights_only` as trust: `False` (asked for explicitly) trusts, `None` follows
    `trusted_checkpoints()`, `True` never trusts."""
    return weights_only is False or (weights_only is None and checkpoints_trusted())


class DurableCheckpointIO(TorchCheckpointIO):
    """Lightning's `TorchCheckpointIO`, saving local files through a flushed temporary file in the target's
    folder and an atomic rename, loading them under `checkpoint_loading`'s rule (see the module docstring)."""

    def load_checkpoint(self, path: Any, map_location: Optional[Callable] = lambda storage, loc: storage,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        trust = trusted_by(weights_only)
        if is_local_path(path):
            return load_lightning_checkpoint(str(path).removeprefix("file://"), trust=trust, map_location=map_location)
        # remote stores: Lightning's fsspec read
        with torch.serialization.safe_globals(allowed_globals(LIGHTNING_CHECKPOINT_CLASSES)):
            try:
                return super().load_checkpoint(path, map_location=map_location, weights_only=not trust)
            except pickle.UnpicklingError as exc:
                raise refused_checkpoint(path, exc) from exc

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or not is_local_path(path):
            return super().save_checkpoint(checkpoint, path, storage_options=storage_options)
        with atomic_file(path) as temporary, open(temporary, "wb") as handle:
            torch.save(checkpoint, handle)   # streamed: no second in-memory copy of the checkpoint

    def remove_checkpoint(self, path: Any) -> None:
        """Remove a checkpoint file, or a checkpoint folder by first renaming it to a hidden name, so that a
        kill during the deletion leaves no partial folder under the checkpoint's name."""
        target = Path(str(path))
        if is_local_path(path) and target.is_dir() and not target.is_symlink():
            doomed = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            doomed.rmdir()
            target.rename(doomed)
            path = doomed
        super().remove_checkpoint(path)


def install_durable_checkpoint_io(strategy: Any) -> Optional[str]:
    """Give `strategy` a `DurableCheckpointIO` in place of Lightning's default `TorchCheckpointIO`.

    A CheckpointIO the user chose (`trainer.plugins`, or the strategy's `checkpoint_io`) is kept: a
    `DurableCheckpointIO` (or a wrapper such as `AsyncCheckpointIO` around one) silently, anything else
    with the one-line warning returned here (None when there is nothing to say).
    """
    current = strategy.checkpoint_io
    if type(current) is TorchCheckpointIO:
        strategy.checkpoint_io = DurableCheckpointIO()
        return None
    if isinstance(innermost_checkpoint_io(current), DurableCheckpointIO):
        return None
    return (f"[codiemb] checkpoints are written by {type(current).__name__} (trainer.plugins), not "
            "codiemb_pl.training.checkpoint_io.DurableCheckpointIO: a kill or a full disk during a save may leave a partial "
            "file under the checkpoint's name unless that plugin writes atomically (AsyncCheckpointIO can wrap "
            "DurableCheckpointIO: init_args: {checkpoint_io: {class_path: codiemb_pl.training.checkpoint_io.DurableCheckpointIO}})")


def innermost_checkpoint_io(checkpoint_io: CheckpointIO) -> CheckpointIO:
    """What a wrapper such as `AsyncCheckpointIO` wraps (itself when it wraps nothing)."""
    while isinstance(getattr(checkpoint_io, "checkpoint_io", None), CheckpointIO):
        checkpoint_io = checkpoint_io.checkpoint_io
    return checkpoint_io


def install_safe_loading(strategy: Strategy) -> None:
    """Make every checkpoint `strategy` loads follow `checkpoint_loading` (see the module docstring)."""
    install_durable_checkpoint_io(strategy)   # its warning about a foreign CheckpointIO is printed by `fit`
    if type(strategy).load_checkpoint is Strategy.load_checkpoint and \
            isinstance(innermost_checkpoint_io(strategy.checkpoint_io), DurableCheckpointIO):
        return
    original = strategy.load_checkpoint

    @functools.wraps(original)
    def vetted_load_checkpoint(checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        trust = trusted_by(weights_only)
        if is_local_path(checkpoint_path):
            vet_checkpoint_location(str(checkpoint_path).removeprefix("file://"), trust, LIGHTNING_CHECKPOINT_CLASSES)
        with torch.serialization.safe_globals(allowed_globals(LIGHTNING_CHECKPOINT_CLASSES)):
            try:
                return original(checkpoint_path, weights_only=not trust)
            except pickle.UnpicklingError as exc:
                raise refused_checkpoint(checkpoint_path, exc) from exc

    strategy.load_checkpoint = vetted_load_checkpoint


def seal_checkpoint_folder(folder: Path, global_step: int, epoch: int, weights_only: bool) -> None:
    """Flush every file of a fully written checkpoint folder to disk, then write `FOLDER_MARKER` into it."""
    fsync_tree(folder)
    files = {str(path.relative_to(folder)): path.stat().st_size
             for path in sorted(folder.rglob("*")) if path.is_file()}
    marker = {"global_step": int(global_step), "epoch": int(epoch), "weights_only": bool(weights_only), "files": files}
    with atomic_file(folder / FOLDER_MARKER) as temporary:
        temporary.write_text(json.dumps(marker, indent=1), encoding="utf-8")


def read_folder_marker(folder: Path) -> dict[str, Any]:
    return json.loads((folder / FOLDER_MARKER).read_text(encoding="utf-8"))


def checkpoint_folder_problem(folder: Path) -> Optional[str]:
    """Why the checkpoint folder is not complete (no marker, a listed file missing or of another size), or None."""
    try:
        files = read_folder_marker(folder)["files"]
    except FileNotFoundError:
        return f"has no {FOLDER_MARKER} (its save did not finish, or an older codiemb wrote it)"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"has an unreadable {FOLDER_MARKER} ({error})"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"lacks {name}"
        if path.stat().st_size != size:
            return f"holds {name} with {path.stat().st_size} bytes, {size} were written"
    return None


def staging_folder_name(final: Path) -> Path:
    """A fresh hidden name beside `final` (`.NAME.tmp-XXXX`) for a checkpoint folder being written; not created."""
    return final.parent / f".{final.name}.tmp-{os.urandom(4).hex()}"
