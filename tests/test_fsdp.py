"""Sharded training pieces: the FSDP wrap policy, the trainer pieces and LLM recipes as the CLI resolves them,
a 2-process FSDP2 step on CPU against a DDP step, and (on a GPU only) an FSDP1 step against a DDP step.

FSDP2 (`fully_shard`, `configs/trainer/fsdp2.yaml`: Lightning's `ModelParallelStrategy` as
`codiemb_pl.training.sharding.FSDP2Strategy`) runs with gloo on CPU: its first-step loss and gradients on the tiny
decoder (IR with cross-device negatives: queries, positives and negatives are three forward calls before one
backward) equal DDP's, and its export equals DDP's; a fit with CheckpointFusion (snapshots from the
consolidated weights, fusion and scoring on rank 0 with an unsharded encoder) gives DDP's snapshots,
leaderboard and exported winner. An earlier trial got equal losses but gradients that
differed from DDP and between the ranks; that is what happens when only the transformer blocks are sharded
and the backbone itself is not (`fully_shard(model)` last): the parameters outside the blocks (token
embeddings, final norm) then belong to no FSDP unit, nothing reduces their gradients, and each rank keeps
its own (reproduced: exactly those two tensors differ). `shard_with_fsdp2` shards both.
A 2-rank FSDP2 run killed and resumed from its consolidated checkpoint continues exactly (losses, weights and
AdamW states identical to the uninterrupted run's).

FSDP1 (`configs/trainer/fsdp.yaml`, Lightning's `FSDPStrategy`) cannot run on CPU: Lightning refuses
`accelerator: cpu` ("The strategy `fsdp` requires a GPU accelerator"), and under another type PyTorch's
FSDP1 stops with "FSDP needs a non-CPU accelerator device".
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import yaml

from codiemb_pl.cli.main import main
from codiemb_pl.training.sharding import is_transformer_block, wrap_transformer_blocks
from decoder_models import build_tiny_decoder

ROOT = Path(__file__).resolve().parents[1]


def resolved_config(capsys, *configs: Path) -> dict:
    args = ["fit"]
    for path in configs:
        args += ["--config", str(path)]
    with pytest.raises(SystemExit):
        main(args + ["--print_config"])
    lines = capsys.readouterr().out.splitlines()   # from the first top-level key on: deepspeed, when
    start = next(i for i, line in enumerate(lines) if line.startswith("seed_everything:"))  # installed, logs first
    return yaml.safe_load("\n".join(lines[start:]))


def test_wrap_policy_makes_each_transformer_block_one_unit(tmp_path, tiny_model_dir):
    from transformers import AutoModel

    decoder = AutoModel.from_pretrained(build_tiny_decoder(tmp_path / "qwen2", "qwen2"))
    encoder = AutoModel.from_pretrained(tiny_model_dir)
    assert [name for name, m in decoder.named_modules() if is_transformer_block(m)] == ["layers.0", "layers.1"]
    assert [name for name, m in encoder.named_modules() if is_transformer_block(m)] == ["encoder.layer.0",
                                                                                        "encoder.layer.1"]
    assert wrap_transformer_blocks(decoder, recurse=True, nonwrapped_numel=0)       # always descend
    assert not wrap_transformer_blocks(decoder.embed_tokens, recurse=False, nonwrapped_numel=0)
    assert wrap_transformer_blocks(decoder.layers[0], recurse=False, nonwrapped_numel=0)


def test_sharded_trainer_pieces_resolve(capsys):
    fsdp = resolved_config(capsys, ROOT / "configs/quickstart.yaml", ROOT / "configs/trainer/fsdp.yaml")["trainer"]
    assert fsdp["strategy"]["class_path"] == "lightning.pytorch.strategies.FSDPStrategy"
    assert fsdp["strategy"]["init_args"]["auto_wrap_policy"] == "codiemb_pl.training.sharding.wrap_transformer_blocks"
    assert fsdp["strategy"]["init_args"]["state_dict_type"] == "full"   # one consolidated checkpoint file
    zero = resolved_config(capsys, ROOT / "configs/quickstart.yaml",
                           ROOT / "configs/trainer/deepspeed_zero1_offload.yaml")["trainer"]["strategy"]
    assert zero["class_path"] == "lightning.pytorch.strategies.DeepSpeedStrategy"
    assert zero["init_args"]["stage"] == 1 and zero["init_args"]["offload_optimizer"] is True


def test_minicpm_recipe_is_the_reference_setting(capsys):
    config = resolved_config(capsys, ROOT / "configs/recipes/minicpm_codiemb.yaml")
    trainer, model, data = config["trainer"], config["model"], config["data"]
    assert trainer["precision"] == "bf16-mixed" and trainer["max_epochs"] == 4
    assert trainer["strategy"]["init_args"]["stage"] == 1 and trainer["strategy"]["init_args"]["offload_optimizer"]
    assert model["gradient_checkpointing"] is True and model["max_seq_length"] == 1024
    assert model["lr"] == 4e-5 and model["ir_temperature"] == 0.02 and model["lora"] is None
    assert (data["ir_batch_size"], data["sts_batch_size"], data["n_positives"], data["n_negatives"]) == (28, 32, 2, 4)
    assert data["max_passage_length"] == 1024


def test_qwen3_lora_recipe_trains_rank_32_adapters(capsys):
    model = resolved_config(capsys, ROOT / "configs/recipes/qwen3_lora.yaml")["model"]
    assert model["lora"]["r"] == 32 and model["lora"]["alpha"] == 64.0
    assert model["lora"]["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"]   # every linear layer (README says why)
    assert model["pooling"] == "last" and model["gradient_checkpointing"] is True


def first_step(tmp_path: Path, name: str, model_dir: Path, extra: list[str], world_size: int,
               ranks: int = 2) -> list[dict]:
    """Run one IR step (cross-device negatives over the ranks) recording each rank's loss and full gradients,
    and export the model; returns the ranks' records."""
    from ddp_driver.launch import run_codiemb

    data = '[{"name": "demo_ir", "task": "ir", "path": "pkg://codiemb_pl/demo/ir_train.jsonl", "max_samples": 16}]'
    out = tmp_path / name
    args = ["--model.model_name_or_path", str(model_dir), "--data.train", data, "--data.ir_batch_size", "4",
            "--data.n_negatives", "1", "--trainer.max_steps", "1", *extra,
            "--trainer.callbacks+=sharded_probes.FullGradientRecorder", f"--trainer.callbacks.out_dir={out}",
            "--trainer.callbacks+=codiemb_pl.callbacks.ExportEncoder", f"--trainer.callbacks.dirpath={out / 'model'}"]
    result = run_codiemb(args, world_size=world_size)
    assert result.returncode == 0, result.stdout[-3000:]
    return [torch.load(out / f"grads_rank{rank}.pt") for rank in range(ranks)]


def test_fsdp2_killed_and_resumed_run_continues_exactly(tmp_path, tiny_model_dir):
    """FSDP2 resume: a 2-rank run (tiny BERT, dropout on) killed before optimizer step 2 and resumed with
    `--ckpt_path last` (the consolidated file) trains steps 2 and 3 with the uninterrupted run's losses and
    ends with its weights and AdamW states. Tolerance 0 (as tests/test_resume.py under DDP): the restored
    weights, optimizer states, sampler position and per-rank RNG states make both runs do the same
    operations in the same order on the same inputs, so the floats are identical (measured: identical).
    Before the fix the resumed run trained step 2 on the epoch's first batch (step 0's), see
    `CoDiEmbDataModule.load_state_dict`."""
    import json

    from ddp_driver.launch import RunPool, run_codiemb

    data = '[{"name": "demo_ir", "task": "ir", "path": "pkg://codiemb_pl/demo/ir_train.jsonl", "max_samples": 32}]'

    def fit_args(name: str, *extra: str) -> list[str]:
        checkpoint = ('{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"dirpath": '
                      f'"{tmp_path / name}", "every_n_train_steps": 1, "save_top_k": 0, "save_last": true}}}}')
        return ["--config", str(ROOT / "configs/trainer/fsdp2.yaml"), "--trainer.accelerator", "cpu",
                "--trainer.devices", "2", "--trainer.precision", "32-true", "--model.model_name_or_path",
                str(tiny_model_dir), "--data.train", data, "--data.n_negatives", "1", "--trainer.max_steps", "4",
                "--trainer.enable_checkpointing", "true", "--trainer.callbacks+", checkpoint,
                "--trainer.callbacks+=ddp_driver.probes.LossRecorder", f"--trainer.callbacks.out_dir={tmp_path / name}",
                *extra]

    def interrupt_then_resume():
        interrupted = run_codiemb(fit_args("resumed", "--trainer.callbacks+=ddp_driver.probes.Interrupt",
                                           "--trainer.callbacks.at_step=2"), timeout=300)
        left_at = torch.load(tmp_path / "resumed" / "last.ckpt", weights_only=False)["global_step"]
        return interrupted, left_at, run_codiemb(fit_args("resumed", "--ckpt_path", "last"), timeout=300)

    with RunPool() as pool:   # the straight run overlaps the interrupted-then-resumed chain
        straight_run = pool.submit(fit_args("straight"), timeout=300)
        chain = pool.executor.submit(interrupt_then_resume)
        straight = straight_run.result()
        interrupted, left_at, resumed = chain.result()
    assert straight.returncode == 0, straight.stdout[-3000:]
    assert interrupted.returncode == 3 and left_at == 2, interrupted.stdout[-3000:]
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    for rank in range(2):
        expected, actual = (json.loads((tmp_path / name / f"losses_rank{rank}.json").read_text())
                            for name in ("straight", "resumed"))
        assert [step for step, _ in expected] == [0, 1, 2, 3] and len({loss for _, loss in expected}) == 4
        assert actual == expected[2:], rank                       # steps 2 and 3, the same losses
    final = [torch.load(tmp_path / name / "last.ckpt", weights_only=False) for name in ("straight", "resumed")]
    assert final[0]["global_step"] == final[1]["global_step"] == 4
    weights = [checkpoint["state_dict"] for checkpoint in final]
    assert weights[0].keys() == weights[1].keys() and len(weights[0]) > 30
    assert all(torch.equal(weights[1][name], weights[0][name]) for name in weights[0])
    adam = [checkpoint["optimizer_states"][0]["state"] for checkpoint in final]
    assert adam[0].keys() == adam[1].keys() and len(adam[0]) == len(weights[0])
    assert all(torch.equal(adam[1][key][name], value) for key in adam[0] for name, value in adam[0][key].items())


def test_fsdp2_strategy_shards_every_rank(capsys):
    from codiemb_pl.training.sharding import FSDP2Strategy

    strategy = resolved_config(capsys, ROOT / "configs/quickstart.yaml", ROOT / "configs/trainer/fsdp2.yaml")
    init = strategy["trainer"]["strategy"]
    assert init["class_path"] == "codiemb_pl.training.sharding.FSDP2Strategy"
    assert init["init_args"]["save_distributed_checkpoint"] is False    # one consolidated checkpoint file
    assert FSDP2Strategy()._tensor_parallel_size == 1


FUSION_VAL = ('[{"name": "demo_sts_dev", "task": "sts", "path": "pkg://codiemb_pl/demo/sts_dev.jsonl", "max_samples": 20},'
              ' {"name": "demo_ir_dev", "task": "ir", "path": "pkg://codiemb_pl/demo/ir_dev", "split": "dev",'
              ' "max_samples": 8}]')
FUSION_FILES = ("snapshots/base.safetensors", "snapshots/step0000001.safetensors", "snapshots/step0000002.safetensors",
                "candidates/uniform_soup.safetensors", "model/model.safetensors")


def test_fsdp2_equals_ddp_on_two_cpu_processes_first_step_export_and_fusion(tmp_path):
    """Two IR steps on 2 gloo ranks (cross-device negatives) of the tiny decoder, under DDP and under FSDP2, one
    pair of runs for three checks: the first step's loss and full gradients per rank (rtol 1e-5, the issue's
    target), the ExportEncoder export (consolidated weights), and CheckpointFusion (a snapshot after each step,
    one merge, scoring on demo validation sets): snapshots, merge, leaderboard and exported winner agree
    (weights rtol 1e-5, scores 1e-6; measured: bit-identical). Under FSDP2 the snapshots come from the
    consolidated weights and rank 0 scores with an unsharded encoder (see callbacks/fusion.py)."""
    import json

    from safetensors.torch import load_file

    from ddp_driver.launch import RunPool

    model_dir = build_tiny_decoder(tmp_path / "qwen2", "qwen2")
    data = '[{"name": "demo_ir", "task": "ir", "path": "pkg://codiemb_pl/demo/ir_train.jsonl", "max_samples": 16}]'
    fsdp2 = ["--config", str(ROOT / "configs/trainer/fsdp2.yaml"), "--trainer.accelerator", "cpu",
             "--trainer.devices", "2", "--trainer.precision", "32-true"]

    def fit_args(name: str, extra: list[str]) -> list[str]:
        return ["--model.model_name_or_path", str(model_dir), "--data.train", data, "--data.val", FUSION_VAL,
                "--data.n_negatives", "1", "--trainer.max_steps", "2", "--trainer.default_root_dir", str(tmp_path / name),
                "--trainer.callbacks+=codiemb_pl.callbacks.CheckpointFusion",
                f"--trainer.callbacks.dirpath={tmp_path / name / 'fusion'}", "--trainer.callbacks.every_n_steps", "1",
                "--trainer.callbacks.collect", '["last"]', "--trainer.callbacks.methods", '[{"method": "uniform_soup"}]',
                "--trainer.callbacks+=sharded_probes.FullGradientRecorder", f"--trainer.callbacks.out_dir={tmp_path / name}",
                "--trainer.callbacks+=codiemb_pl.callbacks.ExportEncoder",
                f"--trainer.callbacks.dirpath={tmp_path / name / 'model'}", *extra]

    with RunPool() as pool:   # the two runs overlap
        runs = [pool.submit(fit_args("ddp", []), world_size=2), pool.submit(fit_args("fsdp2", fsdp2), world_size=1)]
        results = [run.result() for run in runs]
    for result in results:
        assert result.returncode == 0, result.stdout[-3000:]
    first = {name: [torch.load(tmp_path / name / f"grads_rank{rank}.pt") for rank in range(2)] for name in ("ddp", "fsdp2")}
    for rank in range(2):
        expected, actual = first["ddp"][rank], first["fsdp2"][rank]
        assert actual["loss"] == pytest.approx(expected["loss"], rel=1e-5)
        assert actual["grads"].keys() == expected["grads"].keys() and len(expected["grads"]) == 26
        for name, grad in expected["grads"].items():
            assert grad.abs().max() > 0, name                     # every parameter gets a gradient
            assert torch.allclose(actual["grads"][name], grad, rtol=1e-5, atol=1e-8), name
    assert first["ddp"][0]["loss"] != pytest.approx(first["ddp"][1]["loss"])   # the ranks saw different data
    exported = [load_file(str(tmp_path / name / "model" / "model.safetensors")) for name in ("ddp", "fsdp2")]
    initial = load_file(str(model_dir / "model.safetensors"))
    assert exported[0].keys() == exported[1].keys()
    assert any(not torch.allclose(exported[0][key], initial[key]) for key in initial)   # training moved the weights
    assert all(torch.allclose(exported[1][key], exported[0][key], rtol=1e-5, atol=1e-7) for key in exported[0])
    ddp, sharded = (tmp_path / name / "fusion" for name in ("ddp", "fsdp2"))
    for relative in FUSION_FILES:
        expected, actual = load_file(str(ddp / relative)), load_file(str(sharded / relative))
        assert actual.keys() == expected.keys(), relative
        assert all(torch.allclose(actual[key], expected[key], rtol=1e-5, atol=1e-7) for key in expected), relative
    base, step1 = load_file(str(ddp / FUSION_FILES[0])), load_file(str(ddp / FUSION_FILES[1]))
    assert any(not torch.allclose(step1[key], base[key]) for key in base)   # training moved the weights
    boards = [json.loads((folder / "leaderboard.json").read_text()) for folder in (ddp, sharded)]
    assert [row["name"] for row in boards[1]["ranking"]] == [row["name"] for row in boards[0]["ranking"]]
    assert {row["name"] for row in boards[0]["ranking"]} == {"base", "step1", "step2+last", "uniform_soup"}
    assert boards[1]["winner"] == boards[0]["winner"]
    for expected, actual in zip(boards[0]["ranking"], boards[1]["ranking"]):
        assert actual["metrics"].keys() == expected["metrics"].keys()
        assert all(actual["metrics"][key] == pytest.approx(value, abs=1e-6) for key, value in expected["metrics"].items())
    assert len({round(row["metrics"]["val/avg"], 6) for row in boards[0]["ranking"]}) > 1   # scores tell them apart
    for settings in ("1_Pooling/config.json", "sentence_bert_config.json", "modules.json"):   # exported alike
        assert json.loads((sharded / "model" / settings).read_text()) == json.loads((ddp / "model" / settings).read_text())


NO_CUDA = not torch.cuda.is_available()
GPU_PIECES = [
    pytest.param("fsdp.yaml", id="fsdp1",
                 marks=pytest.mark.skipif(NO_CUDA, reason="FSDP1 needs a CUDA device (see the module docstring)")),
    pytest.param("deepspeed_zero1_offload.yaml", id="deepspeed_zero1_offload", marks=pytest.mark.skipif(
        NO_CUDA or importlib.util.find_spec("deepspeed") is None,
        reason="DeepSpeed ZeRO needs a CUDA device and `pip install 'codiemb_pl[deepspeed]'`: Lightning's "
               "DeepSpeedStrategy refuses other accelerators, and on DeepSpeed's CPU accelerator init_distributed "
               "first JIT-compiles a shared-memory op (over 3 min here)")),
]


@pytest.mark.parametrize("piece", GPU_PIECES)
def test_sharded_first_step_equals_ddp_on_one_gpu(tmp_path, piece):
    """FSDP1 / DeepSpeed ZeRO-1 with the AdamW states on the CPU: the first step's loss equals DDP's."""
    model_dir = build_tiny_decoder(tmp_path / "qwen2", "qwen2")
    gpu = ["--trainer.accelerator", "gpu", "--trainer.precision", "32-true"]
    ddp = first_step(tmp_path, "ddp", model_dir, gpu, world_size=1, ranks=1)
    sharded = first_step(tmp_path, "sharded", model_dir, ["--config", str(ROOT / "configs/trainer" / piece),
                                                          "--trainer.devices", "1", *gpu], world_size=1, ranks=1)
    assert sharded[0]["loss"] == pytest.approx(ddp[0]["loss"], rel=1e-5)
