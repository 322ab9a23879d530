"""Config mistakes through the real CLI, in-process: one line naming the file (and line) or the command line,
the misspelt key and the nearest valid key, exit code 2, and none of Lightning's banners before it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from codiemb_pl.cli.main import main

TINY_CONFIG = Path(__file__).parent / "conf" / "tiny.yaml"
BANNERS = ("Seed set to", "GPU available", "TPU available", "Tip:")


def run_fit(tiny_model_dir: Path, root: Path, *extra: str) -> int:
    return main(["fit", "--config", str(TINY_CONFIG), "--model.model_name_or_path", str(tiny_model_dir),
                 "--trainer.default_root_dir", str(root), *extra])


def the_one_line(capsys, caplog) -> str:
    captured = capsys.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("codiemb: error: "), lines
    assert not [r.getMessage() for r in caplog.records if any(b in r.getMessage() for b in BANNERS)]
    return lines[0]


def test_misspelt_top_level_key_in_a_yaml_names_file_line_and_suggestion(tiny_model_dir, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    piece = tmp_path / "run.yaml"
    piece.write_text("trainer:\n  max_steps: 2\ndata:\n  ir_batch_size: 4\n  polcy: balanced\n")
    assert run_fit(tiny_model_dir, tmp_path / "run", "--config", str(piece)) == 2
    line = the_one_line(capsys, caplog)
    assert line.startswith(f"codiemb: error: {piece}:5: unknown key data.polcy (did you mean data.policy?"), line
    assert not (tmp_path / "run").exists()


def test_misspelt_section_in_a_yaml_suggests_the_section(tiny_model_dir, tmp_path, capsys, caplog):
    piece = tmp_path / "run.yaml"
    piece.write_text("trainr:\n  max_steps: 2\n")
    assert run_fit(tiny_model_dir, tmp_path / "run", "--config", str(piece)) == 2
    line = the_one_line(capsys, caplog)
    assert f"{piece}:2: unknown key trainr.max_steps (did you mean trainer.max_steps?" in line, line


def test_misspelt_key_in_a_data_train_entry_is_one_short_line(tiny_model_dir, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    piece = tmp_path / "data.yaml"
    piece.write_text("data:\n  train:\n    - name: mine\n      task: ir\n      pth: train.jsonl\n")
    assert run_fit(tiny_model_dir, tmp_path / "run", "--config", str(piece)) == 2
    line = the_one_line(capsys, caplog)
    assert line.startswith(f"codiemb: error: {piece}:5: unknown key 'pth' in data.train entry 1 (mine) "
                           "(did you mean path?"), line
    assert "Union" not in line and "NoneType" not in line and len(line) < 300, line


def test_misspelt_key_on_the_command_line_names_the_option(tiny_model_dir, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    assert run_fit(tiny_model_dir, tmp_path / "run", "--data.polcy", "balanced") == 2
    line = the_one_line(capsys, caplog)
    assert line.startswith("codiemb: error: command line: unknown key --data.polcy (did you mean --data.policy?"), line


def test_misspelt_key_in_a_command_line_data_train_entry(tiny_model_dir, tmp_path, capsys, caplog):
    entry = '[{"name": "mine", "task": "ir", "pth": "x.jsonl"}]'
    assert run_fit(tiny_model_dir, tmp_path / "run", "--data.train", entry) == 2
    line = the_one_line(capsys, caplog)
    assert "command line (--data.train): unknown key 'pth' in a data.train entry (did you mean path?" in line, line


def test_bad_data_after_a_good_config_shows_no_banner_before_the_line(tiny_model_dir, tmp_path, capsys, caplog):
    """The data checks run after the Trainer exists (its banners are logged then): they are held back."""
    caplog.set_level(logging.INFO)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "positives": []}\n')
    assert run_fit(tiny_model_dir, tmp_path / "run",
                   "--data.train", f'[{{"name": "bad", "task": "ir", "path": "{bad}"}}]') == 2
    assert f"{bad}:1" in the_one_line(capsys, caplog)


def test_banners_are_shown_once_the_checks_pass(tiny_model_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    assert run_fit(tiny_model_dir, tmp_path / "run", "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0") == 0
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("Seed set to 7") for m in messages)
    assert any(m.startswith("GPU available") for m in messages)
    assert logging.getLogger("lightning.pytorch").handlers or logging.getLogger("lightning.pytorch").propagate


@pytest.mark.parametrize("command,expected", [
    (["fitt"], "unknown command 'fitt' (did you mean fit?"),
    (["evaluat", "--model", "x"], "unknown command 'evaluat' (did you mean evaluate?"),
    ([], "no command given"),
])
def test_unknown_or_missing_command(command, expected, capsys):
    assert main(command) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("codiemb: error: command line: ") and expected in err and "\n" not in err


def test_help_lists_lightning_and_project_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("fit", "validate", "test", "predict", "evaluate", "fuse", "boom", "mine-negatives"):
        assert f"\n  {command} " in out, out


def test_bad_value_in_the_second_data_train_entry_names_that_entry(tiny_model_dir, tmp_path, capsys, caplog):
    piece = tmp_path / "data.yaml"
    piece.write_text("data:\n  train:\n    - name: first\n      task: ir\n      path: a.jsonl\n"
                     "    - name: second\n      task: irr\n      path: b.jsonl\n")
    assert run_fit(tiny_model_dir, tmp_path / "run", "--config", str(piece)) == 2
    line = the_one_line(capsys, caplog)
    assert line.startswith(f"codiemb: error: {piece}:7: data.train entry 2 (second): task: "), line
    assert "Got value: irr" in line and "Union" not in line, line


def test_a_config_naming_a_class_path_that_moved_gets_one_line_naming_the_new_one(tmp_path, capsys):
    """The 0.2 re-layout moved class paths (CHANGELOG.md): an old one in a config file or on the command line is
    one line with the file and line and the new path, before anything is parsed or written."""
    config = tmp_path / "run.yaml"
    config.write_text("trainer:\n  max_steps: 1\n  logger:\n    class_path: codiemb_pl.run_folder.CSVLogger\n",
                      encoding="utf-8")
    assert main(["fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"codiemb: error: {config}:4: codiemb_pl.run_folder.CSVLogger moved to "
                   "codiemb_pl.training.loggers.CSVLogger in codiemb_pl 0.2 (write codiemb_pl.training.loggers.CSVLogger "
                   "instead; CHANGELOG.md lists every move)"), err
    assert not (tmp_path / "run").exists()
    assert main(["fit", "--trainer.strategy", "codiemb_pl.sharding.FSDP2Strategy"]) == 2
    assert "codiemb_pl.training.sharding.FSDP2Strategy" in capsys.readouterr().err


def test_moved_paths_map_modules_names_and_resolved_configs():
    from codiemb_pl.cli.moved_paths import find_moved_path, new_path, normalise_paths

    assert new_path("codiemb_pl.encoder.TextEncoder") == "codiemb_pl.model.encoder.TextEncoder"
    assert new_path("codiemb_pl.run_folder.CSVLogger") == "codiemb_pl.training.loggers.CSVLogger"
    assert new_path("codiemb_pl.run_folder.fill_unset_folders") == "codiemb_pl.cli.run_folder.fill_unset_folders"
    assert new_path("codiemb_pl.data.cache.cached_entry") == "codiemb_pl.data.cache.entries.cached_entry"
    for unchanged in ("codiemb_pl.data.cache.records", "codiemb_pl.callbacks.ExportEncoder", "codiemb_pl.cli",
                      "codiemb_pl.model.encoder.TextEncoder", "codiemb_pl.model_cardigan"):
        assert new_path(unchanged) is None, unchanged
    assert find_moved_path("a: 1\nb: codiemb_pl.checkpoint_io.DurableCheckpointIO\n") == (
        2, "codiemb_pl.checkpoint_io.DurableCheckpointIO", "codiemb_pl.training.checkpoint_io.DurableCheckpointIO")
    assert normalise_paths({"l": [{"class_path": "codiemb_pl.run_folder.CSVLogger"}], "n": 3}) == {
        "l": [{"class_path": "codiemb_pl.training.loggers.CSVLogger"}], "n": 3}
    # every new module exists
    import importlib

    from codiemb_pl.cli.moved_paths import MOVED_MODULES, MOVED_NAMES
    for new in MOVED_MODULES.values():
        importlib.import_module(f"codiemb_pl.{new}")
    for new in MOVED_NAMES.values():
        module, _, name = f"codiemb_pl.{new}".rpartition(".")
        assert hasattr(importlib.import_module(module), name)
