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

import json
import math
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from tqdm.auto import tqdm

from codiemb_pl.atomic import atomic_directory, atomic_write_text, remove_stale_temporaries
from codiemb_pl.data.validation import ValidationSet
from codiemb_pl.errors import InputError
from codiemb_pl.fusion.compatibility import check_same_architecture, check_shares_base, drop_unshared_untrained_keys
from codiemb_pl.fusion.engine import Merge
from codiemb_pl.fusion.methods import MERGE_METHODS, check_method_params
from codiemb_pl.fusion.soup import greedy_soup
from codiemb_pl.fusion.sources import OpenedCheckpoint, open_checkpoint, transformer_folder
from codiemb_pl.lora import check_lora_mix
from codiemb_pl.fusion.writer import save_state_dict
from codiemb_pl.model_card import build_fused_model_card

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
    weights: list[float] | None = None


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
        values = [f"{candidate.metrics[m]:.4f}" if m in candidate.metrics else "-" for m in metrics]
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
        load_file(str(inputs.base)), [str(p) for _, p in inputs.checkpoints], inputs.probe_sources,
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
    for spec in methods:
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
    return Leaderboard([base] + singles + fused, metric)


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
    from codiemb_pl.encoder import TextEncoder   # only here: loading transformers costs memory

    encoder = TextEncoder(str(folder), **base.encoder_settings)   # adds the sentence-transformers files
    encoder.save(staging / ".template")
    del encoder
    for item in (staging / ".template").iterdir():
        if item.name not in ("model.safetensors", "README.md"):
            item.rename(staging / item.name)
    shutil.rmtree(staging / ".template")
    return staging


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
         validation_sets: Sequence[ValidationSet] = (), eval_batch_size: int = 64,
         mixed_lora: bool = False) -> FuseResult:
    """Merge `models` ([{path, weight}]) against `base` with `method` into the folder `output`.

    Inputs whose config.json architecture, tensor names or shapes differ from the base, or that are too
    far from it to be fine-tuned copies, are refused before anything is written (untrained tensors that
    only some inputs carry are left out). With `validation_sets` the merged folder is scored before it
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
        merge.write(weights_folder / "model.safetensors", metadata={"codiemb_fuse_method": method})
        fields, scores = _prompt_fields(staging), None
        if validation_sets:   # the encoder and the suite are imported only to score (they cost memory)
            from codiemb_pl.encoder import TextEncoder
            from codiemb_pl.evaluation.suite import evaluate_encoder, flat_metrics

            encoder = TextEncoder.load(staging)
            result.per_set, result.summary = evaluate_encoder(encoder, list(validation_sets), batch_size=eval_batch_size)
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
