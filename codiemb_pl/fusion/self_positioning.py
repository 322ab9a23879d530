"""Self Positioning (SPEC §6): learn N merge coefficients and a scale on a small probe set.

θ(a, λ) = θ0 + λ·V(a), where V is iterative pairwise SLERP over the task vectors τ1..τN, each
treated as ONE flattened vector (all tensors together):

    r_1 = τ1;   for i = 2..N:  t_i = a_i / (ā_{i−1} + a_i),  ā_{i−1} = mean(a_1..a_{i−1})
                                r_i = slerp(r_{i−1}, τ_i, t_i)
    slerp(x, y, t) = ((1−t)‖x‖ + t‖y‖) · [sin((1−t)Ω) x/‖x‖ + sin(tΩ) y/‖y‖] / sin Ω,  Ω = angle(x, y)
                     (1−t)x + t y   when |cos Ω| > 0.9995 or a norm is ~0

a_i = softplus(raw_i), λ = softplus(raw_λ). Every r_i is a linear combination Σ_j c_j τ_j, so the
module tracks the N coefficients c(a) with the task vectors' Gram matrix G_ij = ⟨τ_i, τ_j⟩ (norms
and angles need only c and G) and builds θ0 + λ Σ_j c_j τ_j per tensor: differentiable in a and λ,
never concatenating the model. Only the N + 1 raw scalars are trainable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from codiemb_pl.errors import InputError
from codiemb_pl.fusion.methods import COLLINEAR_COS, TINY_NORM, gram_matrix, slerp_coefficients


def inverse_softplus(value: float) -> float:
    """raw with softplus(raw) = value (> 0): value + log(1 − e^(−value))."""
    if not value > 0 or not math.isfinite(value):
        raise InputError("fusion.self_positioning", f"init={value} must be a finite positive number",
                         "use e.g. init=1.0")
    return value + math.log(-math.expm1(-value))


def _pairwise_slerp_step(coefficients: Tensor, index: int, gram: Tensor, t: Tensor) -> Tensor:
    """Coefficients of slerp(r, τ_index, t) where r = Σ_j coefficients_j τ_j (see module docstring)."""
    unit = torch.zeros_like(coefficients)
    unit[index] = 1.0
    running_sq = coefficients @ gram @ coefficients
    task_sq = gram[index, index]
    if running_sq <= TINY_NORM ** 2 or task_sq <= TINY_NORM ** 2:
        return (1.0 - t) * coefficients + t * unit
    running_norm, task_norm = running_sq.sqrt(), task_sq.sqrt()
    cosine = (coefficients @ gram[:, index]) / (running_norm * task_norm)
    if cosine.abs() > COLLINEAR_COS:
        return (1.0 - t) * coefficients + t * unit
    s0, s1 = slerp_coefficients(cosine, t)
    target_norm = (1.0 - t) * running_norm + t * task_norm
    return target_norm * (s0 / running_norm * coefficients + s1 / task_norm * unit)


class SelfPositioning(nn.Module):
    """θ0 + λ·V(a) with learnable a_1..a_N, λ (softplus of raw parameters, initialised to `init`)."""

    def __init__(self, base_params: Mapping[str, Tensor], task_vectors: list[Mapping[str, Tensor]],
                 init: float = 1.0):
        super().__init__()
        where = "fusion.self_positioning"
        if not task_vectors:
            raise InputError(where, "no task vectors", "pass at least one task vector (θk − θ0)")
        self.names = list(base_params)
        for k, vector in enumerate(task_vectors):
            if set(vector) != set(self.names):
                differing = sorted(set(vector) ^ set(self.names))[0]
                raise InputError(where, f"task_vectors[{k}] and base_params differ at key {differing!r}",
                                 "build task vectors from the same base parameters")
            for name in self.names:
                if vector[name].shape != base_params[name].shape:
                    raise InputError(where, f"task_vectors[{k}][{name!r}] has shape {list(vector[name].shape)} "
                                            f"but base has {list(base_params[name].shape)}",
                                     "do these checkpoints share the same base architecture?")
        count = len(task_vectors)
        gram = torch.zeros(count, count, dtype=torch.float64)
        for index, name in enumerate(self.names):
            base = base_params[name].detach()
            stacked = torch.stack([vector[name].detach().to(base.dtype) for vector in task_vectors])
            gram += gram_matrix(list(stacked)).to(gram.device)
            self.register_buffer(f"base_{index}", base, persistent=False)
            self.register_buffer(f"task_vectors_{index}", stacked, persistent=False)
        self.register_buffer("gram", gram, persistent=False)
        raw = inverse_softplus(float(init))
        self.raw_coefficients = nn.Parameter(torch.full((count,), raw))
        self.raw_scale = nn.Parameter(torch.tensor(raw))

    @property
    def coefficients(self) -> Tensor:
        """a = softplus(raw_coefficients), shape [N]."""
        return nn.functional.softplus(self.raw_coefficients)

    @property
    def scale(self) -> Tensor:
        """λ = softplus(raw_scale)."""
        return nn.functional.softplus(self.raw_scale)

    def combination(self) -> Tensor:
        """c(a) with V(a) = Σ_j c_j τ_j, by iterative pairwise SLERP (float64, differentiable) [N]."""
        weights = self.coefficients.double()
        combination = torch.zeros_like(weights)
        combination[0] = 1.0
        for index in range(1, weights.numel()):
            merged_weight = weights[:index].mean()
            t = weights[index] / (merged_weight + weights[index])
            combination = _pairwise_slerp_step(combination, index, self.gram, t)
        return combination

    def merged_params(self) -> dict[str, Tensor]:
        """{name: θ0 + λ Σ_j c_j(a) τ_j} (keeps the graph to the N + 1 raw scalars)."""
        combination = self.combination()
        scale = self.scale
        merged = {}
        for index, name in enumerate(self.names):
            base = getattr(self, f"base_{index}")
            stacked = getattr(self, f"task_vectors_{index}")
            direction = torch.tensordot(combination.to(stacked.dtype), stacked, dims=1)
            merged[name] = base + scale.to(base.dtype) * direction
        return merged


def _batches_forever(probe_batches: Iterable) -> Iterable:
    """Cycle over `probe_batches`; one-shot iterators are cached on the first pass."""
    if iter(probe_batches) is probe_batches:
        probe_batches = list(probe_batches)
    while True:
        empty = True
        for batch in probe_batches:
            empty = False
            yield batch
        if empty:
            raise InputError("fusion.self_positioning", "probe_batches yielded no batch",
                             "pass a non-empty list or DataLoader of probe batches")


def fit_self_positioning(module: nn.Module, sp: SelfPositioning, probe_batches: Iterable,
                         loss_fn: Callable[[Callable[..., Any], Any], Tensor], steps: int = 1000,
                         lr: float = 5e-3, mu: float = 0.0) -> dict[str, Any]:
    """Train only sp's N + 1 scalars with Adam: minimise loss_fn(forward, batch) + μ·λ over the probe batches.

    `forward(*args, **kwargs)` runs `module` with sp.merged_params() in place of its parameters
    (torch.func.functional_call; parameters not in sp and buffers are the module's own). The
    module's parameters are frozen during the fit (requires_grad restored afterwards) and its
    train/eval mode is left as the caller set it (eval is usual: no dropout).
    Returns {"loss": [total per step], "probe_loss": [loss_fn per step], "coefficients": final a,
    "scale": final λ, "coefficient_trace": [a per step], "scale_trace": [λ per step]}
    (per-step values are before that step's update).
    """
    where = "fusion.self_positioning"
    if steps < 1:
        raise InputError(where, f"steps={steps}", "use steps >= 1")
    if not lr > 0:
        raise InputError(where, f"lr={lr}", "use a positive learning rate")
    if mu < 0:
        raise InputError(where, f"mu={mu}", "use mu >= 0 (SPEC: 0 to 0.05)")
    frozen = [(p, p.requires_grad) for p in module.parameters()]
    for parameter, _ in frozen:
        parameter.requires_grad_(False)
    optimizer = torch.optim.Adam(sp.parameters(), lr=lr)
    history: dict[str, Any] = {"loss": [], "probe_loss": [], "coefficient_trace": [], "scale_trace": []}
    try:
        batches = iter(_batches_forever(probe_batches))
        for _ in range(steps):
            batch = next(batches)
            merged = sp.merged_params()

            def forward(*args: Any, **kwargs: Any) -> Any:
                return functional_call(module, merged, args, kwargs)

            probe_loss = loss_fn(forward, batch)
            scale = sp.scale
            loss = probe_loss + mu * scale
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            history["loss"].append(float(loss.detach()))
            history["probe_loss"].append(float(probe_loss.detach()))
            history["coefficient_trace"].append(sp.coefficients.detach().cpu().tolist())
            history["scale_trace"].append(float(scale.detach()))
            optimizer.step()
    finally:
        for parameter, requires_grad in frozen:
            parameter.requires_grad_(requires_grad)
    history["coefficients"] = sp.coefficients.detach().cpu().tolist()
    history["scale"] = float(sp.scale.detach())
    return history
