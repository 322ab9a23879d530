"""Bytes of activations autograd keeps for backward: the memory a training step holds between passes.

Used to measure what a change to the model (LoRA's recomputed dropout, checkpointing) saves, exactly and
independent of the machine's load (`benchmarks/llm_memory.py --saved-per-block`, `tests/test_lora.py`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import Tensor


@contextmanager
def saved_for_backward(excluded: Iterable[Tensor]) -> Iterator[dict[int, int]]:
    """Record the storages of the tensors autograd saves for backward inside the `with` block.

    Yields `{storage data pointer: storage bytes}`, filled as the block runs: each storage counted once
    however many saved tensors view it, the storages of `excluded` (the parameters, kept anyway) left out.
    Bytes kept for backward = `sum(storages.values())`. Example: under it, `(x * w).sum()` with `w` excluded
    records `x`'s storage only (mul saves `x` and `w`, sum saves nothing but a shape).
    """
    excluded_storages = {tensor.untyped_storage().data_ptr() for tensor in excluded}
    storages: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded_storages:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield storages
