"""Self Positioning: the merged parameters against a brute-force pairwise SLERP, gradients, a toy fit."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from codiemb_pl.errors import InputError
from codiemb_pl.fusion import SelfPositioning, fit_self_positioning
from codiemb_pl.fusion.methods import slerp
from codiemb_pl.fusion.self_positioning import inverse_softplus


def flat(params: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([params[n].reshape(-1) for n in names])


def test_init_sets_softplus_values():
    base = {"w": torch.zeros(2)}
    sp = SelfPositioning(base, [{"w": torch.ones(2)}, {"w": -torch.ones(2)}], init=0.3)
    torch.testing.assert_close(sp.coefficients, torch.full((2,), 0.3))
    torch.testing.assert_close(sp.scale, torch.tensor(0.3))
    assert len(list(sp.parameters())) == 2 and sum(p.numel() for p in sp.parameters()) == 3
    with pytest.raises(InputError):
        inverse_softplus(0.0)


def test_two_orthogonal_unit_task_vectors_at_equal_weights():
    base = {"a": torch.tensor([1.0, 1.0]), "b": torch.tensor([2.0])}
    first = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0])}
    second = {"a": torch.tensor([0.0, 0.0]), "b": torch.tensor([1.0])}
    merged = SelfPositioning(base, [first, second]).merged_params()
    # the angle is taken over the whole flattened vector (a, b): 90°, midpoint (τ1 + τ2)/√2
    torch.testing.assert_close(merged["a"], torch.tensor([1.0 + 1 / math.sqrt(2), 1.0]))
    torch.testing.assert_close(merged["b"], torch.tensor([2.0 + 1 / math.sqrt(2)]))


def test_merged_params_match_brute_force_iterative_slerp():
    generator = torch.Generator().manual_seed(0)
    shapes = {"layer.weight": (3, 4), "layer.bias": (3,), "head.weight": (2, 3)}
    names = list(shapes)
    base = {n: torch.randn(s, generator=generator, dtype=torch.float64) for n, s in shapes.items()}
    vectors = [{n: torch.randn(s, generator=generator, dtype=torch.float64) * (k + 1) for n, s in shapes.items()}
               for k in range(4)]
    sp = SelfPositioning(base, vectors)
    a = torch.tensor([0.5, 2.0, 1.0, 3.0])
    lam = 0.7
    with torch.no_grad():
        sp.raw_coefficients.copy_(torch.tensor([inverse_softplus(float(x)) for x in a]))
        sp.raw_scale.fill_(inverse_softplus(lam))
    # brute force: running merge r, pairwise slerp (methods.slerp on flattened vectors, zero base)
    running = flat(vectors[0], names)
    for i in range(1, 4):
        t = float(a[i] / (a[:i].mean() + a[i]))
        running = slerp(torch.zeros_like(running), [running, flat(vectors[i], names)], t=t)
    expected = flat(base, names) + lam * running
    torch.testing.assert_close(flat(sp.merged_params(), names), expected, rtol=1e-5, atol=1e-6)


def test_collinear_task_vectors_interpolate_linearly():
    base = {"w": torch.zeros(3)}
    vectors = [{"w": torch.tensor([1.0, 2.0, 2.0])}, {"w": torch.tensor([3.0, 6.0, 6.0])}]
    sp = SelfPositioning(base, vectors)
    with torch.no_grad():
        sp.raw_coefficients.copy_(torch.tensor([inverse_softplus(3.0), inverse_softplus(1.0)]))
    # t = 1 / (3 + 1) = 0.25: 0.75 τ1 + 0.25 τ2
    torch.testing.assert_close(sp.merged_params()["w"], torch.tensor([1.5, 3.0, 3.0]))


def test_gradients_reach_the_coefficients():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    vectors = [{n: torch.randn_like(p) for n, p in base.items()} for _ in range(3)]
    sp = SelfPositioning(base, vectors)
    x = torch.randn(5, 4)
    out = torch.func.functional_call(model, sp.merged_params(), (x,))
    out.pow(2).sum().backward()
    assert sp.raw_coefficients.grad is not None and (sp.raw_coefficients.grad != 0).all()
    assert sp.raw_scale.grad is not None and sp.raw_scale.grad != 0
    assert model.weight.grad is None


def test_mismatched_task_vectors_raise():
    base = {"w": torch.zeros(2), "b": torch.zeros(1)}
    with pytest.raises(InputError, match="'b'"):
        SelfPositioning(base, [{"w": torch.ones(2)}])
    with pytest.raises(InputError, match="shape"):
        SelfPositioning(base, [{"w": torch.ones(3), "b": torch.ones(1)}])
    with pytest.raises(InputError, match="no task vectors"):
        SelfPositioning(base, [])


def test_fit_moves_the_harmful_coefficient_down_and_lowers_the_probe_loss():
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    model.eval()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    helpful = {n: 0.5 * torch.randn_like(p) for n, p in base.items()}
    harmful = {n: 0.5 * torch.randn_like(p) for n, p in base.items()}
    target = nn.Linear(6, 3)
    with torch.no_grad():
        target.weight.copy_(base["weight"] + helpful["weight"])
        target.bias.copy_(base["bias"] + helpful["bias"])
    batches = []
    for _ in range(4):
        x = torch.randn(16, 6)
        batches.append({"x": x, "y": target(x).detach()})

    def probe_loss(forward, batch):
        return nn.functional.mse_loss(forward(batch["x"]), batch["y"])

    sp = SelfPositioning(base, [helpful, harmful])
    history = fit_self_positioning(model, sp, iter(batches), probe_loss, steps=150, lr=0.05)

    def full_loss() -> float:
        with torch.no_grad():
            merged = sp.merged_params()
            return sum(float(probe_loss(lambda x: torch.func.functional_call(model, merged, (x,)), b))
                       for b in batches) / len(batches)

    initial_a = history["coefficient_trace"][0]
    final_a = history["coefficients"]
    assert initial_a == pytest.approx([1.0, 1.0])
    assert final_a[1] < initial_a[1]                       # the harmful vector loses weight
    assert final_a[1] / final_a[0] < 0.5
    assert len(history["loss"]) == 150
    initial_loss = sum(history["probe_loss"][:4]) / 4       # the first pass over the 4 batches, before any fit
    assert full_loss() < 0.5 * history["probe_loss"][0]
    assert history["probe_loss"][-1] < initial_loss
    assert model.weight.requires_grad and model.weight.grad is None   # module untouched, grads restored


def test_fit_scale_penalty_and_input_checks():
    model = nn.Linear(2, 1, bias=False)
    base = {"weight": model.weight.detach().clone()}
    sp = SelfPositioning(base, [{"weight": torch.ones(1, 2)}])
    batch = {"x": torch.ones(1, 2)}

    def zero_loss(forward, batch):
        return 0.0 * forward(batch["x"]).sum()

    history = fit_self_positioning(model, sp, [batch], zero_loss, steps=20, lr=0.05, mu=0.05)
    assert history["scale"] < 1.0                          # only μ·λ acts: λ shrinks
    with pytest.raises(InputError, match="no batch"):
        fit_self_positioning(model, sp, [], zero_loss, steps=2)
    with pytest.raises(InputError, match="steps"):
        fit_self_positioning(model, sp, [batch], zero_loss, steps=0)
