"""Absurdly long texts are cut before tokenisation, without changing the token ids truncation keeps.

A tokenizer normalises, splits and encodes the whole text before it truncates to `L` tokens, so its cost
grows with the text, not with `L` (one 50 MB record: 287 s and 9.25 GB for a training step). A text longer
than `char_bound(L) = CHARS_PER_TOKEN·L + MARGIN_CHARS` characters is replaced by a piece of itself (its
start; its end for `truncation_side="left"`) chosen so that the ids are those of the whole text:

1. the piece (first `char_bound(L)` characters) is tokenised with truncation to `L`, with offsets;
2. it is kept when truncation filled all `L` places and every kept token ends at least `MARGIN_CHARS`
   characters before the cut (left side: starts that far after it);
3. otherwise the piece grows `GROWTH`-fold (a text of few, very long tokens: a 100k-character word that
   WordPiece maps to one [UNK], a run of whitespace BERT drops) until it holds the whole text.

Step 2 rests on tokenizers being local: what a token is depends on the text around it, not on characters
`MARGIN_CHARS` away. Normalisers (lower-casing, accents, NFKC) act on characters or combining sequences;
pre-tokenizers split at whitespace and punctuation; WordPiece reads a word of at most 100 characters
(longer ones are [UNK]); BPE merges and Unigram's best segmentation agree with the uncut text a few tokens
away from a change. `tests/test_text_bound.py` checks it on WordPiece (MiniLM), byte-level BPE and
Unigram tokenizers, and on the tiny decoder tokenizers, with texts built to straddle the cut.

Slow tokenizers (no offsets) get no cut. Nothing here imports torch or transformers: the token-cache
worker processes (`token_ids.py`) use it too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

CHARS_PER_TOKEN = 16
"""The first piece allows 16 characters per kept token: English runs ~4.5 characters per token, code and
URLs fewer, so a piece this long nearly always holds the L tokens (else it grows)."""
MARGIN_CHARS = 1024
"""Characters between the last kept token and the cut: far more than a token's reach (see module docstring)."""
GROWTH = 4

Probe = Callable[[list[str]], list[tuple[int, int, int]]]
"""texts -> for each: (ids after truncation to L, start of the first and end of the last content token)."""


def char_bound(max_length: int) -> int:
    """Texts longer than this many characters are cut before tokenisation to at most `max_length` tokens."""
    return CHARS_PER_TOKEN * max(int(max_length), 1) + MARGIN_CHARS


def _span(offsets: Sequence[Sequence[int]], special: Sequence[int]) -> tuple[int, int, int]:
    content = [offset for offset, is_special in zip(offsets, special) if not is_special]
    if not content:
        return len(offsets), 0, 0
    return len(offsets), min(start for start, _ in content), max(end for _, end in content)


def _piece(text: str, length: int, left: bool) -> str:
    return text[-length:] if left else text[:length]


def bounded_texts(texts: Sequence[str], max_length: int, probe: Optional[Probe], left: bool = False) -> list[str]:
    """`texts` with each one longer than `char_bound(max_length)` replaced by the shortest piece (see the module
    docstring) whose truncated token ids equal the whole text's; `probe=None` (a slow tokenizer) cuts nothing."""
    texts = list(texts)
    bound = char_bound(max_length)
    pending = [index for index, text in enumerate(texts) if len(text) > bound]
    if probe is None or not pending:
        return texts
    result, length = list(texts), bound
    while pending:
        pieces = [_piece(texts[index], length, left) for index in pending]
        unsettled = []
        for index, piece, (count, first, last) in zip(pending, pieces, probe(pieces)):
            stable = first >= MARGIN_CHARS if left else last <= len(piece) - MARGIN_CHARS
            if count >= max_length and stable:
                result[index] = piece
            else:
                unsettled.append(index)
        length *= GROWTH
        pending = [index for index in unsettled if len(texts[index]) > length]  # the rest keep their whole text
    return result


def tokenizer_probe(tokenizer: Any, max_length: int) -> Optional[Probe]:
    """The probe of a Hugging Face tokenizer called as `tokenizer(texts, truncation=True, max_length=L)`; None
    for a slow one (no offsets)."""
    if not getattr(tokenizer, "is_fast", False):
        return None

    def probe(texts: list[str]) -> list[tuple[int, int, int]]:
        encoded = tokenizer(texts, truncation=True, max_length=max_length, return_offsets_mapping=True,
                            return_special_tokens_mask=True)
        return [_span(offsets, special)
                for offsets, special in zip(encoded["offset_mapping"], encoded["special_tokens_mask"])]
    return probe


def backend_probe(backend: Any) -> Probe:
    """The probe of a `tokenizers.Tokenizer` whose truncation is already set (`token_ids.backend_encoder`)."""
    def probe(texts: list[str]) -> list[tuple[int, int, int]]:
        return [_span(encoding.offsets, encoding.special_tokens_mask)
                for encoding in backend.encode_batch(texts, add_special_tokens=True)]
    return probe


def bound_for_tokenizer(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[str]:
    """`bounded_texts` for texts about to go through `tokenizer(texts, truncation=True, max_length=max_length)`."""
    return bounded_texts(texts, max_length, tokenizer_probe(tokenizer, max_length),
                         left=getattr(tokenizer, "truncation_side", "right") == "left")


def bound_for_backend(backend: Any, texts: Sequence[str], max_length: int) -> list[str]:
    """`bounded_texts` for a `tokenizers.Tokenizer` truncating to `max_length`."""
    truncation = getattr(backend, "truncation", None) or {}
    return bounded_texts(texts, max_length, backend_probe(backend),
                         left=str(truncation.get("direction", "right")).lower() == "left")
