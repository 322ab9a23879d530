"""Is model A better than model B on these sets, or is the difference noise? A paired bootstrap.

    python benchmarks/paired_comparison.py --a runs/experiments/train/<key>/model --b <other model> \\
        --sts stsb_test=../shared/data/sts/stsb/test.jsonl --ir scifact_test=../shared/data/ir/scifact \\
        [--max-length 128] [--resamples 2000] [--seed 0] [--json comparison.json]

Per set: the headline metric of A and of B (×100: Spearman of cosine for STS, nDCG@10 for IR), the
difference A − B, its 95 % percentile bootstrap interval and the share of resamples in which A wins. Each
resample draws the same queries (IR) or pairs (STS) with replacement for both models, so what is measured
is the variation of the difference over test items, not of each score. IR rows also give the standard
deviation of per-query nDCG@10 and the standard error of one model's mean (sd / √queries).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codiemb_pl.data.eval_sets import EvalSet  # noqa: E402
from codiemb_pl.evaluation.retrieval import per_query_retrieval_metrics  # noqa: E402
from codiemb_pl.evaluation.sts import paired_cosine, spearman  # noqa: E402
from codiemb_pl.model.device import add_device_argument, resolve_device  # noqa: E402
from codiemb_pl.model.encoder import TextEncoder  # noqa: E402
from codiemb_pl.paths import resolve_location  # noqa: E402
from codiemb_pl.workflows.evaluation import load_sets, set_embeddings  # noqa: E402

IR_METRIC = "ndcg_at_10"
HEADLINE = {"ir": IR_METRIC, "sts": "cosine_spearman"}


def item_values(vset: EvalSet, embeddings: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-item values the set's metric is built from, given its embeddings: per-query nDCG@10 (IR, queries
    sorted by id) or the cosine of each pair (STS)."""
    if vset.task == "sts":
        return paired_cosine(embeddings["text1"], embeddings["text2"]).double()
    per_query = per_query_retrieval_metrics(embeddings["query"], embeddings["corpus"], vset.query_ids,
                                            vset.doc_ids, vset.qrels)
    return torch.tensor([per_query[query][IR_METRIC] for query in sorted(per_query)], dtype=torch.float64)


def set_items(encoder: TextEncoder, vset: EvalSet, batch_size: int) -> torch.Tensor:
    """`item_values` of `encoder` on `vset`."""
    return item_values(vset, set_embeddings(encoder, vset, batch_size))


def set_metric(vset: EvalSet, items: torch.Tensor, rows: torch.Tensor) -> float:
    """The headline metric on the items `rows` (a bootstrap resample, or all of them)."""
    if vset.task == "sts":
        gold = torch.tensor(vset.gold, dtype=torch.float64)
        return spearman(items[rows], gold[rows])
    return float(items[rows].mean())


def paired_bootstrap(vset: EvalSet, items_a: torch.Tensor, items_b: torch.Tensor, resamples: int,
                     seed: int) -> dict[str, float]:
    """Metric of A and B (×100), A − B, its 95 % percentile interval and P(A > B) over `resamples` draws."""
    n = items_a.shape[0]
    everything = torch.arange(n)
    generator = torch.Generator().manual_seed(seed)
    differences = []
    for _ in range(resamples):
        rows = torch.randint(0, n, (n,), generator=generator)
        differences.append(set_metric(vset, items_a, rows) - set_metric(vset, items_b, rows))
    low, high = percentile_interval(differences)
    a, b = set_metric(vset, items_a, everything), set_metric(vset, items_b, everything)
    result = {"a": 100 * a, "b": 100 * b, "difference": 100 * (a - b), "ci_low": 100 * low, "ci_high": 100 * high,
              "p_a_wins": sum(d > 0 for d in differences) / resamples, "items": n}
    if vset.task == "ir":
        result["per_query_sd"] = 100 * float(items_a.std())
        result["standard_error"] = result["per_query_sd"] / math.sqrt(n)
    return result


def percentile_interval(differences: list[float]) -> tuple[float, float]:
    """The 95 % percentile interval of bootstrap differences."""
    ordered, n = sorted(differences), len(differences)
    return ordered[int(0.025 * (n - 1))], ordered[int(math.ceil(0.975 * (n - 1)))]


def paired_bootstrap_sets(sets: list[tuple[EvalSet, torch.Tensor, torch.Tensor]], resamples: int, seed: int
                          ) -> dict[str, dict[str, float]]:
    """`paired_bootstrap` of every set plus `overall`, all from the same draws: each resample draws every
    set's items with replacement (A and B alike) and `overall` is `evaluation.suite.summary_metrics`'s
    `avg` (mean of the IR average and the STS average) of the resampled set metrics.

    Returns {set: paired_bootstrap's fields, "overall": {a, b, difference, ci_low, ci_high, p_a_wins}} (×100).
    """
    from codiemb_pl.evaluation.suite import summary_metrics

    generator = torch.Generator().manual_seed(seed)
    tasks = {vset.name: vset.task for vset, _, _ in sets}
    draws: dict[str, list[float]] = {vset.name: [] for vset, _, _ in sets}
    overall: list[float] = []

    def overall_of(values: dict[str, float]) -> float:
        return summary_metrics({name: {HEADLINE[tasks[name]]: v} for name, v in values.items()}, tasks)["avg"]

    for _ in range(resamples):
        a_values, b_values = {}, {}
        for vset, items_a, items_b in sets:
            rows = torch.randint(0, items_a.shape[0], (items_a.shape[0],), generator=generator)
            a_values[vset.name], b_values[vset.name] = set_metric(vset, items_a, rows), set_metric(vset, items_b, rows)
            draws[vset.name].append(a_values[vset.name] - b_values[vset.name])
        overall.append(overall_of(a_values) - overall_of(b_values))
    results: dict[str, dict[str, float]] = {}
    full_a, full_b = {}, {}
    for vset, items_a, items_b in sets:
        everything = torch.arange(items_a.shape[0])
        full_a[vset.name], full_b[vset.name] = set_metric(vset, items_a, everything), set_metric(vset, items_b, everything)
        low, high = percentile_interval(draws[vset.name])
        results[vset.name] = {"a": 100 * full_a[vset.name], "b": 100 * full_b[vset.name],
                              "difference": 100 * (full_a[vset.name] - full_b[vset.name]), "ci_low": 100 * low,
                              "ci_high": 100 * high, "p_a_wins": sum(d > 0 for d in draws[vset.name]) / resamples,
                              "items": int(items_a.shape[0])}
    low, high = percentile_interval(overall)
    a, b = overall_of(full_a), overall_of(full_b)
    results["overall"] = {"a": 100 * a, "b": 100 * b, "difference": 100 * (a - b), "ci_low": 100 * low,
                          "ci_high": 100 * high, "p_a_wins": sum(d > 0 for d in overall) / resamples}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", required=True, help="model A (folder, hub id or pkg://)")
    parser.add_argument("--b", required=True, help="model B")
    parser.add_argument("--sts", action="append", default=[], metavar="NAME=FILE")
    parser.add_argument("--ir", action="append", default=[], metavar="NAME=DIR")
    parser.add_argument("--split", default="test")
    parser.add_argument("--max-length", type=int, default=None, help="truncate texts (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=64)
    add_device_argument(parser)
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    sets = load_sets(args.sts, args.ir, None, args.split)
    items = {}
    for label, model in (("a", args.a), ("b", args.b)):
        encoder = TextEncoder(resolve_location(model), max_seq_length=args.max_length).to(device)
        items[label] = {vset.name: set_items(encoder, vset, args.batch_size) for vset in sets}
    results = {vset.name: paired_bootstrap(vset, items["a"][vset.name], items["b"][vset.name], args.resamples,
                                           args.seed) for vset in sets}

    print(f"A = {args.a}\nB = {args.b}\n{args.resamples} paired bootstrap resamples, seed {args.seed}; metrics ×100")
    print(f"{'set':<16} {'A':>7} {'B':>7} {'A−B':>7} {'95% interval':>17} {'P(A>B)':>7} {'per-query sd':>13} "
          f"{'se of a mean':>13}")
    for name, r in results.items():
        sd = f"{r['per_query_sd']:.1f}" if "per_query_sd" in r else "—"
        se = f"{r['standard_error']:.2f}" if "standard_error" in r else "—"
        print(f"{name:<16} {r['a']:>7.2f} {r['b']:>7.2f} {r['difference']:>+7.2f} "
              f"{'[' + format(r['ci_low'], '+.2f') + ', ' + format(r['ci_high'], '+.2f') + ']':>17} "
              f"{r['p_a_wins']:>7.2f} {sd:>13} {se:>13}")
    if args.json:
        Path(args.json).write_text(json.dumps({"a": args.a, "b": args.b, "resamples": args.resamples,
                                               "seed": args.seed, "sets": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
