"""Padding-free batches (`model/packing.py`, `model/step_embedding.py`, `model.padding_free`), token-budget gradient
cache chunks (`model.grad_cache_chunk_tokens`) and every speed feature off (`padding_free: false`) leaving a step's
numbers as they were.

Packed embeddings and parameter gradients equal the padded path's within 1e-5 for a BERT-style backbone (sdpa and
eager attention, mean pooling with an instruction prefix left out, cls pooling, the middle layer) and tiny Qwen2 /
Llama decoders (left padding, last-token pooling, block-causal mask).
"""

from __future__ import annotations

import pytest
import torch

from codiemb_pl.errors import InputError
from codiemb_pl.model.encoder import POOLING_MASK_KEY, TextEncoder
from codiemb_pl.model.packing import first_fit_decreasing, pack_features, packing_pays
from codiemb_pl.model.pooling import prefix_pooling_mask
from codiemb_pl.model.step_embedding import StepEmbedder, check_padding_free
from codiemb_pl.training.grad_cache import chunk_features, token_budget_bounds
from codiemb_pl.training.module import CoDiEmbModule
from ddp_driver.launch import model_without_dropout
from decoder_models import build_tiny_decoder
from test_grad_cache import ir_batch, parameter_grads, sts_batch, texts

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")]


@pytest.fixture(scope="module")
def still_bert(tiny_model_dir, tmp_path_factory):
    """The tiny BERT without dropout: the padded and packed paths then compute the same function."""
    return model_without_dropout(tiny_model_dir, tmp_path_factory.mktemp("packing") / "bert")


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def decoder_dir(request, tmp_path_factory):
    return build_tiny_decoder(tmp_path_factory.mktemp(f"packing_{request.param}"), request.param)


def groups_of(encoder: TextEncoder, prefix_tokens: int = 0) -> list[dict[str, torch.Tensor]]:
    """Three groups of different widths; the first with an instruction prefix left out of mean pooling."""
    groups = [encoder.tokenize(texts(5, 1)), encoder.tokenize(texts(7, 2)), encoder.tokenize(texts(3, 3))]
    if prefix_tokens:
        groups[0][POOLING_MASK_KEY] = prefix_pooling_mask(groups[0]["attention_mask"], [prefix_tokens] * 5, 1)
    return groups


def grads_of(encoder: TextEncoder, outputs: list) -> dict[str, torch.Tensor]:
    """Parameter gradients of Σ_groups <R_g, E_g> for fixed random R_g (and of the middle layer's embeddings)."""
    encoder.zero_grad(set_to_none=True)
    generator = torch.Generator().manual_seed(0)
    flat = [part for output in outputs for part in (output if isinstance(output, tuple) else (output,))]
    loss = sum((part * torch.randn(part.shape, generator=generator, dtype=part.dtype)).sum() for part in flat)
    loss.backward()
    return {name: p.grad.clone() for name, p in encoder.named_parameters() if p.grad is not None}


def assert_packed_equals_padded(encoder: TextEncoder, groups: list, return_middle: bool = False) -> None:
    padded = [encoder(group, return_middle=return_middle) for group in groups]
    padded_grads = grads_of(encoder, padded)
    packed = encoder.forward_packed(groups, return_middle=return_middle)
    packed_grads = grads_of(encoder, packed)
    for ours, theirs in zip(packed, padded):
        for a, b in zip(ours if return_middle else (ours,), theirs if return_middle else (theirs,)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert packed_grads.keys() == padded_grads.keys() and len(padded_grads) > 10
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("pooling, attention", [("mean", "sdpa"), ("cls", "sdpa"), ("mean", "eager")])
def test_packed_bert_embeddings_and_gradients_equal_the_padded_ones(still_bert, pooling, attention):
    encoder = TextEncoder(str(still_bert), pooling=pooling)
    encoder.model.set_attn_implementation(attention)
    assert encoder.can_pack() and encoder.attention_implementation == attention
    groups = groups_of(encoder, prefix_tokens=2)
    packed = pack_features(groups, 0, causal=False, varlen=False, mask_dtype=None)
    assert packed.rows < sum(len(g["input_ids"]) for g in groups)       # texts share rows: padding left out
    assert int(packed.token_mask.sum()) == sum(int(g["attention_mask"].sum()) for g in groups)
    assert_packed_equals_padded(encoder, groups, return_middle=pooling == "mean")


def test_packed_decoder_embeddings_and_gradients_equal_the_left_padded_ones(decoder_dir):
    encoder = TextEncoder(str(decoder_dir))
    assert encoder.tokenizer.padding_side == "left" and encoder.pooling == "last" and encoder.can_pack()
    assert_packed_equals_padded(encoder, groups_of(encoder))


def test_first_fit_decreasing_places_longest_first_into_the_first_row_with_room():
    rows, offsets = first_fit_decreasing([3, 8, 5, 2, 4], width=8)
    # 8 -> row 0; 5 -> row 1 @0; 4 -> row 2 @0; 3 -> row 1 @5; 2 -> row 2 @4
    assert rows == [1, 0, 1, 2, 2] and offsets == [5, 0, 0, 4, 0]


def test_packed_rows_carry_per_text_positions_and_a_block_mask():
    group = {"input_ids": torch.tensor([[5, 6, 7], [8, 9, 0]]), "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
             "token_type_ids": torch.zeros(2, 3, dtype=torch.long)}
    short = {"input_ids": torch.tensor([[4]]), "attention_mask": torch.tensor([[1]]),
             "token_type_ids": torch.zeros(1, 1, dtype=torch.long)}
    packed = pack_features([group, short], 0, causal=True, varlen=False)
    assert packed.inputs["input_ids"].tolist() == [[5, 6, 7], [8, 9, 4]]
    assert packed.inputs["position_ids"].tolist() == [[0, 1, 2], [0, 1, 0]]
    block_causal = [[True, False, False], [True, True, False], [False, False, True]]
    assert packed.inputs["attention_mask"][1, 0].tolist() == block_causal
    assert packed.gather.tolist() == [[0, 1, 2], [3, 4, 6], [5, 6, 6]]    # 6 = R·W: the zero row
    varlen = pack_features([group, short], 0, causal=True, varlen=True)
    assert "attention_mask" not in varlen.inputs and varlen.inputs["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0]]


def test_the_auto_rule_packs_where_padding_is_wasted_and_not_where_one_long_row_would_cost_more():
    dims = dict(parameters=20_000_000, layers=6, hidden=384, varlen=False)
    # 32 padded rows of 128 against 16 full rows + 16 texts of 20 in 3 rows (6 per row): 19 rows of 128
    assert packing_pays([[20, 128] * 16], buckets=1, **dims)
    # groups padded on their own waste nothing here: 40 packed rows of 128 cost more than 32·128 + 32·30
    assert not packing_pays([[30] * 32, [128] * 32], buckets=1, **dims)
    assert packing_pays([[128] * 32], buckets=1, **{**dims, "varlen": True})   # flash: no W² cost, always
    # lengths 1..128: 65 packed rows of 128 against 1 bucket of 128 rows (pays), 8 buckets of 16 rows (−9 %: not
    # the 15 % margin)
    assert packing_pays([list(range(1, 129))], buckets=1, **dims)
    assert not packing_pays([list(range(1, 129))], buckets=8, **dims)


def test_unpackable_backbones_refuse_true_and_pad_under_auto(still_bert):
    encoder = TextEncoder(str(still_bert))
    encoder.model.config.model_type = "roberta"     # positions start after the padding index: not known to packing
    assert not encoder.can_pack()
    with pytest.raises(InputError, match="model.padding_free: .*cannot be packed"):
        check_padding_free(True, encoder)
    with pytest.raises(InputError, match="unknown setting 'sometimes'"):
        check_padding_free("sometimes", encoder)
    assert not StepEmbedder(encoder, padding_free="auto").packs(groups_of(encoder))


@pytest.mark.parametrize("task", ["ir", "sts"])
@pytest.mark.parametrize("setting", [True, "auto"])
def test_module_steps_packed_or_merged_equal_the_padded_step(still_bert, task, setting):
    """Loss and every parameter gradient of a training step, dropout off: IR with hard negatives, CoDiEmb STS with
    MidNCE (the middle layer); "auto" merges groups of one width on this batch or packs, whichever its rule says."""
    reference = CoDiEmbModule(str(still_bert), ir_temperature=0.05).train()
    module = CoDiEmbModule(str(still_bert), ir_temperature=0.05, padding_free=setting).train()
    batch = (ir_batch if task == "ir" else sts_batch)(module)
    batch = {**batch, "scores": batch["scores"].float()} if task == "sts" else batch
    expected, got = parameter_grads(reference, lambda m: m.training_step(batch, 0)), \
        parameter_grads(module, lambda m: m.training_step(batch, 0))
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_with_every_feature_off_a_step_is_the_per_group_padded_step(tiny_model_dir):
    """Defaults (padding_free false, no compile, no token budget), dropout ON: the loss and gradients are those of
    embedding each group on its own, padded, in order (the path before these settings existed), bit for bit."""
    module = CoDiEmbModule(str(tiny_model_dir), ir_temperature=0.05).train()
    assert module.step_embedder.padding_free is False
    batch = ir_batch(module)
    objective = module.objectives["ir"]

    def by_hand(m):
        embeddings = {name: m.encoder(features) for name, features in objective.text_groups(batch).items()}
        return objective.score(embeddings, batch)[0]

    step, hand = parameter_grads(module, lambda m: m.training_step(batch, 0)), parameter_grads(module, by_hand)
    for name, grad in hand.items():
        assert torch.equal(step[name], grad), name


def test_token_budget_bounds_hold_rows_times_longest_within_the_budget():
    assert token_budget_bounds([10, 10, 10, 40, 5, 5], max_rows=0, max_tokens=40) == [0, 3, 4, 6]
    assert token_budget_bounds([10, 10, 10, 40, 5, 5], max_rows=2, max_tokens=40) == [0, 2, 3, 4, 6]
    assert token_budget_bounds([50, 3], max_rows=0, max_tokens=40) == [0, 1, 2]    # too long: a chunk of its own
    assert token_budget_bounds([4] * 7, max_rows=3, max_tokens=0) == [0, 3, 6, 7]  # texts only, as before


def test_token_budget_chunks_trim_each_chunk_and_the_cache_gives_the_uncached_gradients(still_bert):
    module = CoDiEmbModule(str(still_bert), ir_temperature=0.05).train()
    cached = CoDiEmbModule(str(still_bert), ir_temperature=0.05, grad_cache_chunk_tokens=24).train()
    batch = ir_batch(cached)
    features = batch["negatives"]
    chunks = chunk_features(features, 0, max_tokens=24)
    assert len(chunks) > 1 and all(c["input_ids"].numel() <= 24 or len(c["input_ids"]) == 1 for c in chunks)
    assert sum(len(c["input_ids"]) for c in chunks) == len(features["input_ids"])
    expected = parameter_grads(module, lambda m: m.training_step(batch, 0))
    got = parameter_grads(cached, lambda m: m.training_step(batch, 0))
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
