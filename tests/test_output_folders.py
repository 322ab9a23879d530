"""Output folders that cannot be written stop a command at once with one line naming the folder and what to
do: `fit` before training (run root, checkpoint, export, fusion and logger folders), `fuse` before merging,
`evaluate` / `mine-negatives` / `predict` before loading the model; nothing is left behind.

What the set-ups cover (the suite may run as root, for whom permission bits do not stop writes):
- `under_a_file`: the output path lies under an existing regular file (mkdir fails for everyone);
- `read_only_filesystem`: a folder under /sys/fs, which the kernel refuses to write even for root (skipped
  where that does not hold);
- `no_permission`: a folder with mode 0555 (skipped as root).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from codiemb_pl.cli.main import main
from codiemb_pl.errors import InputError
from codiemb_pl.storage.output_paths import check_writable_file, check_writable_folder

TINY_CONFIG = Path(__file__).parent / "conf" / "tiny.yaml"
KINDS = ["under_a_file", "read_only_filesystem", "no_permission"]
READ_ONLY_PARENT = Path("/sys/fs")


def _writable(folder: Path) -> bool:
    try:
        descriptor, name = tempfile.mkstemp(dir=folder)
    except OSError:
        return False
    os.close(descriptor)
    os.unlink(name)
    return True


def unwritable(kind: str, tmp_path: Path) -> Path:
    """A folder path that cannot be created or written, of the given kind (not yet existing)."""
    if kind == "under_a_file":
        (tmp_path / "a_file").write_text("not a folder")
        return tmp_path / "a_file" / "out"
    if kind == "read_only_filesystem":
        if not READ_ONLY_PARENT.is_dir() or _writable(READ_ONLY_PARENT):
            pytest.skip(f"{READ_ONLY_PARENT} is writable or absent here")
        return READ_ONLY_PARENT / "codiemb-test-output"
    if os.geteuid() == 0:
        pytest.skip("permission bits do not stop root")
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder / "out"


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("codiemb: error:")]
    assert len(lines) == 1, err
    return lines[0]


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name != "a_file" and "read_only" not in p.name]


@pytest.mark.parametrize("kind", KINDS)
def test_check_refuses_every_kind_and_leaves_nothing(kind, tmp_path):
    folder = unwritable(kind, tmp_path)
    with pytest.raises(InputError) as error:
        check_writable_folder(folder, "--output")
    assert error.value.where == f"--output {folder}"
    assert "choose a writable folder" in error.value.fix
    with pytest.raises(InputError):
        check_writable_file(folder / "results.json", "--output")
    assert not leftovers(tmp_path)


def test_check_accepts_new_and_existing_folders_and_creates_nothing(tmp_path):
    check_writable_folder(tmp_path / "new" / "deeper", "--output")
    check_writable_folder(tmp_path, "--output")
    check_writable_file(tmp_path / "new" / "results.json", "--output")
    assert list(tmp_path.iterdir()) == []


def test_a_file_where_a_folder_goes_and_a_folder_where_a_file_goes(tmp_path):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(InputError, match="is a file, not a folder"):
        check_writable_folder(tmp_path / "taken", "--output")
    with pytest.raises(InputError, match="is a folder"):
        check_writable_file(tmp_path, "--output")


def fit_args(tiny_model_dir: Path, root: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(TINY_CONFIG), "--model.model_name_or_path", str(tiny_model_dir),
            "--trainer.default_root_dir", str(root), *extra]


def test_fit_with_an_unwritable_run_root_stops_before_training(tiny_model_dir, tmp_path, capsys):
    """The run lock (`run_lock.py`), taken on the root before the model loads, is the first to write there."""
    root = unwritable("read_only_filesystem", tmp_path)
    assert main(fit_args(tiny_model_dir, root)) == 2
    line = error_line(capsys)
    assert f"{root}: cannot create the run lock" in line and "make the folder writable" in line


def test_fit_checks_every_output_folder_of_the_trainer(tiny_model_dir, tmp_path):
    """`check_fit_outputs` names the run root first when nothing ran before it (a trainer built in a script)."""
    from lightning.pytorch import Trainer

    from codiemb_pl.cli.run_folder import FitOutput, check_fit_outputs, fit_outputs

    root = unwritable("under_a_file", tmp_path)
    trainer = Trainer(default_root_dir=str(root), logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    assert fit_outputs(trainer)[0] == FitOutput("trainer.default_root_dir", root, temporaries=None)
    with pytest.raises(InputError, match=f"trainer.default_root_dir {root}: cannot be written"):
        check_fit_outputs(trainer)


@pytest.mark.parametrize("option", ["export", "checkpoints"])
def test_fit_with_an_unwritable_output_folder_stops_before_training(option, tiny_model_dir, tmp_path, capsys):
    """The run root is writable: without the check, training ran and the export (or the first checkpoint)
    failed with a traceback afterwards."""
    root, folder = tmp_path / "run", unwritable("under_a_file", tmp_path)
    extra = (["--trainer.callbacks+=codiemb_pl.callbacks.ExportEncoder", "--trainer.callbacks.dirpath", str(folder)]
             if option == "export" else ["--trainer.callbacks.dirpath", str(folder)])
    assert main(fit_args(tiny_model_dir, root, *extra)) == 2
    line = error_line(capsys)
    label = "ExportEncoder dirpath" if option == "export" else "ModelCheckpoint dirpath"
    assert f"{label} {folder}: cannot be written ({tmp_path / 'a_file'} is a file, not a folder)" in line
    assert not root.exists() or not any(root.rglob("*.ckpt")), "training ran before the error"


@pytest.mark.parametrize("kind", ["under_a_file", "read_only_filesystem"])
def test_fuse_stops_before_merging(kind, tiny_model_dir, tmp_path, capsys):
    output = unwritable(kind, tmp_path)
    assert main(["fuse", "--base", str(tiny_model_dir), "--model", str(tiny_model_dir), "--method", "uniform_soup",
                 "--output", str(output)]) == 2
    assert f"--output {output}: cannot be written" in error_line(capsys)
    assert not leftovers(tmp_path)


@pytest.mark.parametrize("kind", ["under_a_file", "read_only_filesystem"])
def test_evaluate_stops_before_scoring(kind, tiny_model_dir, tmp_path, capsys):
    output = unwritable(kind, tmp_path) / "results.json"
    assert main(["evaluate", "--model", str(tmp_path / "no_model_needed"), "--sts",
                 "s=pkg://codiemb_pl/demo/sts_dev.jsonl", "--output", str(output)]) == 2
    assert f"--output {output}: cannot be written" in error_line(capsys)  # not the missing model: checked first


def test_mine_negatives_stops_before_loading(tmp_path, capsys):
    output = unwritable("under_a_file", tmp_path) / "mined.jsonl"
    assert main(["mine-negatives", "pkg://codiemb_pl/demo/ir_train.jsonl", "--model", str(tmp_path / "no_model"),
                 "--output", str(output)]) == 2
    assert f"--output {output}: cannot be written" in error_line(capsys)


def test_predict_stops_before_embedding(tiny_model_dir, tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("one\ntwo\n")
    output = unwritable("under_a_file", tmp_path) / "embeddings.npy"
    code = main(["predict", "--config", str(TINY_CONFIG), "--model.model_name_or_path", str(tiny_model_dir),
                 "--trainer.default_root_dir", str(tmp_path / "run"), "--data.predict", str(texts),
                 "--predict_output", str(output)])
    assert code == 2
    assert f"--predict_output {output}: cannot be written" in error_line(capsys)
