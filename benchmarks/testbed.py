"""The distillation test bed (issue 23), shared by the next issues (Matryoshka, task conflicts add rows):

    python benchmarks/experiments.py --testbed                       # every row, 3 seeds (≤ 1 hour, idle CPU)
    python benchmarks/experiments.py --testbed --seeds 42 --max-steps 12 --testbed-rows student teacher

A small student — the first `STUDENT_LAYERS` blocks of all-MiniLM-L6-v2, far enough below the full model to
move by points — trained on the suite's data (SciFact train with mined hard negatives + SNLI triplets for IR,
STS-B train for STS, the suite's seeded caps) for `TestbedBudget.max_steps` optimizer steps, then scored on the
suite's test sets (STS-B test, SciFact test over its 1 000-document corpus), at every seed; mean ± sd and the
suite's tie rule. The teacher is fixed before any student runs: the base all-MiniLM-L6-v2 (6 layers), not a
fine-tune of it on the suite's data — the suite's own rows show one epoch of fine-tuning moves MiniLM by tenths
(results/suite.md), so a fine-tuned teacher would cost a training run per invocation and change nothing
the student can learn, and the base model is a fixed, published reference anyone can rerun.

SciFact's hard negatives are mined by the base model and rescored by the teacher (`codiemb mine-negatives
--teacher`, the same margin): every row trains on this one file (its `teacher_scores` are used by the rows that
distil from the data and ignored by the others).

Rows (`TESTBED_ROWS`; a later issue appends a `TestbedRow`): `fit` rows run `codiemb fit` with
`model.num_layers` and the row's `model.distillation`; `peer` is sentence-transformers' own training of the same
student on the same batches (`DistillKLDivLoss` on the teacher-scored SciFact records, MNRL on SNLI, CoSENT on
STS-B); `teacher` scores the teacher without training. Runs are cached by config in the suite's workdir and
`--results` (default results/testbed/runs.json); the page is results/testbed.md.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import torch

from experiment_runs import DEFAULT_MODEL, TRAIN_SOURCES, Budgets, config_key, mining_config, unit_config
from experiments import (ANALYSIS_BEGIN, ANALYSIS_END, RESULTS_DIR, Clock, Suite, codiemb, compare, fmt,
                         kept_analysis, load_average, log, mean_sd, now, row_scores)
from testbed_selection import Selection

from testbed_conflict import add_probe, apply_mix, chosen_lr, conflict_series, issue25_lines, mixed_caps, probe_config

from codiemb_pl.storage.atomic import atomic_write_text

TESTBED_VERSION = 1
TEACHER = DEFAULT_MODEL
STUDENT_LAYERS = 3
TEACHER_SETTINGS = {"model": TEACHER, "batch_size": 64, "max_seq_length": 128}
TEMPERATURES = {"teacher_temperature": 0.05, "student_temperature": 0.05}


@dataclass(frozen=True)
class TestbedBudget:
    """What every student run of the test bed shares (the suite's data caps, batch sizes and lengths)."""

    max_steps: int = 36            # one pass over the suite's capped data: 6 SciFact + 18 SNLI + 12 STS-B batches
    lr: float = 1e-4               # the distillation recipe's (configs/recipes/distill_minilm.yaml)
    seeds: tuple[int, ...] = (42, 43, 44)


ROW_KINDS = ("fit", "peer", "teacher", "untrained", "cross")
# SciFact's hard negatives: `base` mined by the base model and rescored by the teacher (its margin only: the same
# model, so it removes ~nothing). The second table of issue 23 mines with the untrained student: `student` with its
# own margin (the default `--margin 0.95`), `student_teacher` the same candidates after the teacher's filters;
# `student_no_margin` without any score filter, `student_no_margin_teacher` the same with the teacher's filters
# (`--no-margin --teacher-margin 0.95 --teacher-top-k`): the teacher alone catches the false negatives
MINING_VARIANTS = ("base", "student", "student_teacher", "student_no_margin", "student_no_margin_teacher")
TEACHER_TOP_K = 10   # consistency filter: a query stays if the teacher ranks a positive in its top 10 candidates
SEEDLESS_KINDS = ("teacher", "untrained")   # scored once: no training, no seed


@dataclass(frozen=True)
class TestbedRow:
    """One row: `fit` (codiemb fit of the student with `distillation`), `peer`, `teacher`, `untrained` (the cut
    student before any step) or `cross` (`method` over the final weights of the fit rows `members`, same seed, against
    the untrained student). Issue 25's fit options (`testbed_conflict.py`): `probe` (the gradient-conflict probe on
    the dev sets), `lr_grid` (lr chosen on the dev sets), `mix` (fraction of each source's capped records),
    `step_factor` (× the budget's steps)."""

    name: str
    description: str
    kind: str = "fit"
    distillation: Optional[dict[str, Any]] = None
    overrides: dict[str, Any] = field(default_factory=dict)   # extra model.* keys of a fit row
    train: dict[str, Any] = field(default_factory=dict)       # the unit's policy / sts_objective, when not CoDiEmb's
    select: Optional[str] = None   # a `testbed_selection` family: `distillation` is its dev-set choice
    mining: str = "base"           # SciFact's negatives: one of MINING_VARIANTS
    probe: bool = False
    lr_grid: tuple[float, ...] = ()
    mix: Optional[dict[str, float]] = None
    step_factor: int = 1
    members: tuple[str, ...] = ()
    method: Optional[str] = None
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in ROW_KINDS:
            raise ValueError(f"test bed row {self.name}: kind must be one of {ROW_KINDS}, got {self.kind!r}")
        if self.mining not in MINING_VARIANTS:
            raise ValueError(f"test bed row {self.name}: mining must be one of {MINING_VARIANTS}, got {self.mining!r}")


# issue 25's cross-fusion members differ in data mix (fractions of the capped SciFact / SNLI / STS-B records: 192 /
# 576 / 384 at the full budget) and in learning rate; their union is the capped data itself, `union_run`'s
MEMBERS = {"member_ir_heavy": ({"scifact": 1.0, "snli": 1.0, "stsb": 1 / 3}, 1e-4, "IR-heavy mix (6 + 18 IR batches, "
                               "4 STS), lr 1e-4"),
           "member_sts_heavy": ({"scifact": 1 / 3, "snli": 1 / 9, "stsb": 1.0}, 2e-4, "STS-heavy mix (2 + 2 IR batches, "
                                "12 STS), lr 2e-4"),
           "member_balanced": ({"scifact": 1.0, "snli": 1 / 3, "stsb": 1.0}, 5e-5, "balanced mix (6 + 6 IR batches, 12 "
                               "STS), lr 5e-5")}
FUSION_PARAMS = {"delta_guided": {"gamma": 1.0}, "ties": {"density": 0.2}, "uniform_soup": {}}   # the suite's
TASK_LORA = {"r": 16, "alpha": 32.0, "dropout": 0.05, "task_adapters": True}   # export fusion: delta-guided (default)
LORA_LR_GRID = (1e-4, 3e-4, 1e-3)   # the full-parameter lr up to 10x it: LoRA's usual range


def cross_row(name: str, method: str) -> TestbedRow:
    members = tuple(MEMBERS)
    return TestbedRow(name, f"task conflict: {method} of " + ", ".join(f"`{m}`" for m in members) + " (final weights, "
                      "same seed) against the untrained student", kind="cross", members=members, method=method,
                      params=FUSION_PARAMS[method])


TESTBED_ROWS: list[TestbedRow] = [
    TestbedRow("student", "the student, CoDiEmb losses, no teacher (the gradient-conflict probe on the dev sets)",
               probe=True),
    TestbedRow("score_kd_mined", "+ IR score distillation (λ_KD 1) from the mined `teacher_scores`",
               distillation={"ir_weight": 1.0, "scores_from": "data", **TEMPERATURES}),
    TestbedRow("online_teacher", "+ IR score distillation (λ_KD 1) and STS targets blended with the teacher (β 0.5), "
               "the teacher run on every step", distillation={"ir_weight": 1.0, "sts_weight": 0.5, "teacher": TEACHER_SETTINGS,
                                                 **TEMPERATURES}),
    TestbedRow("embedding_kd", "+ embedding distillation (λ_E 1, MSE) to the online teacher's embeddings",
               distillation={"embedding_weight": 1.0, "scores_from": "data", "teacher": TEACHER_SETTINGS, **TEMPERATURES}),
    # dev-set selection (`testbed_selection.py`): each family's best candidate on STS-B dev + SciFact-train hold-out
    TestbedRow("score_kd_dev", "score distillation from the mined `teacher_scores`, λ_KD and τ chosen on the dev sets",
               select="score_kd"),
    TestbedRow("online_teacher_dev", "the online teacher (IR scores + STS blend), β chosen on the dev sets from the "
               "score-distillation choice", select="online_teacher"),
    TestbedRow("embedding_kd_dev", "embedding distillation, λ_E chosen on the dev sets", select="embedding_kd"),
    # teacher-aware mining (the second table): the same student trained on negatives mined without / with the teacher
    TestbedRow("mined_by_student", "the student (no distillation) on SciFact negatives mined by the untrained "
               "student itself, no teacher filter", mining="student"),
    TestbedRow("mined_by_student_teacher_filtered", "the same, on those candidates after the teacher's filters "
               f"(margin 0.95 on its scores, consistency top-{TEACHER_TOP_K})", mining="student_teacher"),
    TestbedRow("mined_by_student_no_margin", "the student on negatives the untrained student mined with no score "
               "filter (ranks 10-50, positives excluded)", mining="student_no_margin"),
    TestbedRow("mined_by_student_no_margin_teacher_filtered", "the same candidates after the teacher's filters only "
               f"(`--no-margin --teacher-margin 0.95 --teacher-top-k {TEACHER_TOP_K}`)", mining="student_no_margin_teacher"),
    TestbedRow("peer_st_distillkldiv", "the peer: sentence-transformers' DistillKLDivLoss (+ MNRL, CoSENT) on the "
               "same student, sources, batch sizes, lr schedule and steps (every text truncated at the passage length)",
               kind="peer"),
    TestbedRow("teacher", "the teacher: all-MiniLM-L6-v2 (6 layers), no training", kind="teacher"),
    TestbedRow("student_untrained", "the student before any step: the teacher's first 3 blocks, its pooling",
               kind="untrained"),
    TestbedRow("student_matryoshka", "the student with Matryoshka widths (issue 24): model.matryoshka_dims "
               "[384, 256, 128, 64, 32], uniform weights; full-width scores (widths: results/matryoshka.md)",
               overrides={"matryoshka_dims": [384, 256, 128, 64, 32]}),
    # task conflict (issue 25): `student` is the CoDiEmb row (proportional single-task steps, task losses)
    TestbedRow("naive_joint", "task conflict: the `mixed` policy (IR and STS items in every batch), task losses (the "
               "gradient-conflict probe on the dev sets)", train={"policy": "mixed"}, probe=True),
    TestbedRow("codiemb_balanced", "task conflict: CoDiEmb with the `balanced` sampler", train={"policy": "balanced"}),
    TestbedRow("joint_sum", "task conflict: the `joint` policy (one IR and one STS batch every step), plain sum of "
               "the task losses (the control that separates the sampler from the combination)",
               train={"policy": "joint"}),
    TestbedRow("joint_pcgrad", "task conflict: `joint` steps, PCGrad", train={"policy": "joint"},
               overrides={"gradient_combination": "pcgrad"}),
    TestbedRow("joint_mgda", "task conflict: `joint` steps, MGDA", train={"policy": "joint"},
               overrides={"gradient_combination": "mgda"}),
    TestbedRow("task_lora_fused", "task conflict: task-routed LoRA (shared + one adapter set per task, r 16, alpha 32, "
               "all linear layers) on the student; export = W0 + shared + delta-guided fusion of the task adapters; "
               f"lr chosen on the dev sets from {list(LORA_LR_GRID)}", overrides={"lora": TASK_LORA},
               lr_grid=LORA_LR_GRID),
    *[TestbedRow(name, f"cross-fusion member: {what}", mix=mix, overrides={"lr": lr})
      for name, (mix, lr, what) in MEMBERS.items()],
    cross_row("cross_delta_fusion", "delta_guided"),
    cross_row("cross_ties", "ties"),
    cross_row("cross_uniform_soup", "uniform_soup"),
    TestbedRow("union_run", "task conflict: one run on the union of the members' data (the capped data) with their "
               f"total steps ({len(MEMBERS)} x the budget), lr 1e-4 (the bed's): the control a merge must beat",
               step_factor=len(MEMBERS)),
]


class Testbed(Suite):
    """The suite's data and scoring with the test bed's student, teacher-mined negatives and rows."""

    def __init__(self, args, budgets: Budgets, testbed: TestbedBudget):
        super().__init__(args, budgets)
        self.testbed = testbed
        self.rows = {row.name: row for row in TESTBED_ROWS}
        self.selection = Selection(self)

    # -- data: SciFact mined by the base model, rescored by the teacher --------------------------------------
    def mining_key(self) -> str:
        return config_key({**mining_config(self.model, self.budgets), "teacher": TEACHER_SETTINGS})

    def mined_path(self) -> Path:
        return self.workdir / "mined" / f"scifact_train_teacher_{self.mining_key()}.jsonl"

    def mining_arguments(self, output: Path) -> list[str]:
        return super().mining_arguments(output) + [
            "--teacher", TEACHER, "--teacher-batch-size", str(TEACHER_SETTINGS["batch_size"]),
            "--teacher-max-seq-length", str(TEACHER_SETTINGS["max_seq_length"])]

    def mined_negatives(self) -> Path:
        """The suite's mining, rescored and filtered by the teacher; what its filters removed is kept beside."""
        path = self.mined_path()
        if not path.is_file():
            self.mine_with_summary(path, super().mined_negatives, self.mining_arguments(path))
        return path

    def mine_with_summary(self, path: Path, mine: Any, arguments: list[str]) -> None:
        """Run `mine()` (which writes `path`), echo its output and keep the command, the teacher's filter line and
        the time in `path`'s `.summary.json`."""
        clock, printed = Clock(), io.StringIO()
        with contextlib.redirect_stdout(printed):
            mine()
        print(printed.getvalue(), end="")
        summary = next((line for line in printed.getvalue().splitlines() if line.startswith("teacher ")), "")
        atomic_write_text(path.with_suffix(".summary.json"), json.dumps(
            {"command": "codiemb " + " ".join(arguments), "teacher_filters": summary, "seconds": clock.seconds(),
             **_record_counts(path)}) + "\n")

    def mining_summary(self, variant: str = "base") -> dict[str, Any]:
        path = self.mined_path() if variant == "base" else self.variant_path(variant)
        summary = path.with_suffix(".summary.json")
        return json.loads(summary.read_text("utf-8")) if summary.is_file() else {}

    # -- the second table: negatives mined by the student, without and with the teacher's filters -----------------
    def variant_path(self, variant: str) -> Path:
        teacher = variant.endswith("_teacher")
        key = config_key({**mining_config(self.model, self.budgets), "miner": "student", "layers": STUDENT_LAYERS,
                          "teacher": TEACHER_SETTINGS if teacher else None, "top_k": TEACHER_TOP_K if teacher else None,
                          **({"own_margin": False} if "no_margin" in variant else {})})
        return self.workdir / "mined" / f"scifact_train_{variant}_{key}.jsonl"

    def variant_arguments(self, variant: str, output: Path) -> list[str]:
        args = super().mining_arguments(output)
        args[args.index("--model") + 1] = str(self.untrained_student())
        if "no_margin" in variant:
            margin = args.index("--margin")
            teacher_margin = args[margin + 1]
            args[margin:margin + 2] = ["--no-margin"]
            if variant.endswith("_teacher"):
                args += ["--teacher-margin", teacher_margin]
        if variant.endswith("_teacher"):
            args += ["--teacher", TEACHER, "--teacher-top-k", str(TEACHER_TOP_K),
                     "--teacher-batch-size", str(TEACHER_SETTINGS["batch_size"]),
                     "--teacher-max-seq-length", str(TEACHER_SETTINGS["max_seq_length"])]
        return args

    def mined_variant(self, variant: str) -> Path:
        """SciFact train mined by the untrained student (`student`), or the same candidates after the teacher's
        filters (`student_teacher`), cached by config."""
        path = self.variant_path(variant)
        if path.is_file():
            return path
        args = self.variant_arguments(variant, path)

        def mine() -> None:
            log(f"mining hard negatives: codiemb {' '.join(args)}")
            if codiemb(args) != 0:
                raise SystemExit("codiemb mine-negatives failed (see above)")

        self.mine_with_summary(path, mine, args)
        return path

    def untrained_student(self) -> Path:
        """The student before any step (the teacher's first blocks, its pooling), saved once."""
        folder = self.workdir / "train" / self.row_key(self.rows["student_untrained"], None) / "model"
        if not (folder / "modules.json").is_file():
            from codiemb_pl.model.encoder import TextEncoder

            TextEncoder(self.model_folder, num_layers=STUDENT_LAYERS).save(folder)
        return folder

    # -- runs ---------------------------------------------------------------------------------------------------
    def unit_of(self, row: TestbedRow, seed: int, lr: Optional[float] = None) -> dict[str, Any]:
        """The training unit of a fit row (its key); a `lr_grid` row's unit names the grid, and with `lr` it is the
        fit at that lr. Issue 25's options enter only when set, so the other rows keep their keys."""
        testbed = {"version": TESTBED_VERSION, **asdict(self.testbed), "seeds": None, "layers": STUDENT_LAYERS,
                   "teacher_mining": self.mining_key(), "row": row.kind, "distillation": row.distillation,
                   "overrides": row.overrides}
        if row.mining != "base":   # only when not the base file, so the rows run before the variants keep their keys
            testbed["mining"] = row.mining
        if row.probe:
            testbed["probe"] = probe_config(self)
        if row.mix:
            testbed["mix"] = mixed_caps(self, row.mix)
        if row.step_factor != 1:
            testbed["max_steps"] = self.testbed.max_steps * row.step_factor
        if row.lr_grid and lr is None:
            testbed["lr_grid"] = list(row.lr_grid)
        elif row.lr_grid:
            testbed["lr"] = lr
        train = {"tasks": ["ir", "sts"], "policy": "proportional", "sts_objective": "codiemb", **row.train,
                 "testbed": testbed}
        return unit_config(self.model, self.budgets, train, seed)

    def row_key(self, row: TestbedRow, seed: Optional[int]) -> str:
        if row.kind == "teacher":
            return config_key({"testbed": TESTBED_VERSION, "teacher": TEACHER})
        if row.kind == "untrained":
            return config_key({"testbed": TESTBED_VERSION, "untrained": TEACHER, "layers": STUDENT_LAYERS})
        if row.kind == "cross":
            return config_key({"testbed": TESTBED_VERSION, "cross": row.method, "params": row.params,
                               "members": [self.row_key(self.rows[name], seed) for name in row.members]})
        return config_key(self.unit_of(row, seed))

    def fit_config(self, unit: dict[str, Any], folder: Path) -> dict[str, Any]:
        config = super().fit_config(unit, folder)
        testbed = unit["testbed"]
        config["trainer"]["max_epochs"] = -1
        config["trainer"]["max_steps"] = testbed["max_steps"]
        config["model"].update({"num_layers": testbed["layers"], "lr": testbed["lr"], **testbed["overrides"]})   # lr too
        if testbed["distillation"]:
            config["model"]["distillation"] = testbed["distillation"]
        if testbed.get("mining"):
            scifact = next(source.name for source in TRAIN_SOURCES if source.split)
            for entry in config["data"]["train"]:
                if entry["name"] == scifact:
                    entry["path"] = str(self.mined_variant(testbed["mining"]))
        if testbed.get("mix"):
            apply_mix(config, testbed["mix"])
        if testbed.get("probe"):
            add_probe(self, config)
        return config

    def build_row(self, row: TestbedRow, seed: Optional[int]) -> tuple[Path, dict[str, Any]]:
        if row.kind == "teacher":
            return Path(self.model_folder), {}
        if row.kind == "untrained":
            return self.untrained_student(), {}
        if row.kind == "cross":
            return self.build_cross_row(row, seed)
        info: dict[str, Any] = {}
        unit = self.unit_of(row, seed)
        if row.lr_grid:   # the dev-set choice first (`testbed_conflict.chosen_lr`), then the fit at that lr
            lr, scored = chosen_lr(self, row)
            unit = self.unit_of(row, seed, lr=lr)
            info.update(lr=lr, selection=scored)
        if row.kind == "fit":
            folder = self.train_unit(unit)
        else:
            folder = self.train_peer(unit)
        if row.probe:
            info["conflict"] = conflict_series(folder)
        cost = folder / "cost.json"
        return folder / "model", {"unit": config_key(unit), "steps": unit["testbed"]["max_steps"],
                                  "fit": json.loads(cost.read_text("utf-8")) if cost.is_file() else None, **info}

    def build_cross_row(self, row: TestbedRow, seed: int) -> tuple[Path, dict[str, Any]]:
        """`codiemb fuse` of the members' final weights (trained now unless cached) against θ0 = the untrained
        student, which also gives the output its config and pooling."""
        members = [self.train_unit(self.unit_of(self.rows[name], seed)) / "model" for name in row.members]
        output = self.workdir / "merged" / self.row_key(row, seed)
        info = {"members": list(row.members), "method": row.method, "params": row.params}
        if not (output / "modules.json").is_file():
            base = str(self.untrained_student())
            self.fuse(base, [str(m) for m in members], row, seed, output, template=base)
        return output, info

    def train_peer(self, unit: dict[str, Any]) -> Path:
        """sentence-transformers' training of the student on the same sources, batch sizes and step count."""
        folder = self.workdir / "train" / config_key(unit)
        if (folder / "model" / "modules.json").is_file():
            return folder
        folder.mkdir(parents=True, exist_ok=True)
        clock = Clock()
        sources = {source.name: self.train_source_config(source.name) for source in TRAIN_SOURCES}
        train_peer_student(self.model_folder, sources, self.budgets.train, self.testbed, unit["seed"],
                           folder / "model")
        wall, cpu = clock.seconds()
        atomic_write_text(folder / "cost.json", json.dumps({"wall_seconds": wall, "cpu_seconds": cpu,
                                                            "load_average": load_average()}) + "\n")
        return folder

    def run_row(self, row: TestbedRow, seed: Optional[int]) -> None:
        """Build and score one row at one seed unless cached (`Suite.score_run`)."""
        self.score_run(row.name, seed, self.row_key(row, seed), row.description,
                       lambda: None if row.kind in SEEDLESS_KINDS else self.unit_of(row, seed),
                       lambda key: self.build_row(row, seed))

    def row_per_seed(self, row: TestbedRow) -> dict[int, dict[str, Optional[float]]]:
        tasks = {c["name"]: c["task"] for c in self.set_configs}
        out: dict[int, dict[str, Optional[float]]] = {}
        row = self.selection.resolve(row)
        if row.select and row.distillation is None:
            return out
        for seed in ([None] if row.kind in SEEDLESS_KINDS else self.testbed.seeds):
            key = self.row_key(row, seed)
            if not self.results.missing_sets(key, self.set_keys):
                out[seed] = row_scores(self.results.entries[key], tasks)
        return out


def _record_counts(path: Path) -> dict[str, Any]:
    """Queries in a mined file, and its negatives per query (mean, and how many queries have none)."""
    with open(path, encoding="utf-8") as handle:
        counts = [len(json.loads(line).get("negatives") or []) for line in handle if line.strip()]
    return {"queries": len(counts), "negatives": {"mean": sum(counts) / max(1, len(counts)),
                                                  "none": sum(1 for count in counts if count == 0)}}


# -- the peer: sentence-transformers' own losses on the same student and batches --------------------------------
def peer_batches(sources: dict[str, Any], budget, steps: int, seed: int) -> list[tuple[str, list[dict]]]:
    """`steps` batches (source name, records): every source's records shuffled and cut into batches of its task's
    size, all batches shuffled together (the proportional policy's mix), cycled when the steps need more."""
    from codiemb_pl.data.cache.records import opened_records

    rng = random.Random(seed)
    batches = []
    for name, config in sources.items():
        with opened_records(config) as records:
            rows = list(records.json_rows(range(len(records))))
        rng.shuffle(rows)
        size = budget.ir_batch_size if config.task == "ir" else budget.sts_batch_size
        batches += [(name, rows[start:start + size]) for start in range(0, len(rows) - size + 1, size)]
    rng.shuffle(batches)
    return [batches[step % len(batches)] for step in range(steps)]


def train_peer_student(teacher_folder: str, sources: dict[str, Any], budget, testbed: TestbedBudget, seed: int,
                       output: Path) -> None:
    """Cut the teacher to `STUDENT_LAYERS` blocks as a SentenceTransformer and train it with ST's losses: SciFact
    (teacher-scored) DistillKLDivLoss over (query, positive, negatives) + MNRL, SNLI MNRL, STS-B CoSENT. SciFact
    records without a mined hard negative are left out of the peer's batches (no column to score)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import (CoSENTLoss, DistillKLDivLoss,
                                                                   MultipleNegativesRankingLoss)
    from transformers import get_linear_schedule_with_warmup

    torch.manual_seed(seed)
    model = SentenceTransformer(teacher_folder, device="cpu")
    backbone = model[0].auto_model
    backbone.encoder.layer = backbone.encoder.layer[:STUDENT_LAYERS]
    backbone.config.num_hidden_layers = STUDENT_LAYERS
    model.max_seq_length = budget.max_passage_length
    kd = DistillKLDivLoss(model, teacher_temperature=TEMPERATURES["teacher_temperature"],
                          student_temperature=TEMPERATURES["student_temperature"])
    mnrl, cosent = MultipleNegativesRankingLoss(model, scale=1 / budget.ir_temperature), CoSENTLoss(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=testbed.lr, weight_decay=0.0)
    scheduler = get_linear_schedule_with_warmup(optimizer, round(budget.warmup_ratio * testbed.max_steps),
                                                testbed.max_steps)
    negatives = budget.n_negatives

    def features(texts: list[str]) -> dict[str, torch.Tensor]:
        return model.preprocess(texts)

    model.train()
    for name, rows in peer_batches(sources, budget, testbed.max_steps, seed):
        if name == "scifact":
            # DistillKLDivLoss needs a teacher score for every column: the records the miner left without a hard
            # negative (ours mask their slots) sit out the peer's SciFact steps
            rows = [r for r in rows if r["negatives"]]
            columns = [[r["query"] for r in rows], [r["positives"][0] for r in rows]]
            columns += [[r["negatives"][i % len(r["negatives"])] for r in rows] for i in range(negatives)]
            scores = torch.tensor([[r["teacher_scores"][0]] + [r["teacher_scores"][len(r["positives"]) + i %
                                                                                   len(r["negatives"])]
                                                               for i in range(negatives)] for r in rows])
            feats = [features(column) for column in columns]
            loss = kd(feats, scores) + mnrl(feats, None)
        elif name == "snli":
            columns = [[r["query"] for r in rows], [r["positives"][0] for r in rows],
                       [r["negatives"][0] for r in rows]]
            loss = mnrl([features(column) for column in columns], None)
        else:
            loss = cosent([features([r["text1"] for r in rows]), features([r["text2"] for r in rows])],
                          torch.tensor([float(r["score"]) for r in rows]))
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    model.save(str(output))


# -- report ---------------------------------------------------------------------------------------------------
def write_testbed_report(bed: Testbed, command: str) -> Path:
    report = Path(bed.args.report)
    tasks = {c["name"]: c["task"] for c in bed.set_configs}
    columns = list(tasks) + ["avg"]
    stats, per_seed = {}, {}
    lines = ["| row | " + " | ".join(list(tasks) + ["overall"]) + " | seeds | fit s (load) | vs student (tie rule) |",
             "|---|" + "---:|" * (len(columns) + 2) + "---|"]
    student = [r["avg"] for r in bed.row_per_seed(bed.rows["student"]).values() if r["avg"] is not None]
    resolved = [bed.selection.resolve(row) for row in TESTBED_ROWS]
    for row in resolved:
        per_seed[row.name] = bed.row_per_seed(row)
        stats[row.name] = {c: mean_sd([r[c] for r in per_seed[row.name].values() if r[c] is not None]) for c in columns}
        overall = [r["avg"] for r in per_seed[row.name].values() if r["avg"] is not None]
        costs = [bed.results.entries[bed.row_key(row, s)].get("info", {}).get("fit") for s in per_seed[row.name]]
        fit = "; ".join(f"{c['wall_seconds']:.0f} ({c['load_average']})" for c in costs if c) or "—"
        versus = "—"
        if row.name != "student" and overall and student:
            c = compare(overall, student)
            versus = f"{c['difference']:+.2f}, {c['verdict']}"
        lines.append(f"| `{row.name}` | " + " | ".join(fmt(*stats[row.name][c]) for c in columns)
                     + f" | {len(per_seed[row.name])} | {fit} | {versus} |")
    distilled = [name for name in ("score_kd_mined", "online_teacher", "embedding_kd", "score_kd_dev",
                                   "online_teacher_dev", "embedding_kd_dev") if stats[name]["avg"][0] is not None]
    best = max(distilled, key=lambda name: stats[name]["avg"][0]) if distilled else None
    teacher = stats["teacher"]["avg"][0]
    targets = []
    if best and student:
        c = compare([r["avg"] for r in per_seed[best].values()], student)
        targets.append(f"- best distilled row `{best}` ≥ student + 1.0 overall, beyond the sd: {c['difference']:+.2f} "
                       f"(sd {c['sd']:.2f}) → {'✓' if c['difference'] >= 1.0 and c['verdict'] == 'better' else '✗'}")
    if best and teacher:
        share = stats[best]["avg"][0] / teacher
        targets.append(f"- best distilled ≥ 95 % of the teacher's overall: {100 * share:.1f} % → "
                       f"{'✓' if share >= 0.95 else '✗'}")
    timed = {name: [bed.results.entries[bed.row_key(bed.rows[name], s)]["info"]["fit"] for s in per_seed[name]]
             for name in ("student", "online_teacher")}
    if all(timed.values()):
        ratio = (sum(c["wall_seconds"] for c in timed["student"]) / len(timed["student"])) / \
                (sum(c["wall_seconds"] for c in timed["online_teacher"]) / len(timed["online_teacher"]))
        targets.append(f"- online teacher ≥ 0.6× the pairs/s of training without it (same steps and batches: the ratio "
                       f"of fit wall times): {ratio:.2f}× — fit times here were taken on a shared, loaded CPU "
                       "(load in the table): not a timing result")
    mining = bed.mining_summary()
    seeds = list(bed.testbed.seeds)
    analysis = kept_analysis(report.read_text("utf-8") if report.is_file() else "") or "_Not written yet._"
    section = [
        "# Distillation test bed (issue 23)",
        "",
        f"Generated {now()} by `{command}`. Student: the first {STUDENT_LAYERS} blocks of all-MiniLM-L6-v2; teacher: "
        f"all-MiniLM-L6-v2 itself (fixed before any student run; why: `benchmarks/testbed.py`'s docstring). "
        f"{bed.testbed.max_steps} optimizer steps per student run (lr {bed.testbed.lr}), seeds {seeds}. Metrics ×100, "
        "mean ± sample sd over seeds: STS-B test Spearman of cosine, SciFact test nDCG@10 over a 1 000-document "
        "corpus (judged + seeded distractors), overall = their mean. **Tie rule**: a difference of means smaller "
        "than the larger seed sd is a tie.",
        "",
        *lines,
        "",
        "## Targets",
        "",
        *(targets or ["- not measured yet"]),
        "",
        "## Dev-set selection (`benchmarks/testbed_selection.py`)",
        "",
        *bed.selection.report_lines(),
        "",
        "## Teacher-aware mining: SciFact negatives mined by the student, without and with the teacher's filters",
        "",
        *mining_table(bed, per_seed, stats),
        "",
        "## Reading",
        "",
        ANALYSIS_BEGIN,
        analysis,
        ANALYSIS_END,
        "",
        *issue25_lines(bed, per_seed, report.with_suffix("") / "conflict.png", report),
        "",
        "## Rows",
        "",
        *[f"- `{row.name}` ({row.kind}): {row.description}"
          + (f"; `model.distillation` = `{json.dumps(row.distillation)}`" if row.distillation else "")
          for row in resolved],
        "",
        "## Setup",
        "",
        f"- training data: the suite's (`results/suite.md`): SciFact train (caps {bed.budgets.train.ir_max_samples}), "
        f"SNLI triplets ({bed.budgets.train.snli_max_samples}), STS-B train ({bed.budgets.train.sts_max_samples}); "
        f"batches {bed.budgets.train.ir_batch_size}/{bed.budgets.train.sts_batch_size}, "
        f"{bed.budgets.train.n_negatives} hard negative per query, lengths {bed.budgets.train.max_query_length}/"
        f"{bed.budgets.train.max_passage_length}/{bed.budgets.train.max_sts_length}.",
        f"- SciFact negatives: `{mining.get('command', 'not mined yet')}`; the teacher's filters: "
        f"{mining.get('teacher_filters') or '—'}.",
        "- hyper-parameters: the rows `score_kd_mined`, `online_teacher`, `embedding_kd` use the distillation "
        "recipe's (`configs/recipes/distill_minilm.yaml`: weights 1, temperatures 0.05/0.05), fixed before any run; "
        "the `*_dev` rows use the dev-set selection above (never a test set); lr 1e-4 for every row.",
        f"- every run's config, metrics and timings: `{bed.args.results}`.",
    ]
    atomic_write_text(report, "\n".join(section) + "\n")
    return report


def mining_table(bed: Testbed, per_seed: dict[str, Any], stats: dict[str, Any]) -> list[str]:
    """The second table: per mining variant, what the filters removed and the student's scores after training."""
    lines = ["| SciFact negatives | queries kept | negatives per query (queries with none) | the teacher's filters | "
             "SciFact nDCG@10 | overall | seeds |", "|---|---:|---:|---|---:|---:|---:|"]
    labels = {"student": "mined by the student, its own margin 0.95, no teacher",
              "student_teacher": "the same + the teacher's filters",
              "student_no_margin": "mined by the student, no score filter, no teacher",
              "student_no_margin_teacher": "the same candidates, the teacher's filters only",
              "base": "mined by the base model (+ its teacher rescoring: the other rows' data)"}
    for row_name, variant in (("mined_by_student", "student"), ("mined_by_student_teacher_filtered", "student_teacher"),
                              ("mined_by_student_no_margin", "student_no_margin"),
                              ("mined_by_student_no_margin_teacher_filtered", "student_no_margin_teacher"),
                              ("student", "base")):
        summary = bed.mining_summary(variant)
        label = labels[variant]
        scifact = next((name for name in stats[row_name] if name.startswith("scifact")), None)
        counts = summary.get("negatives")
        negatives = f"{counts['mean']:.2f} ({counts['none']})" if counts else "—"
        lines.append(f"| {label} | {summary.get('queries', '—')} | {negatives} | {summary.get('teacher_filters') or '—'} | "
                     f"{fmt(*stats[row_name][scifact]) if scifact else '—'} | {fmt(*stats[row_name]['avg'])} | "
                     f"{len(per_seed[row_name])} |")
    return lines


def run_testbed(args, budgets: Budgets) -> int:
    """`experiments.py --testbed`: build and score every chosen row at every seed, then write the page."""
    testbed = TestbedBudget()
    if args.max_steps is not None and args.max_steps > 0:
        testbed = replace(testbed, max_steps=args.max_steps)
    if args.seeds:
        testbed = replace(testbed, seeds=tuple(args.seeds))
    bed = Testbed(args, budgets, testbed)
    names = args.testbed_rows or [row.name for row in TESTBED_ROWS]
    command = "python benchmarks/experiments.py " + " ".join(args.argv)
    failed = []
    if not args.report_only:
        for row in (bed.rows[name] for name in names):
            try:
                row = bed.selection.resolve(row, train=True)   # a `select` row first runs its family's selection
            except (Exception, SystemExit) as error:
                failed.append(f"{row.name} selection: {type(error).__name__}: {str(error)[:300]}")
                log(f"FAILED {failed[-1]}")
                continue
            for seed in ([None] if row.kind in SEEDLESS_KINDS else testbed.seeds):
                try:
                    bed.run_row(row, seed)
                except (Exception, SystemExit) as error:
                    failed.append(f"{row.name} seed {seed}: {type(error).__name__}: {str(error)[:300]}")
                    log(f"FAILED {failed[-1]}")
                write_testbed_report(bed, command)
    log(f"report {write_testbed_report(bed, command)}" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


def testbed_paths() -> tuple[Path, Path]:
    """Default (results file, report page) of the test bed."""
    return RESULTS_DIR / "testbed" / "runs.json", RESULTS_DIR / "testbed.md"

