"""Task-homogeneous batch sampler (SPEC §2): one task and one sub-dataset per optimizer step, on every rank
(the `mixed` and `joint` baselines excepted: see `TaskBatchSampler`).

Sub-datasets are concatenated in config order: item ``k`` of sub-dataset ``i`` has global index
``offset_i + k`` with ``offset_i = sizes[0] + ... + sizes[i-1]``.

Per sub-dataset ``i`` (task ``t_i``, per-device micro-batch ``b_i``), with world size ``W`` and
gradient-accumulation steps ``A``:

    G_i = b_i · W · A                 items per global batch (= one optimizer step)
    n_i = ⌊|D_i| / G_i⌋               global batches per pass (⌈·⌉ with drop_last=False: the last
                                      batch is padded with items from the start of the same pass)

At epoch ``e`` a ``torch.Generator`` seeded with ``seed + e`` (identical on every rank) permutes each
sub-dataset, cuts it into global batches and orders them by the policy. Global batch ``j`` is split
into ``A`` consecutive micro-batches; in micro-batch ``a`` rank ``r`` takes the items
``[a·b·W + r·b, a·b·W + (r+1)·b)``. Every rank therefore sees the same task and sub-dataset at every
step, on disjoint shards, and all ranks take the same number of steps.

An epoch's plan is kept as numpy arrays (`EpochPlan`: one int64 per item, three per global batch), never as
Python objects per item, so a rank's memory for it is ~8 bytes per record.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from codiemb_pl.errors import InputError

TASKS = ("ir", "sts")
POLICIES = ("proportional", "balanced", "temperature", "round_robin", "sequential", "mixed", "joint")
MIXED_DATASET = -1
"""`GlobalBatch.dataset` of a `mixed` or `joint` global batch (its items come from several sub-datasets)."""


@dataclass(frozen=True)
class GlobalBatch:
    """The items of one optimizer step, in rank-slicing order (see the module docstring).

    ``dataset`` is the sub-dataset index (``MIXED_DATASET`` for the ``mixed`` and ``joint`` policies), ``task`` is
    ``"ir"``, ``"sts"``, ``"mixed"`` or ``"joint"``, ``indices`` holds ``G`` global item indices.
    """

    dataset: int
    task: str
    indices: list[int]


class TaskBatchSampler:
    """Batch sampler yielding this rank's micro-batches as lists of ``(global_index, epoch)``.

    Policies (how the global batches of an epoch are ordered):

    - ``proportional``: all global batches of all sub-datasets shuffled together (Σ n_i steps).
    - ``balanced``: every task gets ``max_t N_t`` steps, ``N_t = Σ_{i∈t} n_i``; a task with fewer
      batches draws extra passes (new permutations) of its sub-datasets; all shuffled together.
    - ``temperature``: Σ n_i steps; each step draws sub-dataset ``i`` with ``p_i ∝ n_i^α`` and takes
      its next global batch, starting a new pass (new permutation) when one is used up.
    - ``round_robin``: tasks alternate in first-appearance order; within a task its sub-datasets are
      cycled in a shuffled order; stops when the smallest task is used up (``T · min_t N_t`` steps).
    - ``sequential``: all batches of the first task (shuffled), then the next task's, in
      first-appearance order (Σ n_i steps).
    - ``mixed`` (baseline): IR and STS items pooled. One micro-batch size ``b = max(batch_sizes)`` and
      ``G = b·W·A``. The pools are cut into *units* of ``S = W·A`` items; a global batch is ``b``
      units drawn without replacement from the remaining units (so its task mix is proportional to
      the remaining pool). A batch with ``k_ir`` IR units and ``k_sts`` STS units gives every
      micro-batch on every rank exactly ``k_ir`` IR items followed by ``k_sts`` STS items, so
      cross-device gathers always match in shape.
    - ``joint`` (baseline, outside the single-task rule like ``mixed``): every step holds one IR global batch
      and one STS global batch (each of one sub-dataset, sizes ``G_ir = b_ir·W·A`` and ``G_sts = b_sts·W·A``), for
      a joint step whose task gradients are combined (sum, PCGrad, MGDA: ``model.gradient_combination``).
      ``max_t N_t`` steps: each task's batches cycle its sub-datasets in a shuffled order (as ``round_robin``)
      and the task with fewer batches draws extra passes (as ``balanced``). Every micro-batch on every rank
      holds its ``b_ir`` IR items followed by its ``b_sts`` STS items: slice ``s = a·W + r`` of each part.

    Resuming: ``state_dict()`` carries ``{epoch, consumed, seed, policy}``, where ``consumed`` counts
    the micro-batches the trainer reported through ``mark_consumed`` (not the ones yielded: data
    loaders prefetch). After ``load_state_dict`` the next iteration of that epoch skips exactly
    ``consumed`` micro-batches.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        tasks: Sequence[str],
        batch_sizes: Sequence[int],
        *,
        world_size: int = 1,
        rank: int = 0,
        accumulate: int = 1,
        policy: str = "proportional",
        seed: int = 0,
        temperature_alpha: float = 0.5,
        drop_last: bool = True,
        names: Sequence[str] | None = None,
    ) -> None:
        self.sizes = [int(size) for size in sizes]
        self.tasks = list(tasks)
        self.batch_sizes = [int(size) for size in batch_sizes]
        self.names = list(names) if names is not None else [f"#{i}" for i in range(len(self.sizes))]
        self.world_size = int(world_size)
        self.rank = int(rank)
        self.accumulate = int(accumulate)
        self.policy = policy
        self.seed = int(seed)
        self.temperature_alpha = float(temperature_alpha)
        self.drop_last = bool(drop_last)
        self._validate()

        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.task_order = list(dict.fromkeys(self.tasks))  # first-appearance order
        self.epoch = 0
        self.consumed = 0
        self._resume: tuple[int, int] | None = None  # (epoch, micro-batches to skip), one-shot
        self._check_enough_data()

    # ------------------------------------------------------------------ configuration checks

    def _validate(self) -> None:
        count = len(self.sizes)
        if count == 0:
            raise InputError("sampler", "no training sub-datasets", "configure at least one training source")
        if len(self.tasks) != count or len(self.batch_sizes) != count or len(self.names) != count:
            raise InputError(
                "sampler",
                f"got {count} sizes, {len(self.tasks)} tasks, {len(self.batch_sizes)} batch sizes "
                f"and {len(self.names)} names",
                "pass one size, task, batch size (and name) per sub-dataset",
            )
        if self.policy not in POLICIES:
            raise InputError("sampler.policy", f"unknown policy {self.policy!r}", f"use one of: {', '.join(POLICIES)}")
        if self.policy == "joint" and set(self.tasks) != set(TASKS):
            raise InputError("sampler (policy joint)", f"joint steps need IR and STS training sources, got only "
                             f"{', '.join(sorted(set(self.tasks)))}", "add a source of the other task, or use "
                             "another data.policy")
        for i, (size, task, batch) in enumerate(zip(self.sizes, self.tasks, self.batch_sizes)):
            where = f"sub-dataset {self.names[i]}"
            if task not in TASKS:
                raise InputError(where, f"unknown task {task!r}", f"use one of: {', '.join(TASKS)}")
            if size < 0:
                raise InputError(where, f"negative size {size}", "pass the number of records")
            if batch < 1:
                raise InputError(where, f"batch size {batch} is not positive", "set batch_size to 1 or more")
        if self.world_size < 1:
            raise InputError("sampler.world_size", f"{self.world_size} is not positive", "use 1 or more devices")
        if not 0 <= self.rank < self.world_size:
            raise InputError("sampler.rank", f"rank {self.rank} outside [0, {self.world_size})",
                             "pass this process's global rank")
        if self.accumulate < 1:
            raise InputError("sampler.accumulate", f"{self.accumulate} is not positive",
                             "set accumulate_grad_batches to 1 or more")
        if not math.isfinite(self.temperature_alpha):
            raise InputError("sampler.temperature_alpha", f"{self.temperature_alpha} is not finite",
                             "use a finite exponent, e.g. 0.5")

    def _check_enough_data(self) -> None:
        if self.policy == "mixed":
            if self.steps_per_epoch() < 1:
                raise InputError(
                    "sampler (policy mixed)",
                    f"the pooled sub-datasets ({sum(self.sizes)} items) do not fill one global batch of "
                    f"{self.mixed_global_batch_size()} items (b={self.mixed_micro_batch_size()} x "
                    f"W={self.world_size} x A={self.accumulate}, per-task pools in multiples of W x A)",
                    "add data, lower the batch sizes, or use fewer devices / accumulation steps",
                )
            return
        for i, size in enumerate(self.sizes):
            global_batch = self.global_batch_size(i)
            if size < global_batch:
                raise InputError(
                    f"sub-dataset {self.names[i]}",
                    f"{size} items are fewer than one global batch of {global_batch} "
                    f"(batch_size {self.batch_sizes[i]} x {self.world_size} devices x "
                    f"{self.accumulate} accumulation steps)",
                    "lower its batch_size, use fewer devices or accumulation steps, add data, or remove it",
                )

    # ------------------------------------------------------------------ sizes and counts

    @property
    def slices_per_step(self) -> int:
        """S = W·A: the number of (micro-batch, rank) slices one global batch is cut into."""
        return self.world_size * self.accumulate

    def global_batch_size(self, dataset: int) -> int:
        """G_i = b_i·W·A for sub-dataset ``dataset``."""
        return self.batch_sizes[dataset] * self.slices_per_step

    def mixed_micro_batch_size(self) -> int:
        """Micro-batch size under ``mixed``: the largest configured batch size."""
        return max(self.batch_sizes)

    def mixed_global_batch_size(self) -> int:
        """G = max(b_i)·W·A under ``mixed``."""
        return self.mixed_micro_batch_size() * self.slices_per_step

    def _whole(self, numerator: int, denominator: int) -> int:
        """⌊n/d⌋ when dropping the remainder, ⌈n/d⌉ when padding it."""
        return numerator // denominator if self.drop_last else -(-numerator // denominator)

    def batches_per_pass(self) -> dict[int, int]:
        """n_i: global batches in one pass over sub-dataset i (non-mixed policies)."""
        return {i: self._whole(size, self.global_batch_size(i)) for i, size in enumerate(self.sizes)}

    def _batches_per_task(self) -> dict[str, int]:
        per_pass = self.batches_per_pass()
        return {task: sum(per_pass[i] for i, t in enumerate(self.tasks) if t == task) for task in self.task_order}

    def _mixed_units(self) -> dict[str, int]:
        """Units of S = W·A items each task's pool is cut into under ``mixed``."""
        return {task: self._whole(sum(s for s, t in zip(self.sizes, self.tasks) if t == task), self.slices_per_step)
                for task in self.task_order}

    def steps_per_epoch(self) -> int:
        """Optimizer steps (= global batches) per epoch; the same for every epoch and rank."""
        if self.policy == "mixed":
            return self._whole(sum(self._mixed_units().values()), self.mixed_micro_batch_size())
        per_task = self._batches_per_task()
        if self.policy == "joint":
            return max(per_task.values())
        if self.policy == "balanced":
            return max(per_task.values()) * len(per_task)
        if self.policy == "round_robin":
            return min(per_task.values()) * len(per_task)
        return sum(per_task.values())

    def __len__(self) -> int:
        """Micro-batches this rank yields in a full epoch: A × steps_per_epoch() (same on all ranks).

        A resumed iteration yields ``len(self) - consumed`` of them.
        """
        return self.accumulate * self.steps_per_epoch()

    def dropped_per_epoch(self) -> dict[int, int]:
        """Items of each sub-dataset that no global batch of an epoch contains.

        Non-mixed policies drop each pass's remainder ``|D_i| - n_i·G_i`` (0 with drop_last=False).
        Under ``mixed`` the split over sub-datasets depends on the permutation, so it is counted on
        the plan of the current epoch (the total, ``Σ|D_i| - steps·G``, does not vary).
        """
        if not self.drop_last:
            return {i: 0 for i in range(len(self.sizes))}
        if self.policy != "mixed":
            per_pass = self.batches_per_pass()
            return {i: size - per_pass[i] * self.global_batch_size(i) for i, size in enumerate(self.sizes)}
        items = self.epoch_plan(self.epoch).items
        used = np.bincount(np.searchsorted(np.asarray(self.offsets), items, side="right") - 1,
                           minlength=len(self.sizes))
        return {i: size - int(used[i]) for i, size in enumerate(self.sizes)}

    def dropped_total(self) -> int:
        """Total items per epoch left out of every global batch (sum of `dropped_per_epoch`)."""
        if not self.drop_last:
            return 0
        if self.policy == "mixed":
            return sum(self.sizes) - self.steps_per_epoch() * self.mixed_global_batch_size()
        return sum(self.dropped_per_epoch().values())

    def dataset_of(self, global_index: int) -> int:
        """The sub-dataset that holds ``global_index``."""
        if not 0 <= global_index < sum(self.sizes):
            raise IndexError(f"global index {global_index} outside [0, {sum(self.sizes)})")
        return bisect.bisect_right(self.offsets, global_index) - 1

    def describe(self) -> str:
        """One line per sub-dataset (size, G, batches, dropped), then one summary line."""
        lines = []
        dropped = self.dropped_per_epoch()
        if self.policy == "mixed":
            for i, size in enumerate(self.sizes):
                lines.append(f"{self.names[i]} ({self.tasks[i]}): size={size} pooled into mixed batches, "
                             f"dropped={dropped[i]}")
            summary_g = f"G={self.mixed_global_batch_size()} (b={self.mixed_micro_batch_size()})"
        else:
            per_pass = self.batches_per_pass()
            for i, size in enumerate(self.sizes):
                lines.append(f"{self.names[i]} ({self.tasks[i]}): size={size} G={self.global_batch_size(i)} "
                             f"(b={self.batch_sizes[i]}) batches={per_pass[i]} dropped={dropped[i]}")
            summary_g = "G_i=b_i*W*A"
        lines.append(f"policy={self.policy} W={self.world_size} A={self.accumulate} {summary_g} "
                     f"steps/epoch={self.steps_per_epoch()} micro-batches/rank/epoch={len(self)} "
                     f"dropped/epoch={self.dropped_total()}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ epoch, progress, resume

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration plans; a new epoch resets ``consumed`` to 0."""
        epoch = int(epoch)
        if epoch != self.epoch:
            self.consumed = 0
            if self._resume is not None and self._resume[0] != epoch:
                self._resume = None
        self.epoch = epoch

    def mark_consumed(self, count: int = 1) -> None:
        """Record that the trainer finished ``count`` more micro-batches of the current epoch."""
        self.consumed += int(count)

    def state_dict(self) -> dict[str, Any]:
        """Position to save with a checkpoint."""
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed, "policy": self.policy}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position: the next iteration of ``state["epoch"]`` skips ``state["consumed"]`` micro-batches."""
        for key in ("seed", "policy"):
            if key in state and state[key] != getattr(self, key):
                raise InputError(
                    "sampler state in checkpoint",
                    f"saved with {key}={state[key]!r}, but this run uses {key}={getattr(self, key)!r}",
                    f"resume with the same {key}, or start a fresh run",
                )
        epoch, consumed = int(state["epoch"]), int(state["consumed"])
        if not 0 <= consumed <= len(self):
            raise InputError(
                "sampler state in checkpoint",
                f"{consumed} micro-batches consumed but an epoch has {len(self)}",
                "resume with the same data, batch sizes, devices and accumulation steps",
            )
        self.epoch, self.consumed = epoch, consumed
        self._resume = (epoch, consumed)

    # ------------------------------------------------------------------ iteration

    def rank_micro_batches(self, batch: GlobalBatch, rank: int | None = None) -> list[list[int]]:
        """The A micro-batches of ``batch`` for ``rank`` (default: this rank):
        micro-batch a is ``indices[a·b·W + r·b : a·b·W + (r+1)·b]``."""
        rank = self.rank if rank is None else rank
        micro = len(batch.indices) // self.slices_per_step
        return [
            batch.indices[(a * self.world_size + rank) * micro:(a * self.world_size + rank + 1) * micro]
            for a in range(self.accumulate)
        ]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        """This rank's micro-batches of ``self.epoch``, after any skip restored by `load_state_dict`."""
        skip = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            skip = self._resume[1]
        self._resume = None
        return self._micro_batches(self.epoch, skip)

    def _micro_batches(self, epoch: int, skip: int) -> Iterator[list[tuple[int, int]]]:
        """Micro-batch ``a`` of global batch ``k`` is this rank's slice ``a·W + r`` of it (see `rank_micro_batches`);
        the first ``skip`` micro-batches of the epoch are left out."""
        plan = self.epoch_plan(epoch)
        first_batch, first_micro = divmod(skip, self.accumulate)
        for step in range(first_batch, len(plan)):
            start, micro = int(plan.starts[step]), int(plan.lengths[step]) // self.slices_per_step
            for a in range(first_micro if step == first_batch else 0, self.accumulate):
                low = start + (a * self.world_size + self.rank) * micro
                yield [(index, epoch) for index in plan.items[low:low + micro].tolist()]

    # ------------------------------------------------------------------ planning

    def plan(self, epoch: int) -> list[GlobalBatch]:
        """The ordered global batches of ``epoch`` (identical on every rank), as objects (for inspection: iteration
        reads `epoch_plan`'s arrays)."""
        plan = self.epoch_plan(epoch)
        return [GlobalBatch(int(dataset), self.policy if dataset == MIXED_DATASET else self.tasks[int(dataset)],
                            plan.items[start:start + length].tolist())
                for dataset, start, length in zip(plan.datasets, plan.starts, plan.lengths)]

    def epoch_plan(self, epoch: int) -> EpochPlan:
        """The ordered global batches of ``epoch`` as arrays; a ``torch.Generator`` seeded ``seed + epoch`` draws
        the permutations and orders."""
        generator = torch.Generator().manual_seed(self.seed + int(epoch))
        if self.policy == "mixed":
            return self._plan_mixed(generator)
        passes = _Passes(self, generator)
        first_pass = [passes.cut(i) for i in range(len(self.sizes))]
        if self.policy == "joint":
            return self._plan_joint(first_pass, passes)
        order = {
            "proportional": self._order_proportional,
            "balanced": self._order_balanced,
            "temperature": self._order_temperature,
            "round_robin": self._order_round_robin,
            "sequential": self._order_sequential,
        }[self.policy]
        return passes.plan(order(first_pass, passes))

    @staticmethod
    def _take(permutation: torch.Tensor, count: int) -> torch.Tensor:
        """The first ``count`` entries of ``permutation``, wrapping around when padding."""
        if count <= len(permutation):
            return permutation[:count]
        return permutation[torch.arange(count) % len(permutation)]

    def _datasets_of(self, task: str) -> list[int]:
        return [i for i, t in enumerate(self.tasks) if t == task]

    # Each `_order_*` turns the first pass's batch numbers of every sub-dataset (`_Passes.cut`) into the epoch's
    # order of batch numbers, cutting further passes where its policy needs them.

    def _order_proportional(self, first: list[np.ndarray], passes: _Passes) -> np.ndarray:
        return passes.shuffled(np.concatenate(first))

    def _order_balanced(self, first: list[np.ndarray], passes: _Passes) -> np.ndarray:
        target = max(self._batches_per_task().values())
        selected = []
        for task in self.task_order:
            datasets = self._datasets_of(task)
            task_batches = np.concatenate([first[i] for i in datasets])
            while len(task_batches) < target:  # oversample: a fresh pass over the task's sub-datasets
                extra = passes.shuffled(np.concatenate([passes.cut(i) for i in datasets]))
                task_batches = np.concatenate([task_batches, extra[: target - len(task_batches)]])
            selected.append(task_batches)
        return passes.shuffled(np.concatenate(selected))

    def _order_temperature(self, first: list[np.ndarray], passes: _Passes) -> np.ndarray:
        per_pass = self.batches_per_pass()
        log_counts = torch.tensor([math.log(per_pass[i]) for i in range(len(self.sizes))], dtype=torch.float64)
        weights = torch.exp(self.temperature_alpha * (log_counts - log_counts.max()))  # n_i^α, overflow-safe
        steps = self.steps_per_epoch()
        draws = torch.multinomial(weights / weights.sum(), steps, replacement=True, generator=passes.generator)
        queues, next_position = list(first), [0] * len(first)
        ordered = np.empty(steps, dtype=np.int64)
        for step, dataset in enumerate(draws.tolist()):
            if next_position[dataset] == len(queues[dataset]):  # pass used up: start a new one
                queues[dataset], next_position[dataset] = passes.cut(dataset), 0
            ordered[step] = queues[dataset][next_position[dataset]]
            next_position[dataset] += 1
        return ordered

    def _task_stream(self, task: str, first: list[np.ndarray], passes: _Passes) -> np.ndarray:
        """All of ``task``'s batches, cycling its sub-datasets in a shuffled order: position p of every
        sub-dataset (in cycle order), then position p + 1."""
        datasets = self._datasets_of(task)
        cycle = [datasets[j] for j in torch.randperm(len(datasets), generator=passes.generator).tolist()]
        batches = np.concatenate([first[i] for i in cycle])
        keys = np.concatenate([np.arange(len(first[i]), dtype=np.int64) * len(cycle) + turn
                               for turn, i in enumerate(cycle)])
        return batches[np.argsort(keys, kind="stable")]

    def _order_round_robin(self, first: list[np.ndarray], passes: _Passes) -> np.ndarray:
        streams = [self._task_stream(task, first, passes) for task in self.task_order]
        rounds = min(len(stream) for stream in streams)
        return np.stack([stream[:rounds] for stream in streams], axis=1).reshape(-1)

    def _order_sequential(self, first: list[np.ndarray], passes: _Passes) -> np.ndarray:
        return np.concatenate([passes.shuffled(np.concatenate([first[i] for i in self._datasets_of(task)]))
                               for task in self.task_order])

    def _plan_joint(self, first: list[np.ndarray], passes: _Passes) -> EpochPlan:
        """Step k pairs the k-th IR and the k-th STS global batch (class docstring); the shorter stream is extended
        with new passes of its task's sub-datasets."""
        steps = self.steps_per_epoch()
        streams = {}
        for task in TASKS:
            stream = self._task_stream(task, first, passes)
            while len(stream) < steps:
                fresh = [passes.cut(i) if i in self._datasets_of(task) else np.zeros(0, dtype=np.int64)
                         for i in range(len(self.sizes))]
                stream = np.concatenate([stream, self._task_stream(task, fresh, passes)])
            streams[task] = stream[:steps]
        return passes.joint_plan(streams["ir"], streams["sts"])

    def _plan_mixed(self, generator: torch.Generator) -> EpochPlan:
        """Mixed-task global batches; see the class docstring for the unit scheme."""
        slices, micro = self.slices_per_step, self.mixed_micro_batch_size()
        unit_counts = self._mixed_units()
        units_by_task: dict[str, np.ndarray] = {}
        for task in self.task_order:
            pool = torch.cat([torch.arange(self.sizes[i]) + self.offsets[i] for i in self._datasets_of(task)])
            if len(pool) == 0:
                units_by_task[task] = np.empty((0, slices), dtype=np.int64)
                continue
            permuted = pool[torch.randperm(len(pool), generator=generator)]
            units_by_task[task] = self._take(permuted, unit_counts[task] * slices).view(-1, slices).numpy()

        # unit j of the pooled order is unit `label_units[j]` of task `label_tasks[j]` (its index in task_order)
        label_tasks = np.repeat(np.arange(len(self.task_order)), [unit_counts[t] for t in self.task_order])
        label_units = np.concatenate([np.arange(unit_counts[t], dtype=np.int64) for t in self.task_order])
        order = torch.randperm(len(label_tasks), generator=generator)
        steps = self.steps_per_epoch()
        order = self._take(order, steps * micro).numpy()

        global_batch = micro * slices
        items = np.empty((steps, global_batch), dtype=np.int64)
        for step in range(steps):
            chosen = order[step * micro:(step + 1) * micro]
            chosen_tasks, chosen_units = label_tasks[chosen], label_units[chosen]
            per_slice = []  # each task's items, reshaped to (S, k_task): row s goes to slice s = a·W + r
            for task in TASKS:
                if task not in self.task_order:
                    continue
                units = chosen_units[chosen_tasks == self.task_order.index(task)]
                if len(units):
                    per_slice.append(units_by_task[task][units].reshape(slices, len(units)))
            items[step] = np.concatenate(per_slice, axis=1).reshape(-1)
        return EpochPlan(datasets=np.full(steps, MIXED_DATASET, dtype=np.int64),
                         starts=np.arange(steps, dtype=np.int64) * global_batch,
                         lengths=np.full(steps, global_batch, dtype=np.int64), items=items.reshape(-1))


@dataclass(frozen=True)
class EpochPlan:
    """An epoch's global batches as arrays, a few bytes per item: batch ``k`` is sub-dataset ``datasets[k]``
    (``MIXED_DATASET`` under ``mixed``) and holds the global indices ``items[starts[k] : starts[k] + lengths[k]]``
    in rank-slicing order."""

    datasets: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    items: np.ndarray

    def __len__(self) -> int:
        return len(self.datasets)


class _Passes:
    """The passes an epoch's plan cuts: each is a new permutation of one sub-dataset cut into its n_i global
    batches, numbered in the order they are cut."""

    def __init__(self, sampler: TaskBatchSampler, generator: torch.Generator):
        self.sampler, self.generator = sampler, generator
        self.items: list[np.ndarray] = []  # each pass's items, batch after batch
        self.datasets: list[np.ndarray] = []
        self.starts: list[np.ndarray] = []
        self.length = self.count = 0

    def cut(self, dataset: int) -> np.ndarray:
        """A new pass over ``dataset``: the numbers of its batches."""
        sampler = self.sampler
        size, global_batch = sampler.sizes[dataset], sampler.global_batch_size(dataset)
        count = sampler._whole(size, global_batch)
        permutation = torch.randperm(size, generator=self.generator) + sampler.offsets[dataset]
        self.items.append(sampler._take(permutation, count * global_batch).numpy())
        self.datasets.append(np.full(count, dataset, dtype=np.int64))
        self.starts.append(self.length + np.arange(count, dtype=np.int64) * global_batch)
        numbers = np.arange(self.count, self.count + count, dtype=np.int64)
        self.length, self.count = self.length + count * global_batch, self.count + count
        return numbers

    def shuffled(self, batches: np.ndarray) -> np.ndarray:
        return batches[torch.randperm(len(batches), generator=self.generator).numpy()]

    def joint_plan(self, ir: np.ndarray, sts: np.ndarray) -> EpochPlan:
        """The plan whose k-th batch joins batch numbers ``ir[k]`` and ``sts[k]``: its slice s = a·W + r is slice s
        of the IR batch followed by slice s of the STS batch."""
        slices = self.sampler.slices_per_step
        items, starts, lengths = np.concatenate(self.items), np.concatenate(self.starts), self._lengths()
        joint_lengths = lengths[ir] + lengths[sts]
        joint_starts = np.concatenate([[0], np.cumsum(joint_lengths)[:-1]]).astype(np.int64)
        joined = np.empty(int(joint_lengths.sum()), dtype=np.int64)
        for step, (first, second) in enumerate(zip(ir.tolist(), sts.tolist())):
            parts = [items[starts[number]:starts[number] + lengths[number]].reshape(slices, -1)
                     for number in (first, second)]
            low = joint_starts[step]
            joined[low:low + joint_lengths[step]] = np.concatenate(parts, axis=1).reshape(-1)
        return EpochPlan(datasets=np.full(len(ir), MIXED_DATASET, dtype=np.int64), starts=joint_starts,
                         lengths=joint_lengths, items=joined)

    def _lengths(self) -> np.ndarray:
        """The size of every batch cut so far, by batch number."""
        sizes = np.array([self.sampler.global_batch_size(i) for i in range(len(self.sampler.sizes))], dtype=np.int64)
        return sizes[np.concatenate(self.datasets)]

    def plan(self, order: np.ndarray) -> EpochPlan:
        """The plan whose k-th batch is batch number ``order[k]``."""
        return EpochPlan(datasets=np.concatenate(self.datasets)[order], starts=np.concatenate(self.starts)[order],
                         lengths=self._lengths()[order], items=np.concatenate(self.items))
