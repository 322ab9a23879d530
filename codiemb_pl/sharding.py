"""Sharded training with FSDP (`configs/trainer/fsdp.yaml`): which modules become sharding units.

FSDP gathers a unit's parameters just before it runs and frees them after, so memory per GPU holds
`1/W` of the weights, gradients and optimizer states plus one gathered block at a time, but only when
each transformer block is its own unit. `wrap_transformer_blocks` is the auto-wrap policy that does
that for any Hugging Face backbone: a block is a module whose class name ends in `Layer`, `DecoderLayer`
or `Block` (BertLayer, Qwen2DecoderLayer, LlamaDecoderLayer, MiniCPMDecoderLayer, GPT2Block, ...).
"""

from __future__ import annotations

from torch import nn

BLOCK_CLASS_SUFFIXES = ("DecoderLayer", "EncoderLayer", "Layer", "Block")


def is_transformer_block(module: nn.Module) -> bool:
    """Whether `module` is one transformer block (by its class name, see `BLOCK_CLASS_SUFFIXES`)."""
    name = type(module).__name__
    return name.endswith(BLOCK_CLASS_SUFFIXES) and not isinstance(module, (nn.ModuleList, nn.Linear, nn.LayerNorm))


def wrap_transformer_blocks(module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
    """FSDP auto-wrap policy: descend everywhere, wrap each transformer block as one unit."""
    return True if recurse else is_transformer_block(module)
