"""The training data the datamodule hands to the model, pinned to what the in-memory implementation
(records as Python objects, tokenised in the collate) produced before the Arrow cache replaced it. That
text path lives on only here, as the oracle (`reference_text_path.py`).

The digests below were computed by that implementation (commit 03e026a) with this file's own code:
the sampler plan of every (policy, seed, world size, rank) case, and every collated micro-batch of two
epochs (token ids, masks, text ids, scores). Whatever stores the records or tokenises them, the same
configuration must give the same plan and byte-identical batches. The batch digests were recomputed
when instruction prefixes started to leave `[CLS]` out of pooling too (sentence-transformers'
`include_prompt=False` rule, issue 12.2): setting each pooling mask's first real position back to 1
reproduces the 03e026a digests exactly (2bbe83d6678cdaaf, cb1910525fb9bee0), so nothing else changed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from codiemb_pl.data.cache.dataset import item_seed
from codiemb_pl.data.datamodule import CoDiEmbDataModule
from codiemb_pl.data.sources import SourceConfig
from codiemb_pl.paths import resolve_location
from conftest import minilm_path
from reference_text_path import SampledItem, load_training_records, text_collator

DEMO_IR = "pkg://codiemb_pl/demo/ir_train.jsonl"
DEMO_STS = "pkg://codiemb_pl/demo/sts_train.jsonl"

PLAN_DIGESTS = {
    ("proportional", 0, 1): "a30c69300a32525d",
    ("proportional", 42, 2): "c1455178d4de62e8",
    ("balanced", 42, 2): "ac3b4fbf85a86de4",
    ("temperature", 7, 1): "df0aeba83f48d1cd",
    ("round_robin", 42, 2): "f3e85d5eb70805eb",
    ("sequential", 3, 1): "b8a373801bdfce48",
    ("mixed", 42, 2): "bffd47382675c7cf",
}
BATCH_CASES = [("proportional", 42), ("mixed", 5)]


def csv_ir_source(folder: Path) -> Path:
    """A CSV IR source with JSON-list cells and records without negatives (padding slots in the batch)."""
    path = folder / "extra_ir.csv"
    lines = ["question,document,negative"]
    for i in range(23):
        negatives = json.dumps([f"unrelated note {i}", f"another distractor {i * 3}"]) if i % 3 else ""
        lines.append(f'"how does item {i} work","[""item {i} works by turning"", ""manual for item {i}""]",'
                     f'"{negatives.replace(chr(34), chr(34) * 2)}"')
    path.write_text("\n".join(lines) + "\n")
    return path


def sources(folder: Path) -> list[SourceConfig]:
    return [
        SourceConfig(name="demo_ir", task="ir", path=DEMO_IR, instruction="find the answer", max_samples=120, seed=3),
        SourceConfig(name="demo_sts", task="sts", path=DEMO_STS, instruction="rate similarity", batch_size=6),
        SourceConfig(name="extra_ir", task="ir", path=str(csv_ir_source(folder)), batch_size=3),
    ]


def datamodule(folder: Path, policy: str, seed: int, **extra) -> CoDiEmbDataModule:
    module = CoDiEmbDataModule(train=sources(folder), tokenizer=minilm_path(), ir_batch_size=4, sts_batch_size=4,
                               policy=policy, seed=seed, n_positives=2, n_negatives=2, max_query_length=24,
                               max_passage_length=40, max_sts_length=32, **extra)
    module.length_cap = 36  # the model's limit caps the passage group below its configured 40
    module.setup("fit")
    return module


def digest(value) -> str:
    return hashlib.sha256(repr(value).encode()).hexdigest()[:16]


def plan_digest(module: CoDiEmbDataModule, world_size: int) -> str:
    plans = []
    for rank in range(world_size):
        sampler = module.build_sampler(world_size, rank, 1)
        plans.append([(b.dataset, b.task, b.indices) for epoch in (0, 1) for b in sampler.plan(epoch)])
        plans.append([micro for epoch in (0, 1) for micro in (sampler.set_epoch(epoch) or list(sampler))])
    return digest(plans)


def tensor_summary(value):
    if isinstance(value, torch.Tensor):
        return (str(value.dtype), tuple(value.shape), value.flatten().tolist())
    if isinstance(value, dict):
        return sorted((key, tensor_summary(item)) for key, item in value.items())
    return value


def cached_batches(module: CoDiEmbDataModule) -> list:
    loader = module.train_dataloader()
    seen = []
    for epoch in (0, 1):
        loader.batch_sampler.set_epoch(epoch)
        seen += [tensor_summary(batch) for batch in loader]
    return seen


def in_memory_batches(module: CoDiEmbDataModule, folder: Path) -> list:
    """The same micro-batches from records held in memory and tokenised in the collate."""
    configs = sources(folder)
    records = [load_training_records(cfg) for cfg in configs]
    offsets = [sum(len(r) for r in records[:i]) for i in range(len(records))]
    collate = text_collator(module.load_tokenizer(), module.token_limits(), module.hparams.n_positives,
                            module.hparams.n_negatives)
    sampler = module.build_sampler(1, 0, 1)
    seen = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        for micro in sampler:
            items = []
            for index, item_epoch in micro:
                source = max(i for i, offset in enumerate(offsets) if offset <= index)
                cfg = configs[source]
                items.append(SampledItem(record=records[source][index - offsets[source]], dataset=cfg.name,
                                         task=cfg.task, instruction=module.prefix_for(cfg.instruction),
                                         seed=item_seed(module.hparams.seed, item_epoch, index)))
            seen.append(tensor_summary(collate(items)))
    return seen


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("reference_data")


@pytest.mark.parametrize("policy,seed,world_size", sorted(PLAN_DIGESTS))
def test_sampler_plan_matches_the_in_memory_reference(folder, policy, seed, world_size):
    assert plan_digest(datamodule(folder, policy, seed), world_size) == PLAN_DIGESTS[(policy, seed, world_size)]


@pytest.mark.parametrize("policy,seed", BATCH_CASES)
def test_collated_batches_match_the_in_memory_path(folder, policy, seed):
    module = datamodule(folder, policy, seed)
    cached, in_memory = cached_batches(module), in_memory_batches(module, folder)
    assert len(cached) == len(in_memory) > 50
    for position, (ours, reference) in enumerate(zip(cached, in_memory)):
        assert ours == reference, f"micro-batch {position} differs"
    assert any("pooling_mask" in repr(batch) for batch in cached)  # instruction prefixes are exercised


def test_reference_sources_are_the_demo_files():
    assert Path(resolve_location(DEMO_IR)).is_file() and Path(resolve_location(DEMO_STS)).is_file()
