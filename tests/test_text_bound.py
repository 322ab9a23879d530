"""Texts beyond a bound are cut before tokenisation (`model/text_bound.py`), and the token ids stay those of
the whole text: on real tokenizers (WordPiece MiniLM, right and left truncation; the tiny Qwen2 / Llama
decoder tokenizers with their appended EOS; byte-level BPE and Unigram tokenizers trained here on the demo
text), with texts built so the cut and the last kept token fall on long words, whitespace runs, accents,
emoji and CJK. Then every tokenisation path is shown to receive only the piece: the in-memory / validation
collator, `TextEncoder.encode`, and the token cache (backend and reference encoders), which also warns once
per source with the count and the first file:line."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest

from codiemb_pl.model import text_bound
from codiemb_pl.model.text_bound import MARGIN_CHARS, bound_for_tokenizer, char_bound
from conftest import minilm_path

DEMO = Path(__file__).resolve().parents[1] / "codiemb_pl" / "demo" / "ir_train.jsonl"


def demo_sentences() -> list[str]:
    sentences = []
    for line in DEMO.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        for text in [record["query"], *record["positives"], *record.get("negatives", [])]:
            sentences.extend(part.strip() + "." for part in text.split(".") if part.strip())
    return sentences


SENTENCES = demo_sentences()


def _trained(kind: str):
    """A byte-level BPE (GPT-2 style) or Unigram/Metaspace (SentencePiece style) tokenizer trained on the demo text."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "bpe":
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=2000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      special_tokens=["<eos>"])
    else:
        backend = Tokenizer(models.Unigram())
        backend.normalizer = normalizers.NFKC()
        backend.pre_tokenizer = pre_tokenizers.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=1500, special_tokens=["<unk>", "<eos>"], unk_token="<unk>")
    backend.train_from_iterator(SENTENCES, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<eos>",
                                   unk_token="<unk>" if kind == "unigram" else None)


def _decoder(family: str):
    from codiemb_pl.model.decoder import prepare_tokenizer
    from decoder_models import _llama_tokenizer, _qwen2_tokenizer

    tokenizer = _qwen2_tokenizer() if family == "qwen2" else _llama_tokenizer()
    return prepare_tokenizer(tokenizer, {"model_type": family}, where=family)  # EOS appended, as training uses it


@pytest.fixture(scope="module", params=["minilm", "minilm_left", "bpe", "unigram", "qwen2", "llama"])
def tokenizer(request):
    from transformers import AutoTokenizer

    if request.param.startswith("minilm"):
        side = "left" if request.param.endswith("left") else "right"
        return AutoTokenizer.from_pretrained(minilm_path(), truncation_side=side)
    if request.param in ("bpe", "unigram"):
        return _trained(request.param)
    return _decoder(request.param)


def straddling_text(rng: random.Random, length: int) -> str:
    """About `length` characters of sentences mixed with the pieces that stress a cut: words of 99-5000
    characters, whitespace runs, combining accents, emoji, CJK, a ligature, digits, a URL."""
    pieces = []
    while sum(map(len, pieces)) < length:
        kind = rng.random()
        if kind < 0.55:
            pieces.append(rng.choice(SENTENCES) + " ")
        elif kind < 0.65:
            pieces.append("".join(rng.choice("abcdefghij") for _ in range(rng.choice([99, 100, 101, 150, 5000]))) + " ")
        elif kind < 0.72:
            pieces.append(rng.choice([" ", "\n", "\t"]) * rng.randint(2, 1500))
        elif kind < 0.9:
            piece = rng.choice(["e\u0301", "café ", "🙂", "東京の天気は", "ﬁne ", "İstanbul ", "2024-07-01 "])
            pieces.append(piece * rng.randint(1, 40))
        else:
            pieces.append("https://example.org/" + "".join(rng.choice("0123456789abcdef") for _ in range(300)) + " ")
    return "".join(pieces)


@pytest.mark.parametrize("max_length", [8, 64])
def test_cut_texts_give_the_ids_of_the_whole_text(tokenizer, max_length):
    rng = random.Random(max_length)
    bound = char_bound(max_length)
    texts = [straddling_text(rng, int(bound * rng.uniform(0.9, 2.0))) for _ in range(24)]
    texts += ["x" * 60_000 + " then words", " " * 20_000 + "words after spaces", "東京" * 5000]
    bounded = bound_for_tokenizer(tokenizer, texts, max_length)
    full = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    assert tokenizer(bounded, truncation=True, max_length=max_length)["input_ids"] == full
    cut = [piece for piece, text in zip(bounded, texts) if len(piece) < len(text)]
    assert len(cut) >= 8, "too few texts were cut to test anything"
    left = getattr(tokenizer, "truncation_side", "right") == "left"
    assert all((text.endswith(piece) if left else text.startswith(piece)) for piece, text in zip(bounded, texts))


def test_texts_within_the_bound_are_untouched(tokenizer):
    texts = [straddling_text(random.Random(seed), char_bound(32) - 1)[:char_bound(32)] for seed in range(5)]
    assert bound_for_tokenizer(tokenizer, texts, 32) == texts


def test_the_piece_grows_until_the_kept_tokens_are_far_from_the_cut():
    """A 60 000-character word is one [UNK] for WordPiece: its piece cannot settle before the words after it."""
    from transformers import AutoTokenizer

    minilm = AutoTokenizer.from_pretrained(minilm_path())
    word_first, prose = "x" * 60_000 + " then words", " ".join(SENTENCES[:2000])
    pieces = bound_for_tokenizer(minilm, [word_first, prose], 8)
    assert pieces[0] == word_first  # grown to the whole text
    assert len(pieces[1]) == char_bound(8)  # settled at once
    offsets = minilm(pieces[1], truncation=True, max_length=8, return_offsets_mapping=True)["offset_mapping"]
    assert max(end for _, end in offsets) <= len(pieces[1]) - MARGIN_CHARS


def test_a_slow_tokenizer_is_not_cut():
    class Slow:
        is_fast = False

    assert text_bound.bounded_texts(["a " * 100_000], 8, text_bound.tokenizer_probe(Slow(), 8)) == ["a " * 100_000]


# -- every tokenisation path receives the piece, not the whole text ----------------------------------------

class RecordingTokenizer:
    """Delegates to a Hugging Face tokenizer and records the longest text each call received."""

    def __init__(self, inner):
        self.inner, self.longest = inner, []

    def __call__(self, texts, *args, **kwargs):
        batch = [texts] if isinstance(texts, str) else list(texts)
        self.longest.append(max(map(len, batch), default=0))
        return self.inner(texts, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path())


HUGE = " ".join(SENTENCES) * 2  # ~0.4 MB of prose in one text


@pytest.fixture(scope="module")
def huge_ids(minilm) -> dict[int, list[int]]:
    """The ids of the whole of HUGE (tokenised once: this is the cost the bound saves)."""
    return {32: minilm(HUGE, truncation=True, max_length=32)["input_ids"]}


def test_collator_and_validation_tokenise_only_the_piece(minilm, huge_ids):
    from codiemb_pl.data.collate import tokenize_texts

    recording = RecordingTokenizer(minilm)
    batch = tokenize_texts(recording, [HUGE, "short text"], 32, prefixes=["", "Instruction: x Query: "])
    assert batch["input_ids"][0].tolist() == huge_ids[32]
    assert batch["input_ids"][1].tolist()[:8] == minilm("Instruction: x Query: short text")["input_ids"][:8]
    assert len(HUGE) > 300_000 and max(recording.longest) <= char_bound(32)


def test_text_encoder_tokenises_only_the_piece(tiny_model_dir):
    import torch

    from codiemb_pl.model.encoder import TextEncoder

    encoder = TextEncoder(str(tiny_model_dir), max_seq_length=32)
    whole = encoder.tokenizer([HUGE[:200_000]], padding=True, truncation=True, max_length=32, return_tensors="pt")
    encoder.tokenizer = recording = RecordingTokenizer(encoder.tokenizer)
    features = encoder.tokenize([HUGE[:200_000]])
    assert torch.equal(features["input_ids"], whole["input_ids"])
    encoder.encode([HUGE, "short"], batch_size=2)
    assert max(recording.longest) <= char_bound(32)


def test_token_cache_tokenises_pieces_and_warns_once_per_source(minilm, huge_ids, tmp_path, monkeypatch, caplog):
    """A 0.4 MB record in a JSON-lines file: its stored ids are the whole text's, the backend and the reference
    encoders see only pieces, and one warning names the source, the count and the first file:line."""
    import tokenizers

    from codiemb_pl.data.cache import token_ids
    from codiemb_pl.data.cache.records import open_records
    from codiemb_pl.data.cache.tokens import TokenLimits, open_tokens
    from codiemb_pl.data.sources import SourceConfig

    rows = [{"query": f"question {i}", "positives": [f"answer {i}"]} for i in range(6)]
    rows[2]["positives"] = ["short", HUGE]
    rows[4]["query"] = HUGE[:100_000]
    path = tmp_path / "ir.jsonl"
    path.write_text("\n\n".join(json.dumps(row) for row in rows) + "\n")  # blank lines: row 2 is line 5
    source = SourceConfig(name="huge", task="ir", path=str(path))
    records = open_records(source, tmp_path / "cache")

    seen: list[int] = []

    class Recording:
        def __init__(self, backend):
            self.backend = backend

        def encode_batch(self, texts, *args, **kwargs):
            seen.append(max(map(len, texts), default=0))
            return self.backend.encode_batch(texts, *args, **kwargs)

        def encode_batch_fast(self, texts, *args, **kwargs):
            seen.append(max(map(len, texts), default=0))
            return getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)(texts, *args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.backend, name)

    real_from_str = tokenizers.Tokenizer.from_str
    monkeypatch.setattr(tokenizers, "Tokenizer", type("T", (), {"from_str": staticmethod(
        lambda text: Recording(real_from_str(text)))}))
    limits = TokenLimits(query=16, passage=32, sts=16)
    with caplog.at_level(logging.WARNING):
        table, _ = open_tokens(records, minilm, limits, "", tmp_path / "cache")
    assert table.column("positives")[2].as_py()[1] == huge_ids[32]
    assert table.column("query")[4].as_py() == minilm(HUGE[:100_000], truncation=True, max_length=16)["input_ids"]
    assert seen and max(seen) <= char_bound(32)
    warnings = [r.getMessage() for r in caplog.records if "cut before tokenisation" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "huge" in warnings[0] and "2 text(s)" in warnings[0] and f"{path}:5" in warnings[0]

    recording = RecordingTokenizer(minilm)
    encode = token_ids.reference_encoder(recording)
    assert encode([HUGE], 32).to_pylist() == [huge_ids[32]]
    assert max(recording.longest) <= char_bound(32)
