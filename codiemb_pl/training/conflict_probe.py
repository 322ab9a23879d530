"""Gradient-conflict diagnostics during training (`model.conflict_every`, SPEC §10): the Lightning side.

Every `every` optimizer steps, before the step's own forward pass, `ConflictProbe.measure` computes the IR and STS
gradients at the current weights on fixed probe batches (`data/probe_batches.py`: one per task, from the validation
sets) and returns `gradient_conflict.conflict_metrics` of (g_IR, g_STS): cosine and norm ratio ‖g_IR‖/‖g_STS‖,
overall and per layer group. Training does not notice:

- the gradients come from `torch.autograd.grad`, so nothing reaches `.grad` (nor DDP's gradient hooks);
- the encoder runs in eval mode (no dropout: the same weights give the same measurement) and every RNG state
  (torch, CUDA, numpy, python) is put back afterwards, so the training stream draws what it would have drawn;
- the probe batches are built once and never touch the sampler.

Each task's loss is its objective without the distillation terms (`DistilledObjective.base`); under DDP each rank
scores its slice of the probe batch (candidates gathered across ranks as in training) and the gradients are averaged
across ranks, so every rank gets the gradient of the whole probe batch. Costs per measurement: one forward and backward
pass per probe batch (a global training batch of each task, without the gradient cache) and two parameter-sized
buffers (with LoRA: adapter-sized).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

from codiemb_pl.data.probe_batches import no_probe_set, probe_batches
from codiemb_pl.errors import InputError
from codiemb_pl.losses.gather import rank_and_world
from codiemb_pl.training.gradient_conflict import conflict_metrics
from codiemb_pl.training.rng_state import capture_rng_states, restore_rng_states

TASKS = ("ir", "sts")


def check_conflict_settings(every: int, trainer: Any, val_tasks: set[str]) -> None:
    """One `InputError` for diagnostics the run cannot take: a sharded strategy, or no IR / STS validation set."""
    if not every:
        return
    if isinstance(trainer.strategy, (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)):
        raise InputError("model.conflict_every", f"the gradient-conflict probe is not built for "
                         f"{type(trainer.strategy).__name__} (sharded parameters and gradients)",
                         "use ddp or one device for the diagnostic run, or set model.conflict_every: 0")
    for task in TASKS:
        if task not in val_tasks:
            raise no_probe_set(task)


def mean_across_ranks(grads: list[Optional[torch.Tensor]], like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each rank's gradients averaged over the ranks (one all-reduce of the flattened tensors); None = zero."""
    filled = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, like)]
    _, world = rank_and_world()
    if world == 1:
        return filled
    flat = torch.cat([g.reshape(-1) for g in filled])
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    flat /= world
    return [part.view_as(p) for part, p in zip(flat.split([p.numel() for p in like]), like)]


class ConflictProbe:
    """The probe batches of one fit and the measurement (module docstring)."""

    def __init__(self, every: int, batches: dict[str, dict[str, Any]]):
        self.every = every
        self.batches = batches
        self.last_step: Optional[int] = None

    @classmethod
    def for_fit(cls, every: int, datamodule: Any, world_size: int, rank: int) -> "ConflictProbe":
        """Probe batches from the data module's validation sets, each the size of its task's global training batch
        (the per-device batch size of the task's first training source x devices)."""
        sizes = {}
        for task in TASKS:
            source = next((s for s in datamodule.train_sources if s.task == task), None)
            per_device = datamodule.batch_size_of(source) if source is not None else \
                getattr(datamodule.hparams, f"{task}_batch_size")
            sizes[task] = per_device * world_size
        hp = datamodule.hparams
        limits = {"query": hp.max_query_length, "corpus": hp.max_passage_length, "text1": hp.max_sts_length,
                  "text2": hp.max_sts_length}
        return cls(every, probe_batches(datamodule.val_sets, sizes, datamodule.tokenize, limits, world_size, rank))

    def due(self, step: int) -> bool:
        """Whether step `step` is measured (once, at its first micro-batch)."""
        return step % self.every == 0 and step != self.last_step

    def measure(self, module: Any, step: int) -> dict[str, float]:
        """`conflict_metrics` of (g_IR, g_STS) at `module`'s current weights (keys prefixed `conflict/`)."""
        self.last_step = step
        named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
        parameters = [p for _, p in named]
        states = capture_rng_states()
        modes = [(submodule, submodule.training) for submodule in module.modules()]
        try:
            module.eval()
            with torch.enable_grad(), module.trainer.precision_plugin.forward_context():
                grads = {task: self.task_gradient(module, task, parameters) for task in TASKS}
        finally:
            for submodule, training in modes:
                submodule.training = training
            restore_rng_states(states)
        metrics = conflict_metrics([name for name, _ in named], grads["ir"], grads["sts"])
        renamed = {"norm_first": "ir_norm", "norm_second": "sts_norm"}
        return {f"conflict/{renamed.get(key, key)}": value for key, value in metrics.items()}

    def task_gradient(self, module: Any, task: str, parameters: list[torch.Tensor]) -> list[torch.Tensor]:
        """∂L_task/∂θ of the probe batch of `task`, averaged across ranks, not accumulated into `.grad`."""
        objective = module.objectives[task]
        objective = getattr(objective, "base", objective)   # the task loss without distillation terms
        batch = move_data_to_device(self.batches[task], module.device)
        embed = module.embed if getattr(module, "task_router", None) is None else \
            module.task_router.routed(module.embed, task, training=False)   # task-routed LoRA: the task's adapters
        loss, _ = objective(embed, batch)
        grads = torch.autograd.grad(loss, parameters, allow_unused=True)
        return mean_across_ranks(list(grads), parameters)
