"""BOOM and incremental updates on the tiny model: seeded subsets, runs, the Multi-SLERP merge checked
tensor by tensor against `methods.multi_slerp` / `slerp`, the cache, and the YAML `boom:` form.
BOOM runs as a sweep (`workflows.sweep`): OUTPUT/sweep.yaml is the sweep it runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from codiemb_pl.cli.main import main
from codiemb_pl.data.records import IRRecord
from codiemb_pl.data.sources import SourceConfig
from codiemb_pl.errors import InputError
from codiemb_pl.fusion.methods import multi_slerp, slerp
from codiemb_pl.model.encoder import TextEncoder
from codiemb_pl.sweeps.boom import plan_runs
from codiemb_pl.sweeps.subsets import subset_indices, write_subset_sources
from reference_text_path import load_training_records

TINY_CONFIG = Path(__file__).parent / "conf" / "tiny.yaml"
DEMO_SOURCES = [  # as in tiny.yaml: 24 records each
    SourceConfig(name="demo_ir", task="ir", path="pkg://codiemb_pl/demo/ir_train.jsonl", max_samples=24),
    SourceConfig(name="demo_sts", task="sts", path="pkg://codiemb_pl/demo/sts_train.jsonl", max_samples=24),
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def fit_args(model_dir) -> list[str]:
    return ["--model.model_name_or_path", str(model_dir), "--trainer.max_steps", "2"]


def base_state(model_dir) -> dict[str, torch.Tensor]:
    return {k: v for k, v in TextEncoder(str(model_dir)).model.state_dict().items() if not k.startswith("pooler.")}


def test_subsets_are_seeded_and_sized(tmp_path):
    assert subset_indices(24, 0.4, 7, "demo_ir") == subset_indices(24, 0.4, 7, "demo_ir")
    assert subset_indices(24, 0.4, 7, "demo_ir") != subset_indices(24, 0.4, 8, "demo_ir")
    assert subset_indices(24, 0.4, 7, "demo_ir") != subset_indices(24, 0.4, 7, "demo_sts")
    assert len(subset_indices(24, 0.4, 7, "x")) == 10 and subset_indices(24, 1.0, 7, "x") == list(range(24))
    assert len(subset_indices(3, 0.01, 0, "x")) == 1
    written = write_subset_sources(DEMO_SOURCES, 0.6, 5, tmp_path)
    originals = [load_training_records(s) for s in DEMO_SOURCES]
    for source, subset, records in zip(DEMO_SOURCES, written, originals):
        chosen = [records[i] for i in subset_indices(24, 0.6, 5, source.name)]
        assert load_training_records(subset) == chosen and len(chosen) == 14  # round(0.6 * 24)
    assert isinstance(load_training_records(written[0])[0], IRRecord)


def test_plan_runs_pairs_fractions_with_seeds():
    assert [r.name for r in plan_runs([0.4, 1.0])] == ["f0.4_s0", "f1_s1"]
    assert [r.seed for r in plan_runs([0.4, 1.0], [9])] == [9, 9]
    with pytest.raises(InputError, match="2 seeds for 3 fractions"):
        plan_runs([0.2, 0.4, 1.0], [1, 2])
    with pytest.raises(InputError, match="outside"):
        plan_runs([0.0, 1.0])
    with pytest.raises(InputError, match="appear twice"):
        plan_runs([0.5, 0.5], [1])


@pytest.fixture(scope="module")
def boom_output(tiny_model_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("boom")
    argv = ["boom", "--config", str(TINY_CONFIG), "--fractions", "0.5", "1.0", "--seeds", "3",
            "--output", str(output), *fit_args(tiny_model_dir)]
    return output, argv


def test_boom_trains_runs_and_merges_them_with_multi_slerp(boom_output, tiny_model_dir, capsys):
    output, argv = boom_output
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "trained 2 run(s), reused 0" in out
    header = [line for line in out.split("validation metrics\n")[-1].splitlines() if line.startswith("metric")][0]
    assert header.split() == ["metric", "base", "f0.5_s3", "f1_s3", "merged"]
    runs = [output / "runs" / "f0.5_s3", output / "runs" / "f1_s3"]
    assert [len((run / "data" / "demo_ir.jsonl").read_text().splitlines()) for run in runs] == [12, 24]

    base = base_state(tiny_model_dir)
    run_states = [load_file(run / "model" / "model.safetensors") for run in runs]
    merged = load_file(output / "merged" / "model.safetensors")
    assert set(merged) == set(base)
    moved = 0
    for key, theta0 in base.items():
        deltas = [state[key] - theta0 for state in run_states]
        torch.testing.assert_close(merged[key], multi_slerp(theta0, deltas), rtol=1e-5, atol=1e-6)
        moved += int(not torch.equal(merged[key], theta0))
    assert moved > 0

    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(output / "merged"), device="cpu")
    embeddings = model.encode(["one sentence", "and another"], convert_to_tensor=True)
    assert embeddings.shape == (2, 32)
    reference = TextEncoder(str(output / "merged")).encode(["one sentence", "and another"])
    torch.testing.assert_close(embeddings.cpu(), reference, atol=1e-5, rtol=1e-5)
    assert json.loads((output / "evaluation.json").read_text())["merged"]["val/avg"] >= 0.0

    # the sweep BOOM ran: one run per bagging run on its subset files, Multi-SLERP exported to merged/
    sweep = yaml.safe_load((output / "sweep.yaml").read_text())
    assert [run["name"] for run in sweep["runs"]] == ["f0.5_s3", "f1_s3"]
    assert sweep["runs"][0]["seed_everything"] == 3 and sweep["runs"][0]["data.seed"] == 3
    assert [s["path"] for s in sweep["runs"][0]["data.train"]] == [
        str(runs[0] / "data" / "demo_ir.jsonl"), str(runs[0] / "data" / "demo_sts.jsonl")]
    manifest = json.loads((output / "merged" / "merge.json").read_text())
    assert manifest["method"] == "multi_slerp" and manifest["base"] == str(tiny_model_dir)
    assert manifest["models"] == [str(run / "model") for run in runs] and manifest["weights"] is None
    assert manifest["runs"] == [{"name": "f0.5_s3", "fraction": 0.5, "seed": 3},
                                {"name": "f1_s3", "fraction": 1.0, "seed": 3}]
    board = json.loads((output / "leaderboard.json").read_text())
    assert {row["name"] for row in board["ranking"]} == {"base", "f0.5_s3", "f1_s3", "multi_slerp"}


def test_merge_exports_is_the_same_multi_slerp_for_members_trained_elsewhere(boom_output, tiny_model_dir, tmp_path):
    """`merge_exports` (the benchmarks' entry point) merges exports through `codiemb fuse`'s path: the same
    weights as BOOM's merged/, and a merge.json with the caller's manifest."""
    from codiemb_pl.sweeps.boom import merge_exports

    output, _ = boom_output
    exports = [output / "runs" / "f0.5_s3" / "model", output / "runs" / "f1_s3" / "model"]
    merged = merge_exports(str(tiny_model_dir), exports, tmp_path / "merged", manifest={"members": ["x", "y"]})
    ours, boom = load_file(merged / "model.safetensors"), load_file(output / "merged" / "model.safetensors")
    assert set(ours) == set(boom) and all(torch.equal(ours[key], boom[key]) for key in ours)
    assert json.loads((merged / "merge.json").read_text()) == {
        "method": "multi_slerp", "base": str(tiny_model_dir), "models": [str(path) for path in exports],
        "weights": None, "members": ["x", "y"]}
    assert (merged / "modules.json").is_file() and (merged / "tokenizer.json").is_file()


def test_finished_runs_are_reused_and_a_changed_config_is_refused(boom_output, capsys):
    output, argv = boom_output
    exports = sorted((output / "runs").glob("*/model/model.safetensors"))
    before = [path.stat().st_mtime_ns for path in exports]
    assert main(argv + ["--no-evaluate"]) == 0
    assert "trained 0 run(s), reused 2" in capsys.readouterr().out
    assert [path.stat().st_mtime_ns for path in exports] == before
    merged = output / "merged" / "model.safetensors"
    merged_before = merged.stat().st_mtime_ns
    assert main(argv + ["--no-evaluate", "--fuse-only"]) == 0   # the sweep's --fuse-only: merge, train nothing
    printed = capsys.readouterr().out
    assert "run(s)" not in printed and "merged model (Multi-SLERP)" in printed
    assert [path.stat().st_mtime_ns for path in exports] == before and merged.stat().st_mtime_ns > merged_before
    assert main(argv[:-1] + ["3"]) == 2  # --trainer.max_steps 3: the cached runs do not match
    assert "different configuration" in capsys.readouterr().err


def test_incremental_update_from_yaml_merges_update_with_deployed(tiny_model_dir, tmp_path, capsys):
    deployed = tmp_path / "deployed"
    encoder = TextEncoder(str(tiny_model_dir))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.add_(1e-2 * torch.randn(parameter.shape, generator=generator))
    encoder.save(deployed)
    new_data = tmp_path / "new.jsonl"
    new_data.write_text("".join(json.dumps({"query": f"new question {i}", "positives": [f"new answer {i}"],
                                            "negatives": [f"unrelated text {i}"]}) + "\n" for i in range(8)))
    output = tmp_path / "incremental"
    boom_yaml = tmp_path / "update.yaml"
    boom_yaml.write_text(yaml.safe_dump({"boom": {
        "config": str(TINY_CONFIG), "incremental": True, "deployed": str(deployed), "base": str(tiny_model_dir),
        "new_data": [{"name": "fresh", "task": "ir", "path": str(new_data)}], "old_fraction": 0.25, "seed": 4,
        "output": str(output), "evaluate": False,   # the sweep files' override dialect: a mapping
        "overrides": {"model.model_name_or_path": str(tiny_model_dir), "trainer.max_steps": 2}}}))
    assert main(["boom", "--config", str(boom_yaml)]) == 0
    assert "merged model" in capsys.readouterr().out

    update_folder = output / "runs" / "update"   # a sweep run (was output/update before BOOM became a sweep)
    fit = json.loads((update_folder / "sweep_run.json").read_text())["config"]   # the run's resolved config
    assert fit["model"]["model_name_or_path"] == str(deployed)
    assert [s["name"] for s in fit["data"]["train"]] == ["fresh", "old_demo_ir", "old_demo_sts"]
    for name in ("demo_ir", "demo_sts"):  # 25 % of the 24 old records of each sub-dataset
        assert len((update_folder / "old_data" / f"{name}.jsonl").read_text().splitlines()) == 6

    base = base_state(tiny_model_dir)
    deployed_state = load_file(deployed / "model.safetensors")
    update_state = load_file(update_folder / "model" / "model.safetensors")
    merged = load_file(output / "merged" / "model.safetensors")
    differs = 0
    for key, theta0 in base.items():
        deltas = [deployed_state[key] - theta0, update_state[key] - theta0]
        torch.testing.assert_close(merged[key], slerp(theta0, deltas, t=0.5), rtol=1e-5, atol=1e-6)
        differs += int(not torch.equal(update_state[key], deployed_state[key]))
    assert differs > 0  # the update really trained
    manifest = json.loads((output / "merged" / "merge.json").read_text())
    assert manifest["models"] == [str(deployed), str(update_folder / "model")] and manifest["weights"] == [0.5, 0.5]
    assert manifest["base"] == str(tiny_model_dir) and manifest["incremental"] and manifest["old_fraction"] == 0.25


def test_a_token_list_of_overrides_is_refused_with_its_mapping_form(tmp_path, capsys):
    """One override dialect: a `boom:` section's `overrides` is a mapping of dotted keys, as in sweep files; the
    old token list is one line that shows the mapping to write instead, and nothing is written."""
    boom_yaml = tmp_path / "boom.yaml"
    boom_yaml.write_text(yaml.safe_dump({"boom": {
        "config": str(TINY_CONFIG), "fractions": [1.0], "output": str(tmp_path / "out"),
        "overrides": ["--trainer.max_steps", "2", "--data.policy=balanced", "--data.val", "[]", "--model.lr", "1e-3"]}}))
    assert main(["boom", "--config", str(boom_yaml)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{boom_yaml}: boom.overrides: is a list of command-line tokens" in err[0], err
    assert ("write overrides: {trainer.max_steps: 2, data.policy: balanced, data.val: [], model.lr: 0.001}"
            in err[0]), err
    assert not (tmp_path / "out").exists()


def test_missing_output_is_one_line_error(capsys):
    assert main(["boom", "--config", str(TINY_CONFIG), "--fractions", "1.0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no output folder" in err[0]


def test_example_yaml_plans_quickstart_runs_on_their_subsets(tmp_path, capsys, monkeypatch):
    """configs/boom/quickstart.yaml with --print-commands: the runs' subset files, OUTPUT/fit.yaml (the
    quickstart without its per-run CheckpointFusion, folders following each run's root) and one
    `codiemb fit` line per run; nothing trained."""
    from codiemb_pl.commands.boom import collect_options

    repo = Path(__file__).resolve().parents[1]
    argv = ["--config", str(repo / "configs/boom/quickstart.yaml"), "--output", str(tmp_path), "--trainer.max_steps", "5"]
    options, configs, overrides = collect_options(argv)
    assert options["fractions"] == [0.4, 0.6, 0.8, 1.0] and options["output"] == str(tmp_path)
    assert configs == ["configs/quickstart.yaml"] and overrides[-2:] == ["--trainer.max_steps", "5"]

    monkeypatch.chdir(repo)   # the YAML names configs/quickstart.yaml relative to the repository
    import codiemb_pl.cli.fit as fit_api

    builds, build = [], fit_api.build_fit_parser   # BOOM resolves its fit config and both runs with one parser
    monkeypatch.setattr(fit_api, "build_fit_parser", lambda: builds.append(1) or build())
    assert main(["boom", *argv, "--fractions", "0.5", "1.0", "--seeds", "11", "--print-commands"]) == 0
    assert len(builds) == 1
    lines = capsys.readouterr().out.strip().splitlines()[-2:]
    for line, name in zip(lines, ("f0.5_s11", "f1_s11")):
        run = tmp_path / "runs" / name
        assert line.startswith(f"codiemb fit --config {tmp_path / 'fit.yaml'} --seed_everything 11 --data.seed 11 ")
        assert line.endswith(f"--trainer.default_root_dir {run}") and str(run / "data" / "demo_ir.jsonl") in line
    records = [len((tmp_path / "runs" / name / "data" / "demo_ir.jsonl").read_text().splitlines())
               for name in ("f0.5_s11", "f1_s11")]
    assert records[1] > 1 and records[0] == round(0.5 * records[1])
    fit = yaml.safe_load((tmp_path / "fit.yaml").read_text())
    trainer = fit["trainer"]
    assert trainer["max_epochs"] == 1 and trainer["max_steps"] == 5 and trainer["logger"]["init_args"]["save_dir"] is None
    callbacks = {c["class_path"].rsplit(".", 1)[-1]: c.get("init_args") or {} for c in trainer["callbacks"]}
    assert set(callbacks) == {"ModelCheckpoint", "ExportEncoder"}   # no per-run CheckpointFusion
    assert callbacks["ModelCheckpoint"]["dirpath"] is None and callbacks["ExportEncoder"]["dirpath"] is None
    assert not any((tmp_path / "runs" / name / "model").exists() for name in ("f0.5_s11", "f1_s11"))


def test_new_data_sources_from_inline_yaml_or_file(tmp_path):
    from codiemb_pl.sweeps.boom import parse_sources

    inline = "[{name: fresh, task: sts, path: data/new.jsonl, score_range: [0, 5]}]"
    listed = tmp_path / "new.yaml"
    listed.write_text(inline)
    for spec in (inline, str(listed)):
        (source,) = parse_sources(spec, "--new-data")
        assert (source.name, source.task, source.score_range) == ("fresh", "sts", [0, 5])
    with pytest.raises(InputError, match="list of sources"):
        parse_sources("{name: x}", "--new-data")
    with pytest.raises(InputError, match="bad source"):
        parse_sources("[{name: x, task: ir}]", "--new-data")
