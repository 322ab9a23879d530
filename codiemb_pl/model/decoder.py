"""Decoder (causal language model) backbones as embedders: Qwen2/Qwen3, Llama, Mistral, MiniCPM, ...

A causal model's last token is the only one that has seen the whole text, so such backbones are pooled
at the last token (`pooling="last"`, the default for them) and every text must end with the EOS token:
`e_i = H[i, t1]`, `t1` = the position of the appended EOS. The tokenizer is set up once so that every
caller (training data, `encode`, the exported sentence-transformers folder) tokenises the same way:

- a pad token (the EOS token when the tokenizer has none);
- left padding, as decoder embedders (Qwen3-Embedding, gte-Qwen, E5-Mistral) are served: with rotary
  positions a left-padded row embeds exactly like the unpadded text (attention scores depend on
  position differences only), and pooling finds the last real token from the mask on either side;
- EOS appended by the tokenizer's own post-processor when it does not add one already. Truncation
  then keeps the EOS (it counts as a special token), and `save_pretrained` writes it into
  tokenizer.json, so `SentenceTransformer(folder)` appends it too.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from codiemb_pl.errors import InputError

_PROBE_TEXT = "a"


def _config_dict(config: PretrainedConfig | dict[str, Any]) -> dict[str, Any]:
    return config if isinstance(config, dict) else config.to_dict()


def is_decoder_backbone(config: PretrainedConfig | dict[str, Any]) -> bool:
    """Whether `config` describes a causal-only language model (no masked-LM head in its family).

    Known model types are looked up in transformers' auto mappings (BERT-like families appear in the
    masked-LM mapping and are encoders even though they can also be run causally); remote-code models
    (e.g. MiniCPM) are decoders when they declare a `...ForCausalLM` architecture or auto class.
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    values = _config_dict(config)
    model_type = values.get("model_type") or ""
    if values.get("is_encoder_decoder") or model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return False
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return True
    architectures = values.get("architectures") or []
    auto_map = values.get("auto_map") or {}
    return any(str(name).endswith("ForCausalLM") for name in architectures) or "AutoModelForCausalLM" in auto_map


def appends_eos(tokenizer) -> bool:
    """Whether `tokenizer(text)` ends with the EOS token."""
    ids = tokenizer(_PROBE_TEXT)["input_ids"]
    return tokenizer.eos_token_id is not None and bool(ids) and ids[-1] == tokenizer.eos_token_id


def append_eos_token(tokenizer, where: str) -> None:
    """Make `tokenizer` end every text with its EOS token, keeping whatever it adds in front (e.g. BOS).

    Uses the fast tokenizer's post-processor (`add_eos_token`), then checks the result: the ids of a
    probe text must be the old ids plus one EOS, else `InputError`.
    """
    if tokenizer.eos_token_id is None:
        raise InputError(where, "the tokenizer of this decoder model has no EOS token, so last-token pooling "
                         "has no end-of-text position", "use a tokenizer with an eos_token")
    before = tokenizer(_PROBE_TEXT)["input_ids"]
    if not hasattr(type(tokenizer), "add_eos_token"):
        raise InputError(where, f"{type(tokenizer).__name__} cannot be set to append the EOS token",
                         "use a fast tokenizer (tokenizer.json), or one that already appends EOS")
    starts_with_bos = tokenizer.bos_token_id is not None and bool(before) and before[0] == tokenizer.bos_token_id
    object.__setattr__(tokenizer, "_add_bos_token", starts_with_bos)  # rebuilt template keeps the BOS as it was
    tokenizer.add_eos_token = True
    after = tokenizer(_PROBE_TEXT)["input_ids"]
    if after != before + [tokenizer.eos_token_id]:
        raise InputError(where, f"appending EOS changed the tokenization of {_PROBE_TEXT!r} from {before} to {after}",
                         "use a tokenizer whose tokenizer.json post-processor appends the EOS token")
    tokenizer.init_kwargs.update(add_bos_token=starts_with_bos, add_eos_token=True)


def prepare_tokenizer(tokenizer, config: PretrainedConfig | dict[str, Any] | None, where: str):
    """Pad with EOS when there is no pad token; for decoder backbones also pad left and append EOS."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if config is None or not is_decoder_backbone(config):
        return tokenizer
    tokenizer.padding_side = "left"
    tokenizer.init_kwargs["padding_side"] = "left"  # saved with the tokenizer
    if not appends_eos(tokenizer):
        append_eos_token(tokenizer, where)
    return tokenizer


def load_backbone_tokenizer(location: str, trust_remote_code: bool = False):
    """`AutoTokenizer` for `location`, prepared for its backbone (see `prepare_tokenizer`)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
    try:
        config = PretrainedConfig.get_config_dict(location)[0]
    except (OSError, ValueError):  # a tokenizer-only folder: nothing tells us it is a decoder
        config = None
    return prepare_tokenizer(tokenizer, config, where=str(location))
