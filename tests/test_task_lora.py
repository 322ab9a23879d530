"""Task-routed LoRA (`model.lora.task_adapters`): routing, adapters-only checkpoints, the fused export, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from codiemb_pl.cli.main import main
from codiemb_pl.errors import InputError
from codiemb_pl.model.encoder import TextEncoder
from codiemb_pl.model.lora import LoraSettings, check_lora_settings, merged_weights, task_specialist_weights
from codiemb_pl.model.task_lora import ADAPTER_NAMES, adapter_of_parameter
from codiemb_pl.training.module import CoDiEmbModule
from test_lora import randomise_adapters  # B starts at zero: values, so that every adapter set has an effect

TEXTS = ["a short one", "a somewhat longer sentence about retrieval", "mid length text"]
TINY_CONFIG = Path(__file__).parent / "conf" / "tiny.yaml"
TASK_LORA = {"r": 2, "alpha": 4.0, "dropout": 0.0, "target_modules": "all-linear", "task_adapters": True}
SCALE = TASK_LORA["alpha"] / TASK_LORA["r"]


def task_module(model_dir: Path, **settings) -> CoDiEmbModule:
    return CoDiEmbModule(str(model_dir), lora=LoraSettings(**{**TASK_LORA, **settings}))


def deltas_by_hand(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, dict[str, torch.Tensor]]:
    """{adapter set: {base key: s·B·A}} from peft names (`<prefix>base_model.model.<path>.lora_A.<set>.weight`)."""
    deltas: dict[str, dict[str, torch.Tensor]] = {name: {} for name in ADAPTER_NAMES}
    for key, a in state.items():
        if ".lora_A." in key:
            path, rest = key[len(prefix) + len("base_model.model."):].split(".lora_A.")
            deltas[rest.split(".")[0]][f"{path}.weight"] = SCALE * state[key.replace(".lora_A.", ".lora_B.")] @ a
    return deltas


def delta_guided_by_hand(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise delta-guided fusion, gamma 1: Σ_k |D_k|·D_k / Σ_k |D_k| (0 where both are 0)."""
    total = a.abs() + b.abs()
    return torch.where(total > 0, (a.abs() * a + b.abs() * b) / total.clamp_min(1e-30), torch.zeros_like(a))


def test_invalid_task_lora_settings_give_one_clear_line(tiny_model_dir):
    with pytest.raises(InputError, match="model.lora.task_fusion.*task_adapters is false") as error:
        check_lora_settings(LoraSettings(task_fusion="ties"))
    assert "\n" not in str(error.value)
    with pytest.raises(InputError, match=r"model.lora.task_fusion: unknown merge method 'delta_guidd'.*delta_guided"):
        task_module(tiny_model_dir, task_fusion="delta_guidd")
    with pytest.raises(InputError, match="model.lora.task_fusion: greedy_soup ranks members by validation scores"):
        task_module(tiny_model_dir, task_fusion="greedy_soup")
    from codiemb_pl.training.task_routing import check_routing_with_checkpointing

    for policy in ("mixed", "joint"):   # both tasks embedded before one backward: recomputed under the wrong gates
        with pytest.raises(InputError, match=f"model.gradient_checkpointing: with task-routed LoRA and data.policy: "
                                             f"{policy}"):
            check_routing_with_checkpointing(True, policy, automatic_optimization=True)
    check_routing_with_checkpointing(True, "joint", automatic_optimization=False)   # pcgrad / mgda: one task a backward
    check_routing_with_checkpointing(True, "proportional")
    check_routing_with_checkpointing(False, "mixed")


def test_a_batch_trains_the_shared_adapters_and_its_own_tasks_only(tiny_model_dir):
    module = task_module(tiny_model_dir)
    randomise_adapters(module)
    plain = TextEncoder(str(tiny_model_dir))
    features = module.encoder.tokenize(TEXTS)
    outputs = {}
    for task, other in (("ir", "sts"), ("sts", "ir")):
        module.zero_grad(set_to_none=True)
        module.task_router.route(task)
        output = module.embed(features)
        output.pow(2).sum().backward()
        grads = {name: p.grad for name, p in module.named_parameters() if p.requires_grad}
        assert all(adapter_of_parameter(name) in ADAPTER_NAMES for name in grads)
        for name, grad in grads.items():   # every adapter is in the graph; the other task's gradients are 0
            assert grad is not None, name
            assert bool(torch.any(grad)) == (adapter_of_parameter(name) != other), name
        # the routed model computes base + shared + this task's deltas
        plain.model.load_state_dict(task_specialist_weights(module.encoder.model)[task])
        plain.eval()
        module.encoder.eval()
        with torch.no_grad():
            outputs[task] = module.embed(features)
            assert torch.allclose(outputs[task], plain(features), atol=1e-5)
        module.encoder.train()
        # before the optimizer step the other task's (zero) gradients are dropped: AdamW leaves that set alone
        module.task_router.before_optimizer_step(module.named_parameters(), module.device)
        assert all((p.grad is None) == (adapter_of_parameter(n) == other) for n, p in module.named_parameters()
                   if p.requires_grad)
        other_before = {n: p.detach().clone() for n, p in module.named_parameters() if adapter_of_parameter(n) == other}
        optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
        optimizer.step()
        assert all(torch.equal(p, other_before[n]) for n, p in module.named_parameters() if n in other_before)
    assert not torch.allclose(outputs["ir"], outputs["sts"], atol=1e-4)


def test_any_fusion_method_merges_the_task_deltas_over_base_plus_shared(tiny_model_dir):
    module = task_module(tiny_model_dir, task_fusion={"method": "task_arithmetic", "params": {"scale": 0.5}})
    randomise_adapters(module, seed=3)
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    deltas = deltas_by_hand(dict(module.encoder.model.state_dict()))
    _, merged = merged_weights(module.encoder.model)
    assert merged.keys() == base.keys()
    adapted = set(deltas["shared"])
    assert adapted and adapted == set(deltas["ir"]) == set(deltas["sts"])
    for key, value in base.items():
        expected = value if key not in adapted else \
            value + deltas["shared"][key] + 0.5 * (deltas["ir"][key] + deltas["sts"][key])
        torch.testing.assert_close(merged[key], expected, rtol=0, atol=1e-6, msg=key)


# -- one fit: checkpoints, routing in training_step, the export and the specialists ------------------------

def fit_args(model_dir: Path, root: Path, *extra: str) -> list[str]:
    """6 steps of batches of 2 with adapter dropout 0.1, a checkpoint after every step in `<root>/steps`."""
    every_step = ('{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"dirpath": "'
                  f'{root}/steps", "every_n_train_steps": 1, "save_top_k": -1}}}}')
    return ["fit", "--config", str(TINY_CONFIG), "--model.model_name_or_path", str(model_dir),
            "--trainer.default_root_dir", str(root), "--model.lr", "1e-2", "--trainer.max_steps", "6",
            "--model.lora", json.dumps({**TASK_LORA, "dropout": 0.1}), "--data.ir_batch_size", "2",
            "--data.sts_batch_size", "2", "--trainer.callbacks+", every_step, *extra]


@pytest.fixture(scope="module")
def task_lora_run(tiny_model_dir, tmp_path_factory, one_torch_thread) -> Path:
    root = tmp_path_factory.mktemp("task_lora_run")
    # with the gradient-conflict probe on: its IR and STS gradients (under each task's gates) are no training use
    code = main(fit_args(tiny_model_dir, root, "--model.conflict_every", "2",
                         "--trainer.callbacks+=ddp_driver.probes.TaskAdapterSums",
                         f"--trainer.callbacks.out_dir={root / 'probe'}",
                         "--trainer.callbacks+=codiemb_pl.callbacks.ExportEncoder",
                         "--trainer.callbacks.dirpath", str(root / "model"),
                         "--trainer.callbacks.specialists_dirpath", str(root / "specialists")))
    assert code == 0
    return root


def test_each_training_step_moves_the_shared_adapters_and_its_tasks_only(task_lora_run):
    rows = json.loads((task_lora_run / "probe" / "adapters_rank0.json").read_text())
    assert [row[0] for row in rows] == list(range(len(rows))) and len(rows) == 7
    tasks = {row[1] for row in rows[:-1]}
    assert tasks == {"ir", "sts"}, tasks   # both tasks trained (the 6-step sampler order of seed 7)
    for (_, task, before), (_, _, after) in zip(rows, rows[1:]):
        other = "sts" if task == "ir" else "ir"
        assert after[other] == before[other], f"a {task} step moved the {other} adapters"
        assert after[task] != before[task] and after["shared"] != before["shared"]


def test_task_lora_checkpoint_holds_every_adapter_set_and_nothing_else(task_lora_run, tiny_model_dir):
    state = torch.load(task_lora_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    keys = list(state["state_dict"])
    assert keys and all(adapter_of_parameter(key) in ADAPTER_NAMES for key in keys)
    per_set = {name: sum(adapter_of_parameter(key) == name for key in keys) for name in ADAPTER_NAMES}
    # the tiny BERT's adapted linears: 2 blocks x (q, k, v, attention out, intermediate, output) x (A, B)
    assert per_set == {name: 2 * 6 * 2 for name in ADAPTER_NAMES}
    from codiemb_pl.fusion.sources import read_lightning_checkpoint

    with pytest.raises(InputError, match="task-routed LoRA checkpoint"):
        read_lightning_checkpoint(task_lora_run / "checkpoints" / "last.ckpt")


def test_export_is_base_plus_shared_plus_fused_task_deltas_and_loads_in_sentence_transformers(task_lora_run,
                                                                                              tiny_model_dir):
    from sentence_transformers import SentenceTransformer

    # no validation within the 6 steps, so no best checkpoint: the export holds the final weights, last.ckpt's
    assert [p.name for p in (task_lora_run / "checkpoints").glob("*.ckpt")] == ["last.ckpt"]
    checkpoint = torch.load(task_lora_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 6
    state = checkpoint["state_dict"]
    deltas = deltas_by_hand(state, prefix="encoder.model.")
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    exported = load_file(str(task_lora_run / "model" / "model.safetensors"))
    assert exported.keys() == base.keys()
    assert any(torch.any(delta != 0) for delta in deltas["ir"].values())   # the task adapters did train
    expected = {}
    for key, value in base.items():
        expected[key] = value if key not in deltas["shared"] else value + deltas["shared"][key] + \
            delta_guided_by_hand(deltas["ir"][key], deltas["sts"][key])
        torch.testing.assert_close(exported[key], expected[key], rtol=0, atol=1e-5, msg=key)
    for task in ("ir", "sts"):   # the specialists: base + shared + the task's deltas
        specialist = load_file(str(task_lora_run / "specialists" / task / "model.safetensors"))
        for key in deltas[task]:
            torch.testing.assert_close(specialist[key], base[key] + deltas["shared"][key] + deltas[task][key],
                                       rtol=0, atol=1e-5, msg=key)
    merged = TextEncoder(str(tiny_model_dir))
    merged.model.load_state_dict(expected)
    model = SentenceTransformer(str(task_lora_run / "model"), device="cpu")
    assert torch.allclose(model.encode(TEXTS, convert_to_tensor=True), merged.encode(TEXTS), atol=1e-5)


def test_resumed_task_lora_run_ends_with_the_uninterrupted_adapters(task_lora_run, tiny_model_dir, tmp_path):
    middle = next((task_lora_run / "steps").glob("*step=3.ckpt"))
    assert main(fit_args(tiny_model_dir, tmp_path, "--ckpt_path", str(middle))) == 0
    a = torch.load(next((task_lora_run / "steps").glob("*step=6.ckpt")), map_location="cpu", weights_only=False)
    b = torch.load(next((tmp_path / "steps").glob("*step=6.ckpt")), map_location="cpu", weights_only=False)
    assert a["state_dict"].keys() == b["state_dict"].keys() and len(a["state_dict"]) == 3 * 2 * 6 * 2
    assert all(torch.equal(a["state_dict"][key], b["state_dict"][key]) for key in a["state_dict"])
    assert a["optimizer_states"][0]["state"].keys() == b["optimizer_states"][0]["state"].keys()
