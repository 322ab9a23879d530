"""Joint steps (`data.policy: joint`, SPEC §10): one IR and one STS batch per optimizer step, their gradients combined
by `model.gradient_combination` (`gradient_combination.py`: sum | pcgrad | mgda). The Lightning side.

`sum` needs nothing special: the module returns L_IR + L_STS and Lightning's automatic optimisation runs as for any
step (accumulation, clipping, the gradient cache, every strategy). `pcgrad` and `mgda` are not linear in the two
gradients, so the module runs manual optimisation and `joint_manual_step` does, per step:

    for task in (ir, sts): embed and score the task's batch, `manual_backward` (under DDP the gradient is averaged
                           across ranks by DDP itself before the next line); g_IR = .grad (a copy under DDP), then
                           .grad cleared; g_STS = .grad
    .grad = w_IR·g_IR + w_STS·g_STS with the rule's weights (from the Gram entries of the reduced gradients, so
            identical on every rank); optimizer step; learning-rate scheduler step

so 2 processes give the combination 1 process gives on the concatenated batches. Logged: `train/joint/cosine`,
`train/joint/weight_ir`, `train/joint/weight_sts`, `train/joint/combined_norm` (‖g‖, which MGDA's min-norm point
shortens), `train/joint/ir_grad_norm`, `train/joint/sts_grad_norm`. One graph at a time lives (IR's is freed by its
backward before STS is embedded); the gradient cache works unchanged (its loss back-propagates like any other). What
manual optimisation cannot do is refused before training by `check_joint_settings`, one line each.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

from codiemb_pl.errors import InputError
from codiemb_pl.training.gradient_combination import combine, combined_norm

MANUAL_COMBINATIONS = ("pcgrad", "mgda")


def check_joint_settings(combination: str, policy: str, trainer: Any) -> None:
    """One `InputError` for a gradient combination the run cannot take (before anything trains)."""
    if combination not in MANUAL_COMBINATIONS:
        return
    where = f"model.gradient_combination {combination}"
    if policy != "joint":
        raise InputError("model.gradient_combination", f"{combination} combines the IR and STS gradients of a joint "
                         f"step, but data.policy is {policy!r}", "set data.policy: joint, or gradient_combination: sum")
    if trainer.accumulate_grad_batches != 1:
        raise InputError("trainer.accumulate_grad_batches", f"is {trainer.accumulate_grad_batches}, but {where} runs "
                         "manual optimisation, which has no gradient accumulation",
                         "use 1 and larger data.ir_batch_size / data.sts_batch_size (model.grad_cache_chunk_size "
                         "keeps the memory of a chunk), or gradient_combination: sum")
    if trainer.gradient_clip_val:
        raise InputError("trainer.gradient_clip_val", f"is {trainer.gradient_clip_val}, but {where} runs manual "
                         "optimisation, where Lightning does not clip", "unset it, or use gradient_combination: sum")
    if isinstance(trainer.strategy, (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)):
        raise InputError("trainer.strategy", f"{where} is not built for {type(trainer.strategy).__name__} (it reads "
                         "whole gradients between the tasks' backward passes)",
                         "use ddp or one device, or gradient_combination: sum")


def joint_manual_step(module: Any, batch: dict[str, Any], combination: str) -> torch.Tensor:
    """One optimizer step of a joint batch with `combination` (module docstring); returns L_IR + L_STS (detached)."""
    optimizer = module.optimizers()
    parameters = [p for p in module.parameters() if p.requires_grad]
    grads, losses = [], []
    # g_IR is copied under DDP (gradient_as_bucket_view would reuse its memory for g_STS); in one process the
    # tensors are taken as they are (.grad is cleared before STS's backward)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    for task in ("ir", "sts"):
        loss = module.objective_step(module.objectives[task], batch[task])
        module.manual_backward(loss)
        if task == "ir":
            grads.append([None if p.grad is None else p.grad.detach().clone() if distributed else p.grad
                          for p in parameters])
            for p in parameters:
                p.grad = None
        else:
            grads.append([p.grad for p in parameters])
        losses.append(loss.detach())
    combined, gram, weights = combine(grads[0], grads[1], combination)
    del grads
    for p, grad in zip(parameters, combined):
        p.grad = grad
    optimizer.step()
    optimizer.zero_grad()
    scheduler = module.lr_schedulers()
    if scheduler is not None:
        scheduler.step()
    values = {"cosine": gram.cosine, "weight_ir": weights[0], "weight_sts": weights[1],
              "combined_norm": combined_norm(gram, weights), "ir_grad_norm": gram.g11 ** 0.5,
              "sts_grad_norm": gram.g22 ** 0.5}
    for name, value in values.items():
        module.log(f"train/joint/{name}", float(value), on_step=True, batch_size=1)
    return losses[0] + losses[1]
