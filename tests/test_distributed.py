"""Two CPU processes (gloo) through the real CLI, CoDiEmbModule and TextEncoder on the tiny BERT.

- IR: the parameter gradients of one optimizer step under DDP (candidates gathered with gradient,
  each rank's loss over its local queries) equal a single process's on the concatenated batch, also when
  one rank's queries have no hard negatives and the other's do (the collectives must still match).
- The cross-device false-negative mask: a positive duplicated on the other rank is not a negative.
- A joint MGDA step (`data.policy joint`, `model.gradient_combination mgda`: one IR and one STS batch, each task's
  gradient reduced across ranks before the nonlinear combination) with STS `gather_sts` and Matryoshka widths
  (`model.matryoshka_dims`: the widths' predictions gathered once as one [b, k] matrix): the combined gradient equals
  the single process's on the concatenated batches (it would not if either task's gradient differed), and so do the
  gradient-conflict probe's measurements (`model.conflict_every`: each rank scores its slice of the probe batches).
  (IR with widths: the gradient cache's 2-rank test, `test_grad_cache.py`.)
- The sampler under DDP with accumulation and unequal sub-datasets: every micro-step of every optimizer
  step carries one task and sub-dataset on both ranks, and both ranks run the same number of steps. The same
  run trains task-routed LoRA (`model.lora.task_adapters`): no unused-parameter error, equal adapters on both
  ranks, each step moving the shared adapters and its task's only.

Each run of 2 ranks is one `python -m codiemb_pl fit ... --config configs/trainer/ddp_cpu.yaml` subprocess.
The module's 7 runs start together in the background, two at a time (`RunPool`); each test waits for its own.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from codiemb_pl.data.sampler import TaskBatchSampler
from ddp_driver.launch import RunPool, model_without_dropout, run_codiemb, write_jsonl

SEED = 42  # the datamodule's default seed: it fixes the order of the items in the global batch
GLOBAL_IR_BATCH = 8


def ir_records_for_two_ranks() -> list[dict]:
    """8 IR records laid out so that, in the one global batch of 8 (4 per rank), rank 0's queries have
    hard negatives (one of them a single one: a padded slot) and rank 1's have none, and the first
    query of each rank shares a positive text (a false negative across devices)."""
    order = TaskBatchSampler([GLOBAL_IR_BATCH], ["ir"], [GLOBAL_IR_BATCH // 2], world_size=2, seed=SEED).plan(0)[0].indices
    records: list[dict] = [{} for _ in range(GLOBAL_IR_BATCH)]
    for position, index in enumerate(order):
        record = {"query": f"question number {index} about topic {index * 7 % 5}",
                  "positives": [f"passage {index} answering the question", f"another passage {index} with the answer"]}
        if position < GLOBAL_IR_BATCH // 2:
            record["negatives"] = [f"unrelated text {index}"] if position == 1 else \
                [f"unrelated text {index}", f"off-topic sentence {index}"]
        records[index] = record
    shared = "the one passage both ranks have as a positive"
    records[order[0]]["positives"][0] = shared
    records[order[GLOBAL_IR_BATCH // 2]]["positives"][0] = shared
    return records


def gradient_args(out: Path, model: Path, world_size: int, train: str, extra: list[str]) -> list[str]:
    """Arguments of a 1-step float64 run that saves each rank's gradients into `out` (GradientRecorder)."""
    per_device = GLOBAL_IR_BATCH // world_size
    return ["--model.model_name_or_path", str(model), "--data.train", train,
            "--data.ir_batch_size", str(per_device), "--data.sts_batch_size", str(per_device),
            "--trainer.precision", "64-true",  # float64: summation order cannot blur the comparison
            "--trainer.callbacks+=ddp_driver.probes.GradientRecorder",
            f"--trainer.callbacks.out_dir={out}", *extra]


def load_gradients(out: Path, world_size: int, result) -> dict:
    assert result.returncode == 0, result.stdout[-4000:]
    return {rank: torch.load(out / f"grads_rank{rank}.pt") for rank in range(world_size)}


def gradient_run(out: Path, model: Path, world_size: int, train: str, extra: list[str]) -> dict:
    """Run now and return per-rank {"loss", "grads"}."""
    return load_gradients(out, world_size, run_codiemb(gradient_args(out, model, world_size, train, extra),
                                                       world_size=world_size))


def start_gradient_run(pool: RunPool, out: Path, model: Path, world_size: int, train: str, extra: list[str]):
    """`gradient_run` in the background: pass the returned handle to `gradients`."""
    return out, world_size, pool.submit(gradient_args(out, model, world_size, train, extra), world_size=world_size)


def gradients(run) -> dict:
    """Wait for a `start_gradient_run` run: per-rank {"loss", "grads"}."""
    out, world_size, future = run
    return load_gradients(out, world_size, future.result())


def assert_same_gradients(distributed: dict, single: dict) -> None:
    assert distributed[0]["grads"].keys() == single[0]["grads"].keys()
    assert len(single[0]["grads"]) > 30  # every encoder tensor, not a subset
    for name, grad in single[0]["grads"].items():
        for rank in (0, 1):
            torch.testing.assert_close(distributed[rank]["grads"][name], grad, rtol=1e-5, atol=1e-9,
                                       msg=lambda m: f"{name} (rank {rank}): {m}")
    mean_local_loss = (distributed[0]["loss"] + distributed[1]["loss"]) / 2
    assert mean_local_loss == pytest.approx(single[0]["loss"], rel=1e-5)


@pytest.fixture(scope="module")
def deterministic_model(tiny_model_dir, tmp_path_factory) -> Path:
    return model_without_dropout(tiny_model_dir, tmp_path_factory.mktemp("tiny_no_dropout") / "model")


PROBE_VAL = json.dumps([  # the probe batches: 8 items of each task (the global batch) in both world sizes
    {"name": "sts_dev", "task": "sts", "path": "pkg://codiemb_pl/demo/sts_dev.jsonl", "max_samples": 8},
    {"name": "ir_dev", "task": "ir", "path": "pkg://codiemb_pl/demo/ir_dev", "split": "dev", "max_samples": 8}])

SAMPLER_TRAIN = json.dumps([
    {"name": "ir_a", "task": "ir", "path": "pkg://codiemb_pl/demo/ir_train.jsonl", "max_samples": 40},
    {"name": "sts_b", "task": "sts", "path": "pkg://codiemb_pl/demo/sts_train.jsonl", "max_samples": 30},
    {"name": "sts_c", "task": "sts", "path": "pkg://codiemb_pl/demo/sts_train.jsonl", "max_samples": 17,
     "batch_size": 2, "seed": 1}])


# the sampler run also trains task-routed LoRA: every adapter set on every step, under DDP without
# find_unused_parameters, each step moving the shared set and its task's set only (`TaskAdapterSums`)
TASK_LORA = json.dumps({"r": 2, "alpha": 4.0, "dropout": 0.0, "task_adapters": True})


@pytest.fixture(scope="module")
def runs(request, deterministic_model, tiny_model_dir, tmp_path_factory):
    """The runs of this module's selected tests, started at once in a `RunPool`: {name: run} (tests wait
    for theirs). "ir": {(world_size, false_negative_mask): gradient run}, "joint": {world_size: gradient run},
    "sampler": (output folder, Future of the 2-rank BatchRecorder run).
    """
    selected = " ".join(item.name for item in request.session.items if item.module is request.module)
    folder = tmp_path_factory.mktemp("ddp_runs")
    ir_data = write_jsonl(folder / "ir.jsonl", ir_records_for_two_ranks())
    ir_train = json.dumps([{"name": "ir_grad", "task": "ir", "path": str(ir_data)}])
    joint_train = json.dumps([{"name": "ir_grad", "task": "ir", "path": str(ir_data)},
                              {"name": "sts_grad", "task": "sts", "path": "pkg://codiemb_pl/demo/sts_train.jsonl",
                               "max_samples": GLOBAL_IR_BATCH}])
    with RunPool() as pool:
        started = {"ir": {}, "joint": {}}
        if "ir_gradients" in selected or "false_negative_mask" in selected:
            for world_size, mask in ((1, False), (2, False), (1, True), (2, True)):
                started["ir"][world_size, mask] = start_gradient_run(
                    pool, folder / f"ir_w{world_size}_mask{mask}", deterministic_model, world_size, ir_train,
                    ["--data.n_positives", "2", "--data.n_negatives", "2",
                     "--model.false_negative_mask", str(mask).lower()])
        if "joint_mgda" in selected:
            for world_size in (1, 2):
                started["joint"][world_size] = start_gradient_run(
                    pool, folder / f"joint_w{world_size}", deterministic_model, world_size, joint_train,
                    ["--model.gather_sts", "true", "--model.matryoshka_dims", "[32, 16, 8]",
                     "--model.matryoshka_weights", "[1.0, 0.5, 0.25]", "--data.policy", "joint",
                     "--model.gradient_combination", "mgda", "--data.n_positives", "2", "--data.n_negatives", "2",
                     "--model.conflict_every", "1", "--data.val", PROBE_VAL])
        if "every_micro_step" in selected:
            sampler_out = folder / "sampler"
            started["sampler"] = sampler_out, pool.submit(
                ["--model.model_name_or_path", str(tiny_model_dir), "--data.train", SAMPLER_TRAIN,
                 "--data.ir_batch_size", "2", "--data.sts_batch_size", "3", "--data.n_negatives", "1",
                 "--trainer.accumulate_grad_batches", "2", "--trainer.max_steps", "-1",
                 "--trainer.max_epochs", "2", "--trainer.callbacks+=ddp_driver.probes.BatchRecorder",
                 f"--trainer.callbacks.out_dir={sampler_out}", "--model.lora", TASK_LORA,
                 "--trainer.callbacks+=ddp_driver.probes.TaskAdapterSums",
                 f"--trainer.callbacks.out_dir={sampler_out}"], world_size=2)
        yield started


@pytest.fixture(scope="module")
def ir_runs(runs) -> dict:
    """IR gradient runs: {(world_size, false_negative_mask): per-rank {"loss", "grads"}}."""
    return {key: gradients(run) for key, run in runs["ir"].items()}


def test_ir_gradients_with_cross_device_negatives_equal_single_process(ir_runs):
    assert_same_gradients(ir_runs[2, False], ir_runs[1, False])


def test_false_negative_mask_drops_a_duplicate_positive_held_by_the_other_rank(ir_runs):
    # under DDP the duplicate lives on the other rank; matching the single process (where the mask sees
    # both copies in one batch) means the gathered text ids removed it from the denominators
    assert_same_gradients(ir_runs[2, True], ir_runs[1, True])
    # and the data really has a live false negative: masking it lowers the loss
    assert ir_runs[1, True][0]["loss"] < ir_runs[1, False][0]["loss"] - 1e-3


def test_joint_mgda_step_with_gathered_sts_and_the_conflict_probe_equal_single_process(runs):
    joint = {world_size: gradients(run) for world_size, run in runs["joint"].items()}
    assert_same_gradients(joint[2], joint[1])
    [(step, single)] = joint[1][0]["conflict"]
    assert step == 0 and single["conflict/cosine"] != 0.0
    for rank in (0, 1):
        [(_, distributed)] = joint[2][rank]["conflict"]
        assert distributed.keys() == single.keys()
        for key, value in single.items():
            assert distributed[key] == pytest.approx(value, rel=1e-6, abs=1e-12), key


def test_every_micro_step_of_a_step_has_one_task_on_both_ranks_with_unequal_datasets(runs):
    out, future = runs["sampler"]
    result = future.result()
    assert result.returncode == 0, result.stdout[-4000:]
    recorded = [json.loads((out / f"batches_rank{rank}.json").read_text()) for rank in (0, 1)]

    # per epoch: ir_a 40 // (2*2*2) = 5 steps, sts_b 30 // (3*2*2) = 2, sts_c 17 // (2*2*2) = 2 -> 9; 2 epochs
    expected_steps = 18
    for run in recorded:
        assert run["world_size"] == 2 and run["accumulate"] == 2 and run["global_step"] == expected_steps
        assert len(run["rows"]) == expected_steps * 2
    assert recorded[0]["rows"] == recorded[1]["rows"]  # same step, micro-step, task, dataset and size on both ranks
    per_step: dict[int, list] = {}
    for step, micro, task, dataset, size in recorded[0]["rows"]:
        per_step.setdefault(step, []).append((micro, task, dataset, size))
    assert sorted(per_step) == list(range(expected_steps))
    for step, micro_batches in per_step.items():
        assert [m[0] for m in micro_batches] == [0, 1]
        assert len({m[1:] for m in micro_batches}) == 1, f"step {step} mixes {micro_batches}"
    steps_per_dataset = {name: sum(1 for m in per_step.values() if m[0][2] == name) for name in ("ir_a", "sts_b", "sts_c")}
    assert steps_per_dataset == {"ir_a": 10, "sts_b": 4, "sts_c": 4}
    sizes = {m[0][2]: m[0][3] for m in per_step.values()}
    assert sizes == {"ir_a": 2, "sts_b": 3, "sts_c": 2}

    # the start-of-fit report states the effective global batch and the negatives each query sees
    assert "ir_a (ir): 2 per device x 2 devices x 2 accumulation = global batch 8" in result.stdout
    assert "sts_c (sts): 2 per device x 2 devices x 2 accumulation = global batch 8" in result.stdout
    assert "scored against 7 negatives per positive slot (4 queries" in result.stdout  # 2x2 queries x (1+1) - 1

    # task-routed LoRA under DDP: both ranks hold the same adapters; a step moves the shared set and its task's only
    adapters = [json.loads((out / f"adapters_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert adapters[0] == adapters[1] and len(adapters[0]) == expected_steps + 1
    for (step, task, before), (_, _, after) in zip(adapters[0], adapters[0][1:]):
        other = "sts" if task == "ir" else "ir"
        assert task == per_step[step][0][1] and after[other] == before[other], f"step {step} ({task}) moved {other}"
        assert after[task] != before[task] and after["shared"] != before["shared"]
