"""Fusion workflows: merge checkpoints into a scored leaderboard (`run_fusion`), or into one folder (`fuse`).

`run_fusion` (the CheckpointFusion callback): every candidate is a `.safetensors` file named like a
Hugging Face model: the base θ0, each collected checkpoint, and one merge per configured method.
`evaluate(path) -> {metric: value}` scores one file (the caller loads it into an encoder and runs the
validation suite); the leaderboard ranks candidates by one metric (default `val/avg`, higher is better).

Method entries: `{"method": NAME, "params": {...}, "weights": [...], "name": LABEL}` or just `NAME`.
NAME is a per-tensor method of `fusion.methods` (merged by the engine, `fusion.engine`, in row slices
where the method allows), `greedy_soup` (needs the checkpoints' scores) or `self_positioning` (learned
coefficients on a probe set, `workflows.probe.self_positioning_merge`).

`fuse` (`codiemb fuse`): open a base and models (folders, `.safetensors`, `.ckpt`), refuse inputs that
do not belong together, merge them in slices into a sentence-transformers folder that keeps the
template's pooling, normalisation and prompts, optionally score it, and write its model card; the
folder is written atomically.
"""

from __future__ import annotations

import difflib
import inspect
import json
import math
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from codiemb_pl.data.eval_sets import EvalSet
from codiemb_pl.errors import InputError
from codiemb_pl.fusion.compatibility import check_same_architecture, check_shares_base, drop_unshared_untrained_keys
from codiemb_pl.fusion.engine import Merge
from codiemb_pl.fusion.methods import MERGE_METHODS, DeltaNorms, check_method_params, merge_needs
from codiemb_pl.fusion.soup import greedy_soup
from codiemb_pl.fusion.sources import OpenedCheckpoint, open_checkpoint, transformer_folder
from codiemb_pl.fusion.writer import save_state_dict
from codiemb_pl.model.card import build_fused_model_card
from codiemb_pl.model.lora import check_lora_mix
from codiemb_pl.model.prompts import folder_prompt_settings, members_prompt_settings, write_prompt_settings
from codiemb_pl.storage.atomic import atomic_directory, atomic_write_text, remove_stale_temporaries
from codiemb_pl.storage.weight_checks import load_safetensors

DEFAULT_METRIC = "val/avg"
SCORED_METHODS = ("greedy_soup", "self_positioning")
ENCODER_PREFIX = "model."   # self_positioning_merge names tensors like TextEncoder.state_dict()
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
WEIGHT_INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")

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


def check_metric(metric: Any, tasks: Mapping[str, str], where: str) -> None:
    """`metric` must be one the validation sets `tasks` ({set name: "ir" | "sts"}) will give
    (`evaluation.suite.metric_names`); else one line with the nearest valid key."""
    from codiemb_pl.evaluation.suite import metric_names

    known = metric_names(tasks)
    if metric in known:
        return
    close = difflib.get_close_matches(str(metric), known, n=1, cutoff=0.6) or known[:1]
    sets = ", ".join(f"{name} ({task})" for name, task in tasks.items()) or "none"
    raise InputError(where, f"{metric!r} is not a metric the validation sets give (sets: {sets})",
                     f"did you mean {close[0]}? Use {', '.join(known[:3])} or val/<set>/<metric>" if close
                     else "configure data.val, then use val/avg, val/ir_avg, val/sts_avg or val/<set>/<metric>")


@dataclass
class Candidate:
    """One leaderboard row: what it is, where its weights are, and its validation metrics."""

    name: str
    kind: str                    # "base" | "checkpoint" | "fused"
    method: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    weights_path: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    weights: list[float] | None = None


def _score(candidate: Candidate, metric: str) -> float:
    value = candidate.metrics.get(metric, math.nan)
    return value if isinstance(value, (int, float)) and math.isfinite(value) else -math.inf


@dataclass
class Leaderboard:
    """Candidates ranked by `metric` (higher is better; rows without it last); `skipped`: merges not made
    ({label: why}, e.g. a soup of one checkpoint)."""

    candidates: list[Candidate]
    metric: str = DEFAULT_METRIC
    skipped: dict[str, str] = field(default_factory=dict)

    def ranked(self) -> list[Candidate]:
        return sorted(self.candidates, key=lambda c: _score(c, self.metric), reverse=True)

    def winner(self) -> Candidate | None:
        best = [c for c in self.ranked() if _score(c, self.metric) > -math.inf]
        return best[0] if best else None

    def notes(self) -> list[str]:
        """What a reader of the table must not miss: the untrained base winning, merges that were skipped."""
        winner, notes = self.winner(), []
        if winner is not None and winner.kind == "base":
            notes.append(f"The base model (θ0, before any training) scores best by {self.metric}: no checkpoint and "
                         "no merge beat it, so the winner is the base model itself, unchanged. Training did not "
                         "improve these validation sets: check the learning rate, the training data and the "
                         "validation sets, or train longer.")
        notes += [f"Skipped {name}: {why}." for name, why in self.skipped.items()]
        return notes

    def table_rows(self) -> list[dict[str, Any]]:
        """One row per candidate, ranked: `rank`, `candidate`, `kind` and its metrics (a W&B table's rows)."""
        return [{"rank": rank, "candidate": c.name, "kind": c.kind, **c.metrics} for rank, c in enumerate(self.ranked(), 1)]

    def metric_names(self) -> list[str]:
        names = sorted({m for c in self.candidates for m in c.metrics})
        leading = [m for m in (self.metric, "val/ir_avg", "val/sts_avg") if m in names]
        return list(dict.fromkeys(leading + names))

    def to_json(self) -> str:
        winner = self.winner()
        data = {"metric": self.metric, "winner": getattr(winner, "name", None),
                "base_won": winner is not None and winner.kind == "base", "ranking": [asdict(c) for c in self.ranked()],
                "skipped": dict(self.skipped), "notes": self.notes()}
        return json.dumps(data, indent=2, default=str, allow_nan=True) + "\n"

    def _cells(self, candidate: Candidate, metrics: list[str]) -> list[str]:
        values = [f"{candidate.metrics[m]:.4f}" if m in candidate.metrics else "-" for m in metrics]
        return [candidate.name, candidate.kind] + values

    def to_markdown(self) -> str:
        metrics = self.metric_names()
        lines = ["| rank | candidate | kind | " + " | ".join(metrics) + " |",
                 "|---:|---|---|" + "---:|" * len(metrics)]
        for rank, candidate in enumerate(self.ranked(), 1):
            lines.append(f"| {rank} | " + " | ".join(self._cells(candidate, metrics)) + " |")
        return "\n".join(lines + [""] + [f"**Note:** {note}" for note in self.notes()]).rstrip() + "\n"

    def to_text(self) -> str:
        metrics = self.metric_names()
        headers = ["#", "candidate", "kind"] + [m.removeprefix("val/") for m in metrics]
        rows = [[str(rank)] + self._cells(c, metrics) for rank, c in enumerate(self.ranked(), 1)]
        widths = [max(len(row[i]) for row in rows + [headers]) for i in range(len(headers))]
        align = lambda row: "  ".join(cell.ljust(w) if i < 3 else cell.rjust(w)  # noqa: E731
                                      for i, (cell, w) in enumerate(zip(row, widths)))
        return "\n".join([align(headers), "-" * len(align(headers))] + [align(row) for row in rows]
                         + [f"note: {note}" for note in self.notes()])


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
    order = sorted(range(len(singles)), key=lambda i: _score(singles[i], metric), reverse=True)
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


def _file_name(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_.=" else "_" for ch in label)


def winner_card(board: Leaderboard, inputs: FusionInputs, candidate: Candidate | None = None,
                **encoder_fields: Any) -> str:
    """The model card of the leaderboard's winner (or of `candidate`, exported by name): how it was made,
    from which snapshots, and every score."""
    winner = candidate or board.winner()
    if winner is None:
        raise InputError("fusion", "no candidate has a score", "check the validation sets")
    picked = winner is board.winner()
    labels = [label for label, _ in inputs.checkpoints]
    if winner.kind == "fused":
        method, merged = winner.method, labels
    else:
        method, merged = f"none: the {winner.kind} `{winner.name}`" + (" scored best" if picked else ""), [winner.name]
    source = (f"the validation sets (`{board.metric}` picked `{winner.name}` among {len(board.candidates)} candidates)"
              if picked else f"the validation sets (`{winner.name}` exported by name)" if winner.metrics else "")
    return build_fused_model_card(
        base_model=inputs.model_folder, method=method, inputs=merged, weights=winner.weights,
        params=winner.params, scores=winner.metrics or None, scores_source=source,
        leaderboard=board.to_markdown() if winner.metrics else "", **encoder_fields)


# ----------------------------------------------------------------------------------------------------
# score, merge, choose, export: one path for CheckpointFusion, sweeps and BOOM
# ----------------------------------------------------------------------------------------------------

MERGE_MANIFEST = "merge.json"   # beside an exported merge: how it was made (sweeps, BOOM)


@dataclass
class FusionOutcome:
    """What `fuse_and_export` did: the leaderboard, the candidate chosen for export (None: nothing had a score)
    and the folder it was exported to (None: nothing exported)."""

    board: Leaderboard
    chosen: Candidate | None = None
    exported: Path | None = None


def fuse_and_export(inputs: FusionInputs, methods: Sequence[MethodSpec], encoder: Any, *,
                    sets: Sequence[EvalSet], eval_batch_size: int, metric: str, workdir: str | os.PathLike,
                    heading: str, export_folder: str | os.PathLike | None, export: str | None = None,
                    merge_facts: Mapping[str, Any] | None = None, prompt_folders: Sequence[tuple[str, Path]] = (),
                    log: Callable[[str], None] = print, show: Callable[[str], None] | None = None,
                    prefix: str = "[codiemb] fusion:", show_progress: bool = True) -> FusionOutcome:
    """Score θ0 and the members with `encoder` on `sets` (none: nothing scored), merge them with every method
    (`run_fusion`, candidates in `workdir`), show the leaderboard under `heading`, choose the candidate (`export`
    by name, else the winner) and export it to `export_folder` (None: no export) with its model card, the
    members' prompt settings (`prompt_folders`: (name, exported folder), when given) and `merge.json`
    (`merge_record` + `merge_facts`, when given). `encoder` is left holding the last weights it took."""
    def evaluate(path: Path) -> dict[str, float]:
        if not sets:
            return {}
        from codiemb_pl.evaluation.suite import evaluate_encoder, flat_metrics
        from codiemb_pl.workflows.encoders import load_weights

        load_weights(encoder, path)
        per_set, summary = evaluate_encoder(encoder, list(sets), batch_size=eval_batch_size)
        return flat_metrics(per_set, summary)

    board = run_fusion(inputs, methods, evaluate, workdir, metric, log=log, show_progress=show_progress)
    (show or log)(f"\n{heading}\n{board.to_text()}")
    outcome = FusionOutcome(board, chosen_candidate(board, export, log, prefix))
    if outcome.chosen is not None and export_folder is not None:
        outcome.exported = export_candidate(board, inputs, encoder, outcome.chosen, Path(export_folder),
                                            merge_facts=merge_facts, prompt_folders=prompt_folders,
                                            log=log, prefix=prefix)
    return outcome


def chosen_candidate(board: Leaderboard, export: str | None, log: Callable[[str], None] = print,
                     prefix: str = "[codiemb] fusion:") -> Candidate | None:
    """The candidate named `export`, else the winner (None: nothing scored). A named merge that was skipped
    because it would give the only member back (`Leaderboard.skipped`) is that member."""
    if export is None:
        return board.winner()
    if export in board.skipped:
        member = next(c for c in board.candidates if c.kind == "checkpoint")
        log(f"{prefix} fusion.export {export} was skipped ({board.skipped[export]}): exporting the member "
            f"{member.name} itself")
        return member
    return next(c for c in board.candidates if c.name == export)


def export_candidate(board: Leaderboard, inputs: FusionInputs, encoder: Any, candidate: Candidate, folder: Path, *,
                     merge_facts: Mapping[str, Any] | None = None, prompt_folders: Sequence[tuple[str, Path]] = (),
                     log: Callable[[str], None] = print, prefix: str = "[codiemb] fusion:") -> Path:
    """`candidate` as a sentence-transformers folder (written atomically) with its model card (`winner_card`);
    with `prompt_folders`, the prompt settings of the first member folder that declares some
    (`prompts.members_prompt_settings`: scoring ran with include_prompt False, the export takes the members'
    setting); with `merge_facts`, `merge.json` (`merge_record`: method, θ0, members, weights, scores, facts)."""
    from codiemb_pl.model.card import encoder_card_fields
    from codiemb_pl.model.prompts import apply_prompt_settings
    from codiemb_pl.workflows.encoders import load_weights

    load_weights(encoder, candidate.weights_path)
    if prompt_folders:
        settings, notes = members_prompt_settings(
            [(name, folder_prompt_settings(path) if Path(path).is_dir() else None) for name, path in prompt_folders])
        if settings is not None:
            apply_prompt_settings(encoder, settings)
        for note in notes:
            log(f"{prefix} {note}")
    card = winner_card(board, inputs, candidate=candidate, model_path=str(folder), **encoder_card_fields(encoder))
    if merge_facts is None:
        encoder.save(folder, model_card=card)
        return folder
    models = {"fused": [path for _, path in inputs.checkpoints], "checkpoint": [candidate.weights_path]}
    record = merge_record(candidate.method or candidate.kind, inputs.model_folder, models.get(candidate.kind, []),
                          candidate.weights, name=candidate.name, params=candidate.params, metric=board.metric,
                          metrics=candidate.metrics, **merge_facts)
    with atomic_directory(folder) as staging:
        encoder.save(staging, model_card=card)
        atomic_write_text(staging / MERGE_MANIFEST, json.dumps(record, indent=2, default=str) + "\n")
    return folder


def merge_record(method: str, base: str, models: Sequence[str | os.PathLike], weights: Sequence[float] | None = None,
                 **facts: Any) -> dict[str, Any]:
    """What an exported folder's merge.json says: the method, θ0, the members' paths, their weights, `facts`."""
    from codiemb_pl.paths import resolve_location

    return {"method": method, "base": str(base),
            "models": [str(Path(resolve_location(str(path))).resolve()) for path in models],
            "weights": None if weights is None else list(weights), **facts}


def write_leaderboard(folder: str | os.PathLike, board: Leaderboard, title: str,
                      extra: Mapping[str, Any] | None = None) -> None:
    """`leaderboard.json` (the board, plus `extra` facts) and `leaderboard.md` (under `# TITLE (by `metric`)`),
    each written atomically."""
    record = board.to_json() if not extra else json.dumps({**json.loads(board.to_json()), **extra}, indent=2,
                                                          default=str) + "\n"
    atomic_write_text(Path(folder) / "leaderboard.md", f"# {title} (by `{board.metric}`)\n\n" + board.to_markdown())
    atomic_write_text(Path(folder) / "leaderboard.json", record)


# ----------------------------------------------------------------------------------------------------
# one merge into a sentence-transformers folder (`codiemb fuse`)
# ----------------------------------------------------------------------------------------------------

def prior_weights(models: Sequence[Mapping[str, Any]]) -> list[float] | None:
    """Per-model `weight`s ([{path, weight}]): None when none is given, 1.0 where one is missing."""
    weights = [model.get("weight") for model in models]
    if all(weight is None for weight in weights):
        return None
    return [1.0 if weight is None else float(weight) for weight in weights]


def _ignore_weights(_: str, names: list[str]) -> list[str]:
    return [n for n in names if n.endswith(WEIGHT_FILE_SUFFIXES) or n in WEIGHT_INDEX_NAMES or n == "README.md"]


def write_template(base: OpenedCheckpoint, template: str | None, staging: Path) -> Path:
    """Put the non-weight files of the output into `staging`; returns the folder that takes the weights."""
    folder = Path(template or base.model_folder or "")
    if not (template or base.model_folder) or not (folder / "config.json").is_file() and \
            not (folder / "modules.json").is_file():
        raise InputError(base.path, "cannot tell which model folder the output's config and tokenizer come from",
                         "pass --template MODEL_FOLDER (or `template:` in the recipe)")
    if (folder / "modules.json").is_file() and not base.encoder_settings:
        shutil.copytree(folder, staging, ignore=_ignore_weights, dirs_exist_ok=True)
        return transformer_folder(staging)
    from codiemb_pl.model.encoder import TextEncoder  # only here: loading transformers costs memory

    encoder = TextEncoder(str(folder), **base.encoder_settings)   # adds the sentence-transformers files
    encoder.save(staging / ".template")
    del encoder
    for item in (staging / ".template").iterdir():
        if item.name not in ("model.safetensors", "README.md"):
            item.rename(staging / item.name)
    shutil.rmtree(staging / ".template")
    return staging


def keep_member_prompts(members: Sequence[OpenedCheckpoint], staging: Path, log: Callable[[str], None]) -> None:
    """Give the output folder in `staging` the prompt settings of its members (the template is often the bare
    base model, which knows no training instruction and pools prompts). Members that are not
    sentence-transformers folders (`.ckpt`, `.safetensors`) declare none; the template's settings then stay."""
    settings, notes = members_prompt_settings(
        [(member.path, folder_prompt_settings(member.path) if Path(member.path).is_dir() else None)
         for member in members])
    for note in notes:
        log(f"[codiemb fuse] {note}")
    if settings is not None:
        write_prompt_settings(staging, settings)
    elif any(not Path(member.path).is_dir() for member in members) and not _prompt_fields(staging).get("prompts"):
        log("[codiemb fuse] note: .ckpt / .safetensors files do not record prompts and the template declares none, "
            "so the output has no prompts; if the members were trained with instructions, pass --template one of "
            "their exported folders")


def _prompt_fields(folder: Path) -> dict[str, Any]:
    """The prompts a sentence-transformers folder declares (for the card), read without loading the model."""
    settings = folder / "config_sentence_transformers.json"
    if not settings.is_file():
        return {}
    config = json.loads(settings.read_text(encoding="utf-8"))
    return {"prompts": dict(config.get("prompts") or {}), "default_prompt_name": config.get("default_prompt_name")}


@dataclass
class FuseResult:
    """Where `fuse` wrote the merge and, when it scored it, the per-set and summary metrics."""

    output: Path
    per_set: dict[str, dict[str, float]] = field(default_factory=dict)
    summary: dict[str, float] = field(default_factory=dict)


def fuse(base: str | os.PathLike, models: Sequence[Mapping[str, Any]], method: str, output: str | os.PathLike, *,
         params: Mapping[str, Any] | None = None, template: str | None = None, seed: int = 0,
         eval_sets: Sequence[EvalSet] = (), eval_batch_size: int = 64,
         mixed_lora: bool = False, log: Callable[[str], None] = print) -> FuseResult:
    """Merge `models` ([{path, weight}]) against `base` with `method` into the folder `output`.

    Inputs whose config.json architecture, tensor names or shapes differ from the base, or that are too
    far from it to be fine-tuned copies, are refused before anything is written (untrained tensors that
    only some inputs carry are left out). The folder takes the prompts and `include_prompt` of the members
    (`prompts.members_prompt_settings`: the first member folder that declares prompts; a line when members
    differ), else the template's. With `eval_sets` the merged folder is scored before it
    is moved into place; the scores go into its model card (README.md) and the result.
    """
    params = dict(params or {})
    opened_base = open_checkpoint(base)
    opened = [open_checkpoint(model["path"]) for model in models]
    check_lora_mix([m.path for m in opened], [m.lora for m in opened], allow_mixed=mixed_lora)
    check_same_architecture(opened_base, opened)
    base_source, *model_sources = drop_unshared_untrained_keys([opened_base.source] + [m.source for m in opened])
    weights = prior_weights(models)
    merge = Merge(base_source, model_sources, method, params, weights=weights, seed=int(seed))
    check_shares_base(base_source, model_sources, merge.keys, [m.path for m in opened])
    result = FuseResult(Path(output))
    remove_stale_temporaries(Path(output).parent, {Path(output).name})   # a killed earlier write of this output
    with atomic_directory(output) as staging:
        weights_folder = write_template(opened_base, template, staging)
        keep_member_prompts(opened, staging, log)
        merge.write(weights_folder / "model.safetensors", metadata={"codiemb_fuse_method": method})
        fields, scores = _prompt_fields(staging), None
        if eval_sets:   # the encoder and the suite are imported only to score (they cost memory)
            from codiemb_pl.evaluation.suite import evaluate_encoder, flat_metrics
            from codiemb_pl.model.encoder import TextEncoder

            encoder = TextEncoder.load(staging)
            result.per_set, result.summary = evaluate_encoder(encoder, list(eval_sets), batch_size=eval_batch_size)
            scores = flat_metrics(result.per_set, result.summary)
            fields = {"pooling": encoder.pooling, "normalize": encoder.normalize,
                      "max_seq_length": encoder.max_seq_length, "embedding_dim": encoder.embedding_dim, **fields}
            del encoder
        card = build_fused_model_card(
            base_model=str(base), method=method, inputs=[str(model["path"]) for model in models], weights=weights,
            params=params, scores=scores,
            scores_source="the evaluation sets of the fuse recipe", model_path=str(output), **fields)
        atomic_write_text(staging / "README.md", card)
    return result
