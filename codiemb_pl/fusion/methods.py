"""Per-tensor merge methods on task vectors (SPEC §5).

Every method merges ONE parameter tensor:

    fn(base, deltas, *, weights=None, generator=None, **params) -> Tensor

`base` is θ0 (the shared pre-trained tensor), `deltas` the task vectors Δk = θk − θ0 (same shape),
`weights` an optional per-checkpoint prior, `generator` the random source (only DARE draws from it).
The result is the merged *parameter* θ0 + merged Δ, computed in float32 (float64 when `base` is
float64) and cast back to `base.dtype`. Methods are registered by name in `MERGE_METHODS`;
`method_parameters(name)` lists the keyword parameters a method accepts.

At registration a method declares what the merge engine (`fusion.engine`) must give it, per
parameter set (`merge_needs(name, params) -> Needs`), as mergekit's methods do:

    sliceable   the merged rows [a, b) depend only on rows [a, b) of θ0 and the Δk (plus the statistic),
                so the engine may merge a tensor in dim-0 row slices; else it passes whole tensors
    statistic   a first pass over the Δk, passed as a keyword parameter:
                DeltaNorms("layer")   ‖Δk‖ over every merged tensor of the key's transformer layer (a pass
                                      over the whole model before merging; always supplied) -> `magnitudes`
                DeltaNorms("tensor")  ‖Δk‖ of the tensor                                    -> `magnitudes`
                TrimThresholds(d)     per checkpoint, the ⌈d·n⌉-th largest |Δk| of the tensor -> `thresholds`
                (per-tensor statistics are supplied only when the tensor is merged in slices; a
                whole-tensor call computes them itself)

`scale` is the SPEC's λ everywhere (`lambda` is a Python keyword).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from codiemb_pl.errors import InputError

MergeFn = Callable[..., Tensor]
MERGE_METHODS: dict[str, MergeFn] = {}

# Shared by all methods; `method_parameters` leaves them out.
COMMON_PARAMETERS = ("base", "deltas", "weights", "generator")
# Parameters the merge engine computes in a first pass (`Needs.statistic`); users do not set them.
STATISTIC_PARAMETERS = ("magnitudes", "thresholds")
GRANULARITIES = ("element", "row", "tensor", "layer")
# Below this norm a vector has no usable direction (SLERP / Multi-SLERP fall back to linear).
TINY_NORM = 1e-12
# |cos| above this counts as collinear: spherical interpolation degenerates to linear.
COLLINEAR_COS = 0.9995


@dataclass(frozen=True)
class DeltaNorms:
    """‖Δk‖ per checkpoint over the tensor (`over="tensor"`) or over every merged tensor of the key's
    transformer layer (`over="layer"`, `fusion.keys.layer_of`: a first pass over the whole model)."""

    over: str
    keyword: ClassVar[str] = "magnitudes"


@dataclass(frozen=True)
class TrimThresholds:
    """Per checkpoint, the ⌈density·n⌉-th largest |Δk| of the tensor (`trim_to_density`'s threshold)."""

    density: float
    keyword: ClassVar[str] = "thresholds"


Statistic = DeltaNorms | TrimThresholds


@dataclass(frozen=True)
class Needs:
    """What the merge engine must do for a method with one parameter set (see the module docstring)."""

    sliceable: bool = False
    statistic: Statistic | None = None


WHOLE_TENSORS = Needs()
ROW_WISE = Needs(sliceable=True)
MERGE_NEEDS: dict[str, Callable[[Mapping[str, Any]], Needs]] = {}


def register(name: str, needs: Needs | Callable[[Mapping[str, Any]], Needs] = WHOLE_TENSORS
             ) -> Callable[[MergeFn], MergeFn]:
    """Decorator: add `fn` to `MERGE_METHODS` under `name`, with what it needs (fixed, or a function of its params)."""

    def add(fn: MergeFn) -> MergeFn:
        MERGE_METHODS[name] = fn
        MERGE_NEEDS[name] = needs if callable(needs) else (lambda params: needs)
        return fn

    return add


def merge_needs(name: str, params: Mapping[str, Any]) -> Needs:
    """What method `name` needs from the engine with `params` (whole tensors unless it declared more)."""
    get_merge_method(name)
    return MERGE_NEEDS.get(name, lambda params: WHOLE_TENSORS)(params)


def get_merge_method(name: str) -> MergeFn:
    """The registered method `name`, or InputError listing the known ones."""
    if name not in MERGE_METHODS:
        raise InputError("fusion.method", f"unknown merge method {name!r}",
                         f"use one of {sorted(MERGE_METHODS)}")
    return MERGE_METHODS[name]


def method_parameters(name: str) -> tuple[str, ...]:
    """Names of the method-specific keyword parameters of `name` users set (e.g. ('density', 'scale') for ties)."""
    signature = inspect.signature(get_merge_method(name))
    return tuple(p for p in signature.parameters if p not in COMMON_PARAMETERS + STATISTIC_PARAMETERS)


def check_method_params(name: str, params: dict) -> None:
    """Raise InputError when `params` holds a name that method `name` does not accept (catches typos)."""
    accepted = method_parameters(name)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise InputError(f"fusion.{name}", f"unknown parameter(s) {unknown}",
                         f"{name} accepts {list(accepted) or 'no parameters'}")


# ----------------------------------------------------------------------------------------------
# shared helpers
# ----------------------------------------------------------------------------------------------

def compute_dtype(base: Tensor) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything else (float16, bfloat16, float32)."""
    return torch.float64 if base.dtype == torch.float64 else torch.float32


def _prepare(where: str, base: Tensor, deltas: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """Check shapes and dtypes; return base and deltas in the compute dtype."""
    if not isinstance(base, Tensor) or not base.is_floating_point():
        raise InputError(where, f"base must be a floating-point tensor, got {getattr(base, 'dtype', type(base))}",
                         "non-float tensors are copied, not merged")
    if len(deltas) == 0:
        raise InputError(where, "no task vectors to merge", "pass at least one checkpoint")
    dtype = compute_dtype(base)
    prepared = []
    for k, delta in enumerate(deltas):
        if tuple(delta.shape) != tuple(base.shape):
            raise InputError(where, f"deltas[{k}] has shape {tuple(delta.shape)} but base has {tuple(base.shape)}",
                             "do these checkpoints share the same base architecture?")
        if not delta.is_floating_point():
            raise InputError(where, f"deltas[{k}] has non-float dtype {delta.dtype}", "pass float task vectors")
        prepared.append(delta.to(dtype))
    return base.to(dtype), prepared


def _prior(where: str, weights: Sequence[float] | None, count: int, *, allow_negative: bool = False,
           normalise: bool = True) -> list[float]:
    """Per-checkpoint prior weights: ones when None; checked for length, finiteness and sign; optionally / sum."""
    if weights is None:
        values = [1.0] * count
    else:
        values = [float(w) for w in weights]
        if len(values) != count:
            raise InputError(where, f"{len(values)} weights for {count} checkpoints", "give one weight per checkpoint")
        if not all(math.isfinite(w) for w in values):
            raise InputError(where, f"weights {values} are not all finite", "use finite numbers")
        if not allow_negative and any(w < 0 for w in values):
            raise InputError(where, f"weights {values} contain a negative value", "use weights >= 0")
    if normalise:
        total = sum(values)
        if total <= 0:
            raise InputError(where, f"weights {values} sum to {total}", "use weights with a positive sum")
        values = [w / total for w in values]
    return values


def _weighted_sum(deltas: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Σ_k w_k Δk."""
    total = torch.zeros_like(deltas[0])
    for weight, delta in zip(weights, deltas):
        total.add_(delta, alpha=weight)
    return total


def _finish(base: Tensor, merged_delta: Tensor, out_dtype: torch.dtype) -> Tensor:
    """θ0 + merged Δ, cast back to the original dtype."""
    return (base + merged_delta).to(out_dtype)


def _check_range(where: str, name: str, value: float, low: float, high: float, *,
                 low_open: bool = False, high_open: bool = False) -> float:
    value = float(value)
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if not math.isfinite(value) or too_low or too_high:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise InputError(where, f"{name}={value} is outside {interval}", f"choose {name} in {interval}")
    return value


# ----------------------------------------------------------------------------------------------
# linear methods
# ----------------------------------------------------------------------------------------------

@register("uniform_soup", ROW_WISE)
def uniform_soup(base: Tensor, deltas: Sequence[Tensor], *, weights: Sequence[float] | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
    """Model soup: θ* = θ0 + Σ_k ŵ_k Δk with ŵ = weights / Σ weights (plain mean Δ without weights)."""
    where = "fusion.uniform_soup"
    base_c, deltas_c = _prepare(where, base, deltas)
    return _finish(base_c, _weighted_sum(deltas_c, _prior(where, weights, len(deltas_c))), base.dtype)


@register("task_arithmetic", ROW_WISE)
def task_arithmetic(base: Tensor, deltas: Sequence[Tensor], *, weights: Sequence[float] | None = None,
                    generator: torch.Generator | None = None, scale: float = 1.0) -> Tensor:
    """Task arithmetic: θ* = θ0 + λ Σ_k w_k Δk (w_k = 1 without weights; negative w_k subtracts a task)."""
    where = "fusion.task_arithmetic"
    base_c, deltas_c = _prepare(where, base, deltas)
    prior = _prior(where, weights, len(deltas_c), allow_negative=True, normalise=False)
    return _finish(base_c, float(scale) * _weighted_sum(deltas_c, prior), base.dtype)


# ----------------------------------------------------------------------------------------------
# delta-guided fusion (CoDiEmb)
# ----------------------------------------------------------------------------------------------

def _magnitudes(where: str, deltas: Sequence[Tensor], granularity: str,
                magnitudes: Sequence[Tensor | float] | None) -> list[Tensor]:
    """|Δ| per element, ‖row‖ per output channel (dim 0), ‖Δ‖ per tensor, or the given per-layer norms."""
    if granularity not in GRANULARITIES:
        raise InputError(where, f"unknown granularity {granularity!r}", f"use one of {list(GRANULARITIES)}")
    if granularity == "layer" and magnitudes is None:
        raise InputError(where, "granularity='layer' needs the per-checkpoint layer norms in `magnitudes`",
                         "merge through fusion.engine (merge_state_dicts), which computes them")
    if magnitudes is not None:
        if granularity not in ("tensor", "layer"):
            raise InputError(where, f"`magnitudes` is only used with granularity 'tensor' or 'layer', not "
                                    f"{granularity!r}", "drop `magnitudes` or set granularity='layer'")
        if len(magnitudes) != len(deltas):
            raise InputError(where, f"{len(magnitudes)} magnitudes for {len(deltas)} checkpoints",
                             "give one norm per checkpoint")
        reference = deltas[0]
        return [torch.as_tensor(m, dtype=reference.dtype, device=reference.device) for m in magnitudes]
    if granularity == "element":
        return [delta.abs() for delta in deltas]
    if granularity == "tensor":
        return [torch.linalg.vector_norm(delta) for delta in deltas]
    # row: one norm per output channel (dim 0), broadcast over the remaining dims
    result = []
    for delta in deltas:
        if delta.dim() <= 1:
            result.append(delta.abs())
        else:
            norms = torch.linalg.vector_norm(delta.reshape(delta.shape[0], -1), dim=1)
            result.append(norms.reshape((delta.shape[0],) + (1,) * (delta.dim() - 1)))
    return result


def _delta_guided_needs(params: Mapping[str, Any]) -> Needs:
    """Row slices for every granularity; 'tensor' and 'layer' need the Δk norms from a first pass."""
    granularity = params.get("granularity", "element")
    if granularity in ("element", "row"):
        return ROW_WISE
    if granularity in ("tensor", "layer"):
        return Needs(sliceable=True, statistic=DeltaNorms(granularity))
    return WHOLE_TENSORS  # an unknown granularity: the whole-tensor call reports it


@register("delta_guided", _delta_guided_needs)
def delta_guided(base: Tensor, deltas: Sequence[Tensor], *, weights: Sequence[float] | None = None,
                 generator: torch.Generator | None = None, gamma: float = 1.0, scale: float = 1.0,
                 granularity: str = "element", magnitudes: Sequence[Tensor | float] | None = None) -> Tensor:
    """Delta-guided fusion (SPEC §5): checkpoints that moved further from θ0 get more weight.

        w_{k,p} = π_k m_{k,p}^γ / Σ_j π_j m_{j,p}^γ        θ*_p = θ0_p + λ Σ_k w_{k,p} Δ_{k,p}

    m is |Δ_{k,p}| (granularity "element"), the L2 norm of Δk's output channel (dim 0) holding p
    ("row"), ‖Δk‖ ("tensor") or the L2 norm of Δk over every tensor of p's transformer layer
    ("layer": the caller passes these K per-checkpoint norms as `magnitudes`; the merge engine
    computes them in a first pass; for "tensor" it passes them when it merges the tensor in row slices). π = `weights` (prior, ones by default). Where all π_j m_j^γ are 0
    the weights fall back to π / Σ π. γ = 0 is the (weighted) uniform soup; large γ approaches
    "largest mover wins". Magnitudes are divided by their max over k before the power (same
    weights, no overflow / underflow for large γ).
    """
    where = "fusion.delta_guided"
    base_c, deltas_c = _prepare(where, base, deltas)
    gamma = _check_range(where, "gamma", gamma, 0.0, math.inf, high_open=True)
    prior = _prior(where, weights, len(deltas_c))
    scores = torch.stack(torch.broadcast_tensors(*_magnitudes(where, deltas_c, granularity, magnitudes))).abs_()
    tiny = torch.finfo(scores.dtype).tiny
    scores.div_(scores.amax(dim=0, keepdim=True).clamp_min(tiny))      # m / max_j m_j (0 where all are 0)
    scores.pow_(gamma)                                                  # 0**0 == 1: γ = 0 gives π
    for k, weight in enumerate(prior):
        scores[k].mul_(weight)
    totals = scores.sum(dim=0)
    has_mass = totals > 0
    totals.clamp_min_(tiny)
    merged = torch.zeros_like(base_c)
    for k, delta in enumerate(deltas_c):
        mixing = torch.where(has_mass, scores[k] / totals, torch.full_like(totals, prior[k]))
        merged.add_(mixing * delta)
    return _finish(base_c, float(scale) * merged, base.dtype)


# ----------------------------------------------------------------------------------------------
# TIES and DARE
# ----------------------------------------------------------------------------------------------

def trim_to_density(delta: Tensor, density: float) -> Tensor:
    """Keep the entries whose |Δ| is at least the ⌈d·n⌉-th largest magnitude (ties at the threshold kept), zero the rest."""
    if density >= 1.0 or delta.numel() == 0:
        return delta.clone()
    keep = max(1, math.ceil(density * delta.numel()))
    magnitude = delta.abs().reshape(-1)
    return trim_at(delta, torch.kthvalue(magnitude, magnitude.numel() - keep + 1).values)   # keep-th largest


def trim_at(delta: Tensor, threshold: Tensor | float) -> Tensor:
    """Δ where |Δ| >= threshold, else 0."""
    return torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))


def _ties_needs(params: Mapping[str, Any]) -> Needs:
    """Row slices, given each checkpoint's trim threshold over the whole tensor (none to find when d >= 1)."""
    density = params.get("density", 0.2)
    if isinstance(density, (int, float)) and 0.0 < density < 1.0:
        return Needs(sliceable=True, statistic=TrimThresholds(float(density)))
    return ROW_WISE  # d >= 1 keeps every entry; an out-of-range d is refused by the call


@register("ties", _ties_needs)
def ties(base: Tensor, deltas: Sequence[Tensor], *, weights: Sequence[float] | None = None,
         generator: torch.Generator | None = None, density: float = 0.2, scale: float = 1.0,
         thresholds: Sequence[float | None] | None = None) -> Tensor:
    """TIES merging (trim, elect sign, disjoint mean), per tensor.

        τ̃k = trim_to_density(Δk, d)                    (top-d fraction of Δk by magnitude)
        s   = sign(Σ_k w_k τ̃k)                          (elected sign: total mass)
        A_k = [sign(τ̃k) == s and τ̃k ≠ 0]               (agreeing, surviving entries)
        θ*  = θ0 + λ Σ_k w_k A_k τ̃k / Σ_k w_k A_k       (0 where no entry agrees)

    `thresholds` (one per checkpoint, None keeps all) replace the trim's own thresholds: the merge
    engine finds them over the whole tensor in a first pass and passes them with row slices.
    """
    where = "fusion.ties"
    base_c, deltas_c = _prepare(where, base, deltas)
    density = _check_range(where, "density", density, 0.0, 1.0, low_open=True)
    prior = _prior(where, weights, len(deltas_c))
    if thresholds is None:
        trimmed = torch.stack([trim_to_density(delta, density) for delta in deltas_c])
    elif len(thresholds) != len(deltas_c):
        raise InputError(where, f"{len(thresholds)} thresholds for {len(deltas_c)} checkpoints",
                         "give one threshold per checkpoint")
    else:
        trimmed = torch.stack([delta if threshold is None else trim_at(delta, threshold)
                               for delta, threshold in zip(deltas_c, thresholds)])
    prior_t = torch.tensor(prior, dtype=trimmed.dtype, device=trimmed.device).reshape((-1,) + (1,) * base_c.dim())
    elected = torch.sign((prior_t * trimmed).sum(dim=0))
    agrees = (torch.sign(trimmed) == elected) & (trimmed != 0)
    agree_weight = (prior_t * agrees).sum(dim=0)
    agree_mass = (prior_t * agrees * trimmed).sum(dim=0)
    merged = torch.where(agree_weight > 0, agree_mass / agree_weight.clamp_min(torch.finfo(trimmed.dtype).tiny),
                         torch.zeros_like(agree_mass))
    return _finish(base_c, float(scale) * merged, base.dtype)


@register("dare")
def dare(base: Tensor, deltas: Sequence[Tensor], *, weights: Sequence[float] | None = None,
         generator: torch.Generator | None = None, drop_rate: float = 0.5, scale: float = 1.0,
         combine: str = "mean") -> Tensor:
    """DARE: drop each Δ entry with probability p, rescale the survivors by 1/(1−p), then combine.

        Δ̃k = Δk ⊙ Bernoulli(1−p) / (1−p)               (E[Δ̃k] = Δk; mask drawn from `generator`)
        θ* = θ0 + λ Σ_k ŵ_k Δ̃k      combine="mean"  (ŵ = weights / Σ weights)
        θ* = θ0 + λ Σ_k w_k Δ̃k      combine="sum"   (w = weights, ones by default)
    """
    where = "fusion.dare"
    base_c, deltas_c = _prepare(where, base, deltas)
    drop_rate = _check_range(where, "drop_rate", drop_rate, 0.0, 1.0, high_open=True)
    if combine not in ("mean", "sum"):
        raise InputError(where, f"combine={combine!r}", "use 'mean' or 'sum'")
    prior = _prior(where, weights, len(deltas_c), normalise=combine == "mean")
    device = generator.device if generator is not None else base_c.device
    rescaled = []
    for delta in deltas_c:
        uniform = torch.rand(delta.shape, generator=generator, device=device, dtype=delta.dtype).to(delta.device)
        rescaled.append(torch.where(uniform >= drop_rate, delta / (1.0 - drop_rate), torch.zeros_like(delta)))
    return _finish(base_c, float(scale) * _weighted_sum(rescaled, prior), base.dtype)


# ----------------------------------------------------------------------------------------------
# spherical methods
# ----------------------------------------------------------------------------------------------

def gram_matrix(vectors: Sequence[Tensor], chunk_size: int = 1 << 20) -> Tensor:
    """G_jk = ⟨Xj, Xk⟩ over the flattened vectors, accumulated in float64 chunk by chunk: [K, K] float64.

    Everything the spherical methods need (norms, angles, the spherical mean) is a function of G, so
    large tensors are read once here and once to form the result, with float64-accurate angles.
    """
    flat = [vector.reshape(-1) for vector in vectors]
    count, size = len(flat), flat[0].numel()
    gram = torch.zeros(count, count, dtype=torch.float64, device=flat[0].device)
    for start in range(0, size, chunk_size):
        block = torch.stack([f[start:start + chunk_size] for f in flat]).to(torch.float64)
        gram += block @ block.T
    return gram


def _spherical_mean(cosines: Tensor, weights: Tensor, max_iterations: int, tolerance: float) -> Tensor | None:
    """Coefficients c with m̂ = Σ_k c_k u_k the weighted spherical mean of unit vectors u_k (cosines = u_j·u_k).

    Start at normalise(Σ ŵ_k u_k), then m̂ ← exp_m̂(Σ ŵ_k log_m̂(u_k)), all in the span of the u_k:
    log_m̂(u_k) = angle_k · o_k/‖o_k‖ with o_k = u_k − (u_k·m̂)m̂, exp_m̂(t) = cos‖t‖·m̂ + sin‖t‖·t/‖t‖.
    None when the weighted directions cancel (no mean direction).
    """
    def norm(c: Tensor) -> Tensor:
        return (c @ cosines @ c).clamp_min(0.0).sqrt()

    mean = weights.clone()
    length = norm(mean)
    if length <= 1e-6:
        return None
    mean = mean / length
    identity = torch.eye(len(weights), dtype=cosines.dtype, device=cosines.device)
    for _ in range(int(max_iterations)):
        cos_to_mean = (cosines @ mean).clamp(-1.0, 1.0)                    # u_k·m̂
        orthogonal = identity - cos_to_mean.unsqueeze(1) * mean.unsqueeze(0)  # row k: o_k in u-coordinates
        lengths = torch.einsum("ki,ij,kj->k", orthogonal, cosines, orthogonal).clamp_min(0.0).sqrt()
        angles = torch.atan2(lengths, cos_to_mean)
        factors = torch.where(lengths > TINY_NORM, angles / lengths.clamp_min(TINY_NORM), torch.zeros_like(lengths))
        tangent = (weights * factors) @ orthogonal
        step = norm(tangent)
        if step < tolerance:
            break
        mean = torch.cos(step) * mean + torch.sin(step) * tangent / step
        mean = mean / norm(mean)
    return mean


@register("multi_slerp")
def multi_slerp(base: Tensor, deltas: Sequence[Tensor], *, weights: Sequence[float] | None = None,
                generator: torch.Generator | None = None, max_iterations: int = 100,
                tolerance: float = 1e-10) -> Tensor:
    """Multi-SLERP (SPEC §5), per tensor, on Xk = Δk: weighted spherical mean direction × weighted mean norm.

        ŵ = weights / Σ weights;  u_k = Xk/‖Xk‖;  m̂ ← normalise(Σ ŵ_k u_k)
        repeat:  t = Σ ŵ_k log_m̂(u_k);  m̂ ← cos‖t‖·m̂ + sin‖t‖·t/‖t‖       (until ‖t‖ < tolerance)
        θ* = θ0 + (Σ ŵ_k ‖Xk‖)·m̂

    log_m̂(u) = angle(u, m̂)·(u − (u·m̂)m̂)/‖u − (u·m̂)m̂‖ is the exact tangent (the SPEC's
    projection u − (u·m̂)m̂ without the angle factor sums to 0 at the weighted mean, which would make
    the result a normalised lerp). The fixed point is the weighted spherical (Karcher) mean; for two
    vectors it is reached in one step and equals `slerp` at t = ŵ_2. The iteration runs on the K×K
    float64 Gram matrix (m̂ = Σ c_k u_k), so the tensor is only read twice. Linear fallback
    θ0 + Σ ŵ_k Xk when some ‖Xk‖ ~ 0, when all directions are collinear (|u_j·u_k| > 0.9995) or
    when they cancel. Checkpoints with weight 0 are left out.
    """
    where = "fusion.multi_slerp"
    base_c, deltas_c = _prepare(where, base, deltas)
    prior = _prior(where, weights, len(deltas_c))
    active = [k for k, w in enumerate(prior) if w > 0]
    deltas_c, prior = [deltas_c[k] for k in active], [prior[k] for k in active]
    linear = _weighted_sum(deltas_c, prior)
    if len(deltas_c) == 1 or base_c.numel() == 0:
        return _finish(base_c, linear, base.dtype)
    gram = gram_matrix(deltas_c)
    norms = gram.diagonal().clamp_min(0.0).sqrt()
    if bool((norms <= TINY_NORM).any()):
        return _finish(base_c, linear, base.dtype)
    cosines = gram / torch.outer(norms, norms)
    if bool((cosines.abs() > COLLINEAR_COS).all()):
        return _finish(base_c, linear, base.dtype)
    weights_t = torch.tensor(prior, dtype=torch.float64, device=gram.device)
    mean = _spherical_mean(cosines, weights_t, max_iterations, tolerance)
    if mean is None:
        return _finish(base_c, linear, base.dtype)
    per_delta = (weights_t @ norms) * mean / norms                      # θ* − θ0 = Σ_k per_delta_k Xk
    return _finish(base_c, _weighted_sum(deltas_c, per_delta.tolist()), base.dtype)


def slerp_coefficients(cosine: Tensor, t: Tensor | float) -> tuple[Tensor, Tensor]:
    """(s0, s1) with slerp(u0, u1, t) = s0 u0 + s1 u1 for unit u0, u1 at angle Ω = arccos(cosine).

        s0 = sin((1−t)Ω)/sin Ω,  s1 = sin(tΩ)/sin Ω;   (1−t, t) when |cos| > 0.9995 (collinear)
    Differentiable in `t` and `cosine`; shared with Self Positioning.
    """
    cosine = torch.as_tensor(cosine)
    t = torch.as_tensor(t, dtype=cosine.dtype, device=cosine.device)
    collinear = cosine.abs() > COLLINEAR_COS
    safe_cos = torch.where(collinear, torch.zeros_like(cosine), cosine).clamp(-1.0, 1.0)
    omega = torch.arccos(safe_cos)
    sin_omega = torch.sin(omega)
    s0 = torch.where(collinear, 1.0 - t, torch.sin((1.0 - t) * omega) / sin_omega)
    s1 = torch.where(collinear, t, torch.sin(t * omega) / sin_omega)
    return s0, s1


@register("slerp")
def slerp(base: Tensor, deltas: Sequence[Tensor], *, weights: Sequence[float] | None = None,
          generator: torch.Generator | None = None, t: float | None = None) -> Tensor:
    """SLERP of two task vectors, per tensor (Multi-SLERP for K = 2 with weights (1−t, t)).

        Ω = angle(Δ1, Δ2);  dir = [sin((1−t)Ω) u1 + sin(tΩ) u2] / sin Ω
        θ* = θ0 + ((1−t)‖Δ1‖ + t‖Δ2‖)·dir
    t defaults to 0.5, or w2/(w1+w2) when `weights` are given (not both). Linear fallback
    θ0 + (1−t)Δ1 + tΔ2 when a norm is ~0 or |cos Ω| > 0.9995.
    """
    where = "fusion.slerp"
    base_c, deltas_c = _prepare(where, base, deltas)
    if len(deltas_c) != 2:
        raise InputError(where, f"slerp merges exactly 2 checkpoints, got {len(deltas_c)}",
                         "use multi_slerp for more than two")
    if weights is not None and t is not None:
        raise InputError(where, "both `weights` and `t` given", "set only one of them")
    t = _prior(where, weights, 2)[1] if weights is not None else (0.5 if t is None else t)
    t = _check_range(where, "t", t, 0.0, 1.0)
    linear = (1.0 - t) * deltas_c[0] + t * deltas_c[1]
    gram = gram_matrix(deltas_c)
    norms = gram.diagonal().clamp_min(0.0).sqrt()
    if base_c.numel() == 0 or bool((norms <= TINY_NORM).any()):
        return _finish(base_c, linear, base.dtype)
    cosine = gram[0, 1] / (norms[0] * norms[1])
    if cosine.abs() > COLLINEAR_COS:
        return _finish(base_c, linear, base.dtype)
    s0, s1 = slerp_coefficients(cosine, t)                       # s0 u1 + s1 u2 has unit length
    target_norm = (1.0 - t) * norms[0] + t * norms[1]
    coefficients = [float(target_norm * s0 / norms[0]), float(target_norm * s1 / norms[1])]
    return _finish(base_c, _weighted_sum(deltas_c, coefficients), base.dtype)
