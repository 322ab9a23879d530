"""Durable checkpoints (issue 27, item 4): every checkpoint is written under a temporary name in its own folder,
flushed and renamed (never staged in $TMPDIR), a full disk or a kill leaves the final name untouched, the
temporaries a killed run left are removed at the next start, and `--ckpt_path last` resumes from the newest
complete checkpoint instead of silently starting over."""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from codiemb_pl.cli.main import main
from codiemb_pl.errors import InputError

TINY_CONFIG = Path(__file__).resolve().parent / "conf" / "tiny.yaml"


class StartStep(pl.Callback):
    """Test probe: the global step each in-process fit starts training at (0 = from the beginning)."""

    seen: list[int] = []

    def on_train_start(self, trainer, pl_module) -> None:
        StartStep.seen.append(trainer.global_step)


def fit_args(model_dir: Path, root: Path, max_steps: int, *extra: str) -> list[str]:
    """A tiny fit checkpointing after every step into `root/checkpoints` (`step1.ckpt`, ..., `last.ckpt`)."""
    checkpoint = json.dumps({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {
        "every_n_train_steps": 1, "save_top_k": -1, "save_last": True, "filename": "step{step}",
        "auto_insert_metric_name": False}})
    return ["fit", "--config", str(TINY_CONFIG), "--model.model_name_or_path", str(model_dir),
            "--trainer.default_root_dir", str(root), "--trainer.max_steps", str(max_steps),
            "--trainer.callbacks", "[]", "--trainer.callbacks+", checkpoint,
            "--trainer.callbacks+=test_durable_checkpoints.StartStep", *extra]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("codiemb: error: ")]
    assert len(errors) == 1, err[-3000:]
    return errors[0]


def hidden_entries(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.startswith("."))


@pytest.fixture(scope="module")
def first_run(tiny_model_dir, tmp_path_factory) -> Path:
    """Two steps with $TMPDIR pointing at a folder that does not exist, after planting the temporaries a killed
    run leaves (a checkpoint being written, an export's staging folder, the old interruption name) and two
    entries that are not the project's. Lightning's own CheckpointIO stages every save in $TMPDIR."""
    root = tmp_path_factory.mktemp("durable") / "run"
    (root / "checkpoints").mkdir(parents=True)
    (root / "checkpoints" / ".last.ckpt.tmp-k1ll3d_0").write_bytes(os.urandom(1 << 16))
    (root / "checkpoints" / ".last.ckpt.partial").write_bytes(b"old")
    (root / ".model.tmp-abcd1234").mkdir()
    (root / ".model.tmp-abcd1234" / "model.safetensors").write_bytes(os.urandom(1 << 20))
    (root / "checkpoints" / "notes.txt").write_text("mine")
    (root / ".keep.tmp-1").write_text("not a name this run writes in the run folder")
    StartStep.seen.clear()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tempfile, "tempdir", str(root.parent / "no-such-tmpdir"))
        code = main(fit_args(tiny_model_dir, root, 2, "--trainer.callbacks+=codiemb_pl.callbacks.ExportEncoder"))
    assert code == 0
    return root


def test_checkpoints_never_go_through_tmpdir_and_stale_temporaries_are_removed(first_run):
    folder = first_run / "checkpoints"
    assert sorted(path.name for path in folder.iterdir()) == ["last.ckpt", "notes.txt", "step1.ckpt", "step2.ckpt"]
    assert torch.load(folder / "last.ckpt", weights_only=True, mmap=True)["global_step"] == 2
    assert not (first_run.parent / "no-such-tmpdir").exists()
    assert hidden_entries(first_run) == [".keep.tmp-1"]          # the export's 1 MB staging folder is gone
    assert (first_run / "model" / "modules.json").is_file()


def test_resume_after_a_kill_between_the_step_checkpoint_and_last_ckpt(first_run, tiny_model_dir, tmp_path, capsys):
    """Red-team row: killed after `step2.ckpt`, before `last.ckpt` -> `--ckpt_path last` started from scratch."""
    root = tmp_path / "run"
    shutil.copytree(first_run / "checkpoints", root / "checkpoints")
    (root / "checkpoints" / "last.ckpt").unlink()
    StartStep.seen.clear()
    assert main(fit_args(tiny_model_dir, root, 3, "--ckpt_path", "last")) == 0
    assert StartStep.seen == [2]
    out = capsys.readouterr().out
    assert (f"[codiemb] --ckpt_path last: resuming from {root / 'checkpoints' / 'step2.ckpt'} (step 2): there is no "
            "last.ckpt") in out
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=True, mmap=True)["global_step"] == 3


def test_truncated_last_ckpt_falls_back_and_no_usable_checkpoint_stops_with_one_line(first_run, tiny_model_dir,
                                                                                      tmp_path, capsys):
    """Red-team row: a truncated `last.ckpt` (a copy across filesystems killed midway) crashed the resume."""
    from codiemb_pl.training.resume import resolve_last_checkpoint

    folder = tmp_path / "run" / "checkpoints"
    shutil.copytree(first_run / "checkpoints", folder)
    data = (folder / "last.ckpt").read_bytes()
    (folder / "last.ckpt").write_bytes(data[: len(data) // 2])   # what a copy across filesystems left when killed
    path, line = resolve_last_checkpoint([folder])
    assert path == folder / "step2.ckpt"
    assert line.startswith(f"[codiemb] --ckpt_path last: resuming from {path} (step 2): last.ckpt is incomplete")

    for name in ("step1.ckpt", "step2.ckpt"):
        (folder / name).write_bytes((folder / name).read_bytes()[:1000])
    assert main(fit_args(tiny_model_dir, tmp_path / "run", 3, "--ckpt_path", "last")) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"codiemb: error: --ckpt_path last: no usable checkpoint in {folder}: last.ckpt is "
                           "incomplete or unreadable")
    assert "step2.ckpt is incomplete" in line and "move the folder away" in line


def test_disk_full_during_a_checkpoint_save_keeps_the_previous_checkpoints_and_says_one_line(first_run, tiny_model_dir,
                                                                                            tmp_path, capsys):
    """Red-team row: a full disk left a truncated checkpoint under its final name and a traceback. The file size
    limit (RLIMIT_FSIZE, 2 MB: the checkpoint holds 12 MB) makes every write past it fail as a full disk does."""
    root = tmp_path / "run"
    shutil.copytree(first_run / "checkpoints", root / "checkpoints")
    before = {path.name: path.read_bytes() for path in (root / "checkpoints").iterdir()}
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the limit: EFBIG, no signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, limits[1]))
    try:
        code = main(fit_args(tiny_model_dir, root, 3, "--ckpt_path", "last"))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous_handler)
    assert code == 2
    line = one_error_line(capsys)
    assert line.startswith(f"codiemb: error: {root / 'checkpoints' / 'step3.ckpt'}: not written, the filesystem "
                           "refused more data (File too large)"), line
    after = {path.name: path.read_bytes() for path in (root / "checkpoints").iterdir()}
    assert after == before   # nothing new, nothing truncated, no temporary left


def test_no_space_left_mid_file_leaves_the_final_name_untouched(tmp_path, monkeypatch):
    """ENOSPC raised by a write in the middle of the file (torch re-raises it as a RuntimeError)."""
    from codiemb_pl.training.checkpoint_io import DurableCheckpointIO

    final = tmp_path / "last.ckpt"
    final.write_bytes(b"previous checkpoint")
    real_save = torch.save

    def save_until_full(obj, handle, *args, **kwargs):
        class FullDisk:
            written = 0

            def write(self, data):
                FullDisk.written += len(data)
                if FullDisk.written > 4096:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return handle.write(data)

            def flush(self):
                handle.flush()

        return real_save(obj, FullDisk(), *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_full)
    with pytest.raises(InputError, match=r"not written, the filesystem refused more data \(No space left on device\)"):
        DurableCheckpointIO().save_checkpoint({"weights": torch.ones(10_000)}, final)
    assert final.read_bytes() == b"previous checkpoint"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["last.ckpt"]


def test_a_kill_during_a_checkpoint_save_leaves_only_a_temporary_name(tmp_path):
    """Red-team row: SIGKILL during a save left a truncated `last.ckpt` under the final name. A forked child saves
    with every byte written and stops before the rename (its fsync stalls); the parent SIGKILLs it there."""
    from codiemb_pl.training.checkpoint_io import DurableCheckpointIO

    final = tmp_path / "checkpoints" / "last.ckpt"
    final.parent.mkdir()
    final.write_bytes(b"previous checkpoint")
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:   # pragma: no cover - the child never returns
        try:
            def stall(descriptor):
                os.write(writer, b"writing")
                time.sleep(120)
            os.fsync = stall
            DurableCheckpointIO().save_checkpoint({"state_dict": {"w": torch.randn(512, 512)}}, final)
        finally:
            os._exit(1)
    try:
        assert os.read(reader, 7) == b"writing"
        os.kill(child, signal.SIGKILL)
        _, status = os.waitpid(child, 0)
    finally:
        os.close(reader), os.close(writer)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert final.read_bytes() == b"previous checkpoint"
    leftovers = [path for path in final.parent.iterdir() if path != final]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".last.ckpt.tmp-")
    assert leftovers[0].stat().st_size > 512 * 512 * 4    # the data went into the temporary, in this folder


def fake_checkpoint(path: Path, step: int, weights_only: bool = False) -> Path:
    state = {"global_step": step, "state_dict": {"w": torch.full((2,), float(step))}}
    if not weights_only:
        state.update(optimizer_states=[{}], loops={"fit_loop": {}})
    torch.save(state, path)
    return path


class Unpicklable:
    """An object torch's weights-only loader refuses."""


def test_last_resolution_prefers_the_newest_complete_resumable_checkpoint(tmp_path):
    from codiemb_pl.training.resume import inspect_checkpoint, resolve_last_checkpoint

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    assert resolve_last_checkpoint([folder]) == (
        None, f"[codiemb] --ckpt_path last: no checkpoint in {folder} yet, training starts from the beginning")
    fake_checkpoint(folder / "epoch0.ckpt", 4)
    fake_checkpoint(folder / "last.ckpt", 4)
    assert resolve_last_checkpoint([folder]) == (folder / "last.ckpt", "")   # same step: last, silently
    fake_checkpoint(folder / "epoch1.ckpt", 8)                               # killed before last.ckpt was rewritten
    fake_checkpoint(folder / "best.ckpt", 9, weights_only=True)              # not resumable
    (folder / ".epoch2.ckpt.tmp-x1").write_bytes(b"partial")                 # a save in progress is never a candidate
    torch.save({"global_step": 12, "optimizer_states": [], "loops": {}, "odd": Unpicklable()}, folder / "odd.ckpt")
    (folder / "empty.ckpt").write_bytes(b"")
    path, line = resolve_last_checkpoint([folder])
    assert path == folder / "epoch1.ckpt"
    assert line == (f"[codiemb] --ckpt_path last: resuming from {path} (step 8): it is newer than last.ckpt (step 4)")
    assert inspect_checkpoint(folder / "odd.ckpt").problem == (
        "names test_durable_checkpoints.Unpicklable, a function or class no codiemb_pl checkpoint holds: unpickling "
        "it could run code from the file, so it was not loaded (pass --ckpt_path with it and --weights_only false "
        "if you trust it)")
    assert inspect_checkpoint(folder / "empty.ckpt").problem == "is empty"


def test_checkpoint_folders_count_only_when_their_marker_lists_every_file(tmp_path):
    from codiemb_pl.training.checkpoint_io import FOLDER_MARKER
    from codiemb_pl.training.resume import resolve_last_checkpoint

    folder = tmp_path / "checkpoints"
    sharded = folder / "last.ckpt"
    sharded.mkdir(parents=True)
    (sharded / "shard0.distcp").write_bytes(b"x" * 100)
    fake_checkpoint(folder / "step3.ckpt", 3)
    path, line = resolve_last_checkpoint([folder])     # no marker: the save did not finish
    assert path == folder / "step3.ckpt" and f"last.ckpt is incomplete: it has no {FOLDER_MARKER}" in line
    marker = {"global_step": 5, "epoch": 0, "weights_only": False, "files": {"shard0.distcp": 100, "meta.pt": 7}}
    (sharded / FOLDER_MARKER).write_text(json.dumps(marker))
    assert "last.ckpt is incomplete: it lacks meta.pt" in resolve_last_checkpoint([folder])[1]
    (sharded / "meta.pt").write_bytes(b"1234567")
    assert resolve_last_checkpoint([folder]) == (sharded, "")


class FolderStrategy(pl.strategies.SingleDeviceStrategy):
    """Test strategy writing each checkpoint as a folder of two files (as DeepSpeed or sharded FSDP do); `fail_after`
    raises after the first file of that many-th save."""

    def __init__(self, fail_after: int = 0, error: Exception = RuntimeError("rank 1 died")):
        super().__init__(torch.device("cpu"))
        self.saves, self.fail_after, self.error = 0, fail_after, error

    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        path = Path(filepath)
        path.mkdir(parents=True, exist_ok=True)
        torch.save(checkpoint.pop("state_dict"), path / "shard0.pt")
        self.saves += 1
        if self.saves == self.fail_after:
            raise self.error
        torch.save(checkpoint, path / "meta.pt")


def fit_boring_model(root: Path, strategy: FolderStrategy, steps: int) -> None:
    from lightning.pytorch.demos.boring_classes import BoringModel

    from codiemb_pl.training.trainer import DurableTrainer

    trainer = DurableTrainer(default_root_dir=root, strategy=strategy, max_steps=steps, logger=False,
                             enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                             callbacks=[pl.callbacks.ModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=1,
                                                                     save_top_k=-1, save_last=True)])
    trainer.fit(BoringModel())


def test_folder_checkpoints_appear_complete_with_their_marker_or_not_at_all(tmp_path, monkeypatch):
    import codiemb_pl.training.trainer
    from codiemb_pl.training.checkpoint_io import FOLDER_MARKER, DurableCheckpointIO
    from codiemb_pl.training.resume import resolve_last_checkpoint

    monkeypatch.setattr(codiemb_pl.training.trainer, "writes_checkpoint_folders", lambda s: isinstance(s, FolderStrategy))
    fit_boring_model(tmp_path, FolderStrategy(), steps=2)
    folder = tmp_path / "checkpoints"
    assert sorted(path.name for path in folder.iterdir()) == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt", "last.ckpt"]
    marker = json.loads((folder / "last.ckpt" / FOLDER_MARKER).read_text())
    assert marker["global_step"] == 2 and sorted(marker["files"]) == ["meta.pt", "shard0.pt"]
    assert resolve_last_checkpoint([folder]) == (folder / "last.ckpt", "")

    def contents() -> dict[str, bytes]:
        return {str(path.relative_to(folder)): path.read_bytes() for path in folder.rglob("*") if path.is_file()}

    previous = contents()
    with pytest.raises(RuntimeError, match="rank 1 died"):       # the next run's first save dies after one file
        fit_boring_model(tmp_path, FolderStrategy(fail_after=1), steps=3)
    assert contents() == previous                                # and the staging folder was removed

    full = FolderStrategy(fail_after=1, error=OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(InputError, match=r"\.ckpt: not written, the filesystem refused more data \(No space left"):
        fit_boring_model(tmp_path, full, steps=3)
    assert contents() == previous

    DurableCheckpointIO().remove_checkpoint(folder / "epoch=0-step=1.ckpt")   # renamed to a hidden name, then deleted
    assert sorted(path.name for path in folder.iterdir()) == ["epoch=0-step=2.ckpt", "last.ckpt"]


def test_a_checkpoint_io_the_user_chose_is_kept():
    from lightning.pytorch.plugins.io import AsyncCheckpointIO
    from lightning.pytorch.strategies import SingleDeviceStrategy
    from lightning.fabric.plugins import TorchCheckpointIO

    from codiemb_pl.training.checkpoint_io import DurableCheckpointIO, install_durable_checkpoint_io

    default = SingleDeviceStrategy(torch.device("cpu"))
    assert install_durable_checkpoint_io(default) is None and type(default.checkpoint_io) is DurableCheckpointIO
    wrapped = SingleDeviceStrategy(torch.device("cpu"), checkpoint_io=AsyncCheckpointIO(DurableCheckpointIO()))
    assert install_durable_checkpoint_io(wrapped) is None and isinstance(wrapped.checkpoint_io, AsyncCheckpointIO)

    class MyIO(TorchCheckpointIO):
        pass

    own = SingleDeviceStrategy(torch.device("cpu"), checkpoint_io=MyIO())
    warning = install_durable_checkpoint_io(own)
    assert type(own.checkpoint_io) is MyIO
    assert warning.startswith("[codiemb] checkpoints are written by MyIO (trainer.plugins), not "
                              "codiemb_pl.training.checkpoint_io.DurableCheckpointIO")


def test_fuse_removes_the_staging_folder_a_killed_fuse_left_beside_its_output(tiny_model_dir, tmp_path):
    """Red-team row: an interrupted export left its (90 MB) staging folder forever."""
    out = tmp_path / "fused"
    (tmp_path / ".fused.tmp-k1ll3d_0").mkdir()
    (tmp_path / ".fused.tmp-k1ll3d_0" / "model.safetensors").write_bytes(os.urandom(1 << 16))
    (tmp_path / ".other.tmp-k1ll3d_0").mkdir()             # not this output's: left alone
    assert main(["fuse", "--base", str(tiny_model_dir), "--model", str(tiny_model_dir), "--method", "uniform_soup",
                 "--output", str(out)]) == 0
    assert (out / "model.safetensors").is_file()
    assert hidden_entries(tmp_path) == [".other.tmp-k1ll3d_0"]


def test_resuming_from_a_checkpoint_newer_than_last_ckpt_brings_last_ckpt_up_to_date(first_run, tiny_model_dir,
                                                                                      tmp_path):
    """Found by benchmarks/kill_anywhere.py: a fit killed while writing `last.ckpt` at its final step (after
    `step2.ckpt`) resumed from `step2.ckpt` with nothing left to train, so no save followed and `last.ckpt` kept
    step 1 for good: `codiemb fuse --model .../last.ckpt` or a sweep's resume then read the older state."""
    root = tmp_path / "run"
    shutil.copytree(first_run / "checkpoints", root / "checkpoints")
    folder = root / "checkpoints"
    shutil.copyfile(folder / "step1.ckpt", folder / "last.ckpt")   # the last.ckpt of step 1, its step-2 write killed
    StartStep.seen.clear()
    assert main(fit_args(tiny_model_dir, root, 2, "--ckpt_path", "last")) == 0
    assert StartStep.seen == []                                      # nothing was left to train
    last = torch.load(folder / "last.ckpt", weights_only=True, mmap=True)
    step2 = torch.load(folder / "step2.ckpt", weights_only=True, mmap=True)
    assert last["global_step"] == 2
    assert all(torch.equal(last["state_dict"][key], value) for key, value in step2["state_dict"].items())
    assert sorted(path.name for path in folder.iterdir()) == ["last.ckpt", "notes.txt", "step1.ckpt", "step2.ckpt"]


def test_a_fit_killed_while_writing_its_config_yaml_leaves_no_partial_file(tiny_model_dir, tmp_path, monkeypatch):
    """Found by the full kill_anywhere run (seed 0, sweep trial 3): LightningCLI writes the run's resolved
    `config.yaml` in place, so a run killed while writing it left it empty. The write is stopped half-way here
    (the process dies: a BaseException, as SIGKILL leaves no chance to clean up) over a previous config.yaml."""
    from jsonargparse import ArgumentParser

    real_save = ArgumentParser.save

    def save_half_then_die(self, cfg, path, *args, **kwargs):
        real_save(self, cfg, path, *args, **kwargs)
        text = Path(path).read_text()
        Path(path).write_text(text[: len(text) // 2])
        raise SystemExit("killed while writing config.yaml")

    root = tmp_path / "run"
    root.mkdir()
    (root / "config.yaml").write_text("previous: run\n")
    monkeypatch.setattr(ArgumentParser, "save", save_half_then_die)
    with pytest.raises(SystemExit, match="killed while writing"):
        main(fit_args(tiny_model_dir, root, 1))
    assert (root / "config.yaml").read_text() == "previous: run\n"
    assert not hidden_entries(root), "the half-written temporary is left"


def test_the_log_file_temporaries_a_killed_run_left_are_removed_by_the_next_fit(tiny_model_dir, tmp_path, capsys):
    """Found by the full kill_anywhere run (seed 1, fit trial 6): `config.yaml`, `metrics.csv` and `hparams.yaml`
    go through temporaries in the log folder, and a run killed there left `.config.yaml.tmp-*` in
    `logs/version_0` for good: the resumed run logs to `version_1` and cleaned only its checkpoint, export and
    fusion folders. Without a logger `config.yaml` is in the run root."""
    root = tmp_path / "run"
    version_0 = root / "logs" / "version_0"
    version_0.mkdir(parents=True)
    planted = [version_0 / ".config.yaml.tmp-egyduguo", version_0 / ".metrics.csv.tmp-k1", root / ".config.yaml.tmp-k2"]
    for path in planted:
        path.write_text("partial")
    (version_0 / "metrics.csv").write_text("step,train/loss\n0,1.0\n")
    (root / ".notes.tmp-mine").write_text("not a name a fit writes")
    logger = json.dumps({"class_path": "codiemb_pl.training.loggers.CSVLogger"})
    assert main(fit_args(tiny_model_dir, root, 1, "--trainer.logger", logger, "--data.val=[]")) == 0
    assert not [path for path in planted if path.exists()]
    assert (root / ".notes.tmp-mine").is_file() and (version_0 / "metrics.csv").is_file()
    assert "[codiemb] removed 3 temporary file(s)/folder(s) an interrupted run left" in capsys.readouterr().out
