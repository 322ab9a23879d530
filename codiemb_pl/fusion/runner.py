"""A list of merge methods -> candidate models -> a scored leaderboard (shared by callback and command).

Every candidate is a `.safetensors` file named like a Hugging Face model: the base θ0, each collected
checkpoint, and one merge per configured method. `evaluate(path) -> {metric: value}` scores one file
(the caller loads it into an encoder and runs the validation suite); the leaderboard ranks candidates
by one metric (default `val/avg`, higher is better).

Method entries: `{"method": NAME, "params": {...}, "weights": [...], "name": LABEL}` or just `NAME`.
NAME is a per-tensor method of `fusion.methods` (merged in slices, `fusion.chunked`), `greedy_soup`
(needs the checkpoints' scores) or `self_positioning` (learned coefficients on a probe set, through
`codiemb_pl.fusion.probe.self_positioning_merge` when that module is installed; reported as
unavailable otherwise).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from codiemb_pl.errors import InputError
from codiemb_pl.fusion.checkpoints import SafetensorsRowSource
from codiemb_pl.fusion.chunked import ChunkedMerge, write_safetensors
from codiemb_pl.fusion.methods import MERGE_METHODS, check_method_params
from codiemb_pl.fusion.streaming import greedy_soup

DEFAULT_METRIC = "val/avg"
SCORED_METHODS = ("greedy_soup", "self_positioning")
PROBE_MODULE = "codiemb_pl.fusion.probe"
ENCODER_PREFIX = "model."   # self_positioning_merge names tensors like TextEncoder.state_dict()

Evaluate = Callable[[Path], dict[str, float]]


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


def parse_methods(entries: Sequence[str | Mapping[str, Any]], where: str = "fusion.methods") -> list[MethodSpec]:
    """Validate a method list (names, parameters) and give every entry a unique label."""
    specs: list[MethodSpec] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        entry = {"method": entry} if isinstance(entry, str) else dict(entry)
        unknown = sorted(set(entry) - {"method", "params", "weights", "name"})
        method = entry.get("method")
        if unknown or not isinstance(method, str):
            raise InputError(f"{where}[{index}]", f"expected {{method, params, weights, name}}, got {entry}",
                             "e.g. {method: ties, params: {density: 0.2}}")
        params = dict(entry.get("params") or {})
        if method in MERGE_METHODS:
            check_method_params(method, params)
        elif method not in SCORED_METHODS:
            raise InputError(f"{where}[{index}]", f"unknown merge method {method!r}",
                             f"use one of {sorted(MERGE_METHODS) + list(SCORED_METHODS)}")
        name = str(entry.get("name") or _label(method, params))
        if name in seen:
            raise InputError(f"{where}[{index}]", f"two entries are labelled {name!r}", "give one a `name`")
        seen.add(name)
        weights = entry.get("weights")
        specs.append(MethodSpec(method, params, None if weights is None else [float(w) for w in weights], name))
    return specs


@dataclass
class Candidate:
    """One leaderboard row: what it is, where its weights are, and its validation metrics."""

    name: str
    kind: str                    # "base" | "checkpoint" | "fused"
    method: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    weights_path: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    note: str = ""               # why a method produced no candidate


def _score(candidate: Candidate, metric: str) -> float:
    value = candidate.metrics.get(metric, math.nan)
    return value if isinstance(value, (int, float)) and math.isfinite(value) else -math.inf


@dataclass
class Leaderboard:
    """Candidates ranked by `metric` (higher is better; rows without it last)."""

    candidates: list[Candidate]
    metric: str = DEFAULT_METRIC

    def ranked(self) -> list[Candidate]:
        return sorted(self.candidates, key=lambda c: _score(c, self.metric), reverse=True)

    def winner(self) -> Candidate | None:
        best = [c for c in self.ranked() if _score(c, self.metric) > -math.inf]
        return best[0] if best else None

    def metric_names(self) -> list[str]:
        names = sorted({m for c in self.candidates for m in c.metrics})
        leading = [m for m in (self.metric, "val/ir_avg", "val/sts_avg") if m in names]
        return list(dict.fromkeys(leading + names))

    def to_json(self) -> str:
        data = {"metric": self.metric, "winner": getattr(self.winner(), "name", None),
                "ranking": [asdict(c) for c in self.ranked()]}
        return json.dumps(data, indent=2, default=str, allow_nan=True) + "\n"

    def _cells(self, candidate: Candidate, metrics: list[str]) -> list[str]:
        values = [f"{candidate.metrics[m]:.4f}" if m in candidate.metrics else (candidate.note or "-")
                  for m in metrics]
        return [candidate.name, candidate.kind] + values

    def to_markdown(self) -> str:
        metrics = self.metric_names()
        lines = ["| rank | candidate | kind | " + " | ".join(metrics) + " |",
                 "|---:|---|---|" + "---:|" * len(metrics)]
        for rank, candidate in enumerate(self.ranked(), 1):
            lines.append(f"| {rank} | " + " | ".join(self._cells(candidate, metrics)) + " |")
        return "\n".join(lines) + "\n"

    def to_text(self) -> str:
        metrics = self.metric_names()
        headers = ["#", "candidate", "kind"] + [m.removeprefix("val/") for m in metrics]
        rows = [[str(rank)] + self._cells(c, metrics) for rank, c in enumerate(self.ranked(), 1)]
        widths = [max(len(row[i]) for row in rows + [headers]) for i in range(len(headers))]
        align = lambda row: "  ".join(cell.ljust(w) if i < 3 else cell.rjust(w)  # noqa: E731
                                      for i, (cell, w) in enumerate(zip(row, widths)))
        return "\n".join([align(headers), "-" * len(align(headers))] + [align(row) for row in rows])


def self_positioning_available() -> bool:
    """Whether the Self Positioning probe integration (`codiemb_pl.fusion.probe`) is installed."""
    try:
        return importlib.util.find_spec(PROBE_MODULE) is not None
    except ModuleNotFoundError:
        return False


@dataclass
class FusionInputs:
    """θ0 and the collected checkpoints as safetensors files (HF naming), plus what learned methods need."""

    base: Path
    checkpoints: list[tuple[str, Path]]      # (label, file)
    model_folder: str                        # architecture + tokenizer of the base (Self Positioning)
    probe_sources: list = field(default_factory=list)   # SourceConfig list (Self Positioning's probe)
    encoder_settings: dict[str, Any] = field(default_factory=dict)
    seed: int = 0


def _merge_registered(spec: MethodSpec, inputs: FusionInputs, out_path: Path) -> None:
    merge = ChunkedMerge(SafetensorsRowSource(inputs.base), [SafetensorsRowSource(p) for _, p in inputs.checkpoints],
                         spec.method, spec.params, weights=spec.weights, seed=inputs.seed)
    write_safetensors(merge, out_path)


def _merge_greedy(spec: MethodSpec, inputs: FusionInputs, out_path: Path, singles: list[Candidate],
                  evaluate: Evaluate, metric: str, scratch: Path) -> None:
    order = sorted(range(len(singles)), key=lambda i: _score(singles[i], metric), reverse=True)
    trial = scratch / ".greedy_trial.safetensors"

    def score_state(state) -> float:
        save_file(dict(state), str(trial))
        return evaluate(trial).get(metric, -math.inf)

    result = greedy_soup([str(inputs.checkpoints[i][1]) for i in order], score_state)
    trial.unlink(missing_ok=True)
    _save_atomic(result.state_dict, out_path)


def _merge_self_positioning(spec: MethodSpec, inputs: FusionInputs, out_path: Path) -> None:
    probe = importlib.import_module(PROBE_MODULE)
    if not inputs.probe_sources:
        raise InputError(f"fusion.{spec.name}", "self_positioning needs probe data", "configure training sources")
    merged, _ = probe.self_positioning_merge(
        load_file(str(inputs.base)), [str(p) for _, p in inputs.checkpoints], inputs.probe_sources,
        model_dir=inputs.model_folder, seed=inputs.seed, encoder_kwargs=inputs.encoder_settings, **spec.params)
    state = {key[len(ENCODER_PREFIX):]: value.contiguous() for key, value in merged.items()
             if key.startswith(ENCODER_PREFIX)}
    _save_atomic(state, out_path)


def _save_atomic(state: Mapping, out_path: Path) -> None:
    partial = out_path.with_name(f".{out_path.name}.tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(partial), metadata={"format": "pt"})
    os.chmod(partial, 0o644)
    os.replace(partial, out_path)


def run_fusion(inputs: FusionInputs, methods: Sequence[MethodSpec], evaluate: Evaluate, workdir: str | os.PathLike,
               metric: str = DEFAULT_METRIC, log: Callable[[str], None] = print,
               show_progress: bool = True) -> Leaderboard:
    """Score the base and every checkpoint, merge and score every method; candidates go to `workdir`.

    A progress bar (with ETA) counts the candidates scored: base, each checkpoint, each method.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    progress = tqdm(total=1 + len(inputs.checkpoints) + len(methods), desc="fusion candidates", unit="model",
                    disable=not show_progress)
    base = Candidate("base", "base", weights_path=str(inputs.base))
    base.metrics = evaluate(inputs.base)
    progress.update()
    singles = [Candidate(label, "checkpoint", weights_path=str(path)) for label, path in inputs.checkpoints]
    for single in singles:
        single.metrics = evaluate(Path(single.weights_path))
        progress.update()
    fused: list[Candidate] = []
    for spec in methods:
        candidate = Candidate(spec.name, "fused", spec.method, dict(spec.params))
        out_path = workdir / f"{_file_name(spec.name)}.safetensors"
        if spec.method == "self_positioning" and not self_positioning_available():
            candidate.note = "unavailable"
            log(f"[codiemb] fusion: {spec.name} skipped: {PROBE_MODULE} is not installed")
        else:
            log(f"[codiemb] fusion: merging {len(inputs.checkpoints)} checkpoints with {spec.name}")
            if spec.method == "greedy_soup":
                _merge_greedy(spec, inputs, out_path, singles, evaluate, metric, workdir)
            elif spec.method == "self_positioning":
                _merge_self_positioning(spec, inputs, out_path)
            else:
                _merge_registered(spec, inputs, out_path)
            candidate.weights_path = str(out_path)
            candidate.metrics = evaluate(out_path)
        fused.append(candidate)
        progress.update()
    progress.close()
    return Leaderboard([base] + singles + fused, metric)


def _file_name(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_.=" else "_" for ch in label)
