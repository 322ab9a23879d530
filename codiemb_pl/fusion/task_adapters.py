"""The export of a task-routed LoRA run (`model.lora.task_adapters`): shared adapters plus fused task adapters.

With the shared delta S = s·B_shared·A_shared and the task deltas D_t = s·B_t·A_t of every adapted matrix,

    θ* = (W0 + S) + fuse(D_ir, D_sts)

where `fuse` is any per-tensor method of `fusion.methods` run by the merge engine (`fusion.engine.Merge`) with
the shared model W0 + S as its base and the two specialists W0 + S + D_t as its members (delta-guided by
default). Only the adapted matrices are merged (every other tensor is W0's, which no member moved); the members
are computed one tensor at a time from the adapters (`_AdaptedWeights`), in float32, so the merge holds a few
tensors beside the base weights rather than three copies of the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Optional

from torch import Tensor

from codiemb_pl.errors import InputError
from codiemb_pl.fusion.engine import Merge
from codiemb_pl.model.task_lora import SHARED_ADAPTER, TASK_ADAPTERS, adapted_key, adapter_delta

DEFAULT_TASK_FUSION: dict[str, Any] = {"method": "delta_guided", "params": {"gamma": 1.0}}


class _AdaptedWeights(Mapping):
    """`{key: W0[key] + Σ_d d(key)}` (float32) over the adapted keys, for the delta functions `deltas` (s·B·A of
    one adapter set each), computed on access (the last key is kept: the engine reads a key's shape, dtype and
    rows in turn)."""

    def __init__(self, base: Mapping[str, Tensor], deltas: Sequence[Callable[[str], Tensor]], keys: list[str]):
        self.base, self.deltas, self.keys_ = base, deltas, keys
        self._last: tuple[Optional[str], Optional[Tensor]] = (None, None)

    def __getitem__(self, key: str) -> Tensor:
        if self._last[0] != key:
            value = self.base[key].detach().float()
            for delta in self.deltas:
                value = value + delta(key)
            self._last = (key, value)
        return self._last[1]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys_)

    def __len__(self) -> int:
        return len(self.keys_)


def _delta_of(adapters: Mapping[str, Tensor], adapter: str, scale: float, a_keys: Mapping[str, str]
              ) -> Callable[[str], Tensor]:
    """base key -> s·B·A of adapter set `adapter` for that weight (`a_keys`: base key -> the shared set's A key)."""
    return lambda key: adapter_delta(adapters, a_keys[key].replace(f".lora_A.{SHARED_ADAPTER}.",
                                                                   f".lora_A.{adapter}."), scale)


def fuse_task_adapters(base: Mapping[str, Tensor], adapters: Mapping[str, Tensor], scale: float,
                       method: str = DEFAULT_TASK_FUSION["method"], params: Optional[dict[str, Any]] = None,
                       weights: Optional[Sequence[float]] = None, seed: int = 0) -> dict[str, Tensor]:
    """θ* = (W0 + S) + fuse(D_ir, D_sts) as plain weights under the base names (see the module docstring).

    `base`: W0 under the base model's names; `adapters`: the peft adapter tensors (`task_lora.split_adapter_state`);
    `method`, `params`, `weights`: a merge method of `fusion.methods` and its settings (members in the order
    `TASK_ADAPTERS`: ir, sts); each result is cast to W0's dtype.
    """
    if params is None and method == DEFAULT_TASK_FUSION["method"]:
        params = dict(DEFAULT_TASK_FUSION["params"])
    a_keys = {adapted_key(key): key for key in adapters if f".lora_A.{SHARED_ADAPTER}." in key}
    keys = [key for key in base if key in a_keys]
    if len(keys) < len(a_keys):
        missing = sorted(set(a_keys) - set(keys))
        raise InputError("task-routed LoRA", f"adapters target {missing[0]}, which the base model lacks "
                         f"({len(missing)} such weights)", "merge adapters with the base model they were trained on")
    shared = _delta_of(adapters, SHARED_ADAPTER, scale, a_keys)
    start = _AdaptedWeights(base, [shared], keys)
    members = [_AdaptedWeights(base, [shared, _delta_of(adapters, task, scale, a_keys)], keys)
               for task in TASK_ADAPTERS]
    merge = Merge(start, members, method, params, weights=weights, seed=seed, max_elements=None)
    fused = dict(base)
    for key in keys:
        fused[key] = merge.tensor(key).to(base[key].dtype)
    return fused
