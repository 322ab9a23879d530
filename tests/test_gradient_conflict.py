"""Gradient conflict and combination on plain tensors: PCGrad and MGDA against hand-computed two-task combinations
(conflicting, aligned, equal gradients), cosine / norm ratio per layer group."""

from __future__ import annotations

import math

import pytest
import torch

from codiemb_pl.training.gradient_combination import combination_weights, combine, combined_norm, mgda_alpha
from codiemb_pl.training.gradient_conflict import conflict_metrics, gram_of, layer_group


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def combined(first: torch.Tensor, second: torch.Tensor, method: str) -> torch.Tensor:
    out, _, _ = combine([first.clone()], [second.clone()], method)
    return out[0]


# g1 = (1, 0), g2 = (-1, 1): g11 = 1, g22 = 2, g12 = -1 (they conflict)
CONFLICTING = (t(1, 0), t(-1, 1))


def test_pcgrad_projects_each_conflicting_gradient_off_the_other():
    # g1' = g1 - (-1/2) g2 = (0.5, 0.5);  g2' = g2 - (-1/1) g1 = (0, 1);  g = (0.5, 1.5)
    g1, g2 = CONFLICTING
    torch.testing.assert_close(combined(g1, g2, "pcgrad"), t(0.5, 1.5))
    assert float(t(0.5, 0.5) @ g2) == 0.0 and float(t(0, 1) @ g1) == 0.0   # the projections are orthogonal


def test_pcgrad_and_sum_leave_aligned_and_equal_gradients_alone():
    for g1, g2 in ((t(1, 2), t(3, 1)), (t(1, -2), t(1, -2)), (t(1, 0), t(0, 1))):   # g12 = 5, 5, 0 (not < 0)
        torch.testing.assert_close(combined(g1, g2, "pcgrad"), g1 + g2)
        torch.testing.assert_close(combined(g1, g2, "sum"), g1 + g2)


def test_mgda_is_the_min_norm_point_of_the_segment():
    g1, g2 = CONFLICTING
    # alpha = (g22 - g12) / (g11 + g22 - 2 g12) = 3 / 5;  g = 0.6 (1, 0) + 0.4 (-1, 1) = (0.2, 0.4)
    torch.testing.assert_close(combined(g1, g2, "mgda"), t(0.2, 0.4))
    grid = torch.linspace(0, 1, 1001, dtype=torch.float64)
    norms = torch.stack([(a * g1 + (1 - a) * g2).norm() for a in grid])
    assert abs(float(grid[norms.argmin()]) - 0.6) < 1e-3
    gram = gram_of([g1], [g2])
    assert combined_norm(gram, combination_weights(gram, "mgda")) == pytest.approx(math.sqrt(0.2), rel=1e-12)


def test_mgda_aligned_gradients_clip_to_the_shorter_one_or_meet_in_between():
    # g2 = 3 g1: alpha = (9 - 3) / (1 + 9 - 6) = 1.5 -> clipped to 1: the step is g1, the shorter gradient
    torch.testing.assert_close(combined(t(1, 0), t(3, 0), "mgda"), t(1, 0))
    # orthogonal unit gradients: alpha = 1/2 -> (0.5, 0.5)
    torch.testing.assert_close(combined(t(1, 0), t(0, 1), "mgda"), t(0.5, 0.5))


def test_mgda_equal_and_zero_gradients():
    torch.testing.assert_close(combined(t(2, 1), t(2, 1), "mgda"), t(2, 1))   # alpha = 1/2: the gradient itself
    assert mgda_alpha(gram_of([t(0, 0)], [t(0, 0)])) == 0.5
    torch.testing.assert_close(combined(t(0, 0), t(0, 0), "pcgrad"), t(0, 0))


def test_combination_over_parameter_lists_equals_the_flattened_gradient():
    generator = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (5,), (2, 2, 2)]
    first = [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]
    second = [-f + 0.3 * torch.randn(f.shape, generator=generator, dtype=torch.float64) for f in first]  # conflicting
    flat = lambda tensors: torch.cat([x.reshape(-1) for x in tensors])  # noqa: E731
    for method in ("sum", "pcgrad", "mgda"):
        per_parameter, gram, weights = combine([f.clone() for f in first], [s.clone() for s in second], method)
        torch.testing.assert_close(flat(per_parameter), combined(flat(first), flat(second), method))
        assert gram.g12 < 0
    # a parameter without a gradient (None) counts as zeros
    a, b = first[0].reshape(-1), second[0].reshape(-1)[:5]
    out, _, _ = combine([a.clone(), None], [None, b.clone()], "mgda")
    expected = combined(torch.cat([a, torch.zeros(5, dtype=a.dtype)]), torch.cat([torch.zeros_like(a), b]), "mgda")
    torch.testing.assert_close(torch.cat([out[0], out[1]]), expected)


def test_layer_groups_of_encoder_and_decoder_names():
    assert layer_group("encoder.model.embeddings.word_embeddings.weight") == "embeddings"
    assert layer_group("encoder.model.encoder.layer.1.attention.self.query.weight") == "block_01"
    assert layer_group("encoder.model.base_model.model.layers.12.mlp.up_proj.lora_A.default.weight") == "block_12"
    assert layer_group("model.embed_tokens.weight") == "embeddings"
    assert layer_group("transformer.wte.weight") == "embeddings"
    assert layer_group("encoder.model.pooler.dense.weight") == "head"
    assert layer_group("embedding_projection.weight") == "head"   # the distillation projection is no embedding


def test_conflict_metrics_overall_and_per_group():
    names = ["m.embeddings.word_embeddings.weight", "m.encoder.layer.0.dense.weight", "m.encoder.layer.0.dense.bias",
             "m.pooler.dense.weight"]
    ir = [t(1, 0), t(1, 1), t(0), t(2)]
    sts = [t(1, 0), t(-1, -1), t(3), None]
    metrics = conflict_metrics(names, ir, sts)
    # overall: g_IR = (1,0,1,1,0,2), g_STS = (1,0,-1,-1,3,0): g12 = 1 - 2 = -1, g11 = 7, g22 = 12
    assert metrics["cosine"] == pytest.approx(-1 / math.sqrt(84))
    assert metrics["norm_ratio"] == pytest.approx(math.sqrt(7 / 12))
    assert metrics["norm_first"] == pytest.approx(math.sqrt(7)) and metrics["norm_second"] == pytest.approx(math.sqrt(12))
    assert metrics["embeddings/cosine"] == pytest.approx(1.0) and metrics["embeddings/norm_ratio"] == pytest.approx(1.0)
    # block 0: (1,1,0) against (-1,-1,3): g12 = -2, g11 = 2, g22 = 11
    assert metrics["block_00/cosine"] == pytest.approx(-2 / math.sqrt(22))
    assert metrics["head/cosine"] == 0.0 and metrics["head/norm_ratio"] == math.inf   # STS gives the head nothing
    assert [key for key in metrics if key.endswith("/cosine")] == ["embeddings/cosine", "block_00/cosine",
                                                                  "head/cosine"]


def test_gram_of_float32_gradients_longer_than_a_block_matches_float64():
    """Blocked float32 partial sums added in float64 (`blocked_dot`): a float32 gradient of several blocks and a tail
    gives the float64 Gram entries to ~1e-7 relative, and the combination applies them as for float64."""
    from codiemb_pl.training.gradient_conflict import DOT_BLOCK

    generator = torch.Generator().manual_seed(1)
    a = torch.randn(3 * DOT_BLOCK + 17, generator=generator)
    b = -0.3 * a + torch.randn(a.shape, generator=generator)
    gram = gram_of([a.view(-1, 1)], [b.view(-1, 1)])
    a64, b64 = a.double(), b.double()
    assert gram.g11 == pytest.approx(float(a64 @ a64), rel=1e-6)
    assert gram.g22 == pytest.approx(float(b64 @ b64), rel=1e-6)
    assert gram.g12 == pytest.approx(float(a64 @ b64), rel=1e-6) and gram.g12 < 0
    mixed = gram_of([a.double()], [b])   # float64 against float32: compared in float64
    assert mixed.g12 == pytest.approx(float(a64 @ b64), rel=1e-12)
    out, _, weights = combine([a.clone()], [b.clone()], "pcgrad")
    torch.testing.assert_close(out[0], weights[0] * a + weights[1] * b)
