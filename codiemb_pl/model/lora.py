"""LoRA fine-tuning through `peft` (optional extra `codiemb_pl[lora]`): plain functions around the model.

Each adapted weight matrix `W0 [out, in]` gets `W = W0 + s·B·A` with `A [r, in]`, `B [out, r]` and the
scale `s = alpha / r`; only `A` and `B` train (`B` starts at zero, so training starts from the base
model). Checkpoints hold the adapter tensors only (the base weights are re-read from the base model);
the export merges `s·B·A` into the base weights, so the sentence-transformers folder is a plain model.

Adapter dropout `B·A·dropout(x)` is recomputed in the backward pass (`DropoutThenLinear`): peft's own
`nn.Dropout` keeps, per adapted matrix, a dropped copy of its input and (on CPU) a float mask for backward,
two input-sized tensors per adapter; recomputing from the undropped input (kept anyway, and shared by
q, k, v) under the saved RNG state gives the same mask, values and gradients with no per-adapter copies.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from codiemb_pl.errors import InputError
from codiemb_pl.model.task_lora import (
    TASK_ADAPTERS,
    add_task_adapters,
    has_task_adapters,
    specialist_weights,
    split_adapter_state,
    task_scale,
)
from codiemb_pl.storage.atomic import atomic_directory

ADAPTER_NAME = "default"
# set by `sharding.consolidated_weights` under FSDP2: the full (gathered) state dict that replaces the sharded one
CONSOLIDATED_STATE_ATTRIBUTE = "_codiemb_consolidated_state"
# set on a task-routed model (`model.lora.task_adapters`) by the training module: `merge(base weights, adapter
# tensors) -> weights` (`fusion.task_adapters`), which `merged_weights` uses instead of adding every adapter
ADAPTER_MERGE_ATTRIBUTE = "_codiemb_adapter_merge"


@dataclass
class LoraSettings:
    """`model.lora`: which weights get adapters, and their size (each adapted W becomes W0 + (alpha/r)·B·A).

    Attributes:
        r: the adapters' rank.
        alpha: scale numerator: the update is scaled by alpha / r.
        dropout: dropout on the adapter input (recomputed in backward, so it keeps no extra activations).
        target_modules: `all-linear` (every linear layer of the backbone) or a list of module names
            (e.g. `[q_proj, k_proj, v_proj, o_proj]`).
        task_adapters: task-routed LoRA (MTLoRA-style, `model/task_lora.py`): shared adapters plus one adapter
            set per task (ir, sts), each of this rank; a batch trains the shared set and its own task's set.
            The export merges the shared adapters and a fusion of the two task sets into one plain model.
        task_fusion: with `task_adapters`, how the export fuses the task deltas: a merge method as in
            `fusion.methods` (`NAME` or `{method, params, weights}`, e.g. `{method: ties, params: {density:
            0.2}}`); None = `delta_guided` (gamma 1).
    """

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: Union[str, list[str]] = "all-linear"
    task_adapters: bool = False
    task_fusion: Optional[Union[str, dict[str, Any]]] = None


def check_lora_settings(settings: LoraSettings, where: str = "model.lora") -> LoraSettings:
    """Return `settings` when they make sense, else raise one `InputError` naming the bad field."""
    if isinstance(settings, dict):
        settings = LoraSettings(**settings)
    if not isinstance(settings.r, int) or settings.r < 1:
        raise InputError(f"{where}.r", f"the rank must be a positive integer, got {settings.r!r}", "use e.g. r: 32")
    if not settings.alpha > 0:
        raise InputError(f"{where}.alpha", f"must be positive, got {settings.alpha!r}", "use e.g. alpha: 2 * r")
    if not 0.0 <= settings.dropout < 1.0:
        raise InputError(f"{where}.dropout", f"must be in [0, 1), got {settings.dropout!r}", "use e.g. 0.05")
    if not settings.target_modules:
        raise InputError(f"{where}.target_modules", "no modules to adapt",
                         "use all-linear or a list such as [q_proj, v_proj]")
    if not isinstance(settings.task_adapters, bool):
        raise InputError(f"{where}.task_adapters", f"must be true or false, got {settings.task_adapters!r}",
                         "use task_adapters: true for shared + per-task adapters")
    if settings.task_fusion is not None and not settings.task_adapters:
        raise InputError(f"{where}.task_fusion", "is set but task_adapters is false (there are no task adapters "
                         "to fuse)", "set task_adapters: true, or remove task_fusion")
    return settings


def _require_peft():
    try:
        import peft
    except ImportError as exc:
        raise InputError("model.lora", "LoRA needs the peft package, which is not installed",
                         "pip install 'codiemb_pl[lora]' (or set model.lora: null for full fine-tuning)") from exc
    return peft


class DropoutThenLinear(nn.Linear):
    """`A·dropout(x)` (peft's `lora_A(lora_dropout(x))`) whose dropout is recomputed in backward.

    Training with gradients: a non-reentrant `torch.utils.checkpoint` of `F.linear(F.dropout(x, p), A)`
    that keeps only `x` and the RNG state, and replays the same ops under that state in backward (the
    same mask, so the same outputs and gradients as peft's modules). Otherwise the plain composition.
    """

    def __init__(self, linear: nn.Linear, p: float):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        self.weight, self.bias, self.p = linear.weight, linear.bias, p   # the same parameters: the same keys

    def _dropped_linear(self, x: Tensor) -> Tensor:
        return nn.functional.linear(nn.functional.dropout(x, self.p, self.training), self.weight, self.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(self._dropped_linear, x, use_reentrant=False, preserve_rng_state=True)
        return self._dropped_linear(x)


def recompute_adapter_dropout(model: nn.Module) -> int:
    """Fold every LoRA layer's `nn.Dropout` into its `A` as a `DropoutThenLinear`; returns how many."""
    from peft.tuners.lora import LoraLayer

    folded = 0
    for layer in model.modules():
        if not isinstance(layer, LoraLayer):
            continue
        for name, dropout in list(layer.lora_dropout.items()):
            linear = layer.lora_A[name] if name in layer.lora_A else None
            if isinstance(dropout, nn.Dropout) and type(linear) is nn.Linear and name not in layer.lora_variant:
                layer.lora_A[name] = DropoutThenLinear(linear, dropout.p)
                layer.lora_dropout[name] = nn.Identity()
                folded += 1
    return folded


def add_lora_adapters(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Wrap `model` in a peft model with fresh adapters (with `task_adapters`: the shared and per-task sets,
    `task_lora.add_task_adapters`); every base weight is frozen; adapter dropout is recomputed in backward
    (`recompute_adapter_dropout`)."""
    peft = _require_peft()
    settings = check_lora_settings(settings)
    config = peft.LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                             target_modules=settings.target_modules, bias="none")
    try:
        model = add_task_adapters(model, config) if settings.task_adapters else \
            peft.get_peft_model(model, config, adapter_name=ADAPTER_NAME)
    except InputError:
        raise
    except ValueError as exc:  # e.g. target modules that the model does not have
        raise InputError("model.lora.target_modules", str(exc).splitlines()[0],
                         "name modules of this model (see model.named_modules()) or use all-linear") from exc
    recompute_adapter_dropout(model)
    return model


def is_lora_model(model: nn.Module) -> bool:
    """Whether `model` carries peft LoRA adapters."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def _trainable_names(module: nn.Module) -> set[str]:
    """Names of the trainable parameters, without the wrapper prefixes FSDP / checkpointing / compile add
    (a consolidated checkpoint's keys have none)."""
    names = set()
    for name, parameter in module.named_parameters():
        if parameter.requires_grad:
            for prefix in _WRAPPER_PREFIXES:
                name = name.replace(prefix, "")
            names.add(name)
    return names


def trainable_state_dict(module: nn.Module, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """The entries of `module`'s `state_dict` that are trainable parameters (the adapters under LoRA)."""
    trainable = _trainable_names(module)
    return {key: value for key, value in state_dict.items() if key in trainable}


def check_adapter_checkpoint(module: nn.Module, state_dict: dict[str, Tensor], where: str) -> None:
    """Refuse a checkpoint whose tensors are not exactly `module`'s trainable ones (one clear line)."""
    trainable = _trainable_names(module)
    missing, unexpected = sorted(trainable - state_dict.keys()), sorted(state_dict.keys() - trainable)
    if missing or unexpected:
        found = "other adapters" if any(".lora_" in key for key in state_dict) else "a full-weight checkpoint"
        raise InputError(where, f"holds {found}, not this model's LoRA adapters ({len(missing)} adapter tensors "
                         f"missing, e.g. {missing[:1]}; {len(unexpected)} unexpected, e.g. {unexpected[:1]})",
                         "resume with the model.lora settings the checkpoint was trained with")


def merged_weights(model: nn.Module) -> tuple[nn.Module, dict[str, Tensor]]:
    """`(base model, state dict)` with every LoRA delta merged: `W = W0 + s·B·A` under the base key names.

    For a model without adapters: `(model, model.state_dict())`. The adapted model is left untouched.
    Under FSDP2, inside `sharding.consolidated_weights(model)`, the weights are the gathered full ones.
    Task-routed adapters (`task_lora`) are merged by the model's `ADAPTER_MERGE_ATTRIBUTE` function (shared
    deltas plus a fusion of the task deltas), never by adding every set.
    """
    full = getattr(model, CONSOLIDATED_STATE_ATTRIBUTE, None)
    if not is_lora_model(model):
        return model, (dict(full) if full is not None else model.state_dict())
    if has_task_adapters(model):
        merge = getattr(model, ADAPTER_MERGE_ATTRIBUTE, None)
        if merge is None:
            raise InputError("merged_weights", "the model has task-routed adapters but no merge of their task deltas",
                             "build it with CoDiEmbModule (model.lora.task_adapters), which sets the fusion")
        base, adapters = split_adapter_state(dict(full) if full is not None else model.state_dict())
        return model.get_base_model(), merge(base, adapters)
    if full is not None:
        config = model.peft_config[ADAPTER_NAME]
        base, adapters = split_adapter_state(full)
        return model.get_base_model(), merge_adapters(base, adapters, config.lora_alpha / config.r, "FSDP2 model")
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    weights: dict[str, Tensor] = {}
    for key, value in base.state_dict().items():
        if ".lora_" in key:
            continue
        weights[key.replace(".base_layer.", ".")] = value
    with torch.no_grad():
        for name, layer in base.named_modules():
            if isinstance(layer, LoraLayer) and not layer.merged:
                key = f"{name}.weight"
                delta = sum(layer.get_delta_weight(adapter) for adapter in layer.active_adapters
                            if adapter in layer.lora_A or adapter in getattr(layer, "lora_embedding_A", {}))
                weights[key] = (weights[key].float() + delta.float()).to(weights[key].dtype)
    return base, weights


def base_model_of(model: nn.Module) -> nn.Module:
    """The plain model under a peft wrapper (`model` itself without adapters)."""
    return model.get_base_model() if is_lora_model(model) else model


def task_specialist_weights(model: nn.Module) -> dict[str, dict[str, Tensor]]:
    """`{task: W0 + shared delta + that task's delta}` of a task-routed model (`task_lora.specialist_weights`),
    under the base names; the gathered full weights under FSDP2 (inside `sharding.consolidated_weights`)."""
    full = getattr(model, CONSOLIDATED_STATE_ATTRIBUTE, None)
    base, adapters = split_adapter_state(dict(full) if full is not None else model.state_dict())
    return {task: specialist_weights(base, adapters, task_scale(model), task) for task in TASK_ADAPTERS}


def save_adapter(model: nn.Module, path: str | Path) -> None:
    """Write the adapters alone as a peft folder (adapter_config.json + adapter_model.safetensors), atomically."""
    if not is_lora_model(model):
        raise InputError(str(path), "the model has no LoRA adapters to save",
                         "train with model.lora set, or export the full model instead")
    full = getattr(model, CONSOLIDATED_STATE_ATTRIBUTE, None)  # FSDP2: the gathered full weights
    with atomic_directory(path) as folder:
        model.save_pretrained(folder, **({"state_dict": dict(full)} if full is not None else {}))


def lora_summary(model: nn.Module) -> dict[str, Any]:
    """Trainable and total parameter counts, and their ratio."""
    total = sum(parameter.numel() for parameter in model.parameters())
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    return {"trainable": trainable, "total": total, "fraction": trainable / max(total, 1)}


# --------------------------------------------------------------------------------------------------
# Adapter checkpoints in weight space (fusion, loading a .ckpt)

_ADAPTER_PREFIX = "base_model.model."


def is_adapter_state(state: Mapping[str, Any]) -> bool:
    """Whether a (prefix-stripped) checkpoint state holds LoRA adapter tensors."""
    return any(".lora_A." in key for key in state)


def merge_adapters(base: Mapping[str, Tensor], adapters: Mapping[str, Tensor], scale: float,
                   where: str) -> dict[str, Tensor]:
    """`base` with `W = W0 + scale·B·A` for every adapted matrix; every other tensor is `base`'s, untouched.

    `adapters` are peft names without the module prefix (`base_model.model.<path>.lora_A.<name>.weight`);
    `<path>.weight` must be a key of `base`.
    """
    merged = dict(base)
    for key in adapters:
        if ".lora_A." not in key:
            continue
        path, adapter = key[len(_ADAPTER_PREFIX):].split(".lora_A.") if key.startswith(_ADAPTER_PREFIX) \
            else key.split(".lora_A.")
        target = f"{path}.weight"
        b_key = key.replace(".lora_A.", ".lora_B.")
        if target not in base or b_key not in adapters:
            raise InputError(where, f"adapter {key} has no matching base weight {target} or B matrix",
                             "fuse LoRA checkpoints of the base model named in their model_name_or_path")
        w0 = base[target]
        delta = scale * (adapters[b_key].float() @ adapters[key].float())
        merged[target] = (w0.float() + delta).to(w0.dtype)
    return merged


def check_lora_mix(paths: Sequence[str], adapter_flags: Sequence[bool], allow_mixed: bool) -> None:
    """Refuse merging LoRA checkpoints with full ones unless `allow_mixed` (both are then merged in weight space)."""
    if allow_mixed or len(set(adapter_flags)) < 2:
        return
    lora = [path for path, flag in zip(paths, adapter_flags) if flag]
    full = [path for path, flag in zip(paths, adapter_flags) if not flag]
    raise InputError(lora[0], f"is a LoRA checkpoint but {full[0]} is a full one ({len(lora)} LoRA, {len(full)} full "
                     "inputs)", "fuse checkpoints of one kind, or pass --mixed-lora to merge them all in weight space")


def load_merged_weights(model: nn.Module, weights: Mapping[str, Tensor]) -> None:
    """Load full weights under base names (as `merged_weights` writes them) into `model`, strictly.

    With adapters, each adapted matrix's base weight takes the merged value and every `B` is zeroed, so
    the model computes exactly `weights` (the adapters stay in place, contributing nothing).
    """
    if not is_lora_model(model):
        model.load_state_dict(dict(weights), strict=True)
        return
    base = model.get_base_model()
    names = {key.replace(".base_layer.", "."): key for key in base.state_dict() if ".lora_" not in key}
    missing, unexpected = sorted(names.keys() - weights.keys()), sorted(weights.keys() - names.keys())
    if missing or unexpected:
        raise InputError("load_merged_weights", f"{len(missing)} weights missing (e.g. {missing[:1]}), "
                         f"{len(unexpected)} unexpected (e.g. {unexpected[:1]})", "load weights of this base model")
    base.load_state_dict({names[key]: value for key, value in weights.items()}, strict=False)
    with torch.no_grad():
        for name, parameter in base.named_parameters():
            if ".lora_B." in name:
                parameter.zero_()
