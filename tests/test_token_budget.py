"""Token-budget batch sizes (`data.ir_batch_tokens` / `data.sts_batch_tokens`, `data/token_budget.py`): the sizes
against hand-computed ones, on a token table of known lengths and on tiny sources through the real cache; the sampler
then plans exactly as with those batch sizes configured by hand (so single-task batches, the epoch plan and a
resume are unchanged); bad values get one line."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from codiemb_pl.data.cache.token_ids import IR_TOKEN_SCHEMA, STS_TOKEN_SCHEMA
from codiemb_pl.data.datamodule import CoDiEmbDataModule
from codiemb_pl.data.sources import SourceConfig
from codiemb_pl.data.token_budget import (
    budget_batch_size,
    budget_batch_sizes,
    histogram_percentile,
    length_histogram,
    tokens_per_record,
)
from codiemb_pl.errors import InputError
from conftest import minilm_path


def ids(length: int) -> list[int]:
    return [7] * length


def two_chunks(schema: pa.Schema, rows: dict[str, list]) -> pa.Table:
    """`rows` as a table of two record batches (the histogram is summed chunk by chunk)."""
    count = len(next(iter(rows.values())))
    table = pa.table(rows, schema=schema)
    return pa.Table.from_batches([*table.slice(0, count // 2).to_batches(), *table.slice(count // 2).to_batches()])


def test_tokens_per_record_counts_each_slot_at_the_95th_percentile_length():
    # queries: 19 of 4 tokens and one of 50 -> p95 = the 19th shortest of 20 = 4 (the mean, 6.3, would be wrong)
    # positives: 20 of 10 tokens and one of 30 (record 0 has two) -> p95 = the 20th of 21 = 10
    # negatives: [6, 8] per record -> p95 = the 38th of 40 = 8
    ir = two_chunks(IR_TOKEN_SCHEMA, {
        "query": [ids(50)] + [ids(4)] * 19,
        "positives": [[ids(10), ids(30)]] + [[ids(10)]] * 19,
        "negatives": [[ids(6), ids(8)]] * 20})
    assert len(ir.column("query").chunks) == 2
    assert histogram_percentile(length_histogram(ir.column("query"))) == 4
    assert histogram_percentile(length_histogram(ir.column("positives"))) == 10
    assert tokens_per_record("ir", ir.column, n_positives=2, n_negatives=3) == 4 + 2 * 10 + 3 * 8
    assert budget_batch_size(500, 48) == 10 and budget_batch_size(40, 48) == 1

    without_negatives = ir.drop_columns(["negatives"]).append_column(
        "negatives", pa.array([[]] * 20, type=IR_TOKEN_SCHEMA.field("negatives").type))
    assert tokens_per_record("ir", without_negatives.column, n_positives=2, n_negatives=3) == 4 + 2 * 10  # no slots

    sts = two_chunks(STS_TOKEN_SCHEMA, {"text1": [ids(n) for n in range(1, 21)], "text2": [ids(3)] * 20})
    assert tokens_per_record("sts", sts.column, n_positives=1, n_negatives=0) == 19 + 3


def test_a_source_s_own_batch_size_wins_and_a_budget_below_one_record_gives_one_with_a_warning():
    sts = pa.table({"text1": [ids(6)] * 4, "text2": [ids(8)] * 4}, schema=STS_TOKEN_SCHEMA)   # 14 tokens per record
    sources = [SourceConfig(name="small", task="sts", path="-"), SourceConfig(name="own", task="sts", path="-",
                                                                             batch_size=5)]
    sizes, lines, warnings = budget_batch_sizes(sources, [sts.column, sts.column], {"ir": 0, "sts": 10}, 1, 0)
    assert sizes == [1, None]
    assert lines == ["[codiemb] small (sts): batch size 1 per device from data.sts_batch_tokens 10 (~14 tokens per "
                     "record at the 95th percentile lengths)",
                     "[codiemb] own (sts): its own batch_size 5 wins over data.sts_batch_tokens 10"]
    assert warnings == ["[codiemb] data.sts_batch_tokens 10 is below the ~14 tokens of one record of small: batch "
                        "size 1; raise the budget"]
    assert budget_batch_sizes(sources, [sts.column] * 2, {"ir": 0, "sts": 0}, 1, 0) == ([None, None], [], [])


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> list[SourceConfig]:
    """Sources whose texts are n words of one token each: n + 2 tokens with [CLS] and [SEP]."""
    folder = tmp_path_factory.mktemp("token_budget")

    def words(count: int) -> str:
        return " ".join(["cat"] * count)

    def ir(name: str, size: int, query: int, passage: int) -> SourceConfig:
        rows = [{"query": words(query), "positives": [words(passage)]} for _ in range(size)]
        return SourceConfig(name=name, task="ir", path=write_jsonl(folder / f"{name}.jsonl", rows))

    sts_rows = [{"sentence1": words(4), "sentence2": words(6), "score": i % 5} for i in range(40)]
    return [ir("short", 40, query=3, passage=8),          # 5 + 10 = 15 tokens per record
            ir("long", 30, query=1, passage=18),          # 3 + 20 = 23
            SourceConfig(name="pairs", task="sts", path=write_jsonl(folder / "pairs.jsonl", sts_rows))]  # 6 + 8 = 14


def datamodule(sources: list[SourceConfig], cache: Path, **options) -> CoDiEmbDataModule:
    module = CoDiEmbDataModule(train=sources, tokenizer=minilm_path(), cache_dir=str(cache), seed=3, **options)
    module.setup("fit")
    return module


def test_budgets_give_the_hand_computed_sizes_and_the_plan_of_those_sizes(sources, tmp_path):
    budgeted = datamodule(sources, tmp_path, ir_batch_tokens=100, sts_batch_tokens=50)
    sizes = {source.name: budgeted.batch_size_of(source) for source in sources}
    assert sizes == {"short": 100 // 15, "long": 100 // 23, "pairs": 50 // 14}   # 6, 4, 3
    by_hand = [SourceConfig(**{**vars(source), "batch_size": sizes[source.name]}) for source in sources]
    fixed = datamodule(by_hand, tmp_path)

    sampler, expected = budgeted.build_sampler(1, 0, 1), fixed.build_sampler(1, 0, 1)
    assert sampler.plan(0) == expected.plan(0) and sampler.plan(1) == expected.plan(1)
    micro_batches = list(sampler)
    for micro in micro_batches:   # single-task, single-source batches of that source's budgeted size
        (source,) = {sampler.dataset_of(index) for index, _ in micro}
        assert len(micro) == sizes[sources[source].name]

    # a resumed run (a fresh module on the same cache) computes the same sizes and continues the same plan
    for _ in range(3):
        sampler.mark_consumed()
    resumed = datamodule(sources, tmp_path, ir_batch_tokens=100, sts_batch_tokens=50).build_sampler(1, 0, 1)
    resumed.load_state_dict(sampler.state_dict())
    assert list(resumed) == micro_batches[3:]


def test_a_negative_budget_is_one_clear_error():
    with pytest.raises(InputError, match=r"data.sts_batch_tokens: -8 is negative"):
        CoDiEmbDataModule(sts_batch_tokens=-8)
