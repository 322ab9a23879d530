"""Score every fusion candidate (`run_fusion`, the CheckpointFusion callback's and the sweep's path).

Every candidate is a `.safetensors` file named like a Hugging Face model: the base θ0, each collected
checkpoint, and one merge per configured method (`settings.MethodSpec`). `evaluate(path) -> {metric: value}`
scores one file (the caller loads it into an encoder and runs the validation suite); the result is a
`leaderboard.Leaderboard`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from codiemb_pl.errors import InputError
from codiemb_pl.fusion.engine import Merge
from codiemb_pl.fusion.soup import greedy_soup
from codiemb_pl.fusion.writer import save_state_dict
from codiemb_pl.storage.weight_checks import load_safetensors
from codiemb_pl.workflows.fusion.leaderboard import DEFAULT_METRIC, Candidate, Leaderboard
from codiemb_pl.workflows.fusion.settings import MethodSpec, single_member_skip

ENCODER_PREFIX = "model."   # self_positioning_merge names tensors like TextEncoder.state_dict()
Evaluate = Callable[[Path], dict[str, float]]


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
    Merge(inputs.base, [path for _, path in inputs.checkpoints], spec.method, spec.params, weights=spec.weights,
          seed=inputs.seed).write(out_path)


def _merge_greedy(inputs: FusionInputs, out_path: Path, singles: list[Candidate], evaluate: Evaluate, metric: str,
                  scratch: Path) -> None:
    order = sorted(range(len(singles)), key=lambda i: singles[i].score(metric), reverse=True)
    trial = scratch / ".greedy_trial.safetensors"

    def score_state(state) -> float:
        save_state_dict(state, trial)
        return evaluate(trial).get(metric, -math.inf)

    result = greedy_soup([inputs.checkpoints[i][1] for i in order], score_state)
    trial.unlink(missing_ok=True)
    save_state_dict(result.state_dict, out_path)


def _merge_self_positioning(spec: MethodSpec, inputs: FusionInputs, out_path: Path) -> None:
    from codiemb_pl.workflows.probe import self_positioning_merge

    if not inputs.probe_sources:
        raise InputError(f"fusion.{spec.name}", "self_positioning needs probe data", "configure training sources")
    merged, _ = self_positioning_merge(
        load_safetensors(inputs.base), [str(p) for _, p in inputs.checkpoints], inputs.probe_sources,
        model_dir=inputs.model_folder, seed=inputs.seed, encoder_kwargs=inputs.encoder_settings, **spec.params)
    save_state_dict({key[len(ENCODER_PREFIX):]: value for key, value in merged.items()
                     if key.startswith(ENCODER_PREFIX)}, out_path)


def evaluate_at_trained_widths(encoder: Any, sets: Sequence[Any], batch_size: int
                               ) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """The validation suite on `sets`, at full width and (`metric@m`) at each Matryoshka width below it that the
    encoder was trained at (`encoder.matryoshka_dims`), from one encoding pass: what validation logs."""
    from codiemb_pl.evaluation.suite import evaluate_encoder
    from codiemb_pl.evaluation.variants import smaller_widths, variant_metrics

    variants = [(dim, "float32") for dim in smaller_widths(getattr(encoder, "matryoshka_dims", None) or (),
                                                            encoder.embedding_dim)]
    extra = (lambda vset, embeddings: variant_metrics(vset, embeddings, variants)) if variants else None
    return evaluate_encoder(encoder, list(sets), batch_size=batch_size, extra_metrics=extra)


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
    skipped: dict[str, str] = {}
    for spec in methods:
        why = single_member_skip(spec) if len(inputs.checkpoints) == 1 else None
        if why is not None:
            skipped[spec.name] = f"one checkpoint only, and {why}"
            log(f"[codiemb] fusion: skipped {spec.name}: {skipped[spec.name]}")
            progress.update()
            continue
        candidate = Candidate(spec.name, "fused", spec.method, dict(spec.params), weights=spec.weights)
        out_path = workdir / f"{_file_name(spec.name)}.safetensors"
        log(f"[codiemb] fusion: merging {len(inputs.checkpoints)} checkpoints with {spec.name}")
        if spec.method == "greedy_soup":
            _merge_greedy(inputs, out_path, singles, evaluate, metric, workdir)
        elif spec.method == "self_positioning":
            _merge_self_positioning(spec, inputs, out_path)
        else:
            _merge_registered(spec, inputs, out_path)
        candidate.weights_path = str(out_path)
        candidate.metrics = evaluate(out_path)
        fused.append(candidate)
        progress.update()
    progress.close()
    return Leaderboard([base] + singles + fused, metric, skipped)


def _file_name(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_.=" else "_" for ch in label)
