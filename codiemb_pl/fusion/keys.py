"""What a state-dict key means to a merge: its transformer layer, whether it is a buffer, its random seed."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection

# Float state-dict entries that are buffers, not trained weights: copied from the first checkpoint.
BUFFER_NAME_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked", "position_ids",
                        "token_type_ids", "inv_freq")
# Present in some saves (a Hugging Face model with its pooler), never trained by codiemb.
UNTRAINED_PREFIXES = ("pooler.",)
# `...layer.<n>.`, `...layers.<n>.`, `...h.<n>.` (BERT, Llama/Qwen, GPT-2): one transformer layer.
LAYER_PATTERN = re.compile(r"^(.*?(?:^|\.)(?:layer|layers|h)\.\d+)\.")


def layer_of(key: str) -> str:
    """Group id of a key: the `...layer.<n>` / `...layers.<n>` / `...h.<n>` prefix, else the key itself."""
    match = LAYER_PATTERN.match(key)
    return match.group(1) if match else key


def is_buffer_key(key: str, copy_keys: Collection[str] = ()) -> bool:
    """True for keys copied verbatim: listed in `copy_keys` or ending in a well-known buffer name."""
    return key in copy_keys or key.rsplit(".", 1)[-1] in BUFFER_NAME_SUFFIXES


def is_untrained_key(key: str) -> bool:
    """Buffers (position_ids, ...) and the BERT pooler: present in some saves, never trained by codiemb."""
    return is_buffer_key(key) or key.startswith(UNTRAINED_PREFIXES)


def key_seed(seed: int, key: str) -> int:
    """Deterministic per-key seed: blake2b of f"{seed}:{key}" (stable across runs and processes)."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF
