"""STS losses (SPEC §4) vs independent loop references: Pearson, Rank-KL, PRO, MidNCE, CoSENT, combination."""

from __future__ import annotations

import math

import pytest
import torch

from codiemb_pl.errors import InputError
from codiemb_pl.losses.sts import (
    STSLossConfig,
    cosent_loss,
    descending_average_ranks,
    mid_nce_loss,
    pearson_loss,
    pro_loss,
    rank_kl_loss,
    sts_loss,
)


# --------------------------------------------------------------------------------------------------
# Loop references (plain Python floats, written straight from SPEC §4)
# --------------------------------------------------------------------------------------------------
def ref_pearson(p, y, eps=1e-8):
    """eps as in the implementation's definition: cov / sqrt((var_p + eps)(var_y + eps))."""
    n = len(p)
    if len(set(y)) < 2:
        return 0.0
    mp, my = sum(p) / n, sum(y) / n
    cov = sum((a - mp) * (b - my) for a, b in zip(p, y)) / n
    vp = sum((a - mp) ** 2 for a in p) / n
    vy = sum((b - my) ** 2 for b in y) / n
    return 1.0 - cov / math.sqrt((vp + eps) * (vy + eps))


def ref_ranks(y):
    """Descending ranks by sorting and walking tie groups (rank 0 = largest, ties averaged)."""
    order = sorted(range(len(y)), key=lambda i: -y[i])
    ranks = [0.0] * len(y)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and y[order[end + 1]] == y[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2
        start = end + 1
    return ranks


def ref_softmax(values):
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def ref_rank_kl(p, y, tau):
    n = len(p)
    if n < 2:
        return 0.0
    z = [(n - 1 - r) / (n - 1) for r in ref_ranks(y)]
    pi = ref_softmax([v / tau for v in z])
    q = ref_softmax([v / tau for v in p])
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(pi, q) if a > 0) / n


def ref_pro(p, y, tau):
    order = sorted(range(len(y)), key=lambda i: -y[i])
    ys = [y[i] for i in order]
    s = [p[i] / tau for i in order]
    terms = []
    for k in range(len(ys)):
        worse = [j for j in range(k + 1, len(ys)) if ys[k] - ys[j] > 1e-8]
        if not worse:
            continue
        weights = {j: ys[k] - ys[j] for j in worse}
        w_k = max(weights.values())
        numerator = math.exp(w_k * s[k])
        denominator = numerator + sum(math.exp(weights[j] * s[j]) for j in worse)
        terms.append(-math.log(numerator / denominator))
    return sum(terms) / len(terms) if terms else 0.0


def ref_mid_nce(e1, e2, y, threshold, tau):
    picked = [i for i in range(len(y)) if y[i] >= threshold]
    if not picked:
        return 0.0

    def cosine(a, b):
        return sum(x * z for x, z in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(z * z for z in b))

    total = 0.0
    for i in picked:
        logits = [cosine(e1[i], e2[j]) / tau for j in picked]
        top = max(logits)
        log_denominator = top + math.log(sum(math.exp(v - top) for v in logits))
        total += log_denominator - cosine(e1[i], e2[i]) / tau
    return total / len(picked)


def ref_cosent(p, y, scale):
    total = 1.0
    for a in range(len(p)):
        for b in range(len(p)):
            if y[a] < y[b]:
                total += math.exp((p[a] - p[b]) * scale)
    return math.log(total)


def random_batch(seed, n, ties=True, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    pred = torch.rand(n, generator=g, dtype=dtype) * 2 - 1
    if ties:
        target = torch.randint(0, 6, (n,), generator=g).to(dtype) / 5  # graded, many ties
    else:
        target = torch.rand(n, generator=g, dtype=dtype)
    return pred, target


SEEDS = range(5)
SIZES = [1, 2, 3, 8, 17]


# --------------------------------------------------------------------------------------------------
# Pearson
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("ties", [True, False])
def test_pearson_matches_loop(seed, n, ties):
    pred, target = random_batch(seed, n, ties)
    got = pearson_loss(pred, target).item()
    assert got == pytest.approx(ref_pearson(pred.tolist(), target.tolist()), abs=1e-6)


def test_pearson_known_values_and_range():
    y = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    assert pearson_loss(2 * y + 3, y).item() == pytest.approx(0.0, abs=1e-6)
    assert pearson_loss(-y, y).item() == pytest.approx(2.0, abs=1e-6)
    pred, target = random_batch(3, 20, ties=False)
    assert 0.0 <= pearson_loss(pred, target).item() <= 2.0


def test_pearson_gradcheck_and_grad_matches_reference():
    pred, target = random_batch(1, 7)
    x = pred.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p: pearson_loss(p, target), (x,))

    # gradient against autograd through a scalar-loop reference with the same eps placement
    def loop_reference(p, y, eps=1e-8):
        n = p.shape[0]
        mp = sum(p[i] for i in range(n)) / n
        my = sum(y[i] for i in range(n)) / n
        cov = sum((p[i] - mp) * (y[i] - my) for i in range(n)) / n
        vp = sum((p[i] - mp) ** 2 for i in range(n)) / n
        vy = sum((y[i] - my) ** 2 for i in range(n)) / n
        return 1 - cov / torch.sqrt((vp + eps) * (vy + eps))

    x_ref = pred.clone().requires_grad_(True)
    pearson_loss(x, target).backward()
    loop_reference(x_ref, target).backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-12)


def test_pearson_degenerate_cases():
    pred = torch.tensor([0.3, 0.7, 0.1], requires_grad=True)
    # fewer than 2 distinct labels -> 0, still differentiable (zero grad)
    loss = pearson_loss(pred, torch.full((3,), 0.4))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(pred.grad, torch.zeros(3))
    single = torch.tensor([0.5], requires_grad=True)
    assert pearson_loss(single, torch.tensor([1.0])).item() == 0.0
    # constant predictions: finite value and finite gradient
    constant = torch.full((4,), 0.8, requires_grad=True)
    loss = pearson_loss(constant, torch.tensor([0.0, 0.2, 0.6, 1.0]))
    loss.backward()
    assert loss.item() == pytest.approx(1.0) and torch.isfinite(constant.grad).all()
    assert constant.grad.abs().sum() > 0  # it does push the predictions apart


# --------------------------------------------------------------------------------------------------
# Rank-KL
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
def test_descending_average_ranks_match_loop(seed):
    _, target = random_batch(seed, 15)
    torch.testing.assert_close(descending_average_ranks(target),
                               torch.tensor(ref_ranks(target.tolist()), dtype=torch.float64))
    ranks = descending_average_ranks(torch.tensor([0.2, 0.9, 0.2, 0.5]))
    assert ranks.tolist() == [2.5, 0.0, 2.5, 1.0]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("tau", [0.01, 0.05, 0.5])
def test_rank_kl_matches_loop(seed, n, tau):
    pred, target = random_batch(seed, n)
    got = rank_kl_loss(pred, target, tau).item()
    assert got == pytest.approx(ref_rank_kl(pred.tolist(), target.tolist(), tau), rel=1e-8, abs=1e-10)


def test_rank_kl_is_nonnegative_and_zero_when_distributions_match():
    y = torch.tensor([0.9, 0.1, 0.5, 0.5], dtype=torch.float64)
    ranks = descending_average_ranks(y)
    z = (4 - 1 - ranks) / 3
    assert rank_kl_loss(z, y, 0.05).item() == pytest.approx(0.0, abs=1e-12)
    assert rank_kl_loss(z + 0.37, y, 0.05).item() == pytest.approx(0.0, abs=1e-12)  # shift-invariant
    assert rank_kl_loss(-z, y, 0.05).item() > 0.1
    # all-equal gold: uniform target, loss is KL(uniform || q)/n >= 0 and 0 for constant pred
    flat = torch.full((5,), 0.3, dtype=torch.float64)
    assert rank_kl_loss(torch.zeros(5, dtype=torch.float64), flat).item() == pytest.approx(0.0, abs=1e-12)


# --------------------------------------------------------------------------------------------------
# PRO
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("tau", [0.01, 0.05, 0.5])
def test_pro_matches_loop(seed, n, tau):
    pred, target = random_batch(seed, n)
    got = pro_loss(pred, target, tau).item()
    assert got == pytest.approx(ref_pro(pred.tolist(), target.tolist(), tau), rel=1e-8, abs=1e-10)


def test_pro_hand_example_and_empty_k():
    # y = (1, 0.5, 0), p = (0.2, 0.1, 0.4), τ = 1.
    # k=0: J={1,2}, w1=.5, w2=1, w_k=1: -log(e^.2 / (e^.2 + e^{.05} + e^{.4}))
    # k=1: J={2}, w2=.5, w_k=.5:         -log(e^.05 / (e^.05 + e^{.2}))
    pred = torch.tensor([0.1, 0.2, 0.4], dtype=torch.float64)
    target = torch.tensor([0.5, 1.0, 0.0], dtype=torch.float64)  # unsorted on purpose
    k0 = -math.log(math.exp(0.2) / (math.exp(0.2) + math.exp(0.05) + math.exp(0.4)))
    k1 = -math.log(math.exp(0.05) / (math.exp(0.05) + math.exp(0.2)))
    assert pro_loss(pred, target, 1.0).item() == pytest.approx((k0 + k1) / 2, rel=1e-12)
    # all-equal gold (and near-equal within 1e-8) -> K empty -> 0 with a grad path
    x = torch.tensor([0.1, 0.9], requires_grad=True)
    loss = pro_loss(x, torch.tensor([0.5, 0.5 + 1e-9], dtype=torch.float64).float())
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros(2))


# --------------------------------------------------------------------------------------------------
# MidNCE
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n", [1, 4, 9])
@pytest.mark.parametrize("tau", [0.01, 0.02, 0.5])
def test_mid_nce_matches_loop(seed, n, tau):
    g = torch.Generator().manual_seed(seed)
    e1 = torch.randn(n, 5, generator=g, dtype=torch.float64) * 3  # not normalised
    e2 = torch.randn(n, 5, generator=g, dtype=torch.float64)
    target = torch.randint(0, 6, (n,), generator=g).double() / 5
    got = mid_nce_loss(e1, e2, target, threshold=0.6, temperature=tau).item()
    want = ref_mid_nce(e1.tolist(), e2.tolist(), target.tolist(), 0.6, tau)
    assert got == pytest.approx(want, rel=1e-8, abs=1e-10)


def test_mid_nce_no_selected_pairs_is_zero_with_grad():
    e1 = torch.randn(3, 4, requires_grad=True)
    e2 = torch.randn(3, 4, requires_grad=True)
    loss = mid_nce_loss(e1, e2, torch.tensor([0.1, 0.2, 0.3]))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(e1.grad, torch.zeros(3, 4))
    # only non-selected pairs are candidates: changing a low-score pair leaves the loss unchanged
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    y = torch.tensor([0.9, 0.1, 1.0, 0.85])
    before = mid_nce_loss(a, b, y)
    b[1] = torch.randn(3, generator=g)
    torch.testing.assert_close(mid_nce_loss(a, b, y), before)


# --------------------------------------------------------------------------------------------------
# CoSENT
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("scale", [1.0, 20.0, 100.0])
def test_cosent_matches_loop(seed, n, scale):
    pred, target = random_batch(seed, n)
    got = cosent_loss(pred, target, scale).item()
    assert got == pytest.approx(ref_cosent(pred.tolist(), target.tolist(), scale), rel=1e-9, abs=1e-12)


def test_cosent_without_ordered_pairs_is_zero():
    x = torch.tensor([0.2, 0.8], requires_grad=True)
    loss = cosent_loss(x, torch.tensor([0.4, 0.4]))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros(2))


# --------------------------------------------------------------------------------------------------
# Gradients and combination
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n", [1, 2, 16])
def test_all_losses_have_finite_gradients_in_float32_at_low_temperature(seed, n):
    pred, target = random_batch(seed, n, dtype=torch.float32)
    pred = pred.clone().requires_grad_(True)
    losses = [pearson_loss(pred, target), rank_kl_loss(pred, target, 0.01), pro_loss(pred, target, 0.01),
              cosent_loss(pred, target, 100.0)]
    for loss in losses:
        (grad,) = torch.autograd.grad(loss, pred)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
    mid = torch.randn(n, 8, requires_grad=True)
    loss = mid_nce_loss(mid, mid.detach() + 0.1, target, threshold=0.0, temperature=0.01)
    (grad,) = torch.autograd.grad(loss, mid)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


@pytest.mark.parametrize("seed", range(3))
def test_gradcheck_rank_kl_pro_cosent_mid_nce(seed):
    pred, target = random_batch(seed, 6, ties=False)
    x = pred.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p: rank_kl_loss(p, target, 0.1), (x,))
    assert torch.autograd.gradcheck(lambda p: pro_loss(p, target, 0.1), (x,))
    assert torch.autograd.gradcheck(lambda p: cosent_loss(p, target, 5.0), (x,))
    e = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: mid_nce_loss(a, a * 0.5 + 1, target, 0.3, 0.2), (e,))


def test_sts_loss_weighted_sum_and_components():
    pred, target = random_batch(4, 10)
    g = torch.Generator().manual_seed(4)
    mid1 = torch.randn(10, 6, generator=g, dtype=torch.float64)
    mid2 = torch.randn(10, 6, generator=g, dtype=torch.float64)
    target[:3] = 1.0  # a few MidNCE pairs
    config = STSLossConfig()
    total, components = sts_loss(pred, target, config, mid1=mid1, mid2=mid2)
    p, y = pred.tolist(), target.tolist()
    expected = {"pearson": ref_pearson(p, y), "rank_kl": ref_rank_kl(p, y, 0.05), "pro": ref_pro(p, y, 0.05),
                "mid_nce": ref_mid_nce(mid1.tolist(), mid2.tolist(), y, 0.8, 0.02)}
    assert set(components) == set(expected)  # cosent has weight 0 by default
    for name, value in expected.items():
        assert components[name].item() == pytest.approx(value, rel=1e-6, abs=1e-8)
        assert not components[name].requires_grad
    weighted = 2.0 * expected["pearson"] + 5.0 * expected["rank_kl"] + 0.5 * expected["pro"] + expected["mid_nce"]
    assert total.item() == pytest.approx(weighted, rel=1e-6)

    # without mid embeddings MidNCE is skipped; cosent-only config
    _, no_mid = sts_loss(pred, target, config)
    assert "mid_nce" not in no_mid
    cosent_only = STSLossConfig(pearson=0, rank_kl=0, pro=0, mid_nce=0, cosent=1.0, cosent_scale=20.0)
    total, components = sts_loss(pred, target, cosent_only, mid1=mid1, mid2=mid2)
    assert set(components) == {"cosent"}
    assert total.item() == pytest.approx(ref_cosent(p, y, 20.0), rel=1e-9)


def test_sts_loss_backward_and_zero_weights():
    pred = torch.tensor([0.3, 0.2, 0.9], requires_grad=True)
    target = torch.tensor([0.5, 0.0, 1.0])
    total, _ = sts_loss(pred, target, STSLossConfig())
    total.backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    nothing = STSLossConfig(pearson=0, rank_kl=0, pro=0, mid_nce=0, cosent=0)
    total, components = sts_loss(pred, target, nothing)
    assert total.item() == 0.0 and components == {} and total.requires_grad


def test_sts_config_validation():
    with pytest.raises(InputError):
        STSLossConfig(pro=-1.0)
    with pytest.raises(InputError):
        STSLossConfig(rank_kl_temperature=0.0)
