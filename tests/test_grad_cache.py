"""Gradient cache (`grad_cache.py`, `model.grad_cache_chunk_size`): the parameter gradients equal plain autograd's.

With dropout ON the reference is plain autograd through the same chunked encoder calls drawing the same
masks (seeded identically), so only the cache's replay can make them differ; with dropout OFF the reference
is the module's own path without the cache (whole groups, no chunks). Float64 tiny BERT, rtol 1e-5; each case
also with Matryoshka widths (`model.matryoshka_dims`). Also:
2 gloo ranks with cross-device negatives and Matryoshka widths against one process on the whole batch, and exact
resume.
"""

from __future__ import annotations

import json

import pytest
import torch

from codiemb_pl.training.grad_cache import RandomState, chunk_features
from codiemb_pl.losses.objectives import text_group_sizes
from codiemb_pl.training.module import CoDiEmbModule
from ddp_driver.launch import RunPool, model_without_dropout, run_codiemb

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")]

CHUNK = 3
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


def texts(count: int, seed: int) -> list[str]:
    rng = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (2 + int(n),), generator=rng))
            for n in torch.randint(9, (count,), generator=rng)]


def ir_batch(module: CoDiEmbModule, size: int = 4, positives: int = 2, negatives: int = 4) -> dict:
    tokenize = module.encoder.tokenize
    mask = torch.ones(size, negatives, dtype=torch.bool)
    mask[0, 2:] = False  # padding slots
    mask[3, negatives - 1] = False
    positive_ids = torch.arange(size * positives).view(size, positives)
    positive_ids[1, 0] = positive_ids[2, 1]  # one shared positive: a false negative to mask
    negative_ids = 100 + torch.arange(size * negatives).view(size, negatives)
    negative_ids[0, 1] = positive_ids[3, 0]  # a negative that is another query's positive
    return {"task": "ir", "dataset": "d", "query": tokenize(texts(size, 1)),
            "positives": tokenize(texts(size * positives, 2)), "negatives": tokenize(texts(size * negatives, 3)),
            "negative_mask": mask, "positive_ids": positive_ids, "negative_ids": negative_ids}


def sts_batch(module: CoDiEmbModule, size: int = 7) -> dict:
    scores = torch.tensor([0.9, 0.1, 0.85, 0.4, 0.95, 0.6, 0.2][:size], dtype=torch.float64)
    return {"task": "sts", "dataset": "s", "text1": module.encoder.tokenize(texts(size, 4)),
            "text2": module.encoder.tokenize(texts(size, 5)), "scores": scores}


def make_module(model_dir, chunk: int, **settings) -> CoDiEmbModule:
    module = CoDiEmbModule(str(model_dir), ir_temperature=0.05, grad_cache_chunk_size=chunk, **settings).double()
    module.train()
    return module


def parameter_grads(module: CoDiEmbModule, loss_of_module, seed: int = 11, scale: float = 1.0) -> dict:
    module.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    (loss_of_module(module) * scale).backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    assert len(grads) > 20
    return grads


def chunked_autograd_loss(module: CoDiEmbModule, batch: dict) -> torch.Tensor:
    """Plain autograd through the same chunked encoder calls (same dropout draws) as the cache's first pass."""
    objective = module.objectives[batch["task"]]
    embeddings = {}
    for name, features in objective.text_groups(batch).items():
        parts = [module.embed(part, return_middle=objective.wants_middle) for part in chunk_features(features, CHUNK)]
        if objective.wants_middle:
            embeddings[name] = tuple(torch.cat([p[i] for p in parts]) for i in range(2))
        else:
            embeddings[name] = torch.cat(parts)
    return objective.score(embeddings, batch)[0]


def assert_same(cached: dict, reference: dict) -> None:
    assert cached.keys() == reference.keys()
    for name, grad in reference.items():
        torch.testing.assert_close(cached[name], grad, rtol=1e-5, atol=1e-10, msg=lambda m: f"{name}: {m}")


CASES = {
    "ir": ({"false_negative_mask": True}, ir_batch),
    "sts_codiemb": ({}, sts_batch),
    "sts_cosent": ({"sts_objective": "cosent"}, sts_batch),
    "sts_infonce": ({"sts_objective": "infonce"}, sts_batch),
    # Matryoshka: the cached gradient of each embedding is the weighted sum over the prefixes' losses
    "ir_matryoshka": ({"false_negative_mask": True, "matryoshka_dims": [32, 16, 8],
                       "matryoshka_weights": [1.0, 0.5, 0.25]}, ir_batch),
    "sts_codiemb_matryoshka": ({"matryoshka_dims": [8, 32]}, sts_batch),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_cached_gradients_equal_autograd_with_dropout_on(tiny_model_dir, case):
    settings, make_batch = CASES[case]
    module = make_module(tiny_model_dir, CHUNK, **settings)
    batch = make_batch(module)
    cached = parameter_grads(module, lambda m: m.training_step(batch, 0), scale=0.5)  # 0.5: accumulation's 1/k
    reference = parameter_grads(module, lambda m: chunked_autograd_loss(m, batch), scale=0.5)
    assert_same(cached, reference)


def test_the_distributed_replay_path_gives_the_same_gradients(tiny_model_dir, monkeypatch):
    """Under torch.distributed the chunks' gradients are summed in one buffer and handed to autograd once."""
    from codiemb_pl.training import grad_cache

    module = make_module(tiny_model_dir, CHUNK, false_negative_mask=True)
    batch = ir_batch(module)
    reference = parameter_grads(module, lambda m: chunked_autograd_loss(m, batch), scale=0.5)
    monkeypatch.setattr(grad_cache, "backward_into_grad", lambda: False)
    assert_same(parameter_grads(module, lambda m: m.training_step(batch, 0), scale=0.5), reference)


def test_without_the_replayed_rng_the_gradients_differ(tiny_model_dir, monkeypatch):
    """The check above can fail: replaying chunks with fresh dropout masks gives other gradients."""
    module = make_module(tiny_model_dir, CHUNK)
    batch = ir_batch(module)
    reference = parameter_grads(module, lambda m: chunked_autograd_loss(m, batch))
    monkeypatch.setattr(RandomState, "restore", lambda self: None)
    cached = parameter_grads(module, lambda m: m.training_step(batch, 0))
    with pytest.raises(AssertionError):
        assert_same(cached, reference)


@pytest.mark.parametrize("case", sorted(CASES))
def test_cached_gradients_equal_the_uncached_module_without_dropout(tiny_model_dir, tmp_path, case):
    model = model_without_dropout(tiny_model_dir, tmp_path / "model")
    settings, make_batch = CASES[case]
    cached_module, plain_module = make_module(model, CHUNK, **settings), make_module(model, 0, **settings)
    batch = make_batch(plain_module)
    assert_same(parameter_grads(cached_module, lambda m: m.training_step(batch, 0)),
                parameter_grads(plain_module, lambda m: m.training_step(batch, 0)))


def test_mixed_batches_and_length_buckets(tiny_model_dir):
    module = make_module(tiny_model_dir, CHUNK, length_buckets=2)
    batch = {"task": "mixed", "ir": ir_batch(module, negatives=2), "sts": sts_batch(module)}
    cached = parameter_grads(module, lambda m: m.training_step(batch, 0))
    reference = parameter_grads(module, lambda m: chunked_autograd_loss(m, batch["ir"])
                                + chunked_autograd_loss(m, batch["sts"]))
    assert_same(cached, reference)


def test_gradient_checkpointing_with_the_cache(tiny_model_dir):
    module = make_module(tiny_model_dir, CHUNK, gradient_checkpointing=True)
    batch = ir_batch(module)
    assert_same(parameter_grads(module, lambda m: m.training_step(batch, 0)),
                parameter_grads(module, lambda m: chunked_autograd_loss(m, batch)))


def test_bf16_autocast_is_replayed(tiny_model_dir):
    """Under autocast the replay computes in bf16 like the first pass (the trainer calls backward outside it)."""
    module = CoDiEmbModule(str(tiny_model_dir), ir_temperature=0.05, grad_cache_chunk_size=CHUNK)
    module.train()
    batch = ir_batch(module)
    embed, autocast_in_calls = module.embed, []

    def recording_embed(features, return_middle=False):
        autocast_in_calls.append(torch.is_autocast_enabled("cpu"))
        return embed(features, return_middle=return_middle)

    def under_autocast(step):
        def run(m):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return step(m)
        return run

    module.embed = recording_embed
    cached = parameter_grads(module, under_autocast(lambda m: m.training_step(batch, 0)))
    chunks = sum(-(-size // CHUNK) for size in text_group_sizes("ir", 4, 2, 4))
    assert autocast_in_calls == [True] * (2 * chunks)  # first pass and replay
    reference = parameter_grads(module, under_autocast(lambda m: chunked_autograd_loss(m, batch)))
    # bf16 rounding (autograd sums the chunks' gradients of one cached bf16 weight copy in bf16, the cache in
    # float32): compare the gradient as a whole; key biases are left out (their true gradient is 0: softmax shift)
    names = [name for name in reference if "key.bias" not in name]
    error = torch.stack([(cached[name] - reference[name]).norm() for name in names]).norm()
    assert error / torch.stack([reference[name].norm() for name in names]).norm() < 1e-2


def test_rng_stream_after_the_step_is_where_the_first_pass_left_it(tiny_model_dir):
    module = make_module(tiny_model_dir, CHUNK)
    batch = ir_batch(module)
    torch.manual_seed(3)
    with torch.no_grad():
        chunked_autograd_loss(module, batch)
    expected = torch.rand(4)
    torch.manual_seed(3)
    module.training_step(batch, 0).backward()
    assert torch.equal(torch.rand(4), expected)


def test_negative_chunk_size_is_one_clear_error(tiny_model_dir):
    from codiemb_pl.errors import InputError

    with pytest.raises(InputError, match="grad_cache_chunk_size"):
        CoDiEmbModule(str(tiny_model_dir), grad_cache_chunk_size=-1)


def test_text_group_sizes():
    assert text_group_sizes("ir", 4, 2, 4) == [4, 8, 16] and text_group_sizes("ir", 4, 1, 0) == [4, 4]
    assert text_group_sizes("sts", 5) == [5, 5]


# -- through the real CLI: 2 gloo ranks, resume ---------------------------------------------------------------
def test_ddp_cached_gradients_with_cross_device_negatives_equal_one_process(tiny_model_dir, tmp_path):
    from test_distributed import assert_same_gradients, gradients, ir_records_for_two_ranks, start_gradient_run

    model = model_without_dropout(tiny_model_dir, tmp_path / "model")
    data = tmp_path / "ir.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ir_records_for_two_ranks()))
    train = json.dumps([{"name": "ir_grad", "task": "ir", "path": str(data)}])
    common = ["--data.n_positives", "2", "--data.n_negatives", "2", "--model.false_negative_mask", "true",
              "--model.matryoshka_dims", "[32, 16, 8]"]   # widths: candidates gathered once at full width, sliced
    with RunPool() as pool:  # the two runs are independent: overlap them
        cached = start_gradient_run(pool, tmp_path / "w2", model, 2, train,
                                    common + ["--model.grad_cache_chunk_size", "3"])
        single = start_gradient_run(pool, tmp_path / "w1", model, 1, train, common)
        assert_same_gradients(gradients(cached), gradients(single))


def test_resume_with_the_cache_is_exact(tiny_model_dir, tmp_path):
    from test_resume import INTERRUPT_AT, TOTAL_STEPS, final_weights, training_args

    cache = ["--model.grad_cache_chunk_size", "3"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    with RunPool() as pool:  # the uninterrupted run beside the interrupt-then-resume chain
        straight_run = pool.submit(training_args(tiny_model_dir, 8, straight) + cache)
        interrupted = run_codiemb(training_args(tiny_model_dir, 8, resumed) + cache
                                  + ["--trainer.callbacks+=ddp_driver.probes.Interrupt",
                                     f"--trainer.callbacks.at_step={INTERRUPT_AT}"])
        assert interrupted.returncode == 3, interrupted.stdout[-4000:]
        result = run_codiemb(training_args(tiny_model_dir, 8, resumed) + cache + ["--ckpt_path", "last"])
        assert result.returncode == 0, result.stdout[-4000:]
        result = straight_run.result()
        assert result.returncode == 0, result.stdout[-4000:]
        assert "gradient cache: chunks of 3 texts" in result.stdout
    (step_a, weights_a), (step_b, weights_b) = final_weights(straight), final_weights(resumed)
    assert step_a == step_b == TOTAL_STEPS
    assert [name for name in weights_a if not torch.equal(weights_a[name], weights_b[name])] == []
