"""Self Positioning on real encoders with an IR + STS probe set (SPEC §6).

`self_positioning_merge` learns the N + 1 scalars of θ = θ0 + λ·V(a) (`SelfPositioning`) on a small
probe set drawn from training sources of BOTH tasks, each probe batch scored by its own task's loss:

    IR  batch: multi-positive InfoNCE, 1 positive + up to 3 hard negatives per query (padding slots
               masked; in-batch negatives only when no query has any), τ = 0.02
    STS batch: the CoDiEmb STS loss  2·Pearson + 5·rank-KL + 0.5·PRO + 1·MidNCE (`STSLossConfig`)

    minimise  mean over steps of  L_task(batch; θ(a, λ)) + μ·λ     (Adam on the raw scalars only)

The encoder runs with the merged parameters through `torch.func.functional_call`, so gradients reach
a and λ while the encoder itself stays frozen. Probe batches come from training's data path (records table,
token ids, `TokenCollator`), built once and cycled, IR and STS batches interleaved.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from codiemb_pl.data.cache.dataset import tokenized_items
from codiemb_pl.data.cache.records import RecordTable, opened_records
from codiemb_pl.data.cache.token_ids import TokenLimits
from codiemb_pl.data.collate import PaddingRule, TokenCollator
from codiemb_pl.data.instructions import INSTRUCTION_TEMPLATE, instruction_prefix
from codiemb_pl.data.sources import SourceConfig
from codiemb_pl.errors import InputError
from codiemb_pl.fusion.keys import key_seed
from codiemb_pl.fusion.self_positioning import SelfPositioning, fit_self_positioning
from codiemb_pl.fusion.sources import TensorSource, as_source
from codiemb_pl.losses.objectives import CoDiEmbSTSObjective, IRObjective, Objective
from codiemb_pl.losses.sts import STSLossConfig
from codiemb_pl.model.encoder import TextEncoder

PROBE_POSITIVES = 1
PROBE_NEGATIVES = 3
PROBE_TEMPERATURE = 0.02
PROBE_LIMITS = TokenLimits(query=64, passage=256, sts=128)
DEFAULT_INSTRUCTION_TEMPLATE = INSTRUCTION_TEMPLATE
# How a checkpoint may name the encoder parameter `model.X`: as is, Hugging Face export (`X`),
# Lightning checkpoint of CoDiEmbModule (`encoder.model.X`).
KEY_STYLES: dict[str, Callable[[str], str]] = {
    "encoder": lambda name: name,
    "hugging_face": lambda name: name[len("model."):],
    "lightning": lambda name: "encoder." + name,
}

Checkpoint = Mapping[str, Tensor] | TensorSource | str | os.PathLike



def encoder_view(checkpoint: Checkpoint, dtypes: Mapping[str, torch.dtype], label: str) -> dict[str, Tensor]:
    """{encoder parameter name: tensor in its dtype} read from `checkpoint`, whichever `KEY_STYLES` naming it uses."""
    source = as_source(checkpoint, label)
    keys, names = set(source.keys()), list(dtypes)
    for rename in KEY_STYLES.values():
        if all(rename(name) in keys for name in names):
            return {name: source.get(rename(name)).detach().to(dtypes[name]) for name in names}
    missing = next(name for name in names if name not in keys)
    raise InputError(label, f"has no tensor for encoder parameter {missing!r} (tried the key styles "
                            f"{sorted(KEY_STYLES)})", "merge checkpoints of the same base model")


def sample_probe_records(records: RecordTable, probe_size: int, seed: int, name: str) -> list[int]:
    """Indices of `probe_size` records of the source `name` chosen with a seeded draw (all of them when it is
    smaller), in draw order."""
    rng = random.Random(key_seed(seed, name))
    return rng.sample(range(len(records)), min(probe_size, len(records)))


def as_token_limits(limits: TokenLimits | Mapping[str, int] | None) -> TokenLimits:
    """`limits` (`TokenLimits`, or a mapping with `query`, `passage`, `sts` as a fusion config gives it), else
    `PROBE_LIMITS`."""
    if limits is None:
        return PROBE_LIMITS
    if isinstance(limits, Mapping):
        unknown = sorted(set(limits) - {"query", "passage", "sts"})
        if unknown:
            raise InputError("self_positioning.limits", f"unknown key(s) {unknown}", "use query, passage and sts")
        return TokenLimits(**{**PROBE_LIMITS.__dict__, **limits})
    return limits


def build_probe_batches(tokenizer, probe_sources: Sequence[SourceConfig], *, probe_size: int = 64,
                        batch_size: int = 16, seed: int = 0, limits: TokenLimits | Mapping[str, int] | None = None,
                        instruction_template: str = DEFAULT_INSTRUCTION_TEMPLATE,
                        cache_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Probe batches as training collates them, one task and source per batch, sources interleaved.

    Each source gives `probe_size` seeded records cut into batches of `batch_size` (a last batch of
    fewer than 2 items is dropped: STS correlations and InfoNCE need at least 2). The records come from the
    source's records table (`cache_dir`, else a temporary one); their token ids are computed as the token
    cache computes them, with the source's instruction prefix on queries / STS sentences.
    """
    if not probe_sources:
        raise InputError("self_positioning.probe_sources", "no probe sources", "pass at least one SourceConfig")
    if probe_size < 2 or batch_size < 2:
        raise InputError("self_positioning", f"probe_size={probe_size}, batch_size={batch_size}",
                         "use probe_size >= 2 and batch_size >= 2")
    collator = TokenCollator(PaddingRule.of(tokenizer), n_positives=PROBE_POSITIVES, n_negatives=PROBE_NEGATIVES)
    limits = as_token_limits(limits)
    per_source: list[list[dict[str, Any]]] = []
    for source in probe_sources:
        with opened_records(source, Path(cache_dir) if cache_dir is not None else None) as records:
            chosen = sample_probe_records(records, probe_size, seed, source.name)
            items = tokenized_items(records, chosen, [key_seed(seed, f"{source.name}:{k}") for k in range(len(chosen))],
                                    tokenizer, limits, instruction_prefix(source.instruction, instruction_template),
                                    source.name)
        chunks = [items[start:start + batch_size] for start in range(0, len(items), batch_size)]
        per_source.append([collator(chunk) for chunk in chunks if len(chunk) >= 2])
    interleaved = [batches[i] for i in range(max(map(len, per_source))) for batches in per_source if i < len(batches)]
    if not interleaved:
        raise InputError("self_positioning.probe_sources", "the probe sources gave no batch of 2 or more records",
                         "use larger probe sources")
    return interleaved


def probe_objectives(ir_temperature: float = PROBE_TEMPERATURE, sts_config: STSLossConfig | None = None
                     ) -> dict[str, Objective]:
    """The training objectives on one device: IR InfoNCE without cross-device negatives, CoDiEmb STS loss."""
    return {"ir": IRObjective(ir_temperature, cross_device_negatives=False, false_negative_mask=False),
            "sts": CoDiEmbSTSObjective(sts_config or STSLossConfig())}


def probe_loss_fn(ir_temperature: float = PROBE_TEMPERATURE, sts_config: STSLossConfig | None = None
                  ) -> Callable[[Callable[..., Any], dict[str, Any]], Tensor]:
    """loss_fn(forward, batch) for `fit_self_positioning`: each batch scored by its own task's objective."""
    objectives = probe_objectives(ir_temperature, sts_config)

    def loss_fn(forward: Callable[..., Any], batch: dict[str, Any]) -> Tensor:
        return objectives[batch["task"]](forward, batch)[0]

    return loss_fn


@torch.no_grad()
def mean_probe_loss(encoder: TextEncoder, params: Mapping[str, Tensor], batches: Sequence[dict[str, Any]],
                    loss_fn: Callable[[Callable[..., Any], dict[str, Any]], Tensor]) -> float:
    """Mean of loss_fn over all probe batches with `params` in place of the encoder's parameters."""
    from torch.func import functional_call

    def forward(*args: Any, **kwargs: Any) -> Any:
        return functional_call(encoder, dict(params), args, kwargs)

    return sum(float(loss_fn(forward, batch)) for batch in batches) / len(batches)


def self_positioning_merge(base_dir_or_state: str | os.PathLike | Mapping[str, Tensor],
                           checkpoints: Sequence[Checkpoint], probe_sources: Sequence[SourceConfig], *,
                           steps: int = 1000, lr: float = 5e-3, mu: float = 0.0, probe_size: int = 64,
                           probe_batch_size: int = 16, seed: int = 0, model_dir: str | os.PathLike | None = None,
                           ir_temperature: float = PROBE_TEMPERATURE, sts_config: STSLossConfig | None = None,
                           limits: TokenLimits | Mapping[str, int] | None = None, init: float = 1.0,
                           instruction_template: str = DEFAULT_INSTRUCTION_TEMPLATE,
                           encoder_kwargs: Mapping[str, Any] | None = None
                           ) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Learn a, λ on an IR + STS probe set and return (θ0 + λ·V(a), info).

    `base_dir_or_state`: θ0 as a model folder (also gives architecture and tokenizer) or a state dict
    (then `model_dir` gives them). `checkpoints`: state dicts, TensorSources or safetensors paths,
    named like `TextEncoder.state_dict()` (`model.X`), a Hugging Face export (`X`) or a Lightning
    checkpoint (`encoder.model.X`). The merged state dict is named like `TextEncoder.state_dict()`
    (load it with `encoder.load_state_dict`); buffers come from the base encoder. The probe set is
    `probe_size` seeded records per probe source in batches of `probe_batch_size`.
    info: `coefficients` (a), `scale` (λ), `combination` (c with V = Σ c_j τ_j), `loss` / `probe_loss`
    (per step), `coefficient_trace`, `scale_trace`, `initial_probe_loss` / `final_probe_loss` (mean
    over all probe batches at a = λ = init and at the end), `probe_batches` ({task: count}).
    """
    if not checkpoints:
        raise InputError("self_positioning.checkpoints", "no checkpoints", "pass at least one checkpoint")
    base_is_folder = isinstance(base_dir_or_state, (str, os.PathLike))
    if not base_is_folder and model_dir is None:
        raise InputError("self_positioning.model_dir", "base given as a state dict without a model folder",
                         "pass model_dir= (the base model folder: architecture and tokenizer)")
    encoder = TextEncoder(str(base_dir_or_state if base_is_folder else model_dir), **dict(encoder_kwargs or {}))
    encoder.eval()
    dtypes = {name: parameter.dtype for name, parameter in encoder.named_parameters()}
    base_params = ({name: p.detach().clone() for name, p in encoder.named_parameters()} if base_is_folder
                   else encoder_view(base_dir_or_state, dtypes, "base"))
    task_vectors = []
    for index, checkpoint in enumerate(checkpoints):
        view = encoder_view(checkpoint, dtypes, f"checkpoints[{index}]")
        task_vectors.append({name: view[name] - base_params[name] for name in dtypes})
        del view
    batches = build_probe_batches(encoder.tokenizer, probe_sources, probe_size=probe_size,
                                  batch_size=probe_batch_size, seed=seed, limits=limits,
                                  instruction_template=instruction_template)
    loss_fn = probe_loss_fn(ir_temperature, sts_config)
    positioning = SelfPositioning(base_params, task_vectors, init=init)
    del task_vectors
    with torch.no_grad():
        initial = mean_probe_loss(encoder, positioning.merged_params(), batches, loss_fn)
    info = fit_self_positioning(encoder, positioning, batches, loss_fn, steps=steps, lr=lr, mu=mu)
    with torch.no_grad():
        merged_params = positioning.merged_params()
        info["final_probe_loss"] = mean_probe_loss(encoder, merged_params, batches, loss_fn)
        info["combination"] = positioning.combination().tolist()
    info["initial_probe_loss"] = initial
    info["probe_batches"] = {task: sum(batch["task"] == task for batch in batches) for task in ("ir", "sts")}
    merged = {key: value.detach().clone() for key, value in encoder.state_dict().items()}
    merged.update({name: tensor.detach() for name, tensor in merged_params.items()})
    return merged, info
