"""The MTEB adapter: mteb's own STS and retrieval evaluators, run offline on small local samples of
STS-B and SciFact injected into mteb's tasks, agree with our evaluation suite on the same model and data."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from codiemb_pl.data.eval_sets import EvalSet
from codiemb_pl.data.records import IRCorpus, STSRecord
from codiemb_pl.data.sources import SourceConfig, load_ir_corpus
from codiemb_pl.evaluation.mteb_adapter import MTEBEncoder, select_prompt
from codiemb_pl.evaluation.suite import evaluate_encoder
from codiemb_pl.model.encoder import TextEncoder

PROMPTS = {"query": "query: ", "document": "passage: "}


def test_select_prompt_prefers_the_most_specific_key():
    prompts = {"SciFact-query": "a", "SciFact": "b", "Retrieval-query": "c", "Retrieval": "d", "query": "e"}
    assert select_prompt(prompts, "SciFact", "Retrieval", "query") == "a"
    assert select_prompt(prompts, "SciFact", "Retrieval", "document") == "b"
    assert select_prompt(prompts, "NFCorpus", "Retrieval", "query") == "c"
    assert select_prompt(prompts, "NFCorpus", "Retrieval", "document") == "d"
    assert select_prompt({"query": "e"}, "STSBenchmark", "STS", None) is None
    assert select_prompt({"STS": "s"}, "STSBenchmark", "STS", None) == "s"


def test_encode_keeps_input_order_and_passes_the_prompt(tiny_model_dir):
    mteb = pytest.importorskip("mteb", reason="the optional extra `mteb` is not installed")
    encoder = TextEncoder(str(tiny_model_dir))
    adapter = MTEBEncoder(encoder, prompts=PROMPTS)
    metadata = mteb.get_task("SciFact").metadata
    texts = ["a short one", "a much longer text than the others here", "mid length text"]
    batches = [{"text": texts[:2]}, {"text": texts[2:]}]   # what an mteb DataLoader yields
    from mteb.types import PromptType

    got = adapter.encode(batches, task_metadata=metadata, hf_split="test", hf_subset="default",
                         prompt_type=PromptType.query)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == (3, 32)
    assert np.allclose(got, encoder.encode(texts, prompt="query: ").numpy(), atol=1e-6)
    assert not np.allclose(got, encoder.encode(texts).numpy(), atol=1e-4)
    assert isinstance(adapter.mteb_model_meta, mteb.models.ModelMeta)
    assert torch.allclose(adapter.similarity(got, got).diagonal(), torch.ones(3), atol=1e-5)


def _stsb_sample(shared_data, size: int = 48) -> list[dict]:
    rows = [json.loads(line) for line in (shared_data / "sts" / "stsb" / "test.jsonl").read_text().splitlines()]
    return random.Random(0).sample(rows, size)


@pytest.mark.slow
def test_mteb_sts_task_matches_our_suite(tiny_model_dir, shared_data):
    mteb = pytest.importorskip("mteb", reason="the optional extra `mteb` is not installed")
    import datasets

    rows = _stsb_sample(shared_data)
    task = mteb.get_task("STSBenchmark")
    task.dataset = {"default": datasets.DatasetDict({"test": datasets.Dataset.from_list(
        [{"sentence1": r["sentence1"], "sentence2": r["sentence2"], "score": float(r["score"])} for r in rows])})}
    task.data_loaded = True
    encoder = TextEncoder(str(tiny_model_dir))
    result = mteb.evaluate(MTEBEncoder(encoder), task, cache=None, show_progress_bar=False)
    theirs = result.task_results[0].scores["test"][0]

    pairs = [STSRecord(r["sentence1"], r["sentence2"], r["score"] / 5) for r in rows]
    ours, _ = evaluate_encoder(encoder, [EvalSet.from_sts("stsb", pairs)])
    assert theirs["cosine_spearman"] == pytest.approx(ours["stsb"]["cosine_spearman"], abs=1e-6)
    assert theirs["cosine_pearson"] == pytest.approx(ours["stsb"]["cosine_pearson"], abs=1e-5)


def _scifact_sample(shared_data, queries: int = 12, extra_docs: int = 60) -> IRCorpus:
    full = load_ir_corpus(SourceConfig("scifact", "ir", str(shared_data / "ir" / "scifact"), split="test"))
    query_ids = sorted(full.qrels)[:queries]
    relevant = {doc for qid in query_ids for doc in full.qrels[qid]}
    others = random.Random(0).sample(sorted(set(full.corpus) - relevant), extra_docs)
    return IRCorpus(queries={q: full.queries[q] for q in query_ids},
                    corpus={d: full.corpus[d] for d in sorted(relevant | set(others))},
                    qrels={q: full.qrels[q] for q in query_ids})


@pytest.mark.slow
def test_mteb_retrieval_task_with_prompts_matches_our_suite(tiny_model_dir, shared_data):
    mteb = pytest.importorskip("mteb", reason="the optional extra `mteb` is not installed")
    import datasets

    sample = _scifact_sample(shared_data)
    raw = {json.loads(line)["_id"]: json.loads(line) for line in
           (shared_data / "ir" / "scifact" / "corpus.jsonl").read_text().splitlines()}
    task = mteb.get_task("SciFact")
    task.dataset = {"default": {"test": {
        "corpus": datasets.Dataset.from_list([{"id": d, "title": raw[d]["title"], "text": raw[d]["text"]}
                                              for d in sample.corpus]),
        "queries": datasets.Dataset.from_list([{"id": q, "text": t} for q, t in sample.queries.items()]),
        "relevant_docs": sample.qrels, "top_ranked": None}}}
    task.data_loaded = True
    encoder = TextEncoder(str(tiny_model_dir))
    result = mteb.evaluate(MTEBEncoder(encoder, prompts=PROMPTS), task, cache=None, show_progress_bar=False)
    theirs = result.task_results[0].scores["test"][0]

    vset = EvalSet.from_ir("scifact", sample, query_prefix="query: ", passage_prefix="passage: ")
    ours, _ = evaluate_encoder(encoder, [vset])
    for metric in ("ndcg_at_10", "mrr_at_10", "recall_at_100", "map_at_100"):
        assert theirs[metric] == pytest.approx(ours["scifact"][metric], abs=1e-4), metric
    unprompted, _ = evaluate_encoder(encoder, [EvalSet.from_ir("scifact", sample)])
    assert unprompted["scifact"]["ndcg_at_10"] != pytest.approx(theirs["ndcg_at_10"], abs=1e-6)
