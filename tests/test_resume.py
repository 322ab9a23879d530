"""Exact mid-epoch resume: a run killed after k optimizer steps and resumed with `--ckpt_path last` ends
with the same weights as an uninterrupted run — with 1 process and with 2 gloo processes, with dropout
on (per-rank RNG state travels in the checkpoint), gradient accumulation, and an epoch boundary crossed
after the resume.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ddp_driver.launch import run_codiemb

TOTAL_STEPS = 8   # 6 optimizer steps per epoch below: the resumed run crosses into epoch 1
INTERRUPT_AT = 3


def training_args(model_dir: Path, per_device_batch: int, checkpoint_dir: Path) -> list[str]:
    data = ('[{"name": "demo_ir", "task": "ir", "path": "pkg://codiemb_pl/demo/ir_train.jsonl", "max_samples": 48},'
            ' {"name": "demo_sts", "task": "sts", "path": "pkg://codiemb_pl/demo/sts_train.jsonl", "max_samples": 48}]')
    checkpoint = ('{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": '
                  f'{{"dirpath": "{checkpoint_dir}", "every_n_train_steps": 1, "save_top_k": 0, "save_last": true}}}}')
    return ["--model.model_name_or_path", str(model_dir), "--data.train", data,
            "--data.ir_batch_size", str(per_device_batch), "--data.sts_batch_size", str(per_device_batch),
            "--data.n_negatives", "2", "--trainer.max_steps", str(TOTAL_STEPS), "--trainer.accumulate_grad_batches", "2",
            "--trainer.enable_checkpointing", "true", "--trainer.callbacks+", checkpoint]


def final_weights(checkpoint_dir: Path) -> tuple[int, dict[str, torch.Tensor]]:
    state = torch.load(checkpoint_dir / "last.ckpt", map_location="cpu", weights_only=False)
    return state["global_step"], state["state_dict"]


@pytest.mark.parametrize("world_size", [1, 2])
def test_interrupted_and_resumed_run_ends_with_the_uninterrupted_weights(world_size, tiny_model_dir, tmp_path):
    per_device_batch = 8 // world_size  # the same global batches (G = 16) for both world sizes
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"

    result = run_codiemb(training_args(tiny_model_dir, per_device_batch, straight), world_size=world_size)
    assert result.returncode == 0, result.stdout[-4000:]

    interrupted = run_codiemb(training_args(tiny_model_dir, per_device_batch, resumed)
                              + ["--trainer.callbacks+=ddp_driver.probes.Interrupt",
                                 f"--trainer.callbacks.at_step={INTERRUPT_AT}"], world_size=world_size)
    assert interrupted.returncode == 3, interrupted.stdout[-4000:]
    assert final_weights(resumed)[0] == INTERRUPT_AT

    result = run_codiemb(training_args(tiny_model_dir, per_device_batch, resumed) + ["--ckpt_path", "last"],
                         world_size=world_size)
    assert result.returncode == 0, result.stdout[-4000:]

    step_a, weights_a = final_weights(straight)
    step_b, weights_b = final_weights(resumed)
    assert step_a == step_b == TOTAL_STEPS
    assert weights_a.keys() == weights_b.keys()
    mismatched = [name for name in weights_a if not torch.equal(weights_a[name], weights_b[name])]
    assert not mismatched, f"{len(mismatched)} tensors differ, e.g. {mismatched[:3]}"
