"""The experiment suite of issue #5: one command, resumable, every run cached by its config.

    python benchmarks/experiments.py                          # the full suite (44 min measured on 2 idle cores)
    python benchmarks/experiments.py --only base codiemb      # some runs (their dependencies are built too)
    python benchmarks/experiments.py --extra-sts sick=data/sick_test.jsonl --extra-ir nfcorpus=data/nfcorpus
    python benchmarks/experiments.py --quick [--model DIR]    # verification only: a few steps, subsampled data

Runs (`experiment_runs.suite_runs`): base; IR only; STS only (CoDiEmb loss, CoSENT); naive joint (`mixed`);
batch shuffling with one InfoNCE (BOOM's baseline); CoDiEmb; CoDiEmb + delta-guided fusion / uniform soup /
TIES / Self Positioning of its snapshots; BOOM. Training goes through `codiemb fit` (in-process, a generated
YAML per run in the workdir), hard negatives through `codiemb mine-negatives` (once, cached), merges
through `codiemb fuse`, Self Positioning through `workflows.probe.self_positioning_merge`, BOOM's Multi-SLERP
through `workflows.boom.merge_exports`, scores through `workflows.evaluation.evaluate_sets` (`codiemb evaluate`'s).

`--results` (JSON) maps each run's config key to {name, config, sets: {set: {key, metrics, seconds}}, ...}
and is rewritten atomically after every run; a later invocation skips every finished (run, set) pair and
re-scores only the sets a run lacks. Trained models, snapshots and merges live in `--workdir` (not
committed); they are rebuilt only when a result needs them. `--report` gets the markdown table, target
checks, configs and seeds, and `results.png` beside it. A hand-written analysis between the
`<!-- analysis:begin -->` / `<!-- analysis:end -->` markers of an existing report is kept.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

BENCHMARKS = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS.parent
for _path in (str(REPO_ROOT), str(BENCHMARKS)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import yaml  # noqa: E402

from experiment_runs import (FULL, HEADLINE, QUICK, RUN_NAMES, SEED, DEFAULT_MODEL, Budgets, RunSpec,  # noqa: E402
                             boom_subsets, config_key, eval_seconds, eval_set_config, mining_config, run_config,
                             scaled, self_positioning_seconds, suite_runs, training_seconds, training_steps,
                             unit_config)

from codiemb_pl.atomic import atomic_write_text  # noqa: E402
from codiemb_pl.cli import main as codiemb_main  # noqa: E402
from codiemb_pl.data.sources import SourceConfig, load_training_records  # noqa: E402
from codiemb_pl.data.validation import ValidationSet  # noqa: E402
from codiemb_pl.evaluation.suite import summary_metrics  # noqa: E402
from codiemb_pl.paths import resolve_location  # noqa: E402
from codiemb_pl.workflows.validation import build_validation_sets  # noqa: E402

ANALYSIS_BEGIN, ANALYSIS_END = "<!-- analysis:begin -->", "<!-- analysis:end -->"
QUICK_DIR = REPO_ROOT / "runs" / "experiments-quick"


def log(message: str) -> None:
    print(f"[experiments] {message}", flush=True)


def codiemb(args: list[str]) -> int:
    """Run one `codiemb` command in-process (this script's own flags hidden from LightningCLI)."""
    saved = sys.argv
    sys.argv = [saved[0] if saved else "codiemb"]
    try:
        return codiemb_main(args)
    finally:
        sys.argv = saved


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------------------
# Results file

class Results:
    """`results.json`: {run key: entry}; saved atomically after every change."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, dict[str, Any]] = json.loads(path.read_text("utf-8")) if path.is_file() else {}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(self.entries, indent=1, sort_keys=True, allow_nan=True) + "\n")

    def missing_sets(self, key: str, set_keys: dict[str, str]) -> list[str]:
        """Names of the evaluation sets this run has no current score for."""
        have = self.entries.get(key, {}).get("sets", {})
        return [name for name, set_key in set_keys.items() if have.get(name, {}).get("key") != set_key]


# ---------------------------------------------------------------------------------------------------------
# The suite

class Suite:
    """Builds (trains / merges) and scores the runs, caching models in the workdir and scores in Results."""

    def __init__(self, args: argparse.Namespace, budgets: Budgets):
        self.args, self.budgets = args, budgets
        self.model = args.model
        self.model_folder = resolve_location(args.model)
        self.data = Path(args.data).resolve()
        self.workdir = Path(args.workdir).resolve()
        self.results = Results(Path(args.results))
        self.specs = {spec.name: spec for spec in suite_runs(budgets)}
        self.set_configs = self.evaluation_set_configs()
        self.set_keys = {c["name"]: config_key(c) for c in self.set_configs}
        self._sets: Optional[dict[str, ValidationSet]] = None
        self._sizes: Optional[tuple[int, int]] = None

    # -- configs and keys ---------------------------------------------------------------------------------
    def evaluation_set_configs(self) -> list[dict[str, Any]]:
        configs = [eval_set_config("stsb_test", "sts", "sts/stsb/test.jsonl", self.budgets),
                   eval_set_config("scifact_test", "ir", "ir/scifact", self.budgets)]
        for flag, task in ((self.args.extra_sts, "sts"), (self.args.extra_ir, "ir")):
            for value in flag:
                name, _, path = value.partition("=")
                if not name or not path:
                    raise SystemExit(f"expected NAME=PATH, got {value!r}")
                config = eval_set_config(name, task, str(Path(path).resolve()), self.budgets)
                if task == "sts":
                    config["score_range"] = None   # auto: [0, 1] if every score lies in it, else [0, 5]
                configs.append(config)
        names = [c["name"] for c in configs]
        if len(set(names)) != len(names):
            raise SystemExit(f"evaluation set names must be unique, got {names}")
        return configs

    def key(self, spec: RunSpec) -> str:
        return config_key(run_config(spec, self.model, self.budgets, self.specs))

    def data_path(self, relative: str) -> Path:
        path = Path(relative)
        return path if path.is_absolute() else self.data / path

    # -- data -----------------------------------------------------------------------------------------------
    def sets(self) -> dict[str, ValidationSet]:
        if self._sets is None:
            sources = [SourceConfig(name=c["name"], task="sts", path=str(self.data_path(c["path"])),
                                    score_range=c["score_range"], max_samples=c["max_samples"]) if c["task"] == "sts"
                       else SourceConfig(name=c["name"], task="ir", path=str(self.data_path(c["path"])),
                                         split=c["split"], max_samples=c["max_queries"]) for c in self.set_configs]
            self._sets = {vset.name: vset for vset in build_validation_sets(sources, where="evaluation sets")}
        return self._sets

    def training_sizes(self) -> tuple[int, int]:
        """(SciFact train queries, STS-B train pairs) after the budget's caps."""
        if self._sizes is not None:
            return self._sizes
        budget = self.budgets.train
        n_ir = len(load_training_records(SourceConfig(name="scifact", task="ir", path=str(self.data / "ir/scifact"),
                                                      split="train")))
        n_sts = sum(1 for line in (self.data / "sts/stsb/train.jsonl").open(encoding="utf-8") if line.strip())
        self._sizes = (min(n_ir, budget.ir_max_samples or n_ir), min(n_sts, budget.sts_max_samples or n_sts))
        return self._sizes

    def mined_negatives(self) -> Path:
        """SciFact train with hard negatives mined by the base model (positives excluded), cached by config."""
        config = mining_config(self.model, self.budgets)
        path = self.workdir / "mined" / f"scifact_train_{config_key(config)}.jsonl"
        if path.is_file():
            return path
        mining = self.budgets.mining
        args = ["mine-negatives", str(self.data / "ir/scifact"), "--split", "train", "--model", self.model,
                "--output", str(path), "--range", *map(str, mining.rank_range),
                "--num-negatives", str(mining.num_negatives), "--no-progress"]
        args += ["--no-margin"] if mining.margin is None else ["--margin", str(mining.margin)]
        if mining.max_seq_length:
            args += ["--max-seq-length", str(mining.max_seq_length)]
        log(f"mining hard negatives: codiemb {' '.join(args)}")
        start = time.perf_counter()
        if codiemb(args) != 0:
            raise SystemExit("codiemb mine-negatives failed (see above)")
        log(f"mined in {time.perf_counter() - start:.0f} s -> {path}")
        return path

    def train_sources(self, unit: dict[str, Any], folder: Optional[Path] = None) -> list[dict[str, Any]]:
        """`data.train` entries of a training unit: caps are seeded random subsets (`max_samples` + `seed`);
        a BOOM member's seeded subset of them is written to `folder/data` (`workflows.boom`)."""
        budget, subset = self.budgets.train, unit.get("subset")
        sources = []
        for task, name, cap in (("ir", "scifact", budget.ir_max_samples), ("sts", "stsb", budget.sts_max_samples)):
            if task not in unit["tasks"]:
                continue
            entry: dict[str, Any] = {"name": name, "task": task}
            if task == "ir":
                entry.update(path=str(self.mined_negatives()), format="jsonl")
            else:
                entry.update(path=str(self.data / "sts/stsb/train.jsonl"), score_range=[0, 5])
            if cap:
                entry.update(max_samples=cap, seed=SEED)
            sources.append(entry)
        if subset:
            from codiemb_pl.workflows.boom import source_dict, write_subset_sources

            if folder is None:
                raise ValueError("a BOOM member's subset needs its unit folder")
            written = write_subset_sources([SourceConfig(**entry) for entry in sources], subset["fraction"],
                                           subset["seed"], folder / "data")
            sources = [source_dict(source) for source in written]
        return sources

    # -- training -------------------------------------------------------------------------------------------
    def fit_config(self, unit: dict[str, Any], folder: Path) -> dict[str, Any]:
        """The generated `codiemb fit` YAML of one training unit."""
        budget = self.budgets.train
        callbacks: list[dict[str, Any]] = [{"class_path": "codiemb_pl.callbacks.ExportEncoder",
                                            "init_args": {"dirpath": str(folder / "model"), "from_best": False}}]
        if unit.get("snapshots"):
            steps = training_steps(unit, budget, *self.training_sizes())
            callbacks.append({"class_path": "codiemb_pl.callbacks.CheckpointFusion", "init_args": {
                "dirpath": str(folder / "fusion"), "methods": [], "collect": ["last"], "export": False,
                "every_n_steps": max(1, steps // unit["snapshots"])}})
        return {
            "seed_everything": SEED,
            "trainer": {"accelerator": "cpu", "devices": 1, "precision": "32-true", "max_epochs": budget.epochs,
                        "max_steps": budget.max_steps, "log_every_n_steps": 10, "num_sanity_val_steps": 0,
                        "enable_checkpointing": False, "enable_progress_bar": False,
                        "enable_model_summary": False, "default_root_dir": str(folder),
                        "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                   "init_args": {"save_dir": str(folder), "name": "logs"}},
                        "callbacks": callbacks},
            "model": {"model_name_or_path": self.model, "ir_temperature": budget.ir_temperature, "lr": budget.lr,
                      "warmup_ratio": budget.warmup_ratio, "weight_decay": 0.0,
                      "sts_objective": unit["sts_objective"], "length_buckets": 2},
            "data": {"policy": unit["policy"], "ir_batch_size": budget.ir_batch_size,
                     "sts_batch_size": budget.sts_batch_size, "n_positives": budget.n_positives,
                     "n_negatives": budget.n_negatives, "max_query_length": budget.max_query_length,
                     "max_passage_length": budget.max_passage_length, "max_sts_length": budget.max_sts_length,
                     "seed": SEED, "train": self.train_sources(unit, folder)},
        }

    def train_unit(self, unit: dict[str, Any]) -> Path:
        """Fit one training unit unless its export exists; returns the unit folder (model/, fusion/)."""
        folder = self.workdir / "train" / config_key(unit)
        if (folder / "model" / "modules.json").is_file():
            return folder
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "unit.json", json.dumps(unit, indent=1, sort_keys=True) + "\n")
        config_path = folder / "fit.yaml"
        atomic_write_text(config_path, yaml.safe_dump(self.fit_config(unit, folder), sort_keys=False))
        log(f"training {config_key(unit)}: codiemb fit --config {config_path}")
        start = time.perf_counter()
        if codiemb(["fit", "--config", str(config_path)]) != 0 or not (folder / "model" / "modules.json").is_file():
            raise SystemExit(f"training failed: {config_path}")
        log(f"trained {config_key(unit)} in {time.perf_counter() - start:.0f} s")
        return folder

    # -- building a run's model ---------------------------------------------------------------------------
    def build(self, spec: RunSpec, key: str) -> tuple[Path, dict[str, Any]]:
        """The model folder of a run (trained / merged now or reused) and facts about it."""
        if spec.kind == "base":
            return Path(self.model_folder), {}
        if spec.kind == "train":
            unit = unit_config(self.model, self.budgets, spec.train)
            folder = self.train_unit(unit)
            return folder / "model", {"unit": config_key(unit),
                                      "steps": training_steps(unit, self.budgets.train, *self.training_sizes())}
        output = self.workdir / "merged" / key
        if spec.kind == "boom":
            return self.build_boom(spec, output)
        parent = self.train_unit(unit_config(self.model, self.budgets, self.specs[spec.parent].train))
        snapshots = sorted((parent / "fusion" / "snapshots").glob("step*.safetensors"))
        info: dict[str, Any] = {"snapshots": [p.stem for p in snapshots]}
        if (output / "modules.json").is_file():
            return output, info
        base = parent / "fusion" / "snapshots" / "base.safetensors"
        if spec.kind == "merge":
            args = ["fuse", "--base", str(base), "--method", str(spec.method), "--output", str(output),
                    "--template", self.model_folder, "--seed", str(SEED)]
            for snapshot in snapshots:
                args += ["--model", str(snapshot)]
            for name, value in spec.params.items():
                args += ["--param", f"{name}={value}"]
            if codiemb(args) != 0:
                raise SystemExit(f"codiemb {' '.join(args)} failed")
            return output, info
        info.update(self.build_self_positioning(spec, base, snapshots, output))
        return output, info

    def build_self_positioning(self, spec: RunSpec, base: Path, snapshots: list[Path], output: Path
                               ) -> dict[str, Any]:
        from safetensors.torch import load_file

        from codiemb_pl.atomic import atomic_directory
        from codiemb_pl.data.collate import LengthLimits
        from codiemb_pl.encoder import TextEncoder
        from codiemb_pl.workflows.probe import self_positioning_merge

        budget = self.budgets.train
        unit = unit_config(self.model, self.budgets, self.specs[spec.parent].train)
        probe = [SourceConfig(**entry) for entry in self.train_sources(unit)]
        params = spec.params
        merged, info = self_positioning_merge(
            load_file(str(base)), [str(p) for p in snapshots], probe, model_dir=self.model_folder,
            steps=params["steps"], lr=params["lr"], probe_size=params["probe_size"],
            probe_batch_size=params["probe_batch_size"], seed=SEED, ir_temperature=budget.ir_temperature,
            limits=LengthLimits(query=budget.max_query_length, passage=budget.max_passage_length,
                                sts=budget.max_sts_length))
        encoder = TextEncoder(self.model_folder)
        encoder.load_state_dict(merged)
        with atomic_directory(output) as staging:
            encoder.save(staging)
        return {key: info[key] for key in ("coefficients", "scale", "initial_probe_loss", "final_probe_loss")
                if key in info}

    def build_boom(self, spec: RunSpec, output: Path) -> tuple[Path, dict[str, Any]]:
        from codiemb_pl.workflows.boom import merge_exports

        parent = self.specs[spec.parent].train
        members = boom_subsets(spec)
        exports = [self.train_unit(unit_config(self.model, self.budgets, parent, subset)) / "model"
                   for subset in members]
        if not (output / "modules.json").is_file():
            merge_exports(self.model_folder, exports, output, manifest={"members": members})
        return output, {"members": members}

    # -- scoring ----------------------------------------------------------------------------------------------
    def evaluate(self, model: Path, names: list[str]) -> dict[str, tuple[dict[str, float], float]]:
        """{set: (metrics, seconds)} of `model` on the named evaluation sets."""
        from codiemb_pl.workflows.evaluation import evaluate_sets
        from codiemb_pl.encoder import TextEncoder

        encoder = TextEncoder(str(model), max_seq_length=self.budgets.eval.max_length)
        batch = self.budgets.eval.batch_size
        out = {}
        for name in names:
            start = time.perf_counter()
            per_set, _ = evaluate_sets(encoder, [self.sets()[name]], batch_size=batch)
            out[name] = (per_set[name], time.perf_counter() - start)
        return out

    def run(self, spec: RunSpec) -> None:
        """Build and score one run unless every current set already has a cached score."""
        key = self.key(spec)
        missing = self.results.missing_sets(key, self.set_keys)
        if not missing:
            log(f"{spec.name}: cached ({key})")
            return
        log(f"{spec.name}: building ({key}); to score: {', '.join(missing)}")
        start = time.perf_counter()
        model, info = self.build(spec, key)
        built = time.perf_counter() - start
        scores = self.evaluate(model, missing)
        entry = self.results.entries.setdefault(key, {"sets": {}})
        entry.update(name=spec.name, description=spec.description,
                     config=run_config(spec, self.model, self.budgets, self.specs), info=info, finished_at=now())
        if built > 1.0 or "build_seconds" not in entry:
            entry["build_seconds"] = round(built, 1)
        for name, (metrics, seconds) in scores.items():
            set_config = next(c for c in self.set_configs if c["name"] == name)
            entry["sets"][name] = {"key": self.set_keys[name], "config": set_config, "metrics": metrics,
                                   "seconds": round(seconds, 1)}
        self.results.save()
        line = ", ".join(f"{n} {HEADLINE[self.sets()[n].task]} {m[HEADLINE[self.sets()[n].task]]:.4f}"
                         for n, (m, _) in scores.items())
        log(f"{spec.name}: {line} ({time.perf_counter() - start:.0f} s)")

    # -- plan and estimate --------------------------------------------------------------------------------
    def estimate(self, specs: list[RunSpec]) -> float:
        """Print the plan (cached / to run) with estimated seconds for MiniLM on an idle 2-core CPU."""
        n_ir, n_sts = self.training_sizes()
        sizes = {"documents": 0, "sentences": 0}
        for name, vset in self.sets().items():
            for field_name, texts in vset.texts.items():
                sizes["documents" if field_name == "corpus" else "sentences"] += len(texts)
        per_eval = eval_seconds(sizes, self.budgets.eval.max_length)
        budget = self.budgets.train
        units_seen: set[str] = set()
        mined = self.workdir / "mined" / f"scifact_train_{config_key(mining_config(self.model, self.budgets))}.jsonl"

        def unit_seconds(train: dict[str, Any], subset: Optional[dict[str, Any]] = None) -> float:
            unit = unit_config(self.model, self.budgets, train, subset)
            key = config_key(unit)
            if key in units_seen or (self.workdir / "train" / key / "model" / "modules.json").is_file():
                return 0.0
            units_seen.add(key)
            fraction = subset["fraction"] if subset else 1.0
            return training_seconds(train, budget, round(n_ir * fraction), round(n_sts * fraction))

        total = 0.0 if mined.is_file() else eval_seconds({"documents": sizes["documents"], "sentences": n_ir},
                                                                self.budgets.mining.max_seq_length)
        lines = [f"{'run':<26} {'status':<10} {'estimate':>9}"]
        for spec in specs:
            missing = self.results.missing_sets(self.key(spec), self.set_keys)
            if not missing:
                lines.append(f"{spec.name:<26} {'cached':<10} {0:>8.0f}s")
                continue
            seconds = per_eval * len(missing) / max(1, len(self.set_keys))
            if spec.kind == "train":
                seconds += unit_seconds(spec.train)
            elif spec.kind in ("merge", "self_positioning"):
                seconds += unit_seconds(self.specs[spec.parent].train) + 15.0
                if spec.kind == "self_positioning":
                    seconds += self_positioning_seconds(spec.params, budget)
            elif spec.kind == "boom":
                seconds += sum(unit_seconds(self.specs[spec.parent].train, s) for s in boom_subsets(spec)) + 15.0
            total += seconds
            lines.append(f"{spec.name:<26} {'to run':<10} {seconds:>8.0f}s")
        lines.append(f"{'total (+ mining)':<37} {total:>8.0f}s = {total / 60:.0f} min")
        log(f"plan: {n_ir} IR / {n_sts} STS training records, {budget.epochs} epoch(s), batch "
            f"{budget.ir_batch_size}/{budget.sts_batch_size}, lengths {budget.max_query_length}/"
            f"{budget.max_passage_length}/{budget.max_sts_length}, {budget.n_negatives} hard negatives; "
            f"estimate for all-MiniLM-L6-v2 on an idle 2-core CPU:\n" + "\n".join(lines))
        return total


# ---------------------------------------------------------------------------------------------------------
# Report

def headline(entry: Optional[dict[str, Any]], name: str, task: str) -> Optional[float]:
    if not entry or name not in entry.get("sets", {}):
        return None
    value = entry["sets"][name]["metrics"].get(HEADLINE[task])
    return None if value is None or not math.isfinite(value) else 100.0 * value


def row_scores(entry: Optional[dict[str, Any]], tasks: dict[str, str]) -> dict[str, Optional[float]]:
    """Headline ×100 per set plus IR avg / STS avg / overall (None where a set has no score)."""
    scores = {name: headline(entry, name, task) for name, task in tasks.items()}
    if any(v is None for v in scores.values()):
        return {**scores, "ir_avg": None, "sts_avg": None, "avg": None}
    per_set = {name: {HEADLINE[task]: scores[name]} for name, task in tasks.items()}
    summary = summary_metrics(per_set, tasks)
    return {**scores, "ir_avg": summary.get("ir_avg"), "sts_avg": summary.get("sts_avg"), "avg": summary.get("avg")}


def run_seconds(entry: dict[str, Any]) -> float:
    """Recorded compute of a run: building its model plus scoring every set."""
    return entry.get("build_seconds", 0.0) + sum(s["seconds"] for s in entry["sets"].values())


def fmt(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.2f}"


def target_checks(rows: dict[str, dict[str, Optional[float]]]) -> list[tuple[Optional[bool], str, str]]:
    """(passed or None if not measurable, target, numbers) for the issue's four targets."""
    fused, base, naive = rows.get("codiemb_delta_fusion", {}), rows.get("base", {}), rows.get("naive_joint", {})
    checks: list[tuple[Optional[bool], str, str]] = []

    def compare(label: str, left: Optional[float], right: Optional[float], margin: float, left_name: str,
                right_name: str) -> None:
        if left is None or right is None:
            checks.append((None, label, "not measured yet"))
            return
        gap = left - right
        checks.append((gap >= margin - 1e-9, label,
                       f"{left_name} {left:.2f} vs {right_name} {right:.2f} ({gap:+.2f}; needs ≥ {margin:+.2f})"))

    for name in ("stsb_test", "scifact_test"):
        compare(f"CoDiEmb + fusion ≥ base on {name}", fused.get(name), base.get(name), 0.0, "fused", "base")
    compare("overall ≥ naive joint + 1.0", fused.get("avg"), naive.get("avg"), 1.0, "fused", "naive joint")
    compare("IR avg ≥ IR specialist − 0.5", fused.get("ir_avg"), rows.get("ir_only", {}).get("ir_avg"), -0.5,
            "fused", "ir_only")
    specialists = {n: rows.get(n, {}).get("sts_avg") for n in ("sts_only_codiemb", "sts_only_cosent")}
    measured = {n: v for n, v in specialists.items() if v is not None}
    best = max(measured, key=measured.get) if measured else "sts_only_codiemb"
    compare("STS avg ≥ best STS specialist − 0.5", fused.get("sts_avg"), specialists.get(best), -0.5, "fused", best)
    compare("delta-guided fusion ≥ uniform soup (overall)", fused.get("avg"),
            rows.get("codiemb_uniform_soup", {}).get("avg"), 0.0, "delta-guided", "uniform soup")
    return checks


def write_plot(path: Path, names: list[str], columns: list[str], rows: dict[str, dict[str, Optional[float]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [n for n in names if rows[n].get("avg") is not None]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(shown) + 2), 4.5))
    width = 0.8 / max(1, len(columns))
    for i, column in enumerate(columns):
        values = [rows[n][column] or 0.0 for n in shown]
        ax.bar([x + (i - (len(columns) - 1) / 2) * width for x in range(len(shown))], values, width, label=column)
    ax.set_xticks(range(len(shown)))
    ax.set_xticklabels(shown, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("score ×100 (Spearman / nDCG@10)")
    finite = [rows[n][c] for n in shown for c in columns if rows[n][c] is not None]
    if finite:
        ax.set_ylim(max(0.0, min(finite) - 10), min(100.0, max(finite) + 5))
    ax.legend(fontsize=8, ncol=min(4, len(columns)))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def kept_analysis(report: Path) -> str:
    if report.is_file():
        text = report.read_text("utf-8")
        if ANALYSIS_BEGIN in text and ANALYSIS_END in text:
            return text.split(ANALYSIS_BEGIN, 1)[1].split(ANALYSIS_END, 1)[0].strip()
    return ""


def write_report(suite: Suite, command: str, quick: bool) -> Path:
    """RESULTS.md (table, target checks, configs and seeds) and the bar chart beside it."""
    report = Path(suite.args.report)
    plot = report.with_name("results.png") if not quick else report.with_suffix(".png")
    tasks = {c["name"]: c["task"] for c in suite.set_configs}
    specs = list(suite.specs.values())
    entries = {spec.name: suite.results.entries.get(suite.key(spec)) for spec in specs}
    current = {n: e if e and not suite.results.missing_sets(suite.key(suite.specs[n]), suite.set_keys) else None
               for n, e in entries.items()}
    rows = {name: row_scores(entry, tasks) for name, entry in current.items()}
    columns = list(tasks) + ["ir_avg", "sts_avg", "avg"]
    header = "| run | " + " | ".join(list(tasks) + ["IR avg", "STS avg", "overall"]) + " | minutes |"
    lines = [header, "|---|" + "---:|" * (len(columns) + 1)]
    for spec in specs:
        entry = current[spec.name]
        minutes = "—" if not entry else f"{run_seconds(entry) / 60:.1f}"
        lines.append(f"| `{spec.name}` | " + " | ".join(fmt(rows[spec.name][c]) for c in columns) + f" | {minutes} |")
    finished = sum(entry is not None for entry in current.values())
    total_minutes = sum(run_seconds(e) for e in current.values() if e) / 60
    checks = target_checks(rows)
    mark = {True: "✓", False: "✗", None: "…"}
    budgets = suite.budgets
    analysis = kept_analysis(report) or (
        "_Not written yet._ For every ✗ above: which task falls short, by how much, and why "
        "(steps per task, loss, learning rate, snapshot choice), with the numbers of the table.")
    missed = [f"- **{target}**: {numbers}" for ok, target, numbers in checks if ok is False]
    members = boom_subsets(suite.specs["boom"])
    member_seeds = ", ".join(str(member["seed"]) for member in members)
    member_fractions = ", ".join(f"{member['fraction']:g}" for member in members)
    eval_sets = ", ".join(f"`{c['name']}` ({c['task']}, {c['path']})" for c in suite.set_configs)
    text = [
        "# Experiment suite (issue #5)" + (" — QUICK MODE, verification only, not results" if quick else ""),
        "",
        f"Generated {now()} by `{command}`; {finished} of {len(specs)} runs scored; "
        f"{total_minutes:.0f} min of compute recorded. Metrics ×100: STS sets Spearman of cosine similarity "
        f"(`cosine_spearman`), IR sets nDCG@10 (`ndcg_at_10`); IR avg and STS avg average a task's sets, "
        "overall averages the two.",
        "",
        *lines,
        "",
        f"![results]({plot.name})",
        "",
        "## Targets",
        "",
        "`CoDiEmb + fusion` is `codiemb_delta_fusion` (the CoDiEmb run's snapshots merged with delta-guided "
        "fusion).",
        "",
        *[f"- {mark[ok]} {target}: {numbers}" for ok, target, numbers in checks],
        "",
        "## Analysis",
        "",
        ("Missed targets:\n\n" + "\n".join(missed) + "\n") if missed else "No measured target is missed.\n",
        ANALYSIS_BEGIN,
        analysis,
        ANALYSIS_END,
        "",
        "## Runs",
        "",
        *[f"- `{spec.name}`: {spec.description}" for spec in specs],
        "",
        "## Setup: configs and seeds",
        "",
        f"- model `{suite.model}`; seed {SEED} for every fit (`seed_everything`, `data.seed`); BOOM subsets "
        f"seeded {member_seeds} for fractions {member_fractions} "
        "(the 1.0 member is `shuffle_infonce` itself).",
        "- training data: SciFact train (BEIR qrels `train`, one record per judged query) with hard negatives "
        f"mined by the base model (ranks {budgets.mining.rank_range[0]}–{budgets.mining.rank_range[1]}, "
        f"margin {budgets.mining.margin}, {budgets.mining.num_negatives} per query, judged positives excluded) "
        "+ STS-B train (scores 0–5 normalised to [0, 1]).",
        f"- evaluation: {eval_sets}; texts truncated to {budgets.eval.max_length or 'the model maximum of'} tokens "
        "(SciFact documents are longer: scores are below MTEB's, which uses 256, for every run alike).",
        f"- snapshots for fusion: every ⌊steps / {budgets.fusion.snapshots}⌋ optimizer steps of `codiemb` plus "
        "its last step; every merge fuses all of them against θ0.",
        "",
        "Budgets (identical for every training run):",
        "",
        "```json",
        json.dumps(asdict(budgets), indent=1),
        "```",
        "",
        "<details><summary>run configs and keys</summary>",
        "",
        "```json",
        json.dumps({spec.name: {"key": suite.key(spec), "config": run_config(spec, suite.model, budgets, suite.specs)}
                    for spec in specs}, indent=1),
        "```",
        "",
        "</details>",
        "",
    ]
    report.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(report, "\n".join(text))
    write_plot(plot, [s.name for s in specs], columns, rows)
    return report


# ---------------------------------------------------------------------------------------------------------
# Command line

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO_ROOT.parent / "shared" / "data"),
                        help="folder with ir/scifact (BEIR) and sts/stsb/{train,test}.jsonl")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="base model (default: all-MiniLM-L6-v2, packaged)")
    parser.add_argument("--quick", action="store_true", help="a few steps on subsampled data (verification only)")
    parser.add_argument("--only", nargs="+", choices=RUN_NAMES, metavar="NAME", help=f"runs to do: {RUN_NAMES}")
    parser.add_argument("--extra-sts", action="append", default=[], metavar="NAME=FILE", help="another STS test set")
    parser.add_argument("--extra-ir", action="append", default=[], metavar="NAME=DIR",
                        help="another BEIR folder (qrels/test.tsv)")
    parser.add_argument("--epochs", type=int, help="override the training budget's epochs")
    parser.add_argument("--sts-train-samples", type=int, help="override the STS-B train cap (0: all 5749 pairs)")
    parser.add_argument("--sp-steps", type=int, help="override Self Positioning's steps")
    parser.add_argument("--workdir", help="models, snapshots, merges (default runs/experiments[-quick])")
    parser.add_argument("--results", help="results JSON (default benchmarks/results.json; quick: under runs/)")
    parser.add_argument("--report", help="markdown report (default benchmarks/RESULTS.md; quick: under runs/)")
    parser.add_argument("--estimate-only", action="store_true", help="print the plan and its time estimate, stop")
    return parser


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    defaults = ((QUICK_DIR / "work", QUICK_DIR / "results.json", QUICK_DIR / "RESULTS.md") if args.quick else
                (REPO_ROOT / "runs" / "experiments", BENCHMARKS / "results.json", BENCHMARKS / "RESULTS.md"))
    args.workdir = args.workdir or str(defaults[0])
    args.results = args.results or str(defaults[1])
    args.report = args.report or str(defaults[2])
    if not args.quick and Path(args.results).resolve() == (QUICK_DIR / "results.json").resolve():
        raise SystemExit("the quick results file is for --quick only")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    budgets = scaled(QUICK if args.quick else FULL, args.epochs, args.sp_steps, args.sts_train_samples)
    suite = Suite(args, budgets)
    if not (suite.data / "ir" / "scifact").is_dir() or not (suite.data / "sts" / "stsb").is_dir():
        raise SystemExit(f"{suite.data} has no ir/scifact and sts/stsb (pass --data)")
    specs = [spec for spec in suite.specs.values() if not args.only or spec.name in args.only]
    start = time.perf_counter()
    estimate = suite.estimate(specs)
    if args.estimate_only:
        return 0
    for spec in specs:
        suite.run(spec)
    command = "python benchmarks/experiments.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = write_report(suite, command.strip(), args.quick)
    log(f"done in {(time.perf_counter() - start) / 60:.1f} min (estimate {estimate / 60:.0f} min); "
        f"results {args.results}; report {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
