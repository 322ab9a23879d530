"""Exact mid-epoch resume: a run killed after k optimizer steps and resumed with `--ckpt_path last` ends
with the same weights as an uninterrupted run — with 1 process and with 2 gloo processes, with dropout
on (per-rank RNG state travels in the checkpoint), gradient accumulation, and an epoch boundary crossed
after the resume. The 6 runs of this module start together in the background, two at a time (`RunPool`).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ddp_driver.launch import RunPool, run_codiemb

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


def interrupt_and_resume(model_dir: Path, world_size: int, checkpoint_dir: Path) -> tuple:
    """The run killed before optimizer step INTERRUPT_AT, then `--ckpt_path last`:
    (interrupted run, global step of the checkpoint it left, resumed run)."""
    per_device_batch = 8 // world_size
    interrupted = run_codiemb(training_args(model_dir, per_device_batch, checkpoint_dir)
                              + ["--trainer.callbacks+=ddp_driver.probes.Interrupt",
                                 f"--trainer.callbacks.at_step={INTERRUPT_AT}"], world_size=world_size, timeout=300)
    left_at = final_weights(checkpoint_dir)[0] if (checkpoint_dir / "last.ckpt").exists() else None
    resumed = run_codiemb(training_args(model_dir, per_device_batch, checkpoint_dir) + ["--ckpt_path", "last"],
                          world_size=world_size, timeout=300)
    return interrupted, left_at, resumed


@pytest.fixture(scope="module")
def runs(request, tiny_model_dir, tmp_path_factory) -> dict:
    """{world_size: (straight dir, Future of its run, resumed dir, Future of `interrupt_and_resume`)} for the
    selected world sizes."""
    world_sizes = [size for size in (1, 2) if any(item.module is request.module and item.name.endswith(f"[{size}]")
                                                  for item in request.session.items)]
    root = tmp_path_factory.mktemp("resume")
    with RunPool() as pool:
        chains = {world_size: pool.executor.submit(interrupt_and_resume, tiny_model_dir, world_size,
                                                   root / f"w{world_size}" / "resumed") for world_size in world_sizes}
        yield {world_size: (root / f"w{world_size}" / "straight",
                            pool.submit(training_args(tiny_model_dir, 8 // world_size,
                                                      root / f"w{world_size}" / "straight"), world_size=world_size),
                            root / f"w{world_size}" / "resumed", chains[world_size])
               for world_size in world_sizes}


@pytest.mark.parametrize("world_size", [1, 2])
def test_interrupted_and_resumed_run_ends_with_the_uninterrupted_weights(world_size, runs):
    # per device 8 // world_size: the same global batches (G = 16) for both world sizes
    straight, straight_run, resumed, chain = runs[world_size]
    result = straight_run.result()
    assert result.returncode == 0, result.stdout[-4000:]

    interrupted, left_at, result = chain.result()
    assert interrupted.returncode == 3, interrupted.stdout[-4000:]
    assert left_at == INTERRUPT_AT
    assert result.returncode == 0, result.stdout[-4000:]

    step_a, weights_a = final_weights(straight)
    step_b, weights_b = final_weights(resumed)
    assert step_a == step_b == TOTAL_STEPS
    assert weights_a.keys() == weights_b.keys()
    mismatched = [name for name in weights_a if not torch.equal(weights_a[name], weights_b[name])]
    assert not mismatched, f"{len(mismatched)} tensors differ, e.g. {mismatched[:3]}"
