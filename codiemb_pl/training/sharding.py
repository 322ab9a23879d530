"""Sharded training: which modules become sharding units, FSDP2 sharding and consolidated weights.

FSDP gathers a unit's parameters just before it runs and frees them after, so memory per GPU holds
`1/W` of the weights, gradients and optimizer states plus one gathered block at a time, but only when
each transformer block is its own unit. `wrap_transformer_blocks` is the FSDP1 auto-wrap policy that does
that for any Hugging Face backbone (`configs/trainer/fsdp.yaml`): a block is a module whose class name ends
in `Layer`, `DecoderLayer` or `Block` (BertLayer, Qwen2DecoderLayer, LlamaDecoderLayer, MiniCPMDecoderLayer,
GPT2Block, ...). FSDP2 (`configs/trainer/fsdp2.yaml`, `FSDP2Strategy`; runs on CPU with gloo too):
`shard_with_fsdp2` makes the same units plus the backbone itself, and `consolidated_weights` gathers the
full weights for the code that reads them on rank 0 (the export callback).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from codiemb_pl.model.lora import CONSOLIDATED_STATE_ATTRIBUTE

BLOCK_CLASS_SUFFIXES = ("DecoderLayer", "EncoderLayer", "Layer", "Block")


def is_transformer_block(module: nn.Module) -> bool:
    """Whether `module` is one transformer block (by its class name, see `BLOCK_CLASS_SUFFIXES`)."""
    name = type(module).__name__
    return name.endswith(BLOCK_CLASS_SUFFIXES) and not isinstance(module, (nn.ModuleList, nn.Linear, nn.LayerNorm))


def wrap_transformer_blocks(module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
    """FSDP auto-wrap policy: descend everywhere, wrap each transformer block as one unit."""
    return True if recurse else is_transformer_block(module)


def shard_with_fsdp2(model: nn.Module, mesh) -> nn.Module:
    """FSDP2 (`torch.distributed.fsdp.fully_shard`) over the data-parallel `mesh`: each transformer block is
    one unit, then the backbone itself (embeddings, final norm). Idempotent (a second call changes nothing)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(model, FSDPModule):
        return model
    for block in [module for module in model.modules() if is_transformer_block(module)]:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_fsdp2_sharded(model: nn.Module) -> bool:
    """Whether `model` (or a module in it) is sharded with FSDP2 `fully_shard`."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return any(isinstance(module, FSDPModule) for module in model.modules())


@contextmanager
def consolidated_weights(model: nn.Module) -> Iterator[None]:
    """Under FSDP2 (every rank must enter: a collective), the full weights gathered into rank 0's CPU
    memory are attached to `model` for the duration, where `lora.merged_weights` reads them instead of
    the sharded ones; for any other model, nothing happens."""
    if not is_fsdp2_sharded(model):
        yield
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    setattr(model, CONSOLIDATED_STATE_ATTRIBUTE, state)  # rank 0: every tensor; other ranks: empty
    try:
        yield
    finally:
        delattr(model, CONSOLIDATED_STATE_ATTRIBUTE)


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's `ModelParallelStrategy` as plain data parallelism with FSDP2: every rank of every node
    is one data-parallel shard (no tensor parallelism; the parent's `data_parallel_size="auto"` would mean
    one shard per node). Checkpoints are consolidated into one file on rank 0 unless
    `save_distributed_checkpoint`."""

    def __init__(self, save_distributed_checkpoint: bool = False, process_group_backend: str | None = None,
                 **kwargs):
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()
