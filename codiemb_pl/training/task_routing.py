"""Lightning-side glue of task-routed LoRA (`model.lora.task_adapters`, `model/task_lora.py`).

`TaskRouter` gates the adapters for each batch's task and, before each optimizer step, drops the (exactly zero)
gradients of the task adapters that no micro-batch of the step used, so AdamW leaves them untouched. The
tasks used are OR-ed across ranks first (one 2-element all-reduce): every rank drops the same gradients even
where a rank's `mixed` batch lacks a task that another rank's has. `routed` wraps an embedding
function so that every call (the gradient cache's replays in backward included) runs under its task's gates.
`task_fusion_merge` checks `model.lora.task_fusion` and gives the export's merge
(`fusion.task_adapters.fuse_task_adapters`); `check_routing_with_checkpointing` refuses gradient checkpointing
where a step embeds both tasks before its backward.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any, Optional

import torch
from torch import nn

from codiemb_pl.errors import InputError
from codiemb_pl.fusion.task_adapters import DEFAULT_TASK_FUSION, fuse_task_adapters
from codiemb_pl.model.task_lora import TASK_ADAPTERS, drop_unrouted_gradients, route_to_task, task_scale
from codiemb_pl.workflows.fusion.settings import SCORED_METHODS, parse_methods

WHERE = "model.lora.task_fusion"
TWO_TASK_POLICIES = ("mixed", "joint")   # sampler policies whose steps hold an IR and an STS part


def task_fusion_merge(entry: Any, model: nn.Module) -> Callable:
    """`merge(base, adapters) -> weights` of the export for the `model.lora.task_fusion` entry (None: delta-guided,
    gamma 1): one `InputError` line for an unknown method, bad parameters or a method that needs scores."""
    try:
        (spec,) = parse_methods([DEFAULT_TASK_FUSION if entry is None else entry], where=WHERE, members=2)
    except InputError as error:
        raise InputError(WHERE, error.problem, error.fix) from None
    if spec.method in SCORED_METHODS:
        raise InputError(WHERE, f"{spec.method} ranks members by validation scores, which the export does not have",
                         "use a per-tensor method such as delta_guided, ties, task_arithmetic or uniform_soup")
    return functools.partial(fuse_task_adapters, scale=task_scale(model), method=spec.method, params=spec.params,
                             weights=spec.weights)


def check_routing_with_checkpointing(gradient_checkpointing: bool, policy: Optional[str],
                                     automatic_optimization: bool = True) -> None:
    """Refuse (one line) gradient checkpointing with a policy whose steps embed both tasks before one backward
    (`mixed`, and `joint` with the plain sum; pcgrad / mgda run each task's backward before the next forward): the
    blocks would be recomputed in backward under the gates of the step's last task, not their own."""
    if gradient_checkpointing and policy in TWO_TASK_POLICIES and automatic_optimization:
        raise InputError("model.gradient_checkpointing", f"with task-routed LoRA and data.policy: {policy}, blocks "
                         "would be recomputed in backward under the other task's adapter gates",
                         "turn gradient_checkpointing off (or use model.grad_cache_chunk_size), or a single-task "
                         "policy")


class TaskRouter:
    """Which task adapters a step used, and the gating of `model`'s adapters for each batch."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.used: set[str] = set()

    def route(self, task: Optional[str], training: bool = True) -> None:
        """Gate the adapters for `task` (shared + its own); a training batch records that the step used it."""
        route_to_task(self.model, task)
        if training and task is not None:
            self.used.add(task)

    def routed(self, embed: Callable, task: str, training: bool = True) -> Callable:
        """`embed` that gates the adapters for `task` before every call (also the gradient cache's replays in
        backward, which may run after another task's objective re-gated them in a two-task step); `training=False`
        (a measurement such as the conflict probe) does not count as the step using `task`."""
        def routed_embed(*args, **kwargs):
            self.route(task, training=training)
            return embed(*args, **kwargs)
        return routed_embed

    def used_on_any_rank(self, device: torch.device) -> set[str]:
        """The tasks this optimizer step used on any rank (an all-reduce MAX of one flag per task)."""
        flags = torch.tensor([float(task in self.used) for task in TASK_ADAPTERS], device=device)
        if torch.distributed.is_available() and torch.distributed.is_initialized() and \
                torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        return {task for task, flag in zip(TASK_ADAPTERS, flags.tolist()) if flag}

    def before_optimizer_step(self, named_parameters: Iterable[tuple[str, nn.Parameter]],
                              device: torch.device) -> int:
        """Drop the gradients of the task adapters no rank used this step; start the next step's record."""
        dropped = drop_unrouted_gradients(named_parameters, self.used_on_any_rank(device))
        self.used = set()
        return dropped
