"""Collate, prefix-aware tokenisation and evaluation chunking."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoTokenizer

from codiemb_pl.data.cache.records import text_id
from codiemb_pl.data.collate import PaddingRule, TokenCollator, TokenizedItem, pick_fixed_count, tokenize_texts
from codiemb_pl.data.records import IRCorpus, STSRecord
from codiemb_pl.model.pooling import leading_special_tokens
from codiemb_pl.data.eval_sets import EmbeddingBuffers, EvalSet, plan_eval_chunks
from conftest import minilm_path


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_path())


def test_text_id_is_stable_and_63_bit():
    assert text_id("hello") == text_id("hello")
    assert text_id("hello") != text_id("hello ")
    assert 0 <= text_id("x") < 2**63
    # fixed value: the hash must not depend on the process (Python's hash() would)
    assert text_id("codiemb") == int.from_bytes(__import__("hashlib").blake2b(b"codiemb", digest_size=8).digest(),
                                                "little") & (2**63 - 1)


def test_pick_fixed_count_subsets_and_refills():
    rng = random.Random(0)
    chosen = pick_fixed_count(["a", "b", "c", "d"], 2, rng)
    assert len(chosen) == 2 and len(set(chosen)) == 2 and set(chosen) <= {"a", "b", "c", "d"}
    filled = pick_fixed_count(["a", "b"], 5, random.Random(1))
    assert len(filled) == 5 and set(filled) == {"a", "b"}  # every original kept, rest re-sampled
    assert pick_fixed_count([], 3, rng) == [] and pick_fixed_count(["a"], 0, rng) == []


def test_prefix_tokens_are_left_out_of_pooling_mask(tokenizer):
    prefix = "Instruction: find facts Query: "
    texts = ["why is the sky blue", "tea"]
    encoded = tokenize_texts(tokenizer, texts, 64, [prefix, prefix])
    plain = tokenize_texts(tokenizer, texts, 64)
    n_prefix = len(tokenizer(prefix, add_special_tokens=False)["input_ids"])
    assert leading_special_tokens(tokenizer) == 1  # [CLS]
    for row, text in enumerate(texts):
        attention = encoded["attention_mask"][row]
        pooling = encoded["pooling_mask"][row]
        assert int(attention.sum() - pooling.sum()) == 1 + n_prefix  # [CLS] and the prefix (sentence-transformers' rule)
        assert pooling[:1 + n_prefix].sum() == 0 and pooling[1 + n_prefix] == 1
        # the text's own tokens (and [SEP]) stay in the mean: as many as without the prefix, minus [CLS]
        assert int(pooling.sum()) == int(plain["attention_mask"][row].sum()) - 1
    assert "pooling_mask" not in plain


def test_prefix_never_masks_everything_when_truncated(tokenizer):
    prefix = "a very long instruction " * 10
    encoded = tokenize_texts(tokenizer, ["text"], 8, [prefix])
    assert int(encoded["pooling_mask"].sum()) >= 1


def ir_item(tokenizer, query, positives, negatives=(), dataset="d", seed=0):
    """An IR record as the token cache gives it (ids of each text, `text_id` of each passage)."""
    ids = lambda texts: [tokenizer(text)["input_ids"] for text in texts]
    return TokenizedItem(dataset=dataset, task="ir", seed=seed, prefix_tokens=0, query=tokenizer(query)["input_ids"],
                         positives=ids(positives), negatives=ids(negatives),
                         positive_text_ids=[text_id(t) for t in positives],
                         negative_text_ids=[text_id(t) for t in negatives])


def sts_item(tokenizer, text1, text2, score, prefix=""):
    count = len(tokenizer(prefix, add_special_tokens=False)["input_ids"]) if prefix else 0
    return TokenizedItem(dataset="s", task="sts", seed=0, prefix_tokens=count, text1=tokenizer(prefix + text1)["input_ids"],
                         text2=tokenizer(prefix + text2)["input_ids"], score=score)


def test_ir_collate_shapes_masks_and_ids(tokenizer):
    collator = TokenCollator(PaddingRule.of(tokenizer), n_positives=2, n_negatives=3)
    items = [ir_item(tokenizer, "q1", ("p1",), ("n1", "n2", "n3", "n4"), seed=1),
             ir_item(tokenizer, "q2", ("p2a", "p2b"), (), seed=2)]
    batch = collator(items)
    assert batch["task"] == "ir" and batch["dataset"] == "d"
    assert batch["query"]["input_ids"].shape[0] == 2
    assert batch["positives"]["input_ids"].shape[0] == 4 and batch["negatives"]["input_ids"].shape[0] == 6
    assert batch["negative_mask"].tolist() == [[True, True, True], [False, False, False]]
    assert batch["positive_ids"].shape == (2, 2)
    assert set(batch["positive_ids"][0].tolist()) == {text_id("p1")}  # one positive re-sampled to fill P=2
    assert set(batch["positive_ids"][1].tolist()) == {text_id("p2a"), text_id("p2b")}
    assert set(batch["negative_ids"][0].tolist()) <= {text_id(t) for t in ("n1", "n2", "n3", "n4")}
    again = collator(items)  # same seeds -> same choices
    assert torch.equal(again["negative_ids"], batch["negative_ids"])


def test_ir_collate_without_any_negatives_has_none(tokenizer):
    collator = TokenCollator(PaddingRule.of(tokenizer), n_positives=1, n_negatives=2)
    batch = collator([ir_item(tokenizer, "q", ("p",))])
    assert batch["negatives"] is None and batch["negative_mask"] is None


def test_sts_and_mixed_collate(tokenizer):
    collator = TokenCollator(PaddingRule.of(tokenizer), n_positives=1)
    sts = [sts_item(tokenizer, "a cat", "a dog", 0.4, "Instruction: x Query: "),
           sts_item(tokenizer, "red", "blue", 0.1, "Instruction: x Query: ")]
    batch = collator(sts)
    assert batch["task"] == "sts" and torch.allclose(batch["scores"], torch.tensor([0.4, 0.1]))
    assert "pooling_mask" in batch["text1"] and "pooling_mask" in batch["text2"]
    mixed = collator([ir_item(tokenizer, "q", ("p",), dataset="i")] + sts)
    assert mixed["task"] == "mixed" and mixed["ir"]["query"]["input_ids"].shape[0] == 1
    assert mixed["sts"]["scores"].shape == (2,)


def test_validation_chunks_cover_every_text_once_across_ranks():
    sets = [EvalSet.from_sts("s", [STSRecord(f"a{i}" * (i % 5 + 1), f"b{i}", 0.5) for i in range(23)]),
            EvalSet.from_ir("r", IRCorpus(queries={f"q{i}": f"query {i}" for i in range(7)},
                                                corpus={f"d{i}": "doc " * (i + 1) for i in range(11)},
                                                qrels={"q0": {"d0": 1}}))]
    for world in (1, 2, 3):
        per_rank = [plan_eval_chunks(sets, 4, world, rank) for rank in range(world)]
        assert len({len(chunks) for chunks in per_rank}) == 1  # equal step counts on every rank
        seen = {}
        for chunks in per_rank:
            for chunk in chunks:
                for row in chunk.rows:
                    seen.setdefault((chunk.set_index, chunk.field, row), 0)
                    seen[(chunk.set_index, chunk.field, row)] += 1
        expected = {(i, f, r) for i, s in enumerate(sets) for f, texts in s.texts.items() for r in range(len(texts))}
        assert set(seen) == expected
    one_rank = plan_eval_chunks(sets, 4)
    for chunk in one_rank:  # length-sorted inside a field
        texts = sets[chunk.set_index].texts[chunk.field]
        lengths = [len(texts[r]) for r in chunk.rows]
        assert lengths == sorted(lengths)


def test_embedding_buffers_average_repeated_rows_and_detect_gaps():
    sets = [EvalSet.from_sts("s", [STSRecord("a", "b", 0.5), STSRecord("c", "d", 0.2)])]
    buffers = EmbeddingBuffers(sets, dim=2)
    buffers.add(0, "text1", torch.tensor([0, 1]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    buffers.add(0, "text1", torch.tensor([1]), torch.tensor([[0.0, 1.0]]))  # a padded repeat
    assert torch.equal(buffers.embeddings(0, "text1"), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert not buffers.complete()
    with pytest.raises(RuntimeError, match="never encoded"):
        buffers.embeddings(0, "text2")


def test_embedding_buffers_take_float64_embeddings_under_a_float64_default():
    """`trainer.precision: 64-true` sets torch's default dtype to float64 for the run: validation must still add
    the model's float64 embeddings into its float32 buffers."""
    sets = [EvalSet.from_sts("s", [STSRecord("a", "b", 0.5)])]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        buffers = EmbeddingBuffers(sets, dim=2)
        buffers.add(0, "text1", torch.tensor([0]), torch.tensor([[0.25, 0.5]], dtype=torch.float64))
    finally:
        torch.set_default_dtype(previous)
    assert buffers.embeddings(0, "text1").dtype == torch.float32
    assert torch.equal(buffers.embeddings(0, "text1"), torch.tensor([[0.25, 0.5]]))
