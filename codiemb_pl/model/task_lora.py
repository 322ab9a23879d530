"""Task-routed LoRA (MTLoRA-style, `model.lora.task_adapters`): shared adapters plus one adapter set per task.

Every adapted matrix carries three peft adapters of the same rank and scale s = alpha / r:

    W x + s·B_shared·A_shared x + g_ir·s·B_ir·A_ir x + g_sts·s·B_sts·A_sts x

A batch of task t routes the encoder to its adapters: g_t = 1 and the other task's gate is 0 (the shared
set is always on). The gates are peft's per-adapter `scaling`, so every adapter stays in the graph with an
exactly zero contribution: DDP (with `find_unused_parameters: false`), FSDP2 and activation checkpointing
see the same parameters on every step, and the other task's adapters receive gradients of exactly zero.
`drop_unrouted_gradients` then sets those gradients to None before the optimizer step, so AdamW leaves the
other task's adapters, their moments and step counts untouched (no drift from momentum or weight decay).

Weight space (plain tensors, peft state-dict names): `split_adapter_state` separates the frozen base
weights from the adapter tensors, `adapter_deltas` gives one adapter set's `s·B·A` per base weight, and
`specialist_weights` the base + shared + one task's delta. The fusion of the task deltas for the export
lives in `fusion/task_adapters.py` (the merge engine is a layer above this one).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Optional

from torch import Tensor, nn

from codiemb_pl.errors import InputError

SHARED_ADAPTER = "shared"
TASK_ADAPTERS = ("ir", "sts")
ADAPTER_NAMES = (SHARED_ADAPTER, *TASK_ADAPTERS)
PEFT_PREFIX = "base_model.model."


def add_task_adapters(model: nn.Module, config) -> nn.Module:
    """Wrap `model` in a peft model with the shared and per-task adapters (one `peft.LoraConfig`), all
    trainable and active, every base weight frozen, routed to no task (both task gates 0)."""
    import peft

    model = peft.get_peft_model(model, copy.deepcopy(config), adapter_name=SHARED_ADAPTER)
    for task in TASK_ADAPTERS:
        model.add_adapter(task, copy.deepcopy(config))
    model.base_model.set_adapter(list(ADAPTER_NAMES))   # active and trainable (peft: requires_grad for these)
    for layer in lora_layers(model):
        if getattr(layer, "fan_in_fan_out", False):
            raise InputError("model.lora.task_adapters", f"{type(layer.get_base_layer()).__name__} layers store "
                             "their weight transposed, which the task-adapter merge does not handle",
                             "use plain model.lora (task_adapters: false) for this model")
    route_to_task(model, None)
    return model


def lora_layers(model: nn.Module) -> list[nn.Module]:
    """The peft LoRA layers of `model`."""
    from peft.tuners.lora import LoraLayer

    return [module for module in model.modules() if isinstance(module, LoraLayer)]


def has_task_adapters(model: nn.Module) -> bool:
    """Whether `model` is a peft model carrying the task-routed adapter sets."""
    config = getattr(model, "peft_config", None)
    return isinstance(config, Mapping) and set(ADAPTER_NAMES) <= set(config)


def route_to_task(model: nn.Module, task: Optional[str]) -> None:
    """Gate the adapters for a batch of `task`: shared and `task` at their scale s = alpha / r, the other task
    at 0 (still computed: zero output, zero gradient). `None`: no task adapter (the shared ones only)."""
    if task is not None and task not in TASK_ADAPTERS:
        raise InputError("task-routed LoRA", f"no adapters for task {task!r}",
                         f"batches must be one of {TASK_ADAPTERS}")
    scale = task_scale(model)
    gates = {SHARED_ADAPTER: scale, **{name: scale if name == task else 0.0 for name in TASK_ADAPTERS}}
    for layer in lora_layers(model):
        for name, value in gates.items():
            layer.scaling[name] = value


def adapter_of_parameter(name: str) -> Optional[str]:
    """The adapter set a parameter belongs to (`...lora_A.<adapter>.weight`), or None for other parameters."""
    for marker in (".lora_A.", ".lora_B."):
        if marker in name:
            return name.split(marker, 1)[1].split(".", 1)[0]
    return None


def drop_unrouted_gradients(named_parameters: Iterable[tuple[str, nn.Parameter]], routed: Iterable[str]) -> int:
    """Set to None the gradients of the task adapters of every task not in `routed` (their gradients are exactly
    zero: the gate kept them in the graph), so the optimizer skips them; returns how many were dropped."""
    unrouted = set(TASK_ADAPTERS) - set(routed)
    dropped = 0
    for name, parameter in named_parameters:
        if parameter.grad is not None and adapter_of_parameter(name) in unrouted:
            parameter.grad = None
            dropped += 1
    return dropped


# --------------------------------------------------------------------------------------------------
# Weight space

def split_adapter_state(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """`(base weights under the base model's names, adapter tensors under their peft names)` of a peft state dict
    (`base_model.model.<path>.base_layer.weight` -> `<path>.weight`)."""
    base, adapters = {}, {}
    for key, value in state.items():
        if ".lora_" in key:
            adapters[key] = value
        else:
            name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
            base[name.replace(".base_layer.", ".")] = value
    return base, adapters


def adapted_key(a_key: str) -> str:
    """`<path>.weight`: the base weight that the adapter matrix `...<path>.lora_A.<set>.weight` adapts."""
    path = a_key.split(".lora_A.", 1)[0]
    return f"{path[len(PEFT_PREFIX):] if path.startswith(PEFT_PREFIX) else path}.weight"


def adapter_delta(adapters: Mapping[str, Tensor], a_key: str, scale: float) -> Tensor:
    """`scale·B·A` (float32) of the adapter whose A matrix is `adapters[a_key]`."""
    b = adapters.get(a_key.replace(".lora_A.", ".lora_B."))
    if b is None:
        raise InputError("task-routed LoRA", f"adapter {a_key} has no B matrix", "save and load whole adapter sets")
    return scale * (b.detach().float() @ adapters[a_key].detach().float())


def adapter_deltas(adapters: Mapping[str, Tensor], adapter: str, scale: float) -> dict[str, Tensor]:
    """`{<path>.weight: scale·B·A}` (float32) for every matrix that adapter set `adapter` adapts."""
    return {adapted_key(key): adapter_delta(adapters, key, scale) for key in adapters
            if f".lora_A.{adapter}." in key}


def add_deltas(base: Mapping[str, Tensor], *deltas: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """`base` with every delta added (in float32, cast back to each weight's dtype); other tensors untouched."""
    merged = dict(base)
    for key in {key for delta in deltas for key in delta}:
        if key not in base:
            raise InputError("task-routed LoRA", f"an adapter targets {key}, which the base model lacks",
                             "merge adapters with the base model they were trained on")
        total = base[key].detach().float()
        for delta in deltas:
            if key in delta:
                total = total + delta[key]
        merged[key] = total.to(base[key].dtype)
    return merged


def specialist_weights(base: Mapping[str, Tensor], adapters: Mapping[str, Tensor], scale: float,
                       task: Optional[str]) -> dict[str, Tensor]:
    """W0 + s·B_shared·A_shared (+ s·B_task·A_task): one task's specialist as plain weights (`task=None`: the
    shared adapters alone)."""
    shared = adapter_deltas(adapters, SHARED_ADAPTER, scale)
    return add_deltas(base, shared, *([adapter_deltas(adapters, task, scale)] if task is not None else []))


def task_scale(model: nn.Module) -> float:
    """s = alpha / r of the adapters (one setting for every set)."""
    config = model.peft_config[SHARED_ADAPTER]
    return config.lora_alpha / config.r

