"""Crash-safe writing: a folder or a file appears under its final name complete, or not at all.

A reader (an evaluation job, a resumed run, `SentenceTransformer(path)`) must never see a half-written
export. The helpers write next to the target under a hidden temporary name (`.NAME.tmp-XXXX`, same
filesystem, so the final rename is atomic), flush the data to disk (fsync of the files, then of the
folder) and only then move the result into place. A full disk ends in one `InputError` line with the
final name untouched and the temporary removed. A process killed mid-write leaves at most a temporary
entry, which `remove_stale_temporaries` recognises by its name and the next run removes. A folder replacing
a folder is swapped in one step where the system can (`exchange`), so the final name never stands empty.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Optional

from codiemb_pl.errors import InputError

NO_ROOM_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
"""Write failures that mean "no room for these bytes": disk full, quota exceeded, file size limit."""

TEMPORARY_NAME = re.compile(r"^\.(?P<name>.+?)(?:\.(?:tmp|old)-[A-Za-z0-9_]+|\.partial)$")
"""The project's temporary names: `.NAME.tmp-XXXX` (a write in progress, `atomic_*`, `write_safetensors`,
the checkpoint IO), `.NAME.old-XXXX` (a replaced folder about to be deleted) and `.NAME.partial` (the
interruption checkpoint of earlier versions)."""


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


def fsync_tree(path: Path) -> None:
    """Flush every file under `path` (a file or a folder) and every folder entry to disk."""
    if path.is_file():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
        return
    for folder, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(folder, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_directory(Path(folder))


def no_room_error(error: BaseException) -> Optional[OSError]:
    """The "no room" `OSError` (`NO_ROOM_ERRNOS`) that caused `error`, if any: libraries such as `torch.save`
    re-raise a failed write as another exception whose `__cause__` / `__context__` is the `OSError`."""
    seen: set[int] = set()
    current: Optional[BaseException] = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in NO_ROOM_ERRNOS:
            return current
        current = current.__cause__ or current.__context__
    return None


def raise_if_no_room(error: BaseException, final: Path) -> None:
    """Re-raise a failed write of `final` that ran out of room as one `InputError` line."""
    cause = no_room_error(error)
    if cause is not None:
        reason = cause.strerror or os.strerror(cause.errno)
        raise InputError(str(final), f"not written, the filesystem refused more data ({reason}); the previous "
                                     "content under this name, if any, is unchanged",
                         "free space on that filesystem (or raise the quota / file size limit) and rerun") from error


RENAME_EXCHANGE = 2      # renameat2(2) flag: swap the two names atomically
AT_FDCWD = -100          # renameat2(2): paths relative to the working folder


@functools.cache
def _renameat2():
    """libc's `renameat2` (Linux, glibc 2.28+), None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None


def exchange(first: Path, second: Path) -> bool:
    """Swap the entries `first` and `second` (both existing, one filesystem) in one step: no moment in which
    either name is absent, even for folders. False, with nothing changed, where the system or the filesystem
    cannot (not Linux, an old kernel or libc, a filesystem without `RENAME_EXCHANGE`, e.g. some network ones)."""
    function = _renameat2()
    if function is None:
        return False
    if function(AT_FDCWD, os.fsencode(first), AT_FDCWD, os.fsencode(second), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), str(second))


def _remove_entry(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def move_into_place(staging: Path, final: Path) -> None:
    """Rename `staging` (a file or a folder beside `final`) to `final`, then flush the folder entry.

    A file replaces a file in one `os.replace`. A folder (or a file over a folder) is swapped with the previous
    `final` in one step (`exchange`) and the previous content, now under the staging name, deleted. Where that
    is not possible, the previous `final` is renamed aside (`.NAME.old-XXXX`), `staging` renamed into place and
    the old one deleted; if the second rename fails the old one is put back, and if the process is killed in
    between, the next `remove_stale_temporaries` puts it back.
    """
    if not final.is_dir() and not staging.is_dir():
        os.replace(staging, final)
        _fsync_directory(final.parent)
        return
    if (final.exists() or final.is_symlink()) and exchange(staging, final):
        _fsync_directory(final.parent)
        _remove_entry(staging)   # the previous content
        return
    backup: Path | None = None
    try:
        if final.exists() or final.is_symlink():
            backup = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            backup.rmdir()  # only the unique name is wanted; `rename` needs the target to be absent
            final.rename(backup)
        staging.rename(final)
    except BaseException:
        if backup is not None and (backup.exists() or backup.is_symlink()) and not final.exists():
            backup.rename(final)
        raise
    _fsync_directory(final.parent)
    if backup is not None and backup.is_dir() and not backup.is_symlink():
        shutil.rmtree(backup, ignore_errors=True)
    elif backup is not None:
        backup.unlink(missing_ok=True)


def _link_or_copy(source: str, target: str) -> None:
    """Hard-link `source` as `target`; copy it where the filesystem has no hard links."""
    try:
        os.link(source, target)
    except FileExistsError:
        raise
    except OSError:
        shutil.copy2(source, target)


def link_into_place(source: Path, final: Path) -> None:
    """Make `final` (in the same folder as `source`) hold what `source` holds, atomically: a hard link to the file
    (a copy where links are unsupported), or for a folder a staged tree of links, flushed and moved into place as
    `move_into_place` does. `source` is untouched, and a later atomic save of `final` replaces the link, not it."""
    staging = final.parent / f".{final.name}.tmp-{os.urandom(4).hex()}"
    try:
        if source.is_dir():
            shutil.copytree(source, staging, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(source), str(staging))
        fsync_tree(staging)
        move_into_place(staging, final)
    except BaseException as error:
        if staging.is_dir() and not staging.is_symlink():
            shutil.rmtree(staging, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                staging.unlink()
        raise_if_no_room(error, final)
        raise


def final_name(name: str) -> Optional[str]:
    """The final name a temporary entry named `name` is written for (None: not a temporary). A temporary of a
    temporary (`..NAME.tmp-X.tmp-Y`: something written atomically into a staging folder's name) is NAME's."""
    match = TEMPORARY_NAME.match(name)
    if match is None:
        return None
    while (inner := TEMPORARY_NAME.match(match.group("name"))) is not None:
        match = inner
    return match.group("name")


def remove_stale_temporaries(folder: Path, names: Optional[Iterable[str]] = None) -> list[Path]:
    """Delete the project's temporary entries (`TEMPORARY_NAME`) directly in `folder`: those of the final
    names in `names` (`final_name`), or of any name when `names` is None. A previous version set aside
    (`.NAME.old-XXXX`) whose NAME is absent (a process killed between the two renames of `move_into_place`) is
    renamed back instead: what was written is not lost. Call it only where no other process of this run can be
    writing (a run's start, under its lock). Returns what was removed."""
    if not folder.is_dir():
        return []
    wanted = None if names is None else set(names)
    removed = []
    for entry in sorted(folder.iterdir()):
        name = final_name(entry.name)
        if name is None or (wanted is not None and name not in wanted):
            continue
        if entry.name.startswith(f".{name}.old-") and not (folder / name).exists() \
                and not (folder / name).is_symlink():
            entry.rename(folder / name)
            continue
        _remove_entry(entry)
        removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_directory(final_path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside `final_path`; on success move it to `final_path`.

    If the body raises, the temporary folder is removed and `final_path` is left exactly as it was
    (absent, or the previous folder untouched). Before the move every file written is flushed to disk;
    a previous folder is replaced as `move_into_place` does.
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
        fsync_tree(staging)
        move_into_place(staging, final)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise_if_no_room(error, final)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside `path`; once the body has written it, flush it to disk and move it
    onto `path` (`os.replace`). If the body raises, the temporary file is removed and `path` is untouched
    (a full disk becomes one `InputError`)."""
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
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary_name)
        raise_if_no_room(error, target)
        raise
    _fsync_directory(target.parent)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write `text` to `path` via a temporary file in the same folder and an atomic `os.replace`."""
    with atomic_file(path) as temporary:
        temporary.write_text(text, encoding=encoding)
