"""saved_for_backward: the storages autograd keeps for backward, each once, the excluded ones left out."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # a benchmark helper
from saved_for_backward import saved_for_backward  # noqa: E402


def test_counts_the_saved_storages_once_and_leaves_out_the_excluded():
    x = torch.randn(3, 4, requires_grad=True)          # 12 float32: 48 bytes
    w = torch.nn.Parameter(torch.randn(4))             # 4 float32: 16 bytes
    with saved_for_backward([w]) as storages:
        y = (x * w).exp().sum()   # mul saves x and w (w excluded), exp saves its output (48 bytes), sum nothing
    assert sum(storages.values()) == 48 + 48
    assert x.untyped_storage().data_ptr() in storages
    y.backward()                                       # the saved tensors are the real ones: backward still works
    assert torch.allclose(x.grad, (x * w).exp().detach() * w.detach())

    with saved_for_backward([]) as storages:
        (x * w).sum()                                  # nothing excluded: x and w
    assert sum(storages.values()) == 48 + 16

    with saved_for_backward([]) as storages:
        (x[0] * x[1]).sum()                            # two views of one storage: counted once
    assert storages == {x.untyped_storage().data_ptr(): 48}


def test_nothing_is_recorded_outside_the_block():
    x = torch.randn(5, requires_grad=True)
    with saved_for_backward([]) as storages:
        pass
    (x * x).sum()
    assert storages == {}
