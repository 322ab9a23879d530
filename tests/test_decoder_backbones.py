"""Decoder backbones (Qwen2, Llama): last-token pooling at the appended EOS, left padding, the query
instruction format, lengths beyond 512, bf16, the sentence-transformers export and a short `codiemb fit`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from codiemb_pl.cli.main import main
from codiemb_pl.errors import InputError
from codiemb_pl.model.decoder import is_decoder_backbone, load_backbone_tokenizer
from codiemb_pl.model.encoder import TextEncoder
from codiemb_pl.model.pooling import last_token_pool
from decoder_models import build_tiny_decoder

FAMILIES = ["qwen2", "llama"]
TEXTS = ["a short one", "a somewhat longer sentence about retrieval", "mid length text"]


@pytest.fixture(scope="module", params=FAMILIES)
def decoder_dir(request, tmp_path_factory) -> Path:
    return build_tiny_decoder(tmp_path_factory.mktemp(request.param), request.param)


def test_last_token_pool_picks_the_last_real_token_under_left_and_right_padding():
    states = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    assert torch.equal(last_token_pool(states, right), torch.stack([states[0, 1], states[1, 3]]))
    assert torch.equal(last_token_pool(states, left), torch.stack([states[0, 3], states[1, 3]]))
    # a pooling mask that leaves out a prefix still ends at the last real token
    assert torch.equal(last_token_pool(states, torch.tensor([[0, 0, 0, 1], [1, 0, 1, 0]])),
                       torch.stack([states[0, 3], states[1, 2]]))


def test_decoder_detection_by_family():
    assert is_decoder_backbone({"model_type": "qwen2"}) and is_decoder_backbone({"model_type": "llama"})
    assert is_decoder_backbone({"model_type": "mistral"}) and is_decoder_backbone({"model_type": "qwen3"})
    assert not is_decoder_backbone({"model_type": "bert"}) and not is_decoder_backbone({"model_type": "xlm-roberta"})
    # remote-code families (MiniCPM) are recognised by their causal-LM auto class
    assert is_decoder_backbone({"model_type": "minicpm", "auto_map": {"AutoModelForCausalLM": "m.MiniCPMForCausalLM"}})


def test_tokenizer_appends_one_eos_pads_left_and_keeps_the_bos(decoder_dir):
    encoder = TextEncoder(str(decoder_dir))
    tokenizer = encoder.tokenizer
    assert encoder.pooling == "last" and tokenizer.padding_side == "left"
    features = encoder.tokenize(TEXTS)
    ids, mask = features["input_ids"], features["attention_mask"]
    assert torch.all(ids[:, -1] == tokenizer.eos_token_id) and torch.all(mask[:, -1] == 1)  # left padded, EOS last
    assert mask[0, 0] == 0 and mask[1, 0] == 1                                                 # padding on the left
    plain = tokenizer(TEXTS[1], add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    assert ids[1].tolist() == bos + plain + [tokenizer.eos_token_id]                           # exactly one EOS
    truncated = encoder.tokenize([TEXTS[1]], max_length=6)["input_ids"][0]
    assert len(truncated) == 6 and truncated[-1] == tokenizer.eos_token_id                     # truncation keeps EOS


def test_the_training_data_tokenizer_matches_the_encoders(decoder_dir):
    encoder = TextEncoder(str(decoder_dir))
    data_tokenizer = load_backbone_tokenizer(str(decoder_dir))
    assert data_tokenizer.padding_side == "left"
    expected = encoder.tokenize(TEXTS)
    actual = data_tokenizer(TEXTS, padding=True, truncation=True, max_length=encoder.max_seq_length,
                            return_tensors="pt")
    assert torch.equal(actual["input_ids"], expected["input_ids"])


def test_embedding_is_the_hidden_state_at_eos_whatever_the_padding(decoder_dir):
    encoder = TextEncoder(str(decoder_dir), normalize=False)
    alone = {name: encoder.encode([text]) for name, text in zip("abc", TEXTS)}
    batched = encoder.encode(TEXTS, batch_size=3)                     # left padded together
    for row, name in enumerate("abc"):
        assert torch.allclose(batched[row], alone[name][0], atol=1e-5)
    features = encoder.tokenize([TEXTS[0]])
    with torch.no_grad():
        states = encoder.model(**features).last_hidden_state
    assert torch.allclose(alone["a"][0], states[0, -1], atol=1e-6)   # the EOS position
    encoder.tokenizer.padding_side = "right"                          # right padding: the same embeddings
    assert torch.allclose(encoder.encode(TEXTS, batch_size=3), batched, atol=1e-5)


def test_query_instruction_is_left_out_of_pooling_and_documents_have_none(decoder_dir):
    from codiemb_pl.data.datamodule import CoDiEmbDataModule

    template = "Instruct: {instruction}\nQuery:"
    data = CoDiEmbDataModule(tokenizer=str(decoder_dir), instruction_template=template)
    prefix = data.prefix_for("find passages")
    assert prefix == "Instruct: find passages\nQuery:" and data.prefix_for(None) == ""
    features = data.tokenize(["what is rope", "a much longer query about rotary embeddings"], 64, [prefix, prefix])
    pooling_mask, attention = features["pooling_mask"], features["attention_mask"]
    assert torch.all(features["input_ids"][:, -1] == data.load_tokenizer().eos_token_id)
    assert torch.all(pooling_mask[:, -1] == 1)                       # last-token pooling lands on EOS
    prefix_tokens = len(data.load_tokenizer()(prefix, add_special_tokens=False)["input_ids"])
    assert torch.all((attention - pooling_mask).sum(dim=1) >= prefix_tokens)  # instruction attended, not pooled
    documents = data.tokenize(["rope rotates query and key vectors"], 64)
    assert "pooling_mask" not in documents                           # documents carry no instruction


def test_max_seq_length_beyond_512_and_the_position_limit(decoder_dir):
    encoder = TextEncoder(str(decoder_dir), max_seq_length=1024)
    assert encoder.max_seq_length == 1024
    ids = encoder.tokenize(["word " * 1500])["input_ids"]
    assert ids.shape[1] == 1024 and ids[0, -1] == encoder.tokenizer.eos_token_id
    assert TextEncoder(str(decoder_dir)).max_seq_length == 512       # the default stays 512
    with pytest.raises(InputError, match="position embeddings"):
        TextEncoder(str(decoder_dir), max_seq_length=4096)


def test_bf16_weights_give_the_float32_embeddings_to_bf16_precision(decoder_dir):
    full = TextEncoder(str(decoder_dir)).encode(TEXTS)
    half = TextEncoder(str(decoder_dir), dtype="bfloat16")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    assert torch.nn.functional.cosine_similarity(half.encode(TEXTS), full).min() > 0.99


def test_export_loads_in_sentence_transformers_with_the_same_embeddings(decoder_dir, tmp_path):
    from sentence_transformers import SentenceTransformer

    encoder = TextEncoder(str(decoder_dir), max_seq_length=1024)
    expected = encoder.encode(TEXTS)
    encoder.save(tmp_path / "export")
    reloaded = TextEncoder(str(tmp_path / "export"))
    assert reloaded.pooling == "last" and reloaded.tokenizer.padding_side == "left"
    assert torch.equal(reloaded.tokenize(TEXTS)["input_ids"], encoder.tokenize(TEXTS)["input_ids"])  # one EOS
    assert torch.allclose(reloaded.encode(TEXTS), expected, atol=1e-5)
    model = SentenceTransformer(str(tmp_path / "export"), device="cpu")
    assert model.max_seq_length == 1024
    assert torch.allclose(model.encode(TEXTS, convert_to_tensor=True), expected, atol=1e-5)


def test_codiemb_fit_trains_a_tiny_decoder(decoder_dir, tmp_path, one_torch_thread):
    config = Path(__file__).parent / "conf" / "tiny.yaml"
    code = main(["fit", "--config", str(config), "--model.model_name_or_path", str(decoder_dir),
                 "--trainer.max_steps", "2", "--trainer.default_root_dir", str(tmp_path),
                 "--data.instruction_template", "Instruct: {instruction}\nQuery:",
                 "--data.max_passage_length", "600", "--model.max_seq_length", "1024",
                 "--trainer.callbacks+=codiemb_pl.callbacks.ExportEncoder",
                 "--trainer.callbacks.dirpath", str(tmp_path / "model")])
    assert code == 0
    state = torch.load(next(tmp_path.rglob("last.ckpt")), map_location="cpu", weights_only=False)
    assert state["global_step"] == 2
    before, after = TextEncoder(str(decoder_dir)), TextEncoder(str(tmp_path / "model"))
    assert after.pooling == "last" and after.max_seq_length == 1024
    assert not torch.allclose(before.encode(TEXTS), after.encode(TEXTS), atol=1e-6)
