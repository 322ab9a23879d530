"""Gradient cache (Gao et al. 2021): contrastive losses over large batches with the activation memory of a chunk.

For a loss L(E) of the embedding matrices E = f_θ(X) of all texts X of a micro-batch:

    1. E_c = f_θ(X_c) for each chunk c of at most `chunk_size` texts, without an autograd graph;
    2. L and G = ∂L/∂E on the full matrices (IR candidates gathered across ranks exactly as without the cache),
       and ∂L/∂θ directly for parameters the score itself uses (the embedding-distillation projection);
    3. ∂L/∂θ = Σ_c (∂E_c/∂θ)ᵀ G_c: each chunk is embedded again, now with a graph, and back-propagated
       with its slice G_c of G, one chunk's graph alive at a time.

Step 3 runs inside the backward pass of the returned loss (`_ReplayChunks`): the loss handed to the trainer
has the true value, and its gradient with respect to the parameters is Σ_c (∂E_c/∂θ)ᵀ G_c times the
incoming gradient (1/accumulation, a loss scale), so optimiser-side machinery (gradient accumulation,
clipping) sees an ordinary backward pass. In one process each chunk back-propagates straight into `.grad`;
under torch.distributed the chunks' gradients are summed in one buffer and delivered to every parameter
once, so per-step gradient hooks (DDP's all-reduce, FSDP's reduce-scatter) fire once as they expect.
Exactness needs the replay to compute the same E_c: each chunk's CPU and CUDA RNG states are saved
before step 1 and restored for its replay (same dropout masks), the autocast state of step 1 is
re-entered, and the RNG stream is left where step 1 left it. Plain torch: `embed_fn` and the objective
(`losses.objectives`) are all it needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from codiemb_pl.losses.gather import rank_and_world
from codiemb_pl.model.bucketing import trim_features

AUTOCAST_DEVICES = ("cpu", "cuda")


@dataclass
class RandomState:
    """The torch CPU generator's state and, when CUDA is in use, every CUDA device's."""

    cpu: Tensor
    cuda: Optional[list[Tensor]]

    @classmethod
    def capture(cls) -> RandomState:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        return cls(torch.get_rng_state(), cuda)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def autocast_settings() -> list[tuple[str, torch.dtype]]:
    """(device type, dtype) of every autocast context active now."""
    return [(device, torch.get_autocast_dtype(device)) for device in AUTOCAST_DEVICES
            if torch.is_autocast_enabled(device)]


def chunk_features(features: Mapping[str, Tensor], chunk_size: int, left_padded: bool = False,
                   max_tokens: int = 0) -> list[dict[str, Tensor]]:
    """Consecutive row chunks of at most `chunk_size` texts (0: no limit on texts), each trimmed to its own longest
    row; with `max_tokens`, a chunk also ends before rows × its longest row would exceed `max_tokens` (a text
    longer than that gets a chunk of its own)."""
    mask = features["attention_mask"]
    lengths = mask.sum(dim=1).tolist()
    bounds = token_budget_bounds(lengths, chunk_size, max_tokens)
    chunks = []
    for start, stop in zip(bounds, bounds[1:]):
        part = torch.arange(start, stop, device=mask.device)
        chunks.append(trim_features(dict(features), part, max(max(lengths[start:stop]), 1), left_padded))
    return chunks


def token_budget_bounds(lengths: Sequence[int], max_rows: int, max_tokens: int) -> list[int]:
    """Boundaries [0, ..., n] of consecutive chunks with at most `max_rows` rows (0: any) and, when `max_tokens`,
    rows · longest ≤ `max_tokens` (at least one row per chunk)."""
    bounds, start, longest = [0], 0, 0
    for index, length in enumerate(lengths):
        rows, longest = index - start, max(longest, length)
        if rows and ((max_rows and rows >= max_rows) or (max_tokens and (rows + 1) * longest > max_tokens)):
            bounds.append(index)
            start, longest = index, length
    if lengths:
        bounds.append(len(lengths))
    return bounds


def backward_into_grad() -> bool:
    """Whether the replay may back-propagate each chunk straight into `.grad`: in one process, where no
    per-step gradient hook must fire exactly once (it saves a parameter-sized buffer)."""
    return rank_and_world()[1] == 1


def _as_tuple(output: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return output if isinstance(output, tuple) else (output,)


@dataclass
class _Chunk:
    group: str
    features: dict[str, Tensor]
    rows: slice
    random_state: RandomState


class _ReplayChunks(torch.autograd.Function):
    """Identity on the loss value; its backward replays the chunks and returns ∂L/∂θ for `parameters`."""

    @staticmethod
    def forward(ctx, loss: Tensor, replay: Callable[[Tensor], list[Optional[Tensor]]], *parameters: Tensor) -> Tensor:
        ctx.replay = replay
        return loss.detach().clone()

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        return (None, None, *ctx.replay(grad_output))


def grad_cached_objective(objective: Any, embed_fn: Callable[..., Any], batch: Mapping[str, Any], chunk_size: int,
                          parameters: Sequence[Tensor], left_padded: bool = False, max_tokens: int = 0
                          ) -> tuple[Tensor, dict[str, Tensor]]:
    """`objective(embed_fn, batch)` with the gradient cache: the same (loss, logs), a graph of one chunk at a time.

    `objective` has `text_groups(batch)`, `wants_middle` and `score(embeddings, batch) -> (loss, logs)`
    (`losses.objectives`); `embed_fn(features, return_middle=...)` embeds tokenised features.
    `parameters`: the tensors to receive gradients (those with `requires_grad`). `logs` gains `grad_cache_chunks`.
    Chunks: `chunk_features(features, chunk_size, left_padded, max_tokens)` (texts and / or a token budget).
    """
    if chunk_size < 0 or max_tokens < 0 or not (chunk_size or max_tokens):
        raise ValueError(f"need chunk_size >= 1 or max_tokens >= 1, got {chunk_size} and {max_tokens}")
    wants_middle = objective.wants_middle
    chunks: list[_Chunk] = []
    embeddings: dict[str, Any] = {}
    with torch.no_grad():
        for group, features in objective.text_groups(batch).items():
            outputs, start = [], 0
            for part in chunk_features(features, chunk_size, left_padded, max_tokens):
                state = RandomState.capture()
                outputs.append(_as_tuple(embed_fn(part, return_middle=wants_middle)))
                size = part["attention_mask"].shape[0]
                chunks.append(_Chunk(group, part, slice(start, start + size), state))
                start += size
            merged = tuple(torch.cat([out[i] for out in outputs]).requires_grad_(True) for i in range(len(outputs[0])))
            embeddings[group] = merged if wants_middle else merged[0]
    autocast = autocast_settings()
    with torch.enable_grad():
        loss, logs = objective.score(embeddings, batch)
    leaves = [tensor for group in embeddings.values() for tensor in _as_tuple(group)]
    parameters = list(parameters)
    # parameters the score uses itself (e.g. the embedding-distillation projection) get their gradient here
    all_grads = torch.autograd.grad(loss, leaves + parameters, allow_unused=True)
    leaf_grads, score_grads = all_grads[:len(leaves)], all_grads[len(leaves):]
    cached: dict[str, list[Optional[Tensor]]] = {}
    position = 0
    for group, value in embeddings.items():
        count = len(_as_tuple(value))
        cached[group] = list(leaf_grads[position:position + count])
        position += count
    del embeddings, leaves, leaf_grads, all_grads

    def replay(grad_output: Tensor) -> list[Optional[Tensor]]:
        """Σ_c (∂E_c/∂θ)ᵀ (grad_output · G_c), one chunk's graph at a time; RNG left as it was found."""
        found = RandomState.capture()
        totals: list[Optional[Tensor]] = [None if g is None else g * grad_output.to(g.dtype) for g in score_grads]
        into_grad = backward_into_grad()
        try:
            for chunk in chunks:
                grads = [None if g is None else g[chunk.rows] * grad_output.to(g.dtype) for g in cached[chunk.group]]
                if all(g is None for g in grads):
                    continue
                chunk.random_state.restore()
                with torch.enable_grad(), ExitStack() as stack:
                    for device, dtype in autocast:
                        stack.enter_context(torch.autocast(device_type=device, dtype=dtype))
                    outputs = _as_tuple(embed_fn(chunk.features, return_middle=wants_middle))
                pairs = [(out, g.to(out.dtype)) for out, g in zip(outputs, grads) if g is not None]
                if into_grad:
                    torch.autograd.backward([out for out, _ in pairs], [g for _, g in pairs])
                    continue
                chunk_grads = torch.autograd.grad([out for out, _ in pairs], parameters, [g for _, g in pairs],
                                                  allow_unused=True)
                for index, grad in enumerate(chunk_grads):
                    if grad is not None:
                        totals[index] = grad if totals[index] is None else totals[index].add_(grad)
        finally:
            found.restore()
        return totals

    logs = {**logs, "grad_cache_chunks": torch.tensor(float(len(chunks)))}
    return _ReplayChunks.apply(loss.detach(), replay, *parameters), logs


def grad_cache_report(chunk_size: int, sources: Sequence[tuple[str, Sequence[int]]], max_tokens: int = 0) -> str:
    """Start-of-fit lines: per source, texts per device per micro-step (sizes of its text groups) and chunks.

    Each group is cut into ⌈n / chunk_size⌉ chunks; the graph, and so the activation memory, is that of
    one chunk (at most `chunk_size` texts) instead of every text of the micro-step. With a token budget
    (`max_tokens`) the chunk count depends on the texts' lengths and is logged per step (`grad_cache_chunks`).
    """
    if not chunk_size:
        return (f"[codiemb] gradient cache: chunks of at most {max_tokens} tokens (rows x longest text; about one "
                "extra forward pass per step; chunks per step logged as train/<task>/grad_cache_chunks)")
    budget = f" and at most {max_tokens} tokens" if max_tokens else ""
    lines = [f"[codiemb] gradient cache: chunks of {chunk_size} texts{budget} (about one extra forward pass per step)"]
    for name, groups in sources:
        texts = sum(groups)
        chunks = sum(math.ceil(size / chunk_size) for size in groups if size)
        lines.append(f"[codiemb] {name}: {texts} texts per device per micro-step in {chunks} chunks: activations of "
                     f"at most {min(chunk_size, max(groups, default=0))} texts at a time instead of {texts}")
    return "\n".join(lines)
