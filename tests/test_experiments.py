"""The experiment suite (benchmarks/experiments.py) in quick mode on the tiny model and a tiny data folder
laid out like ../shared/data: results keyed by config, a second invocation reuses them, an added
evaluation set is scored without retraining, and the report has the table, target checks and plot."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import experiment_runs  # noqa: E402
import experiments  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "codiemb_pl" / "demo"
RUNS = ["base", "ir_only", "codiemb", "codiemb_uniform_soup"]


def make_data(folder: Path) -> Path:
    """`ir/scifact` (BEIR, train/test qrels) and `sts/stsb/{train,test}.jsonl` from the packaged demo data."""
    scifact = folder / "ir" / "scifact"
    (scifact / "qrels").mkdir(parents=True)
    for name in ("corpus.jsonl", "queries.jsonl"):
        shutil.copy(DEMO / "ir_dev" / name, scifact / name)
    qrels = (DEMO / "ir_dev" / "qrels" / "dev.tsv").read_text("utf-8").splitlines()
    header, rows = qrels[0], qrels[1:]
    queries = sorted({row.split("\t")[0] for row in rows})
    test_ids = set(queries[-20:])
    for split, keep in (("train", lambda q: q not in test_ids), ("test", lambda q: q in test_ids)):
        lines = [header] + [row for row in rows if keep(row.split("\t")[0])]
        (scifact / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n", "utf-8")
    stsb = folder / "sts" / "stsb"
    stsb.mkdir(parents=True)
    shutil.copy(DEMO / "sts_train.jsonl", stsb / "train.jsonl")
    shutil.copy(DEMO / "sts_dev.jsonl", stsb / "test.jsonl")
    return folder


@pytest.fixture(scope="module")
def quick_suite(tiny_model_dir, tmp_path_factory, one_torch_thread):
    """One quick invocation of four runs; returns (argv, folder)."""
    folder = tmp_path_factory.mktemp("experiments")
    data = make_data(folder / "data")
    argv = ["--quick", "--model", str(tiny_model_dir), "--data", str(data), "--workdir", str(folder / "work"),
            "--results", str(folder / "results.json"), "--report", str(folder / "RESULTS.md"), "--only", *RUNS]
    assert experiments.main(argv) == 0
    return argv, folder


def test_config_keys_are_stable_and_sensitive():
    budgets = experiment_runs.QUICK
    specs = {spec.name: spec for spec in experiment_runs.suite_runs(budgets)}

    def key(b: experiment_runs.Budgets, name: str = "codiemb") -> str:
        runs = {spec.name: spec for spec in experiment_runs.suite_runs(b)}
        return experiment_runs.config_key(experiment_runs.run_config(runs[name], "m", b, runs))

    assert key(budgets) == key(experiment_runs.QUICK)
    assert key(budgets) != key(experiment_runs.scaled(budgets, epochs=2))
    longer = experiment_runs.scaled(budgets, epochs=2)
    assert key(budgets, "codiemb_delta_fusion") != key(longer, "codiemb_delta_fusion")  # the parent's budget counts
    assert key(budgets, "codiemb_delta_fusion") != key(budgets, "codiemb_uniform_soup")
    # Self Positioning's own steps change only its key
    more_sp = experiment_runs.scaled(budgets, sp_steps=99)
    assert key(budgets, "codiemb_self_positioning") != key(more_sp, "codiemb_self_positioning")
    assert key(budgets) == key(more_sp)
    # BOOM's full-data member is the batch-shuffling baseline itself (one training, reused)
    boom = specs["boom"]
    members = [experiment_runs.unit_config("m", budgets, specs["shuffle_infonce"].train, s)
               for s in experiment_runs.boom_subsets(boom)]
    baseline = experiment_runs.unit_config("m", budgets, specs["shuffle_infonce"].train)
    assert members[-1] == baseline and members[0] != baseline


def test_quick_suite_writes_results_keyed_by_config(quick_suite):
    argv, folder = quick_suite
    entries = json.loads((folder / "results.json").read_text("utf-8"))
    assert sorted(e["name"] for e in entries.values()) == sorted(RUNS)
    for key, entry in entries.items():
        assert key == experiment_runs.config_key(entry["config"])
        assert set(entry["sets"]) == {"stsb_test", "scifact_test"}
        assert 0.0 <= entry["sets"]["scifact_test"]["metrics"]["ndcg_at_10"] <= 1.0
        assert -1.0 <= entry["sets"]["stsb_test"]["metrics"]["cosine_spearman"] <= 1.0
    by_name = {e["name"]: e for e in entries.values()}
    assert len(by_name["codiemb_uniform_soup"]["info"]["snapshots"]) >= 2
    # the merge is a different model from the final CoDiEmb weights and from the base
    soup = by_name["codiemb_uniform_soup"]["sets"]["scifact_test"]["metrics"]
    assert soup != by_name["base"]["sets"]["scifact_test"]["metrics"]


def test_second_invocation_reuses_every_run(quick_suite, capsys):
    argv, folder = quick_suite
    before = (folder / "results.json").read_text("utf-8")
    exports = sorted((folder / "work" / "train").glob("*/model/model.safetensors"))
    stamps = [p.stat().st_mtime_ns for p in exports]
    assert experiments.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count(": cached (") == len(RUNS) and "[experiments] training " not in out
    assert (folder / "results.json").read_text("utf-8") == before
    assert [p.stat().st_mtime_ns for p in exports] == stamps


def test_extra_set_is_scored_without_retraining(quick_suite, capsys):
    argv, folder = quick_suite
    data = Path(argv[argv.index("--data") + 1])
    results = folder / "results.json"
    before = {k: e["finished_at"] for k, e in json.loads(results.read_text("utf-8")).items()}
    extra = argv + ["--extra-sts", f"extra_sts={data / 'sts' / 'stsb' / 'test.jsonl'}"]
    assert experiments.main(extra) == 0
    out = capsys.readouterr().out
    assert "[experiments] training " not in out and "mining hard negatives" not in out
    entries = json.loads(results.read_text("utf-8"))
    assert set(entries) == set(before)       # same run keys: an evaluation set is not part of a run's config
    for entry in entries.values():
        assert set(entry["sets"]) == {"stsb_test", "scifact_test", "extra_sts"}
        same = entry["sets"]["extra_sts"]["metrics"]["cosine_spearman"]
        assert same == pytest.approx(entry["sets"]["stsb_test"]["metrics"]["cosine_spearman"], abs=1e-6)


def test_report_has_table_targets_and_plot(quick_suite):
    _, folder = quick_suite
    report = (folder / "RESULTS.md").read_text("utf-8")
    assert "QUICK MODE" in report
    assert "| run | stsb_test | scifact_test" in report and "| IR avg | STS avg | overall |" in report
    for name in RUNS:
        row = next(line for line in report.splitlines() if line.startswith(f"| `{name}` |"))
        assert "—" not in row.split("|")[2]
    assert "| `boom` | — |" in report                      # not run in this invocation
    assert "CoDiEmb + fusion ≥ base on stsb_test: not measured yet" in report  # delta fusion was not run
    assert "delta-guided fusion ≥ uniform soup (overall): not measured yet" in report
    assert "<!-- analysis:begin -->" in report and '"seed"' in report
    assert (folder / "RESULTS.png").stat().st_size > 1000
