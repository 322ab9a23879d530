"""`--ckpt_path last`: resume from the newest complete checkpoint of the run, and never silently start over.

Lightning resolves "last" to the newest `last*.ckpt` in the ModelCheckpoint folders and, when there is
none, warns and trains from the beginning, even when the folder holds other checkpoints (a run killed
between its epoch checkpoint and `last.ckpt`); a truncated `last.ckpt` crashes the resume.
`resolve_last_checkpoint` looks at every checkpoint (`*.ckpt` file or folder, hidden temporaries
excluded) in the run's checkpoint folders instead:

- complete: a file opens as a torch checkpoint and its pickle loads under `checkpoint_loading`'s rule
  (weights-only with the project's allow-list, memory-mapped: the tensors are mapped, not read), and the
  one chosen passes its CRC check too (else the next one is taken); a folder carries the completeness
  marker and every file it lists, at its size (`checkpoint_io.checkpoint_folder_problem`);
- resumable: it holds the optimizer and loop states (`ModelCheckpoint(save_weights_only=True)` files do not);
- newest: the highest global step, then a `last*` name, then the later modification time.

The newest complete, resumable checkpoint is used: silently when it is a `last*` checkpoint, otherwise
with one line saying why `last.ckpt` was passed over; if the fit then saves no `last.ckpt` (nothing was
left to train: a run killed while writing it at its final step), `last.ckpt` is made to hold the chosen
checkpoint (`bring_last_up_to_date`: a hard link) instead of naming the older state for good. No
checkpoint at all: training starts from the beginning, with one line. Checkpoints but none usable: one
`InputError` line listing them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from codiemb_pl.errors import InputError
from codiemb_pl.fusion.sources import load_lightning_checkpoint
from codiemb_pl.storage.atomic import link_into_place
from codiemb_pl.storage.checkpoint_loading import verify_zip_records
from codiemb_pl.training.checkpoint_io import checkpoint_folder_problem, read_folder_marker

LAST_NAME = re.compile(r"^last(-v?\d+)?$")
"""Stems of Lightning's `last` checkpoints (`last.ckpt`, `last-v1.ckpt`)."""

RESUME_KEYS = ("optimizer_states", "loops")


@dataclass(frozen=True)
class CheckpointCandidate:
    """One checkpoint found in a checkpoint folder; `problem` says why it cannot be resumed (None: it can)."""

    path: Path
    step: Optional[int]
    problem: Optional[str]
    modified: float

    @property
    def is_last(self) -> bool:
        return LAST_NAME.match(self.path.stem) is not None

    def order(self) -> tuple:
        return (self.step if self.step is not None else -1, self.is_last, self.modified)


def inspect_checkpoint(path: Path) -> CheckpointCandidate:
    """Read what resuming needs to know about the checkpoint at `path` (see the module docstring)."""
    modified = path.stat().st_mtime
    if path.is_dir():
        problem = checkpoint_folder_problem(path)
        if problem is not None:
            return CheckpointCandidate(path, None, f"is incomplete: it {problem}", modified)
        marker = read_folder_marker(path)
        weights_only = bool(marker.get("weights_only"))
        return CheckpointCandidate(path, int(marker.get("global_step", -1)),
                                   "holds weights only (no optimizer or loop state)" if weights_only else None, modified)
    if path.stat().st_size == 0:
        return CheckpointCandidate(path, None, "is empty", modified)
    try:
        checkpoint = load_lightning_checkpoint(path, trust=False, mmap=True, check_records=False)
    except InputError as error:   # refused (an object outside the allow-list) or unreadable: the line says which
        if "could run code" in error.problem:
            return CheckpointCandidate(path, None, f"{error.problem} (pass --ckpt_path with it and --weights_only "
                                                   "false if you trust it)", modified)
        return CheckpointCandidate(path, None, f"is incomplete or unreadable ({error.problem})", modified)
    if not isinstance(checkpoint, dict):
        return CheckpointCandidate(path, None, "is not a Lightning checkpoint", modified)
    step = checkpoint.get("global_step")
    step = int(step) if isinstance(step, int) else None
    missing = [key for key in RESUME_KEYS if key not in checkpoint]
    problem = f"holds weights only (no {' or '.join(missing)})" if missing else None
    return CheckpointCandidate(path, step, problem, modified)


def find_checkpoints(folders: Iterable[Path], extension: str = ".ckpt") -> list[CheckpointCandidate]:
    """Every checkpoint (`*.ckpt` file or folder, not hidden) directly in `folders`, inspected."""
    seen: set[Path] = set()
    found = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.name.startswith(".") or path.suffix != extension or path.resolve() in seen:
                continue
            seen.add(path.resolve())
            found.append(inspect_checkpoint(path))
    return found


def verified_newest_first(candidates: list[CheckpointCandidate]) -> list[CheckpointCandidate]:
    """The usable candidates once the newest of them has passed its CRC check (`checkpoint_loading`); a file
    failing it gets that problem in `candidates` and the next one is checked. One CRC pass in the usual case."""
    while True:
        usable = [candidate for candidate in candidates if candidate.problem is None]
        if not usable:
            return []
        newest = max(usable, key=CheckpointCandidate.order)
        try:
            if newest.path.is_file():
                verify_zip_records(newest.path)
            return usable
        except InputError as error:
            candidates[candidates.index(newest)] = CheckpointCandidate(
                newest.path, newest.step, f"is damaged ({error.problem})", newest.modified)


def resolve_last_checkpoint(folders: list[Path]) -> tuple[Optional[Path], str]:
    """(the checkpoint `--ckpt_path last` resumes from, or None to train from the beginning; the line to
    print, empty when the choice is the usual one). Raises `InputError` when checkpoints exist but none is usable."""
    where = ", ".join(str(folder) for folder in folders)
    candidates = find_checkpoints(folders)
    if not candidates:
        return None, f"[codiemb] --ckpt_path last: no checkpoint in {where} yet, training starts from the beginning"
    usable = verified_newest_first(candidates)
    if not usable:
        listed = "; ".join(f"{candidate.path.name} {candidate.problem}" for candidate in candidates)
        raise InputError("--ckpt_path last", f"no usable checkpoint in {where}: {listed}",
                         "pass --ckpt_path FILE of a checkpoint you want to resume from, or move the folder away "
                         "to train from the beginning")
    chosen = max(usable, key=CheckpointCandidate.order)
    if chosen.is_last:
        return chosen.path, ""
    lasts = [candidate for candidate in candidates if candidate.is_last]
    usable_lasts = [candidate for candidate in lasts if candidate.problem is None]
    if usable_lasts:
        newest_last = max(usable_lasts, key=CheckpointCandidate.order)
        reason = f"it is newer than {newest_last.path.name} (step {newest_last.step})"
    elif lasts:
        reason = "; ".join(f"{candidate.path.name} {candidate.problem}" for candidate in lasts)
    else:
        reason = "there is no last.ckpt (the run stopped before writing it)"
    return chosen.path, f"[codiemb] --ckpt_path last: resuming from {chosen.path} (step {chosen.step}): {reason}"


def file_identity(path: Path) -> Optional[tuple[int, int, int]]:
    """(inode, size, modification time) of `path`, None if it does not exist: changes whenever a save replaces it."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def lasts_to_watch(chosen: Path, lasts: Iterable[Path]) -> list[tuple[Path, Optional[tuple[int, int, int]]]]:
    """The last checkpoints in `lasts` beside `chosen` (the checkpoint a run resumes from) other than it, each with
    its `file_identity` before the run."""
    return [(last, file_identity(last)) for last in lasts
            if last.parent.resolve() == chosen.parent.resolve() and last.resolve() != chosen.resolve()]


def bring_last_up_to_date(chosen: Path, watched: Iterable[tuple[Path, Optional[tuple[int, int, int]]]]) -> list[Path]:
    """After a resumed fit: make each watched last checkpoint that no save replaced (the run had nothing left to
    train) hold `chosen` (`atomic.link_into_place`). Returns those it changed."""
    changed = []
    for last, before in watched:
        if file_identity(last) == before:
            link_into_place(chosen, last)
            changed.append(last)
    return changed
