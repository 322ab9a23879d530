"""`configs/my_data.yaml` trains, checkpoints, exports and fuses from a 10-record IR file and a 10-record STS
file, everything under one folder; every shipped full config writes only under `--trainer.default_root_dir`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from codiemb_pl.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
MY_DATA = ROOT / "configs" / "my_data.yaml"
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
DEMO = ROOT / "codiemb_pl" / "demo"


def write_ten_record_files(folder: Path) -> None:
    """data/ir_train.jsonl (one negative per record) and data/sts_train.jsonl, 10 records each, from the demo data."""
    data = folder / "data"
    data.mkdir(parents=True)
    ir = [json.loads(line) for line in (DEMO / "ir_train.jsonl").read_text().splitlines()[:10]]
    (data / "ir_train.jsonl").write_text("".join(json.dumps({**r, "negatives": r["negatives"][:1]}) + "\n" for r in ir))
    sts = (DEMO / "sts_train.jsonl").read_text().splitlines()[:10]
    (data / "sts_train.jsonl").write_text("\n".join(sts) + "\n")


def tree(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def my_data_run(tiny_model_dir, tmp_path_factory):
    """`codiemb fit --config configs/my_data.yaml` run from a folder holding only data/, with the tiny model."""
    cwd = tmp_path_factory.mktemp("fresh_clone")
    write_ten_record_files(cwd)
    before = Path.cwd()
    os.chdir(cwd)
    try:
        code = main(["fit", "--config", str(MY_DATA), "--model.model_name_or_path", str(tiny_model_dir)])
    finally:
        os.chdir(before)
    assert code == 0
    return cwd


def test_my_data_trains_exports_and_fuses_under_one_folder(my_data_run):
    assert {p.name for p in my_data_run.iterdir()} == {"data", "runs"}
    assert [p.name for p in (my_data_run / "runs").iterdir()] == ["my_data"]
    files = tree(my_data_run / "runs" / "my_data")
    assert {"checkpoints/last.ckpt", "model/modules.json", "model/README.md", "model/model.safetensors",
            "fusion/leaderboard.json", "fusion/model/modules.json", "logs/version_0/metrics.csv",
            "logs/version_0/config.yaml"} <= files
    assert {f.split("/")[0] for f in files} == {"checkpoints", "model", "fusion", "logs"}
    resolved = yaml.safe_load((my_data_run / "runs" / "my_data" / "logs" / "version_0" / "config.yaml").read_text())
    assert resolved["seed_everything"] == 42
    assert resolved["trainer"]["max_epochs"] == 2  # a fixed epoch count: no "Epoch 0/-2" progress bar
    leaderboard = json.loads((my_data_run / "runs" / "my_data" / "fusion" / "leaderboard.json").read_text())
    assert leaderboard["metric"] == "val/avg" and len(leaderboard["ranking"]) == 6  # base, 2 epochs, 3 merges


def test_my_data_batch_sizes_fit_a_ten_record_file():
    config = yaml.safe_load(MY_DATA.read_text())
    assert config["data"]["ir_batch_size"] <= 10 and config["data"]["sts_batch_size"] <= 10
    assert config["model"]["model_name_or_path"] and isinstance(config["seed_everything"], int)
    assert "runs/" not in "".join(line.split("#")[0] for line in MY_DATA.read_text().splitlines()
                                  if "default_root_dir" not in line), "only default_root_dir names the output folder"


def test_default_root_dir_moves_every_output(tiny_model_dir, tmp_path, monkeypatch, caplog):
    """The quickstart with --trainer.default_root_dir X writes nothing to the working directory (no
    ./runs/quickstart): logs, checkpoints, export and fusion all land in X (my_data.yaml: the fixture run)."""
    cwd, root = tmp_path / "cwd", tmp_path / "elsewhere"
    write_ten_record_files(cwd)
    monkeypatch.chdir(cwd)
    small_data = json.dumps([{"name": "demo_ir", "task": "ir", "path": "data/ir_train.jsonl"},
                             {"name": "demo_sts", "task": "sts", "path": "data/sts_train.jsonl", "score_range": [0, 5]}])
    assert main(["fit", "--config", str(QUICKSTART), "--model.model_name_or_path", str(tiny_model_dir),
                 "--trainer.default_root_dir", str(root), "--data.train", small_data,  # a few steps write everything
                 "--data.ir_batch_size", "8", "--data.sts_batch_size", "8"]) == 0
    # the quickstart's 2 hard-negative slots, filled from records with one negative each: said at the start
    assert ("[codiemb] demo_ir: 2 hard-negative slots per query; records have 1/1/1 distinct hard negatives "
            "(min/median/max); 10 of 10 records have fewer than 2 and repeat theirs to fill the slots") in caplog.messages
    assert tree(cwd) == {"data/ir_train.jsonl", "data/sts_train.jsonl"}
    files = tree(root)
    assert {f.split("/")[0] for f in files} == {"checkpoints", "model", "fusion", "logs"}
    assert {"checkpoints/last.ckpt", "model/modules.json", "fusion/model/modules.json",
            "logs/version_0/metrics.csv"} <= files


def test_distinct_negatives_are_counted_per_record(tmp_path, monkeypatch):
    from codiemb_pl.data.cache import records as records_module
    from codiemb_pl.data.cache.records import distinct_negative_histogram, open_records, teacher_score_count
    from codiemb_pl.data.sources import SourceConfig, subsample_positions

    monkeypatch.setattr(records_module, "STATISTICS_ROWS", 3)  # statistics read 3 rows at a time: slices meet
    path = tmp_path / "ir.jsonl"
    rows = [{"query": "q1", "positives": ["p"], "negatives": ["a", "a", "b"]},
            {"query": "q2", "positives": ["p"], "negatives": ["c"], "teacher_scores": [1.0, 0.5]},
            {"query": "q3", "positives": ["p"], "negatives": []},
            {"query": "q4", "positives": ["p"], "negatives": ["d", "e", "f", "g", "d"]},
            {"query": "q5", "positives": ["p"], "negatives": ["h", "i", "h"], "teacher_scores": [1, 0, 0, 0]}]
    distinct, scored = [2, 1, 0, 4, 2], [False, True, False, False, True]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    table = open_records(SourceConfig(name="ir", task="ir", path=str(path)), tmp_path / "cache")
    assert distinct_negative_histogram(table) == [1, 1, 2, 0, 1]
    assert teacher_score_count(table) == 2
    subset = SourceConfig(name="ir", task="ir", path=str(path), max_samples=3, seed=5)
    kept = subsample_positions(len(rows), subset)
    table = open_records(subset, tmp_path / "cache")
    expected = [0] * 5
    for position in kept:
        expected[distinct[position]] += 1
    assert distinct_negative_histogram(table) == expected[:max(distinct[p] for p in kept) + 1]
    assert teacher_score_count(table) == sum(scored[p] for p in kept)


def test_hard_negative_report_wording():
    from codiemb_pl.evaluation.tables import hard_negative_report

    def histogram(counts):  # records with k distinct negatives, for each k
        return [counts.count(k) for k in range(max(counts) + 1)]

    assert hard_negative_report("mine", histogram([1] * 10), 4) == (
        "[codiemb] mine: 4 hard-negative slots per query; records have 1/1/1 distinct hard negatives "
        "(min/median/max); 10 of 10 records have fewer than 4 and repeat theirs to fill the slots")
    assert hard_negative_report("mine", histogram([0, 3, 4, 6]), 4) == (
        "[codiemb] mine: 4 hard-negative slots per query; records have 0/3.5/6 distinct hard negatives "
        "(min/median/max); 1 of 4 records have fewer than 4 and repeat theirs to fill the slots; "
        "1 have none (their slots are masked out)")
    assert hard_negative_report("mine", histogram([5, 6]), 4).endswith(
        "records have 5/5.5/6 distinct hard negatives (min/median/max)")
    assert hard_negative_report("mine", histogram([2, 7, 3]), 4).endswith(
        "records have 2/3/7 distinct hard negatives (min/median/max); 2 of 3 records have fewer than 4 and repeat "
        "theirs to fill the slots")
    assert hard_negative_report("mine", histogram([1, 2]), 0) == ""
    assert hard_negative_report("mine", [], 4) == ""
