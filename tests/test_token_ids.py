"""The token cache's fast path (the tokenizer's backend copied, ids gathered from flat buffers, row ranges
over spawned processes) gives exactly `tokenizer(prefix + text, truncation=True, max_length=L)["input_ids"]`:
BERT (MiniLM's tokenizer) and tiny decoders whose tokenizer appends EOS, with truncation and a prefix."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pytest
from transformers import AutoTokenizer, LlamaConfig, Qwen2Config

import decoder_models
from codiemb_pl.data.cache.records import open_records
from codiemb_pl.data.cache.token_ids import TokenLimits, choose_encoder, list_array
from codiemb_pl.data.cache.tokeniser_pool import (
    PROCESSES_ENV,
    _main_hidden,
    _tokenise_range,
    loaded_modules,
    ordered_map,
    process_count,
    token_batches,
    tokeniser_pool,
)
from codiemb_pl.data.sources import SourceConfig
from codiemb_pl.errors import InputError
from codiemb_pl.model.decoder import load_backbone_tokenizer
from conftest import minilm_path
from test_data_sources import write_jsonl

WORDS = "retrieval of passages by dense vectors trained with contrastive losses on Hard negatives, naïve".split()
PREFIX = "Instruction: find the passage Query: "


def text(i: int, words: int) -> str:
    return " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(words))


IR_ROWS = [{"query": text(i, 1 + i % 9), "positives": [text(i + 1, 2 + i % 30)],
            "negatives": [text(i + k, 3 * k + i % 25) for k in range(i % 4)]} for i in range(11)]
STS_ROWS = [{"sentence1": text(i, 1 + i % 20), "sentence2": text(i + 3, 2 + i % 13), "score": i % 6}
            for i in range(11)]
LIMITS = TokenLimits(query=9, passage=12, sts=10)  # many texts are longer: truncation is exercised


def tiny_decoder_tokenizer_folder(folder: Path, family: str) -> Path:
    """A decoder's tokenizer and config (no weights: the data path reads only these)."""
    tokenizer = decoder_models._qwen2_tokenizer() if family == "qwen2" else decoder_models._llama_tokenizer()
    config_class = Qwen2Config if family == "qwen2" else LlamaConfig
    config_class(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                 bos_token_id=tokenizer.bos_token_id).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["bert", "qwen2", "llama"])
def tokenizer(request, tmp_path_factory):
    if request.param == "bert":
        return AutoTokenizer.from_pretrained(minilm_path())
    folder = tiny_decoder_tokenizer_folder(tmp_path_factory.mktemp(request.param), request.param)
    tokenizer = load_backbone_tokenizer(str(folder))
    assert tokenizer("a b")["input_ids"][-1] == tokenizer.eos_token_id  # the code path's appended EOS
    return tokenizer


def expected_table(tokenizer, task: str) -> pa.Table:
    """Each text through the reference call, one at a time."""
    def ids(value: str, length: int, prefix: str = "") -> list[int]:
        return tokenizer(prefix + value, truncation=True, max_length=length)["input_ids"]
    if task == "ir":
        return pa.table({"query": [ids(r["query"], LIMITS.query, PREFIX) for r in IR_ROWS],
                         "positives": [[ids(t, LIMITS.passage) for t in r["positives"]] for r in IR_ROWS],
                         "negatives": [[ids(t, LIMITS.passage) for t in r["negatives"]] for r in IR_ROWS]})
    return pa.table({"text1": [ids(r["sentence1"], LIMITS.sts, PREFIX) for r in STS_ROWS],
                     "text2": [ids(r["sentence2"], LIMITS.sts, PREFIX) for r in STS_ROWS]})


@pytest.mark.parametrize("task", ["ir", "sts"])
def test_fast_path_in_process_and_over_two_processes_equals_the_tokenizer_call(tmp_path, tokenizer, task):
    rows = IR_ROWS if task == "ir" else STS_ROWS
    records = open_records(SourceConfig(name=task, task=task, path=str(write_jsonl(tmp_path / "s.jsonl", rows))),
                           tmp_path / "cache")
    expected = expected_table(tokenizer, task)
    limit = LIMITS.query if task == "ir" else LIMITS.sts
    assert any(len(ids) == limit for ids in expected.column(0).to_pylist())  # some were truncated
    encode, spec = choose_encoder(tokenizer, records.table, task, LIMITS, PREFIX)
    assert spec is not None  # the backend copy agreed with the tokenizer call and is used
    for processes in (1, 2) if tokenizer.name_or_path == minilm_path() and task == "ir" else (1,):
        batches = list(token_batches(tokenizer, records.mapped.path, records.table, task, LIMITS, PREFIX,
                                     processes=processes, range_rows=4))
        assert [b.num_rows for b in batches] == [4, 4, 3]  # row order kept, in ranges of 4
        table = pa.Table.from_batches(batches)
        assert table.cast(expected.schema).equals(expected), processes


def test_a_tokenizer_whose_call_differs_from_its_backend_is_called_itself():
    class Suffixing(type(AutoTokenizer.from_pretrained(minilm_path()))):
        def __call__(self, text, *args, **kwargs):  # something the backend does not know about
            return super().__call__([t + " retrieval" for t in text], *args, **kwargs)

    tokenizer = Suffixing.from_pretrained(minilm_path())
    sample = pa.table({"text1": ["hello there", "foo"], "text2": ["x", "y"]})
    encode, spec = choose_encoder(tokenizer, sample, "sts", LIMITS, "")
    assert spec is None
    assert encode(["hello there"], 10).to_pylist() == tokenizer(["hello there"], truncation=True,
                                                                max_length=10)["input_ids"]


def test_list_array_from_flat_buffers():
    array = list_array([[1, 2], [], [3]])
    assert array.type == pa.list_(pa.int32()) and array.to_pylist() == [[1, 2], [], [3]]
    assert list_array([]).to_pylist() == []


def test_process_count_setting(monkeypatch):
    monkeypatch.setenv(PROCESSES_ENV, "3")
    assert process_count() == 3
    monkeypatch.setenv(PROCESSES_ENV, "0")
    assert process_count() == 1
    monkeypatch.setenv(PROCESSES_ENV, "two")
    with pytest.raises(InputError, match=PROCESSES_ENV):
        process_count()


def test_tokeniser_processes_load_the_tokenizer_and_not_torch(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    records = open_records(SourceConfig(name="ir", task="ir", path=str(write_jsonl(tmp_path / "s.jsonl", IR_ROWS))),
                           tmp_path / "cache")
    _, spec = choose_encoder(tokenizer, records.table, "ir", LIMITS, PREFIX)
    with tokeniser_pool(records.mapped.path, spec, "ir", LIMITS, PREFIX, processes=1, range_rows=4) as pool:
        with _main_hidden():
            modules = set(pool.submit(loaded_modules).result())
        ids = pool.submit(_tokenise_range, 8).result()
    assert {"tokenizers", "pyarrow", "codiemb_pl.data.cache.token_ids"} <= modules
    assert not {name for name in modules if name.split(".")[0] in ("torch", "transformers", "lightning")}
    assert ids.to_pylist() == expected_table(tokenizer, "ir").slice(8).to_pylist()


def test_ordered_map_keeps_order_and_a_bounded_window():
    submitted, consumed, ahead = [0], [0], []

    class Counting(ThreadPoolExecutor):
        def submit(self, function, *args):
            submitted[0] += 1
            ahead.append(submitted[0] - consumed[0])
            return super().submit(function, *args)

    with Counting(4) as pool:
        results = []
        for value in ordered_map(pool, lambda x: x * x, range(20), window=3):
            results.append(value)
            consumed[0] += 1
    assert results == [x * x for x in range(20)]
    assert max(ahead) == 3 + 1 and submitted[0] == 20  # the window, and the result being handed over
