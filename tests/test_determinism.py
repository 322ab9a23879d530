"""Determinism: the same config and seed give bit-identical weights twice on CPU (checkpoint and export);
a different seed does not (so the comparison can fail)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from codiemb_pl.cli.main import main

TINY_CONFIG = Path(__file__).parent / "conf" / "tiny.yaml"


def fit(model_dir: Path, run: Path, *extra: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Fit the tiny config into `run`; return (last.ckpt state dict, exported model.safetensors tensors)."""
    code = main(["fit", "--config", str(TINY_CONFIG), "--model.model_name_or_path", str(model_dir),
                 "--trainer.default_root_dir", str(run),
                 "--trainer.callbacks+=codiemb_pl.callbacks.ExportEncoder", "--trainer.callbacks.dirpath",
                 str(run / "model"), "--trainer.callbacks.from_best", "false", *extra])
    assert code == 0
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 4
    exported = load_file(next((run / "model").rglob("model.safetensors")))
    return checkpoint["state_dict"], exported


def differing(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> list[str]:
    assert first.keys() == second.keys()
    return [name for name in first if not torch.equal(first[name], second[name])]


def test_same_config_and_seed_give_identical_weights(tiny_model_dir, tmp_path):
    checkpoint_a, export_a = fit(tiny_model_dir, tmp_path / "a")
    checkpoint_b, export_b = fit(tiny_model_dir, tmp_path / "b")
    assert not differing(checkpoint_a, checkpoint_b)
    assert not differing(export_a, export_b)

    checkpoint_c, _ = fit(tiny_model_dir, tmp_path / "c", "--seed_everything", "8")  # other dropout masks
    assert differing(checkpoint_a, checkpoint_c)
