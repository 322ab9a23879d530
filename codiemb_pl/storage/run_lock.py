"""One writer per run folder: a lock file that `fit`, `sweep` and `boom` take in their root folder.

Global rank 0 creates `<root>/.codiemb.lock` atomically: the holder (host, pid, process start time, boot
and pid-namespace ids, start date, command) is written to a temporary file that is then hard-linked to
the lock name. `link` fails when the name exists, also on NFS (where `flock` is unreliable; a lost
reply is recognised by the temporary file's link count), and a reader never sees a half-written lock.
Where hard links are not supported the lock is created with `O_CREAT | O_EXCL` instead. A process
killed meanwhile leaves that temporary (or a takeover's mutex, below); the next holder removes those
of dead processes (`_remove_dead_temporaries`).

A second run on the folder gets one `InputError` line naming the holder. A lock whose holder is gone is
taken over with a warning when the holder ran on this machine (same host name, boot and pid namespace)
and its pid is dead, a zombie, or now belongs to another process (its start time differs), or when it
was an earlier incarnation of this requeued SLURM job (same cluster and job id, lower SLURM_RESTART_COUNT);
any other lock from another machine or container is never taken over. A sweep or BOOM lock (`tree=True`) covers every run
folder below it (OUTPUT/runs/NAME): a run there is refused unless this process holds that lock (a sweep's
in-process fits).

Only global rank 0 takes the lock (`is_global_rank_zero`, from the launcher's environment variables);
other ranks get a handle that does nothing. Plain Python: no Lightning or torch import.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shlex
import socket
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from codiemb_pl.errors import InputError

LOCK_NAME = ".codiemb.lock"
RANK_VARIABLES = ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")
"""Checked when `RANK` is unset: global rank 0 is the process where each of these that is set is 0."""
COVER_DEPTH = 2   # a sweep's run folders are OUTPUT/runs/NAME: how many folders up a run looks for a tree lock
UNREADABLE_RETRY_S = 1.0   # an O_EXCL-created lock is empty for a moment: how long to wait for its content
NO_LINK_ERRNOS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK, errno.EXDEV}
LOCK_TEMPORARY = re.compile(r"^" + re.escape(LOCK_NAME) + r"\.(?:[0-9a-f]+\.tmp|takeover-[0-9a-f]+)$")
"""The lock's temporaries: `LOCK.TOKEN.tmp` (a lock being created), `LOCK.takeover-TOKEN` (a takeover's mutex)."""

_HELD: dict[Path, "RunLock"] = {}
"""The locks this process holds, by lock path (a sweep's in-process fits find their sweep's lock here)."""


def is_global_rank_zero(env: Optional[Mapping[str, str]] = None) -> bool:
    """Whether this process is global rank 0 as the launcher set it: `RANK` (torchrun) when set, else every
    one of LOCAL_RANK / NODE_RANK / GROUP_RANK (Lightning's launcher, torchrun), SLURM_PROCID, JSM_NAMESPACE_RANK
    that is set must be 0. A process started without any of them (a plain `codiemb fit`) is rank 0."""
    env = os.environ if env is None else env

    def value(name: str) -> Optional[int]:
        try:
            return int(env.get(name, "").strip())
        except ValueError:
            return None

    rank = value("RANK")
    if rank is not None:
        return rank == 0
    return all(value(name) in (None, 0) for name in RANK_VARIABLES)


def _read_first_line(path: str) -> Optional[str]:
    try:
        with open(path, encoding="ascii") as handle:
            return handle.readline().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def process_start_ticks(pid: int) -> Optional[int]:
    """The start time of process `pid` in clock ticks since boot (`/proc/<pid>/stat` field 22); None where
    there is no /proc or no such process. With the pid it identifies a process (pids are reused)."""
    stat = _read_first_line(f"/proc/{pid}/stat")
    if stat is None:
        return None
    fields = stat.rpartition(")")[2].split()   # the command name (field 2) may hold spaces and parentheses
    try:
        return int(fields[19])                 # field 22; fields[0] is field 3 (the state)
    except (IndexError, ValueError):
        return None


def _is_zombie(pid: int) -> bool:
    stat = _read_first_line(f"/proc/{pid}/stat")
    return stat is not None and stat.rpartition(")")[2].split()[:1] == ["Z"]


def _pid_namespace() -> Optional[int]:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def this_machine() -> tuple[str, Optional[str], Optional[int]]:
    """(host name, boot id, pid namespace) of this process: a lock's pid means something only where all three
    match (the boot id and namespace are None where /proc does not give them)."""
    return socket.gethostname(), _read_first_line("/proc/sys/kernel/random/boot_id"), _pid_namespace()


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (a zombie counts as ended)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's process
        pass
    return not _is_zombie(pid)


def slurm_launch(env: Optional[Mapping[str, str]] = None) -> dict[str, Any]:
    """This process's SLURM job (`CLUSTER:JOB_ID`) and requeue count; None outside SLURM."""
    env = os.environ if env is None else env
    job = env.get("SLURM_JOB_ID")
    try:
        restart = int(env.get("SLURM_RESTART_COUNT") or 0)
    except ValueError:
        restart = 0
    return {"slurm_job": f"{env.get('SLURM_CLUSTER_NAME', '')}:{job}" if job else None,
            "slurm_restart": restart if job else None}


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: written to the lock file as one JSON object."""

    kind: str                       # fit | sweep | boom
    host: str
    pid: int
    since: float                    # time.time() when taken
    command: str
    tree: bool = False              # True: covers every run folder below the root (sweep, boom)
    start_ticks: Optional[int] = None
    boot_id: Optional[str] = None
    pid_namespace: Optional[int] = None
    token: str = ""
    slurm_job: Optional[str] = None        # CLUSTER:JOB_ID of a SLURM job (kept when the job is requeued)
    slurm_restart: Optional[int] = None    # SLURM_RESTART_COUNT: how often that job was requeued

    @classmethod
    def this_process(cls, kind: str, tree: bool, command: Optional[str] = None) -> "Holder":
        host, boot_id, pid_namespace = this_machine()
        return cls(kind=kind, host=host, pid=os.getpid(), since=time.time(),
                   command=(command or shlex.join(sys.argv))[:2000], tree=tree,
                   start_ticks=process_start_ticks(os.getpid()), boot_id=boot_id, pid_namespace=pid_namespace,
                   token=secrets.token_hex(8), **slurm_launch())

    def to_text(self) -> str:
        return json.dumps({"codiemb_run_lock": 1, **asdict(self)}, indent=1) + "\n"

    @classmethod
    def from_text(cls, text: str) -> Optional["Holder"]:
        try:
            data = json.loads(text)
            return cls(kind=str(data["kind"]), host=str(data["host"]), pid=int(data["pid"]),
                       since=float(data["since"]), command=str(data.get("command", "")),
                       tree=bool(data.get("tree", False)), start_ticks=data.get("start_ticks"),
                       boot_id=data.get("boot_id"), pid_namespace=data.get("pid_namespace"),
                       token=str(data.get("token", "")), slurm_job=data.get("slurm_job"),
                       slurm_restart=data.get("slurm_restart"))
        except (ValueError, TypeError, KeyError, AttributeError):
            return None

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"`codiemb {self.kind}` pid {self.pid} on host {self.host} since {since}"

    def elsewhere(self) -> Optional[str]:
        """Why this holder is not on this machine (None if it is): host name, boot or pid namespace differ."""
        host, boot_id, pid_namespace = this_machine()
        if self.host != host:
            return "another host"
        if self.boot_id and boot_id and self.boot_id != boot_id:
            return "this host before a reboot, or another machine of the same name"
        if self.pid_namespace and pid_namespace and self.pid_namespace != pid_namespace:
            return "another container on this host"
        return None

    def superseded(self) -> Optional[str]:
        """Why this holder is certainly no longer running: it ran on this machine and its process ended, or it
        was an earlier incarnation of this requeued SLURM job (SLURM stops every step before a requeue).
        None when it may still run."""
        mine = slurm_launch()
        if self.slurm_job and self.slurm_job == mine["slurm_job"] \
                and (self.slurm_restart or 0) < (mine["slurm_restart"] or 0):
            return f"SLURM job {self.slurm_job} was requeued since"
        return None if self.elsewhere() else self.gone()

    def gone(self) -> Optional[str]:
        """Why the holder (known to be on this machine) is no longer running; None while it runs."""
        if not pid_alive(self.pid):
            return f"process {self.pid} has ended"
        ticks = process_start_ticks(self.pid)
        if self.start_ticks is not None and ticks is not None and ticks != self.start_ticks:
            return f"pid {self.pid} now belongs to another process"
        return None


class RunLock:
    """A held lock (or, for a rank other than 0 or a folder this process already holds, a handle that does
    nothing). `release()` removes the lock file if it still names this holder; a context manager."""

    def __init__(self, path: Path, holder: Optional[Holder] = None, created: tuple[Path, ...] = ()):
        self.path, self.holder = path, holder
        self.created = created   # the folders the lock created (deepest first): removed again if left empty

    @property
    def owned(self) -> bool:
        return self.holder is not None

    def release(self) -> None:
        if self.holder is None:
            return
        holder, self.holder = self.holder, None
        _HELD.pop(self.path, None)
        try:   # never raises: it runs in `finally` blocks, where an error would hide the run's own
            current = read_holder(self.path, wait=0.0)
            if current is not None and current.token == holder.token:
                os.unlink(self.path)
                for folder in self.created:   # a run stopped by bad input leaves no empty folder behind
                    with contextlib.suppress(OSError):
                        folder.rmdir()
                return
            problem = "was removed or replaced by someone else while this run held it"
        except (ValueError, OSError) as error:
            problem = f"could not be removed ({error})"
        print(f"codiemb: warning: {self.path}: the run lock {problem}", file=sys.stderr, flush=True)

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def read_holder(path: Path, wait: Optional[float] = None) -> Optional[Holder]:
    """The holder named by lock file `path`; None if there is no such file. Raises `ValueError` if the file
    stays unreadable for `wait` seconds (default `UNREADABLE_RETRY_S`: an O_EXCL-created lock is empty until
    its holder writes it)."""
    deadline = time.monotonic() + (UNREADABLE_RETRY_S if wait is None else wait)
    while True:
        try:
            holder = Holder.from_text(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError):
            holder = None
        if holder is not None:
            return holder
        if time.monotonic() >= deadline:
            raise ValueError(f"{path} does not hold a codiemb run lock")
        time.sleep(0.05)


def _create_exclusive(path: Path, text: str, token: str) -> bool:
    """Create `path` holding `text` if it does not exist; False if it does. Atomic (hard link of a complete
    temporary file, or O_CREAT | O_EXCL where links are not supported)."""
    temporary = path.with_name(f"{path.name}.{token}.tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    unsupported = False
    try:
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass
        except OSError as error:
            if error.errno not in NO_LINK_ERRNOS:
                raise
            unsupported = True
        if os.stat(temporary).st_nlink == 2:   # ours, even where NFS reported a retried link as EEXIST
            return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
    if not unsupported:
        return False
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    return True


def _remove_stale(path: Path, stale: Holder) -> bool:
    """Remove lock `path` if it still names the dead holder `stale`; True if this call removed it.

    The processes that found the same stale lock race for `<lock>.takeover-<its token>` (created atomically);
    only the winner removes the lock, after checking it still holds `stale`'s token, so a fresh lock that a
    racer created in between is never removed. Losers return False and look at the lock again."""
    mutex = path.with_name(f"{path.name}.takeover-{stale.token}")
    me = Holder.this_process("takeover", False)
    if not _create_exclusive(mutex, me.to_text(), me.token):
        try:
            other = read_holder(mutex)
        except ValueError:
            other = None
        if other is not None and other.superseded():
            raise InputError(str(path), f"a takeover of this stale lock was interrupted ({mutex} is left)",
                             f"if no codiemb run uses this folder, delete {path} and {mutex}")
        time.sleep(0.05)   # another process is taking it over right now
        return False
    try:
        try:
            current = read_holder(path, wait=0.0)
        except ValueError:
            return False
        if current is None or current.token != stale.token:
            return False
        os.unlink(path)
        return True
    finally:
        os.unlink(mutex)


def _remove_dead_temporaries(lock_path: Path) -> None:
    """Delete the lock temporaries (`LOCK_TEMPORARY`) that killed processes left beside `lock_path`: those naming
    a holder that is `superseded`, and unreadable ones (a write cut short by a kill, or a racer writing its own
    right now: its link then finds no file and `acquire_run_lock` tries again, to be refused by this holder).
    The lock's holder calls it; a live process's readable temporaries are left to it. Never raises."""
    for path in lock_path.parent.iterdir():
        if LOCK_TEMPORARY.match(path.name) is None:
            continue
        try:
            holder = Holder.from_text(path.read_text(encoding="utf-8"))
            if holder is None or holder.superseded() is not None:
                path.unlink()
        except (OSError, UnicodeDecodeError):
            continue


def _refusal(root: Path, lock_path: Path, holder: Holder, folder_option: str, covered: bool = False) -> InputError:
    elsewhere = holder.elsewhere()
    what = (f"{holder.describe()} holds {lock_path} and writes every run folder under it" if covered
            else f"another run is writing this folder: {holder.describe()} (lock {lock_path})")
    if elsewhere:
        fix = (f"it ran on {elsewhere}, so it is not taken over: wait for it to end; if you know it is no longer "
               f"running, delete {lock_path}; or use another {folder_option}")
    else:
        fix = f"wait for it to end or stop it, or use another {folder_option}"
    return InputError(str(root), what, fix)


def _check_covering_locks(root: Path, folder_option: str) -> None:
    """Refuse `root` if one of the `COVER_DEPTH` folders above it holds a live sweep / BOOM lock that this process
    does not hold (not further up: a lookup in an automounted folder such as /net can be slow)."""
    mine = {lock.holder.token for lock in _HELD.values() if lock.holder is not None}
    for folder in list(root.parents)[:COVER_DEPTH]:
        lock_path = folder / LOCK_NAME
        try:
            holder = read_holder(lock_path, wait=0.0)
        except (ValueError, OSError):
            continue
        if holder is None or not holder.tree or holder.token in mine:
            continue
        if holder.superseded() is None:
            raise _refusal(root, lock_path, holder, folder_option, covered=True)


def acquire_run_lock(root: str | os.PathLike, kind: str, *, tree: bool = False,
                     folder_option: str = "output folder", command: Optional[str] = None,
                     env: Optional[Mapping[str, str]] = None,
                     warn: Optional[Callable[[str], None]] = None) -> RunLock:
    """Take the lock of run folder `root` for a `kind` run (fit / sweep / boom); `tree=True` also covers the
    folders below it. Raises `InputError` (one line naming the holder) if another live run holds it or a
    folder above it; takes over a dead holder's lock on this machine with a warning (`warn`, default
    stderr). Ranks other than global rank 0 and a folder this process already holds get a no-op handle."""
    root = Path(root).resolve()
    lock_path = root / LOCK_NAME
    if not is_global_rank_zero(env) or lock_path in _HELD:
        return RunLock(lock_path)
    warn = warn or (lambda line: print(line, file=sys.stderr, flush=True))
    _check_covering_locks(root, folder_option)
    mine = Holder.this_process(kind, tree, command)
    created = tuple(folder for folder in (root, *root.parents) if not folder.exists())
    try:
        for _ in range(50):   # each round succeeds, refuses, or finds the lock released or taken over
            root.mkdir(parents=True, exist_ok=True)
            try:
                taken = _create_exclusive(lock_path, mine.to_text(), mine.token)
            except FileNotFoundError:   # the folder was removed in between (a run that just ended)
                continue
            if taken:
                lock = RunLock(lock_path, mine, created)
                _HELD[lock_path] = lock
                _remove_dead_temporaries(lock_path)
                return lock
            try:
                current = read_holder(lock_path)
            except ValueError:
                raise InputError(str(lock_path), "is not a readable codiemb run lock",
                                 "if no codiemb run is using this folder, delete that file") from None
            if current is None:
                continue   # released in between
            reason = current.superseded()
            if reason is None:
                raise _refusal(root, lock_path, current, folder_option)
            if _remove_stale(lock_path, current):
                warn(f"codiemb: warning: {root}: took over the run lock of {current.describe()} ({reason})")
    except OSError as error:
        raise InputError(str(root), f"cannot create the run lock {lock_path} ({error.strerror or error})",
                         f"make the folder writable or use another {folder_option}") from None
    raise InputError(str(lock_path), "the run lock kept changing hands", "another run is starting on this folder; "
                     "try again in a moment")


@contextlib.contextmanager
def run_lock(root: str | os.PathLike, kind: str, **options) -> Iterator[RunLock]:
    """`acquire_run_lock(root, kind, **options)` for the body of a `with`; released however the body ends."""
    lock = acquire_run_lock(root, kind, **options)
    try:
        yield lock
    finally:
        lock.release()
