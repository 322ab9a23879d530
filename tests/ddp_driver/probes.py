"""Test callbacks that record what each rank did, one file per rank (used by the DDP, resume and FSDP tests).

Passed to the real CLI with `--trainer.callbacks+=ddp_driver.probes.NAME` (the launcher puts `tests/`
on PYTHONPATH), so the runs exercise exactly the code users run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch


class GradientRecorder(pl.Callback):
    """Saves the parameter gradients of the first optimizer step and the mean local loss of the run.

    Gradients are read in `on_before_optimizer_step`, i.e. after accumulation and DDP's all-reduce:
    what the optimizer applies. Meant for `max_steps: 1` runs. Writes `<out_dir>/grads_rank<r>.pt` =
    {"loss": mean local loss over the run's micro-batches, "grads": {parameter name: gradient},
    "conflict": the module's gradient-conflict measurements, [(step, {metric: value})]}.
    """

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.losses: list[float] = []
        self.grads: dict[str, torch.Tensor] | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"].detach()))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.grads is None:
            self.grads = {name: param.grad.detach().clone() for name, param in pl_module.named_parameters()
                          if param.grad is not None}

    def on_train_end(self, trainer, pl_module) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"loss": sum(self.losses) / len(self.losses), "grads": self.grads,
                    "conflict": list(getattr(pl_module, "conflict_history", []))},
                   self.out_dir / f"grads_rank{trainer.global_rank}.pt")


class BatchRecorder(pl.Callback):
    """Writes `<out_dir>/batches_rank<r>.json`: one [optimizer step, micro-step, task, dataset, size] per batch."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.rows: list[list[Any]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        accumulate = trainer.accumulate_grad_batches
        size = len(batch["scores"]) if batch["task"] == "sts" else int(batch["query"]["input_ids"].shape[0])
        self.rows.append([trainer.global_step, batch_idx % accumulate, batch["task"], batch["dataset"], size])

    def on_train_end(self, trainer, pl_module) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"batches_rank{trainer.global_rank}.json"
        path.write_text(json.dumps({"rows": self.rows, "world_size": trainer.world_size,
                                    "accumulate": trainer.accumulate_grad_batches,
                                    "global_step": trainer.global_step}))


class TaskAdapterSums(pl.Callback):
    """Task-routed LoRA: writes `<out_dir>/adapters_rank<r>.json`, one [optimizer step, task, {adapter set: Σ|θ|}]
    per optimizer step, read before its first micro-batch, plus the final sums after the last step."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.rows: list[list[Any]] = []

    @staticmethod
    def sums(pl_module) -> dict[str, float]:
        from codiemb_pl.model.task_lora import adapter_of_parameter

        totals: dict[str, float] = {}
        for name, parameter in pl_module.named_parameters():
            adapter = adapter_of_parameter(name)
            if adapter is not None:
                totals[adapter] = totals.get(adapter, 0.0) + float(parameter.detach().double().abs().sum())
        return totals

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx % trainer.accumulate_grad_batches == 0:
            self.rows.append([trainer.global_step, batch["task"], self.sums(pl_module)])

    def on_train_end(self, trainer, pl_module) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.rows.append([trainer.global_step, None, self.sums(pl_module)])
        (self.out_dir / f"adapters_rank{trainer.global_rank}.json").write_text(json.dumps(self.rows))


class Interrupt(pl.Callback):
    """Kills the process (exit code 3, no clean-up) when optimizer step `at_step` is about to start.

    Emulates a pre-empted job: whatever checkpoint was written before is all a resume can use.
    """

    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.at_step:
            os._exit(3)


class LossRecorder(pl.Callback):
    """Writes `<out_dir>/losses_rank<r>.json`: [optimizer step, local loss] per micro-batch this run trained
    (a resumed run: only those after its checkpoint)."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.rows: list[list[Any]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.rows.append([trainer.global_step, None])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.rows[-1][1] = float(outputs["loss"].detach())

    def on_train_end(self, trainer, pl_module) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"losses_rank{trainer.global_rank}.json").write_text(json.dumps(self.rows))
