"""Output folders are checked before the work that fills them: one line naming the folder, not a traceback
after hours of training, and nothing half-written.

A folder passes when a file can be created in it: in the folder itself when it exists, else in its nearest
existing ancestor (where `mkdir` would create it). The check creates a probe file and removes it at once, and
creates no folder. It is a probe, not `os.access`: permission bits say nothing for root, a read-only mount or
a full quota say nothing to `os.access`, and a path under a regular file fails for everyone.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional

from codiemb_pl.errors import InputError

PROBE_PREFIX = ".codiemb-write-probe-"
FOLDER_FIX = "choose a writable folder or fix its permissions"


def _unwritable_reason(folder: Path) -> Optional[str]:
    """Why no file can be created in `folder` (existing or not), or None when one can."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        descriptor, probe = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=existing)
    except OSError as error:
        return f"creating a file in {existing}: {error.strerror or error}"
    os.close(descriptor)
    os.unlink(probe)
    return None


def check_writable_folder(folder: str | os.PathLike, option: str, fix: str = FOLDER_FIX) -> Path:
    """Refuse (`InputError` "OPTION FOLDER: ...") an output folder that cannot be created or written."""
    path = Path(os.path.abspath(folder))
    if path.exists() and not path.is_dir():
        raise InputError(f"{option} {folder}", "is a file, not a folder", fix)
    reason = _unwritable_reason(path)
    if reason is not None:
        raise InputError(f"{option} {folder}", f"cannot be written ({reason})", fix)
    return Path(folder)


def check_writable_file(path: str | os.PathLike, option: str, fix: str = FOLDER_FIX) -> Path:
    """Refuse an output file that is a folder or whose folder cannot be written (files are written beside
    their final name, then renamed: `atomic.atomic_file`)."""
    target = Path(path)
    if target.is_dir():
        raise InputError(f"{option} {path}", "is a folder", "give a file name")
    reason = _unwritable_reason(Path(os.path.abspath(target)).parent)
    if reason is not None:
        raise InputError(f"{option} {path}", f"cannot be written ({reason})", fix)
    return target
