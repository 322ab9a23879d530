"""One rule for instruction prefixes left out of pooling (`model.pooling.prefix_pooling_mask`), shared by the
training/validation collate and `TextEncoder.encode`."""

from __future__ import annotations

import pytest
import torch

from codiemb_pl.data.collate import tokenize_texts
from codiemb_pl.data.instructions import INSTRUCTION_TEMPLATE, instruction_prefix
from codiemb_pl.model.pooling import prefix_pooling_mask
from codiemb_pl.model.encoder import TextEncoder
from codiemb_pl.errors import InputError

PREFIX = instruction_prefix("find the matching sentence")
TEXTS = ["a man plays a guitar on the street", "tea", "the stock market fell sharply today after the news"]


def test_instruction_prefix_fills_the_one_template():
    assert INSTRUCTION_TEMPLATE == "Instruction: {instruction} Query: "
    assert instruction_prefix("find facts") == "Instruction: find facts Query: "
    assert instruction_prefix("x", "<{instruction}> ") == "<x> "
    assert instruction_prefix(None) == "" and instruction_prefix("") == ""


def test_mask_right_padding_leaves_out_the_leading_token_and_the_prefix():
    attention = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    # row 0: [CLS] p p t [SEP] pad; row 1: no prefix; row 2: [CLS] p t t t [SEP]
    mask = prefix_pooling_mask(attention, [2, 0, 1], leading=1)
    assert mask.tolist() == [[0, 0, 0, 1, 1, 0], [1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1]]
    assert torch.equal(attention, torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]]))


def test_mask_left_padding_leaves_out_the_leading_token_and_the_prefix():
    attention = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    assert prefix_pooling_mask(attention, [1, 2], leading=1).tolist() == [[0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1]]


def test_mask_keeps_the_last_real_token_when_truncated_inside_the_prefix():
    attention = torch.tensor([[1, 1, 1, 1, 0], [0, 1, 1, 1, 1]])
    assert prefix_pooling_mask(attention, [9, 9], leading=1).tolist() == [[0, 0, 0, 1, 0], [0, 0, 0, 0, 1]]


@pytest.fixture(scope="module")
def encoders(tiny_model_dir):
    return (TextEncoder(str(tiny_model_dir), include_prompt=False, max_seq_length=64),
            TextEncoder(str(tiny_model_dir), include_prompt=True, max_seq_length=64))


def test_encode_with_a_prefix_equals_the_training_forward(encoders):
    excluding, _ = encoders
    features = tokenize_texts(excluding.tokenizer, TEXTS, 64, [PREFIX] * len(TEXTS))
    with torch.no_grad():
        training = excluding(features)
    assert torch.allclose(excluding.encode(TEXTS, batch_size=2, prefix=PREFIX), training, atol=1e-6)
    # the prefix matters, and it is left out exactly as sentence-transformers leaves a prompt out ([CLS] too)
    assert not torch.allclose(excluding.encode(TEXTS, prefix=PREFIX), excluding.encode(TEXTS), atol=1e-3)
    assert torch.allclose(excluding.encode(TEXTS, prefix=PREFIX), excluding.encode(TEXTS, prompt=PREFIX), atol=1e-6)


def test_encode_pools_a_prefix_when_the_model_includes_prompts(encoders):
    _, including = encoders
    joined = including.encode([PREFIX + text for text in TEXTS])
    assert torch.allclose(including.encode(TEXTS, prefix=PREFIX), joined, atol=1e-6)
    assert torch.allclose(including.encode(TEXTS, prompt=PREFIX), joined, atol=1e-6)


def test_encode_truncated_inside_the_prefix_keeps_a_finite_embedding(tiny_model_dir):
    short = TextEncoder(str(tiny_model_dir), include_prompt=False, max_seq_length=8)
    for embeddings in (short.encode(["text"], prefix="a very long instruction " * 10),
                       short.encode(["text"], prompt="a very long instruction " * 10)):
        assert torch.isfinite(embeddings).all() and float(embeddings.norm()) == pytest.approx(1.0, abs=1e-5)


def test_prefix_and_prompt_together_are_refused(encoders):
    with pytest.raises(InputError, match="both prefix and a prompt"):
        encoders[0].encode(TEXTS, prefix=PREFIX, prompt="query: ")
