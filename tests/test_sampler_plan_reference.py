"""The sampler's plans and resumed iterations, pinned to what the Python-list planner produced (commit 8558277).

The planner now keeps an epoch's plan in numpy arrays (a few bytes per item, `sampler.py`) instead of lists of
Python ints. The digests below were computed by the list planner with this file's own code, for every policy, with
three sub-datasets of two tasks, several devices, gradient accumulation, and both `drop_last` settings: the
global batches of two epochs (`plan`), every rank's micro-batches (`__iter__`), and the micro-batches after
`load_state_dict` of a position as checkpoints store it today (`{epoch, consumed, seed, policy}`).
"""

from __future__ import annotations

import hashlib

import pytest

from codiemb_pl.data.sampler import POLICIES, TaskBatchSampler

SIZES, TASKS, BATCH_SIZES = (1000, 333, 517), ("ir", "sts", "ir"), (4, 6, 3)
CASES = [(policy, drop_last) for policy in POLICIES for drop_last in (True, False)]
RESUMED_STATE = {"epoch": 1, "consumed": 7}

DIGESTS = {
    # (policy, drop_last): (plan digest, micro-batches digest, resumed digest), computed at commit 8558277
    ("proportional", True): ("d01570dbe8d5fee4", "72a2788ef7f8742a", "e983f464f7185e90"),
    ("proportional", False): ("e9fad68db7c8c4f1", "de8a1ffb3d4ea852", "800c4fd18ba4c89c"),
    ("balanced", True): ("49fb0e8a285f9433", "e8a1c2d77514060a", "fd8c38d22a106678"),
    ("balanced", False): ("2b6d9981e653ef8d", "22d5922b61bbeaab", "cf2a2c862443b009"),
    ("temperature", True): ("35d17fbdf5598930", "f8aecaf818694ba9", "ee4d84867f73ee4c"),
    ("temperature", False): ("6b58f5676a7a73ea", "1ff5767fd8d591a5", "6be445955b3fb1f3"),
    ("round_robin", True): ("9bf3936656b9d46d", "14feb76627d03035", "92050d5ca86f4443"),
    ("round_robin", False): ("d133261e5b2c9f63", "0bd4361a027c81b5", "09229cfa51f2a9fe"),
    ("sequential", True): ("7550a9ea6e2d7fbd", "4708775d0e12b825", "90c68c985be9b83a"),
    ("sequential", False): ("641c5b1d56599b64", "de1eed9f9892707f", "b972260c9b3cfe01"),
    ("mixed", True): ("2d5c4088a1b7b17b", "3466c61ee02ae8e9", "d31b46a59fe7a4c8"),
    ("mixed", False): ("33269018ec3ae40c", "212ca2d06203a7f1", "490f30719c75d0b9"),
    # joint: computed by the list planner at commit 780e248 (the policy was added after 8558277)
    ("joint", True): ("a52617ebe8ecbd7d", "0085e946cee30430", "c5471e615c67a5db"),
    ("joint", False): ("be95e67ab0536b9b", "24902a03bd646278", "58c8a96fe234d023"),
}


def digest(value) -> str:
    return hashlib.sha256(repr(value).encode()).hexdigest()[:16]


def samplers(policy: str, drop_last: bool) -> list[TaskBatchSampler]:
    return [TaskBatchSampler(list(SIZES), list(TASKS), list(BATCH_SIZES), world_size=2, rank=rank, accumulate=2,
                             policy=policy, seed=11, drop_last=drop_last) for rank in range(2)]


def observed(policy: str, drop_last: bool) -> tuple[str, str, str]:
    ranks = samplers(policy, drop_last)
    plans = [(b.dataset, b.task, b.indices) for epoch in (0, 1) for b in ranks[0].plan(epoch)]
    micro = [micro for sampler in ranks for epoch in (0, 1) for micro in (sampler.set_epoch(epoch) or list(sampler))]
    resumed = []
    for sampler in samplers(policy, drop_last):
        sampler.load_state_dict({**RESUMED_STATE, "seed": 11, "policy": policy})
        sampler.set_epoch(1)
        resumed.append(list(sampler))
    return digest(plans), digest(micro), digest(resumed)


@pytest.mark.parametrize("policy,drop_last", CASES)
def test_plans_and_resumed_positions_match_the_list_planner(policy, drop_last):
    assert observed(policy, drop_last) == DIGESTS[(policy, drop_last)]
