"""`resolve_device`: what `--device` of `codiemb evaluate` / `mine-negatives` turns into."""

import pytest
import torch

from codiemb_pl.errors import InputError
from codiemb_pl.model.device import resolve_device


@pytest.fixture
def machine(monkeypatch):
    """Pretend this machine has `gpus` CUDA devices and (or not) MPS."""
    def configure(gpus: int, mps: bool = False):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    return configure


@pytest.mark.parametrize("gpus, mps, expected", [(2, True, "cuda"), (0, True, "mps"), (0, False, "cpu")])
def test_auto_prefers_cuda_then_mps_then_cpu(machine, gpus, mps, expected):
    machine(gpus, mps)
    assert resolve_device("auto") == torch.device(expected)


def test_named_devices_that_exist_are_returned(machine):
    machine(2)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


@pytest.mark.parametrize("gpus, name, message", [
    (0, "cuda", "CUDA is not available on this machine"),
    (2, "cuda:2", "this machine has 2 CUDA device(s)"),
    (0, "mps", "MPS is not available on this machine"),
    (0, "gpu0", "not a torch device"),
    (0, "meta", "unsupported device type 'meta'"),
])
def test_missing_or_unknown_devices_are_one_clear_error(machine, gpus, name, message):
    machine(gpus)
    with pytest.raises(InputError) as raised:
        resolve_device(name)
    assert str(raised.value).startswith(f"--device {name}: {message}")
