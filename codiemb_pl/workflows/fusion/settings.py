"""A fusion's settings, checked before anything trains: the merge-method list (`parse_methods` ->
`MethodSpec`s) and the metric that ranks the candidates (`check_metric`).

Method entries: `{"method": NAME, "params": {...}, "weights": [...], "name": LABEL}` or just `NAME`.
NAME is a per-tensor method of `fusion.methods` (merged by the engine, `fusion.engine`, in row slices
where the method allows), `greedy_soup` (needs the checkpoints' scores) or `self_positioning` (learned
coefficients on a probe set, `workflows.probe.self_positioning_merge`). `single_member_skip` says which
methods give a lone checkpoint back unchanged.
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from codiemb_pl.errors import InputError
from codiemb_pl.fusion.methods import MERGE_METHODS, DeltaNorms, check_method_params, merge_needs

SCORED_METHODS = ("greedy_soup", "self_positioning")


@dataclass
class MethodSpec:
    """One configured merge: method name, its parameters, optional per-checkpoint weights, a label."""

    method: str
    params: dict[str, Any] = field(default_factory=dict)
    weights: list[float] | None = None
    name: str = ""


def _label(method: str, params: Mapping[str, Any]) -> str:
    if not params:
        return method
    return f"{method}(" + ",".join(f"{key}={value}" for key, value in sorted(params.items())) + ")"


METHOD_EXAMPLE = "e.g. [delta_guided, {method: ties, params: {density: 0.2}}]"


# what `run_fusion` passes to `workflows.probe.self_positioning_merge` itself (not user parameters)
SELF_POSITIONING_GIVEN = ("base_dir_or_state", "checkpoints", "probe_sources", "seed", "model_dir", "encoder_kwargs")


def parse_methods(entries: Any, where: str = "fusion.methods", members: int | None = None) -> list[MethodSpec]:
    """Validate a method list and give every entry a unique label; InputError (one line, `where[i]`) for a list
    that is not one, an unknown method (with the nearest name), unknown or out-of-range parameters and weights
    that are not one finite number per member. `members` (when known: a sweep) is how many models will be
    merged; each per-tensor method is tried on a toy tensor with that many task vectors (`check_merge_settings`),
    so a value that would stop the merge stops here, before anything trains."""
    if isinstance(entries, (str, bytes, Mapping)) or not isinstance(entries, Sequence):
        raise InputError(where, f"must be a list of merge methods, got {entries!r}", METHOD_EXAMPLE)
    specs: list[MethodSpec] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        spec = _method_spec(entry, f"{where}[{index}]", members)
        if spec.name in seen:
            raise InputError(f"{where}[{index}]", f"two entries are labelled {spec.name!r}", "give one a `name`")
        seen.add(spec.name)
        specs.append(spec)
    return specs


def _method_spec(entry: Any, where: str, members: int | None) -> MethodSpec:
    """One checked entry of a method list (see `parse_methods`)."""
    if isinstance(entry, str):
        entry = {"method": entry}
    if not isinstance(entry, Mapping):
        raise InputError(where, f"expected a method name or a mapping {{method, params, weights, name}}, got {entry!r}",
                         "e.g. {method: ties, params: {density: 0.2}}")
    unknown = sorted(set(map(str, entry)) - {"method", "params", "weights", "name"})
    method = entry.get("method")
    if unknown or not isinstance(method, str):
        raise InputError(where, f"expected {{method, params, weights, name}}, got {dict(entry)}",
                         "e.g. {method: ties, params: {density: 0.2}}")
    known = sorted(MERGE_METHODS) + list(SCORED_METHODS)
    if method not in known:
        close = difflib.get_close_matches(method, known, n=1)
        raise InputError(where, f"unknown merge method {method!r}",
                         (f"did you mean {close[0]}? " if close else "") + f"use one of {known}")
    params = entry.get("params") or {}
    if not isinstance(params, Mapping):
        raise InputError(where, f"params must be a mapping of parameter names to values, got {params!r}",
                         f"e.g. {{method: {method}, params: {{...}}}}")
    params = dict(params)
    weights = entry.get("weights")
    if weights is not None and (isinstance(weights, (str, Mapping)) or not isinstance(weights, Sequence) or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights)):
        raise InputError(where, f"weights must be a list of finite numbers, one per member, got {weights!r}",
                         "e.g. weights: [1.0, 2.0]")
    name = entry.get("name")
    if name is not None and not isinstance(name, str):
        raise InputError(where, f"name must be text, got {name!r}", "e.g. name: soup_ab")
    spec = MethodSpec(method, params, None if weights is None else [float(w) for w in weights],
                      name or _label(method, params))
    try:
        _check_params(spec)
        if members is not None and spec.weights is not None and len(spec.weights) != members:
            raise InputError(where, f"{len(spec.weights)} weights for {members} members",
                             "give one weight per merged model (fixed members, then each run's checkpoints)")
        check_merge_settings(spec, members)
    except InputError as error:
        raise InputError(where, error.problem, error.fix) from None
    return spec


def _check_params(spec: MethodSpec) -> None:
    """Parameter names: a registered method's own, Self Positioning's keyword arguments, none for greedy_soup."""
    if spec.method in MERGE_METHODS:
        check_method_params(spec.method, spec.params)
        return
    accepted: tuple[str, ...] = ()
    if spec.method == "self_positioning":
        from codiemb_pl.workflows.probe import self_positioning_merge

        accepted = tuple(name for name in inspect.signature(self_positioning_merge).parameters
                         if name not in SELF_POSITIONING_GIVEN)
    unknown = sorted(set(spec.params) - set(accepted))
    if unknown:
        raise InputError(spec.method, f"unknown parameter(s) {unknown}",
                         f"{spec.method} accepts {list(accepted) or 'no parameters'}")


def check_merge_settings(spec: MethodSpec, members: int | None = None) -> None:
    """Run a per-tensor method once on a 2×3 toy tensor with `members` random task vectors (default: one per
    weight, else 2), so a parameter out of its range or a member count the method cannot take (slerp: 2) is an
    InputError now rather than after training. Scored methods (greedy soup, Self Positioning) are not run."""
    if spec.method not in MERGE_METHODS:
        return
    count = members if members is not None else len(spec.weights) if spec.weights is not None else 2
    generator = torch.Generator().manual_seed(0)
    deltas = [torch.randn(2, 3, generator=generator) for _ in range(max(count, 1))]
    params = dict(spec.params)
    if isinstance(merge_needs(spec.method, params).statistic, DeltaNorms):   # the engine's first-pass norms
        params["magnitudes"] = [float(torch.linalg.vector_norm(delta)) for delta in deltas]
    MERGE_METHODS[spec.method](torch.zeros(2, 3), deltas, weights=spec.weights, generator=generator, **params)


def check_metric(metric: Any, tasks: Mapping[str, str], where: str, dims: Sequence[int] = ()) -> None:
    """`metric` must be one the validation sets `tasks` ({set name: "ir" | "sts"}) will give
    (`evaluation.suite.metric_names`), at full width or (`metric@m`) at a trained Matryoshka width of `dims`; else
    one line with the nearest valid key."""
    from codiemb_pl.evaluation.suite import metric_names
    from codiemb_pl.model.widths import metric_key, split_metric_key

    known = metric_names(tasks, dims=dims)
    if metric in known:
        return
    key, width, _ = split_metric_key(str(metric))
    if width is not None and width not in dims and metric_key(key) in known:
        trained = ", ".join(map(str, dims)) if dims else "none (model.matryoshka_dims is unset)"
        raise InputError(where, f"{metric!r}: validation scores no width {width} (widths below the full one that "
                         f"were trained: {trained})", f"use {key} (full width)" + "".join(
                             f" or {metric_key(key, dim)}" for dim in dims))
    close = difflib.get_close_matches(str(metric), known, n=1, cutoff=0.6) or known[:1]
    sets = ", ".join(f"{name} ({task})" for name, task in tasks.items()) or "none"
    raise InputError(where, f"{metric!r} is not a metric the validation sets give (sets: {sets})",
                     f"did you mean {close[0]}? Use {', '.join(known[:3])} or val/<set>/<metric>" if close
                     else "configure data.val, then use val/avg, val/ir_avg, val/sts_avg or val/<set>/<metric>")


def single_member_skip(spec: MethodSpec) -> str | None:
    """Why merging ONE checkpoint with `spec` is not worth a row: it gives the checkpoint itself back (its score
    would repeat the checkpoint's), or the method needs two (slerp). None when it changes the checkpoint: TIES
    trims it, DARE drops entries, a scale ≠ 1 stretches it, Self Positioning learns a scale.

        soup / Multi-SLERP / greedy soup of one:  θ0 + Δ                    (weights are normalised)
        delta_guided:  θ0 + λΔ            task_arithmetic:  θ0 + λ·w·Δ
        TIES at density 1: θ0 + λΔ        DARE at drop_rate 0: θ0 + λ·ŵ·Δ    (identity when the factor is 1)
    """
    params, weight = spec.params, float((spec.weights or [1.0])[0])
    scale = float(params.get("scale", 1.0))
    if spec.method in ("uniform_soup", "multi_slerp", "greedy_soup"):
        return f"{spec.method} of one model is that model"
    if spec.method == "slerp":
        return "slerp merges exactly two"
    factor = {"delta_guided": scale, "task_arithmetic": scale * weight,
              "ties": scale if float(params.get("density", 0.2)) >= 1.0 else None,
              "dare": (scale * (1.0 if params.get("combine", "mean") == "mean" else weight)
                       if float(params.get("drop_rate", 0.5)) == 0.0 else None)}.get(spec.method)
    if factor == 1.0:
        return f"{spec.name} of one model with factor 1 is that model"
    return None
