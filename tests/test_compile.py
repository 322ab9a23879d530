"""`model.compile` (`model/compiling.py`): the backbone compiled in place gives the eager step's gradients with the
gradient cache and LoRA, keeps the state dict's names, falls back to eager with one warning when compiling fails,
and an unknown backend is one clear error. Cheap: dynamo's tracing with the `eager` backend (no
inductor code generation, which takes minutes on 2 cores; the benchmark exercises inductor).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from codiemb_pl.errors import InputError
from codiemb_pl.model.compiling import is_compiled
from codiemb_pl.model.lora import LoraSettings
from codiemb_pl.training.module import CoDiEmbModule
from ddp_driver.launch import model_without_dropout
from test_grad_cache import texts

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")]

LORA = LoraSettings(r=2, alpha=4.0, dropout=0.0, target_modules="all-linear")
BROKEN = "codiemb_test_broken_backend"
BACKWARD_BROKEN = "codiemb_test_backward_broken_backend"


@pytest.fixture(scope="module")
def still_bert(tiny_model_dir, tmp_path_factory):
    return model_without_dropout(tiny_model_dir, tmp_path_factory.mktemp("compile") / "bert")


def small_ir_batch(module: CoDiEmbModule) -> dict:
    """2 queries, 1 positive and 2 hard negatives each: few chunk shapes, so few traces."""
    tokenize = module.encoder.tokenize
    return {"task": "ir", "dataset": "d", "query": tokenize(texts(2, 1)), "positives": tokenize(texts(2, 2)),
            "negatives": tokenize(texts(4, 3)), "negative_mask": torch.ones(2, 2, dtype=torch.bool),
            "positive_ids": torch.arange(2).view(2, 1), "negative_ids": 10 + torch.arange(4).view(2, 2)}


def uniform_ir_batch(module: CoDiEmbModule) -> dict:
    """2 queries, 1 positive and 1 hard negative each, every text 4 one-token words: every forward (and gradient-cache
    chunk of 2) has one shape, so one graph is traced per grad mode."""
    tokenize = module.encoder.tokenize
    groups = [tokenize(["red cat sat down", "blue dog ran off"]), tokenize(["a red cat sat", "the blue dog ran"]),
              tokenize(["green trees grow tall", "old ships sail far"])]
    assert len({features["input_ids"].shape for features in groups}) == 1
    return {"task": "ir", "dataset": "d", "query": groups[0], "positives": groups[1], "negatives": groups[2],
            "negative_mask": torch.ones(2, 1, dtype=torch.bool), "positive_ids": torch.arange(2).view(2, 1),
            "negative_ids": 10 + torch.arange(2).view(2, 1)}


@pytest.fixture(scope="module")
def broken_backend():
    """A torch.compile backend that always fails, as a backbone with an untraceable operator would."""
    import torch._dynamo

    if BROKEN not in torch._dynamo.list_backends(exclude_tags=()):
        @torch._dynamo.register_backend(name=BROKEN)
        def broken(graph_module, example_inputs):
            raise RuntimeError("no kernels for this operator")
    yield BROKEN
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def backward_broken_backend():
    """A backend whose forward graphs compile (they run as traced) and whose backward graphs fail, as inductor failing
    on a backward kernel: AOT autograd hands it the backward graph lazily, at the first `backward()`, by default."""
    import torch._dynamo
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.backends.debugging import boxed_nop

    def no_backward(graph_module, example_inputs):
        raise RuntimeError("no kernels for this backward")

    if BACKWARD_BROKEN not in torch._dynamo.list_backends(exclude_tags=()):
        torch._dynamo.register_backend(aot_autograd(fw_compiler=boxed_nop, bw_compiler=no_backward),
                                       name=BACKWARD_BROKEN)
    yield BACKWARD_BROKEN
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_lora_step_with_grad_cache_equals_the_eager_step(still_bert):
    settings = dict(ir_temperature=0.05, lora=LORA, grad_cache_chunk_size=4, padding_free=True)
    eager = CoDiEmbModule(str(still_bert), **settings).train()
    compiled = CoDiEmbModule(str(still_bert), compile="eager", **settings).train()
    compiled.load_state_dict(eager.state_dict())            # the same (random) adapter initialisation
    assert is_compiled(compiled.encoder.model) and not is_compiled(eager.encoder.model)
    assert compiled.state_dict().keys() == eager.state_dict().keys()      # names unchanged: checkpoints compatible
    batch = small_ir_batch(eager)
    eager.zero_grad(set_to_none=True)
    eager.training_step(batch, 0).backward()
    compiled.zero_grad(set_to_none=True)
    compiled.training_step(batch, 0).backward()
    expected = {n: p.grad for n, p in eager.named_parameters() if p.grad is not None}
    got = {n: p.grad for n, p in compiled.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys() and all("lora_" in name for name in got)
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    torch._dynamo.reset()


def test_a_backbone_that_does_not_compile_runs_eager_after_one_warning(still_bert, broken_backend):
    eager = CoDiEmbModule(str(still_bert))
    module = CoDiEmbModule(str(still_bert), compile=broken_backend)
    features = eager.encoder.tokenize(["a short text", "a somewhat longer text about compiling"])
    with pytest.warns(UserWarning, match=r"model.compile: bert did not compile .*running it eager"):
        first = module.encoder(features)
    assert not is_compiled(module.encoder.model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = module.encoder(features)
    torch.testing.assert_close(first, eager.encoder(features), rtol=0, atol=1e-6)
    torch.testing.assert_close(second, first, rtol=0, atol=0)


def test_an_unknown_backend_is_one_clear_error(still_bert):
    with pytest.raises(InputError, match="model.compile: unknown torch.compile backend 'warp_drive'"):
        CoDiEmbModule(str(still_bert), compile="warp_drive")


@pytest.mark.parametrize("settings", [{}, {"grad_cache_chunk_size": 2}], ids=["loss_backward", "grad_cache_replay"])
def test_a_backward_that_does_not_compile_runs_eager_after_one_warning(still_bert, backward_broken_backend, settings):
    """The backward graph is compiled with its forward (`call_compiled`), so its failure falls back before any
    gradient exists: the step's loss and gradients are the eager step's, whether the backward starts at the loss (as
    in automatic optimisation and the joint manual step's `manual_backward`) or inside the gradient cache's replay."""
    eager = CoDiEmbModule(str(still_bert), ir_temperature=0.05, **settings).train()
    module = CoDiEmbModule(str(still_bert), ir_temperature=0.05, compile=backward_broken_backend, **settings).train()
    module.load_state_dict(eager.state_dict())
    batch = uniform_ir_batch(eager)
    with pytest.warns(UserWarning, match=r"model.compile: bert did not compile \(RuntimeError: no kernels for this "
                                         r"backward\); running it eager"):
        loss = module.training_step(batch, 0)
        loss.backward()
    assert not is_compiled(module.encoder.model)
    expected_loss = eager.training_step(batch, 0)
    expected_loss.backward()
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=1e-6)
    expected = {n: p.grad for n, p in eager.named_parameters() if p.grad is not None}
    got = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys() and expected
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")
