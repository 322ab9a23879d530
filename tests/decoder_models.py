"""Tiny random decoder backbones (Qwen2, Llama) with offline tokenizers, for the decoder and LoRA tests.

Qwen2: byte-level BPE over the 256 byte symbols, `<|endoftext|>` as EOS and pad, no BOS (like Qwen).
Llama: a character vocabulary with `<s>` BOS and `</s>` EOS and no pad token (like Llama 2).
Neither tokenizer appends EOS by itself, as the real ones do not.
"""

from __future__ import annotations

from pathlib import Path

LLAMA_CHARACTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789▁ .,?!:;'\"-()/\n"


def _qwen2_tokenizer():
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    vocab = {symbol: index for index, symbol in enumerate(sorted(ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    return Qwen2Tokenizer(vocab=vocab, merges=[], eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                          unk_token=None)


def _llama_tokenizer():
    from transformers import LlamaTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for character in LLAMA_CHARACTERS:
        vocab.setdefault(character, len(vocab))
    return LlamaTokenizer(vocab=vocab, merges=[], add_bos_token=True)


def build_tiny_decoder(folder: Path, family: str = "qwen2", seed: int = 0, layers: int = 2, hidden: int = 32,
                       max_positions: int = 2048) -> Path:
    """Save a randomly initialised decoder of `family` (`qwen2` or `llama`) and its tokenizer into `folder`."""
    import torch
    from transformers import AutoModel, LlamaConfig, Qwen2Config

    tokenizer = _qwen2_tokenizer() if family == "qwen2" else _llama_tokenizer()
    config_class = Qwen2Config if family == "qwen2" else LlamaConfig
    config = config_class(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, intermediate_size=2 * hidden,
                          max_position_embeddings=max_positions, pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(seed)
    model = AutoModel.from_config(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
