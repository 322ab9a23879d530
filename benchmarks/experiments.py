"""The experiment suite, v2 (issue 16): one command, resumable, every run cached by its config, 3 seeds.

    python benchmarks/experiments.py                          # the full suite (see results/suite.md for its time)
    python benchmarks/experiments.py --estimate-only          # the plan, what is cached, a time estimate
    python benchmarks/experiments.py --only base codiemb      # some rows (their dependencies are built too)
    python benchmarks/experiments.py --extra-sts sick=data/sick_test.jsonl --extra-ir nfcorpus=data/nfcorpus
    python benchmarks/experiments.py --quick [--model DIR]    # verification only: a few steps, subsampled data
    python benchmarks/experiments.py --testbed                # the distillation test bed (benchmarks/testbed.py)

Rows (`experiment_runs.suite_runs`), each trained / merged at every seed of `Budgets.seeds` (base once):
base; IR only; STS only (CoDiEmb loss, CoSENT); naive joint (`mixed`); batch shuffling with one InfoNCE
(BOOM's baseline); CoDiEmb with the proportional / balanced / temperature samplers; the CoDiEmb run's
snapshots merged with delta-guided fusion (suite v1 also measured uniform soup, TIES and Self Positioning
of the snapshots: all landed between θ0 and the final weights; v2 spends that time on the seeds); BOOM; the
final weights of the three CoDiEmb runs of a seed merged across trajectories (`cross_*`: delta-guided, uniform
soup, TIES, Self Positioning, greedy soup); the IR-only, STS-only and CoDiEmb final weights merged
(`specialists_delta_fusion`).

Everything goes through the library: training through `codiemb fit` (in-process, a generated YAML per
run in the workdir), hard negatives through `codiemb mine-negatives` (once, cached), merges through
`codiemb fuse`, Self Positioning through `workflows.probe.self_positioning_merge`, greedy soup through
`fusion.soup.greedy_soup` (selected on held-out dev sets, never the test sets), BOOM through
`sweeps.boom`, scores through `evaluation.suite.set_embeddings` + `score_set` (what `codiemb evaluate`
runs); the per-item values behind the metrics (per-query nDCG@10, per-pair cosine) are kept so the paired
bootstrap per seed (`paired_comparison.paired_bootstrap_sets`) needs no second encoding.

`--results` (JSON) maps each run's config key to {name, seed, config, sets: {set: {key, metrics, seconds,
cpu_seconds}}, ...} and is rewritten atomically after every run; a later invocation skips every finished
(run, set) pair and re-scores only the sets a run lacks. Trained models, merges and per-item values live in
`--workdir` (gitignored, default benchmarks/suite_runs/); they are rebuilt only when a result needs them.
`--report` (default benchmarks/results/suite.md, a page of the documentation site) gets the suite section
(between `<!-- suite-v2:begin -->` and `<!-- suite-v2:end -->`; the rest of the file is kept), led by the table
(mean ± sd over seeds) and its reading, then the target checks, the paired bootstrap per seed, the runs and the
setup. What is data rather than reading goes into the folder named like the report without `.md`
(`results/suite/`), linked from the page, never pasted into it: `configs.json` (the budgets, every run's config
key per seed and the resolved configs of the first seed) and `results.png`; the default `--results` file,
`runs.json`, lives there too. A hand-written analysis between the `<!-- analysis-v2:begin -->` /
`<!-- analysis-v2:end -->` markers of an existing report is kept.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import random
import statistics
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

import torch  # noqa: E402
import yaml  # noqa: E402

from experiment_runs import (CROSS_MEMBERS, DATA_SEED, DEFAULT_MODEL, FULL, HEADLINE, QUICK, RUN_NAMES,  # noqa: E402
                             SECONDS_PER_MERGE, TRAIN_SOURCES, Budgets, RunSpec, boom_subsets,
                             config_key, dependencies, eval_seconds, eval_set_config,
                             mining_config, plan_rows, row_seeds, run_config, scaled, self_positioning_seconds,
                             suite_runs, training_seconds, training_steps, unit_config)
from paired_comparison import item_values, paired_bootstrap_sets  # noqa: E402

from codiemb_pl.storage.atomic import atomic_write_text  # noqa: E402
from codiemb_pl.cli.main import main as codiemb_main  # noqa: E402
from codiemb_pl.data.cache.records import opened_records, record_count  # noqa: E402
from codiemb_pl.data.sources import SourceConfig  # noqa: E402
from codiemb_pl.data.eval_sets import EvalSet  # noqa: E402
from codiemb_pl.evaluation.suite import summary_metrics  # noqa: E402
from codiemb_pl.paths import resolve_location  # noqa: E402
from codiemb_pl.data.eval_builders import build_eval_sets  # noqa: E402

SUITE_BEGIN, SUITE_END = "<!-- suite-v2:begin -->", "<!-- suite-v2:end -->"
ANALYSIS_BEGIN, ANALYSIS_END = "<!-- analysis-v2:begin -->", "<!-- analysis-v2:end -->"
QUICK_DIR = REPO_ROOT / "runs" / "experiments-quick"
WORKDIR = BENCHMARKS / "suite_runs"
RESULTS_DIR = BENCHMARKS / "results"   # the report pages of the documentation site (docs/results links here)
COMPARISONS = (   # (A, B) pairs of the paired bootstrap per seed; "best_cross_member" is resolved on the means
    ("codiemb", "naive_joint"),
    ("cross_delta_fusion", "best_cross_member"),
    ("cross_delta_fusion", "cross_uniform_soup"),
    ("cross_delta_fusion", "cross_ties"),
    ("specialists_delta_fusion", "codiemb"),
)


class Interrupted(Exception):
    """SIGTERM / SIGINT stopped a fit (its last.ckpt saved): the suite stops; rerun the command to go on."""


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


class Clock:
    """Wall and CPU seconds (this process, all threads) since it was made."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def seconds(self) -> tuple[float, float]:
        return round(time.perf_counter() - self.wall, 1), round(time.process_time() - self.cpu, 1)


def load_average() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------------------
# Statistics over seeds

def mean_sd(values: list[float]) -> tuple[Optional[float], Optional[float]]:
    """Mean and sample standard deviation (n − 1; 0.0 for one value; None for none)."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def compare(a: list[float], b: list[float]) -> dict[str, Any]:
    """Mean difference A − B over seeds and the tie rule: a difference smaller (in absolute value) than the
    larger of the two rows' seed standard deviations is a tie; otherwise A is `better` or `worse`."""
    mean_a, sd_a = mean_sd(a)
    mean_b, sd_b = mean_sd(b)
    if mean_a is None or mean_b is None:
        return {"verdict": "not measured"}
    difference, sd = mean_a - mean_b, max(sd_a, sd_b)
    verdict = "tie" if abs(difference) < sd else ("better" if difference > 0 else "worse")
    return {"difference": difference, "sd": sd, "verdict": verdict}


def subsample_ir_set(vset: EvalSet, query_ids: list[str], max_documents: Optional[int], seed: int,
                     name: Optional[str] = None) -> EvalSet:
    """`vset` on `query_ids` over a corpus of every document judged for them plus seeded random distractors,
    `max_documents` in all (None: the whole corpus). Scoring stays the library's; this only picks the texts."""
    queries = set(query_ids)
    judged = {doc for q in queries for doc, rel in vset.qrels.get(q, {}).items() if rel > 0}
    doc_ids = list(vset.doc_ids)
    if max_documents is not None and len(doc_ids) > max_documents:
        others = sorted(set(doc_ids) - judged)
        random.Random(seed).shuffle(others)
        keep = judged | set(others[:max(0, max_documents - len(judged))])
        doc_ids = [doc for doc in vset.doc_ids if doc in keep]
    text_of_doc = dict(zip(vset.doc_ids, vset.texts["corpus"]))
    text_of_query = dict(zip(vset.query_ids, vset.texts["query"]))
    kept_queries = [q for q in vset.query_ids if q in queries]
    return dataclasses.replace(
        vset, name=name or vset.name, query_ids=kept_queries, doc_ids=doc_ids,
        texts={"query": [text_of_query[q] for q in kept_queries], "corpus": [text_of_doc[d] for d in doc_ids]},
        qrels={q: dict(vset.qrels[q]) for q in kept_queries if q in vset.qrels})


# ---------------------------------------------------------------------------------------------------------
# Results file

class Results:
    """`results.json`: {"runs": {run key: entry}, "comparisons": {...}}; saved atomically after every change.
    (A suite v1 file, {run key: entry}, is read as its runs.)"""

    def __init__(self, path: Path):
        self.path = path
        data = json.loads(path.read_text("utf-8")) if path.is_file() else {}
        if "runs" not in data:
            data = {"runs": data}
        self.entries: dict[str, dict[str, Any]] = data["runs"]
        self.comparisons: dict[str, Any] = data.get("comparisons", {})

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {"runs": self.entries, "comparisons": self.comparisons}
        atomic_write_text(self.path, json.dumps(data, indent=1, sort_keys=True, allow_nan=True) + "\n")

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
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not (self.workdir / ".gitignore").is_file():   # models and merges stay out of git
            atomic_write_text(self.workdir / ".gitignore", "*\n")
        self.results = Results(Path(args.results))
        self.specs = {spec.name: spec for spec in suite_runs(budgets)}
        self.set_configs = self.evaluation_set_configs()
        self.set_keys = {c["name"]: config_key(c) for c in self.set_configs}
        self._sets: Optional[dict[str, EvalSet]] = None
        self._dev_sets: Optional[list[EvalSet]] = None
        self._sizes: Optional[dict[str, int]] = None

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

    def key(self, spec: RunSpec, seed: Optional[int]) -> str:
        return config_key(run_config(spec, self.model, self.budgets, self.specs, seed))

    def data_path(self, relative: str) -> Path:
        path = Path(relative)
        return path if path.is_absolute() else self.data / path

    def unit(self, name: str, seed: int, subset: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        return unit_config(self.model, self.budgets, self.specs[name].train, seed, subset)

    # -- data -----------------------------------------------------------------------------------------------
    def sets(self) -> dict[str, EvalSet]:
        """The test sets; an IR set's corpus is every judged document + seeded distractors (`ir_max_documents`)."""
        if self._sets is None:
            sources = [SourceConfig(name=c["name"], task="sts", path=str(self.data_path(c["path"])),
                                    score_range=c["score_range"], max_samples=c["max_samples"]) if c["task"] == "sts"
                       else SourceConfig(name=c["name"], task="ir", path=str(self.data_path(c["path"])),
                                         split=c["split"], max_samples=c["max_queries"]) for c in self.set_configs]
            built = build_eval_sets(sources, where="evaluation sets")
            budget = self.budgets.eval
            self._sets = {vset.name: vset if vset.task == "sts" else
                          subsample_ir_set(vset, vset.query_ids, budget.ir_max_documents, budget.documents_seed)
                          for vset in built}
        return self._sets

    def dev_sets(self) -> list[EvalSet]:
        """Greedy soup's selection sets: STS-B dev pairs and SciFact train queries that no training run saw
        (the training subset is the same at every seed), over their judged documents + distractors."""
        if self._dev_sets is None:
            budget = self.budgets.eval
            stsb = build_eval_sets([SourceConfig(name="stsb_dev", task="sts", path=str(self.data / "sts/stsb/dev.jsonl"),
                                                       score_range=[0, 5], max_samples=budget.dev_sts_samples,
                                                       seed=budget.documents_seed)], where="greedy soup's dev sets")
            scifact = build_eval_sets([SourceConfig(name="scifact_dev", task="ir", path=str(self.data / "ir/scifact"),
                                                          split="train")], where="greedy soup's dev sets")[0]
            with opened_records(self.train_source_config("scifact")) as records:
                trained = {row["query"] for row in records.json_rows(range(len(records)))}
            held_out = [q for q, text in zip(scifact.query_ids, scifact.texts["query"]) if text not in trained]
            random.Random(budget.documents_seed).shuffle(held_out)
            if not held_out:
                raise SystemExit("no SciFact train query is left out of training for greedy soup's selection set "
                                 "(lower the budget's ir_max_samples)")
            self._dev_sets = stsb + [subsample_ir_set(scifact, held_out[:budget.dev_ir_queries],
                                                      budget.dev_ir_documents, budget.documents_seed)]
        return self._dev_sets

    def training_sizes(self, mine: bool = True) -> dict[str, int]:
        """Records per training source after the budget's caps. With `mine=False` (the estimate) a source
        whose hard negatives are not mined yet counts as its cap instead of being mined first."""
        if self._sizes is not None:
            return self._sizes
        assumed = not mine and not self.mined_path().is_file()
        sizes = {}
        for source in TRAIN_SOURCES:
            cap = getattr(self.budgets.train, source.cap)
            sizes[source.name] = (cap if assumed and source.split and cap
                                  else record_count(self.train_source_config(source.name)))
        if not assumed:
            self._sizes = sizes
        return sizes

    def mined_path(self) -> Path:
        """Where SciFact train with mined hard negatives is cached (keyed by the mining config)."""
        return self.workdir / "mined" / f"scifact_train_{config_key(mining_config(self.model, self.budgets))}.jsonl"

    def mining_arguments(self, output: Path) -> list[str]:
        """The `codiemb mine-negatives` arguments that write SciFact train's hard negatives to `output`."""
        mining = self.budgets.mining
        args = ["mine-negatives", str(self.data / "ir/scifact"), "--split", "train", "--model", self.model,
                "--output", str(output), "--range", *map(str, mining.rank_range),
                "--num-negatives", str(mining.num_negatives), "--no-progress"]
        args += ["--no-margin"] if mining.margin is None else ["--margin", str(mining.margin)]
        if mining.max_seq_length:
            args += ["--max-seq-length", str(mining.max_seq_length)]
        return args

    def mined_negatives(self) -> Path:
        """SciFact train with hard negatives mined by the base model (positives excluded), cached by config."""
        path = self.mined_path()
        if path.is_file():
            return path
        args = self.mining_arguments(path)
        log(f"mining hard negatives: codiemb {' '.join(args)}")
        clock = Clock()
        if codiemb(args) != 0:
            raise SystemExit("codiemb mine-negatives failed (see above)")
        wall, cpu = clock.seconds()
        log(f"mined in {wall:.0f} s ({cpu:.0f} CPU-s) -> {path}")
        return path

    def train_source_config(self, name: str) -> SourceConfig:
        """One training source as `codiemb fit` reads it: capped to a DATA_SEED-seeded random subset."""
        source = next(s for s in TRAIN_SOURCES if s.name == name)
        cap = getattr(self.budgets.train, source.cap)
        entry: dict[str, Any] = {"name": source.name, "task": source.task}
        if source.split:
            entry.update(path=str(self.mined_negatives()), format="jsonl")
        elif source.task == "ir":
            entry.update(path=str(self.data_path(source.path)), format="jsonl")
        else:
            entry.update(path=str(self.data_path(source.path)), score_range=[0, 5])
        if cap:
            entry.update(max_samples=cap, seed=DATA_SEED)
        return SourceConfig(**entry)

    def train_sources(self, unit: dict[str, Any], folder: Optional[Path] = None) -> list[dict[str, Any]]:
        """`data.train` entries of a training unit; a BOOM member's seeded subset of them is written to
        `folder/data` (`sweeps.boom`)."""
        from codiemb_pl.sweeps.subsets import source_dict

        sources = [self.train_source_config(entry["name"]) for entry in unit["data"]]
        subset = unit.get("subset")
        if subset:
            from codiemb_pl.sweeps.subsets import write_subset_sources

            if folder is None:
                raise ValueError("a BOOM member's subset needs its unit folder")
            sources = write_subset_sources(sources, subset["fraction"], subset["seed"], folder / "data")
        return [source_dict(source) for source in sources]

    # -- training -------------------------------------------------------------------------------------------
    def fit_config(self, unit: dict[str, Any], folder: Path) -> dict[str, Any]:
        """The generated `codiemb fit` YAML of one training unit."""
        budget = self.budgets.train
        callbacks: list[dict[str, Any]] = [{"class_path": "codiemb_pl.callbacks.ExportEncoder",
                                            "init_args": {"dirpath": str(folder / "model"), "from_best": False}}]
        if unit.get("snapshots"):
            steps = training_steps(unit, budget, self.training_sizes())
            callbacks.append({"class_path": "codiemb_pl.callbacks.CheckpointFusion", "init_args": {
                "dirpath": str(folder / "fusion"), "methods": [], "collect": ["last"], "export": False,
                "every_n_steps": max(1, steps // unit["snapshots"])}})
        return {
            "seed_everything": unit["seed"],
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
            "data": {"policy": unit["policy"], "temperature_alpha": budget.temperature_alpha,
                     "ir_batch_size": budget.ir_batch_size,
                     "sts_batch_size": budget.sts_batch_size, "n_positives": budget.n_positives,
                     "n_negatives": budget.n_negatives, "max_query_length": budget.max_query_length,
                     "max_passage_length": budget.max_passage_length, "max_sts_length": budget.max_sts_length,
                     "seed": unit["seed"], "train": self.train_sources(unit, folder)},
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
        args, last = ["fit", "--config", str(config_path)], folder / "checkpoints" / "last.ckpt"
        if last.is_file():   # an interrupted fit (SIGTERM / SIGINT saved it): go on from there
            args += ["--ckpt_path", str(last)]
        log(f"training {config_key(unit)}: codiemb {' '.join(args)}")
        clock = Clock()
        code = codiemb(args)
        if not (folder / "model" / "modules.json").is_file():
            if code == 0 and last.is_file():
                raise Interrupted(f"training {config_key(unit)} was interrupted; {last} is saved")
            raise SystemExit(f"training failed: {config_path}")
        wall, cpu = clock.seconds()
        atomic_write_text(folder / "cost.json", json.dumps({"wall_seconds": wall, "cpu_seconds": cpu,
                                                            "load_average": load_average()}) + "\n")
        log(f"trained {config_key(unit)} in {wall:.0f} s ({cpu:.0f} CPU-s, load {load_average()})")
        return folder

    # -- building a run's model ---------------------------------------------------------------------------
    def build(self, spec: RunSpec, seed: Optional[int], key: str) -> tuple[Path, dict[str, Any]]:
        """The model folder of a run (trained / merged now or reused) and facts about it."""
        if spec.kind == "base":
            return Path(self.model_folder), {}
        if spec.kind == "train":
            unit = self.unit(spec.name, seed)
            folder = self.train_unit(unit)
            cost = folder / "cost.json"
            return folder / "model", {"unit": config_key(unit),
                                      "steps": training_steps(unit, self.budgets.train, self.training_sizes()),
                                      "fit": json.loads(cost.read_text("utf-8")) if cost.is_file() else None}
        output = self.workdir / "merged" / key
        if spec.kind == "boom":
            return self.build_boom(spec, seed, output)
        if spec.kind == "cross":
            return self.build_cross(spec, seed, output)
        parent = self.train_unit(self.unit(spec.parent, seed))
        snapshots = sorted((parent / "fusion" / "snapshots").glob("step*.safetensors"))
        info: dict[str, Any] = {"snapshots": [p.stem for p in snapshots]}
        if (output / "modules.json").is_file():
            return output, info
        base = parent / "fusion" / "snapshots" / "base.safetensors"   # a `merge` row: its parent's snapshots
        self.fuse(str(base), [str(p) for p in snapshots], spec, seed, output)
        return output, info

    def fuse(self, base: str, models: list[str], spec: Any, seed: int, output: Path,
             template: Optional[str] = None) -> None:
        """`codiemb fuse` of `models` against `base` with the row's method and parameters (`spec.method`,
        `spec.params`); the output keeps `template`'s config and pooling (default: the base model's folder)."""
        args = ["fuse", "--base", base, "--method", str(spec.method), "--output", str(output),
                "--template", template or self.model_folder, "--seed", str(seed)]
        for model in models:
            args += ["--model", model]
        for name, value in spec.params.items():
            args += ["--param", f"{name}={value}"]
        if codiemb(args) != 0:
            raise SystemExit(f"codiemb {' '.join(args)} failed")

    def build_cross(self, spec: RunSpec, seed: int, output: Path) -> tuple[Path, dict[str, Any]]:
        """Merge the final weights of the row's members (same seed) against θ0 = the base model."""
        members = [self.train_unit(self.unit(name, seed)) / "model" for name in spec.members]
        info: dict[str, Any] = {"members": list(spec.members)}
        record = output / "suite_merge.json"
        if (output / "modules.json").is_file():
            return output, json.loads(record.read_text("utf-8")) if record.is_file() else info
        if spec.method == "self_positioning":
            info.update(self.build_self_positioning(spec, [str(m) for m in members], self.unit(spec.members[0], seed),
                                                    seed, output))
        elif spec.method == "greedy_soup":
            info.update(self.build_greedy_soup(spec, members, output))
        else:
            self.fuse(self.model_folder, [str(m) for m in members], spec, seed, output)
        atomic_write_text(record, json.dumps(info, indent=1) + "\n")
        return output, info

    def build_self_positioning(self, spec: RunSpec, checkpoints: list[str], probe_unit: dict[str, Any], seed: int,
                               output: Path) -> dict[str, Any]:
        """Self Positioning of `checkpoints` against θ0 = the base model, probed on the training data of
        `probe_unit`."""
        from codiemb_pl.storage.atomic import atomic_directory
        from codiemb_pl.data.cache.token_ids import TokenLimits
        from codiemb_pl.model.encoder import TextEncoder
        from codiemb_pl.workflows.probe import self_positioning_merge

        budget = self.budgets.train
        probe = [SourceConfig(**entry) for entry in self.train_sources(probe_unit)]
        params = spec.params
        merged, info = self_positioning_merge(
            self.model_folder, checkpoints, probe,
            model_dir=self.model_folder, steps=params["steps"], lr=params["lr"], probe_size=params["probe_size"],
            probe_batch_size=params["probe_batch_size"], seed=seed, ir_temperature=budget.ir_temperature,
            limits=TokenLimits(query=budget.max_query_length, passage=budget.max_passage_length,
                               sts=budget.max_sts_length))
        encoder = TextEncoder(self.model_folder)
        encoder.load_state_dict(merged)
        with atomic_directory(output) as staging:
            encoder.save(staging)
        return {key: info[key] for key in ("coefficients", "scale", "initial_probe_loss", "final_probe_loss")
                if key in info}

    def build_greedy_soup(self, spec: RunSpec, members: list[Path], output: Path) -> dict[str, Any]:
        """Greedy soup (`fusion.soup.greedy_soup`) of the members, best dev score first, each addition kept
        only if the dev `avg` improves; dev = `dev_sets()` (held out of training, never a test set)."""
        from codiemb_pl.storage.atomic import atomic_directory
        from codiemb_pl.model.encoder import TextEncoder
        from codiemb_pl.fusion.soup import greedy_soup
        from codiemb_pl.fusion.writer import save_state_dict
        from codiemb_pl.workflows.evaluation import evaluate_sets
        from codiemb_pl.workflows.encoders import load_weights

        encoder = TextEncoder(str(members[0]), max_seq_length=self.budgets.eval.max_length)
        dev = self.dev_sets()
        trial = output.parent / f".{output.name}.trial.safetensors"
        trial.parent.mkdir(parents=True, exist_ok=True)

        def dev_score(location: Path) -> float:
            load_weights(encoder, location)
            return evaluate_sets(encoder, dev, batch_size=self.budgets.eval.batch_size)[1]["avg"]

        def score_state(state: dict[str, torch.Tensor]) -> float:
            save_state_dict(state, trial)
            return dev_score(trial)

        singles = [dev_score(member) for member in members]
        order = sorted(range(len(members)), key=lambda i: singles[i], reverse=True)
        result = greedy_soup([members[i] for i in order], score_state)
        save_state_dict(result.state_dict, trial)
        load_weights(encoder, trial)
        with atomic_directory(output) as staging:
            encoder.save(staging)
        trial.unlink(missing_ok=True)
        return {"dev_sets": [v.name for v in dev], "dev_avg_of_members": dict(zip(spec.members, singles)),
                "chosen": [spec.members[order[i]] for i in result.chosen], "dev_avg_of_soups": result.scores}

    def build_boom(self, spec: RunSpec, seed: int, output: Path) -> tuple[Path, dict[str, Any]]:
        """BOOM through its public entry point (`sweeps.boom.run_boom`): bagged runs of the batch-shuffling
        baseline's config, merged with Multi-SLERP."""
        from codiemb_pl.sweeps.boom import BoomRun, run_boom

        members = boom_subsets(spec, seed)
        unit = self.unit(spec.parent, seed)
        folder = self.workdir / "boom" / output.name
        resolved = self.fit_config(unit, folder)
        outcome = run_boom(resolved, [BoomRun(m["fraction"], m["seed"]) for m in members], folder)
        if not outcome.get("merged") and outcome.get("code") == 0:
            raise Interrupted(f"BOOM's sweep in {folder} was interrupted")
        if not outcome.get("merged"):
            raise RuntimeError(f"BOOM did not finish (exit code {outcome.get('code')}); see the messages above")
        return Path(outcome["merged"]), {"members": members, "trained_now": list(outcome["trained"])}

    # -- scoring ----------------------------------------------------------------------------------------------
    def items_path(self, key: str, set_name: str) -> Path:
        return self.workdir / "items" / key / f"{set_name}_{self.set_keys[set_name]}.pt"

    def evaluate(self, model: Path, names: list[str], key: str) -> dict[str, tuple[dict[str, float], float, float]]:
        """{set: (metrics, wall seconds, CPU seconds)} of `model` on the named sets; the per-item values behind
        each metric are saved beside (`items_path`) for the paired bootstrap."""
        from codiemb_pl.model.encoder import TextEncoder
        from codiemb_pl.evaluation.suite import score_set, set_embeddings

        encoder = TextEncoder(str(model), max_seq_length=self.budgets.eval.max_length)
        out = {}
        for name in names:
            clock = Clock()
            vset = self.sets()[name]
            embeddings = set_embeddings(encoder, vset, self.budgets.eval.batch_size)
            metrics = dict(score_set(vset, embeddings))
            path = self.items_path(key, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(item_values(vset, embeddings), path.with_suffix(".tmp"))
            os.replace(path.with_suffix(".tmp"), path)
            out[name] = (metrics, *clock.seconds())
        return out

    def run(self, spec: RunSpec, seed: Optional[int]) -> None:
        """Build and score one run unless every current set already has a cached score."""
        self.score_run(spec.name, seed, self.key(spec, seed), spec.description,
                       lambda: run_config(spec, self.model, self.budgets, self.specs, seed),
                       lambda key: self.build(spec, seed, key))

    def score_run(self, name: str, seed: Optional[int], key: str, description: str, config: Any, build: Any) -> None:
        """Build (`build(key)` -> (model folder, info)) and score the run `key` on every set it has no current
        score for, recording `config()` and the costs in the results (the suite's rows and the test bed's)."""
        missing = self.results.missing_sets(key, self.set_keys)
        label = name if seed is None else f"{name} seed {seed}"
        if not missing:
            log(f"{label}: cached ({key})")
            return
        log(f"{label}: building ({key}); to score: {', '.join(missing)}; load {load_average()}")
        clock = Clock()
        model, info = build(key)
        built, built_cpu = clock.seconds()
        scores = self.evaluate(model, missing, key)
        entry = self.results.entries.setdefault(key, {"sets": {}})
        entry.update(name=name, seed=seed, description=description, config=config(), info=info,
                     finished_at=now(), load_average=load_average())
        if built > 1.0 or "build_seconds" not in entry:
            entry.update(build_seconds=built, build_cpu_seconds=built_cpu)
        for set_name, (metrics, seconds, cpu) in scores.items():
            set_config = next(c for c in self.set_configs if c["name"] == set_name)
            entry["sets"][set_name] = {"key": self.set_keys[set_name], "config": set_config, "metrics": metrics,
                                       "seconds": seconds, "cpu_seconds": cpu}
        self.results.save()
        line = ", ".join(f"{n} {HEADLINE[self.sets()[n].task]} {m[HEADLINE[self.sets()[n].task]]:.4f} "
                         f"({s:.0f} s)" for n, (m, s, _) in scores.items())
        log(f"{label}: {line}; built in {built:.0f} s ({built_cpu:.0f} CPU-s), total {clock.seconds()[0]:.0f} s")

    # -- per-seed rows and paired comparisons -------------------------------------------------------------
    def entry(self, name: str, seed: Optional[int]) -> Optional[dict[str, Any]]:
        """The run's results entry if every current set is scored."""
        spec = self.specs[name]
        seed = None if spec.kind == "base" else seed
        key = self.key(spec, seed)
        return None if self.results.missing_sets(key, self.set_keys) else self.results.entries.get(key)

    def per_seed(self, name: str) -> dict[int, dict[str, Optional[float]]]:
        """{seed: row_scores} of the seeds a row has all scores for (`base`: its one score under every seed)."""
        tasks = {c["name"]: c["task"] for c in self.set_configs}
        out = {}
        for seed in self.budgets.seeds:
            entry = self.entry(name, seed)
            if entry is not None:
                out[seed] = row_scores(entry, tasks)
        return out

    def best_cross_member(self) -> Optional[str]:
        """The member of the cross merges with the best overall mean over seeds."""
        means = {name: mean_sd([r["avg"] for r in self.per_seed(name).values()])[0] for name in CROSS_MEMBERS}
        measured = {name: value for name, value in means.items() if value is not None}
        return max(measured, key=measured.get) if measured else None

    def comparisons(self) -> dict[str, Any]:
        """The paired bootstrap per seed of every `COMPARISONS` pair (from the saved per-item values)."""
        out: dict[str, Any] = {}
        resamples = self.budgets.eval.bootstrap_resamples
        for a, b in COMPARISONS:
            b = self.best_cross_member() if b == "best_cross_member" else b
            if b is None:
                continue
            for seed in self.budgets.seeds:
                ea, eb = self.entry(a, seed), self.entry(b, seed)
                if ea is None or eb is None:
                    continue
                ka = self.key(self.specs[a], None if self.specs[a].kind == "base" else seed)
                kb = self.key(self.specs[b], None if self.specs[b].kind == "base" else seed)
                paths = [(name, self.items_path(ka, name), self.items_path(kb, name)) for name in self.set_keys]
                if not all(pa.is_file() and pb.is_file() for _, pa, pb in paths):
                    continue
                sets = [(self.sets()[name], torch.load(pa), torch.load(pb)) for name, pa, pb in paths]
                out.setdefault(f"{a} vs {b}", {})[str(seed)] = paired_bootstrap_sets(sets, resamples, seed)
        return out

    # -- plan and estimate --------------------------------------------------------------------------------
    def estimate(self, plan: list[tuple[RunSpec, Optional[int]]]) -> float:
        """Print the plan (cached / to run) with estimated seconds for MiniLM on an idle 2-core CPU."""
        sizes = self.training_sizes(mine=False)
        set_sizes = {"documents": 0, "sentences": 0}
        for vset in self.sets().values():
            for field_name, texts in vset.texts.items():
                set_sizes["documents" if field_name == "corpus" else "sentences"] += len(texts)
        per_eval = eval_seconds(set_sizes, self.budgets.eval.max_length)
        dev_eval = eval_seconds({"documents": self.budgets.eval.dev_ir_documents,
                                 "sentences": 2 * self.budgets.eval.dev_sts_samples + self.budgets.eval.dev_ir_queries},
                                self.budgets.eval.max_length)
        budget = self.budgets.train
        units_seen: set[str] = set()

        def unit_seconds(name: str, seed: int, fraction: float = 1.0) -> float:
            unit = self.unit(name, seed)
            key = f"{config_key(unit)}-{fraction}"
            if key in units_seen or (fraction == 1.0 and (self.workdir / "train" / config_key(unit) / "model" /
                                                          "modules.json").is_file()):
                return 0.0
            units_seen.add(key)
            return training_seconds(unit, budget, {n: round(v * fraction) for n, v in sizes.items()})

        total = 0.0 if self.mined_path().is_file() else eval_seconds({"documents": 5183, "sentences": sizes["scifact"]},
                                                         self.budgets.mining.max_seq_length)
        lines = [f"{'run':<26} {'seed':>5} {'status':<8} {'estimate':>9}"]
        for spec, seed in plan:
            missing = self.results.missing_sets(self.key(spec, seed), self.set_keys)
            if not missing:
                lines.append(f"{spec.name:<26} {seed or '':>5} {'cached':<8} {0:>8.0f}s")
                continue
            seconds = per_eval * len(missing) / max(1, len(self.set_keys))
            seconds += sum(unit_seconds(name, seed) for name in dependencies(spec))
            if spec.kind in ("merge", "cross"):
                seconds += SECONDS_PER_MERGE
            if spec.method == "self_positioning":
                seconds += self_positioning_seconds(spec.params, budget)
            if spec.method == "greedy_soup":
                seconds += 2 * len(spec.members) * dev_eval
            if spec.kind == "boom":
                seconds += sum(unit_seconds(spec.parent, m["seed"], m["fraction"]) for m in boom_subsets(spec, seed))
                seconds += SECONDS_PER_MERGE
            total += seconds
            lines.append(f"{spec.name:<26} {seed or '':>5} {'to run':<8} {seconds:>8.0f}s")
        lines.append(f"{'total (+ mining)':<41} {total:>8.0f}s = {total / 60:.0f} min")
        log(f"plan: training records {sizes}, {budget.epochs} epoch(s), batch {budget.ir_batch_size}/"
            f"{budget.sts_batch_size}, lengths {budget.max_query_length}/{budget.max_passage_length}/"
            f"{budget.max_sts_length}, {budget.n_negatives} hard negative(s), seeds {list(self.budgets.seeds)}; "
            f"one model's scoring ≈ {per_eval:.0f} s; estimate for all-MiniLM-L6-v2 on an idle 2-core CPU:\n"
            + "\n".join(lines))
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


def run_seconds(entry: dict[str, Any], kind: str = "") -> float:
    """Recorded compute of a run (wall, or CPU with kind="cpu_"): building its model plus scoring every set."""
    return entry.get(f"build_{kind}seconds", 0.0) + sum(s.get(f"{kind}seconds", 0.0) for s in entry["sets"].values())


def fmt(value: Optional[float], sd: Optional[float] = None) -> str:
    if value is None:
        return "—"
    return f"{value:.2f}" if sd is None else f"{value:.2f} ± {sd:.2f}"


def values_of(per_seed: dict[int, dict[str, Optional[float]]], column: str) -> list[float]:
    return [row[column] for row in per_seed.values() if row.get(column) is not None]


def target_checks(suite: Suite, comparisons: dict[str, Any]) -> list[tuple[Optional[bool], str, str]]:
    """(passed or None if not measurable, target, numbers) for issue 16's targets."""
    checks: list[tuple[Optional[bool], str, str]] = []
    seeds = list(suite.budgets.seeds)
    overall = {name: values_of(suite.per_seed(name), "avg") for name in suite.specs}

    def versus(label: str, a: str, b: Optional[str], margin: float) -> None:
        if b is None or not overall[a] or not overall.get(b):
            checks.append((None, label, "not measured yet"))
            return
        c = compare(overall[a], overall[b])
        checks.append((c["difference"] >= margin - 1e-9, label,
                       f"{a} {fmt(*mean_sd(overall[a]))} vs {b} {fmt(*mean_sd(overall[b]))}: "
                       f"{c['difference']:+.2f} (needs ≥ {margin:+.2f}); tie rule (sd {c['sd']:.2f}): {c['verdict']}"))

    best = suite.best_cross_member()
    versus("cross_delta_fusion ≥ best of its members + 0.3 (overall, mean over seeds)", "cross_delta_fusion", best, 0.3)
    versus("cross_delta_fusion ≥ cross_uniform_soup (overall)", "cross_delta_fusion", "cross_uniform_soup", 0.0)
    versus("cross_delta_fusion ≥ cross_ties (overall)", "cross_delta_fusion", "cross_ties", 0.0)
    codiemb, naive = suite.per_seed("codiemb"), suite.per_seed("naive_joint")
    both = [s for s in seeds if s in codiemb and s in naive]
    if both:
        gaps = {s: codiemb[s]["stsb_test"] - naive[s]["stsb_test"] for s in both}
        complete = len(both) == len(seeds)
        checks.append((all(g >= 0 for g in gaps.values()) if complete or any(g < 0 for g in gaps.values()) else None,
                       "codiemb ≥ naive_joint on stsb_test at every seed",
                       "; ".join(f"seed {s}: {codiemb[s]['stsb_test']:.2f} vs {naive[s]['stsb_test']:.2f} "
                                 f"({g:+.2f})" for s, g in gaps.items())
                       + ("" if complete else f" ({len(both)} of {len(seeds)} seeds)")))
    else:
        checks.append((None, "codiemb ≥ naive_joint on stsb_test at every seed", "not measured yet"))
    boot = comparisons.get("codiemb vs naive_joint", {})
    if overall["codiemb"] and overall["naive_joint"]:
        c = compare(overall["codiemb"], overall["naive_joint"])
        intervals = "; ".join(f"seed {s}: {r['overall']['difference']:+.2f} [{r['overall']['ci_low']:+.2f}, "
                              f"{r['overall']['ci_high']:+.2f}]" for s, r in boot.items())
        checks.append((c["difference"] >= 0, "codiemb vs naive_joint overall, with its interval",
                       f"mean {c['difference']:+.2f} over {len(overall['codiemb'])} seeds (sd {c['sd']:.2f}: "
                       f"{c['verdict']}); paired bootstrap 95 % per seed: {intervals or 'not computed'}"))
    else:
        checks.append((None, "codiemb vs naive_joint overall, with its interval", "not measured yet"))
    rows = [s.name for s in suite.specs.values() if s.kind != "base"]
    full = [name for name in rows if len(overall[name]) == len(seeds)]
    checks.append((len(full) == len(rows) if full else None, f"{len(seeds)}-seed sd of every headline row reported",
                   f"{len(full)} of {len(rows)} trained/merged rows have all {len(seeds)} seeds"))
    return checks


def write_plot(path: Path, names: list[str], columns: list[str], stats: dict[str, dict[str, tuple]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [n for n in names if stats[n]["avg"][0] is not None]
    fig, ax = plt.subplots(figsize=(max(7.0, 0.75 * len(shown) + 2), 4.8))
    width = 0.8 / max(1, len(columns))
    for i, column in enumerate(columns):
        values = [stats[n][column][0] or 0.0 for n in shown]
        errors = [stats[n][column][1] or 0.0 for n in shown]
        ax.bar([x + (i - (len(columns) - 1) / 2) * width for x in range(len(shown))], values, width, yerr=errors,
               capsize=2, label=column)
    ax.set_xticks(range(len(shown)))
    ax.set_xticklabels(shown, rotation=40, ha="right", fontsize=7)
    ax.set_ylabel("score ×100, mean ± sd over seeds")
    finite = [stats[n][c][0] for n in shown for c in columns if stats[n][c][0] is not None]
    if finite:
        ax.set_ylim(max(0.0, min(finite) - 5), min(100.0, max(finite) + 3))
    ax.legend(fontsize=8, ncol=min(4, len(columns)))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def kept_analysis(text: str) -> str:
    if ANALYSIS_BEGIN in text and ANALYSIS_END in text:
        return text.split(ANALYSIS_BEGIN, 1)[1].split(ANALYSIS_END, 1)[0].strip()
    return ""


def replace_section(existing: str, section: str) -> str:
    """`existing` with its suite-v2 section replaced by `section` (put first when it has none)."""
    if SUITE_BEGIN in existing and SUITE_END in existing:
        head, rest = existing.split(SUITE_BEGIN, 1)
        return head + section + rest.split(SUITE_END, 1)[1]
    return section + ("\n" + existing if existing else "")


def bootstrap_lines(comparisons: dict[str, Any]) -> list[str]:
    lines = ["| comparison (A vs B) | seed | set | A | B | A − B | 95 % interval | P(A > B) |",
             "|---|---:|---|---:|---:|---:|---|---:|"]
    for label, per_seed in comparisons.items():
        for seed, sets in per_seed.items():
            for name, r in sets.items():
                lines.append(f"| {label} | {seed} | {name} | {r['a']:.2f} | {r['b']:.2f} | {r['difference']:+.2f} | "
                             f"[{r['ci_low']:+.2f}, {r['ci_high']:+.2f}] | {r['p_a_wins']:.2f} |")
    return lines


MRPC_DECISION = (
    "STS trains on STS-B train only; MRPC is left out on purpose: its labels are binary paraphrase judgements "
    "(0/1), not graded similarity, so as a second STS pair source it would pull the STS objective towards a "
    "classification signal that STS-B test (the only STS evaluation) does not measure, and at a fixed step "
    "budget every MRPC batch replaces an STS-B batch. The IR side gets its second source (SNLI triplets: "
    "anchor, entailment as positive, contradiction as hard negative), which is what the cross-source "
    "comparison needs.")


def report_data_folder(report: Path) -> Path:
    """The folder beside a report page that holds its data (`results/suite.md` -> `results/suite/`)."""
    return report.with_suffix("")


def write_report(suite: Suite, command: str, quick: bool, wall_minutes: Optional[float] = None) -> Path:
    """The suite-v2 section of the report page (table and reading first, then targets, bootstrap, runs, setup),
    with its data beside it: `configs.json` (budgets, run keys, configs) and the bar chart `results.png`."""
    report = Path(suite.args.report)
    data_folder = report_data_folder(report)
    plot, configs_file = data_folder / "results.png", data_folder / "configs.json"
    tasks = {c["name"]: c["task"] for c in suite.set_configs}
    specs = list(suite.specs.values())
    seeds = list(suite.budgets.seeds)
    columns = list(tasks) + ["ir_avg", "sts_avg", "avg"]
    per_seed = {spec.name: suite.per_seed(spec.name) for spec in specs}
    stats = {name: {c: mean_sd(values_of(rows, c)) for c in columns} for name, rows in per_seed.items()}
    comparisons = suite.comparisons()
    suite.results.comparisons = comparisons
    suite.results.save()
    lines = ["| run | " + " | ".join(list(tasks) + ["IR avg", "STS avg", "overall"]) + " | seeds | minutes | CPU-min |",
             "|---|" + "---:|" * (len(columns) + 3)]
    finished = wall = cpu = 0.0
    for spec in specs:
        entries = [e for e in (suite.entry(spec.name, s) for s in (seeds if spec.kind != "base" else [None])) if e]
        finished += len(entries)
        minutes, cpu_minutes = sum(run_seconds(e) for e in entries) / 60, sum(run_seconds(e, "cpu_") for e in entries) / 60
        wall, cpu = wall + minutes, cpu + cpu_minutes
        n = "1 (no training)" if spec.kind == "base" else str(len(per_seed[spec.name]))
        lines.append(f"| `{spec.name}` | " + " | ".join(fmt(*stats[spec.name][c]) if spec.kind != "base"
                                                      else fmt(stats[spec.name][c][0]) for c in columns)
                     + f" | {n} | {minutes:.1f} | {cpu_minutes:.1f} |")
    planned = len(plan_rows(suite.budgets))
    checks = target_checks(suite, comparisons)
    mark = {True: "✓", False: "✗", None: "…"}
    budgets = suite.budgets
    existing = report.read_text("utf-8") if report.is_file() else ""
    analysis = kept_analysis(existing) or (
        "_Not written yet._ For every ✗ above: which task falls short, by how much, and why, with the numbers "
        "of the table and the paired bootstrap.")
    missed = [f"- **{target}**: {numbers}" for ok, target, numbers in checks if ok is False]
    eval_sets = ", ".join(f"`{c['name']}` ({c['task']}, {c['path']})" for c in suite.set_configs)
    loads = [e["load_average"] for e in (suite.entry(spec.name, seed) for spec, seed in plan_rows(budgets))
             if e and e.get("load_average") is not None]
    sizes = suite.training_sizes()
    keys = {spec.name: {str(s): suite.key(spec, s) for s in row_seeds(spec, budgets)} for spec in specs}
    section = [
        SUITE_BEGIN,
        f"# Experiment suite v2 (issue 16): {len(seeds)} seed{'s' if len(seeds) > 1 else ''}, two training sources "
        "per task"
        + (" — QUICK MODE, verification only, not results" if quick else ""),
        "",
        f"Generated {now()} by `{command}`; {finished:.0f} of {planned} runs (rows × seeds) scored; "
        f"{wall:.0f} min wall / {cpu:.0f} CPU-min of compute recorded"
        + (f" ({wall_minutes:.0f} min wall for this invocation)" if wall_minutes is not None else "")
        + (f"; 1-min load average while scoring {min(loads):.1f}–{max(loads):.1f} on 2 cores" if loads else "")
        + ". Metrics ×100, mean ± sample sd over the seeds "
        f"{', '.join(map(str, seeds))}: STS sets Spearman of cosine similarity (`cosine_spearman`), IR sets "
        "nDCG@10 (`ndcg_at_10`); IR avg and STS avg average a task's sets, overall averages the two. "
        "**Tie rule**: a difference of means smaller than the larger of the two rows' seed sd is a tie.",
        "",
        *lines,
        "",
        f"![results]({data_folder.name}/{plot.name})",
        "",
        "## Reading (suite v2)",
        "",
        ("Missed targets:\n\n" + "\n".join(missed) + "\n") if missed else "No measured target is missed.\n",
        ANALYSIS_BEGIN,
        analysis,
        ANALYSIS_END,
        "",
        "## Targets (suite v2)",
        "",
        *[f"- {mark[ok]} {target}: {numbers}" for ok, target, numbers in checks],
        "",
        "## Paired bootstrap per seed",
        "",
        f"{budgets.eval.bootstrap_resamples} resamples of the test items (queries, pairs) per seed, the same draws "
        "for A and B (`paired_comparison.paired_bootstrap_sets`); `overall` resamples every set at once. "
        "`best_cross_member` is the member with the best overall mean.",
        "",
        *bootstrap_lines(comparisons),
        "",
        "## Runs (suite v2)",
        "",
        *[f"- `{spec.name}`: {spec.description}" for spec in specs],
        "",
        "## Setup: configs, seeds and budgets (suite v2)",
        "",
        f"- model `{suite.model}`; training seeds {seeds} (`seed_everything` and `data.seed`); every capped "
        f"training source is the same seeded subset (seed {DATA_SEED}) at every seed; BOOM's bagged runs at seed s "
        "are seeded 10·s + 1, 10·s + 2, ... (`sweeps.boom.run_boom`, all its runs trained by it).",
        f"- training data ({sizes}): SciFact train with hard negatives mined by the base model (ranks "
        f"{budgets.mining.rank_range[0]}–{budgets.mining.rank_range[1]}, margin {budgets.mining.margin}, "
        f"{budgets.mining.num_negatives} per query, judged positives excluded) + SNLI triplets (IR); STS-B train "
        "(scores 0–5 normalised to [0, 1]). IR gets twice STS's records, as CoDiEmb's data does (retrieval outweighs "
        "STS): with equal task sizes the `balanced` policy would plan exactly `proportional`'s steps (every task "
        "max_t N_t) and its rows would repeat `codiemb`'s.",
        f"- {MRPC_DECISION}",
        f"- evaluation: {eval_sets}; texts truncated to {budgets.eval.max_length} tokens; SciFact test's corpus is "
        f"every document judged for a test query plus seeded random distractors, {budgets.eval.ir_max_documents} "
        "documents in all (of 5 183), identical for every row: nDCG@10 is higher than on the full corpus and is "
        "comparable only within this table.",
        f"- greedy soup selects on held-out data only: STS-B dev ({budgets.eval.dev_sts_samples} pairs) + "
        f"{budgets.eval.dev_ir_queries} SciFact train queries outside the training subset over "
        f"{budgets.eval.dev_ir_documents} documents.",
        f"- snapshots for `codiemb_*` merges: every ⌊steps / {budgets.fusion.snapshots}⌋ optimizer steps of `codiemb` "
        "plus its last step, merged against θ0; `cross_*` and `specialists_delta_fusion` merge final weights "
        "of the same seed against θ0 (the base model).",
        f"- budgets (identical for every run of the invocation), the run key of every row per seed and the resolved "
        f"configs of the first seed: [`{data_folder.name}/{configs_file.name}`]({data_folder.name}/{configs_file.name})"
        + (f"; every run's config, metrics and timings: [`{data_folder.name}/{Path(suite.args.results).name}`]"
           f"({data_folder.name}/{Path(suite.args.results).name})"
           if Path(suite.args.results).resolve().parent == data_folder.resolve() else
           f"; every run's config, metrics and timings: `{suite.args.results}`") + ".",
        "",
        SUITE_END,
    ]
    data_folder.mkdir(parents=True, exist_ok=True)
    configs = {"budgets": asdict(budgets), "keys": keys,
               "configs": {spec.name: run_config(spec, suite.model, budgets, suite.specs,
                                                 None if spec.kind == "base" else seeds[0]) for spec in specs}}
    atomic_write_text(configs_file, json.dumps(configs, indent=1) + "\n")
    atomic_write_text(report, replace_section(existing, "\n".join(section)))
    write_plot(plot, [s.name for s in specs], list(tasks) + ["avg"], stats)
    return report


# ---------------------------------------------------------------------------------------------------------
# Command line

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO_ROOT.parent / "shared" / "data"),
                        help="folder with ir/scifact (BEIR), sts/stsb/{train,dev,test}.jsonl, train/snli_triplets.jsonl")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="base model (default: all-MiniLM-L6-v2, packaged)")
    parser.add_argument("--quick", action="store_true", help="a few steps on subsampled data (verification only)")
    parser.add_argument("--only", nargs="+", choices=RUN_NAMES, metavar="NAME", help=f"rows to do: {RUN_NAMES}")
    parser.add_argument("--seeds", nargs="+", type=int, help="override the training seeds (default 42 43 44)")
    parser.add_argument("--extra-sts", action="append", default=[], metavar="NAME=FILE", help="another STS test set")
    parser.add_argument("--extra-ir", action="append", default=[], metavar="NAME=DIR",
                        help="another BEIR folder (qrels/test.tsv)")
    parser.add_argument("--epochs", type=int, help="override the training budget's epochs")
    parser.add_argument("--max-steps", type=int, help="override the training budget's step cap (-1: none)")
    parser.add_argument("--sts-train-samples", type=int, help="override the STS-B train cap (0: all 5749 pairs)")
    parser.add_argument("--sp-steps", type=int, help="override Self Positioning's steps")
    parser.add_argument("--workdir", help="models, merges, per-item values (default benchmarks/suite_runs)")
    parser.add_argument("--results", help="results JSON (default benchmarks/results/suite/runs.json; quick: under runs/)")
    parser.add_argument("--report", help="markdown report page (default benchmarks/results/suite.md, its data in "
                                         "results/suite/; quick: under runs/)")
    parser.add_argument("--estimate-only", action="store_true", help="print the plan and its time estimate, stop")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from the cached results")
    parser.add_argument("--testbed", action="store_true",
                        help="the distillation test bed instead of the suite (benchmarks/testbed.py; report "
                             "results/testbed.md)")
    parser.add_argument("--testbed-rows", nargs="+", metavar="NAME", help="test bed rows to do (default: all)")
    return parser


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    if args.testbed:
        from testbed import testbed_paths

        results, report = testbed_paths()
        args.workdir = args.workdir or str(WORKDIR)
        args.results, args.report = args.results or str(results), args.report or str(report)
        return args
    defaults = ((QUICK_DIR / "work", QUICK_DIR / "suite" / "runs.json", QUICK_DIR / "suite.md") if args.quick else
                (WORKDIR, RESULTS_DIR / "suite" / "runs.json", RESULTS_DIR / "suite.md"))
    args.workdir = args.workdir or str(defaults[0])
    args.results = args.results or str(defaults[1])
    args.report = args.report or str(defaults[2])
    if not args.quick and Path(args.results).resolve() == (QUICK_DIR / "suite" / "runs.json").resolve():
        raise SystemExit("the quick results file is for --quick only")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    budgets = scaled(QUICK if args.quick else FULL, args.epochs, args.sp_steps, args.sts_train_samples, args.seeds,
                     args.max_steps)
    if args.testbed:
        from testbed import run_testbed

        return run_testbed(args, budgets)
    suite = Suite(args, budgets)
    for needed in ("ir/scifact", "sts/stsb", "train/snli_triplets.jsonl"):
        if not (suite.data / needed).exists():
            raise SystemExit(f"{suite.data} has no {needed} (pass --data)")
    plan = plan_rows(budgets, args.only)
    if args.only:   # the rows a chosen row merges are built (and scored) too
        needed = {dep for spec, _ in plan for dep in dependencies(spec)} | set(args.only)
        plan = plan_rows(budgets, sorted(needed))
    clock = Clock()
    command = "python benchmarks/experiments.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.report_only:
        log(f"report {write_report(suite, command.strip(), args.quick)}")
        return 0
    estimate = suite.estimate(plan)
    if args.estimate_only:
        return 0
    failed = []
    for spec, seed in plan:
        try:
            suite.run(spec, seed)
        except Interrupted as stop:
            log(f"interrupted: {stop}; rerun the same command to resume (finished runs are skipped)")
            break
        except (Exception, SystemExit) as error:   # one failed run must not stop the others; rerun to retry it
            failed.append(f"{spec.name} seed {seed}: {type(error).__name__}: {' '.join(str(error).split())[:300]}")
            log(f"FAILED {failed[-1]}")
    wall, cpu = clock.seconds()
    report = write_report(suite, command.strip(), args.quick, wall / 60)
    log(f"done in {wall / 60:.1f} min, {cpu / 60:.1f} CPU-min of this process (estimate {estimate / 60:.0f} min); "
        f"results {args.results}; report {report}"
        + (f"; {len(failed)} run(s) failed (rerun the same command to retry them):\n  " + "\n  ".join(failed)
           if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
