"""A gradient recorder for sharded runs (tests only): sharded (DTensor) gradients become full tensors,
so an FSDP step can be compared with a DDP step (tests/test_fsdp.py)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch


class FullGradientRecorder(pl.Callback):
    """Writes `<out_dir>/grads_rank<r>.pt` = {"loss": first local loss, "grads": {name: full gradient}}.

    Read in `on_before_optimizer_step` (after the reduction: what the optimizer applies), first step only.
    `DTensor.full_tensor()` is a collective; every rank runs this hook at the same point.
    """

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.loss: float | None = None
        self.grads: dict[str, torch.Tensor] | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.loss is None:
            self.loss = float(outputs["loss"].detach())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.grads is not None:
            return
        grads = {}
        for name, parameter in pl_module.named_parameters():
            if parameter.grad is None:
                continue
            grad = parameter.grad
            grads[name] = (grad.full_tensor() if hasattr(grad, "full_tensor") else grad).detach().clone()
        self.grads = grads

    def on_train_end(self, trainer, pl_module) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"loss": self.loss, "grads": self.grads}, self.out_dir / f"grads_rank{trainer.global_rank}.pt")
