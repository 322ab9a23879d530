"""One writer per run folder (`codiemb_pl.storage.run_lock`): a second `codiemb fit` on a folder a live fit holds
stops with one line naming the holder while the first finishes; a dead holder's lock on this machine is
taken over with a warning; another machine's is refused; a sweep's in-process fits run under the sweep's
lock; the lock is gone after success, bad input and interruption; only global rank 0 takes it; and of
racing processes exactly one gets it."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import yaml

from codiemb_pl.cli.main import main
from codiemb_pl.errors import InputError
from codiemb_pl.storage.run_lock import (LOCK_NAME, Holder, acquire_run_lock, is_global_rank_zero, process_start_ticks,
                                 run_lock)

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
TINY_CONFIG = TESTS_DIR / "conf" / "tiny.yaml"
SMALL_VAL = {"name": "sts_dev", "task": "sts", "path": "pkg://codiemb_pl/demo/sts_dev.jsonl", "max_samples": 8}


class HoldAtTrainStart(pl.Callback):
    """Test callback: when training starts, write `ready` and wait (at most 240 s) until `go` exists."""

    def __init__(self, ready: str, go: str):
        self.ready, self.go = Path(ready), Path(go)

    def on_train_start(self, trainer, pl_module) -> None:
        self.ready.write_text("training")
        deadline = time.monotonic() + 240
        while not self.go.exists() and time.monotonic() < deadline:
            time.sleep(0.05)


class LockProbe(pl.Callback):
    """Test callback: when training starts, record every run lock from the run folder up as {path: holder}."""

    def __init__(self, record: str):
        self.record = Path(record)

    def on_train_start(self, trainer, pl_module) -> None:
        root = Path(trainer.default_root_dir).resolve()
        locks = {str(folder / LOCK_NAME): json.loads((folder / LOCK_NAME).read_text())
                 for folder in [root, *root.parents] if (folder / LOCK_NAME).is_file()}
        self.record.write_text(json.dumps(locks))


def fit_args(model_dir: Path, root: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(TINY_CONFIG), "--model.model_name_or_path", str(model_dir),
            "--trainer.default_root_dir", str(root), "--trainer.max_steps", "1", *extra]


def dead_pid() -> int:
    """The pid of a process that has ended (reaped, so not even a zombie)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def write_lock(folder: Path, **fields) -> Path:
    """A lock file naming a holder like this process, with `fields` changed."""
    folder.mkdir(parents=True, exist_ok=True)
    holder = dataclasses.replace(Holder.this_process("fit", False, command="codiemb fit ..."), **fields)
    (folder / LOCK_NAME).write_text(holder.to_text())
    return folder / LOCK_NAME


def error_lines(captured) -> list[str]:
    return [line for line in captured.err.splitlines() if line.strip()]


@pytest.fixture
def sleeper():
    """A live process on this machine (not this one), stopped after the test."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield process
    process.kill()
    process.wait()


# -- `codiemb fit` ----------------------------------------------------------------------------------------

def test_second_fit_on_a_folder_is_refused_with_one_line_and_the_first_finishes(tiny_model_dir, tmp_path, capsys):
    """The red-team row: two `codiemb fit` on one --trainer.default_root_dir both ran and wrote into it.
    The first one starts on a lock that a killed run left (a dead pid): it takes it over with a warning."""
    root, ready, go = tmp_path / "run", tmp_path / "ready", tmp_path / "go"
    killed = dead_pid()
    write_lock(root, pid=killed, start_ticks=None)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    first = subprocess.Popen([sys.executable, "-m", "codiemb_pl", *fit_args(tiny_model_dir, root, "--data.val=[]"),
                              "--trainer.callbacks+=test_run_lock.HoldAtTrainStart",
                              f"--trainer.callbacks.ready={ready}", f"--trainer.callbacks.go={go}"],
                             cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not ready.exists():
            assert first.poll() is None, first.communicate()[0][-4000:]
            assert time.monotonic() < deadline, "the first fit did not start training in time"
            time.sleep(0.05)
        before = sorted(str(path.relative_to(root)) for path in root.rglob("*"))

        assert main(fit_args(tiny_model_dir, root)) == 2
        lines = error_lines(capsys.readouterr())
        assert len(lines) == 1, lines
        lock = root.resolve() / LOCK_NAME
        assert lines[0].startswith(f"codiemb: error: {root.resolve()}: another run is writing this folder: "
                                   f"`codiemb fit` pid {first.pid} on host {os.uname().nodename} since ")
        assert f"(lock {lock})" in lines[0] and "--trainer.default_root_dir" in lines[0]
        assert sorted(str(path.relative_to(root)) for path in root.rglob("*")) == before   # nothing written
    finally:
        go.write_text("go")
        output = first.communicate(timeout=240)[0]
    assert first.returncode == 0, output[-4000:]
    assert f"codiemb: warning: {root.resolve()}: took over the run lock of `codiemb fit` pid {killed} on host " \
           f"{os.uname().nodename} since " in output and f"(process {killed} has ended)" in output
    import torch

    assert torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 1
    assert not lock.exists(), "the first fit left its lock behind"


def test_lock_from_another_host_is_refused_and_nothing_is_written(tiny_model_dir, tmp_path, capsys):
    root = tmp_path / "run"
    lock = write_lock(root, host="gpu-node-17", pid=4242)
    assert main(fit_args(tiny_model_dir, root)) == 2
    lines = error_lines(capsys.readouterr())
    assert len(lines) == 1, lines
    assert "`codiemb fit` pid 4242 on host gpu-node-17 since " in lines[0]
    assert f"it ran on another host, so it is not taken over" in lines[0]
    assert f"if you know it is no longer running, delete {lock.resolve()}" in lines[0]
    assert sorted(path.name for path in root.iterdir()) == [LOCK_NAME]
    assert "gpu-node-17" in lock.read_text()   # left as it was


def test_lock_is_released_after_an_input_error(tiny_model_dir, tmp_path, capsys):
    """The data is read after the lock is taken (the takeover warning shows it was); the error releases it."""
    root = tmp_path / "run"
    lock = write_lock(root, pid=dead_pid(), start_ticks=None)
    missing = tmp_path / "missing.jsonl"
    assert main(fit_args(tiny_model_dir, root, "--data.train", json.dumps([{"name": "x", "task": "ir",
                                                                              "path": str(missing)}]))) == 2
    err = capsys.readouterr().err
    assert "took over the run lock" in err and str(missing) in err.splitlines()[-1]
    assert not lock.exists()


def test_release_removes_the_folders_the_lock_created_when_left_empty(tmp_path):
    root = tmp_path / "new" / "run"
    with run_lock(root, "fit") as lock:
        assert lock.owned and root.is_dir()
    assert not (tmp_path / "new").exists()
    write_lock(root, host="gpu-node-17")     # a folder that was there before stays
    (root / LOCK_NAME).unlink()
    with run_lock(root, "fit"):
        pass
    assert root.is_dir()


def test_validate_neither_takes_nor_respects_the_lock(tiny_model_dir, tmp_path, capsys):
    """Scoring a checkpoint while its fit goes on is a normal use: validate writes no run outputs."""
    root = tmp_path / "run"
    lock = write_lock(root, host="gpu-node-17", pid=4242)
    assert main(["validate", "--config", str(TINY_CONFIG), "--model.model_name_or_path", str(tiny_model_dir),
                 "--trainer.default_root_dir", str(root), "--data.val", json.dumps([SMALL_VAL])]) == 0
    assert "gpu-node-17" in lock.read_text()


# -- `codiemb sweep` --------------------------------------------------------------------------------------

def test_sweep_fits_run_under_the_sweep_lock_and_every_lock_is_gone_after(tiny_model_dir, tmp_path, capsys):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"overrides": {"trainer.max_steps": 1}, "runs": [{"name": "a"}],
                                     "fusion": {"methods": ["uniform_soup"], "export": "uniform_soup",
                                                "evaluate": False}}))
    out, record = tmp_path / "out", tmp_path / "locks.json"
    assert main(["sweep", "--config", str(TINY_CONFIG), "--sweep", str(sweep), "--output", str(out),
                 "--model.model_name_or_path", str(tiny_model_dir), "--data.val=[]",
                 "--trainer.callbacks+=test_run_lock.LockProbe", f"--trainer.callbacks.record={record}"]) == 0
    seen = json.loads(record.read_text())
    sweep_lock, fit_lock = str(out.resolve() / LOCK_NAME), str(out.resolve() / "runs" / "a" / LOCK_NAME)
    assert set(seen) == {sweep_lock, fit_lock}
    assert (seen[sweep_lock]["kind"], seen[sweep_lock]["tree"], seen[sweep_lock]["pid"]) == ("sweep", True, os.getpid())
    assert (seen[fit_lock]["kind"], seen[fit_lock]["tree"], seen[fit_lock]["pid"]) == ("fit", False, os.getpid())
    assert (out / "model" / "model.safetensors").is_file()
    assert not list(out.rglob(LOCK_NAME + "*"))


def test_boom_on_a_folder_a_live_sweep_holds_is_refused_before_writing(tiny_model_dir, tmp_path, capsys, sleeper):
    out = tmp_path / "out"
    write_lock(out, kind="sweep", tree=True, pid=sleeper.pid, start_ticks=process_start_ticks(sleeper.pid))
    assert main(["boom", "--config", str(TINY_CONFIG), "--fractions", "0.5", "--output", str(out),
                 "--model.model_name_or_path", str(tiny_model_dir)]) == 2
    lines = error_lines(capsys.readouterr())
    assert len(lines) == 1 and f"`codiemb sweep` pid {sleeper.pid} on host" in lines[0] and "--output" in lines[0]
    assert sorted(path.name for path in out.iterdir()) == [LOCK_NAME]


# -- the lock itself --------------------------------------------------------------------------------------

@pytest.mark.parametrize("env, rank_zero", [
    ({}, True), ({"RANK": "0", "LOCAL_RANK": "0"}, True), ({"RANK": "3", "LOCAL_RANK": "0"}, False),
    ({"RANK": "0", "SLURM_PROCID": "2"}, True),            # torchrun's RANK wins over the SLURM task id
    ({"LOCAL_RANK": "1"}, False),                          # a child started by Lightning's DDP launcher
    ({"NODE_RANK": "1", "LOCAL_RANK": "0"}, False), ({"NODE_RANK": "0", "LOCAL_RANK": "0"}, True),
    ({"SLURM_PROCID": "5"}, False), ({"SLURM_PROCID": "0", "LOCAL_RANK": "1"}, False),
    ({"GROUP_RANK": "2", "LOCAL_RANK": "0"}, False), ({"RANK": ""}, True),
])
def test_global_rank_zero_from_the_launcher_environment(env, rank_zero):
    assert is_global_rank_zero(env) is rank_zero


def test_other_ranks_take_no_lock(tmp_path):
    lock = write_lock(tmp_path, host="gpu-node-17", pid=4242)
    with run_lock(tmp_path, "fit", env={"RANK": "1"}) as handle:
        assert not handle.owned
    assert "gpu-node-17" in lock.read_text()


def test_live_holder_on_this_host_is_refused(tmp_path, sleeper):
    write_lock(tmp_path, pid=sleeper.pid, start_ticks=process_start_ticks(sleeper.pid))
    with pytest.raises(InputError, match=rf"pid {sleeper.pid} on host .*wait for it to end or stop it, or use "
                                         r"another --out") as refused:
        acquire_run_lock(tmp_path, "fit", folder_option="--out")
    assert "\n" not in str(refused.value)


def test_the_lock_temporaries_of_killed_runs_are_removed_by_the_next_holder(tmp_path, sleeper):
    """Found by benchmarks/kill_anywhere.py: a run killed while creating its lock (after writing
    `.codiemb.lock.TOKEN.tmp`, before removing it) left that file for good, as one killed during a takeover
    leaves `.codiemb.lock.takeover-TOKEN`. The next holder removes those of dead processes (and unreadable ones:
    the test below); a live process's are its own."""
    def temporary(name: str, **fields) -> Path:
        holder = dataclasses.replace(Holder.this_process("fit", False, command="codiemb fit ..."), **fields)
        path = tmp_path / name.format(token=holder.token)
        path.write_text(holder.to_text())
        return path

    tmp_path.mkdir(exist_ok=True)
    dead = [temporary(f"{LOCK_NAME}.{{token}}.tmp", pid=dead_pid(), start_ticks=None),
            temporary(f"{LOCK_NAME}.takeover-{{token}}", kind="takeover", pid=dead_pid(), start_ticks=None)]
    cut_short = tmp_path / f"{LOCK_NAME}.0123456789abcdef.tmp"
    cut_short.write_text('{"codiemb_run_lock": 1, "ki')
    os.utime(cut_short, (time.time() - 3600, time.time() - 3600))
    live = temporary(f"{LOCK_NAME}.{{token}}.tmp", pid=sleeper.pid, start_ticks=process_start_ticks(sleeper.pid))
    with run_lock(tmp_path, "fit") as handle:
        assert handle.owned
        assert sorted(path.name for path in tmp_path.iterdir()) == sorted([LOCK_NAME, live.name])
    assert not any(path.exists() for path in dead + [cut_short])


def test_reused_pid_is_taken_over(tmp_path, sleeper):
    """The pid is alive but started at another time than the holder: another process got the pid."""
    write_lock(tmp_path, pid=sleeper.pid, start_ticks=process_start_ticks(sleeper.pid) - 1)
    warnings: list[str] = []
    with run_lock(tmp_path, "fit", warn=warnings.append) as handle:
        assert handle.owned and Holder.from_text((tmp_path / LOCK_NAME).read_text()).pid == os.getpid()
    assert len(warnings) == 1 and f"pid {sleeper.pid} now belongs to another process" in warnings[0]
    assert not (tmp_path / LOCK_NAME).exists()


@pytest.mark.parametrize("change, reason", [({"pid_namespace": 1}, "another container on this host"),
                                            ({"boot_id": "0000"}, "this host before a reboot")])
def test_same_host_name_in_another_container_or_boot_is_not_taken_over(tmp_path, change, reason):
    if Holder.this_process("fit", False).boot_id is None:
        pytest.skip("no /proc on this platform")
    write_lock(tmp_path, pid=dead_pid(), start_ticks=None, **change)
    with pytest.raises(InputError, match=reason):
        acquire_run_lock(tmp_path, "fit")


def test_requeued_slurm_job_takes_over_its_earlier_incarnation_on_another_host(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_CLUSTER_NAME", "hpc")
    monkeypatch.setenv("SLURM_JOB_ID", "5150")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    for job, restart in (("hpc:5150", 1), ("hpc:5151", 0), ("other:5150", 0)):   # the same incarnation, other jobs
        write_lock(tmp_path, host="gpu-node-17", pid=4242, slurm_job=job, slurm_restart=restart)
        with pytest.raises(InputError, match="another host"):
            acquire_run_lock(tmp_path, "fit")
    write_lock(tmp_path, host="gpu-node-17", pid=4242, slurm_job="hpc:5150", slurm_restart=0)
    warnings: list[str] = []
    with run_lock(tmp_path, "fit", warn=warnings.append):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["slurm_restart"] == 1
    assert len(warnings) == 1 and "(SLURM job hpc:5150 was requeued since)" in warnings[0]


def test_unreadable_lock_is_refused_not_taken_over(tmp_path, monkeypatch):
    monkeypatch.setattr("codiemb_pl.storage.run_lock.UNREADABLE_RETRY_S", 0.1)
    (tmp_path / LOCK_NAME).write_text("{truncated")
    with pytest.raises(InputError, match="is not a readable codiemb run lock .*delete that file"):
        acquire_run_lock(tmp_path, "fit")


def test_tree_lock_covers_run_folders_below_it(tmp_path, sleeper):
    with run_lock(tmp_path / "out", "sweep", tree=True):                # this process's sweep: its fits go on
        with run_lock(tmp_path / "out" / "runs" / "a", "fit") as fit:
            assert fit.owned and (tmp_path / "out" / "runs" / "a" / LOCK_NAME).is_file()
    assert not list(tmp_path.rglob(LOCK_NAME))
    # another live process's sweep: a fit below it is refused; a fit lock above a folder covers nothing
    write_lock(tmp_path / "out", kind="sweep", tree=True, pid=sleeper.pid,
               start_ticks=process_start_ticks(sleeper.pid))
    with pytest.raises(InputError, match=rf"`codiemb sweep` pid {sleeper.pid} .* writes every run folder under it"):
        acquire_run_lock(tmp_path / "out" / "runs" / "a", "fit")
    write_lock(tmp_path / "other", kind="fit", pid=sleeper.pid, start_ticks=process_start_ticks(sleeper.pid))
    with run_lock(tmp_path / "other" / "nested", "fit") as nested:
        assert nested.owned


def test_release_leaves_a_lock_that_is_no_longer_ours(tmp_path, capsys):
    handle = acquire_run_lock(tmp_path, "fit")
    write_lock(tmp_path, host="gpu-node-17")       # replaced by hand while held
    handle.release()
    assert "gpu-node-17" in (tmp_path / LOCK_NAME).read_text()
    assert "removed or replaced by someone else" in capsys.readouterr().err


def _race(folder: str, start, decided, results) -> None:
    start.wait()
    try:
        lock = acquire_run_lock(folder, "fit", warn=lambda line: None)
        results.put("won")
    except InputError:
        lock = None
        results.put("refused")
    decided.wait()   # the winner holds the lock until every process has tried
    if lock is not None:
        lock.release()


@pytest.mark.parametrize("stale", [False, True])
def test_of_racing_processes_exactly_one_gets_the_lock(tmp_path, stale):
    """Eight processes start at once (on a free folder, or all finding the same stale lock to take over)."""
    if stale:
        write_lock(tmp_path, pid=dead_pid(), start_ticks=None)
    context = multiprocessing.get_context("fork")
    start, decided, results = context.Barrier(8), context.Barrier(8), context.Queue()
    workers = [context.Process(target=_race, args=(str(tmp_path), start, decided, results)) for _ in range(8)]
    for worker in workers:
        worker.start()
    outcomes = sorted(results.get(timeout=60) for _ in workers)
    for worker in workers:
        worker.join(timeout=60)
    assert outcomes == ["refused"] * 7 + ["won"]
    assert not (tmp_path / LOCK_NAME).exists() and not list(tmp_path.iterdir())


def test_an_empty_lock_temporary_of_a_run_killed_while_writing_it_is_removed_at_once(tmp_path):
    """Found by the full kill_anywhere run (fit trial 8 of seed 0): a fit killed between creating
    `.codiemb.lock.TOKEN.tmp` and writing its holder left an empty file, which the next holder kept (an
    unreadable temporary was removed only once 10 minutes old, in case a live process was still writing it). A
    racer whose temporary the holder removes only retries and is refused (`acquire_run_lock`: its link finds no
    file), so the holder removes unreadable ones at once."""
    tmp_path.mkdir(exist_ok=True)
    empty = tmp_path / f"{LOCK_NAME}.65dcc31be052749e.tmp"
    empty.write_bytes(b"")
    half = tmp_path / f"{LOCK_NAME}.0123456789abcdef.tmp"
    half.write_text('{"codiemb_run_lock": 1, "ki')
    with run_lock(tmp_path, "fit") as handle:
        assert handle.owned
        assert [path.name for path in tmp_path.iterdir()] == [LOCK_NAME]


def test_a_racer_whose_lock_temporary_the_holder_removed_is_refused_in_one_line(tmp_path, sleeper, monkeypatch):
    """The other side of the test above: a run starting while the folder's holder removes its still-empty
    temporary finds no file to link, tries again and is refused with the holder's line (no traceback)."""
    write_lock(tmp_path, pid=sleeper.pid, start_ticks=process_start_ticks(sleeper.pid))
    link, removed = os.link, []

    def link_after_the_holder_removed_it(source, target):
        if not removed:
            removed.append(source)
            os.unlink(source)
        return link(source, target)

    monkeypatch.setattr(os, "link", link_after_the_holder_removed_it)
    with pytest.raises(InputError, match="another run is writing this folder"):
        acquire_run_lock(tmp_path, "fit")
    assert removed and sorted(path.name for path in tmp_path.iterdir()) == [LOCK_NAME]
