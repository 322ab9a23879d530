"""Kill anywhere (issue 27, item 2): SIGKILL `codiemb fit`, `fuse` and `sweep` at random moments and re-run them.

    python benchmarks/kill_anywhere.py                        # 30 trials per entry point, prints the table
    python benchmarks/kill_anywhere.py --trials 4 --entry fit --workdir /tmp/kills --seed 1

Each entry point runs on a tiny random BERT (2 layers, hidden 32) with the package's demo data:

- `fit`: 4 optimizer steps, validation every 2 (two `step*.ckpt` and `last.ckpt`), `ExportEncoder` (`model/`)
  and `CheckpointFusion` (snapshots every 2 steps, best and last; uniform soup and TIES; `fusion/model/`);
- `fuse`: TIES of `last.ckpt`, a snapshot and the export of the reference fit, scored on the demo dev sets;
- `sweep`: two runs of that fit config (another sampler policy, another learning rate), fused (`model/`).

A trial starts the command in a fresh folder and stops it (SIGSTOP, so what exists at that instant can be
listed, then SIGKILL to the whole process group) at one of two kinds of moment, alternating by trial:

- `uniform`: a time drawn uniformly between the start and the duration of the latest full run (the
  reference, or an attempt that ended before its moment: the shared machine's pace changes);
- `save`: while a temporary exists. The run folder is polled every `POLL_S` for the project's temporaries
  (`atomic.TEMPORARY_NAME`: `.NAME.tmp-*` files and staging folders, `.NAME.old-*`; and the run lock's
  `.codiemb.lock.*.tmp` / `.takeover-*`); the kill lands inside the k-th of them, k drawn uniformly from
  the count the reference run showed. If that temporary is gone once the process is stopped (the save
  ended between the poll and the stop) the process continues and the next one is taken. No test hook: the
  files observed are the real ones.

If the command ends before its moment (a uniform time beyond a faster run), the trial draws again (up to 5
attempts, recorded). After the kill, every final artefact must be absent or complete: `*.ckpt` load with
the project's safe loader, exports (`model/`, `fusion/model/`, `fused/`) load with
`sentence_transformers.SentenceTransformer` and give finite embeddings, `*.safetensors` load and are
finite, JSON / YAML parse, the lock file names its holder. Then the same command runs again (`fit` with
`--ckpt_path last`) and must exit 0 (taking over the killed run's lock), leave every final artefact,
no temporary and no lock behind, and end with the uninterrupted reference run's results: every weight
file (checkpoint `state_dict` and optimizer state, exports, snapshots, merges) equal tensor by tensor
(`torch.equal`: exact, not to a tolerance), every other file of an export and the leaderboards equal
once the run folder's path is replaced by the reference's.

The functions are also what `tests/test_kill_anywhere.py` runs (three seeded trials).
"""

from __future__ import annotations

import argparse
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

from codiemb_pl.storage.atomic import TEMPORARY_NAME  # noqa: E402
from codiemb_pl.storage.run_lock import LOCK_NAME, LOCK_TEMPORARY  # noqa: E402

ENTRY_POINTS = ("fit", "fuse", "sweep")
MODES = ("save", "uniform")
POLL_S = 0.001
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
            "enable_model_summary": False, "logger": False,
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


def prepare_workspace(folder: Path, model: Optional[Path] = None, steps: int = 4) -> Workspace:
    """Write the configs into `folder` (and a tiny random BERT when `model` is None); no run yet."""
    folder.mkdir(parents=True, exist_ok=True)
    if model is None:
        sys.path.insert(0, str(REPO_ROOT / "tests"))
        from conftest import build_tiny_bert

        model = folder / "tiny_bert"
        if not (model / "model.safetensors").is_file():
            build_tiny_bert(model)
    workspace = Workspace(folder, Path(model), steps)
    write_yaml(workspace.fit_config_path, fit_config(workspace.model, steps))
    write_yaml(folder / "sweep.yaml", sweep_file())
    return workspace


def reference(workspace: Workspace, entry: str, in_process: bool = False) -> Reference:
    """The uninterrupted run of `entry`, run once (`fuse` needs the fit's first): a watched subprocess, whose
    duration and temporaries the kill moments are drawn from, or (`in_process`, the tests' way, for trials
    with their own `KillPlan`) a `codiemb_pl.cli.main` call."""
    if entry in workspace.references:
        return workspace.references[entry]
    if entry == "fuse":
        fit_run = reference(workspace, "fit", in_process).root
        write_yaml(workspace.folder / "fuse.yaml", fuse_recipe(workspace.model, fit_run))
    root = workspace.folder / "reference" / entry
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    if in_process:
        code, seconds = run_codiemb(workspace.command(entry, root), root, in_process=True)
        temporaries: list[tuple[float, str]] = []
    else:
        watched = watch_run(workspace.command(entry, root), root, root / "output.log", plan=None)
        code, seconds, temporaries = watched.exit_code, watched.seconds, watched.temporaries
    if code != 0:
        raise RuntimeError(f"the reference {entry} failed ({code}); see {root / 'output.log'}")
    problems = check_artefacts(root, finished=True, entry=entry)
    if problems:
        raise RuntimeError(f"the reference {entry} is not sound: {problems}")
    workspace.references[entry] = Reference(root, seconds, temporaries)
    return workspace.references[entry]


def run_codiemb(args: list[str], root: Path, in_process: bool) -> tuple[int, float]:
    """`codiemb ARGS` to the end: (exit code, seconds). A subprocess as a user runs it (output appended to
    `root/output.log`), or in this process (one torch thread, as the subprocesses: the same numbers)."""
    start = time.monotonic()
    if not in_process:
        with open(root / "output.log", "ab") as log:
            code = subprocess.run([sys.executable, "-m", "codiemb_pl", *args], cwd=REPO_ROOT, env=subprocess_env(),
                                  stdout=log, stderr=subprocess.STDOUT, timeout=COMMAND_TIMEOUT_S).returncode
        return code, time.monotonic() - start
    import torch

    from codiemb_pl.cli.main import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(args)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    finally:
        torch.set_num_threads(threads)
    return code, time.monotonic() - start


# ----------------------------------------------------------------------------------------------------
# watching a run and killing it
# ----------------------------------------------------------------------------------------------------

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
    save_index: int = 1             # save: inside the k-th temporary seen (1-based)


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


def watch_run(args: list[str], root: Path, log: Path, plan: Optional[KillPlan]) -> Watched:
    """Run `codiemb ARGS` in its own process group, polling `root` for temporaries; with a plan, stop it at the
    planned moment, list what exists, and SIGKILL the group. Without one, let it finish."""
    seen: dict[str, float] = {}
    late = 0
    with open(log, "ab") as output:
        start = time.monotonic()
        process = subprocess.Popen([sys.executable, "-m", "codiemb_pl", *args], cwd=REPO_ROOT, env=subprocess_env(),
                                   stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while process.poll() is None:
                now = time.monotonic() - start
                if now > COMMAND_TIMEOUT_S:
                    raise TimeoutError(f"codiemb {args[0]} ran over {COMMAND_TIMEOUT_S} s")
                current = find_temporaries(root)
                for name in current:
                    seen.setdefault(name, now)
                due = plan is not None and (
                    now >= plan.at_seconds if plan.mode == "uniform" else (current and len(seen) >= plan.save_index))
                if due and _signal_group(process, signal.SIGSTOP):
                    stopped_at = time.monotonic() - start
                    existing = find_temporaries(root)
                    if plan.mode == "save" and not existing:   # the save ended before the stop: take the next one
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


def draw_plan(rng: random.Random, mode: str, ref: Reference, seconds: float) -> KillPlan:
    """A uniform moment in [0, `seconds`) (how long a full run takes now), or the k-th of the reference's
    temporaries."""
    if mode == "uniform":
        return KillPlan("uniform", at_seconds=rng.uniform(0.0, seconds))
    return KillPlan("save", save_index=rng.randint(1, max(1, len(ref.temporaries))))


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
    except Exception as error:  # noqa: BLE001 - any failure to read is the finding
        return f"does not load ({type(error).__name__}: {' '.join(str(error).split())[:200]})"
    return None


def check_artefacts(root: Path, finished: bool, entry: str) -> list[tuple[str, str]]:
    """(kind, message) for every final artefact under `root` that is not complete. `finished`: the run ended
    normally, so what it must leave is there, and no temporary or lock is left."""
    problems: list[tuple[str, str]] = []
    for folder, folders, files in os.walk(root):
        folder_path = Path(folder)
        relative = folder_path.relative_to(root)
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
        return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != "output.log"
                and not any(part.startswith(".") for part in p.relative_to(folder).parts)
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
              compare: bool = True, plan: Optional[KillPlan] = None, in_process: bool = False) -> Trial:
    """Kill `entry` at a seeded moment (`mode`: save / uniform, default alternating by `index`), check what it
    left, re-run it, check again and compare with the reference run (`compare`).

    The moment is drawn from the reference run (its temporaries; for a time, the latest full run's duration:
    an attempt that ends before its moment is drawn again, up to `MAX_ATTEMPTS`), or given as `plan` (then no
    reference is needed unless `compare`; a retry halves it). `in_process`: the re-run and the reference run in
    this process (the tests' way: no second interpreter start); the killed run is always a subprocess."""
    mode = plan.mode if plan is not None else (mode or MODES[index % 2])
    trial = Trial(entry, index, seed, mode)
    ref = reference(workspace, entry, in_process) if compare or plan is None else None
    rng = random.Random(f"{entry}:{seed}:{index}")
    root = workspace.folder / "trials" / f"{entry}-{index:03d}-seed{seed}"
    chosen = plan
    for attempt in range(1, MAX_ATTEMPTS + 1):
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        trial.attempts = attempt
        if plan is None:
            chosen = draw_plan(rng, mode, ref, workspace.durations.get(entry, ref.seconds))
        elif attempt > 1:   # the command ended before the given moment
            chosen = KillPlan(mode, chosen.at_seconds / 2, max(1, chosen.save_index // 2))
        watched = watch_run(workspace.command(entry, root), root, root / "output.log", chosen)
        if watched.killed_at is not None:
            break
        workspace.durations[entry] = watched.seconds   # it ran to its end: the next draw knows the pace now
    trial.killed = watched.killed_at is not None
    trial.killed_at, trial.late_stops = watched.killed_at, watched.late_stops
    trial.temporaries, trial.artefacts = watched.existing_temporaries, watched.existing_artefacts
    trial.inside_save = bool(watched.existing_temporaries)
    if not trial.killed:
        return trial
    trial.failures += check_artefacts(root, finished=False, entry=entry)
    trial.rerun_code, trial.rerun_seconds = run_codiemb(workspace.command(entry, root, rerun=True), root, in_process)
    if trial.rerun_code != 0:
        trial.failures.append(("re-run failed", f"exit code {trial.rerun_code}, see {root / 'output.log'}"))
        return trial
    trial.failures += check_artefacts(root, finished=True, entry=entry)
    if compare:
        trial.failures += compare_with_reference(root, ref.root)
    return trial


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


PLACES = (("codiemb.lock", "lock file"), ("sweep_run.json", "run record"), (".ckpt", "checkpoint"),
          ("snapshots", "snapshot"), ("candidates", "merge"), ("leaderboard", "leaderboard"),
          (".model.tmp", "export"), (".fused.tmp", "export"))


def kill_place(trial: Trial) -> str:
    """Where the kill landed: the kind of write in progress, or between writes / before the first output."""
    for name in trial.temporaries:
        return next((place for pattern, place in PLACES if pattern in name), "other write")
    return "between writes" if trial.artefacts else "before any output"


def places_table(trials: list[Trial]) -> str:
    """Kills per entry point and place (`kill_place`)."""
    killed = [t for t in trials if t.killed]
    places = list(dict.fromkeys([place for _, place in PLACES] + ["other write", "between writes",
                                                                   "before any output"]))
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
    return (f"{trial.entry:5s} #{trial.index:02d} seed {trial.seed} {trial.mode:7s} try {trial.attempts} "
            f"kill at {moment} | {existed} | re-run {trial.rerun_code} in {trial.rerun_seconds:.1f} s | "
            f"{trial.outcome}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=30, help="trials per entry point (half of them in a save)")
    parser.add_argument("--entry", action="append", choices=ENTRY_POINTS, help="entry point(s); default all")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps of the fit (a checkpoint every half)")
    parser.add_argument("--workdir", help="where runs go (default: a new temporary folder, removed at the end)")
    parser.add_argument("--record", help="write every trial as JSON here")
    parser.add_argument("--table-from", help="print the tables of a --record file and stop")
    args = parser.parse_args(argv)
    if args.table_from:
        trials = [Trial.from_record(record) for record in json.loads(Path(args.table_from).read_text())]
        print(f"{summary_table(trials)}\n\nwhere the kills landed\n{places_table(trials)}")
        return 0
    folder = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="kill_anywhere-"))
    workspace = prepare_workspace(folder, steps=args.steps)
    trials: list[Trial] = []
    started = time.monotonic()
    try:
        for entry in args.entry or ENTRY_POINTS:
            ref = reference(workspace, entry)
            print(f"[kill_anywhere] {entry}: reference run {ref.seconds:.1f} s, {len(ref.temporaries)} temporaries "
                  f"seen", flush=True)
            for index in range(args.trials):
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
              f"seed {args.seed}, fit of {args.steps} steps, poll every {POLL_S * 1000:.0f} ms; runs in {folder}",
              flush=True)
    failed = any(t.failures for t in trials)
    if not args.workdir and not failed:
        shutil.rmtree(folder, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
