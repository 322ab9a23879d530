"""LoRA through peft: only adapters train and are checkpointed, exact resume, merged and adapter-only export."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from codiemb_pl.cli.main import main
from codiemb_pl.errors import InputError
from codiemb_pl.model.lora import LoraSettings, check_lora_settings, lora_summary, merged_weights, save_adapter
from codiemb_pl.training.module import CoDiEmbModule

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # a benchmark helper
from ddp_driver.launch import RunPool, run_codiemb
from decoder_models import build_tiny_decoder
from saved_for_backward import saved_for_backward  # noqa: E402

TEXTS = ["a short one", "a somewhat longer sentence about retrieval", "mid length text"]
TINY_CONFIG = Path(__file__).parent / "conf" / "tiny.yaml"
LORA = {"r": 2, "alpha": 4.0, "dropout": 0.0, "target_modules": "all-linear"}


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory) -> Path:
    """A Qwen2 decoder of hidden size 128, so that adapters are a small part of it, as in real models."""
    return build_tiny_decoder(tmp_path_factory.mktemp("qwen2_128"), "qwen2", hidden=128)


def lora_module(decoder_dir: Path, **settings) -> CoDiEmbModule:
    return CoDiEmbModule(str(decoder_dir), lora=LoraSettings(**{**LORA, **settings}))


def randomise_adapters(module: CoDiEmbModule, seed: int = 0) -> None:
    """B starts at zero (the adapted model equals the base); give it values so the merge has work to do."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


@pytest.mark.parametrize("field, value, message", [("r", 0, "positive integer"), ("alpha", 0.0, "positive"),
                                                   ("dropout", 1.0, r"\[0, 1\)"), ("target_modules", [], "no modules")])
def test_bad_settings_give_one_clear_error(field, value, message):
    with pytest.raises(InputError, match=message) as error:
        check_lora_settings(LoraSettings(**{field: value}))
    assert f"model.lora.{field}" in str(error.value) and "\n" not in str(error.value)


def test_unknown_target_module_and_missing_peft_are_clear_errors(decoder_dir, monkeypatch):
    with pytest.raises(InputError, match="model.lora.target_modules"):
        lora_module(decoder_dir, target_modules=["no_such_proj"])
    monkeypatch.setitem(sys.modules, "peft", None)  # as if not installed
    with pytest.raises(InputError, match=r"pip install 'codiemb_pl\[lora\]'"):
        lora_module(decoder_dir)


def test_only_the_adapters_are_trainable(decoder_dir):
    module = lora_module(decoder_dir)
    trainable = [name for name, parameter in module.named_parameters() if parameter.requires_grad]
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    # every linear layer of both blocks is adapted: q, k, v, o, gate, up, down
    assert len(trainable) == 2 * 7 * 2
    summary = lora_summary(module.encoder.model)
    hidden, layers, r = 128, 2, 2
    expected = layers * r * ((hidden + hidden) * 2 + (hidden + 64) * 2 + (hidden + 256) * 2 + (256 + hidden))
    assert summary["trainable"] == expected


def test_merged_export_equals_the_adapter_model_and_the_adapter_alone_reloads(decoder_dir, tmp_path):
    from peft import PeftModel
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    module = lora_module(decoder_dir)
    randomise_adapters(module)
    encoder = module.encoder
    expected = encoder.encode(TEXTS)
    base_only = CoDiEmbModule(str(decoder_dir)).encoder.encode(TEXTS)
    assert not torch.allclose(expected, base_only, atol=1e-3)  # the adapters do change the embeddings

    encoder.save(tmp_path / "merged")
    weights = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())["weight_map"] \
        if (tmp_path / "merged" / "model.safetensors.index.json").exists() else None
    assert weights is None or not any("lora" in key for key in weights)
    model = SentenceTransformer(str(tmp_path / "merged"), device="cpu")
    assert torch.allclose(model.encode(TEXTS, convert_to_tensor=True), expected, atol=1e-5)
    _, merged = merged_weights(encoder.model)
    assert not any("lora" in key or "base_layer" in key for key in merged)

    save_adapter(encoder.model, tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "adapter").iterdir()}
    fresh = CoDiEmbModule(str(decoder_dir)).encoder
    fresh.model = PeftModel.from_pretrained(AutoModel.from_pretrained(str(decoder_dir)), str(tmp_path / "adapter"))
    assert torch.allclose(fresh.encode(TEXTS), expected, atol=1e-5)
    with pytest.raises(InputError, match="no LoRA adapters"):
        save_adapter(fresh.model.get_base_model().__class__.from_pretrained(str(decoder_dir)), tmp_path / "none")


def test_merged_weights_from_a_consolidated_fsdp2_state_equal_the_module_merge(decoder_dir):
    from codiemb_pl.model.lora import CONSOLIDATED_STATE_ATTRIBUTE

    module = lora_module(decoder_dir)
    randomise_adapters(module)
    model = module.encoder.model
    _, expected = merged_weights(model)
    setattr(model, CONSOLIDATED_STATE_ATTRIBUTE, {key: value.clone() for key, value in model.state_dict().items()})
    try:   # as sharding.consolidated_weights leaves it on rank 0: the full peft state dict
        _, merged = merged_weights(model)
    finally:
        delattr(model, CONSOLIDATED_STATE_ATTRIBUTE)
    assert merged.keys() == expected.keys()
    assert all(torch.allclose(merged[key], expected[key], rtol=1e-6, atol=1e-7) for key in expected)
    assert any(not torch.equal(merged[key], model.get_base_model().state_dict()[key.replace(".weight",
               ".base_layer.weight")]) for key in expected if "q_proj.weight" in key)   # the deltas are in


def test_gradient_checkpointing_gives_the_adapters_the_same_gradients(decoder_dir):
    grads = []
    for checkpointing in (False, True):
        module = CoDiEmbModule(str(decoder_dir), lora=LoraSettings(**LORA), gradient_checkpointing=checkpointing)
        randomise_adapters(module)
        features = module.encoder.tokenize(TEXTS)
        module.encoder(features).pow(2).sum().backward()
        grads.append({name: p.grad.clone() for name, p in module.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    assert all(grads[1][name] is not None and torch.allclose(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7)
               for name in grads[0])


def adapter_step(model, features: dict, seed: int) -> tuple[torch.Tensor, dict, int]:
    """(output, adapter gradients, bytes of non-parameter tensors saved for backward) of one seeded step."""
    torch.manual_seed(seed)
    with saved_for_backward(model.parameters()) as saved:
        output = model(**features).last_hidden_state
    output.pow(2).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return output.detach(), grads, sum(saved.values())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_recomputed_adapter_dropout_equals_peft_dropout_and_keeps_no_dropped_copies(decoder_dir, checkpointing):
    import peft
    from transformers import AutoModel

    from codiemb_pl.model.lora import add_lora_adapters

    settings = LoraSettings(**{**LORA, "dropout": 0.3})
    features = {"input_ids": torch.randint(0, 200, (3, 9), generator=torch.Generator().manual_seed(0)),
                "attention_mask": torch.ones(3, 9, dtype=torch.long)}
    runs = {}
    for name in ("peft", "ours", "no dropout"):
        base = AutoModel.from_pretrained(str(decoder_dir))
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(1)
        if name == "peft":
            model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4.0, lora_dropout=0.3,
                                                              target_modules="all-linear"))
        else:
            model = add_lora_adapters(base, settings if name == "ours" else LoraSettings(**LORA))
        for parameter_name, parameter in model.named_parameters():  # B != 0, so A receives gradients
            if "lora_B" in parameter_name:
                torch.nn.init.normal_(parameter, std=0.1, generator=torch.Generator().manual_seed(2))
        model.train()
        runs[name] = adapter_step(model, features, seed=3)
    (out_peft, grads_peft, saved_peft), (out_ours, grads_ours, saved_ours) = runs["peft"], runs["ours"]
    assert torch.equal(out_ours, out_peft) and not torch.equal(out_ours, runs["no dropout"][0])
    assert grads_ours.keys() == grads_peft.keys()
    assert all(torch.allclose(grads_ours[name], grads_peft[name], rtol=1e-6, atol=0) for name in grads_peft)
    # the recomputed dropout keeps what the model without dropout keeps; peft keeps more (with whole-block
    # checkpointing all three keep only the block inputs until the block is recomputed)
    assert saved_ours == runs["no dropout"][2] and (saved_ours == saved_peft if checkpointing else saved_ours < saved_peft)


def test_a_full_checkpoint_is_refused_by_a_lora_module(decoder_dir):
    full = CoDiEmbModule(str(decoder_dir))
    module = lora_module(decoder_dir)
    with pytest.raises(InputError, match="full-weight checkpoint"):
        module.on_load_checkpoint({"state_dict": full.state_dict()})


def fit_args(decoder_dir: Path, root: Path, lora: dict | None) -> list[str]:
    args = ["fit", "--config", str(TINY_CONFIG), "--model.model_name_or_path", str(decoder_dir),
            "--trainer.max_steps", "2", "--trainer.default_root_dir", str(root), "--model.lr", "1e-2"]
    return args + (["--model.lora", json.dumps(lora)] if lora else [])


def test_lora_checkpoint_holds_only_adapters_and_is_small(decoder_dir, tmp_path, one_torch_thread):
    assert main(fit_args(decoder_dir, tmp_path / "full", None)) == 0
    export = ["--trainer.callbacks+=codiemb_pl.callbacks.ExportEncoder", "--trainer.callbacks.dirpath",
              str(tmp_path / "model"), "--trainer.callbacks.adapter_dirpath", str(tmp_path / "adapter")]
    # (the export starts from the best checkpoint: it loads adapters-only weights)
    assert main(fit_args(decoder_dir, tmp_path / "lora", LORA) + export) == 0
    full_file, lora_file = next((tmp_path / "full").rglob("last.ckpt")), next((tmp_path / "lora").rglob("last.ckpt"))
    state = torch.load(lora_file, map_location="cpu", weights_only=False)
    assert state["global_step"] == 2
    assert state["state_dict"] and all(".lora_A." in key or ".lora_B." in key for key in state["state_dict"])
    assert lora_file.stat().st_size <= 0.05 * full_file.stat().st_size
    # the adapters moved; B started at zero
    assert any(value.abs().max() > 0 for key, value in state["state_dict"].items() if ".lora_B." in key)
    from codiemb_pl.model.encoder import TextEncoder

    assert TextEncoder(str(tmp_path / "model")).encode(TEXTS).shape == (3, 128)  # a plain merged model
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()          # and the adapters alone


def test_interrupted_and_resumed_lora_run_ends_with_the_uninterrupted_adapters(decoder_dir, tmp_path):
    def args(folder: Path) -> list[str]:
        checkpoint = ('{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": '
                      f'{{"dirpath": "{folder}", "every_n_train_steps": 1, "save_top_k": 0, "save_last": true}}}}')
        data = ('[{"name": "demo_ir", "task": "ir", "path": "pkg://codiemb_pl/demo/ir_train.jsonl", "max_samples": 32},'
                ' {"name": "demo_sts", "task": "sts", "path": "pkg://codiemb_pl/demo/sts_train.jsonl", '
                '"max_samples": 32}]')
        return ["--model.model_name_or_path", str(decoder_dir), "--model.lora", json.dumps({**LORA, "dropout": 0.1}),
                "--data.train", data, "--data.ir_batch_size", "8", "--data.sts_batch_size", "8",
                "--data.n_negatives", "1", "--trainer.max_steps", "6", "--trainer.enable_checkpointing", "true",
                "--trainer.callbacks+", checkpoint]

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    with RunPool() as pool:   # the uninterrupted run beside the interrupt-then-resume chain
        straight_run = pool.submit(args(straight))
        interrupted = run_codiemb(args(resumed) + ["--trainer.callbacks+=ddp_driver.probes.Interrupt",
                                                   "--trainer.callbacks.at_step=3"])
        assert interrupted.returncode == 3, interrupted.stdout[-3000:]
        result = run_codiemb(args(resumed) + ["--ckpt_path", "last"])
        assert result.returncode == 0, result.stdout[-3000:]
        assert straight_run.result().returncode == 0
    a = torch.load(straight / "last.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(resumed / "last.ckpt", map_location="cpu", weights_only=False)
    assert a["global_step"] == b["global_step"] == 6
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][key], b["state_dict"][key]) for key in a["state_dict"])


# -- LoRA checkpoints in fusion ---------------------------------------------------------------------------

def write_lora_checkpoint(decoder_dir: Path, path: Path, seed: int) -> CoDiEmbModule:
    """A `.ckpt` as `codiemb fit` writes it under LoRA (adapters only + hyper-parameters), small deltas."""
    from codiemb_pl.model.lora import trainable_state_dict

    module = lora_module(decoder_dir)
    randomise_adapters(module, seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if "lora_B" in name:
                parameter.mul_(0.02)  # fine-tuning-sized deltas (fusion refuses inputs far from the base)
    torch.save({"state_dict": trainable_state_dict(module, module.state_dict()),
                "hyper_parameters": dict(module.hparams)}, path)
    return module


def test_a_lora_checkpoint_reads_as_its_base_plus_scale_b_a(decoder_dir, tmp_path):
    from safetensors.torch import load_file

    from codiemb_pl.fusion.sources import read_lightning_checkpoint

    module = write_lora_checkpoint(decoder_dir, tmp_path / "a.ckpt", seed=1)
    weights, _ = read_lightning_checkpoint(tmp_path / "a.ckpt")
    base = load_file(str(decoder_dir / "model.safetensors"))
    assert weights.keys() == base.keys()
    _, expected = merged_weights(module.encoder.model)
    assert all(torch.allclose(weights[key], expected[key], atol=1e-6) for key in base)
    layer = module.encoder.model.base_model.model.layers[0].self_attn.q_proj
    delta = (LORA["alpha"] / LORA["r"]) * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    assert torch.allclose(weights["layers.0.self_attn.q_proj.weight"],
                          base["layers.0.self_attn.q_proj.weight"] + delta, atol=1e-6)
    for untouched in ("embed_tokens.weight", "norm.weight", "layers.0.input_layernorm.weight",
                      "layers.0.self_attn.q_proj.bias"):
        assert torch.equal(weights[untouched], base[untouched])


def test_codiemb_fuse_merges_lora_checkpoints_and_refuses_a_mix(decoder_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    for seed, name in ((1, "a.ckpt"), (2, "b.ckpt")):
        write_lora_checkpoint(decoder_dir, tmp_path / name, seed)
    from codiemb_pl.fusion.sources import read_lightning_checkpoint

    a, _ = read_lightning_checkpoint(tmp_path / "a.ckpt")
    b, _ = read_lightning_checkpoint(tmp_path / "b.ckpt")
    code = main(["fuse", "--base", str(decoder_dir), "--model", str(tmp_path / "a.ckpt"), "--model",
                 str(tmp_path / "b.ckpt"), "--method", "uniform_soup", "--output", str(tmp_path / "soup")])
    assert code == 0
    fused = load_file(str(tmp_path / "soup" / "model.safetensors"))
    key = "layers.1.mlp.down_proj.weight"
    assert torch.allclose(fused[key], (a[key] + b[key]) / 2, atol=1e-6)

    mixed = ["fuse", "--base", str(decoder_dir), "--model", str(tmp_path / "a.ckpt"), "--model", str(decoder_dir),
             "--method", "uniform_soup", "--output", str(tmp_path / "mixed")]
    capsys.readouterr()
    assert main(mixed) == 2
    error = capsys.readouterr().err.strip()
    assert "is a LoRA checkpoint" in error and "--mixed-lora" in error and len(error.splitlines()) == 1
    assert not (tmp_path / "mixed").exists()
    assert main(mixed + ["--mixed-lora"]) == 0
    fused = load_file(str(tmp_path / "mixed" / "model.safetensors"))
    base = load_file(str(decoder_dir / "model.safetensors"))
    assert torch.allclose(fused[key], (a[key] + base[key]) / 2, atol=1e-6)


def test_fusion_callback_snapshots_lora_runs_in_weight_space(decoder_dir, tmp_path, one_torch_thread):
    from safetensors.torch import load_file

    code = main(fit_args(decoder_dir, tmp_path, LORA) + [
        "--trainer.max_steps", "4",
        "--trainer.callbacks+=codiemb_pl.callbacks.CheckpointFusion", "--trainer.callbacks.every_n_steps", "2",
        "--trainer.callbacks.collect", '["last"]', "--trainer.callbacks.methods", '[{"method": "uniform_soup"}]'])
    assert code == 0
    base = load_file(str(decoder_dir / "model.safetensors"))
    snapshots = sorted((tmp_path / "fusion" / "snapshots").glob("step*.safetensors"))
    assert snapshots and load_file(str(tmp_path / "fusion" / "snapshots" / "base.safetensors")).keys() == base.keys()
    last = load_file(str(snapshots[-1]))
    assert last.keys() == base.keys()                                   # merged: base names, no adapters
    assert torch.equal(last["embed_tokens.weight"], base["embed_tokens.weight"])           # not adapted
    assert not torch.equal(last["layers.0.mlp.up_proj.weight"], base["layers.0.mlp.up_proj.weight"])
    from codiemb_pl.model.encoder import TextEncoder

    assert TextEncoder(str(tmp_path / "fusion" / "model")).encode(TEXTS).shape == (3, 128)


def test_load_encoder_reads_a_lora_checkpoint_as_the_adapted_model(decoder_dir, tmp_path):
    from codiemb_pl.workflows.encoders import load_encoder

    module = write_lora_checkpoint(decoder_dir, tmp_path / "a.ckpt", seed=3)
    expected = module.encoder.encode(TEXTS)
    assert torch.allclose(load_encoder(tmp_path / "a.ckpt").encode(TEXTS), expected, atol=1e-5)
