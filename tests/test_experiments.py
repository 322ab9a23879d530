"""The experiment suite v2 (benchmarks/experiments.py): row planning over seeds, config keys, cross / specialist
members, mean ± sd and the tie rule, the paired bootstrap of several sets, and a quick invocation on the tiny
model and a tiny data folder laid out like ../shared/data (results keyed by config, a second invocation
skips every finished run, an added evaluation set is scored without retraining, the report section)."""

from __future__ import annotations

import json
import shutil
import statistics
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import experiment_runs  # noqa: E402
import experiments  # noqa: E402
import paired_comparison  # noqa: E402

from codiemb_pl.data.eval_sets import EvalSet  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "codiemb_pl" / "demo"
RUNS = ["cross_delta_fusion", "cross_uniform_soup", "cross_greedy_soup"]
BUILT = RUNS + ["codiemb", "codiemb_balanced", "codiemb_temperature"]   # --only builds the members, not base


def make_data(folder: Path) -> Path:
    """`ir/scifact` (BEIR, train/test qrels), `sts/stsb/{train,dev,test}.jsonl` and `train/snli_triplets.jsonl`
    from the packaged demo data."""
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
    shutil.copy(DEMO / "sts_dev.jsonl", stsb / "dev.jsonl")
    shutil.copy(DEMO / "sts_dev.jsonl", stsb / "test.jsonl")
    (folder / "train").mkdir()
    pairs = [json.loads(line) for line in (DEMO / "sts_train.jsonl").read_text("utf-8").splitlines() if line.strip()]
    triplets = [{"anchor": a["sentence1"], "positive": a["sentence2"], "negative": b["sentence2"], "source": "demo"}
                for a, b in zip(pairs[:40], pairs[40:80])]
    (folder / "train" / "snli_triplets.jsonl").write_text("".join(json.dumps(t) + "\n" for t in triplets), "utf-8")
    return folder


# ---------------------------------------------------------------------------------------------------------
# planning, keys, members (no training)

def specs_of(budgets):
    return {spec.name: spec for spec in experiment_runs.suite_runs(budgets)}


def key(budgets, name, seed):
    specs = specs_of(budgets)
    return experiment_runs.config_key(experiment_runs.run_config(specs[name], "m", budgets, specs, seed))


def test_rows_are_named_as_the_issue_asks_and_planned_at_every_seed():
    budgets = experiment_runs.FULL
    names = [spec.name for spec in experiment_runs.suite_runs(budgets)]
    new = ["codiemb_balanced", "codiemb_temperature", "cross_delta_fusion", "cross_uniform_soup", "cross_ties",
           "cross_self_positioning", "cross_greedy_soup", "specialists_delta_fusion"]
    v1 = ["base", "ir_only", "sts_only_codiemb", "sts_only_cosent", "naive_joint", "shuffle_infonce", "codiemb",
          "codiemb_delta_fusion", "boom"]
    assert set(new + v1) == set(names) and len(names) == len(set(names)) == 17
    assert budgets.seeds == (42, 43, 44)
    plan = experiment_runs.plan_rows(budgets)
    assert len(plan) == 1 + 16 * 3
    assert plan[0] == (specs_of(budgets)["base"], None)
    # seed-major: every row of seed 42 before any of seed 43, each row once per seed
    seeds = [seed for _, seed in plan[1:]]
    assert seeds == [42] * 16 + [43] * 16 + [44] * 16
    for seed in budgets.seeds:
        assert sorted(spec.name for spec, s in plan if s == seed) == sorted(n for n in names if n != "base")
    # within a seed, a merge comes after every training row it needs
    order = [spec.name for spec, s in plan if s == 42]
    for spec, _ in plan[1:17]:
        for dep in experiment_runs.dependencies(spec):
            assert order.index(dep) <= order.index(spec.name)
    only = experiment_runs.plan_rows(budgets, ["codiemb"])
    assert [(spec.name, seed) for spec, seed in only] == [("codiemb", 42), ("codiemb", 43), ("codiemb", 44)]


def test_keys_differ_by_seed_and_budget_but_not_for_base():
    budgets = experiment_runs.QUICK
    assert key(budgets, "codiemb", 42) == key(experiment_runs.QUICK, "codiemb", 42)
    assert key(budgets, "codiemb", 42) != key(budgets, "codiemb", 43)
    assert key(budgets, "cross_ties", 42) != key(budgets, "cross_ties", 43)
    assert key(budgets, "base", None) == key(experiment_runs.scaled(budgets, seeds=[7]), "base", None)
    longer = experiment_runs.scaled(budgets, epochs=2)
    assert key(budgets, "cross_delta_fusion", 42) != key(longer, "cross_delta_fusion", 42)  # members' budget counts
    assert key(budgets, "cross_delta_fusion", 42) != key(budgets, "cross_uniform_soup", 42)
    more_sp = experiment_runs.scaled(budgets, sp_steps=99)
    assert key(budgets, "cross_self_positioning", 42) != key(more_sp, "cross_self_positioning", 42)
    assert key(budgets, "cross_delta_fusion", 42) == key(more_sp, "cross_delta_fusion", 42)
    # the sampler policy is what separates the three CoDiEmb runs
    assert len({key(budgets, n, 42) for n in ("codiemb", "codiemb_balanced", "codiemb_temperature")}) == 3


def test_cross_and_specialist_rows_merge_the_final_weights_of_their_members_at_the_same_seed():
    budgets = experiment_runs.QUICK
    specs = specs_of(budgets)
    for name in ("cross_delta_fusion", "cross_uniform_soup", "cross_ties", "cross_self_positioning",
                 "cross_greedy_soup"):
        assert specs[name].kind == "cross"
        assert experiment_runs.dependencies(specs[name]) == ("codiemb", "codiemb_balanced", "codiemb_temperature")
    assert experiment_runs.dependencies(specs["specialists_delta_fusion"]) == ("ir_only", "sts_only_codiemb",
                                                                               "codiemb")
    assert specs["specialists_delta_fusion"].method == specs["cross_delta_fusion"].method == "delta_guided"
    config = experiment_runs.run_config(specs["cross_ties"], "m", budgets, specs, 43)
    assert config["members"] == [experiment_runs.unit_config("m", budgets, specs[n].train, 43)
                                 for n in ("codiemb", "codiemb_balanced", "codiemb_temperature")]
    assert [m["policy"] for m in config["members"]] == ["proportional", "balanced", "temperature"]
    assert {m["seed"] for m in config["members"]} == {43}
    # greedy soup is keyed by its held-out selection sets, never the test sets
    greedy = experiment_runs.run_config(specs["cross_greedy_soup"], "m", budgets, specs, 42)
    assert set(greedy["selection"]) >= {"stsb_dev", "scifact_dev"} and "test" not in json.dumps(greedy["selection"])


def test_training_steps_match_the_sampler_for_the_three_policies():
    from codiemb_pl.data.sampler import TaskBatchSampler

    budget = experiment_runs.FULL.train
    sizes = {s.name: getattr(budget, s.cap) for s in experiment_runs.TRAIN_SOURCES}   # the caps: 192, 576, 384
    specs = specs_of(experiment_runs.FULL)
    for name in ("codiemb", "codiemb_balanced", "codiemb_temperature", "naive_joint", "ir_only"):
        train = specs[name].train
        sources = [s for s in experiment_runs.TRAIN_SOURCES if s.task in train["tasks"]]
        sampler = TaskBatchSampler([sizes[s.name] for s in sources], [s.task for s in sources],
                                   batch_sizes=[32] * len(sources), policy=train["policy"], seed=0)
        assert experiment_runs.training_steps(train, budget, sizes) == sampler.steps_per_epoch(), name
    # IR has twice STS's batches (24 vs 12), so the policies' plans differ: proportional 6 + 18 + 12 steps,
    # balanced max(24, 12) per task
    steps = {n: experiment_runs.training_steps(specs[n].train, budget, sizes) for n in ("codiemb", "codiemb_balanced")}
    assert steps == {"codiemb": 36, "codiemb_balanced": 48}


def test_mean_sd_and_the_tie_rule():
    mean, sd = experiments.mean_sd([70.0, 71.0, 72.5])
    assert mean == pytest.approx(71.1666667) and sd == pytest.approx(statistics.stdev([70.0, 71.0, 72.5]))
    assert experiments.mean_sd([3.0]) == (3.0, 0.0) and experiments.mean_sd([]) == (None, None)
    # |difference| 0.5 < larger sd 1.0: a tie, whatever its sign
    tie = experiments.compare([74.0, 75.0, 76.0], [74.5, 74.5, 74.5])
    assert tie["verdict"] == "tie" and tie["difference"] == pytest.approx(0.5) and tie["sd"] == pytest.approx(1.0)
    better = experiments.compare([76.0, 76.2, 76.4], [74.0, 74.1, 74.2])
    assert better["verdict"] == "better" and better["difference"] == pytest.approx(2.1)
    assert experiments.compare([70.0, 70.2], [72.0, 72.2])["verdict"] == "worse"
    assert experiments.compare([], [1.0])["verdict"] == "not measured"


def test_paired_bootstrap_of_several_sets_gives_the_overall_difference():
    ir = EvalSet(name="ir", task="ir", texts={"query": [], "corpus": []})
    gold = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    sts = EvalSet(name="sts", task="sts", texts={"text1": [], "text2": []}, gold=gold)
    b_ir = torch.tensor([0.2, 0.5, 0.9, 0.0, 0.4], dtype=torch.float64)
    cosines = torch.tensor([0.1, 0.3, 0.2, 0.7, 0.9, 0.8], dtype=torch.float64)
    result = paired_comparison.paired_bootstrap_sets([(ir, b_ir + 0.1, b_ir), (sts, cosines, cosines.clone())],
                                                     resamples=100, seed=0)
    # IR: +10 in every resample; STS: identical; overall = mean of the IR and STS averages: +5 every time
    assert result["ir"]["difference"] == pytest.approx(10.0) and result["sts"]["difference"] == 0.0
    assert result["overall"]["difference"] == pytest.approx(5.0)
    assert result["overall"]["ci_low"] == pytest.approx(5.0) and result["overall"]["ci_high"] == pytest.approx(5.0)
    assert result["overall"]["p_a_wins"] == 1.0
    assert result["overall"]["a"] == pytest.approx((result["ir"]["a"] + result["sts"]["a"]) / 2)


def test_ir_set_subsample_keeps_every_judged_document():
    vset = EvalSet(name="ir", task="ir", texts={"query": ["q1", "q2"], "corpus": [f"d{i}" for i in range(10)]},
                         query_ids=["a", "b"], doc_ids=[str(i) for i in range(10)],
                         qrels={"a": {"3": 1}, "b": {"7": 1, "8": 0}})
    small = experiments.subsample_ir_set(vset, ["a", "b"], 4, seed=0)
    assert len(small.doc_ids) == 4 and {"3", "7"} <= set(small.doc_ids)
    assert small.texts["corpus"] == [f"d{i}" for i in map(int, small.doc_ids)]
    one = experiments.subsample_ir_set(vset, ["b"], None, seed=0, name="dev")
    assert one.name == "dev" and one.query_ids == ["b"] and one.texts["query"] == ["q2"] and len(one.doc_ids) == 10


# ---------------------------------------------------------------------------------------------------------
# a quick invocation: build, score, resume

@pytest.fixture(scope="module")
def quick_suite(tiny_model_dir, tmp_path_factory, one_torch_thread):
    """One quick invocation of the cross / specialist rows at one seed; returns (argv, folder)."""
    folder = tmp_path_factory.mktemp("experiments")
    data = make_data(folder / "data")
    argv = ["--quick", "--model", str(tiny_model_dir), "--data", str(data), "--workdir", str(folder / "work"),
            "--results", str(folder / "results.json"), "--report", str(folder / "RESULTS.md"), "--seeds", "42",
            "--only", *RUNS]
    (folder / "RESULTS.md").write_text("# Other section\n\nkept as it is\n", "utf-8")
    assert experiments.main(argv) == 0
    return argv, folder


def test_estimate_only_on_a_fresh_workdir_mines_nothing(tiny_model_dir, tmp_path, capsys):
    """The estimate counts SciFact at its cap when its negatives are not mined yet (mining is minutes)."""
    data = make_data(tmp_path / "data")
    argv = ["--quick", "--model", str(tiny_model_dir), "--data", str(data), "--workdir", str(tmp_path / "work"),
            "--results", str(tmp_path / "results.json"), "--estimate-only"]
    assert experiments.main(argv) == 0
    out = capsys.readouterr().out
    assert "mining hard negatives" not in out and not (tmp_path / "work" / "mined").exists()
    assert f"'scifact': {experiment_runs.QUICK.train.ir_max_samples}" in out and "total (+ mining)" in out
    assert not (tmp_path / "results.json").exists()


def test_quick_suite_builds_members_and_scores_every_row(quick_suite):
    argv, folder = quick_suite
    data = json.loads((folder / "results.json").read_text("utf-8"))
    entries = data["runs"]
    assert sorted(e["name"] for e in entries.values()) == sorted(BUILT)
    for run_key, entry in entries.items():
        assert run_key == experiment_runs.config_key(entry["config"])
        assert entry["seed"] == 42
        assert set(entry["sets"]) == {"stsb_test", "scifact_test"}
        assert 0.0 <= entry["sets"]["scifact_test"]["metrics"]["ndcg_at_10"] <= 1.0
        assert entry["sets"]["scifact_test"]["cpu_seconds"] >= 0.0
        items = folder / "work" / "items" / run_key
        assert len(list(items.glob("*.pt"))) == 2
    by_name = {e["name"]: e for e in entries.values()}
    assert by_name["cross_uniform_soup"]["info"]["members"] == ["codiemb", "codiemb_balanced", "codiemb_temperature"]
    greedy = by_name["cross_greedy_soup"]["info"]
    assert greedy["dev_sets"] == ["stsb_dev", "scifact_dev"] and greedy["chosen"]
    assert greedy["chosen"][0] == max(greedy["dev_avg_of_members"], key=greedy["dev_avg_of_members"].get)
    # the merge is a different model from each member
    soup = by_name["cross_uniform_soup"]["sets"]["stsb_test"]["metrics"]
    assert all(soup != by_name[m]["sets"]["stsb_test"]["metrics"] for m in ("codiemb", "codiemb_balanced"))
    # the paired bootstrap per seed, from the saved per-item values
    comparisons = data["comparisons"]
    best = max(("codiemb", "codiemb_balanced", "codiemb_temperature"),
               key=lambda m: sum(by_name[m]["sets"][s]["metrics"][experiments.HEADLINE[t]]
                                 for s, t in (("stsb_test", "sts"), ("scifact_test", "ir"))))
    assert set(comparisons) == {"cross_delta_fusion vs cross_uniform_soup", f"cross_delta_fusion vs {best}"}
    one = comparisons["cross_delta_fusion vs cross_uniform_soup"]["42"]
    assert set(one) == {"stsb_test", "scifact_test", "overall"}
    assert one["overall"]["ci_low"] <= one["overall"]["difference"] + 1e-9


def test_second_invocation_skips_every_finished_run(quick_suite, capsys):
    argv, folder = quick_suite
    before = json.loads((folder / "results.json").read_text("utf-8"))["runs"]
    exports = sorted((folder / "work").glob("**/model.safetensors"))
    stamps = [p.stat().st_mtime_ns for p in exports]
    assert experiments.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count(": cached (") == len(BUILT)
    assert "[experiments] training " not in out and "mining hard negatives" not in out
    assert json.loads((folder / "results.json").read_text("utf-8"))["runs"] == before
    assert [p.stat().st_mtime_ns for p in exports] == stamps


def test_interrupted_suite_redoes_only_the_unfinished_runs(quick_suite, capsys):
    """A run whose score is missing (as after an interruption) is rebuilt from its cached members; nothing
    else is trained or scored again."""
    argv, folder = quick_suite
    results = folder / "results.json"
    data = json.loads(results.read_text("utf-8"))
    soup_key = next(k for k, e in data["runs"].items() if e["name"] == "cross_uniform_soup")
    del data["runs"][soup_key]
    results.write_text(json.dumps(data), "utf-8")
    shutil.rmtree(folder / "work" / "merged" / soup_key)
    assert experiments.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count(": cached (") == len(BUILT) - 1 and "cross_uniform_soup seed 42: building" in out
    assert "[experiments] training " not in out
    assert soup_key in json.loads(results.read_text("utf-8"))["runs"]


def test_extra_set_is_scored_without_retraining(quick_suite, capsys):
    argv, folder = quick_suite
    data = Path(argv[argv.index("--data") + 1])
    results = folder / "results.json"
    before = set(json.loads(results.read_text("utf-8"))["runs"])
    extra = argv + ["--extra-sts", f"extra_sts={data / 'sts' / 'stsb' / 'test.jsonl'}"]
    assert experiments.main(extra) == 0
    out = capsys.readouterr().out
    assert "[experiments] training " not in out and "mining hard negatives" not in out
    entries = json.loads(results.read_text("utf-8"))["runs"]
    assert set(entries) == before       # same run keys: an evaluation set is not part of a run's config
    for entry in entries.values():
        assert set(entry["sets"]) == {"stsb_test", "scifact_test", "extra_sts"}
        same = entry["sets"]["extra_sts"]["metrics"]["cosine_spearman"]
        assert same == pytest.approx(entry["sets"]["stsb_test"]["metrics"]["cosine_spearman"], abs=1e-6)


def test_report_section_has_table_targets_bootstrap_and_plot(quick_suite):
    argv, folder = quick_suite
    assert experiments.main(argv + ["--report-only"]) == 0
    report = (folder / "RESULTS.md").read_text("utf-8")
    assert report.count(experiments.SUITE_BEGIN) == 1 and report.rstrip().endswith("kept as it is")
    assert "QUICK MODE" in report and "| seeds | minutes | CPU-min |" in report
    row = next(line for line in report.splitlines() if line.startswith("| `cross_ties` |"))
    assert "—" in row                                          # not run in this invocation
    row = next(line for line in report.splitlines() if line.startswith("| `cross_delta_fusion` |"))
    assert " ± 0.00 " in row and "| 1 |" in row                # one seed: sd 0
    assert "cross_delta_fusion ≥ cross_ties (overall): not measured yet" in report
    assert "codiemb ≥ naive_joint on stsb_test at every seed: not measured yet" in report
    assert "| cross_delta_fusion vs cross_uniform_soup | 42 | overall |" in report
    assert experiments.ANALYSIS_BEGIN in report and "MRPC" in report
    # data beside the page, linked, never pasted: the plot and the resolved configs in RESULTS/
    data_folder = folder / "RESULTS"
    assert (data_folder / "results.png").stat().st_size > 1000
    assert "![results](RESULTS/results.png)" in report and "(RESULTS/configs.json)" in report
    assert "```json" not in report
    section = report.split(experiments.SUITE_BEGIN, 1)[1].split(experiments.SUITE_END, 1)[0]
    assert section.index("## Reading (suite v2)") < section.index("## Targets (suite v2)")   # table, then its reading
    configs = json.loads((data_folder / "configs.json").read_text("utf-8"))
    assert configs["budgets"]["seeds"] == [42] and set(configs["configs"]) == set(configs["keys"]) >= set(RUNS)
    assert configs["keys"]["cross_delta_fusion"]["42"] in json.loads((folder / "results.json").read_text("utf-8"))["runs"]


def test_an_interrupted_fit_stops_the_suite_and_resumes_from_its_last_checkpoint(tmp_path, monkeypatch,
                                                                                  tiny_model_dir):
    data = make_data(tmp_path / "data")
    args = experiments.parse_args(["--quick", "--model", str(tiny_model_dir), "--data", str(data),
                                   "--workdir", str(tmp_path / "work"), "--results", str(tmp_path / "r.json")])
    suite = experiments.Suite(args, experiment_runs.QUICK)
    unit = suite.unit("sts_only_codiemb", 42)
    folder = tmp_path / "work" / "train" / experiment_runs.config_key(unit)
    calls = []

    def fake_codiemb(argv):
        calls.append(argv)
        if len(calls) == 1:    # SIGTERM during the fit: GracefulInterruption saved last.ckpt, exit code 0
            (folder / "checkpoints").mkdir(parents=True)
            (folder / "checkpoints" / "last.ckpt").write_bytes(b"x")
        else:
            (folder / "model").mkdir()
            (folder / "model" / "modules.json").write_text("[]")
        return 0

    monkeypatch.setattr(experiments, "codiemb", fake_codiemb)
    with pytest.raises(experiments.Interrupted):
        suite.train_unit(unit)
    assert calls[0][:3] == ["fit", "--config", str(folder / "fit.yaml")] and "--ckpt_path" not in calls[0]
    assert suite.train_unit(unit) == folder
    assert calls[1][-2:] == ["--ckpt_path", str(folder / "checkpoints" / "last.ckpt")]
    assert suite.train_unit(unit) == folder and len(calls) == 2     # finished: skipped
