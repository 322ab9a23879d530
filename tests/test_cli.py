"""The CLI end to end on the tiny model: fit a few steps, validate the checkpoint, load the export."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from codiemb_pl.cli.main import main

TINY_CONFIG = Path(__file__).parent / "conf" / "tiny.yaml"


@pytest.fixture(scope="module")
def fitted_run(tiny_model_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    code = main(["fit", "--config", str(TINY_CONFIG), "--model.model_name_or_path", str(tiny_model_dir),
                 "--trainer.default_root_dir", str(run),
                 "--trainer.callbacks+=codiemb_pl.callbacks.ExportEncoder",
                 "--trainer.callbacks.dirpath", str(run / "model")])
    assert code == 0
    return run


def test_fit_writes_checkpoint_and_sentence_transformers_folder(fitted_run, capsys):
    checkpoints = list(fitted_run.rglob("*.ckpt"))
    assert any(p.name == "last.ckpt" for p in checkpoints)
    state = torch.load(next(p for p in checkpoints if p.name == "last.ckpt"), map_location="cpu", weights_only=False)
    assert state["global_step"] == 4
    assert "combined_loader" in state["loops"]["fit_loop"]["state_dict"]  # the sampler position is saved

    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(fitted_run / "model"), device="cpu")
    embeddings = model.encode(["a sentence", "another one"], convert_to_tensor=True)
    assert embeddings.shape == (2, 32)
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_fit_changes_the_weights(fitted_run, tiny_model_dir):
    from codiemb_pl.model.encoder import TextEncoder

    before = TextEncoder(str(tiny_model_dir)).encode(["the same text"])
    after = TextEncoder(str(fitted_run / "model")).encode(["the same text"])
    assert not torch.allclose(before, after, atol=1e-6)


def logged_metrics(root: Path) -> dict[str, float]:
    """The val/... and test/... values a CSVLogger wrote under `root`."""
    rows = list(csv.DictReader(next(root.rglob("metrics.csv")).open()))
    return {key: float(value) for row in rows for key, value in row.items()
            if value and key.split("/")[0] in ("val", "test")}


@pytest.fixture(scope="module")
def validated(fitted_run, tiny_model_dir, tmp_path_factory) -> tuple[str, dict[str, float]]:
    """`codiemb validate` on the fit's last.ckpt with a CSVLogger: (what it printed, what it logged)."""
    root = tmp_path_factory.mktemp("validate")
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        code = main(["validate", "--config", str(TINY_CONFIG), "--model.model_name_or_path", str(tiny_model_dir),
                     "--trainer.default_root_dir", str(root), "--ckpt_path", str(next(fitted_run.rglob("last.ckpt"))),
                     "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(root)])
    assert code == 0
    return printed.getvalue(), logged_metrics(root)


def test_validate_on_the_checkpoint_reports_every_metric(validated):
    out, _ = validated
    for key in ("val/demo_sts_dev/cosine_spearman", "val/demo_sts_dev/cosine_pearson", "val/demo_ir_dev/ndcg_at_10",
                "val/demo_ir_dev/mrr_at_10", "val/demo_ir_dev/recall_at_100", "val/ir_avg", "val/sts_avg", "val/avg"):
        assert key in out


def test_bad_input_gives_one_line_and_exit_code_2(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "positives": ["p"]}\n{"query": "q2", "positives": []}\n')
    code = main(["fit", "--config", str(TINY_CONFIG), "--model.model_name_or_path", str(tiny_model_dir),
                 "--trainer.default_root_dir", str(tmp_path),
                 "--data.train", f'[{{"name": "bad", "task": "ir", "path": "{bad}"}}]'])
    assert code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("codiemb: error:")]
    assert len(errors) == 1 and "bad.jsonl:2" in errors[0] and "no positives" in errors[0]
    assert "Traceback" not in err


def test_python_dash_m_and_print_config(capsys):
    # `python -m codiemb_pl` answers without Lightning (`--help`: ~1 s, not ~10 s of imports); `fit` through it
    # runs in every multi-process test (tests/ddp_driver/launch.py)
    result = subprocess.run([sys.executable, "-m", "codiemb_pl", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage: codiemb COMMAND" in result.stdout and "  fit " in result.stdout
    with pytest.raises(SystemExit) as stop:  # jsonargparse prints the config and exits
        main(["fit", "--config", str(TINY_CONFIG), "--print_config"])
    assert stop.value.code in (0, None)
    assert "model_name_or_path: REPLACED_BY_TEST" in capsys.readouterr().out


def test_mixed_policy_start_report_gives_the_one_pooled_batch_size(tiny_model_dir, tmp_path, caplog):
    """Under `mixed` the sampler pools IR and STS into micro-batches of max(batch sizes): the report says that,
    not a per-sub-dataset size the sampler does not use."""
    caplog.set_level(logging.INFO)
    code = main(["fit", "--config", str(TINY_CONFIG), "--model.model_name_or_path", str(tiny_model_dir),
                 "--trainer.default_root_dir", str(tmp_path), "--trainer.max_steps", "1",
                 "--trainer.num_sanity_val_steps", "0", "--trainer.limit_val_batches", "0",
                 "--data.policy", "mixed", "--data.ir_batch_size", "4", "--data.sts_batch_size", "2"])
    assert code == 0
    report = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[codiemb]")]
    assert ("[codiemb] mixed batches (demo_ir, demo_sts pooled): 4 per device x 1 devices x 1 accumulation = "
            "global batch 4; the IR/STS split of each batch varies") in report, report
    assert not any("per device" in line for line in report if "mixed batches" not in line), report


def test_help_and_argument_errors_of_every_command_import_neither_torch_nor_lightning():
    """`codiemb --help`, each project command's `--help` and a bad argument answer without the heavy imports."""
    script = """
import contextlib, io, sys
from codiemb_pl.cli.main import main
from codiemb_pl.commands import discover
names = sorted(discover())
assert {"boom", "evaluate", "fuse", "mine-negatives"} <= set(names), names
with contextlib.redirect_stdout(io.StringIO()) as out:
    assert main(["--help"]) == 0
for name in names:
    assert f"  {name} " in out.getvalue(), name
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        main([name, "--help"])
    with contextlib.redirect_stderr(io.StringIO()) as err:
        assert main([name, "--no-such-option"]) == 2, name
    assert err.getvalue().count("\\n") == 1 and err.getvalue().startswith("codiemb: error: "), err.getvalue()
heavy = sorted(m for m in ("torch", "lightning", "transformers", "sentence_transformers") if m in sys.modules)
assert not heavy, heavy
print("ok", len(names))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")


def test_test_on_a_checkpoint_logs_exactly_what_validate_logs_for_the_same_sets(fitted_run, tiny_model_dir, tmp_path,
                                                                                  validated):
    """`codiemb test` with `data.test` = the validation sets gives `test/<key>` == `validate`'s `val/<key>`."""
    import yaml

    last = next(fitted_run.rglob("last.ckpt"))
    val_sets = json.dumps(yaml.safe_load(TINY_CONFIG.read_text())["data"]["val"])
    code = main(["test", "--config", str(TINY_CONFIG), "--model.model_name_or_path", str(tiny_model_dir),
                 "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", str(last), "--data.test", val_sets,
                 "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(tmp_path)])
    assert code == 0
    by_validate = {key.removeprefix("val/"): value for key, value in validated[1].items()}
    tested = {key.removeprefix("test/"): value for key, value in logged_metrics(tmp_path).items()}
    assert "demo_ir_dev/ndcg_at_10" in tested and "avg" in tested
    assert tested == pytest.approx(by_validate, abs=1e-6)


def test_a_command_registered_in_process_is_dispatched_and_listed(capsys):
    from codiemb_pl.commands import EXTRA_COMMANDS, register_command

    @register_command("echo-args")
    def echo_args(argv: list[str]) -> int:
        """Print the arguments (a test command)."""
        print(" ".join(argv))
        return 3

    try:
        assert main(["echo-args", "a", "b"]) == 3
        assert capsys.readouterr().out == "a b\n"
        assert main(["--help"]) == 0
        assert "  echo-args" in capsys.readouterr().out
    finally:
        EXTRA_COMMANDS.pop("echo-args", None)
