"""`codiemb sweep` on the tiny model: two runs trained in-process (the second crashes on its first
attempt, then resumes the sweep with the first one skipped), fusion across them with every method
(leaderboard JSON, the uniform soup checked tensor by tensor, the winner exported and loadable),
`--fuse-only`, `--print-commands`, bad sweep files (one line, exit code 2, nothing written), an edited base
config refusing its finished runs, and what `codiemb boom` needs: fixed members, another θ0, a named merge
exported to its own folder without scoring, with merge.json and the manifest."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import shlex
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from safetensors.torch import load_file

from codiemb_pl.cli.main import main
from codiemb_pl.paths import resolve_location
from codiemb_pl.sweeps.config import plan_sweep
from codiemb_pl.sweeps.leaderboard import fuse_sweep
from codiemb_pl.sweeps.runs import train_runs
from codiemb_pl.sweeps.schema import expand_runs

TINY_CONFIG = Path(__file__).parent / "conf" / "tiny.yaml"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
METHODS = ["delta_guided", "uniform_soup", "greedy_soup", "ties", "dare", "multi_slerp", "self_positioning"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_sweep(folder: Path, content: dict) -> Path:
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


def two_runs(late_ir: Path) -> dict:
    """Run `a` on the demo data; run `b` (another policy and learning rate) on an IR file that only exists
    after the first attempt (the same records: with equal source sizes the two policies draw the same batches)."""
    late_sources = [{"name": "late_ir", "task": "ir", "path": str(late_ir), "max_samples": 24},
                    {"name": "demo_sts", "task": "sts", "path": "pkg://codiemb_pl/demo/sts_train.jsonl",
                     "max_samples": 24}]
    return {
        "overrides": {"trainer.max_steps": 2},
        "runs": [{"name": "a", "data.policy": "proportional"},
                 {"name": "b", "data.policy": "balanced", "model.lr": 1.0e-3, "data.train": late_sources}],
        "fusion": {"checkpoints": ["final"], "methods": [
            {"method": "delta_guided", "params": {"gamma": 1.0}}, {"method": "uniform_soup"},
            {"method": "greedy_soup"}, {"method": "ties", "params": {"density": 0.2}},
            {"method": "dare", "params": {"drop_rate": 0.5}}, {"method": "multi_slerp"},
            {"method": "self_positioning", "params": {"steps": 2, "probe_size": 8, "probe_batch_size": 4}}]},
    }


@pytest.fixture(scope="module")
def sweep_setup(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sweep")
    late_ir = folder / "late_ir.jsonl"
    sweep = write_sweep(folder, two_runs(late_ir))
    argv = ["sweep", "--config", str(TINY_CONFIG), "--sweep", str(sweep), "--output", str(folder / "out"),
            "--model.model_name_or_path", str(tiny_model_dir)]
    return folder, late_ir, argv


@pytest.fixture(scope="module")
def planned(sweep_setup):
    """The module's sweep, planned once (tests change a deep copy)."""
    _, _, argv = sweep_setup
    return plan_sweep(argv[4], config=argv[2], output=argv[6], extra_args=argv[7:])


@dataclass
class SweepAttempt:
    """What one `codiemb sweep` call returned and printed (stdout)."""

    code: int
    out: str


def sweep_printing(argv: list[str]) -> SweepAttempt:
    """`main(argv)` with its stdout captured (capsys is per test; this runs once per module)."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(argv)
    return SweepAttempt(code, stdout.getvalue())


@dataclass
class FinishedSweep:
    """The module's sweep run once, as a user would, and what each attempt left behind."""

    folder: Path
    late_ir: Path
    first: SweepAttempt          # b cannot read its data yet
    a_export_after_first: bool   # runs/a/model/model.safetensors after the first attempt
    board_after_first: bool      # leaderboard.json after the first attempt
    winner_after_first: bool     # OUTPUT/model after the first attempt
    second: SweepAttempt         # the same command once the data is there
    a_mtime_before_second: int
    a_mtime_after_second: int


@pytest.fixture(scope="module")
def finished_sweep(sweep_setup) -> FinishedSweep:
    """Runs the sweep for the whole module: the first attempt crashes in run b (its IR file does not exist yet),
    then the data appears and the same command resumes it (a skipped, b trained, every merge scored and the
    winner exported). The crashed-run test asserts what each attempt printed and left; the other tests read the
    finished output, whichever of them run."""
    folder, late_ir, argv = sweep_setup
    out = folder / "out"
    a_weights = out / "runs" / "a" / "model" / "model.safetensors"
    first = sweep_printing(argv)
    after_first = (a_weights.is_file(), (out / "leaderboard.json").exists(), (out / "model").exists())
    shutil.copy(resolve_location("pkg://codiemb_pl/demo/ir_train.jsonl"), late_ir)
    before = a_weights.stat().st_mtime_ns if a_weights.is_file() else -1
    second = sweep_printing(argv)
    after = a_weights.stat().st_mtime_ns if a_weights.is_file() else -2
    return FinishedSweep(folder, late_ir, first, *after_first, second, before, after)


def test_crashed_run_is_reported_then_resumed_with_the_finished_run_skipped(finished_sweep):
    sweep = finished_sweep
    assert sweep.first.code == 1                # b cannot read its data: reported, a still trained
    assert "run 1/2 a: trained" in sweep.first.out
    assert "run 2/2 b: failed: " in sweep.first.out and str(sweep.late_ir) in sweep.first.out
    assert "Fix them and rerun the same command" in sweep.first.out
    assert sweep.a_export_after_first
    assert not sweep.board_after_first and not sweep.winner_after_first

    assert sweep.second.code == 0
    printed = sweep.second.out
    assert "run 1/2 a: skipped" in printed and "run 2/2 b: trained" in printed
    assert sweep.a_mtime_after_second == sweep.a_mtime_before_second
    assert "sweep leaderboard (2 runs, ranked by val/avg)" in printed


def test_leaderboard_ranks_members_and_every_merge_and_the_winner_is_exported(finished_sweep, tiny_model_dir):
    folder = finished_sweep.folder
    out = folder / "out"
    record = json.loads((out / "leaderboard.json").read_text())
    ranking = record["ranking"]
    names = [row["name"] for row in ranking]
    assert sorted(names) == sorted(["base", "a", "b"] + [
        "delta_guided(gamma=1.0)", "uniform_soup", "greedy_soup", "ties(density=0.2)", "dare(drop_rate=0.5)",
        "multi_slerp", "self_positioning(probe_batch_size=4,probe_size=8,steps=2)"])
    assert {row["kind"] for row in ranking} == {"base", "checkpoint", "fused"}
    scores = [row["metrics"]["val/avg"] for row in ranking]
    assert scores == sorted(scores, reverse=True) and record["winner"] == names[0]
    assert record["sweep"]["runs"][1]["overrides"]["data.policy"] == "balanced"
    assert record["sweep"]["runs"][0]["command"].startswith("codiemb fit --config ")

    # the uniform soup is the mean of the two runs' exports, tensor by tensor
    members = [load_file(out / "runs" / name / "model" / "model.safetensors") for name in ("a", "b")]
    soup = load_file(next(row for row in ranking if row["name"] == "uniform_soup")["weights_path"])
    assert set(soup) == set(members[0])
    for key, value in soup.items():
        torch.testing.assert_close(value, (members[0][key] + members[1][key]) / 2, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(members[0][key], members[1][key]) for key in soup)   # the runs differ

    # the winner is exported as a sentence-transformers folder with a model card and the winner's weights
    from sentence_transformers import SentenceTransformer

    winner = ranking[0]
    exported = load_file(out / "model" / "model.safetensors")
    reference = load_file(winner["weights_path"]) if winner["kind"] != "checkpoint" else \
        load_file(Path(winner["weights_path"]) / "model.safetensors")
    for key, value in exported.items():
        torch.testing.assert_close(value, reference[key])
    card = (out / "model" / "README.md").read_text()
    assert winner["name"] in card
    model = SentenceTransformer(str(out / "model"), device="cpu")
    assert model.encode(["one sentence", "and another"], convert_to_tensor=True).shape == (2, 32)
    assert (out / "leaderboard.md").read_text().startswith("# Sweep leaderboard")


def test_fuse_only_fuses_without_training(finished_sweep, sweep_setup, capsys):
    folder, late_ir, argv = sweep_setup
    out = folder / "out"
    exports = sorted((out / "runs").glob("*/model/model.safetensors"))
    before = [path.stat().st_mtime_ns for path in exports]
    board_before = (out / "leaderboard.json").stat().st_mtime_ns
    soup_only = folder / "soup_only.yaml"   # the same runs, one merge method (the merging is tested above)
    soup_only.write_text(yaml.safe_dump({**two_runs(late_ir), "fusion": {"methods": ["uniform_soup"]}}, sort_keys=False))
    assert main([*argv[:4], str(soup_only), *argv[5:], "--fuse-only"]) == 0
    printed = capsys.readouterr().out
    assert "trained" not in printed and "skipped" not in printed and "sweep leaderboard" in printed
    assert [path.stat().st_mtime_ns for path in exports] == before
    assert (out / "leaderboard.json").stat().st_mtime_ns > board_before


def test_a_run_with_last_ckpt_but_no_export_resumes_from_it(planned, finished_sweep):
    folder = finished_sweep.folder
    run_a = folder / "out" / "runs" / "a"
    assert (run_a / "checkpoints" / "last.ckpt").is_file()
    before = load_file(run_a / "model" / "model.safetensors")
    shutil.rmtree(run_a / "model")                       # as if the process died before the export
    lines = []
    train_runs(planned, log=lines.append)                # (the CLI's resume: the SIGTERM test below)
    printed = "\n".join(lines)
    assert f"a: resuming from the newest complete checkpoint in {run_a}" in printed
    assert "run 1/2 a: trained" in printed and "run 2/2 b: skipped" in printed
    after = load_file(run_a / "model" / "model.safetensors")
    assert all(torch.equal(after[key], value) for key, value in before.items())   # nothing trained again


STEP_CHECKPOINTS = json.dumps({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {
    "every_n_train_steps": 1, "save_top_k": -1, "save_last": True, "filename": "step{step}",
    "auto_insert_metric_name": False}})


@pytest.fixture(scope="module")
def one_finished_run(tiny_model_dir, tmp_path_factory):
    """A one-run sweep (2 steps, a checkpoint after each) trained to the end; each test below leaves it finished."""
    folder = tmp_path_factory.mktemp("one_run")
    sweep = write_sweep(folder, {"overrides": {"trainer.max_steps": 2}, "runs": [{"name": "a"}],
                                 "fusion": {"methods": ["uniform_soup"], "export": "uniform_soup", "evaluate": False}})
    plan = plan_sweep(sweep, config=str(TINY_CONFIG), output=str(folder / "out"),
                      extra_args=["--model.model_name_or_path", str(tiny_model_dir), "--trainer.callbacks", "[]",
                                  "--trainer.callbacks+", STEP_CHECKPOINTS])
    assert [outcome.status for outcome in train_runs(plan, log=lambda line: None)] == ["trained"]
    return plan, plan.run_folder(plan.runs[0])


def mark_unfinished(run_folder: Path) -> None:
    """The run record as a sweep killed during that run's fit leaves it."""
    from codiemb_pl.sweeps.records import RUN_RECORD

    record = json.loads((run_folder / RUN_RECORD).read_text())
    (run_folder / RUN_RECORD).write_text(json.dumps({**record, "finished": False}))


def test_a_run_killed_while_writing_last_ckpt_resumes_from_its_newest_checkpoint(one_finished_run):
    """Found by benchmarks/kill_anywhere.py: a sweep killed while its run wrote last.ckpt at step 2 (after
    step2.ckpt) resumed that run from last.ckpt of step 1, or trained it from the start when there was no
    last.ckpt yet, beside the old checkpoints: Lightning then wrote step2-v1.ckpt next to step2.ckpt."""
    plan, run_a = one_finished_run
    checkpoints = run_a / "checkpoints"
    shutil.copyfile(checkpoints / "step1.ckpt", checkpoints / "last.ckpt")   # step 2's last.ckpt never landed
    shutil.rmtree(run_a / "model")
    mark_unfinished(run_a)
    lines = []
    assert [outcome.status for outcome in train_runs(plan, log=lines.append)] == ["trained"]
    assert sorted(path.name for path in checkpoints.iterdir()) == ["last.ckpt", "step1.ckpt", "step2.ckpt"]
    assert torch.load(checkpoints / "last.ckpt", weights_only=True, mmap=True)["global_step"] == 2
    assert f"a: resuming from the newest complete checkpoint in {run_a}" in "\n".join(lines)


def test_a_run_whose_fit_did_not_end_is_not_skipped_because_its_export_exists(one_finished_run):
    """Found by benchmarks/kill_anywhere.py: the export is written before the fit ends (its CheckpointFusion and
    end-of-fit validation follow); a sweep killed in between counted the run as finished on the next attempt and
    skipped it for good, with its fusion unfinished and its lock and temporaries left in its folder."""
    plan, run_a = one_finished_run
    mark_unfinished(run_a)
    lines = []
    assert [outcome.status for outcome in train_runs(plan, log=lines.append)] == ["trained"]
    assert f"a: resuming from the newest complete checkpoint in {run_a}" in "\n".join(lines)
    assert json.loads((run_a / "sweep_run.json").read_text())["finished"] is True
    assert [outcome.status for outcome in train_runs(plan, log=lines.append)] == ["skipped"]


def test_the_temporaries_of_a_killed_sweep_are_removed_when_it_runs_again(one_finished_run, capsys):
    """Found by benchmarks/kill_anywhere.py: a sweep killed during its own fusion or export left its staging
    folders and temporary files in OUTPUT for good (each fit cleans its own run folder; nothing cleaned the
    sweep's). The export is staged twice (the folder, then `TextEncoder.save` into it): `..model.tmp-*.tmp-*`."""
    from codiemb_pl.sweeps.sweep import execute_sweep

    plan, _ = one_finished_run
    out = plan.output
    planted = [out / ".model.tmp-k1ll3d00", out / "..model.tmp-k1ll3d00.tmp-4b3c", out / ".leaderboard.json.tmp-x1",
               out / "fusion" / ".base.safetensors.tmp-x2",
               out / "fusion" / "candidates" / ".uniform_soup.safetensors.tmp-x3"]
    for path in planted:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")
    (out / ".notes.tmp-mine").write_text("not a name the sweep writes in OUTPUT")
    lines = []
    assert execute_sweep(plan, fuse_only=True, log=lines.append).code == 0
    assert not [path for path in planted if path.exists()]
    assert (out / ".notes.tmp-mine").is_file() and (out / "model" / "modules.json").is_file()
    assert any(line.startswith("[codiemb sweep] removed 5 temporary") for line in lines), lines


def test_a_run_record_a_killed_sweep_was_writing_is_removed_when_it_runs_again(one_finished_run):
    """Found by the full kill_anywhere run (seed 0, sweep trial 26): a sweep killed while writing a run's
    `sweep_run.json` left `.sweep_run.json.tmp-*` in that run's folder, where neither the run's fit (it cleans
    what the fit writes) nor the sweep (OUTPUT and OUTPUT/fusion only) looked."""
    from codiemb_pl.sweeps.sweep import execute_sweep

    plan, run_a = one_finished_run
    planted = run_a / ".sweep_run.json.tmp-pf55y9o8"
    planted.write_text('{"name": "a", "comm')
    (run_a / ".notes.tmp-mine").write_text("not a name the sweep writes in a run folder")
    lines = []
    assert execute_sweep(plan, fuse_only=True, log=lines.append).code == 0
    assert not planted.exists() and (run_a / ".notes.tmp-mine").is_file()
    assert any(line.startswith("[codiemb sweep] removed 1 temporary") for line in lines), lines
    (run_a / ".notes.tmp-mine").unlink()


class SigtermOnce(pl.Callback):
    """Send this process SIGTERM after the first optimizer step, once (the marker file remembers it)."""

    def __init__(self, marker: str = ""):
        self.marker = Path(marker)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.marker.exists():
            self.marker.write_text("sent")
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_stops_the_sweep_and_the_same_command_resumes_it(tiny_model_dir, tmp_path, capsys):
    sweep = write_sweep(tmp_path, {"overrides": {"trainer.max_steps": 3},
                                   "runs": [{"name": "a"}, {"name": "b", "model.lr": 1.0e-3}],
                                   "fusion": {"methods": ["uniform_soup"], "export": "uniform_soup",
                                              "evaluate": False}})
    out = tmp_path / "out"
    argv = ["sweep", "--config", str(TINY_CONFIG), "--sweep", str(sweep), "--output", str(out),
            "--model.model_name_or_path", str(tiny_model_dir),
            "--trainer.callbacks+=test_sweep.SigtermOnce", f"--trainer.callbacks.marker={tmp_path / 'sent'}"]
    assert main(argv) == 0                                # a deliberate stop, as `codiemb fit`
    printed = capsys.readouterr().out
    assert "run 1/2 a: interrupted" in printed and "rerun the same command to resume" in printed
    assert (out / "runs" / "a" / "checkpoints" / "last.ckpt").is_file() and not (out / "runs" / "b").exists()
    assert not list(out.rglob(".codiemb.lock*")), "the interrupted sweep left a run lock behind"
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"a: resuming from the newest complete checkpoint in {out / 'runs' / 'a'}" in printed
    assert "run 1/2 a: trained" in printed and "run 2/2 b: trained" in printed
    assert json.loads((out / "leaderboard.json").read_text())["exported"] == str(out / "model")


def test_fuse_only_with_an_unfinished_run_is_one_line(tiny_model_dir, tmp_path, capsys):
    sweep = write_sweep(tmp_path, {"runs": [{"name": "x", "model.lr": 1.0e-3}],
                                   "fusion": {"methods": ["uniform_soup"]}})
    code = main(["sweep", "--config", str(TINY_CONFIG), "--sweep", str(sweep), "--output", str(tmp_path / "out"),
                 "--model.model_name_or_path", str(tiny_model_dir), "--fuse-only"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "run 'x'" in err and "has not finished" in err and "codiemb fit --config" in err
    assert not (tmp_path / "out").exists()


def test_print_commands_prints_one_fit_line_per_run_and_writes_nothing(tiny_model_dir, tmp_path, capsys):
    sweep = write_sweep(tmp_path, {"overrides": {"trainer.max_steps": 3},
                                   "grid": {"data.policy": ["proportional", "temperature"], "model.lr": [1.0e-4]}})
    out = tmp_path / "out"
    assert main(["sweep", "--config", str(TINY_CONFIG), "--sweep", str(sweep), "--output", str(out),
                 "--model.model_name_or_path", str(tiny_model_dir), "--print-commands"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [
        f"codiemb fit --config {TINY_CONFIG} --model.model_name_or_path {tiny_model_dir} "
        "--trainer.callbacks+ codiemb_pl.callbacks.ExportEncoder "   # tiny.yaml exports nothing: the sweep adds it
        f"--trainer.max_steps 3 --data.policy {policy} --model.lr 0.0001 "
        f"--trainer.default_root_dir {out}/runs/policy-{policy}_lr-0.0001"
        for policy in ("proportional", "temperature")]
    assert shlex.split(lines[0])[:2] == ["codiemb", "fit"]
    assert not out.exists()


def test_listed_runs_times_grid_points():
    runs = expand_runs({"runs": [{"name": "p", "data.policy": "proportional"},
                                 {"name": "b", "data.policy": "balanced"}],
                        "grid": {"seed_everything": [1, 2]}}, "s.yaml")
    assert [(r.name, r.overrides) for r in runs] == [
        ("p_seed_everything-1", {"data.policy": "proportional", "seed_everything": 1}),
        ("p_seed_everything-2", {"data.policy": "proportional", "seed_everything": 2}),
        ("b_seed_everything-1", {"data.policy": "balanced", "seed_everything": 1}),
        ("b_seed_everything-2", {"data.policy": "balanced", "seed_everything": 2})]


BAD_SWEEPS = [  # (sweep file content, words the one error line must hold)
    ({"runs": [{"name": "a", "data.polcy": "balanced"}]}, ["run 'a'", "data.polcy", "did you mean data.policy"]),
    ({"runs": [{"name": "a", "data.ir_batch_size": "many"}]}, ["run 'a'", "ir_batch_size", "does not resolve"]),
    ({"runs": [{"data.policy": "balanced"}]}, ["runs[0]", "name"]),
    ({"runs": [{"name": "a"}, {"name": "a", "model.lr": 0.1}]}, ["run 'a'", "two runs have this name"]),
    ({"runs": [{"name": "a/b"}]}, ["run 'a/b'", "folder name"]),
    ({"runs": [{"name": "a", "trainer.default_root_dir": "x"}]}, ["run 'a'", "trainer.default_root_dir", "cannot"]),
    ({"runs": [{"name": "a"}], "fusion": {"checkpoints": ["best_ir"]}},
     ["run 'a'", "best_ir", "collect: [..., best_ir]"]),
    ({"runs": [{"name": "a"}], "fusion": {"checkpoints": ["middle"]}}, ["fusion.checkpoints: middle", "unknown"]),
    ({"runs": [{"name": "a"}], "fusion": {"methods": ["mystery"]}}, ["fusion.methods[0]", "mystery"]),
    ({"runs": [{"name": "a"}], "grid": {"seed_everything": 3}}, ["grid: seed_everything", "list"]),
    ({"run": [{"name": "a"}]}, ["run", "unknown sweep key"]),
    ({"runs": [{"name": "a"}], "fusion": {"methods": ["multi_slerp"], "evaluate": False}},
     ["fusion.evaluate", "no winner", "export: multi_slerp"]),
    ({"runs": [{"name": "a"}], "fusion": {"methods": ["greedy_soup"], "evaluate": False, "export": "greedy_soup"}},
     ["fusion.methods", "greedy_soup needs scores"]),
    ({"runs": [{"name": "a"}], "fusion": {"methods": ["multi_slerp"], "export": "mystery"}},
     ["fusion.export: mystery", "no such candidate"]),
    ({"runs": [{"name": "a"}], "fusion": {"members": [{"name": "a", "path": "."}]}},
     ["fusion.members: a", "name is taken"]),
    ({"runs": [{"name": "a"}], "fusion": {"members": [{"name": "old", "path": "no/such/model"}]}},
     ["fusion.members[0]", "does not exist"]),
    ({"runs": [{"name": "a"}], "fusion": {"export_folder": "runs"}}, ["fusion.export_folder", "leaves free"]),
    ({}, ["no runs"]),
    # fusion settings are checked before any run trains (issue 27: a bad metric trained every run, then
    # exported nothing with exit code 0; `methods: 5` was a traceback)
    ({"runs": [{"name": "a"}], "fusion": {"metric": "val/nonexistent"}},
     ["fusion.metric", "'val/nonexistent'", "not a metric the validation sets give", "val/avg", "val/<set>/<metric>"]),
    ({"runs": [{"name": "a"}], "fusion": {"metric": "val/demo_ir_dev/ndcg@10"}},
     ["fusion.metric", "did you mean val/demo_ir_dev/ndcg_at_10?"]),
    ({"runs": [{"name": "a"}], "fusion": {"methods": 5}}, ["fusion.methods", "must be a list of merge methods"]),
    ({"runs": [{"name": "a"}], "fusion": {"methods": [5]}}, ["fusion.methods[0]", "a method name or a mapping"]),
    ({"runs": [{"name": "a"}], "fusion": {"methods": ["multi_slep"]}},
     ["fusion.methods[0]", "unknown merge method 'multi_slep'", "did you mean multi_slerp?"]),
    ({"runs": [{"name": "a"}], "fusion": {"methods": [{"method": "ties", "params": {"density": 1.5}}]}},
     ["fusion.methods[0]", "density=1.5 is outside"]),
    ({"runs": [{"name": "a"}], "fusion": {"methods": [{"method": "ties", "params": 0.2}]}},
     ["fusion.methods[0]", "params must be a mapping"]),
    ({"runs": [{"name": "a"}, {"name": "b"}], "fusion": {"methods": [{"method": "uniform_soup", "weights": [1, 2, 3]}]}},
     ["fusion.methods[0]", "3 weights for 2 members"]),
    ({"runs": [{"name": "a"}, {"name": "b"}, {"name": "c"}], "fusion": {"methods": ["slerp"]}},
     ["fusion.methods[0]", "slerp merges exactly 2 checkpoints, got 3"]),
    ({"runs": [{"name": "a"}], "fusion": {"methods": [{"method": "self_positioning", "params": {"step": 5}}]}},
     ["fusion.methods[0]", "unknown parameter(s) ['step']", "steps"]),
    # the file's keys and types (jsonargparse dataclasses): the key, what it must be, the nearest valid key
    ({"runs": [{"name": "a"}], "fusion": {"metrc": "val/avg"}},
     ["fusion.metrc", "unknown fusion key", "did you mean fusion.metric?"]),
    ({"runs": [{"name": "a"}], "outputs": "x"}, ["outputs", "unknown sweep key", "did you mean output?"]),
    ({"runs": [{"name": "a"}], "fusion": {"evaluate": 3}}, ["fusion.evaluate", "must be true or false, got 3"]),
    ({"runs": 5}, ["runs", "must be a list of runs, got 5", "e.g. runs: [{name: a"]),
    ({"runs": [{"name": "a"}], "fusion": {"seed": "zero"}}, ["fusion.seed", "must be an integer, got 'zero'"]),
    ({"runs": [{"name": "a", "trainer.callbacks": [{"class_path": "codiemb_pl.callbacks.CheckpointFusion",
                                                     "init_args": {"metric": "val/sts_average"}}]}]},
     ["run 'a'", "CheckpointFusion.metric", "did you mean val/sts_avg?"]),
]


@pytest.mark.parametrize("content,words", BAD_SWEEPS, ids=[str(i) for i in range(len(BAD_SWEEPS))])
def test_bad_sweep_file_is_one_line_and_writes_nothing(content, words, tiny_model_dir, tmp_path, capsys):
    sweep = write_sweep(tmp_path, content)
    code = main(["sweep", "--config", str(TINY_CONFIG), "--sweep", str(sweep), "--output", str(tmp_path / "out"),
                 "--model.model_name_or_path", str(tiny_model_dir)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert str(sweep) in err
    for word in words:
        assert word in err, (word, err)
    assert not (tmp_path / "out").exists()


def test_duplicate_keys_and_bad_yaml_are_one_line(tmp_path, capsys):
    sweep = tmp_path / "sweep.yaml"
    for text, word in (("runs:\n  - {name: a, data.policy: x, data.policy: y}\n", "given twice"),
                       ("runs: [\n", "not valid YAML")):
        sweep.write_text(text)
        assert main(["sweep", "--config", str(TINY_CONFIG), "--sweep", str(sweep)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and word in err and str(sweep) in err


@pytest.mark.parametrize("sweep", sorted((CONFIGS / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_example_sweep_files_plan(sweep, monkeypatch, tmp_path):
    """Every sweep file under configs/sweeps plans against its base config (every run resolved by the CLI);
    the output goes elsewhere, so runs already in the repository's runs/ folder do not count."""
    monkeypatch.chdir(CONFIGS.parent)
    plan = plan_sweep(sweep, output=str(tmp_path / "out"))
    assert len(plan.runs) >= 2 and plan.checkpoints and plan.methods
    policies = {name: config["data"]["policy"] for name, config in plan.run_configs.items()}
    if sweep.name == "policies.yaml":
        assert policies == {"proportional": "proportional", "balanced": "balanced", "temperature": "temperature"}
        assert {config["seed_everything"] for config in plan.run_configs.values()} == {42}


def test_leaderboard_reaches_a_wandb_logger_of_the_base_config(planned, finished_sweep, tmp_path, monkeypatch):
    """With a WandbLogger in the base config, the sweep's leaderboard is a `sweep/leaderboard` W&B table."""
    monkeypatch.setenv("WANDB_MODE", "offline")   # put back after: WandbLogger(offline=True) sets it to "dryrun"
    plan = copy.deepcopy(planned)
    plan.methods = plan.methods[1:2]   # uniform_soup only: the table, not the merges, is under test
    plan.resolved["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {
        "project": "codiemb-test", "save_dir": str(tmp_path), "offline": True}}
    fuse_sweep(plan, show_progress=False)
    table = json.loads(next(tmp_path.rglob("sweep/leaderboard*.table.json")).read_text())
    assert table["columns"][:3] == ["rank", "candidate", "kind"] and "val/avg" in table["columns"]
    assert sorted(row[1] for row in table["data"]) == ["a", "b", "base", "uniform_soup"]
    assert [row[0] for row in table["data"]] == [1, 2, 3, 4]


def test_an_edited_base_config_refuses_its_finished_runs(tiny_model_dir, tmp_path):
    """sweep_run.json keeps the run's resolved config: the same command over an edited base config (as
    `codiemb boom` reruns over a rewritten OUTPUT/fit.yaml) is refused, not silently reused."""
    from codiemb_pl.errors import InputError
    from codiemb_pl.sweeps.records import RUN_RECORD

    base = tmp_path / "base.yaml"
    base.write_text(TINY_CONFIG.read_text().replace("REPLACED_BY_TEST", str(tiny_model_dir)))
    sweep = write_sweep(tmp_path, {"runs": [{"name": "a"}], "fusion": {"methods": ["uniform_soup"]}})
    plan = plan_sweep(sweep, config=str(base), output=str(tmp_path / "out"))
    (run,) = plan.runs
    export = plan.run_folder(run) / "model"   # a finished run, as train_run records it
    export.mkdir(parents=True)
    (export / "modules.json").write_text("[]")
    (export / "model.safetensors").write_bytes(b"")
    record = {"name": "a", "command": plan.fit_args(run), "overrides": {}, "config": plan.run_configs["a"]}
    (plan.run_folder(run) / RUN_RECORD).write_text(json.dumps(record))
    base.write_text(base.read_text().replace("lr: 1.0e-4", "lr: 2.0e-4"))   # (an unchanged config is reused:
    with pytest.raises(InputError, match="finished run made with a different configuration"):   # the resume
        plan_sweep(sweep, config=str(base), output=str(tmp_path / "out"))                  # tests above)


def perturbed_copy(model_dir, folder: Path, seed: int) -> Path:
    from codiemb_pl.model.encoder import TextEncoder

    encoder = TextEncoder(str(model_dir))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.add_(1e-2 * torch.randn(parameter.shape, generator=generator))
    encoder.save(folder)
    return folder


def test_fusion_keys_for_fixed_members_another_base_and_a_named_export(tmp_path):
    from codiemb_pl.sweeps.fusion_section import fusion_options

    options = fusion_options({"base": str(tmp_path), "members": [{"name": "old", "path": str(tmp_path)}],
                              "methods": [{"method": "multi_slerp", "weights": [1, 3]}], "export": "multi_slerp",
                              "export_folder": "merged", "evaluate": False}, "s.yaml")
    assert (options.base, options.members, options.export, options.export_folder, options.evaluate) == (
        str(tmp_path), [("old", str(tmp_path))], "multi_slerp", "merged", False)
    assert options.methods[0].weights == [1.0, 3.0]
    defaults = fusion_options(None, "s.yaml")
    assert (defaults.base, defaults.members, defaults.export, defaults.export_folder, defaults.evaluate) \
        == (None, [], None, "model", True)


def test_fixed_member_own_base_and_a_named_merge_exported_without_scoring(planned, finished_sweep, tiny_model_dir,
                                                                           tmp_path):
    """What `codiemb boom --incremental` runs on: θ* = θ0' + MultiSLERP(fixed − θ0', a − θ0', b − θ0'; weights)
    exported by name to OUTPUT/merged with merge.json and the manifest, nothing scored."""
    from codiemb_pl.fusion.methods import multi_slerp
    from codiemb_pl.workflows.fusion.settings import parse_methods

    out = finished_sweep.folder / "out"
    theta0, fixed = perturbed_copy(tiny_model_dir, tmp_path / "theta0", 1), perturbed_copy(tiny_model_dir, tmp_path / "fixed", 2)
    plan = copy.deepcopy(planned)
    plan.base_model, plan.members, plan.manifest = str(theta0), [("fixed", str(fixed))], {"purpose": "test"}
    plan.methods = parse_methods([{"method": "multi_slerp", "weights": [0.5, 0.25, 0.25]}, "uniform_soup"])
    plan.export, plan.export_folder, plan.evaluate = "multi_slerp", "merged", False
    winner = out / "model" / "model.safetensors"
    winner_before = winner.stat().st_mtime_ns
    lines = []
    fuse_sweep(plan, log=lines.append, show_progress=False)
    assert any("not scored: fusion.evaluate is false" in line for line in lines)
    assert f"[codiemb sweep] exported multi_slerp to {out / 'merged'}" in lines
    assert winner.stat().st_mtime_ns == winner_before   # the earlier winner export is left alone

    members = [load_file(path / "model.safetensors") for path in (fixed, out / "runs" / "a" / "model",
                                                                  out / "runs" / "b" / "model")]
    base = load_file(theta0 / "model.safetensors")
    merged = load_file(out / "merged" / "model.safetensors")
    assert set(merged) == set(base)
    for key, value in merged.items():
        expected = multi_slerp(base[key], [member[key] - base[key] for member in members], weights=[0.5, 0.25, 0.25])
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    manifest = json.loads((out / "merged" / "merge.json").read_text())
    assert manifest["method"] == "multi_slerp" and manifest["name"] == "multi_slerp" and manifest["base"] == str(theta0)
    assert manifest["models"] == [str(fixed), str(out / "runs" / "a" / "model"), str(out / "runs" / "b" / "model")]
    assert manifest["weights"] == [0.5, 0.25, 0.25] and manifest["metrics"] == {} and manifest["purpose"] == "test"
    record = json.loads((out / "leaderboard.json").read_text())
    assert [row["name"] for row in record["ranking"]] == ["base", "fixed", "a", "b", "multi_slerp", "uniform_soup"]
    assert record["winner"] is None and all(row["metrics"] == {} for row in record["ranking"])
    assert record["manifest"] == {"purpose": "test"} and record["exported"] == str(out / "merged")
    assert record["sweep"]["base_model"] == str(theta0) and record["sweep"]["members"][0]["name"] == "fixed"


def test_a_member_whose_checkpoint_runs_code_is_refused_unless_trusted(planned, finished_sweep, tmp_path):
    """`fusion.members` are opened under `checkpoint_loading`'s rule: a pickle that would run code is one
    line naming the file and nothing runs; `--trust-checkpoint` (the sweep's `trusted_checkpoints` block)
    unpickles it (this hand-made file then holds no weights)."""
    from codiemb_pl.storage.checkpoint_loading import trusted_checkpoints
    from codiemb_pl.errors import InputError
    from codiemb_pl.workflows.fusion.settings import parse_methods
    from malicious_checkpoints import crafted_zip_checkpoint

    marker = tmp_path / "code_ran"
    plan = copy.deepcopy(planned)
    plan.members = [("evil", str(crafted_zip_checkpoint(tmp_path / "member.ckpt", marker)))]
    plan.methods, plan.evaluate, plan.export = parse_methods(["uniform_soup"]), False, None
    with pytest.raises(InputError, match=r"member\.ckpt: names exec"):
        fuse_sweep(plan, log=lambda line: None, show_progress=False)
    assert not marker.exists()
    with trusted_checkpoints(), pytest.raises(InputError, match=r"member\.ckpt: the checkpoint has no encoder"):
        fuse_sweep(plan, log=lambda line: None, show_progress=False)
    assert marker.exists()


# -- issue 21: one parser per sweep, one fuse_and_export, resume across versions ------------------------------

def test_planning_builds_one_fit_parser_and_no_cli(tiny_model_dir, tmp_path, monkeypatch):
    """Every run's config is resolved by one `codiemb fit` parser, built once per sweep; no CLI is constructed
    (before: one whole `codiemb fit --print_config` per run, plus one or two for the base config)."""
    import codiemb_pl.cli.fit as fit_api

    builds, clis = [], []
    build = fit_api.build_fit_parser
    monkeypatch.setattr(fit_api, "build_fit_parser", lambda: builds.append(1) or build())
    monkeypatch.setattr(fit_api, "build_cli", lambda *args: clis.append(args))
    sweep = write_sweep(tmp_path, {"grid": {"model.lr": [1.0e-4, 2.0e-4, 3.0e-4]}, "fusion": {"methods": ["uniform_soup"]}})
    plan = plan_sweep(sweep, config=str(TINY_CONFIG), output=str(tmp_path / "out"),
                      extra_args=["--model.model_name_or_path", str(tiny_model_dir)])
    assert len(plan.runs) == 3 and len(builds) == 1 and not clis
    assert [config["model"]["lr"] for config in plan.run_configs.values()] == [1.0e-4, 2.0e-4, 3.0e-4]


def test_a_run_recorded_before_the_move_resumes_from_its_last_ckpt(planned, finished_sweep):
    """A sweep_run.json written before `data.verify_cache` existed still matches (the key is at its default): the
    run resumes from its last.ckpt instead of training again from the start. (Old class paths: the test below.)"""
    from codiemb_pl.sweeps.records import RUN_RECORD

    run_a = finished_sweep.folder / "out" / "runs" / "a"
    record = json.loads((run_a / RUN_RECORD).read_text())
    del record["config"]["data"]["verify_cache"]                  # added this week, at its default in this run
    (run_a / RUN_RECORD).write_text(json.dumps(record))
    plan = copy.deepcopy(planned)
    assert record["config"] != plan.run_configs["a"] and plan.same_settings(plan.runs[0], record)
    before = load_file(run_a / "model" / "model.safetensors")
    shutil.rmtree(run_a / "model")
    lines = []
    train_runs(plan, log=lines.append)
    printed = "\n".join(lines)
    assert f"a: resuming from the newest complete checkpoint in {run_a}" in printed and "run 1/2 a: trained" in printed
    after = load_file(run_a / "model" / "model.safetensors")
    assert all(torch.equal(after[key], value) for key, value in before.items())


def test_a_finished_run_recorded_before_the_move_is_reused_and_a_changed_value_is_not(tiny_model_dir, tmp_path):
    """A finished run whose record has 0.1's class paths (command and config) and lacks `data.verify_cache` is
    reused; the same record against a base config that sets `verify_cache: true` is a different configuration."""
    from codiemb_pl.errors import InputError
    from codiemb_pl.sweeps.records import RUN_RECORD

    base = tmp_path / "base.yaml"
    base.write_text(TINY_CONFIG.read_text().replace("REPLACED_BY_TEST", str(tiny_model_dir)))
    sweep = write_sweep(tmp_path, {"runs": [{"name": "a", "trainer.logger": {
        "class_path": "codiemb_pl.training.loggers.CSVLogger"}}], "fusion": {"methods": ["uniform_soup"]}})
    plan = plan_sweep(sweep, config=str(base), output=str(tmp_path / "out"))
    (run,) = plan.runs
    export = plan.run_folder(run) / "model"
    export.mkdir(parents=True)
    (export / "modules.json").write_text("[]")
    (export / "model.safetensors").write_bytes(b"")
    old = json.loads(json.dumps(plan.run_configs["a"]).replace("codiemb_pl.training.loggers.CSVLogger",
                                                                "codiemb_pl.run_folder.CSVLogger"))
    del old["data"]["verify_cache"]
    command = [token.replace("codiemb_pl.training.loggers.CSVLogger", "codiemb_pl.run_folder.CSVLogger")
               for token in plan.fit_args(run)]
    assert old != plan.run_configs["a"] and command != plan.fit_args(run)
    (plan.run_folder(run) / RUN_RECORD).write_text(json.dumps({"name": "a", "command": command, "config": old}))
    replanned = plan_sweep(sweep, config=str(base), output=str(tmp_path / "out"))
    lines = []
    assert [o.status for o in train_runs(replanned, log=lines.append)] == ["skipped"]
    base.write_text(base.read_text().replace("data:\n", "data:\n  verify_cache: true\n"))
    with pytest.raises(InputError, match="finished run made with a different configuration"):
        plan_sweep(sweep, config=str(base), output=str(tmp_path / "out"))


def test_checkpoint_fusion_the_sweep_and_boom_fuse_the_same_members_alike(planned, finished_sweep, tiny_model_dir,
                                                                           tmp_path):
    """One `fuse_and_export`: the runs' exports a and b fused by a sweep, by BOOM (the same exports as its two
    bagged runs, --fuse-only) and by CheckpointFusion (as two snapshots of one run) give the same scores for base,
    members and merges, the same winner export (sweep, CheckpointFusion) and the same Multi-SLERP (sweep, BOOM)."""
    from types import SimpleNamespace

    from codiemb_pl.callbacks.fusion import CheckpointFusion
    from codiemb_pl.data.eval_builders import build_eval_sets
    from codiemb_pl.fusion.writer import save_state_dict
    from codiemb_pl.model.encoder import TextEncoder
    from codiemb_pl.sweeps.boom import BoomRun, run_boom
    from codiemb_pl.workflows.encoders import transformer_state
    from codiemb_pl.workflows.fusion.settings import parse_methods

    exports = {name: finished_sweep.folder / "out" / "runs" / name / "model" for name in ("a", "b")}
    plan = copy.deepcopy(planned)
    plan.output, plan.methods = tmp_path / "sweep", parse_methods(["uniform_soup", "multi_slerp"])
    for name, folder in exports.items():
        shutil.copytree(folder, plan.output / "runs" / name / "model")
    sweep_board = fuse_sweep(plan, log=lambda line: None, show_progress=False).board

    boom_output = tmp_path / "boom"
    for name, folder in zip(("f0.5_s0", "f1_s0"), exports.values()):
        shutil.copytree(folder, boom_output / "runs" / name / "model")
    boom = run_boom(plan.resolved, [BoomRun(0.5, 0), BoomRun(1.0, 0)], boom_output, evaluate=True, fuse_only=True,
                    log=lambda line: None)

    data = plan.resolved["data"]
    sets = build_eval_sets(data["val"], instruction_template=data.get("instruction_template"),
                                 passage_prefix=data.get("passage_prefix"), where="data.val")
    fusion = CheckpointFusion(dirpath=str(tmp_path / "fusion"), methods=["uniform_soup", "multi_slerp"],
                              eval_batch_size=plan.eval_batch_size)
    trainer = SimpleNamespace(datamodule=SimpleNamespace(val_sets=sets, train_sources=[]), loggers=[], global_step=2,
                              default_root_dir=str(tmp_path))
    save_state_dict(transformer_state(str(tiny_model_dir)), fusion.base_path(trainer))
    for step, name in ((1, "a"), (2, "b")):
        shutil.copy(exports[name] / "model.safetensors", fusion.snapshot_path(trainer, step))
        fusion.snapshots[step] = [name]
    callback_board = fusion.fuse(trainer, SimpleNamespace(hparams={}),
                                 TextEncoder(str(exports["a"]), include_prompt=False))

    renamed = {"f0.5_s0": "a", "f1_s0": "b"}
    scores = [{renamed.get(c.name, c.name): c.metrics for c in board.candidates}
              for board in (sweep_board, callback_board, boom["board"])]
    assert set(scores[0]) == set(scores[1]) == {"base", "a", "b", "uniform_soup", "multi_slerp"}
    assert set(scores[2]) == {"base", "a", "b", "multi_slerp"}
    for other in scores[1:]:
        for name, metrics in other.items():
            assert metrics.keys() == scores[0][name].keys() and metrics["val/avg"] == pytest.approx(
                scores[0][name]["val/avg"], abs=1e-6) and math.isfinite(metrics["val/avg"]), name
    assert sweep_board.winner().name == callback_board.winner().name
    sweep_export, callback_export = (load_file(folder / "model.safetensors")
                                     for folder in (plan.output / "model", tmp_path / "fusion" / "model"))
    assert sweep_export.keys() == callback_export.keys()
    assert all(torch.equal(sweep_export[key], callback_export[key]) for key in sweep_export)
    slerp = load_file(next(c for c in sweep_board.candidates if c.name == "multi_slerp").weights_path)
    merged = load_file(Path(boom["merged"]) / "model.safetensors")
    assert all(torch.allclose(merged[key], slerp[key], atol=1e-6) for key in slerp)
