"""Self Positioning on the tiny encoder with an IR + STS probe set: the fit lowers the probe loss and the
merged weights are θ0 + λ·V(a) for the reported coefficients (brute-force pairwise SLERP)."""

from __future__ import annotations

import pytest
import torch

from codiemb_pl.data.cache.token_ids import TokenLimits
from codiemb_pl.data.sources import SourceConfig
from codiemb_pl.errors import InputError
from codiemb_pl.fusion.methods import slerp
from codiemb_pl.model.encoder import TextEncoder
from codiemb_pl.workflows.probe import build_probe_batches, encoder_view, probe_loss_fn, self_positioning_merge

PROBE_SOURCES = [
    SourceConfig(name="demo_ir", task="ir", path="pkg://codiemb_pl/demo/ir_train.jsonl"),
    SourceConfig(name="demo_sts", task="sts", path="pkg://codiemb_pl/demo/sts_train.jsonl", score_range=[0, 5]),
]
PROBE_SIZE = 8
BATCH = 8
LIMITS = TokenLimits(query=24, passage=40, sts=32)
STEPS = 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def trained_on_probe(model_dir, steps: int = 6) -> dict[str, torch.Tensor]:
    """A checkpoint that really improves the probe loss: a few Adam steps of the probe losses themselves."""
    encoder = TextEncoder(str(model_dir))
    batches = build_probe_batches(encoder.tokenizer, PROBE_SOURCES, probe_size=PROBE_SIZE, batch_size=BATCH,
                                  limits=LIMITS)
    loss_fn = probe_loss_fn()
    optimizer = torch.optim.Adam(encoder.parameters(), lr=2e-3)
    for step in range(steps):
        optimizer.zero_grad()
        loss_fn(encoder, batches[step % len(batches)]).backward()
        optimizer.step()
    return {key: value.detach().clone() for key, value in encoder.state_dict().items()}


def noisy(model_dir, scale: float = 2e-3) -> dict[str, torch.Tensor]:
    """A checkpoint in Hugging Face naming (no `model.` prefix): the base plus seeded noise."""
    generator = torch.Generator().manual_seed(1)
    state = TextEncoder(str(model_dir)).model.state_dict()
    return {key: value + scale * torch.randn(value.shape, generator=generator) if value.is_floating_point() else value
            for key, value in state.items()}


@pytest.fixture(scope="module")
def merge_result(tiny_model_dir):
    checkpoints = [trained_on_probe(tiny_model_dir), noisy(tiny_model_dir)]
    merged, info = self_positioning_merge(str(tiny_model_dir), checkpoints, PROBE_SOURCES, steps=STEPS, lr=0.05,
                                          probe_size=PROBE_SIZE, probe_batch_size=BATCH, limits=LIMITS, seed=0)
    return checkpoints, merged, info


def test_fit_moves_the_coefficients_and_lowers_the_probe_loss(merge_result):
    _, _, info = merge_result
    assert info["probe_batches"] == {"ir": 1, "sts": 1}
    assert len(info["loss"]) == len(info["probe_loss"]) == STEPS
    assert all(abs(a - 1.0) > 1e-3 for a in info["coefficients"])
    assert abs(info["scale"] - 1.0) > 1e-3
    assert info["final_probe_loss"] < info["initial_probe_loss"] - 1e-3
    # the trained checkpoint helps, the noise does not: its weight ends above the noise's
    assert info["coefficients"][0] > info["coefficients"][1]


def test_merged_state_is_base_plus_scaled_pairwise_slerp_of_reported_coefficients(merge_result, tiny_model_dir):
    checkpoints, merged, info = merge_result
    encoder = TextEncoder(str(tiny_model_dir))
    names = [name for name, _ in encoder.named_parameters()]
    dtypes = {name: p.dtype for name, p in encoder.named_parameters()}
    base = torch.cat([p.detach().reshape(-1).double() for _, p in encoder.named_parameters()])
    vectors = [torch.cat([encoder_view(c, dtypes, "c")[n].reshape(-1).double() for n in names]) - base
               for c in checkpoints]
    a, lam = info["coefficients"], info["scale"]
    t = a[1] / (a[0] + a[1])                                   # running weight a_1 (mean of one) vs a_2
    expected = base + lam * slerp(torch.zeros_like(base), vectors, t=t)
    got = torch.cat([merged[n].reshape(-1).double() for n in names])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert set(merged) == set(encoder.state_dict())


def test_checkpoint_key_styles_and_bad_inputs(tiny_model_dir):
    encoder = TextEncoder(str(tiny_model_dir))
    state = encoder.state_dict()
    dtypes = {name: p.dtype for name, p in encoder.named_parameters()}
    lightning_style = {"encoder." + key: value for key, value in state.items()}
    hugging_face_style = encoder.model.state_dict()
    for checkpoint in (state, lightning_style, hugging_face_style):
        view = encoder_view(checkpoint, dtypes, "checkpoint")
        assert all(torch.equal(view[name], state[name]) for name in dtypes)
    with pytest.raises(InputError, match="model_dir"):
        self_positioning_merge(state, [state], PROBE_SOURCES, steps=1)
    with pytest.raises(InputError, match="no tensor for encoder parameter"):
        self_positioning_merge(str(tiny_model_dir), [{"x": torch.zeros(1)}], PROBE_SOURCES, steps=1)


def test_probe_limits_from_a_fusion_config_mapping():
    """`limits` as a fusion config writes it (a mapping) fills in the probe defaults; an unknown key is one line."""
    from codiemb_pl.workflows.probe import PROBE_LIMITS, as_token_limits

    assert as_token_limits(None) == PROBE_LIMITS == TokenLimits(query=64, passage=256, sts=128)
    assert as_token_limits({"query": 16}) == TokenLimits(query=16, passage=256, sts=128)
    assert as_token_limits(LIMITS) is LIMITS
    with pytest.raises(InputError, match=r"unknown key\(s\) \['passages'\]"):
        as_token_limits({"passages": 16})
