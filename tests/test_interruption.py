"""Interruption: SIGTERM / SIGINT during `fit` saves `last.ckpt` and exits 0, and `--ckpt_path last` ends
with the uninterrupted run's weights; a writer killed with SIGKILL leaves nothing under the final name.
The fits of the three signal tests start together in the background, two at a time (`signal_runs`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from ddp_driver.launch import unused_port

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
TINY_CONFIG = TESTS_DIR / "conf" / "tiny.yaml"
TOTAL_STEPS = 12  # one epoch of the tiny config's data (24 IR + 24 STS records, batches of 4)


class SlowStepMarker(pl.Callback):
    """Test callback: writes the global step to `marker` after every batch and sleeps `delay` seconds,
    so a test can send a signal while training is surely still running."""

    def __init__(self, marker: str, delay: float = 0.3):
        self.marker, self.delay = Path(marker), delay

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.marker.write_text(str(trainer.global_step))
        time.sleep(self.delay)


def fit_command(model_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "codiemb_pl", "fit", "--config", str(TINY_CONFIG),
            "--model.model_name_or_path", str(model_dir), "--trainer.default_root_dir", str(run_dir),
            "--trainer.max_steps", str(TOTAL_STEPS), *extra]


def subprocess_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]),
                OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="offline",
                TOKENIZERS_PARALLELISM="false", MASTER_PORT=str(unused_port()))   # runs overlap: a port of its own


def run_to_completion(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)


def run_and_signal(command: list[str], marker: Path, signum: int, after_step: int = 2) -> tuple[int, str]:
    """Start `command`, send `signum` once the marker shows `after_step`, return (exit code, output)."""
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=subprocess_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (marker.exists() and marker.read_text().strip() and int(marker.read_text()) >= after_step):
            assert process.poll() is None, f"fit ended before the signal:\n{process.communicate()[0][-4000:]}"
            assert time.monotonic() < deadline, "training did not start in time"
            time.sleep(0.05)
        process.send_signal(signum)
        output, _ = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    return process.returncode, output


def checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def marker_callback(marker: Path) -> list[str]:
    return ["--trainer.callbacks+=test_interruption.SlowStepMarker", f"--trainer.callbacks.marker={marker}"]


def interrupt_with_sigterm_then_resume(model_dir: Path, resumed: Path, marker: Path) -> dict:
    """A fit sent SIGTERM after step 2, then `--ckpt_path last` in the same folder; what the test checks
    between the two runs is read before the second one starts."""
    code, output = run_and_signal(fit_command(model_dir, resumed, *marker_callback(marker)), marker, signal.SIGTERM)
    last = resumed / "checkpoints" / "last.ckpt"
    observed = {"code": code, "output": output, "last": last,
                "interrupted_step": checkpoint(last)["global_step"] if last.exists() else None,
                "partials": list((resumed / "checkpoints").glob(".*partial"))}
    if code == 0 and last.exists():
        observed["resumed"] = run_to_completion(fit_command(model_dir, resumed, "--ckpt_path", "last"))
    return observed


def ddp_sigterm_command(model_dir: Path, run_dir: Path, marker: Path) -> list[str]:
    return fit_command(model_dir, run_dir, "--config", str(REPO_ROOT / "configs/trainer/ddp_cpu.yaml"),
                       "--trainer.devices", "2", "--data.ir_batch_size", "2", "--data.sts_batch_size", "2",
                       *marker_callback(marker))


@pytest.fixture(scope="module")
def signal_runs(request, tiny_model_dir, tmp_path_factory) -> dict:
    """The fits of this module's selected signal tests, started at once in the background, two at a time
    (both cores busy; each run's signal is sent from its own thread): {name: (run folder, Future)}. The
    SIGTERM-then-resume chain and the 2-rank run first, the shorter single runs after them."""
    selected = {item.originalname for item in request.session.items if item.module is request.module}
    root = tmp_path_factory.mktemp("signals")
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="signal-run") as pool:
        started = {}
        if "test_sigterm_saves_last_checkpoint_and_resume_matches_the_uninterrupted_run" in selected:
            started["sigterm"] = root / "resumed", pool.submit(interrupt_with_sigterm_then_resume, tiny_model_dir,
                                                               root / "resumed", root / "sigterm_step.txt")
        if "test_sigterm_to_rank_zero_stops_both_ddp_ranks_at_the_same_step" in selected:
            marker = root / "ddp_step.txt"
            started["ddp"] = root / "ddp", pool.submit(run_and_signal, ddp_sigterm_command(tiny_model_dir, root / "ddp",
                                                                                         marker),
                                                       marker, signal.SIGTERM, 1)
        if "sigterm" in started:   # the uninterrupted run the resumed one must equal
            started["straight"] = root / "straight", pool.submit(run_to_completion,
                                                                 fit_command(tiny_model_dir, root / "straight"))
        if "test_sigint_saves_last_checkpoint_and_exits_cleanly" in selected:
            marker = root / "sigint_step.txt"
            started["sigint"] = root / "sigint", pool.submit(
                run_and_signal, fit_command(tiny_model_dir, root / "sigint", *marker_callback(marker)), marker,
                signal.SIGINT, 1)
        yield started


def test_sigterm_saves_last_checkpoint_and_resume_matches_the_uninterrupted_run(signal_runs):
    (resumed, chain), (straight, straight_run) = signal_runs["sigterm"], signal_runs["straight"]
    observed = chain.result()
    code, output, last = observed["code"], observed["output"], observed["last"]
    assert code == 0, output[-4000:]
    assert "codiemb: interrupted: SIGTERM received" in output
    assert "Traceback" not in output
    interrupted_step = observed["interrupted_step"]
    assert 2 <= interrupted_step < TOTAL_STEPS
    assert not observed["partials"], "the temporary checkpoint was left behind"

    result = observed["resumed"]
    assert result.returncode == 0, result.stderr[-4000:]
    result = straight_run.result()
    assert result.returncode == 0, result.stderr[-4000:]

    expected, actual = checkpoint(straight / "checkpoints" / "last.ckpt"), checkpoint(last)
    assert expected["global_step"] == actual["global_step"] == TOTAL_STEPS
    assert expected["state_dict"].keys() == actual["state_dict"].keys()
    differing = [name for name, tensor in expected["state_dict"].items()
                 if not torch.equal(tensor, actual["state_dict"][name])]
    assert not differing, f"{len(differing)} tensors differ after resume, e.g. {differing[:3]}"


def test_sigint_saves_last_checkpoint_and_exits_cleanly(signal_runs):
    run, future = signal_runs["sigint"]
    code, output = future.result()
    assert code == 0, output[-4000:]
    assert "codiemb: interrupted: SIGINT received" in output and "KeyboardInterrupt" not in output
    assert 1 <= checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] < TOTAL_STEPS
    assert not (run / ".codiemb.lock").exists(), "the interrupted fit left its run lock behind"


def test_sigterm_to_rank_zero_stops_both_ddp_ranks_at_the_same_step(signal_runs):
    """Only rank 0 gets the signal (as from `kill PID`); the all-reduced flag stops rank 1 at the same step."""
    run, future = signal_runs["ddp"]
    code, output = future.result()
    assert code == 0, output[-4000:]
    step = checkpoint(run / "checkpoints" / "last.ckpt")["global_step"]
    assert 1 <= step < TOTAL_STEPS
    for rank in (0, 1):  # each rank reports its own stop step
        assert f"SIGTERM received (rank {rank} of 2): stopped after optimizer step {step} and saved" in output, \
            output[-4000:]
    assert not (run / ".codiemb.lock").exists()   # rank 0 took it before starting rank 1, and released it


WRITER_SCRIPT = textwrap.dedent("""
    import os, sys, time
    from codiemb_pl.storage.atomic import atomic_directory, atomic_write_text

    kind, final = sys.argv[1], sys.argv[2]
    if kind == "directory":
        with atomic_directory(final) as staging:
            (staging / "model.safetensors").write_bytes(os.urandom(1 << 20))
            print("writing", flush=True)
            time.sleep(120)
    else:
        def stall(descriptor):  # the data is written; hold the process before the rename
            print("writing", flush=True)
            time.sleep(120)
        os.fsync = stall
        atomic_write_text(final, "new text " * 100000)
""")


@pytest.mark.parametrize("kind", ["directory", "text"])
@pytest.mark.parametrize("previous", [False, True])
def test_writer_killed_mid_write_leaves_nothing_under_the_final_name(kind, previous, tmp_path):
    final = tmp_path / ("model" if kind == "directory" else "results.json")
    if previous:
        if kind == "directory":
            final.mkdir()
            (final / "old.txt").write_text("old")
        else:
            final.write_text("old")
    process = subprocess.Popen([sys.executable, "-c", WRITER_SCRIPT, kind, str(final)], cwd=REPO_ROOT,
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "writing"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL
    if not previous:
        assert not final.exists()
    elif kind == "directory":
        assert sorted(p.name for p in final.iterdir()) == ["old.txt"]
    else:
        assert final.read_text() == "old"
    leftovers = [p.name for p in tmp_path.iterdir() if p != final]
    assert leftovers and all(name.startswith(f".{final.name}.tmp-") for name in leftovers)


def test_a_folder_replacing_a_folder_never_leaves_its_name_empty(tmp_path, monkeypatch):
    """A kill can land after any filesystem call of `move_into_place`: after each one, the final name must hold
    the previous folder or the new one. (Before: the previous folder was renamed aside first, so a kill before
    the second rename left no `model/` at all, only `.model.old-*`, which the next run deleted.)"""
    import shutil as shutil_module

    from codiemb_pl.storage import atomic

    final = tmp_path / "model"
    final.mkdir()
    (final / "weights").write_text("previous")
    empty_moments: list[str] = []

    def checked(name, function):
        def call(*args, **kwargs):
            result = function(*args, **kwargs)
            if not (final / "weights").is_file():
                empty_moments.append(name)
            return result
        return call

    monkeypatch.setattr(Path, "rename", checked("Path.rename", Path.rename))
    monkeypatch.setattr(atomic.os, "replace", checked("os.replace", os.replace))
    monkeypatch.setattr(atomic.shutil, "rmtree", checked("shutil.rmtree", shutil_module.rmtree))
    if hasattr(atomic, "exchange"):   # the one-step swap (Linux renameat2)
        monkeypatch.setattr(atomic, "exchange", checked("exchange", atomic.exchange))
    with atomic.atomic_directory(final) as staging:
        (staging / "weights").write_text("new")
    assert (final / "weights").read_text() == "new"
    assert not empty_moments, f"model/ was absent after {empty_moments}"
    assert [path.name for path in tmp_path.iterdir()] == ["model"]


def test_a_previous_folder_a_killed_writer_set_aside_is_put_back(tmp_path):
    """Where folders cannot be swapped in one step (`atomic.exchange` is False), a writer killed between setting
    the previous folder aside and renaming the new one into place leaves `.NAME.old-*` and no NAME: the next
    run's cleanup puts the previous folder back instead of deleting it (before: deleted, the export was lost)."""
    from codiemb_pl.storage.atomic import remove_stale_temporaries

    (tmp_path / ".model.old-k1ll3d").mkdir()
    (tmp_path / ".model.old-k1ll3d" / "weights").write_text("previous")
    (tmp_path / ".model.tmp-n3w").mkdir()                     # the new one, never moved into place
    (tmp_path / ".results.json.old-x").write_text("stale")  # a file's: files are replaced in one os.replace
    (tmp_path / "results.json").write_text("current")
    removed = remove_stale_temporaries(tmp_path)
    assert (tmp_path / "model" / "weights").read_text() == "previous"
    assert (tmp_path / "results.json").read_text() == "current"
    assert sorted(path.name for path in removed) == [".model.tmp-n3w", ".results.json.old-x"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model", "results.json"]
