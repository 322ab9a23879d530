"""Joint steps (`data.policy: joint`, `model.gradient_combination`) and the gradient-conflict probe
(`model.conflict_every`) through the real CLI on the tiny BERT, in process:

- every joint step holds one IR and one STS batch, and MGDA's weights and combined norm are logged;
- the probe measures cosine and norm ratio overall and per layer group at every due step;
- an MGDA run with the probe on ends with the weights of one without it, interrupted after step 2 and resumed with
  `--ckpt_path last` (the probe leaves training bit-identical; the resume is exact);
- with the gradient cache (chunks of 3 texts) a joint MGDA step applies the same combined gradient.
The 2-process case (each task's gradient reduced before combining) is in `test_distributed.py`.
"""

from __future__ import annotations

import signal
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from codiemb_pl.callbacks.interruption import GracefulInterruption
from codiemb_pl.cli.main import main
from ddp_driver.launch import model_without_dropout

TINY_CONFIG = Path(__file__).parent / "conf" / "tiny.yaml"
RECORDS: dict[str, dict] = {}   # what `RunRecorder` saw, by run name


class RunRecorder(pl.Callback):
    """Test callback: the tasks and sizes of every training batch, the probe's measurements and the joint steps'
    logged weights, kept in `RECORDS[name]`; with `stop_after` set, stops the run like SIGTERM after that step."""

    def __init__(self, name: str, stop_after: int = 0):
        self.name, self.stop_after = name, stop_after
        RECORDS[name] = {"batches": [], "joint": []}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        parts = [batch] if batch["task"] in ("ir", "sts") else [batch[task] for task in ("ir", "sts")]
        sizes = [None if part is None else (part["task"], len(part["scores"]) if part["task"] == "sts" else
                                            int(part["query"]["input_ids"].shape[0])) for part in parts]
        RECORDS[self.name]["batches"].append((batch["task"], sizes))
        if self.stop_after and trainer.global_step == self.stop_after - 1:
            next(c for c in trainer.callbacks if isinstance(c, GracefulInterruption)).received = signal.SIGTERM

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        metrics = trainer.callback_metrics
        if "train/joint/weight_ir" in metrics:
            RECORDS[self.name]["joint"].append({key: float(metrics[f"train/joint/{key}"]) for key in
                                                ("weight_ir", "weight_sts", "combined_norm", "cosine")})

    def on_train_end(self, trainer, pl_module) -> None:
        RECORDS[self.name]["conflict"] = list(pl_module.conflict_history)


def fit(model_dir: Path, run: Path, name: str, *extra: str) -> dict[str, torch.Tensor]:
    """Fit the tiny config (4 steps) into `run`; returns the state dict of `last.ckpt`."""
    code = main(["fit", "--config", str(TINY_CONFIG), "--model.model_name_or_path", str(model_dir),
                 "--trainer.default_root_dir", str(run), "--trainer.callbacks+=test_joint_training.RunRecorder",
                 f"--trainer.callbacks.name={name}", *extra])
    assert code == 0
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]


def assert_identical(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
    assert first.keys() == second.keys()
    assert [name for name in first if not torch.equal(first[name], second[name])] == []


def test_joint_mgda_steps_hold_both_tasks_and_the_probe_and_a_resume_change_nothing(tiny_model_dir, tmp_path):
    """Three fits (suite time): the uninterrupted run has the probe on every step, the interrupted and resumed one
    has it off; equal weights show both that the probe leaves training alone (dropout on: its eval mode and restored
    RNG states matter; manual optimisation would add anything it left in `.grad`) and that the resume is exact."""
    joint = ["--data.policy", "joint", "--model.gradient_combination", "mgda"]
    straight = fit(tiny_model_dir, tmp_path / "straight", "straight", *joint, "--model.conflict_every", "1")
    record = RECORDS["straight"]
    assert record["batches"] == [("joint", [("ir", 4), ("sts", 4)])] * 4   # every step: one IR and one STS batch
    assert len(record["joint"]) == 4
    for step in record["joint"]:
        assert 0.0 <= step["weight_ir"] <= 1.0 and step["weight_ir"] + step["weight_sts"] == pytest.approx(1.0)
        assert step["combined_norm"] > 0 and -1.0 <= step["cosine"] <= 1.0

    measured = record["conflict"]
    assert [step for step, _ in measured] == [0, 1, 2, 3]
    for _, metrics in measured:
        groups = {key.split("/")[1] for key in metrics if key.count("/") == 2}
        assert groups == {"embeddings", "block_00", "block_01"}   # BERT without its pooler: no head parameters
        assert all(-1.0 <= metrics[f"conflict/{group}/cosine"] <= 1.0 for group in groups)
        assert metrics["conflict/norm_ratio"] == pytest.approx(metrics["conflict/ir_norm"] / metrics["conflict/sts_norm"])
        assert metrics["conflict/ir_norm"] > 0 and metrics["conflict/sts_norm"] > 0
    assert measured[0][1]["conflict/cosine"] != measured[1][1]["conflict/cosine"]   # the weights moved in between

    run = tmp_path / "resumed"
    fit(tiny_model_dir, run, "first_leg", *joint, "--trainer.callbacks.stop_after", "2")
    assert len(RECORDS["first_leg"]["batches"]) == 2
    resumed = fit(tiny_model_dir, run, "second_leg", *joint, "--ckpt_path", "last")
    assert len(RECORDS["second_leg"]["batches"]) == 2
    assert_identical(resumed, straight)


def test_joint_mgda_step_with_the_gradient_cache_combines_the_same_gradients(tiny_model_dir, tmp_path):
    model = model_without_dropout(tiny_model_dir, tmp_path / "no_dropout")   # chunks would draw other dropout masks
    steps = {}
    for name, extra in (("plain", []), ("cached", ["--model.grad_cache_chunk_size", "3"])):
        out = tmp_path / name
        fit(model, out, name, "--data.policy", "joint", "--model.gradient_combination", "mgda",
            "--trainer.max_steps", "1", "--trainer.precision", "64-true",   # float64: no summation-order noise
            "--trainer.limit_val_batches", "0",
            "--trainer.callbacks+=ddp_driver.probes.GradientRecorder",
            f"--trainer.callbacks.out_dir={out}", *extra)
        steps[name] = torch.load(out / "grads_rank0.pt")
    assert len(steps["plain"]["grads"]) > 30
    for name, grad in steps["plain"]["grads"].items():   # the combined gradient the optimizer applied
        torch.testing.assert_close(steps["cached"]["grads"][name], grad, rtol=1e-9, atol=1e-12,
                                   msg=lambda m: f"{name}: {m}")
