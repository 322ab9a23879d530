"""IR loss (SPEC §3): multi-positive InfoNCE vs an explicit loop reference, masks, diagnostics, DDP."""

from __future__ import annotations

import math
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from codiemb_pl.losses.gather import gather_no_grad, gather_with_grad, rank_and_world
from codiemb_pl.losses.ir import ir_batch_diagnostics, multi_positive_info_nce


# --------------------------------------------------------------------------------------------------
# Independent reference: explicit loops over slot k, local query i, candidate j, with exp / log.
# Uses torch scalar ops only so autograd can differentiate it.
# --------------------------------------------------------------------------------------------------
def reference_info_nce(queries, positives, negatives, temperature, query_offset=0, negative_mask=None,
                       query_positive_ids=None, positive_ids=None, negative_ids=None):
    b = queries.shape[0]
    num_queries, num_slots, _ = positives.shape
    num_negatives = 0 if negatives is None else negatives.shape[1]
    if query_positive_ids is None and positive_ids is not None:
        query_positive_ids = positive_ids[query_offset:query_offset + b]

    def is_false_negative(i, candidate_id):
        if query_positive_ids is None or candidate_id is None:
            return False
        return any(int(candidate_id) == int(own) for own in query_positive_ids[i])

    total = 0.0
    for k in range(num_slots):
        for i in range(b):
            g = query_offset + i
            numerator = torch.exp(torch.dot(queries[i], positives[g, k]) / temperature)
            denominator = numerator
            for j in range(num_queries):
                if j == g:
                    continue
                pid = None if positive_ids is None else positive_ids[j, k]
                if is_false_negative(i, pid):
                    continue
                denominator = denominator + torch.exp(torch.dot(queries[i], positives[j, k]) / temperature)
            for j in range(num_queries):
                for m in range(num_negatives):
                    if negative_mask is not None and not bool(negative_mask[j, m]):
                        continue
                    nid = None if negative_ids is None else negative_ids[j, m]
                    if is_false_negative(i, nid):
                        continue
                    denominator = denominator + torch.exp(torch.dot(queries[i], negatives[j, m]) / temperature)
            total = total - torch.log(numerator / denominator)
    return total / (num_slots * b)


def random_unit(generator, *shape, dtype=torch.float64):
    return F.normalize(torch.randn(*shape, generator=generator, dtype=dtype), dim=-1)


def random_problem(seed, num_queries=5, num_slots=2, num_negatives=3, dim=6):
    g = torch.Generator().manual_seed(seed)
    queries = random_unit(g, num_queries, dim)
    positives = random_unit(g, num_queries, num_slots, dim)
    negatives = random_unit(g, num_queries, num_negatives, dim) if num_negatives else None
    return g, queries, positives, negatives


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("num_slots,num_negatives", [(1, 0), (2, 3), (3, 1)])
@pytest.mark.parametrize("temperature", [0.01, 0.05, 1.0])
def test_matches_loop_reference(seed, num_slots, num_negatives, temperature):
    _, queries, positives, negatives = random_problem(seed, num_slots=num_slots, num_negatives=num_negatives)
    loss = multi_positive_info_nce(queries, positives, negatives, temperature=temperature)
    expected = reference_info_nce(queries, positives, negatives, temperature)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-9)


def test_hand_computed_two_queries():
    # q1=(1,0), q2=(0,1); p1=(1,0), p2=(0.6,0.8); τ=0.5.
    # q1: logits (1, 0.6)/0.5 = (2, 1.2) -> -log softmax_0 = log(1 + e^{-0.8})
    # q2: logits (0, 0.8)/0.5 = (0, 1.6) -> -log softmax_1 = log(1 + e^{-1.6})
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    positives = torch.tensor([[[1.0, 0.0]], [[0.6, 0.8]]], dtype=torch.float64)
    loss = multi_positive_info_nce(queries, positives, None, temperature=0.5)
    expected = (math.log(1 + math.exp(-0.8)) + math.log(1 + math.exp(-1.6))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.2775010, abs=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_gradients_match_reference(seed):
    _, queries, positives, negatives = random_problem(seed, num_queries=4, num_slots=2, num_negatives=2)
    mask = torch.tensor([[True, False], [True, True], [False, False], [True, False]])
    inputs = [t.clone().requires_grad_(True) for t in (queries, positives, negatives)]
    reference_inputs = [t.clone().requires_grad_(True) for t in (queries, positives, negatives)]
    multi_positive_info_nce(*inputs, temperature=0.05, negative_mask=mask).backward()
    reference_info_nce(*reference_inputs, 0.05, negative_mask=mask).backward()
    for got, want in zip(inputs, reference_inputs):
        assert torch.isfinite(got.grad).all()
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-8, atol=1e-10)
    # masked-out negatives get exactly zero gradient
    assert torch.all(inputs[2].grad[~mask] == 0)


def test_gradcheck_float64():
    _, queries, positives, negatives = random_problem(7, num_queries=3, num_slots=2, num_negatives=2, dim=4)
    mask = torch.tensor([[True, False], [True, True], [False, True]])
    ids = torch.tensor([[1, 2], [3, 1], [5, 6]])
    negative_ids = torch.tensor([[3, 8], [9, 10], [11, 2]])
    inputs = tuple(t.clone().requires_grad_(True) for t in (queries, positives, negatives))
    assert torch.autograd.gradcheck(
        lambda q, p, n: multi_positive_info_nce(q, p, n, temperature=0.1, negative_mask=mask,
                                                positive_ids=ids, negative_ids=negative_ids),
        inputs)


@pytest.mark.parametrize("seed", range(4))
def test_negative_mask_matches_reference_and_dropping(seed):
    g, queries, positives, negatives = random_problem(seed, num_queries=4, num_slots=2, num_negatives=3)
    mask = torch.rand(4, 3, generator=g) > 0.5
    mask[0] = False  # a query with no negatives at all
    loss = multi_positive_info_nce(queries, positives, negatives, temperature=0.05, negative_mask=mask)
    expected = reference_info_nce(queries, positives, negatives, 0.05, negative_mask=mask)
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-9)
    # all-masked negatives == no negatives at all
    none_kept = multi_positive_info_nce(queries, positives, negatives, temperature=0.05,
                                        negative_mask=torch.zeros(4, 3, dtype=torch.bool))
    torch.testing.assert_close(none_kept, multi_positive_info_nce(queries, positives, None, temperature=0.05))
    # masking changes the value (padding slots are really removed)
    unmasked = multi_positive_info_nce(queries, positives, negatives, temperature=0.05)
    assert unmasked > loss


@pytest.mark.parametrize("seed", range(4))
def test_false_negative_mask_matches_reference(seed):
    g, queries, positives, negatives = random_problem(seed, num_queries=5, num_slots=2, num_negatives=2)
    # small id alphabet -> many collisions between positives and negatives of different queries
    positive_ids = torch.randint(0, 6, (5, 2), generator=g)
    negative_ids = torch.randint(0, 6, (5, 2), generator=g)
    loss = multi_positive_info_nce(queries, positives, negatives, temperature=0.05,
                                   positive_ids=positive_ids, negative_ids=negative_ids)
    expected = reference_info_nce(queries, positives, negatives, 0.05,
                                  positive_ids=positive_ids, negative_ids=negative_ids)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-9)


def test_duplicate_positive_among_candidates_is_excluded():
    _, queries, positives, negatives = random_problem(11, num_queries=3, num_slots=1, num_negatives=2)
    # query 0's positive text (id 100) is also query 2's hard negative slot 1 and query 1's positive
    positive_ids = torch.tensor([[100], [100], [300]])
    negative_ids = torch.tensor([[1, 2], [3, 4], [5, 100]])
    with_ids = multi_positive_info_nce(queries, positives, negatives, temperature=0.05,
                                       positive_ids=positive_ids, negative_ids=negative_ids)
    # same thing written by hand for query 0: drop column "query 1's positive" and negative (2, 1)
    logits = torch.cat([queries @ positives[:, 0].T, queries @ negatives.reshape(-1, 6).T], dim=1) / 0.05
    keep = torch.ones_like(logits, dtype=torch.bool)
    keep[0, 1] = False      # query 1's positive (id 100) for query 0
    keep[1, 0] = False      # query 0's positive (id 100) for query 1
    keep[0, 3 + 5] = False  # negative (2, 1) for query 0
    keep[1, 3 + 5] = False  # and for query 1
    per_query = [-(logits[i, i] - torch.logsumexp(logits[i][keep[i]], dim=0)) for i in range(3)]
    torch.testing.assert_close(with_ids, torch.stack(per_query).mean())
    assert with_ids < multi_positive_info_nce(queries, positives, negatives, temperature=0.05)


def test_target_never_excluded_even_if_everything_collides():
    _, queries, positives, negatives = random_problem(3, num_queries=3, num_slots=2, num_negatives=2)
    same = torch.full((3, 2), 7)
    loss = multi_positive_info_nce(queries, positives, negatives, temperature=0.01,
                                   positive_ids=same, negative_ids=same)
    # only the target remains in every row: -log(1) = 0, finite, and gradients finite
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    q = queries.clone().requires_grad_(True)
    multi_positive_info_nce(q, positives, negatives, temperature=0.01, positive_ids=same,
                            negative_ids=same).backward()
    assert torch.isfinite(q.grad).all()


def test_fully_masked_row_with_float32_low_temperature_is_finite():
    _, queries, positives, negatives = random_problem(5, num_queries=3, num_slots=1, num_negatives=2,
                                                      dim=8)
    q = queries.float().requires_grad_(True)
    loss = multi_positive_info_nce(q, positives.float(), negatives.float(), temperature=0.01,
                                   negative_mask=torch.zeros(3, 2, dtype=torch.bool))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("local_batch", [1, 2, 3])
def test_query_offset_selects_the_right_targets(local_batch):
    _, queries, positives, negatives = random_problem(21, num_queries=6, num_slots=2, num_negatives=2)
    full = multi_positive_info_nce(queries, positives, negatives, temperature=0.05)
    chunks = [multi_positive_info_nce(queries[start:start + local_batch], positives, negatives,
                                      temperature=0.05, query_offset=start)
              for start in range(0, 6, local_batch)]
    torch.testing.assert_close(torch.stack(chunks).mean(), full)
    # and each chunk matches the reference on its own
    expected = reference_info_nce(queries[2:2 + local_batch], positives, negatives, 0.05, query_offset=2)
    got = multi_positive_info_nce(queries[2:2 + local_batch], positives, negatives, temperature=0.05,
                                  query_offset=2)
    torch.testing.assert_close(got, expected)
    # a wrong offset gives a different value (targets are the other queries' positives)
    wrong = multi_positive_info_nce(queries[2:2 + local_batch], positives, negatives, temperature=0.05,
                                    query_offset=3)
    assert not torch.allclose(wrong, got)


def test_query_offset_out_of_range_raises():
    _, queries, positives, negatives = random_problem(0, num_queries=4)
    with pytest.raises(ValueError):
        multi_positive_info_nce(queries[:2], positives, negatives, temperature=0.05, query_offset=3)


def test_other_positive_slots_not_in_denominator():
    # Query 0's slot-1 positive equals the query itself; slot 0 must not see it.
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    positives = torch.tensor([[[0.0, 1.0], [1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    loss = multi_positive_info_nce(queries, positives, None, temperature=1.0)
    # slot 0: q0 vs (0, 1) target 0 -> log(1+e^1); q1 vs (1, 0) target 1 -> log(1+e^1)
    # slot 1: q0 vs (1, 0) target 0 -> log(1+e^-1); q1 vs (0, 1) target 1 -> log(1+e^-1)
    expected = (2 * math.log(1 + math.e) + 2 * math.log(1 + math.exp(-1))) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_diagnostics_on_constructed_example():
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    positives = torch.tensor([[[0.8, 0.6]], [[1.0, 0.0]], [[0.6, 0.8]]])
    negatives = torch.tensor([[[0.0, 1.0], [0.6, 0.8]],
                              [[0.0, 1.0], [1.0, 0.0]],
                              [[0.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[True, True], [True, False], [False, False]])
    # candidates (slot 0): pos [ (0.8,0.6), (1,0), (0.6,0.8) ] ++ negs n00=(0,1), n01=(0.6,0.8), n10=(0,1)
    # q0=(1,0): target 0.8; others 1.0, 0.6, 0, 0.6, 0 -> rank 2
    # q1=(0,1): target 0.0; others 0.6, 0.8, 1, 0.8, 1 -> rank 6
    # q2=(.6,.8): target 1.0; others .96, .6, .8, 1.0 (tie counts against), .8 -> rank 2
    diagnostics = ir_batch_diagnostics(queries, positives, negatives, mask, 0)
    assert diagnostics["accuracy"].item() == pytest.approx(0.0)
    assert diagnostics["mean_rank_of_positive"].item() == pytest.approx((2 + 6 + 2) / 3)
    # margins: q0: 0.8 - max(0, 0.6) = 0.2; q1: 0 - 1 (only n10 is real) = -1; q2 has none -> skipped
    assert diagnostics["margin"].item() == pytest.approx((0.2 - 1.0) / 2)
    # a query subset with an offset: q2 alone has no negatives -> margin 0, rank 2
    sub = ir_batch_diagnostics(queries[2:], positives, negatives, mask, 2)
    assert sub["margin"].item() == 0.0 and sub["mean_rank_of_positive"].item() == 2.0
    # perfect retrieval: identity embeddings, no negatives
    eye = torch.eye(3)
    perfect = ir_batch_diagnostics(eye, eye[:, None, :], None, None, 0)
    assert perfect["accuracy"].item() == 1.0 and perfect["mean_rank_of_positive"].item() == 1.0
    assert perfect["margin"].item() == 0.0
    assert all(not v.requires_grad for v in diagnostics.values())


# --------------------------------------------------------------------------------------------------
# gather + distributed equivalence
# --------------------------------------------------------------------------------------------------
def test_gather_is_identity_without_process_group():
    x = torch.randn(3, 4, requires_grad=True)
    assert rank_and_world() == (0, 1)
    assert gather_with_grad(x) is x
    ids = torch.arange(3)
    assert gather_no_grad(ids) is ids


GLOBAL_QUERIES, SLOTS, NEGATIVES, IN_DIM, OUT_DIM, TAU = 6, 2, 2, 5, 4, 0.05


def _ddp_problem():
    """A tiny shared encoder (nn.Linear) and fixed inputs/ids for a global batch of 6 queries."""
    g = torch.Generator().manual_seed(1234)
    encoder = torch.nn.Linear(IN_DIM, OUT_DIM).double()
    with torch.no_grad():
        encoder.weight.copy_(torch.randn(OUT_DIM, IN_DIM, generator=g, dtype=torch.float64))
        encoder.bias.copy_(torch.randn(OUT_DIM, generator=g, dtype=torch.float64))
    x_query = torch.randn(GLOBAL_QUERIES, IN_DIM, generator=g, dtype=torch.float64)
    x_pos = torch.randn(GLOBAL_QUERIES, SLOTS, IN_DIM, generator=g, dtype=torch.float64)
    x_neg = torch.randn(GLOBAL_QUERIES, NEGATIVES, IN_DIM, generator=g, dtype=torch.float64)
    mask = torch.tensor([[True, True], [True, False], [False, False], [True, True], [False, True], [True, True]])
    positive_ids = torch.arange(GLOBAL_QUERIES * SLOTS).reshape(GLOBAL_QUERIES, SLOTS)
    negative_ids = 100 + torch.arange(GLOBAL_QUERIES * NEGATIVES).reshape(GLOBAL_QUERIES, NEGATIVES)
    negative_ids[4, 1] = positive_ids[0, 1]  # cross-device false negative (query 0 is on rank 0)
    positive_ids[5, 0] = positive_ids[1, 0]  # duplicate positive across devices
    return encoder, x_query, x_pos, x_neg, mask, positive_ids, negative_ids


def _embed(encoder, x_query, x_pos, x_neg):
    return (F.normalize(encoder(x_query), dim=-1), F.normalize(encoder(x_pos), dim=-1),
            F.normalize(encoder(x_neg), dim=-1))


def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        encoder, x_query, x_pos, x_neg, mask, positive_ids, negative_ids = _ddp_problem()
        local = slice(rank * GLOBAL_QUERIES // world_size, (rank + 1) * GLOBAL_QUERIES // world_size)
        queries, positives, negatives = _embed(encoder, x_query[local], x_pos[local], x_neg[local])
        assert rank_and_world() == (rank, world_size)
        gathered_positive_ids = gather_no_grad(positive_ids[local])
        assert torch.equal(gathered_positive_ids, positive_ids)
        loss = multi_positive_info_nce(
            queries, gather_with_grad(positives), gather_with_grad(negatives), temperature=TAU,
            query_offset=local.start, negative_mask=gather_no_grad(mask[local]),
            query_positive_ids=positive_ids[local], positive_ids=gathered_positive_ids,
            negative_ids=gather_no_grad(negative_ids[local]))
        loss.backward()
        # what DDP does: average parameter gradients (and we average the loss to compare it too)
        grads = [p.grad.clone() for p in encoder.parameters()]
        for grad in grads:
            dist.all_reduce(grad)
            grad /= world_size
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        mean_loss /= world_size
        if rank == 0:
            torch.save({"loss": mean_loss, "grads": grads}, Path(out_dir) / "ddp.pt")
        dist.barrier()  # nobody tears the group down while the other rank still talks to it
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_two_process_gloo_gradient_equals_single_process(tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    result = torch.load(tmp_path / "ddp.pt")

    encoder, x_query, x_pos, x_neg, mask, positive_ids, negative_ids = _ddp_problem()
    queries, positives, negatives = _embed(encoder, x_query, x_pos, x_neg)
    loss = multi_positive_info_nce(queries, positives, negatives, temperature=TAU, negative_mask=mask,
                                   positive_ids=positive_ids, negative_ids=negative_ids)
    loss.backward()
    torch.testing.assert_close(result["loss"], loss.detach(), rtol=1e-5, atol=0)
    for got, want in zip(result["grads"], [p.grad for p in encoder.parameters()]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-12)
    # the id masks actually mattered in this problem
    without_ids = multi_positive_info_nce(queries, positives, negatives, temperature=TAU, negative_mask=mask)
    assert not torch.allclose(without_ids, loss)
