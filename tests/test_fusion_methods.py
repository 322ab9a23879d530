"""Per-tensor merge methods and the streaming merge, against hand values and brute-force loops."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from codiemb_pl.errors import InputError
from codiemb_pl.fusion import (
    MERGE_METHODS,
    MappingSource,
    SafetensorsSource,
    greedy_soup,
    layer_of,
    merge_state_dicts,
    merge_to_safetensors,
)
from codiemb_pl.fusion.methods import dare, delta_guided, multi_slerp, slerp, task_arithmetic, ties, uniform_soup

# Parameters under which every method returns θ0 + Δ when all K checkpoints are identical.
IDENTITY_PARAMS = {
    "uniform_soup": {}, "delta_guided": {}, "ties": {"density": 1.0}, "dare": {"drop_rate": 0.0},
    "multi_slerp": {}, "slerp": {},
}


def random_deltas(count: int, shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    return base, [torch.randn(shape, generator=generator) for _ in range(count)]


# ---------------------------------------------------------------------------------------------
# delta-guided
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0])
def test_delta_guided_element_matches_loop(gamma):
    base, deltas = random_deltas(3, (4, 5))
    deltas[1][0, 0] = 0.0
    for delta in deltas:           # one position where every checkpoint stayed at θ0
        delta[2, 3] = 0.0
    merged = delta_guided(base, deltas, gamma=gamma, scale=0.8)
    expected = base.clone()
    for i in range(4):
        for j in range(5):
            mags = [abs(float(d[i, j])) ** gamma for d in deltas]
            total = sum(mags)
            w = [m / total for m in mags] if total > 0 else [1 / 3] * 3
            expected[i, j] += 0.8 * sum(wk * float(d[i, j]) for wk, d in zip(w, deltas))
    torch.testing.assert_close(merged, expected)
    assert merged[2, 3] == base[2, 3]


def test_delta_guided_row_matches_manual():
    base, deltas = random_deltas(2, (3, 4), seed=1)
    merged = delta_guided(base, deltas, granularity="row")
    expected = base.clone()
    for i in range(3):
        n = [float(torch.sqrt(sum(d[i, j] ** 2 for j in range(4)))) for d in deltas]
        w = [x / sum(n) for x in n]
        expected[i] += w[0] * deltas[0][i] + w[1] * deltas[1][i]
    torch.testing.assert_close(merged, expected)


def test_delta_guided_row_on_bias_is_per_element():
    base, deltas = random_deltas(2, (6,), seed=2)
    torch.testing.assert_close(delta_guided(base, deltas, granularity="row"),
                               delta_guided(base, deltas, granularity="element"))


def test_delta_guided_tensor_and_layer_match_manual():
    base, deltas = random_deltas(3, (2, 3), seed=3)
    norms = [float(d.norm()) for d in deltas]
    expected = base + sum(n / sum(norms) * d for n, d in zip(norms, deltas))
    torch.testing.assert_close(delta_guided(base, deltas, granularity="tensor"), expected)
    layer = [2.0, 1.0, 1.0]          # per-checkpoint layer norms, as the streaming pass supplies them
    expected_layer = base + (2 * deltas[0] + deltas[1] + deltas[2]) / 4
    torch.testing.assert_close(delta_guided(base, deltas, granularity="layer", magnitudes=layer), expected_layer)
    with pytest.raises(InputError, match="magnitudes"):
        delta_guided(base, deltas, granularity="layer")
    with pytest.raises(InputError, match="granularity"):
        delta_guided(base, deltas, granularity="block")


def test_delta_guided_prior_multiplies_before_normalisation():
    base = torch.zeros(1)
    deltas = [torch.tensor([1.0]), torch.tensor([3.0])]
    # w ∝ (2·1, 1·3) = (0.4, 0.6)
    torch.testing.assert_close(delta_guided(base, deltas, weights=[2.0, 1.0]), torch.tensor([0.4 + 1.8]))


def test_delta_guided_gamma_zero_is_uniform_soup():
    base, deltas = random_deltas(4, (5, 3), seed=4)
    deltas[0][1] = 0.0
    for granularity in ("element", "row", "tensor"):
        torch.testing.assert_close(delta_guided(base, deltas, gamma=0.0, granularity=granularity),
                                   uniform_soup(base, deltas))


def test_delta_guided_large_gamma_picks_largest_mover_without_overflow():
    base = torch.zeros(2)
    deltas = [torch.tensor([1e-4, -3.0]), torch.tensor([2e-4, 1.0])]
    merged = delta_guided(base, deltas, gamma=200.0)
    torch.testing.assert_close(merged, torch.tensor([2e-4, -3.0]))


# ---------------------------------------------------------------------------------------------
# soups, task arithmetic
# ---------------------------------------------------------------------------------------------

def test_uniform_soup_and_task_arithmetic_hand_values():
    base = torch.tensor([1.0, 2.0])
    deltas = [torch.tensor([1.0, 0.0]), torch.tensor([3.0, -2.0])]
    torch.testing.assert_close(uniform_soup(base, deltas), torch.tensor([3.0, 1.0]))
    torch.testing.assert_close(uniform_soup(base, deltas, weights=[3, 1]), torch.tensor([2.5, 1.5]))
    torch.testing.assert_close(task_arithmetic(base, deltas, scale=0.5), torch.tensor([3.0, 1.0]))
    torch.testing.assert_close(task_arithmetic(base, deltas), torch.tensor([5.0, 0.0]))
    torch.testing.assert_close(task_arithmetic(base, deltas, weights=[1, -1]), torch.tensor([-1.0, 4.0]))


@pytest.mark.parametrize("name", sorted(IDENTITY_PARAMS))
def test_identical_checkpoints_return_themselves(name):
    base, (delta,) = random_deltas(1, (3, 4), seed=5)
    count = 2 if name == "slerp" else 3
    merged = MERGE_METHODS[name](base, [delta.clone() for _ in range(count)],
                                 generator=torch.Generator().manual_seed(0), **IDENTITY_PARAMS[name])
    torch.testing.assert_close(merged, base + delta)


def test_identical_checkpoints_task_arithmetic_with_scale_one_over_k():
    base, (delta,) = random_deltas(1, (3, 4), seed=5)
    torch.testing.assert_close(task_arithmetic(base, [delta] * 4, scale=0.25), base + delta)


@pytest.mark.parametrize("name,params", [("uniform_soup", {}), ("delta_guided", {}), ("ties", {"density": 1.0}),
                                         ("multi_slerp", {}), ("task_arithmetic", {}), ("dare", {"drop_rate": 0.0})])
def test_single_checkpoint_returns_itself(name, params):
    base, deltas = random_deltas(1, (4, 2), seed=6)
    torch.testing.assert_close(MERGE_METHODS[name](base, deltas, **params), base + deltas[0])


# ---------------------------------------------------------------------------------------------
# TIES
# ---------------------------------------------------------------------------------------------

def test_ties_worked_example():
    base = torch.ones(4)
    deltas = [torch.tensor([1.0, -2.0, 0.5, 3.0]),
              torch.tensor([-1.5, 1.0, 0.2, 2.0]),
              torch.tensor([2.5, 0.5, -0.1, -1.0])]
    # density 0.5 keeps the 2 largest |Δ| of each: [0,-2,0,3], [-1.5,0,0,2], [2.5,0,0,-1]
    # mass: [1.0, -2, 0, 4] -> signs [+, -, 0, +]
    # agreeing mean: [2.5, -2, 0, (3+2)/2]
    merged = ties(base, deltas, density=0.5)
    torch.testing.assert_close(merged, torch.tensor([3.5, -1.0, 1.0, 3.5]))
    torch.testing.assert_close(ties(base, deltas, density=0.5, scale=0.5), torch.tensor([2.25, 0.0, 1.0, 2.25]))
    # density 1: mass [2, -0.5, 0.6, 4] -> signs [+,-,+,+]; means [(1+2.5)/2, -2, (0.5+0.2)/2, (3+2)/2]
    torch.testing.assert_close(ties(base, deltas, density=1.0), torch.tensor([2.75, -1.0, 1.35, 3.5]))


def test_ties_rejects_bad_density():
    base, deltas = random_deltas(2, (3,))
    for density in (0.0, 1.5):
        with pytest.raises(InputError, match="density"):
            ties(base, deltas, density=density)


# ---------------------------------------------------------------------------------------------
# DARE
# ---------------------------------------------------------------------------------------------

def test_dare_is_unbiased_and_deterministic_per_seed():
    base, deltas = random_deltas(3, (20,), seed=7)
    runs = torch.stack([dare(base, deltas, drop_rate=0.5, generator=torch.Generator().manual_seed(s))
                        for s in range(2000)])
    soup = uniform_soup(base, deltas)
    assert (runs.mean(0) - soup).abs().max() < 0.08
    again = dare(base, deltas, drop_rate=0.5, generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(again, runs[11])
    assert not torch.equal(runs[0], runs[1])
    # survivors are rescaled by 1/(1-p): each entry of a single-checkpoint merge is 0 or 2Δ
    single = dare(torch.zeros(50), [torch.ones(50)], drop_rate=0.5, generator=torch.Generator().manual_seed(0))
    assert set(single.tolist()) <= {0.0, 2.0}


def test_dare_sum_uses_scale():
    base = torch.zeros(3)
    deltas = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 1.0, 1.0])]
    torch.testing.assert_close(dare(base, deltas, drop_rate=0.0, combine="sum", scale=0.5),
                               torch.tensor([1.0, 1.5, 2.0]))


# ---------------------------------------------------------------------------------------------
# SLERP / Multi-SLERP
# ---------------------------------------------------------------------------------------------

def test_multi_slerp_orthogonal_unit_vectors():
    base = torch.zeros(2)
    merged = multi_slerp(base, [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])])
    torch.testing.assert_close(merged, torch.tensor([1.0, 1.0]) / math.sqrt(2))
    assert abs(float(merged.norm()) - 1.0) < 1e-6


def test_multi_slerp_three_axes_by_symmetry_and_norm():
    base = torch.full((3,), 5.0)
    merged = multi_slerp(base, [torch.tensor([2.0, 0, 0]), torch.tensor([0, 2.0, 0]), torch.tensor([0, 0, 2.0])])
    torch.testing.assert_close(merged, base + 2.0 / math.sqrt(3))


def test_multi_slerp_is_the_weighted_spherical_mean():
    base, deltas = random_deltas(4, (10,), seed=8)
    weights = [0.1, 0.4, 0.2, 0.3]
    merged = multi_slerp(base.double(), [d.double() for d in deltas], weights=weights) - base.double()
    units = [d.double() / d.double().norm() for d in deltas]
    direction = merged / merged.norm()
    # stationarity of Σ ŵ_k angle(u_k, m)^2: Σ ŵ_k angle_k · (tangent unit to u_k) = 0
    tangent = torch.zeros(10, dtype=torch.float64)
    for w, u in zip(weights, units):
        cos = float(u @ direction)
        ortho = u - cos * direction
        tangent += w * math.acos(cos) * ortho / ortho.norm()
    assert tangent.norm() < 1e-6
    torch.testing.assert_close(merged.norm(), sum(w * d.double().norm() for w, d in zip(weights, deltas)))


def test_slerp_endpoints_and_reduction():
    base, deltas = random_deltas(2, (3, 3), seed=9)
    torch.testing.assert_close(slerp(base, deltas, t=0.0), base + deltas[0])
    torch.testing.assert_close(slerp(base, deltas, t=1.0), base + deltas[1])
    for t in (0.25, 0.5, 0.8):
        torch.testing.assert_close(slerp(base, deltas, t=t), multi_slerp(base, deltas, weights=[1 - t, t]))
        torch.testing.assert_close(slerp(base, deltas, t=t), slerp(base, deltas, weights=[1 - t, t]))


def test_slerp_hand_value_at_quarter():
    base = torch.zeros(2)
    # 90° apart, norms 1 and 3: t = 1/3 turns by 30°, norm (2/3)·1 + (1/3)·3 = 5/3
    merged = slerp(base, [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0])], t=1 / 3)
    torch.testing.assert_close(merged, 5 / 3 * torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)]))


def test_spherical_linear_fallback():
    base = torch.zeros(3)
    collinear = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 6.0])]
    torch.testing.assert_close(slerp(base, collinear, t=0.25), 0.75 * collinear[0] + 0.25 * collinear[1])
    torch.testing.assert_close(multi_slerp(base, collinear), (collinear[0] + collinear[1]) / 2)
    with_zero = [torch.zeros(3), torch.tensor([1.0, 0.0, 0.0])]
    torch.testing.assert_close(multi_slerp(base, with_zero), torch.tensor([0.5, 0.0, 0.0]))
    with pytest.raises(InputError, match="exactly 2"):
        slerp(base, collinear * 2)


# ---------------------------------------------------------------------------------------------
# dtype and input checks, property test
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_result_keeps_base_dtype(dtype):
    base, deltas = random_deltas(2, (3, 2))
    for name, fn in MERGE_METHODS.items():
        out = fn(base.to(dtype), [d.to(dtype) for d in deltas], generator=torch.Generator().manual_seed(0))
        assert out.dtype == dtype, name


def test_bad_inputs_raise_input_error():
    base = torch.zeros(3)
    with pytest.raises(InputError, match="shape"):
        uniform_soup(base, [torch.zeros(4)])
    with pytest.raises(InputError, match="no task vectors"):
        uniform_soup(base, [])
    with pytest.raises(InputError, match="weights"):
        uniform_soup(base, [torch.ones(3)], weights=[1.0, 2.0])
    with pytest.raises(InputError, match="negative"):
        delta_guided(base, [torch.ones(3), torch.ones(3)], weights=[1.0, -1.0])
    with pytest.raises(InputError, match="float"):
        uniform_soup(torch.zeros(3, dtype=torch.long), [torch.ones(3)])


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=0, max_size=3), count=st.integers(1, 4),
       seed=st.integers(0, 10_000), scale=st.floats(1e-3, 1e3))
def test_every_method_is_finite_and_shape_preserving(shape, count, seed, scale):
    base, deltas = random_deltas(count, tuple(shape), seed=seed)
    deltas = [d * scale for d in deltas]
    if count > 1:
        deltas[-1] = torch.zeros_like(deltas[-1])        # a checkpoint that never moved
    for name, fn in MERGE_METHODS.items():
        if name == "slerp" and count != 2:
            continue
        out = fn(base, deltas, generator=torch.Generator().manual_seed(seed))
        assert out.shape == base.shape and out.dtype == base.dtype, name
        assert torch.isfinite(out).all(), name


# ---------------------------------------------------------------------------------------------
# streaming
# ---------------------------------------------------------------------------------------------

def toy_checkpoints(count: int = 3) -> tuple[dict, list[dict]]:
    generator = torch.Generator().manual_seed(42)

    def state(offset: int) -> dict:
        return {
            "embeddings.word_embeddings.weight": torch.randn(6, 4, generator=generator),
            "embeddings.position_ids": torch.arange(5) + offset,
            "encoder.layer.0.attention.weight": torch.randn(4, 4, generator=generator),
            "encoder.layer.0.attention.bias": torch.randn(4, generator=generator),
            "encoder.layer.1.output.weight": torch.randn(4, 4, generator=generator),
            "encoder.layer.1.output.bias": torch.randn(4, generator=generator),
            "norm.running_mean": torch.randn(4, generator=generator),
            "pooler.weight": torch.randn(2, 4, generator=generator),
        }

    return state(0), [state(k + 1) for k in range(count)]


def in_memory_merge(base: dict, models: list[dict], method: str, params: dict) -> dict:
    """Reference: call the per-tensor method directly, layer norms by a plain loop."""
    float_keys = [k for k in base if base[k].is_floating_point() and not k.endswith("running_mean")]
    norms = {}
    for key in float_keys:
        layer = layer_of(key)
        norms.setdefault(layer, [0.0] * len(models))
        for k, model in enumerate(models):
            norms[layer][k] += float(((model[key] - base[key]) ** 2).sum())
    out = {}
    for key in base:
        if key not in float_keys:
            out[key] = models[0][key]
            continue
        extra = dict(params)
        if params.get("granularity") == "layer":
            extra["magnitudes"] = [n ** 0.5 for n in norms[layer_of(key)]]
        out[key] = MERGE_METHODS[method](base[key], [m[key] - base[key] for m in models], **extra)
    return out


def test_layer_of_groups_keys():
    assert layer_of("encoder.layer.11.attention.self.query.weight") == "encoder.layer.11"
    assert layer_of("model.layers.3.mlp.up_proj.weight") == "model.layers.3"
    assert layer_of("h.0.attn.c_attn.weight") == "h.0"
    assert layer_of("transformer.h.10.ln_1.bias") == "transformer.h.10"
    assert layer_of("embeddings.word_embeddings.weight") == "embeddings.word_embeddings.weight"
    assert layer_of("encoder.layernorm.weight") == "encoder.layernorm.weight"


@pytest.mark.parametrize("method,params", [
    ("delta_guided", {"granularity": "element"}), ("delta_guided", {"granularity": "layer", "gamma": 2.0}),
    ("ties", {"density": 0.5}), ("multi_slerp", {}), ("uniform_soup", {}), ("task_arithmetic", {"scale": 0.3}),
])
def test_streaming_equals_in_memory(tmp_path, method, params):
    base, models = toy_checkpoints()
    paths = []
    for index, state in enumerate([base] + models):
        paths.append(tmp_path / f"ckpt{index}.safetensors")
        save_file(state, str(paths[-1]))
    expected = in_memory_merge(base, models, method, params)
    from_files = merge_state_dicts(SafetensorsSource(paths[0]), [SafetensorsSource(p) for p in paths[1:]],
                                   method, params)
    from_dicts = merge_state_dicts(base, [MappingSource(m) for m in models], method, params)
    assert set(from_files) == set(base) and list(from_dicts) == list(base)
    for key in base:
        torch.testing.assert_close(from_files[key], expected[key])
        torch.testing.assert_close(from_dicts[key], expected[key])
    # buffers and non-float tensors come from the first checkpoint
    assert torch.equal(from_files["embeddings.position_ids"], models[0]["embeddings.position_ids"])
    assert torch.equal(from_files["norm.running_mean"], models[0]["norm.running_mean"])
    written = merge_to_safetensors(paths[0], paths[1:], method, params, tmp_path / "out" / "merged.safetensors",
                                   metadata={"method": method})
    reloaded = load_file(str(written))
    assert set(reloaded) == set(base)
    for key in base:
        torch.testing.assert_close(reloaded[key], expected[key])
        assert reloaded[key].dtype == expected[key].dtype


def test_streaming_copy_keys_and_dtype(tmp_path):
    base, models = toy_checkpoints(2)
    base16 = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in base.items()}
    models16 = [{k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in m.items()} for m in models]
    merged = merge_state_dicts(base16, models16, "uniform_soup", {}, copy_keys={"pooler.weight"})
    assert merged["pooler.weight"].dtype == torch.bfloat16
    assert torch.equal(merged["pooler.weight"], models16[0]["pooler.weight"])
    expected = (base16["encoder.layer.0.attention.weight"].float()
                + sum(m["encoder.layer.0.attention.weight"].float() - base16["encoder.layer.0.attention.weight"].float()
                      for m in models16) / 2).to(torch.bfloat16)
    assert torch.equal(merged["encoder.layer.0.attention.weight"], expected)
    path = merge_to_safetensors(base16, models16, "uniform_soup", {}, tmp_path / "m.safetensors",
                                copy_keys={"pooler.weight"})
    reloaded = load_file(str(path))
    for key in merged:
        assert torch.equal(reloaded[key], merged[key])


def test_streaming_dare_is_seeded_per_key():
    base, models = toy_checkpoints()
    first = merge_state_dicts(base, models, "dare", {"drop_rate": 0.5}, seed=1)
    second = merge_state_dicts(base, models, "dare", {"drop_rate": 0.5}, seed=1)
    other = merge_state_dicts(base, models, "dare", {"drop_rate": 0.5}, seed=2)
    reordered = merge_state_dicts(dict(reversed(list(base.items()))), models, "dare", {"drop_rate": 0.5}, seed=1)
    key = "encoder.layer.0.attention.weight"
    assert all(torch.equal(first[k], second[k]) and torch.equal(first[k], reordered[k]) for k in base)
    assert not torch.equal(first[key], other[key])


def test_streaming_refuses_mismatched_checkpoints():
    base, models = toy_checkpoints(2)
    missing = dict(models[1])
    del missing["encoder.layer.1.output.bias"]
    with pytest.raises(InputError, match="encoder.layer.1.output.bias.*same base architecture"):
        merge_state_dicts(base, [models[0], missing], "uniform_soup", {})
    reshaped = dict(models[1])
    reshaped["pooler.weight"] = torch.zeros(3, 4)
    with pytest.raises(InputError) as error:
        merge_state_dicts(base, [models[0], reshaped], "uniform_soup", {})
    assert "pooler.weight" in str(error.value) and "[3, 4]" in str(error.value) and "[2, 4]" in str(error.value)
    with pytest.raises(InputError, match="unknown merge method"):
        merge_state_dicts(base, models, "frankenmerge", {})
    with pytest.raises(InputError, match="unknown parameter"):
        merge_state_dicts(base, models, "ties", {"denisty": 0.3})


def test_greedy_soup_keeps_only_improving_candidates():
    target = torch.zeros(3)
    candidates = [{"w": torch.full((3,), 1.0)}, {"w": torch.full((3,), -1.0)}, {"w": torch.full((3,), 5.0)},
                  {"w": torch.full((3,), -0.5)}]

    def evaluate(state):
        return -float((state["w"] - target).abs().sum())

    result = greedy_soup(candidates, evaluate)
    # {1}: -3; {1,-1}: 0 kept; {1,-1,5}: mean 5/3 rejected; {1,-1,-0.5}: mean -1/6 -> -0.5 rejected
    assert result.chosen == [0, 1]
    assert result.score == 0.0
    assert result.scores == pytest.approx([-3.0, 0.0, -5.0, -0.5])
    torch.testing.assert_close(result.state_dict["w"], torch.zeros(3))
