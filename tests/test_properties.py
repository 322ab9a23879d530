"""Numerical properties (hypothesis): every loss is finite with finite gradients on any valid batch —
ties, all-equal scores, a batch of one, zero-norm or identical embeddings, masked candidates, τ down to
0.01 — and every merge method is finite, shape- and dtype-preserving on degenerate task vectors
(identical, opposite, zero, tiny or huge, half precision).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from codiemb_pl.fusion.methods import MERGE_METHODS
from codiemb_pl.losses.ir import multi_positive_info_nce
from codiemb_pl.losses.sts import (
    STSLossConfig,
    cosent_loss,
    mid_nce_loss,
    pearson_loss,
    pro_loss,
    rank_kl_loss,
    sts_loss,
)

PROPERTY_SETTINGS = settings(max_examples=60, deadline=None)
TEMPERATURES = st.sampled_from([0.01, 0.02, 0.05, 1.0])
# few distinct values, so ties and all-equal batches are common
SCORE_VALUES = st.sampled_from([0.0, 0.2, 0.5, 0.8, 1.0]) | st.floats(0.0, 1.0)
SIMILARITY_VALUES = st.sampled_from([-1.0, 0.0, 0.3, 1.0]) | st.floats(-1.0, 1.0)


def assert_finite_with_finite_gradients(loss: torch.Tensor, *inputs: torch.Tensor) -> None:
    assert loss.dim() == 0 and torch.isfinite(loss), loss
    loss.backward()
    for tensor in inputs:
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all(), tensor.grad


@st.composite
def sts_batches(draw) -> tuple[torch.Tensor, torch.Tensor]:
    """(pred, target) of 1–12 pairs: cosine similarities in [-1, 1], gold scores in [0, 1]."""
    n = draw(st.integers(1, 12))
    pred = draw(st.lists(SIMILARITY_VALUES, min_size=n, max_size=n))
    target = draw(st.lists(SCORE_VALUES, min_size=n, max_size=n))
    return torch.tensor(pred, requires_grad=True), torch.tensor(target)


@st.composite
def embeddings(draw, rows: int, dim: int) -> torch.Tensor:
    """[rows, dim] vectors, each random, zero, or a copy of an earlier row (identical embeddings)."""
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    out = torch.randn(rows, dim, generator=generator)
    for row in range(rows):
        kind = draw(st.sampled_from(["random", "zero", "copy"]))
        if kind == "zero":
            out[row] = 0.0
        elif kind == "copy" and row > 0:
            out[row] = out[draw(st.integers(0, row - 1))]
    return out


@PROPERTY_SETTINGS
@given(batch=sts_batches(), temperature=TEMPERATURES)
def test_sts_order_losses_are_finite_with_finite_gradients(batch, temperature):
    pred, target = batch
    for loss_fn in (lambda: pearson_loss(pred, target), lambda: rank_kl_loss(pred, target, temperature),
                    lambda: pro_loss(pred, target, temperature), lambda: cosent_loss(pred, target, 1.0 / temperature)):
        pred.grad = None
        assert_finite_with_finite_gradients(loss_fn(), pred)


@PROPERTY_SETTINGS
@given(data=st.data(), n=st.integers(1, 8), dim=st.integers(1, 8), temperature=TEMPERATURES,
       threshold=st.sampled_from([0.0, 0.5, 0.8, 1.0]))
def test_mid_nce_is_finite_with_zero_norm_and_identical_embeddings(data, n, dim, temperature, threshold):
    emb1 = data.draw(embeddings(n, dim)).requires_grad_()
    emb2 = data.draw(embeddings(n, dim)).requires_grad_()
    target = torch.tensor(data.draw(st.lists(SCORE_VALUES, min_size=n, max_size=n)))
    assert_finite_with_finite_gradients(mid_nce_loss(emb1, emb2, target, threshold, temperature), emb1, emb2)


@PROPERTY_SETTINGS
@given(data=st.data(), dim=st.integers(1, 8), temperature=TEMPERATURES)
def test_combined_sts_loss_with_every_component_is_finite(data, dim, temperature):
    pred, target = data.draw(sts_batches())
    n = pred.shape[0]
    mid1 = data.draw(embeddings(n, dim)).requires_grad_()
    mid2 = data.draw(embeddings(n, dim)).requires_grad_()
    config = STSLossConfig(cosent=1.0, rank_kl_temperature=temperature, pro_temperature=temperature,
                           mid_nce_temperature=temperature, cosent_scale=1.0 / temperature)
    total, components = sts_loss(pred, target, config, mid1, mid2)
    assert set(components) == {"pearson", "rank_kl", "pro", "mid_nce", "cosent"}
    assert all(torch.isfinite(value) for value in components.values()), components
    assert_finite_with_finite_gradients(total, pred, mid1, mid2)


@st.composite
def ir_batches(draw) -> dict:
    """A global IR batch (B queries, P positives, N negatives) with this rank's b queries at an offset,
    degenerate embeddings, random padding masks and colliding text ids."""
    world = draw(st.integers(1, 3))
    local = draw(st.integers(1, 4))
    global_size = world * local
    slots, negatives_per_query, dim = draw(st.integers(1, 3)), draw(st.integers(0, 3)), draw(st.integers(1, 8))
    offset = draw(st.integers(0, world - 1)) * local

    def normalised(rows: int) -> torch.Tensor:
        return F.normalize(draw(embeddings(rows, dim)), dim=-1)

    batch = {
        "queries": normalised(local).requires_grad_(),
        "positives": normalised(global_size * slots).view(global_size, slots, dim).requires_grad_(),
        "negatives": (normalised(global_size * negatives_per_query).view(global_size, negatives_per_query, dim)
                      .requires_grad_() if negatives_per_query and draw(st.booleans()) else None),
        "query_offset": offset,
    }
    if batch["negatives"] is not None and draw(st.booleans()):
        batch["negative_mask"] = torch.tensor(draw(st.lists(st.booleans(), min_size=global_size * negatives_per_query,
                                                            max_size=global_size * negatives_per_query)),
                                              dtype=torch.bool).view(global_size, negatives_per_query)
    if draw(st.booleans()):  # false-negative mask with few distinct ids: many candidates share a positive's text
        ids = st.integers(0, 3)
        batch["positive_ids"] = torch.tensor(draw(st.lists(ids, min_size=global_size * slots,
                                                           max_size=global_size * slots))).view(global_size, slots)
        batch["negative_ids"] = torch.tensor(draw(st.lists(
            ids, min_size=global_size * negatives_per_query,
            max_size=global_size * negatives_per_query))).view(global_size, negatives_per_query)
    return batch


@PROPERTY_SETTINGS
@given(batch=ir_batches(), temperature=TEMPERATURES)
def test_ir_info_nce_is_finite_with_finite_gradients(batch, temperature):
    leaves = [batch[key] for key in ("queries", "positives", "negatives") if batch[key] is not None]
    loss = multi_positive_info_nce(batch.pop("queries"), batch.pop("positives"), batch.pop("negatives"),
                                   temperature=temperature, **batch)
    assert_finite_with_finite_gradients(loss, *leaves)


def test_ir_loss_of_a_query_whose_every_other_candidate_is_masked_is_zero():
    """The target is never masked: with all negatives padding and one query, the loss is exactly 0."""
    query = F.normalize(torch.randn(1, 4), dim=-1).requires_grad_()
    positives = F.normalize(torch.randn(1, 1, 4), dim=-1)
    negatives = torch.zeros(1, 2, 4)
    loss = multi_positive_info_nce(query, positives, negatives, temperature=0.01,
                                   negative_mask=torch.zeros(1, 2, dtype=torch.bool))
    assert loss.item() == 0.0
    assert_finite_with_finite_gradients(loss, query)


MERGE_PARAMETERS = {
    "uniform_soup": st.just({}),
    "task_arithmetic": st.fixed_dictionaries({"scale": st.floats(0.0, 2.0)}),
    "delta_guided": st.fixed_dictionaries({"gamma": st.sampled_from([0.0, 1.0, 8.0, 50.0]),
                                           "granularity": st.sampled_from(["element", "row", "tensor", "layer"])}),
    "ties": st.fixed_dictionaries({"density": st.sampled_from([0.01, 0.2, 1.0])}),
    "dare": st.fixed_dictionaries({"drop_rate": st.sampled_from([0.0, 0.5, 0.99])}),
    "multi_slerp": st.just({}),
    "slerp": st.fixed_dictionaries({"t": st.floats(0.0, 1.0)}),
}


@st.composite
def degenerate_task_vectors(draw, count: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(base, deltas): deltas built from one direction as copies, opposites, zeros or fresh noise, scaled
    from 1e-30 to 1e4, in float32 or a half-precision dtype."""
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    base = torch.randn(shape, generator=generator)
    direction = torch.randn(shape, generator=generator)
    deltas = []
    for _ in range(count):
        kind = draw(st.sampled_from(["same", "opposite", "zero", "noise"]))
        vector = {"same": direction, "opposite": -direction, "zero": torch.zeros(shape),
                  "noise": torch.randn(shape, generator=generator)}[kind]
        deltas.append(vector * draw(st.sampled_from([1e-30, 1e-6, 1.0, 1e4])))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    return base.to(dtype), [delta.to(dtype) for delta in deltas]


@pytest.mark.parametrize("name", sorted(MERGE_METHODS))
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_every_merge_method_is_finite_and_shape_preserving_on_degenerate_deltas(name, data):
    count = 2 if name == "slerp" else data.draw(st.integers(1, 4))
    base, deltas = data.draw(degenerate_task_vectors(count))
    params = dict(data.draw(MERGE_PARAMETERS[name]))
    if params.get("granularity") == "layer":  # the streaming merge passes each checkpoint's layer norm
        params["magnitudes"] = [float(delta.double().norm()) for delta in deltas]
    if data.draw(st.booleans()) and name != "slerp":
        params["weights"] = data.draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 3.0]), min_size=count,
                                               max_size=count).filter(lambda w: sum(w) > 0))
    merged = MERGE_METHODS[name](base, deltas, generator=torch.Generator().manual_seed(0), **params)
    assert merged.shape == base.shape and merged.dtype == base.dtype
    assert torch.isfinite(merged).all(), (name, params, merged)
