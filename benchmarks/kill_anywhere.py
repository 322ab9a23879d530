"""Kill anywhere (issue 27, item 2): SIGKILL `codiemb fit`, `fuse` and `sweep` at random moments and re-run them.

    python benchmarks/kill_anywhere.py                        # 30 trials per entry point, prints the table
    python benchmarks/kill_anywhere.py --trials 4 --entry fit --workdir /tmp/kills --seed 1
    python benchmarks/kill_anywhere.py --start spawn          # each run a fresh `python -m codiemb_pl`
    python benchmarks/kill_anywhere.py --entry fit --index 8  # trial 8 of fit again (its seeded moment)

Each entry point runs on a tiny random BERT (2 layers, hidden 32) with the package's demo data:

- `fit`: 4 optimizer steps, validation every 2 (two `step*.ckpt` and `last.ckpt`), `ExportEncoder` (`model/`),
  `CheckpointFusion` (snapshots every 2 steps, best and last; uniform soup and TIES; `fusion/model/`) and the
  quickstart's CSV logger (`logs/version_N/metrics.csv`, flushed every step);
- `fuse`: TIES of `last.ckpt`, a snapshot and the export of the reference fit, scored on the demo dev sets;
- `sweep`: two runs of that fit config (another sampler policy, another learning rate), fused (`model/`).

A trial starts the command in a fresh folder, in its own process group, and stops it (SIGSTOP, so what exists
at that instant can be listed, then SIGKILL to the whole group) at one of two kinds of moment, alternating by
trial:

- `uniform`: a time drawn uniformly between the start and the duration of the latest full run (the
  reference, or an attempt that ended before its moment: the shared machine's pace changes);
- `save`: while a temporary exists. The run folder is polled every `POLL_S` for the project's temporaries
  (`atomic.TEMPORARY_NAME`: `.NAME.tmp-*` files and staging folders, `.NAME.old-*`; and the run lock's
  `.codiemb.lock.*.tmp` / `.takeover-*`). The kinds of write the reference run showed (`write_kind`:
  checkpoint, export, snapshot or merge, record, lock file) take turns, and the kill lands inside the k-th
  write of the trial's kind, k drawn uniformly from the count the reference showed. If that temporary is
  gone once the process is stopped (the save ended between the poll and the stop) the process continues and
  the next one is taken. No test hook: the files observed are the real ones; only `os.fsync` is made 20 ms
  slower in every run (`stretch_fsync`, as on a network filesystem), so that a small record, written and
  renamed within microseconds otherwise, lives long enough to be seen.

If the command ends before its moment (a uniform time beyond a faster run), the trial draws again (up to 5
attempts, recorded). After the kill, every final artefact must be absent or complete: `*.ckpt` load with
the project's safe loader, exports (`model/`, `fusion/model/`, `fused/`) load with
`sentence_transformers.SentenceTransformer` and give finite embeddings, `*.safetensors` load and are
finite, JSON / YAML parse, every CSV row has its header's fields, the lock file names its holder; and
nothing written is lost: no final name is
absent while its previous version lies set aside (`.NAME.old-*`). Then the same command runs again (`fit`
with `--ckpt_path last`) and must exit 0 (taking over the killed run's lock; a refusal, exit code 2 with one
`codiemb: error:` line, is reported with that line), leave every final artefact, no temporary and no lock
behind, and end with the uninterrupted reference run's results: every weight file (checkpoint `state_dict`
and optimizer state, exports, snapshots, merges) equal tensor by tensor (`torch.equal`: exact, not to a
tolerance), every other file of an export and the leaderboards equal once the run folder's path is replaced
by the reference's (the logs and `config.yaml` aside: a resumed run logs to a new `logs/version_N`).

Runs start by default as forked children of the harness (`--start fork`), which has imported what `codiemb`
imports once (`preload`, torch on one thread): each child is where a fresh interpreter would be after its
imports, so uniform moments land in the work rather than in 10-20 s of imports on the shared machine, and a
trial costs a third of the time. `--start spawn` runs a fresh `python -m codiemb_pl` each time instead.

The functions are also what `tests/test_kill_anywhere.py` runs (three seeded trials).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from codiemb_pl.storage.atomic import TEMPORARY_NAME, final_name  # noqa: E402
from codiemb_pl.storage.run_lock import LOCK_NAME, LOCK_TEMPORARY  # noqa: E402

ENTRY_POINTS = ("fit", "fuse", "sweep")
MODES = ("save", "uniform")
POLL_S = 0.001
FSYNC_STRETCH_S = 0.02                      # every fsync in a run takes at least this long (`stretch_fsync`)
MAX_ATTEMPTS = 5
COMMAND_TIMEOUT_S = 600
EXPORT_NAMES = ("model", "fused")           # folders that must be complete sentence-transformers exports
REQUIRED = {                                # what a finished run leaves (globs relative to the run folder)
    "fit": ["checkpoints/last.ckpt", "model/modules.json", "fusion/model/modules.json", "fusion/leaderboard.json"],
    "fuse": ["fused/modules.json", "fused/model.safetensors"],
    "sweep": ["model/modules.json", "model/merge.json", "leaderboard.json", "fusion/base.safetensors",
              "runs/a/model/modules.json", "runs/b/model/modules.json", "runs/a/sweep_run.json",
              "runs/b/sweep_run.json"],
}
SAMPLE_TEXTS = ["what is the capital of france", "Paris is the capital and largest city of France."]
STARTS = ("fork", "spawn")                  # how a run's process starts (`start_codiemb`)
PRELOADED = ("lightning.pytorch", "sentence_transformers", "transformers", "codiemb_pl.cli.lightning",
             "codiemb_pl.cli.fit", "codiemb_pl.sweeps.sweep", "codiemb_pl.sweeps.leaderboard",
             "codiemb_pl.workflows.fusion", "codiemb_pl.callbacks", "codiemb_pl.data.datamodule",
             "codiemb_pl.training.module", "codiemb_pl.evaluation.suite")


# ----------------------------------------------------------------------------------------------------
# the workspace: a tiny model, the configs, the uninterrupted reference runs
# ----------------------------------------------------------------------------------------------------

VALIDATION_SETS = [
    {"name": "demo_sts_dev", "task": "sts", "path": "pkg://codiemb_pl/demo/sts_dev.jsonl", "max_samples": 30},
    {"name": "demo_ir_dev", "task": "ir", "path": "pkg://codiemb_pl/demo/ir_dev", "split": "dev", "max_samples": 10},
]


def fit_config(model: Path, steps: int) -> dict[str, Any]:
    """The fit of every trial: `steps` optimizer steps, validation (and so a checkpoint) every `steps // 2`."""
    every = max(1, steps // 2)
    return {
        "seed_everything": 7,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": steps, "max_epochs": 1, "val_check_interval": every,
            "log_every_n_steps": 1, "num_sanity_val_steps": 0, "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": {"class_path": "codiemb_pl.training.loggers.CSVLogger",   # as the quickstart's; every step
                       "init_args": {"flush_logs_every_n_steps": 1}},
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"monitor": "val/avg", "mode": "max", "save_top_k": 2, "save_last": True,
                               "filename": "step{step}", "auto_insert_metric_name": False}},
                {"class_path": "codiemb_pl.callbacks.ExportEncoder"},
                {"class_path": "codiemb_pl.callbacks.CheckpointFusion",
                 "init_args": {"collect": ["best", "last"], "every_n_steps": every,
                               "methods": [{"method": "uniform_soup"},
                                           {"method": "ties", "params": {"density": 0.2}}]}}]},
        "model": {"model_name_or_path": str(model), "ir_temperature": 0.05, "lr": 1.0e-3},
        "data": {
            "ir_batch_size": 4, "sts_batch_size": 4, "n_positives": 1, "n_negatives": 2, "max_query_length": 32,
            "max_passage_length": 48, "max_sts_length": 32, "val_batch_size": 32,
            "train": [{"name": "demo_ir", "task": "ir", "path": "pkg://codiemb_pl/demo/ir_train.jsonl",
                       "max_samples": 24},
                      {"name": "demo_sts", "task": "sts", "path": "pkg://codiemb_pl/demo/sts_train.jsonl",
                       "max_samples": 24}],
            "val": VALIDATION_SETS},
    }


def sweep_file() -> dict[str, Any]:
    return {"runs": [{"name": "a", "data.policy": "proportional"}, {"name": "b", "model.lr": 5.0e-4}],
            "fusion": {"checkpoints": ["final"],
                       "methods": [{"method": "uniform_soup"}, {"method": "ties", "params": {"density": 0.2}}]}}


def fuse_recipe(model: Path, fit_run: Path) -> dict[str, Any]:
    """TIES of three input kinds of a finished fit: a Lightning checkpoint, a snapshot, an export."""
    snapshot = sorted((fit_run / "fusion" / "snapshots").glob("step*.safetensors"))[0]
    return {"base": str(model), "method": "ties", "parameters": {"density": 0.2},
            "models": [{"path": str(fit_run / "checkpoints" / "last.ckpt")}, {"path": str(snapshot)},
                       {"path": str(fit_run / "model")}],
            "evaluate": VALIDATION_SETS}


@dataclass
class Reference:
    """An uninterrupted run: its folder, wall time, and the temporaries seen while it ran (time, path)."""

    root: Path
    seconds: float
    temporaries: list[tuple[float, str]]


@dataclass
class Workspace:
    folder: Path
    model: Path
    steps: int
    start: str = "fork"             # how every run's process starts (`start_codiemb`)
    fsync_stretch: float = FSYNC_STRETCH_S   # `stretch_fsync` in every run (0: none)
    references: dict[str, Reference] = field(default_factory=dict)
    durations: dict[str, float] = field(default_factory=dict)
    """The latest full run seen per entry point (the reference, then any attempt that ran to its end): the span
    uniform moments are drawn from, since a shared machine's speed changes over the hours a harness runs."""

    @property
    def fit_config_path(self) -> Path:
        return self.folder / "fit.yaml"

    def command(self, entry: str, root: Path, rerun: bool = False) -> list[str]:
        """`codiemb ENTRY ...` arguments (without the interpreter) writing into run folder `root`."""
        if entry == "fit":
            return (["fit", "--config", str(self.fit_config_path), "--trainer.default_root_dir", str(root)]
                    + (["--ckpt_path", "last"] if rerun else []))
        if entry == "fuse":
            return ["fuse", "--recipe", str(self.folder / "fuse.yaml"), "--output", str(root / "fused")]
        if entry == "sweep":
            return ["sweep", "--config", str(self.fit_config_path), "--sweep", str(self.folder / "sweep.yaml"),
                    "--output", str(root)]
        raise ValueError(f"unknown entry point {entry!r}")


def write_yaml(path: Path, content: dict[str, Any]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(content, sort_keys=False), encoding="utf-8")
    return path


def prepare_workspace(folder: Path, model: Optional[Path] = None, steps: int = 4, start: str = "fork",
                      fsync_stretch: float = FSYNC_STRETCH_S) -> Workspace:
    """Write the configs into `folder` (and a tiny random BERT when `model` is None); no run yet. `start="fork"`
    preloads this process (`preload`); `fsync_stretch=0` leaves fsync alone (for kills with their own plan)."""
    folder.mkdir(parents=True, exist_ok=True)
    if model is None:
        sys.path.insert(0, str(REPO_ROOT / "tests"))
        from conftest import build_tiny_bert

        model = folder / "tiny_bert"
        if not (model / "model.safetensors").is_file():
            build_tiny_bert(model)
    workspace = Workspace(folder, Path(model), steps, start, fsync_stretch)
    if start == "fork":
        preload()
    write_yaml(workspace.fit_config_path, fit_config(workspace.model, steps))
    write_yaml(folder / "sweep.yaml", sweep_file())
    return workspace


def reference(workspace: Workspace, entry: str) -> Reference:
    """The uninterrupted run of `entry`, run once (`fuse` needs the fit's first), watched: its duration and the
    temporaries it showed are what the kill moments are drawn from."""
    if entry in workspace.references:
        return workspace.references[entry]
    if entry == "fuse":
        fit_run = reference(workspace, "fit").root
        write_yaml(workspace.folder / "fuse.yaml", fuse_recipe(workspace.model, fit_run))
    root = workspace.folder / "reference" / entry
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    watched = watch_run(workspace.command(entry, root), root, root / "output.log", None, workspace.start,
                        workspace.fsync_stretch)
    code, seconds, temporaries = watched.exit_code, watched.seconds, watched.temporaries
    if code != 0:
        raise RuntimeError(f"the reference {entry} failed ({code}); see {root / 'output.log'}")
    problems = check_artefacts(root, finished=True, entry=entry)
    if problems:
        raise RuntimeError(f"the reference {entry} is not sound: {problems}")
    workspace.references[entry] = Reference(root, seconds, temporaries)
    return workspace.references[entry]


def run_codiemb(args: list[str], root: Path, start: str, fsync_stretch: float = FSYNC_STRETCH_S) -> tuple[int, float]:
    """`codiemb ARGS` to the end, its output appended to `root/output.log`: (exit code, seconds). `start`: how
    the process starts (`start_codiemb`)."""
    began = time.monotonic()
    process = start_codiemb(args, root / "output.log", start, fsync_stretch)
    try:
        code = process.wait(timeout=COMMAND_TIMEOUT_S)
    finally:
        if process.poll() is None:
            _signal_group(process, signal.SIGKILL)
            process.wait()
    return code, time.monotonic() - began


def preload() -> None:
    """Import what `codiemb fit`, `fuse` and `sweep` import (their modules load lazily), once, in this process, and
    keep torch to one thread: every forked run then starts where a fresh interpreter would be after its imports,
    and a fork after a multi-threaded OpenMP region is avoided."""
    import importlib

    import torch

    torch.set_num_threads(1)
    from codiemb_pl.cli.main import project_command

    for command in ("fuse", "sweep"):
        project_command(command)
    for module in PRELOADED:
        importlib.import_module(module)


def stretch_fsync(seconds: float = FSYNC_STRETCH_S) -> None:
    """Make every `os.fsync` of this process take `seconds` longer, as on a slow network filesystem. Every write
    of the project flushes its temporary before renaming it into place, so each temporary then lives long
    enough for the 1 ms poll to see it: a small JSON record is otherwise written and renamed within
    microseconds, and a kill could never be aimed inside it. The files and their order are unchanged."""
    real = os.fsync

    def fsync(descriptor: int) -> None:
        real(descriptor)
        time.sleep(seconds)

    os.fsync = fsync


SPAWN_SCRIPT = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); "
                "import kill_anywhere; kill_anywhere.stretch_fsync(float(sys.argv.pop(1))); "
                "from codiemb_pl.cli.main import main; sys.exit(main(sys.argv[1:]))")


class Forked:
    """A `codiemb` run in a forked child of this (preloaded) process: the `subprocess.Popen` calls used here."""

    def __init__(self, args: list[str], log: Path, fsync_stretch: float):
        log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        sys.stdout.flush()
        sys.stderr.flush()
        self.returncode: Optional[int] = None
        self.pid = os.fork()
        if self.pid == 0:   # the child: its own process group (killed as one), output to the log, never returns
            code = 1
            try:
                os.setsid()
                os.dup2(log_fd, 1)
                os.dup2(log_fd, 2)
                sys.stdout = open(1, "w", buffering=1, closefd=False)
                sys.stderr = open(2, "w", buffering=1, closefd=False)
                stretch_fsync(fsync_stretch)
                from codiemb_pl.cli.main import main

                code = main(args)
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else 1
            except BaseException:  # noqa: BLE001 - report it in the log, exit non-zero
                import traceback

                traceback.print_exc()
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        os.close(log_fd)

    def poll(self) -> Optional[int]:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"a forked codiemb run took over {timeout} s")
            time.sleep(0.01)
        return self.returncode


def start_codiemb(args: list[str], log: Path, start: str, fsync_stretch: float = FSYNC_STRETCH_S):
    """Start `codiemb ARGS` in its own process group, output appended to `log`, fsync stretched (`stretch_fsync`):
    `fork` (a child of this process, `preload`ed: no interpreter start, so a uniform moment lands in the run, not
    in its imports) or `spawn` (a fresh interpreter, as a user starts `codiemb`)."""
    if start == "fork":
        return Forked(args, log, fsync_stretch)
    with open(log, "ab") as output:
        return subprocess.Popen([sys.executable, "-c", SPAWN_SCRIPT, str(fsync_stretch), *args], cwd=REPO_ROOT,
                                env=subprocess_env(),
                                stdout=output, stderr=subprocess.STDOUT, start_new_session=True)


# ----------------------------------------------------------------------------------------------------
# watching a run and killing it
# ----------------------------------------------------------------------------------------------------

WRITE_KINDS = ("checkpoint", "export", "snapshot or merge", "record", "lock file", "other write")


def write_kind(relative: str) -> str:
    """The kind of write a temporary (a path relative to the run folder) belongs to: a Lightning `checkpoint`,
    an `export` (a sentence-transformers folder: `model/`, `fusion/model/`, `fused/`), a `snapshot or merge`
    (`.safetensors`: CheckpointFusion snapshots, θ0, merge candidates), a `record` (JSON / markdown / YAML / CSV:
    `sweep_run.json`, leaderboards, `merge.json`, `config.yaml`, the logger's files), the `lock file`, or an
    `other write`."""
    name = Path(relative).name
    if LOCK_TEMPORARY.match(name) or name.startswith(LOCK_NAME):
        return "lock file"
    final = final_name(name) or name
    if final.endswith(".ckpt"):
        return "checkpoint"
    if final in EXPORT_NAMES:
        return "export"
    if final.endswith(".safetensors"):
        return "snapshot or merge"
    if final.endswith((".json", ".md", ".yaml", ".csv")):
        return "record"
    return "other write"


def is_temporary(name: str) -> bool:
    """The project's temporary names (`atomic.TEMPORARY_NAME`) and the run lock's own."""
    return TEMPORARY_NAME.match(name) is not None or LOCK_TEMPORARY.match(name) is not None


def find_temporaries(root: Path) -> list[str]:
    """Temporary entries under `root` (relative paths); not looking inside them or other hidden folders."""
    found: list[str] = []
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:   # removed or renamed while we looked
            continue
        for entry in entries:
            if entry.name.startswith("."):
                if is_temporary(entry.name):
                    found.append(os.path.relpath(entry.path, root))
            elif entry.is_dir(follow_symlinks=False):
                stack.append(Path(entry.path))
    return sorted(found)


@dataclass
class KillPlan:
    mode: str                       # "save" or "uniform"
    at_seconds: float = 0.0         # uniform: when
    save_index: int = 1             # save: inside the k-th temporary seen (1-based) of `kind`
    kind: Optional[str] = None      # save: a `write_kind` (None: any)

    def counts(self, temporary: str) -> bool:
        return self.kind is None or write_kind(temporary) == self.kind


@dataclass
class Watched:
    exit_code: Optional[int]        # None: killed
    seconds: float                  # wall time until the end or the kill
    temporaries: list[tuple[float, str]]   # every temporary seen, with when it was first seen
    killed_at: Optional[float] = None
    existing_temporaries: list[str] = field(default_factory=list)   # at the kill (process stopped)
    existing_artefacts: list[str] = field(default_factory=list)
    late_stops: int = 0             # save mode: stops that came after the temporary was gone (resumed)


def subprocess_env() -> dict[str, str]:
    """One thread (deterministic, and both cores stay shared), offline, this checkout first on the path."""
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline",
                TOKENIZERS_PARALLELISM="false")


def _signal_group(process: subprocess.Popen, signum: int) -> bool:
    try:
        os.killpg(process.pid, signum)
        return True
    except ProcessLookupError:
        return False


def watch_run(args: list[str], root: Path, log: Path, plan: Optional[KillPlan], how: str,
              fsync_stretch: float = FSYNC_STRETCH_S) -> Watched:
    """Run `codiemb ARGS` in its own process group (`start_codiemb(how)`), polling `root` for temporaries; with a
    plan, stop it at the planned moment, list what exists, and SIGKILL the group. Without one, let it finish."""
    seen: dict[str, float] = {}
    late = 0
    start = time.monotonic()
    process = start_codiemb(args, log, how, fsync_stretch)
    try:
        while process.poll() is None:
            now = time.monotonic() - start
            if now > COMMAND_TIMEOUT_S:
                raise TimeoutError(f"codiemb {args[0]} ran over {COMMAND_TIMEOUT_S} s")
            current = find_temporaries(root)
            for name in current:
                seen.setdefault(name, now)
            due = plan is not None and (now >= plan.at_seconds if plan.mode == "uniform" else (
                any(map(plan.counts, current)) and sum(map(plan.counts, seen)) >= plan.save_index))
            if due and _signal_group(process, signal.SIGSTOP):
                stopped_at = time.monotonic() - start
                existing = find_temporaries(root)
                if plan.mode == "save" and not any(map(plan.counts, existing)):   # that save ended before the stop
                    late += 1
                    _signal_group(process, signal.SIGCONT)
                    continue
                artefacts = inventory(root)
                _signal_group(process, signal.SIGKILL)
                process.wait()
                return Watched(None, stopped_at, sorted((t, n) for n, t in seen.items()), stopped_at, existing,
                               artefacts, late)
            time.sleep(POLL_S)
    finally:
        if process.poll() is None:
            _signal_group(process, signal.SIGKILL)
            process.wait()
    return Watched(process.returncode, time.monotonic() - start, sorted((t, n) for n, t in seen.items()),
                   late_stops=late)


def inventory(root: Path) -> list[str]:
    """The final artefacts present (relative paths): checkpoints, exports, weight and JSON files, the lock."""
    found = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if any(part.startswith(".") and part != LOCK_NAME for part in relative.parts):
            continue
        if any(part in EXPORT_NAMES for part in relative.parts[:-1]):   # an export counts as one artefact
            continue
        if path.name in EXPORT_NAMES and path.is_dir() or path.suffix in (".ckpt", ".safetensors", ".json") \
                or path.name == LOCK_NAME:
            found.append(str(relative))
    return found


def draw_plan(rng: random.Random, mode: str, ref: Reference, seconds: float, turn: int) -> KillPlan:
    """A uniform moment in [0, `seconds`) (how long a full run takes now), or inside the k-th write of one kind:
    the kinds the reference showed (`write_kind`) take turns (`turn`), so brief writes (a run record, the lock)
    get their share beside long ones, and k is uniform over the reference's writes of that kind."""
    if mode == "uniform":
        return KillPlan("uniform", at_seconds=rng.uniform(0.0, seconds))
    kinds = Counter(write_kind(name) for _, name in ref.temporaries)
    if not kinds:
        return KillPlan("save", save_index=1)
    kind = sorted(kinds, key=WRITE_KINDS.index)[turn % len(kinds)]
    return KillPlan("save", save_index=rng.randint(1, kinds[kind]), kind=kind)


# ----------------------------------------------------------------------------------------------------
# checking what a run left
# ----------------------------------------------------------------------------------------------------

def load_checkpoint(path: Path) -> dict[str, Any]:
    """A `.ckpt` file through the project's loading rule (zip CRCs checked, weights-only unpickling)."""
    from codiemb_pl.storage.checkpoint_loading import load_checkpoint_file

    return load_checkpoint_file(path)


def check_export(folder: Path) -> Optional[str]:
    """None if `folder` loads as a sentence-transformers model giving finite embeddings, else why not."""
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()   # one "Loading weights" bar per export would flood the log
    if not (folder / "modules.json").is_file():
        return "has no modules.json (a partial export under its final name)"
    try:
        model = SentenceTransformer(str(folder), device="cpu")
        embeddings = model.encode(SAMPLE_TEXTS, convert_to_tensor=True)
    except Exception as error:  # noqa: BLE001 - any failure to load is the finding
        return f"does not load ({type(error).__name__}: {' '.join(str(error).split())[:200]})"
    if embeddings.shape[0] != len(SAMPLE_TEXTS) or not bool(torch.isfinite(embeddings).all()):
        return "gives non-finite embeddings"
    return None


def check_file(path: Path) -> Optional[str]:
    """None if the artefact file `path` is complete by its kind, else why not."""
    import yaml

    from codiemb_pl.training.checkpoint_io import checkpoint_folder_problem
    from codiemb_pl.storage.run_lock import Holder
    from codiemb_pl.storage.weight_checks import load_safetensors

    try:
        if path.suffix == ".ckpt" and path.is_dir():
            return checkpoint_folder_problem(path)
        if path.suffix == ".ckpt":
            checkpoint = load_checkpoint(path)
            if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
                return "is not a Lightning checkpoint"
        elif path.suffix == ".safetensors":
            load_safetensors(path)   # the layout checked, every tensor finite
        elif path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix == ".yaml":
            if yaml.safe_load(path.read_text(encoding="utf-8")) is None:
                return "is empty"
        elif path.name == LOCK_NAME:
            if Holder.from_text(path.read_text(encoding="utf-8")) is None:
                return "does not name a holder"
        elif path.suffix == ".md":
            if not path.read_text(encoding="utf-8").strip():
                return "is empty"
        elif path.suffix == ".csv":
            return csv_problem(path)
    except Exception as error:  # noqa: BLE001 - any failure to read is the finding
        return f"does not load ({type(error).__name__}: {' '.join(str(error).split())[:200]})"
    return None


def set_aside(name: str) -> Optional[str]:
    """NAME for `.NAME.old-XXXX`, the previous version of NAME set aside while a new one replaces it."""
    match = TEMPORARY_NAME.match(name)
    return match.group("name") if match and name.startswith(f".{match.group('name')}.old-") else None


def csv_problem(path: Path) -> Optional[str]:
    """None if `path` is a CSV file whose every row has its header's fields (a logger's `metrics.csv`)."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        return "is empty"
    short = [number for number, row in enumerate(rows[1:], 2) if len(row) != len(rows[0])]
    return f"has {len(short)} row(s) cut short, e.g. line {short[0]}" if short else None


def check_artefacts(root: Path, finished: bool, entry: str) -> list[tuple[str, str]]:
    """(kind, message) for every final artefact under `root` that is not complete, or lost: its name absent while
    its previous version lies set aside (`.NAME.old-*`). `finished`: the run ended normally, so what it must
    leave is there, and no temporary or lock is left."""
    problems: list[tuple[str, str]] = []
    for folder, folders, files in os.walk(root):
        folder_path = Path(folder)
        relative = folder_path.relative_to(root)
        for name in folders + files:
            previous = set_aside(name)
            if previous and not (folder_path / previous).exists():
                problems.append(("lost", f"{relative / previous} is absent, its previous version set aside as {name}"))
        for name in list(folders):
            path = folder_path / name
            if name.startswith("."):
                folders.remove(name)
                if finished:
                    problems.append(("left behind", f"{relative / name} (a temporary folder)"))
            elif name in EXPORT_NAMES:
                folders.remove(name)
                why = check_export(path)
                if why:
                    problems.append(("partial artefact", f"{relative / name} {why}"))
            elif name.endswith(".ckpt"):
                folders.remove(name)
                why = check_file(path)
                if why:
                    problems.append(("partial artefact", f"{relative / name} {why}"))
        for name in files:
            path = folder_path / name
            if name == "output.log":
                continue
            if name.startswith(".") and name != LOCK_NAME:
                if finished:
                    problems.append(("left behind", f"{relative / name}"))
                continue
            if finished and name == LOCK_NAME:
                problems.append(("left behind", f"{relative / name} (the run lock)"))
            why = check_file(path)
            if why:
                problems.append(("partial artefact", f"{relative / name} {why}"))
    if finished:
        for pattern in REQUIRED[entry]:
            if not list(root.glob(pattern)):
                problems.append(("missing after re-run", pattern))
    return problems


# ----------------------------------------------------------------------------------------------------
# comparing a re-run with the uninterrupted reference
# ----------------------------------------------------------------------------------------------------

def weight_tensors(path: Path) -> dict[str, Any]:
    """The tensors that must match: a safetensors file's, or a checkpoint's state_dict and optimizer state."""
    from safetensors.torch import load_file

    if path.suffix == ".safetensors":
        return load_file(str(path))
    checkpoint = load_checkpoint(path)
    tensors = {f"state_dict/{key}": value for key, value in checkpoint["state_dict"].items()}
    for index, optimizer in enumerate(checkpoint.get("optimizer_states", [])):
        for parameter, values in optimizer.get("state", {}).items():
            for key, value in values.items():
                tensors[f"optimizer{index}/{parameter}/{key}"] = value
    tensors["global_step"] = checkpoint.get("global_step")
    return tensors


def compare_with_reference(root: Path, ref_root: Path) -> list[tuple[str, str]]:
    """(kind, message) for every difference of the re-run's results from the reference run's: the set of final
    files, each weight file's tensors (exactly), every other file of an export and the leaderboards."""
    import torch

    def finals(folder: Path) -> set[str]:
        """The files to compare: not the logs (a resumed run writes a new `logs/version_N`) or `config.yaml`."""
        return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != "output.log"
                and not any(part.startswith(".") or part == "logs" for part in p.relative_to(folder).parts)
                and p.name != "config.yaml"}

    problems = []
    mine, theirs = finals(root), finals(ref_root)
    if mine != theirs:
        extra, missing = sorted(mine - theirs), sorted(theirs - mine)
        problems.append(("differs from uninterrupted", f"files: extra {extra[:4]}, missing {missing[:4]}"))
    for name in sorted(mine & theirs):
        path, ref_path = root / name, ref_root / name
        if path.suffix in (".ckpt", ".safetensors"):
            a, b = weight_tensors(path), weight_tensors(ref_path)
            differing = [key for key in b if key not in a or not (
                torch.equal(a[key], b[key]) if isinstance(b[key], torch.Tensor) else a[key] == b[key])]
            if differing or a.keys() != b.keys():
                problems.append(("differs from uninterrupted", f"{name}: {len(differing)} of {len(b)} tensors "
                                                               f"differ, e.g. {differing[:2]}"))
        elif path.suffix in (".json", ".md", ".txt") or any(part in EXPORT_NAMES for part in Path(name).parts):
            text = path.read_bytes().replace(str(root).encode(), str(ref_root).encode())
            if text != ref_path.read_bytes():
                problems.append(("differs from uninterrupted", f"{name}: content differs"))
    return problems


# ----------------------------------------------------------------------------------------------------
# one trial
# ----------------------------------------------------------------------------------------------------

@dataclass
class Trial:
    entry: str
    index: int
    seed: int
    mode: str
    target: Optional[str] = None    # save mode: the kind of write aimed at (`write_kind`)
    attempts: int = 0
    killed: bool = False
    killed_at: Optional[float] = None
    inside_save: bool = False
    temporaries: list[str] = field(default_factory=list)
    artefacts: list[str] = field(default_factory=list)
    late_stops: int = 0
    rerun_code: Optional[int] = None
    rerun_seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "Trial":
        """A trial read back from `--record`'s JSON (lists for tuples)."""
        return cls(**{**record, "failures": [tuple(failure) for failure in record.get("failures", [])]})

    @property
    def outcome(self) -> str:
        if not self.killed:
            return "not killed"
        return "ok" if not self.failures else "; ".join(f"{kind}: {message}" for kind, message in self.failures)


def run_trial(workspace: Workspace, entry: str, index: int, seed: int, mode: Optional[str] = None,
              compare: bool = True, plan: Optional[KillPlan] = None) -> Trial:
    """Kill `entry` at a seeded moment (`mode`: save / uniform, default alternating by `index`), check what it
    left, re-run it, check again and compare with the reference run (`compare`).

    The moment is drawn from the reference run (its temporaries; for a time, the latest full run's duration:
    an attempt that ends before its moment is drawn again, up to `MAX_ATTEMPTS`), or given as `plan` (then no
    reference is needed unless `compare`; a retry halves it)."""
    mode = plan.mode if plan is not None else (mode or MODES[index % 2])
    trial = Trial(entry, index, seed, mode)
    ref = reference(workspace, entry) if compare or plan is None else None
    rng = random.Random(f"{entry}:{seed}:{index}")
    root = workspace.folder / "trials" / f"{entry}-{index:03d}-seed{seed}"
    chosen = plan
    for attempt in range(1, MAX_ATTEMPTS + 1):
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        trial.attempts = attempt
        if plan is None:
            chosen = draw_plan(rng, mode, ref, workspace.durations.get(entry, ref.seconds), index // 2)
        elif attempt > 1:   # the command ended before the given moment
            chosen = KillPlan(mode, chosen.at_seconds / 2, max(1, chosen.save_index // 2), chosen.kind)
        watched = watch_run(workspace.command(entry, root), root, root / "output.log", chosen, workspace.start,
                            workspace.fsync_stretch)
        if watched.killed_at is not None:
            break
        workspace.durations[entry] = watched.seconds   # it ran to its end: the next draw knows the pace now
    trial.target = chosen.kind if chosen is not None and chosen.mode == "save" else None
    trial.killed = watched.killed_at is not None
    trial.killed_at, trial.late_stops = watched.killed_at, watched.late_stops
    trial.temporaries, trial.artefacts = watched.existing_temporaries, watched.existing_artefacts
    trial.inside_save = bool(watched.existing_temporaries)
    if not trial.killed:
        return trial
    trial.failures += check_artefacts(root, finished=False, entry=entry)
    trial.rerun_code, trial.rerun_seconds = run_codiemb(workspace.command(entry, root, rerun=True), root,
                                                            workspace.start, workspace.fsync_stretch)
    if trial.rerun_code != 0:
        refusal = error_line(root / "output.log")
        trial.failures.append(("re-run refused", refusal) if trial.rerun_code == 2 and refusal else
                              ("re-run failed", f"exit code {trial.rerun_code}, see {root / 'output.log'}"))
        return trial
    trial.failures += check_artefacts(root, finished=True, entry=entry)
    if compare:
        trial.failures += compare_with_reference(root, ref.root)
    return trial


def error_line(log: Path) -> Optional[str]:
    """The last `codiemb: error: ...` line of a run's output (the CLI's one-line refusal), if any."""
    lines = [line for line in log.read_text(encoding="utf-8", errors="replace").splitlines()
             if line.startswith("codiemb: error: ")]
    return lines[-1] if lines else None


# ----------------------------------------------------------------------------------------------------
# the table
# ----------------------------------------------------------------------------------------------------

def summary_rows(trials: list[Trial]) -> list[dict[str, Any]]:
    rows = []
    for entry in ENTRY_POINTS:
        mine = [t for t in trials if t.entry == entry]
        if not mine:
            continue
        killed = [t for t in mine if t.killed]
        kinds = Counter(kind for t in killed for kind in {kind for kind, _ in t.failures})   # trials per kind
        rows.append({"entry": entry, "trials": len(mine), "killed": len(killed),
                     "save_mode": sum(t.mode == "save" for t in killed),
                     "inside_save": sum(t.inside_save for t in killed),
                     "rerun_ok": sum(t.rerun_code == 0 for t in killed),
                     "ok": sum(not t.failures for t in killed),
                     "failures": ", ".join(f"{kind} ×{count}" for kind, count in sorted(kinds.items())) or "none"})
    return rows


def kill_place(trial: Trial) -> str:
    """Where the kill landed: the kind of write in progress (`write_kind`), or between writes / before the first
    output."""
    for name in trial.temporaries:
        return write_kind(name)
    return "between writes" if trial.artefacts else "before any output"


def places_table(trials: list[Trial]) -> str:
    """Kills per entry point and place (`kill_place`)."""
    killed = [t for t in trials if t.killed]
    places = list(WRITE_KINDS) + ["between writes", "before any output"]
    counts = Counter((t.entry, kill_place(t)) for t in killed)
    used = [place for place in places if any(counts[(entry, place)] for entry in ENTRY_POINTS)]
    lines = ["| entry point | " + " | ".join(used) + " |", "|---|" + "---:|" * len(used)]
    for entry in ENTRY_POINTS:
        if any(t.entry == entry for t in killed):
            lines.append(f"| `codiemb {entry}` | " + " | ".join(str(counts[(entry, place)]) for place in used) + " |")
    return "\n".join(lines)


def summary_table(trials: list[Trial]) -> str:
    lines = ["| entry point | trials | killed | kills inside a save | re-run exit 0 | all checks pass | failures |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for row in summary_rows(trials):
        lines.append(f"| `codiemb {row['entry']}` | {row['trials']} | {row['killed']} | {row['inside_save']} | "
                     f"{row['rerun_ok']} | {row['ok']} | {row['failures']} |")
    return "\n".join(lines)


def trial_line(trial: Trial) -> str:
    moment = f"{trial.killed_at:6.2f} s" if trial.killed_at is not None else "   -    "
    existed = ", ".join(trial.temporaries) or (f"(no temporary; {len(trial.artefacts)} artefacts: "
                                               f"{', '.join(trial.artefacts[-3:])})")
    aim = f" ({trial.target})" if trial.target else ""
    return (f"{trial.entry:5s} #{trial.index:02d} seed {trial.seed} {trial.mode}{aim} try {trial.attempts} "
            f"kill at {moment} | {existed} | re-run {trial.rerun_code} in {trial.rerun_seconds:.1f} s | "
            f"{trial.outcome}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=30, help="trials per entry point (half of them in a save)")
    parser.add_argument("--entry", action="append", choices=ENTRY_POINTS, help="entry point(s); default all")
    parser.add_argument("--index", type=int, action="append",
                        help="run only these trial numbers (e.g. a failed trial again, after its fix)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps of the fit (a checkpoint every half)")
    parser.add_argument("--start", choices=STARTS, default="fork",
                        help="fork: every run a child of this preloaded process (default; no interpreter start, so "
                             "uniform moments land in the run); spawn: a fresh `python -m codiemb_pl` each")
    parser.add_argument("--workdir", help="where runs go (default: a new temporary folder, removed at the end)")
    parser.add_argument("--record", help="write every trial as JSON here")
    parser.add_argument("--table-from", help="print the tables of a --record file and stop")
    args = parser.parse_args(argv)
    if args.table_from:
        trials = [Trial.from_record(record) for record in json.loads(Path(args.table_from).read_text())]
        print(f"{summary_table(trials)}\n\nwhere the kills landed\n{places_table(trials)}")
        return 0
    folder = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="kill_anywhere-"))
    workspace = prepare_workspace(folder, steps=args.steps, start=args.start)
    trials: list[Trial] = []
    started = time.monotonic()
    try:
        for entry in args.entry or ENTRY_POINTS:
            ref = reference(workspace, entry)
            print(f"[kill_anywhere] {entry}: reference run {ref.seconds:.1f} s, {len(ref.temporaries)} temporaries "
                  f"seen", flush=True)
            for index in args.index or range(args.trials):
                trial = run_trial(workspace, entry, index, args.seed)
                trials.append(trial)
                print(trial_line(trial), flush=True)
                if trial.failures:   # keep the evidence
                    continue
                shutil.rmtree(workspace.folder / "trials" / f"{entry}-{index:03d}-seed{args.seed}", ignore_errors=True)
    finally:
        if args.record:
            Path(args.record).write_text(json.dumps([dataclasses.asdict(t) for t in trials], indent=1) + "\n")
        print(f"\n{summary_table(trials)}\n\nwhere the kills landed\n{places_table(trials)}\n\n"
              f"{len(trials)} trials in {(time.monotonic() - started) / 60:.1f} min, "
              f"seed {args.seed}, fit of {args.steps} steps, runs started by {args.start}, poll every "
              f"{POLL_S * 1000:.0f} ms; runs in {folder}",
              flush=True)
    failed = any(t.failures for t in trials)
    if not args.workdir and not failed:
        shutil.rmtree(folder, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
