"""Crash-safe writing: a folder or a text file appears under its final name complete, or not at all.

A reader (an evaluation job, a resumed run, `SentenceTransformer(path)`) must never see a half-written
export. Both helpers write next to the target (same filesystem, so the final rename is atomic) and
only move the result into place once writing has succeeded.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import InputError


def _fsync_directory(folder: Path) -> None:
    """Flush a directory entry to disk where the platform allows it (best effort)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def atomic_directory(final_path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside `final_path`; on success move it to `final_path`.

    If the body raises, the temporary folder is removed and `final_path` is left exactly as it was
    (absent, or the previous folder untouched). A previous folder is replaced by first renaming it
    aside, then renaming the new one into place, then deleting the old one; if the second rename
    fails the old folder is put back.
    """
    final = Path(final_path)
    if final.exists() and not final.is_dir():
        raise InputError(str(final), "exists and is not a folder",
                         "choose another output path or remove that file")
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; an exported model should be readable like any folder
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    backup: Path | None = None
    try:
        if final.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            backup.rmdir()  # only the unique name is wanted; `rename` needs the target to be absent
            final.rename(backup)
        staging.rename(final)
    except BaseException:
        if backup is not None and backup.exists() and not final.exists():
            backup.rename(final)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_directory(final.parent)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside `path`; once the body has written it, flush it to disk and move it
    onto `path` (`os.replace`). If the body raises, the temporary file is removed and `path` is untouched."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary_name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(descriptor)
    try:
        yield Path(temporary_name)
        with open(temporary_name, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(temporary_name, 0o644)  # mkstemp makes it private; keep ordinary file permissions
        os.replace(temporary_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary_name)
        raise
    _fsync_directory(target.parent)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write `text` to `path` via a temporary file in the same folder and an atomic `os.replace`."""
    with atomic_file(path) as temporary:
        temporary.write_text(text, encoding=encoding)
