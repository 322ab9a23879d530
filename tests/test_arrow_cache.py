"""The training-data cache: Arrow records equal the in-memory loader's, are built once and reused, rebuilt
when the file changes or when asked, never half-written on bad input; token ids per tokenizer and limits;
DataLoader workers read the same memory-mapped files."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

from codiemb_pl.data.cache import records as arrow_records
from codiemb_pl.data.cache.dataset import ArrowTrainingDataset
from codiemb_pl.data.cache.entries import BUILD_LOG, LAUNCH_STARTED_ENV, cached_entry
from codiemb_pl.data.cache.records import open_records
from codiemb_pl.data.cache.token_ids import TokenLimits
from codiemb_pl.data.cache.tokens import open_tokens
from codiemb_pl.data.collate import PaddingRule, TokenCollator
from codiemb_pl.data.sampler import TaskBatchSampler
from codiemb_pl.data.sources import SourceConfig
from codiemb_pl.errors import InputError
from conftest import minilm_path
from reference_text_path import load_training_records, tokenize_with_prefixes
from test_data_sources import STS_ROWS, write_beir, write_delimited, write_jsonl

IR_ROWS = [{"query": f"question {i}", "positives": [f"answer {i}", f"second answer {i}"][: 1 + i % 2],
            "negatives": [f"wrong {i}", f"also wrong {i}", f"off topic {i}"][: i % 4]} for i in range(10)]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_path())


def ir(path, **kwargs) -> SourceConfig:
    return SourceConfig(name="ir", task="ir", path=str(path), **kwargs)


def sts(path, **kwargs) -> SourceConfig:
    return SourceConfig(name="sts", task="sts", path=str(path), **kwargs)


def arrow_records_of(cfg: SourceConfig, cache: Path) -> list:
    table = open_records(cfg, cache)
    return [table.record(i) for i in range(len(table))]


def entries(cache: Path, kind: str) -> list[Path]:
    return sorted(p for p in cache.glob(f"{kind}-*") if p.is_dir())


def build_lines(cache: Path) -> list[str]:
    log = cache / BUILD_LOG
    return log.read_text().splitlines() if log.exists() else []


# --- the records equal the in-memory loader's ------------------------------------------------------

def test_records_equal_the_in_memory_loader_for_every_format(tmp_path):
    cache = tmp_path / "cache"
    jsonl = write_jsonl(tmp_path / "ir.jsonl", IR_ROWS)
    csv_path = write_delimited(tmp_path / "ir.csv", ["query", "positives", "negatives"],
                               [[r["query"], json.dumps(r["positives"]), json.dumps(r["negatives"])] for r in IR_ROWS], ",")
    tsv_path = write_delimited(tmp_path / "ir.tsv", ["question", "document"],
                               [[r["query"], r["positives"][0]] for r in IR_ROWS], "\t")
    parquet_path = tmp_path / "ir.parquet"
    pq.write_table(pa.Table.from_pylist(IR_ROWS), parquet_path)
    beir = write_beir(tmp_path / "beir", ["q1\td1\t1", "q2\td2\t1"])
    (beir / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t1\nq2\td3\t1\n")
    sts_path = write_jsonl(tmp_path / "sts.jsonl", STS_ROWS)
    configs = [ir(jsonl), ir(csv_path), ir(tsv_path), ir(parquet_path), ir(beir), ir(jsonl, max_samples=4),
               ir(jsonl, max_samples=6, seed=3), ir(jsonl, seed=11), sts(sts_path), sts(sts_path, score_range=[0, 10]),
               sts(sts_path, max_samples=2, seed=1)]
    for cfg in configs:
        expected = load_training_records(cfg)
        assert arrow_records_of(cfg, cache) == expected, cfg
    assert arrow_records_of(sts(sts_path), cache)[2].score == 1.0  # 5 on the auto [0, 5] scale
    # one entry per file and mapping: max_samples / seed select rows of the same table
    assert len(entries(cache, "records")) == 7


def test_plain_json_lines_take_the_column_path(tmp_path, monkeypatch):
    monkeypatch.setattr(arrow_records, "_row_batches", lambda cfg: pytest.fail("read row by row"))
    ir_path, sts_path = write_jsonl(tmp_path / "ir.jsonl", IR_ROWS), write_jsonl(tmp_path / "sts.jsonl", STS_ROWS)
    for cfg in (ir(ir_path), sts(sts_path), ir(ir_path, max_samples=3, seed=2)):
        assert arrow_records_of(cfg, tmp_path / "cache") == load_training_records(cfg)


@pytest.mark.parametrize("lines", [
    # aliases, a text instead of a list, negatives missing, null or blank in some rows, blank lines
    ['{"anchor": "q1", "positive": "p1", "negative": "n1"}', "", '{"anchor": "q2", "positive": "p2"}',
     '{"anchor": "q3", "positive": "p3", "negative": null}', '{"anchor": "q4", "positive": "p4", "negative": "  "}'],
    # two alias columns for one field: each row takes the first it has
    ['{"query": "q1", "positives": ["a"]}', '{"anchor": "q2", "positives": ["b"]}'],
    # a value the column path does not take (a number as text) is left to the row reader
    ['{"query": "q1", "positives": ["a"], "negatives": []}', '{"query": "q2", "positives": ["b", "c"], "extra": 5}'],
    ['\ufeff{"query": "q1", "positives": ["a\u00a0b"]}', '{"query": "\u00e9t\u00e9", "positives": ["x"]}'],
])
def test_column_and_row_paths_agree_on_unusual_valid_files(tmp_path, lines):
    path = tmp_path / "ir.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert arrow_records_of(ir(path), tmp_path / "cache") == load_training_records(ir(path))


def test_sts_with_integer_and_text_scores(tmp_path):
    path = tmp_path / "sts.jsonl"
    path.write_text('{"s1": "a b", "s2": "c d", "label": 3}\n{"s1": "e", "s2": "f", "label": 1}\n')
    assert arrow_records_of(sts(path), tmp_path / "cache") == load_training_records(sts(path))
    path.write_text('{"s1": "a b", "s2": "c d", "label": "3"}\n{"s1": "e", "s2": "f", "label": 0.5}\n')
    assert arrow_records_of(sts(path), tmp_path / "cache") == load_training_records(sts(path))


def test_hub_dataset_saved_to_disk_becomes_its_own_table(tmp_path):
    import datasets

    folder = tmp_path / "hf_ir"
    datasets.Dataset.from_list(IR_ROWS).save_to_disk(str(folder))
    cfg = ir(folder, format="hf")
    assert arrow_records_of(cfg, tmp_path / "cache") == load_training_records(cfg)


# --- built once, reused, invalidated, rebuilt on request -------------------------------------------

def test_second_open_reuses_the_cache_without_reading_the_file(tmp_path, monkeypatch):
    cache, path = tmp_path / "cache", write_jsonl(tmp_path / "ir.jsonl", IR_ROWS)
    first = open_records(ir(path), cache)
    built_at = first.meta["built_at"]
    monkeypatch.setattr(arrow_records, "iter_ir_records", lambda cfg: pytest.fail("the source was read again"))
    second = open_records(ir(path), cache)
    assert second.folder == first.folder and second.meta["built_at"] == built_at
    assert len(build_lines(cache)) == 1 and len(second) == len(IR_ROWS)


def test_a_changed_file_gets_a_new_entry(tmp_path):
    cache, path = tmp_path / "cache", write_jsonl(tmp_path / "ir.jsonl", IR_ROWS)
    before = open_records(ir(path), cache)
    write_jsonl(path, IR_ROWS + [{"query": "new question", "positives": ["new answer"]}])
    after = open_records(ir(path), cache)
    assert after.key != before.key and len(after) == len(IR_ROWS) + 1
    assert after.record(len(IR_ROWS)).query == "new question"
    # so does another column mapping of the same file (negatives read from a column it does not have)
    remapped = open_records(ir(path, columns={"negatives": "no_such_column"}), cache)
    assert remapped.key not in (before.key, after.key) and remapped.record(3).negatives == ()
    assert after.record(3).negatives == tuple(IR_ROWS[3]["negatives"]) and len(entries(cache, "records")) == 3


def test_rebuild_builds_once_per_launch(tmp_path, monkeypatch):
    cache, path = tmp_path / "cache", write_jsonl(tmp_path / "ir.jsonl", IR_ROWS)
    old = open_records(ir(path), cache)
    monkeypatch.setenv(LAUNCH_STARTED_ENV, repr(old.meta["built_at"] + 1e-3))  # a later launch
    rebuilt = open_records(ir(path), cache, rebuild=True)
    assert rebuilt.meta["built_at"] > old.meta["built_at"]
    again = open_records(ir(path), cache, rebuild=True)  # another rank of the same launch reuses it
    assert again.meta["built_at"] == rebuilt.meta["built_at"] and len(build_lines(cache)) == 2


@pytest.mark.parametrize("rows,message", [
    (IR_ROWS[:3] + [{"query": "  ", "positives": ["x"]}] + IR_ROWS[3:], "ir.jsonl:4: field 'query' is empty"),
    (IR_ROWS[:2] + [{"query": "q", "positives": []}], "ir.jsonl:3: IR record has no positives"),
])
def test_bad_rows_raise_the_in_memory_message_and_write_nothing(tmp_path, rows, message):
    cache, path = tmp_path / "cache", write_jsonl(tmp_path / "ir.jsonl", rows)
    with pytest.raises(InputError) as in_memory:
        load_training_records(ir(path))
    with pytest.raises(InputError) as cached:
        open_records(ir(path), cache)
    assert str(cached.value) == str(in_memory.value) and message in str(cached.value)
    assert entries(cache, "records") == [] and not [p for p in cache.iterdir() if ".tmp-" in p.name]


def test_reading_errors_come_before_row_errors_as_in_memory(tmp_path):
    path = tmp_path / "ir.jsonl"
    path.write_text(json.dumps({"query": "", "positives": ["a"]}) + "\n" + "{not json\n")
    with pytest.raises(InputError) as in_memory:
        load_training_records(ir(path))
    with pytest.raises(InputError) as cached:
        open_records(ir(path), tmp_path / "cache")
    assert str(cached.value) == str(in_memory.value) and "ir.jsonl:2: malformed JSON" in str(cached.value)


def test_sts_score_outside_the_range_names_its_line(tmp_path):
    path = write_jsonl(tmp_path / "sts.jsonl", STS_ROWS + [{"sentence1": "a", "sentence2": "b", "score": 7.5}])
    with pytest.raises(InputError) as in_memory:
        load_training_records(sts(path, score_range=[0, 5]))
    with pytest.raises(InputError) as cached:
        open_records(sts(path, score_range=[0, 5]), tmp_path / "cache")
    assert str(cached.value) == str(in_memory.value) and "sts.jsonl:4: score 7.5 is outside" in str(cached.value)
    assert entries(tmp_path / "cache", "records") == []


def _open_in_child(args) -> tuple[str, float]:
    path, cache = args
    table = open_records(ir(path), Path(cache))
    return str(table.folder), table.meta["built_at"]


def test_concurrent_processes_build_one_entry(tmp_path):
    cache, path = tmp_path / "cache", write_jsonl(tmp_path / "ir.jsonl", IR_ROWS * 50)
    with multiprocessing.get_context("fork").Pool(3) as pool:
        opened = pool.map(_open_in_child, [(str(path), str(cache))] * 3)
    assert len(set(opened)) == 1 and len(build_lines(cache)) == 1


def test_a_failed_build_keeps_the_previous_entry(tmp_path):
    entry = tmp_path / "cache" / "thing"
    cached_entry(entry, lambda folder: (folder / "a.txt").write_text("old") and {})

    def broken(folder):
        (folder / "a.txt").write_text("half")
        raise RuntimeError("disk full")
    os.environ.pop(LAUNCH_STARTED_ENV, None)
    with pytest.raises(RuntimeError):
        cached_entry(entry, broken, rebuild=True)
    assert (entry / "a.txt").read_text() == "old"


# --- tokenised once ----------------------------------------------------------------------------------

def test_token_ids_are_what_the_tokenizer_gives_prefix_plus_text(tmp_path, tokenizer):
    cache = tmp_path / "cache"
    records = open_records(ir(write_jsonl(tmp_path / "ir.jsonl", IR_ROWS)), cache)
    prefix = "Instruction: answer Query: "
    table, meta = open_tokens(records, tokenizer, TokenLimits(query=6, passage=5, sts=8), prefix, cache)
    assert table.table["query"][3].as_py() == tokenizer(prefix + "question 3", truncation=True, max_length=6)["input_ids"]
    assert table.table["negatives"][3].as_py() == [tokenizer(t, truncation=True, max_length=5)["input_ids"]
                                                   for t in IR_ROWS[3]["negatives"]]
    assert meta["prefix_tokens"] == len(tokenizer(prefix, add_special_tokens=False)["input_ids"])
    # the same settings reuse the entry; another limit or prefix is another entry
    open_tokens(records, tokenizer, TokenLimits(6, 5, 8), prefix, cache)
    open_tokens(records, tokenizer, TokenLimits(6, 7, 8), prefix, cache)
    open_tokens(records, tokenizer, TokenLimits(6, 5, 8), "", cache)
    assert len(entries(cache, "tokens")) == 3


def test_padding_rule_matches_the_tokenizer_on_both_sides(tokenizer):
    texts, prefixes = ["a short one", "a somewhat longer text than the first"], ["Instruction: x Query: ", ""]
    for side in ("right", "left"):
        tokenizer.padding_side = side
        try:
            ids = [tokenizer(p + t, truncation=True, max_length=9)["input_ids"] for p, t in zip(prefixes, texts)]
            counts = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prefixes]
            padded = PaddingRule.of(tokenizer).pad(ids, counts)
            expected = tokenize_with_prefixes(tokenizer, texts, 9, prefixes)
            assert padded.keys() == expected.keys()
            for key in expected:
                assert torch.equal(padded[key], expected[key]), (side, key)
        finally:
            tokenizer.padding_side = "right"


# --- workers ------------------------------------------------------------------------------------------

def test_workers_read_the_mapped_files_and_give_the_same_batches(tmp_path, tokenizer):
    cache = tmp_path / "cache"
    sources = [ir(write_jsonl(tmp_path / "ir.jsonl", IR_ROWS * 4)),
               sts(write_jsonl(tmp_path / "sts.jsonl", STS_ROWS * 8))]
    dataset = ArrowTrainingDataset(sources, ["Instruction: a Query: ", ""], seed=3, cache_dir=cache)
    dataset.tokenize(tokenizer, TokenLimits(16, 16, 16))
    # what a spawned worker receives: file paths, not the data; unpickled, it maps the same files
    assert len(pickle.dumps(dataset)) < 4000
    clone = pickle.loads(pickle.dumps(dataset))
    assert repr(clone[(5, 0)]) == repr(dataset[(5, 0)]) and repr(clone[(45, 1)]) == repr(dataset[(45, 1)])
    sampler = TaskBatchSampler(dataset.sizes, ["ir", "sts"], [4, 4], seed=5)
    collate = TokenCollator(PaddingRule.of(tokenizer), n_positives=2, n_negatives=2)

    def batches(workers: int, context=None) -> list:
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                            multiprocessing_context=context)
        return [{k: v for k, v in b.items() if isinstance(v, (torch.Tensor, dict))} for b in loader]

    single = batches(0)
    for workers, context in ((2, "fork"),):
        other = batches(workers, context)
        assert len(other) == len(single)
        for a, b in zip(single, other):
            assert repr(a) == repr(b)


# --- DDP: two ranks share one cache ---------------------------------------------------------------------

def test_two_ddp_ranks_with_workers_build_each_entry_once(tiny_model_dir, tmp_path):
    from ddp_driver.launch import run_codiemb

    cache = tmp_path / "cache"
    train = json.dumps([
        {"name": "ir_a", "task": "ir", "path": str(write_jsonl(tmp_path / "ir.jsonl", IR_ROWS * 3)),
         "instruction": "answer"},
        {"name": "sts_b", "task": "sts", "path": "pkg://codiemb_pl/demo/sts_train.jsonl", "max_samples": 40}])
    arguments = ["--model.model_name_or_path", str(tiny_model_dir), "--data.train", train,
                 "--data.cache_dir", str(cache), "--data.num_workers", "2", "--data.n_negatives", "1",
                 "--data.ir_batch_size", "2", "--data.sts_batch_size", "2", "--trainer.max_steps", "4"]
    result = run_codiemb(arguments, world_size=2)
    assert result.returncode == 0, result.stdout[-4000:]
    built = build_lines(cache)
    # one records table and one token table per source, although both ranks (and their workers) read them
    assert sorted(line.split()[1].split("-")[0] for line in built) == ["records", "records", "tokens", "tokens"]
    assert len(entries(cache, "records")) == 2 and len(entries(cache, "tokens")) == 2
