"""TaskBatchSampler: one task per step on every rank, rank slicing, step counts, resume, mixed and joint baselines."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from codiemb_pl.data.sampler import MIXED_DATASET, POLICIES, TaskBatchSampler
from codiemb_pl.errors import InputError

SINGLE_TASK_POLICIES = [p for p in POLICIES if p not in ("mixed", "joint")]
NO_REPEAT_POLICIES = ["proportional", "round_robin", "sequential", "mixed"]


def make(policy="proportional", sizes=(100, 40), tasks=("ir", "sts"), batch_sizes=(10, 8), **kwargs):
    return TaskBatchSampler(list(sizes), list(tasks), list(batch_sizes), policy=policy, **kwargs)


def all_ranks(world_size, **kwargs):
    return [make(world_size=world_size, rank=r, **kwargs) for r in range(world_size)]


def task_of(sampler, index):
    return sampler.tasks[sampler.dataset_of(index)]


# ---------------------------------------------------------------- (1) one task and one sub-dataset per step

@pytest.mark.parametrize("policy", SINGLE_TASK_POLICIES)
def test_each_global_batch_holds_one_sub_dataset_and_task(policy):
    sampler = make(policy, sizes=(100, 55, 40), tasks=("ir", "ir", "sts"), batch_sizes=(5, 5, 4),
                   world_size=2, accumulate=1)
    for batch in sampler.plan(3):
        assert len(batch.indices) == sampler.global_batch_size(batch.dataset)
        assert {sampler.dataset_of(i) for i in batch.indices} == {batch.dataset}
        assert batch.task == sampler.tasks[batch.dataset]
        assert len(set(batch.indices)) == len(batch.indices)


# ---------------------------------------------------------------- (2) rank slices partition each global batch

@pytest.mark.parametrize("world_size,accumulate", [(2, 1), (2, 2), (3, 1), (3, 2)])
@pytest.mark.parametrize("policy", POLICIES)
def test_rank_slices_partition_the_global_batch(policy, world_size, accumulate):
    samplers = all_ranks(world_size, policy=policy, sizes=(60, 50), batch_sizes=(3, 2), accumulate=accumulate)
    plan = samplers[0].plan(0)
    streams = [list(s) for s in samplers]
    for step, batch in enumerate(plan):
        micro = len(batch.indices) // (world_size * accumulate)
        pieces = []
        for rank, stream in enumerate(streams):
            rank_micros = stream[step * accumulate:(step + 1) * accumulate]
            for a, mb in enumerate(rank_micros):
                indices = [i for i, _ in mb]
                start = a * micro * world_size + rank * micro  # the documented slicing rule
                assert indices == batch.indices[start:start + micro]
                pieces += indices
        assert sorted(pieces) == sorted(batch.indices)
        assert len(pieces) == len(set(pieces))


def test_micro_batches_carry_the_epoch():
    sampler = make()
    sampler.set_epoch(4)
    assert all(epoch == 4 for mb in sampler for _, epoch in mb)


# ---------------------------------------------------------------- (3) same task sequence on every rank; (11) same len

@pytest.mark.parametrize("policy", POLICIES)
def test_every_rank_sees_the_same_task_sequence_and_length(policy):
    samplers = all_ranks(3, policy=policy, sizes=(97, 31, 64), tasks=("ir", "sts", "ir"),
                         batch_sizes=(4, 2, 3), accumulate=2)
    sequences = [[task_of(s, mb[0][0]) if policy != "mixed" else len(mb) for mb in s] for s in samplers]
    assert all(seq == sequences[0] for seq in sequences)
    assert len({len(s) for s in samplers}) == 1
    assert all(len(seq) == len(s) for seq, s in zip(sequences, samplers))


# ---------------------------------------------------------------- (4) step counts per policy, by hand

@pytest.mark.parametrize("policy,steps", [("proportional", 15), ("balanced", 20), ("temperature", 15),
                                          ("round_robin", 10), ("sequential", 15), ("mixed", 14), ("joint", 10)])
def test_step_counts_two_sub_datasets(policy, steps):
    # n = [100 // 10, 40 // 8] = [10, 5]; balanced 2 * max = 20; round robin 2 * min(10, 5) = 10.
    # mixed: b = max(10, 8) = 10, W*A = 1 so units are single items: 140 // 10 = 14. joint: max(10, 5) = 10.
    sampler = make(policy, batch_sizes=(10, 8))
    assert sampler.steps_per_epoch() == steps
    assert len(sampler.plan(0)) == steps == len(sampler)


@pytest.mark.parametrize("policy,steps", [("proportional", 21), ("balanced", 22), ("temperature", 21),
                                          ("round_robin", 20), ("sequential", 21), ("mixed", 14)])
def test_step_counts_with_devices_and_accumulation(policy, steps):
    # W=2, A=2 -> G = 4b = [20, 20, 8]; n = [100//20, 110//20, 90//8] = [5, 5, 11]; N_ir = 10, N_sts = 11:
    # balanced 2 * 11, round robin 2 * 10. mixed: b = 5, S = 4, units [210//4, 90//4] = [52, 22], 74 // 5 = 14.
    sampler = make(policy, sizes=(100, 110, 90), tasks=("ir", "ir", "sts"), batch_sizes=(5, 5, 2),
                   world_size=2, accumulate=2)
    assert sampler.steps_per_epoch() == steps
    assert len(sampler.plan(1)) == steps
    assert len(sampler) == 2 * steps
    assert len(list(sampler)) == 2 * steps


def test_task_order_of_round_robin_sequential_and_balanced():
    tasks = lambda policy: [b.task for b in make(policy).plan(0)]  # noqa: E731
    assert tasks("round_robin") == ["ir", "sts"] * 5
    assert tasks("sequential") == ["ir"] * 10 + ["sts"] * 5
    assert Counter(tasks("balanced")) == {"ir": 10, "sts": 10}
    assert tasks("round_robin") != tasks("proportional")
    # first-appearance order decides which task leads
    swapped = make("round_robin", sizes=(40, 100), tasks=("sts", "ir"), batch_sizes=(8, 10))
    assert [b.task for b in swapped.plan(0)] == ["sts", "ir"] * 5


def test_round_robin_cycles_the_sub_datasets_of_a_task():
    sampler = make("round_robin", sizes=(30, 30, 200), tasks=("ir", "ir", "sts"), batch_sizes=(10, 10, 10))
    ir_datasets = [b.dataset for b in sampler.plan(0) if b.task == "ir"]
    assert len(ir_datasets) == 6
    assert all(ir_datasets[k] != ir_datasets[k + 1] for k in range(5))


# ---------------------------------------------------------------- (5) dropped samples

def test_dropped_sample_accounting():
    sampler = make(sizes=(100, 45, 43), tasks=("ir", "sts", "sts"), batch_sizes=(3, 2, 2), world_size=2,
                   accumulate=2)
    # G = [12, 8, 8]: 100 = 8*12 + 4, 45 = 5*8 + 5, 43 = 5*8 + 3
    assert sampler.batches_per_pass() == {0: 8, 1: 5, 2: 5}
    assert sampler.dropped_per_epoch() == {0: 4, 1: 5, 2: 3}
    assert sampler.dropped_total() == 12
    used = {i for b in sampler.plan(0) for i in b.indices}
    assert 188 - len(used) == 12
    text = sampler.describe().splitlines()
    assert len(text) == 4 and "size=100" in text[0] and "G=12" in text[0] and "dropped=4" in text[0]


def test_mixed_dropped_total_matches_the_plan():
    sampler = make("mixed", batch_sizes=(3, 2), world_size=2, accumulate=2)
    # b = 3, S = 4, G = 12; units 25 + 10 = 35 -> 11 steps, 132 items used, 8 dropped
    used = {i for b in sampler.plan(0) for i in b.indices}
    assert sampler.dropped_total() == 140 - len(used) == 8
    assert sum(sampler.dropped_per_epoch().values()) == 8


def test_no_drop_last_pads_the_last_batch_from_the_same_pass():
    sampler = make(sizes=(25, 16), batch_sizes=(10, 8), drop_last=False)
    assert sampler.batches_per_pass() == {0: 3, 1: 2}
    assert sampler.dropped_total() == 0
    counts = Counter(i for b in sampler.plan(0) for i in b.indices)
    assert set(counts) == set(range(41))
    assert sum(c - 1 for c in counts.values()) == 5  # 30 slots for 25 items


# ---------------------------------------------------------------- (6) determinism

@pytest.mark.parametrize("policy", POLICIES)
def test_plan_is_a_function_of_seed_and_epoch(policy):
    indices = lambda s, e: [b.indices for b in s.plan(e)]  # noqa: E731
    a, b = make(policy, seed=7), make(policy, seed=7)
    assert indices(a, 2) == indices(b, 2)
    assert indices(a, 2) != indices(a, 3)
    assert indices(a, 2) != indices(make(policy, seed=8), 2)


def test_set_epoch_selects_the_iterated_plan():
    sampler = make()
    sampler.set_epoch(5)
    plan = sampler.plan(5)
    assert [[i for i, _ in mb] for mb in sampler] == [b.indices for b in plan]


# ---------------------------------------------------------------- (7) no repeats within an epoch

@pytest.mark.parametrize("policy", NO_REPEAT_POLICIES)
def test_no_item_repeats_within_an_epoch(policy):
    sampler = make(policy, sizes=(100, 55, 40), tasks=("ir", "sts", "ir"), batch_sizes=(3, 2, 2),
                   world_size=2, accumulate=2)
    items = [i for b in sampler.plan(0) for i in b.indices]
    assert len(items) == len(set(items))


def test_balanced_oversamples_the_smaller_task_in_whole_passes():
    # n = [10, 5]: STS needs 5 extra batches = exactly one more pass, so every STS item appears twice
    counts = Counter(i for b in make("balanced").plan(0) for i in b.indices)
    assert all(counts[i] == 1 for i in range(100))
    assert all(counts[i] == 2 for i in range(100, 140))


def test_temperature_restarts_a_sub_dataset_pass_when_used_up():
    sampler = make("temperature", sizes=(100, 16), batch_sizes=(10, 8), temperature_alpha=0.0)
    for dataset, n in sampler.batches_per_pass().items():
        batches = [b.indices for b in sampler.plan(0) if b.dataset == dataset]
        for start in range(0, len(batches) - n + 1, n):  # each complete pass covers distinct items
            items = [i for batch in batches[start:start + n] for i in batch]
            assert len(items) == len(set(items))


def test_temperature_draw_frequency_follows_n_to_the_alpha():
    # n = [10, 5], alpha = 1: P(dataset 0) = 10 / 15
    sampler = make("temperature", temperature_alpha=1.0)
    draws = [b.dataset for epoch in range(60) for b in sampler.plan(epoch)]
    assert abs(draws.count(0) / len(draws) - 2 / 3) < 0.06


# ---------------------------------------------------------------- (8) resume

@pytest.mark.parametrize("policy", ["proportional", "temperature", "mixed"])
def test_resume_skips_exactly_the_consumed_micro_batches(policy):
    config = dict(policy=policy, sizes=(61, 50), batch_sizes=(3, 2), world_size=2, rank=1, accumulate=2, seed=3)
    reference = make(**config)
    reference.set_epoch(2)
    full_epoch = list(reference)
    reference.set_epoch(3)
    next_epoch = list(reference)

    running = make(**config)
    running.set_epoch(2)
    iterator = iter(running)
    for _ in range(7):  # the loader prefetches 7 but the trainer only finishes 5
        next(iterator)
    running.mark_consumed(4)
    running.mark_consumed()
    state = running.state_dict()
    assert state == {"epoch": 2, "consumed": 5, "seed": 3, "policy": policy}

    resumed = make(**config)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)
    assert list(resumed) == full_epoch[5:]
    assert list(resumed) == full_epoch  # the skip applies once
    resumed.set_epoch(3)
    assert resumed.consumed == 0
    assert list(resumed) == next_epoch


def test_resume_skip_is_dropped_when_moving_to_another_epoch():
    sampler = make()
    sampler.load_state_dict({"epoch": 1, "consumed": 4, "seed": 0, "policy": "proportional"})
    sampler.set_epoch(2)
    assert len(list(sampler)) == len(sampler)


def test_resume_with_other_seed_or_policy_or_too_many_consumed_is_refused():
    sampler = make()
    with pytest.raises(InputError, match="seed"):
        sampler.load_state_dict({"epoch": 0, "consumed": 1, "seed": 1, "policy": "proportional"})
    with pytest.raises(InputError, match="policy"):
        sampler.load_state_dict({"epoch": 0, "consumed": 1, "seed": 0, "policy": "balanced"})
    with pytest.raises(InputError, match="consumed"):
        sampler.load_state_dict({"epoch": 0, "consumed": 16, "seed": 0, "policy": "proportional"})


# ---------------------------------------------------------------- (9) mixed: equal per-task counts on every slice

@pytest.mark.parametrize("world_size,accumulate", [(1, 1), (2, 2), (3, 1)])
def test_mixed_gives_every_rank_the_same_task_counts(world_size, accumulate):
    samplers = all_ranks(world_size, policy="mixed", sizes=(70, 45, 33), tasks=("ir", "sts", "ir"),
                         batch_sizes=(4, 6, 2), accumulate=accumulate)
    streams = [list(s) for s in samplers]
    reference = samplers[0]
    assert reference.mixed_micro_batch_size() == 6
    for step, batch in enumerate(reference.plan(0)):
        assert batch.dataset == MIXED_DATASET and batch.task == "mixed"
        assert len(batch.indices) == 6 * world_size * accumulate
        slice_tasks = []
        for stream in streams:
            for mb in stream[step * accumulate:(step + 1) * accumulate]:
                tasks = [task_of(reference, i) for i, _ in mb]
                assert tasks == sorted(tasks)  # IR items first, then STS
                slice_tasks.append(Counter(tasks))
        assert all(counts == slice_tasks[0] for counts in slice_tasks)


def test_mixed_batches_do_mix_tasks():
    sampler = make("mixed", batch_sizes=(8, 8))
    assert any(len({task_of(sampler, i) for i in b.indices}) == 2 for b in sampler.plan(0))


# ---------------------------------------------------------------- (9b) joint: one IR and one STS global batch per step

def joint_parts(sampler, indices):
    """(IR items, STS items) of a joint global batch or of one rank's micro-batch: each slice of the batch is its
    IR items followed by its STS items."""
    return ([i for i in indices if task_of(sampler, i) == "ir"], [i for i in indices if task_of(sampler, i) == "sts"])


def test_joint_steps_hold_one_ir_and_one_sts_global_batch():
    # W=2, A=2: G = [20, 20, 16]; n = [100 // 20, 55 // 20, 40 // 16] = [5, 2, 2]; N_ir = 7 > N_sts = 2 -> 7 steps
    sampler = make("joint", sizes=(100, 55, 40), tasks=("ir", "ir", "sts"), batch_sizes=(5, 5, 4),
                   world_size=2, accumulate=2)
    plan = sampler.plan(0)
    assert len(plan) == sampler.steps_per_epoch() == 7
    ir_batches = Counter()
    for batch in plan:
        assert batch.task == "joint" and batch.dataset == MIXED_DATASET
        for s in range(4):   # slice s = a*W + r: 5 IR items, then 4 STS items
            piece = batch.indices[s * 9:(s + 1) * 9]
            assert [task_of(sampler, i) for i in piece] == ["ir"] * 5 + ["sts"] * 4
        ir, sts = joint_parts(sampler, batch.indices)
        assert len({sampler.dataset_of(i) for i in ir}) == 1 and {sampler.dataset_of(i) for i in sts} == {2}
        assert len(ir) == 20 and len(sts) == 16 and len(set(batch.indices)) == 36
        ir_batches[sampler.dataset_of(ir[0])] += 1
    assert ir_batches == {0: 5, 1: 2}   # the larger task's batches once each; STS re-drawn to match
    ir_items = [i for batch in plan for i in joint_parts(sampler, batch.indices)[0]]
    assert len(ir_items) == len(set(ir_items))


def test_joint_on_two_ranks_is_one_process_on_the_concatenated_batches():
    one = make("joint", sizes=(100, 40), batch_sizes=(10, 8), world_size=1, seed=5)
    ranks = all_ranks(2, policy="joint", sizes=(100, 40), batch_sizes=(5, 4), seed=5)
    streams = [list(r) for r in ranks]
    for step, micro in enumerate(one):
        whole = joint_parts(one, [i for i, _ in micro])
        halves = [joint_parts(one, [i for i, _ in stream[step]]) for stream in streams]
        assert halves[0][0] + halves[1][0] == whole[0] and halves[0][1] + halves[1][1] == whole[1]
    assert len(one) == len(streams[0]) == 10


def test_joint_needs_both_tasks():
    with pytest.raises(InputError, match="joint steps need IR and STS"):
        make("joint", tasks=("ir", "ir"))


# ---------------------------------------------------------------- (10) configuration errors

def test_unknown_policy_lists_the_valid_ones():
    with pytest.raises(InputError) as error:
        make("random")
    assert "random" in str(error.value) and all(p in error.value.fix for p in POLICIES)


def test_sub_dataset_smaller_than_one_global_batch_is_named():
    with pytest.raises(InputError) as error:
        TaskBatchSampler([100, 30], ["ir", "sts"], [10, 8], world_size=2, accumulate=2, names=["msmarco", "stsb"])
    message = str(error.value)
    assert "stsb" in message and "30" in message and "32" in message and error.value.fix


def test_mixed_pool_smaller_than_one_global_batch_is_refused():
    with pytest.raises(InputError, match="mixed"):
        make("mixed", sizes=(5, 6), batch_sizes=(4, 4), world_size=2, accumulate=2)


@pytest.mark.parametrize("kwargs", [dict(tasks=("ir", "qa")), dict(batch_sizes=(0, 8)), dict(world_size=0),
                                    dict(world_size=2, rank=2), dict(accumulate=0), dict(sizes=(100,)),
                                    dict(temperature_alpha=float("nan"))])
def test_other_bad_configuration_raises_input_error(kwargs):
    with pytest.raises(InputError):
        make(**kwargs)


# ---------------------------------------------------------------- property test

@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_property_ranks_partition_steps_and_lengths_agree(data):
    count = data.draw(st.integers(1, 3))
    world_size, accumulate = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    batch_sizes = data.draw(st.lists(st.integers(1, 3), min_size=count, max_size=count))
    tasks = data.draw(st.lists(st.sampled_from(["ir", "sts"]), min_size=count, max_size=count))
    sizes = [data.draw(st.integers(b * world_size * accumulate, 4 * b * world_size * accumulate))
             for b in batch_sizes]
    policy = data.draw(st.sampled_from(POLICIES if set(tasks) == {"ir", "sts"} else
                                       [p for p in POLICIES if p != "joint"]))
    samplers = [TaskBatchSampler(sizes, tasks, batch_sizes, world_size=world_size, rank=r, accumulate=accumulate,
                                 policy=policy) for r in range(world_size)]
    plan = samplers[0].plan(0)
    assert len(plan) == samplers[0].steps_per_epoch()
    streams = [list(s) for s in samplers]
    assert all(len(stream) == len(s) == accumulate * len(plan) for stream, s in zip(streams, samplers))
    for step, batch in enumerate(plan):
        pieces = [i for stream in streams for mb in stream[step * accumulate:(step + 1) * accumulate] for i, _ in mb]
        assert sorted(pieces) == sorted(batch.indices)
        assert len(set(pieces)) == len(pieces)
    if policy in NO_REPEAT_POLICIES:
        items = list(itertools.chain.from_iterable(b.indices for b in plan))
        assert len(items) == len(set(items))
