"""The library API beneath `codiemb fit` (`codiemb_pl.cli.fit`): `resolve_fit_config` is what `--print_config`
prints, from the parser object (no printed text); bad input raises `InputError` (no exit code); `run_fit` runs a
fit in-process and returns its folders, fusion result and metrics, or `interrupted` (SIGTERM), and resumes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from codiemb_pl.cli.fit import FitConfigParser, resolve_fit_config, run_fit
from codiemb_pl.cli.main import main
from codiemb_pl.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = Path(__file__).parent / "conf" / "tiny.yaml"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("config", ["configs/quickstart.yaml", "configs/my_data.yaml"])
def test_resolve_fit_config_is_what_print_config_prints(config, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as printed_and_exited:   # jsonargparse prints, then exits 0
        main(["fit", "--config", config, "--trainer.max_steps", "3", "--print_config"])
    assert printed_and_exited.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    parser = FitConfigParser()
    resolved = resolve_fit_config(["--config", config, "--trainer.max_steps", "3"], parser)
    assert resolved == printed and resolved["trainer"]["max_steps"] == 3
    assert resolve_fit_config(resolved, parser) == resolved            # a resolved config resolves to itself
    assert json.loads(json.dumps(resolved)) == resolved               # plain data (a sweep records it as JSON)


def test_bad_input_raises_one_input_error(tmp_path, tiny_model_dir):
    with pytest.raises(InputError, match=r"unknown key --data\.polcy \(did you mean --data\.policy\?"):
        resolve_fit_config(["--config", str(TINY_CONFIG), "--data.polcy", "balanced"])
    with pytest.raises(InputError, match=r"data\.policy: unknown sampler policy 'fair'"):
        resolve_fit_config(["--config", str(TINY_CONFIG), "--data.policy", "fair"])
    moved = {"trainer": {"logger": {"class_path": "codiemb_pl.run_folder.CSVLogger"}}}
    with pytest.raises(InputError, match=r"fit config: trainer\.logger\.class_path: codiemb_pl\.run_folder\.CSVLogger "
                                         r"moved to codiemb_pl\.training\.loggers\.CSVLogger"):
        resolve_fit_config(moved)
    missing = tmp_path / "absent.jsonl"   # met inside the fit (the data module reads it): raised, not an exit code
    with pytest.raises(InputError, match="absent.jsonl"):
        run_fit(["--config", str(TINY_CONFIG), "--model.model_name_or_path", str(tiny_model_dir),
                 "--trainer.default_root_dir", str(tmp_path / "run"),
                 "--data.train", json.dumps([{"name": "x", "task": "ir", "path": str(missing)}])])
    assert not (tmp_path / "run" / "checkpoints").exists() and not list(tmp_path.rglob(".codiemb.lock*"))


def test_run_fit_is_interrupted_by_sigterm_then_resumes_to_its_export(tiny_model_dir, tmp_path):
    """One fit, SIGTERM after its first step (`test_sweep.SigtermOnce`): `interrupted`, last.ckpt saved, nothing
    exported; run again from that checkpoint: `finished` with the export, the CheckpointFusion leaderboard and
    export, and the final validation metrics."""
    root = tmp_path / "run"
    args = ["--config", str(TINY_CONFIG), "--model.model_name_or_path", str(tiny_model_dir), "--trainer.max_steps", "3",
            "--trainer.default_root_dir", str(root), "--trainer.callbacks+", "codiemb_pl.callbacks.ExportEncoder",
            "--trainer.callbacks+=codiemb_pl.callbacks.CheckpointFusion", "--trainer.callbacks.every_n_steps", "1",
            "--trainer.callbacks.methods", '[{"method": "uniform_soup"}]', "--trainer.callbacks.collect", "[]",
            "--trainer.callbacks+=test_sweep.SigtermOnce", f"--trainer.callbacks.marker={tmp_path / 'sent'}"]
    stopped = run_fit(args)
    assert stopped.status == "interrupted" and not stopped.finished and stopped.global_step == 1
    assert stopped.checkpoint_folder == root / "checkpoints" and (root / "checkpoints" / "last.ckpt").is_file()
    assert "SIGTERM received" in stopped.message and stopped.export_folder is None and stopped.fusion is None
    assert stopped.config == resolve_fit_config(args) and stopped.root == root
    assert not (root / "model").exists()

    done = run_fit(stopped.config, ckpt_path=stopped.checkpoint_folder / "last.ckpt")
    assert done.finished and done.global_step == 3 and done.root == root
    assert done.export_folder == root / "model" and (root / "model" / "modules.json").is_file()
    assert done.checkpoint_folder == root / "checkpoints"
    assert {c.name for c in done.fusion.candidates} == {"base", "step1", "step2", "step3", "uniform_soup"}
    assert done.fusion_export == root / "fusion" / "model" and (done.fusion_export / "modules.json").is_file()
    on_disk = json.loads((root / "fusion" / "leaderboard.json").read_text())
    assert on_disk["winner"] == done.fusion.winner().name
    metrics = done.metrics
    assert all(math.isfinite(value) for value in metrics.values())
    assert metrics["val/avg"] == pytest.approx((metrics["val/ir_avg"] + metrics["val/sts_avg"]) / 2)
    assert metrics["val/sts_avg"] == metrics["val/demo_sts_dev/cosine_spearman"]
    assert not list(tmp_path.rglob(".codiemb.lock*"))
