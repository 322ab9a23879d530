"""CheckpointFusion on a tiny fit: θ0 on disk, step snapshots, a scored leaderboard, an exported winner."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from codiemb_pl.cli.main import main
from codiemb_pl.model.encoder import TextEncoder
from codiemb_pl.workflows.fusion.scoring import FusionInputs, run_fusion
from codiemb_pl.workflows.fusion.settings import parse_methods

TINY_CONFIG = Path(__file__).parent / "conf" / "tiny.yaml"
METHODS = '[{"method": "uniform_soup"}, {"method": "ties", "params": {"density": 0.5}}, {"method": "delta_guided"}]'


@pytest.fixture(scope="module")
def fused_run(tiny_model_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("fusion_run")
    code = main(["fit", "--config", str(TINY_CONFIG), "--model.model_name_or_path", str(tiny_model_dir),
                 "--trainer.default_root_dir", str(run),
                 "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(run),
                 "--trainer.callbacks+=codiemb_pl.callbacks.CheckpointFusion",
                 "--trainer.callbacks.every_n_steps", "2", "--trainer.callbacks.collect", '["last"]',
                 "--trainer.callbacks.methods", METHODS])
    assert code == 0
    return run


def test_leaderboard_has_base_snapshots_and_every_method(fused_run, capsys):
    board = json.loads((fused_run / "fusion" / "leaderboard.json").read_text())
    rows = {row["name"]: row for row in board["ranking"]}
    assert set(rows) == {"base", "step2", "step4+last", "uniform_soup", "ties(density=0.5)", "delta_guided"}
    assert [rows[n]["kind"] for n in ("base", "step2", "uniform_soup")] == ["base", "checkpoint", "fused"]
    for row in rows.values():
        for metric in ("val/avg", "val/ir_avg", "val/sts_avg", "val/demo_sts_dev/cosine_spearman",
                       "val/demo_ir_dev/ndcg_at_10"):
            assert math.isfinite(row["metrics"][metric]), (row["name"], metric)
    scores = [row["metrics"]["val/avg"] for row in board["ranking"]]
    assert scores == sorted(scores, reverse=True) and board["winner"] == board["ranking"][0]["name"]
    assert "| rank | candidate |" in (fused_run / "fusion" / "leaderboard.md").read_text()


def test_base_on_disk_is_the_initial_model_and_snapshots_differ(fused_run, tiny_model_dir):
    snapshots = fused_run / "fusion" / "snapshots"
    base = load_file(str(snapshots / "base.safetensors"))
    initial = TextEncoder(str(tiny_model_dir)).model.state_dict()
    assert base.keys() == initial.keys() and all(torch.equal(base[k], initial[k]) for k in base)
    step2, step4 = load_file(str(snapshots / "step0000002.safetensors")), load_file(str(snapshots / "step0000004.safetensors"))
    key = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(step2[key], base[key]) and not torch.equal(step2[key], step4[key])


def test_winner_is_exported_and_loads_with_pooling(fused_run):
    from sentence_transformers import SentenceTransformer

    board = json.loads((fused_run / "fusion" / "leaderboard.json").read_text())
    winner = load_file(board["ranking"][0]["weights_path"])
    exported = load_file(str(fused_run / "fusion" / "model" / "model.safetensors"))
    assert all(torch.equal(exported[k], winner[k]) for k in winner)
    pooling = json.loads((fused_run / "fusion" / "model" / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] and not pooling["include_prompt"]
    model = SentenceTransformer(str(fused_run / "fusion" / "model"), device="cpu")
    ours = TextEncoder.load(fused_run / "fusion" / "model").encode(["fused model text"])
    assert torch.allclose(model.encode(["fused model text"], convert_to_tensor=True), ours, atol=1e-5)


def test_leaderboard_is_logged_to_the_trainer_loggers(fused_run):
    metrics_file = next(fused_run.rglob("metrics.csv"))
    header = next(csv.reader(metrics_file.open()))
    assert "fusion/uniform_soup/val/avg" in header and "fusion/base/val/ir_avg" in header


def _tiny_state(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"layer.0.weight": torch.randn(4, 3, generator=generator)}


def test_runner_scores_the_base_every_checkpoint_and_every_merge(tmp_path):
    paths = []
    for seed in range(3):
        paths.append(tmp_path / f"s{seed}.safetensors")
        save_file(_tiny_state(seed), str(paths[-1]))
    scored = []

    def evaluate(path: Path) -> dict[str, float]:
        scored.append(path.name)
        return {"val/avg": float(load_file(str(path))["layer.0.weight"].sum())}

    inputs = FusionInputs(paths[0], [("a", paths[1]), ("b", paths[2])], model_folder=str(tmp_path))
    board = run_fusion(inputs, parse_methods(["uniform_soup", {"method": "task_arithmetic", "weights": [1.0, -1.0]}]),
                       evaluate, tmp_path / "c", log=lambda _: None)
    rows = {c.name: c for c in board.candidates}
    base, first, second = (_tiny_state(seed)["layer.0.weight"] for seed in range(3))
    assert rows["uniform_soup"].metrics["val/avg"] == pytest.approx(float((first + second).sum() / 2), abs=1e-5)
    assert rows["task_arithmetic"].metrics["val/avg"] == pytest.approx(float((base + first - second).sum()), abs=1e-5)
    assert rows["task_arithmetic"].weights == [1.0, -1.0] and rows["a"].kind == "checkpoint"
    assert scored == ["s0.safetensors", "s1.safetensors", "s2.safetensors", "uniform_soup.safetensors",
                      "task_arithmetic.safetensors"]


def test_method_list_errors_are_input_errors():
    from codiemb_pl.errors import InputError

    with pytest.raises(InputError, match="unknown merge method"):
        parse_methods(["souping"])
    with pytest.raises(InputError, match="unknown parameter"):
        parse_methods([{"method": "ties", "params": {"densty": 0.2}}])
    with pytest.raises(InputError, match="labelled"):
        parse_methods(["uniform_soup", "uniform_soup"])


def test_exported_winner_carries_a_fusion_model_card(fused_run):
    board = json.loads((fused_run / "fusion" / "leaderboard.json").read_text())
    winner = board["ranking"][0]
    card = (fused_run / "fusion" / "model" / "README.md").read_text()
    assert "## Fusion\n" in card and "## Fusion leaderboard" in card and f"picked `{winner['name']}`" in card
    assert f"| `val/avg` | {winner['metrics']['val/avg']:.4f} |" in card
    assert all(f"| {row['name']} |" in card for row in board["ranking"])   # every candidate's scores
    if winner["kind"] == "fused":
        assert f"Method: `{winner['method']}`" in card and "| step2 |" in card and "| step4+last |" in card
    else:
        assert f"the {winner['kind']} `{winner['name']}` scored best" in card


def test_a_fit_resumed_after_its_last_step_still_fuses_its_last_snapshot(tiny_model_dir, tmp_path):
    """Found by benchmarks/kill_anywhere.py: a fit killed during its export or fusion resumes (`--ckpt_path last`)
    from the checkpoint of its final step, so Lightning skips the training loop and `on_train_end`, where the
    `last` snapshot is taken, never runs. With `collect: [last]` the resumed run fused nothing ("fusion skipped:
    no snapshots") and wrote no fusion/model; with other moments too, its leaderboard lost the `last` label."""
    run = tmp_path / "run"
    every_step = json.dumps({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {
        "every_n_train_steps": 1, "save_top_k": -1, "save_last": True}})   # last.ckpt before on_train_end
    args = ["fit", "--config", str(TINY_CONFIG), "--model.model_name_or_path", str(tiny_model_dir),
            "--trainer.default_root_dir", str(run), "--trainer.max_steps", "2",
            "--trainer.callbacks", "[]", "--trainer.callbacks+", every_step,
            "--trainer.callbacks+=codiemb_pl.callbacks.CheckpointFusion", "--trainer.callbacks.collect", '["last"]',
            "--trainer.callbacks.methods", '[{"method": "uniform_soup"}, {"method": "task_arithmetic"}]']
    assert main(args) == 0
    fusion = run / "fusion"
    board = json.loads((fusion / "leaderboard.json").read_text())
    fused = load_file(str(fusion / "model" / "model.safetensors"))
    for name in ("model", "candidates"):   # what a kill during the fusion leaves: the snapshots, no results
        shutil.rmtree(fusion / name)
    for name in ("leaderboard.json", "leaderboard.md"):
        (fusion / name).unlink()

    assert main(args + ["--ckpt_path", "last"]) == 0
    resumed = json.loads((fusion / "leaderboard.json").read_text())
    assert [row["name"] for row in resumed["ranking"]] == [row["name"] for row in board["ranking"]]
    assert "last" in {row["name"] for row in resumed["ranking"]}
    again = load_file(str(fusion / "model" / "model.safetensors"))
    assert again.keys() == fused.keys() and all(torch.equal(again[key], fused[key]) for key in fused)
    assert sorted(path.name for path in (fusion / "snapshots").iterdir()) == ["base.safetensors",
                                                                             "step0000002.safetensors"]

    # resumed from step 1 (no snapshot there): the restored weights are written in case training is over, and
    # removed again when it goes on
    assert main(args + ["--ckpt_path", str(run / "checkpoints" / "epoch=0-step=1.ckpt")]) == 0
    assert sorted(path.name for path in (fusion / "snapshots").iterdir()) == ["base.safetensors",
                                                                             "step0000002.safetensors"]
    resumed = json.loads((fusion / "leaderboard.json").read_text())
    assert [row["name"] for row in resumed["ranking"]] == [row["name"] for row in board["ranking"]]


def test_unset_dirpath_follows_the_trainer_root(tmp_path):
    from types import SimpleNamespace

    from codiemb_pl.callbacks import CheckpointFusion

    trainer = SimpleNamespace(default_root_dir=str(tmp_path / "elsewhere"))
    assert CheckpointFusion().root(trainer) == tmp_path / "elsewhere" / "fusion"
    assert CheckpointFusion().base_path(trainer) == tmp_path / "elsewhere" / "fusion" / "snapshots" / "base.safetensors"
    assert CheckpointFusion(dirpath=str(tmp_path / "mine")).root(trainer) == tmp_path / "mine"


def test_unsharded_encoder_of_a_lora_module_embeds_as_the_module(tmp_path):
    """What rank 0 scores with under FSDP2: a plain encoder (no adapters) of the module's base model, settings and
    prompts, holding the merged weights W0 + s·B·A, embeds as the adapter module does."""
    from codiemb_pl.callbacks.fusion import unsharded_encoder
    from codiemb_pl.model.lora import LoraSettings, is_lora_model
    from codiemb_pl.training.module import CoDiEmbModule
    from decoder_models import build_tiny_decoder

    module = CoDiEmbModule(str(build_tiny_decoder(tmp_path / "qwen2", "qwen2")),
                           lora=LoraSettings(r=2, alpha=4.0, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():   # B starts at zero: give the adapters something to merge
        for name, parameter in module.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
    module.encoder.prompts = {"query": "Instruct: find the passage\nQuery: "}
    plain = unsharded_encoder(module, torch.device("cpu"))
    assert is_lora_model(module.encoder.model) and not is_lora_model(plain.model)
    assert (plain.pooling, plain.normalize, plain.max_seq_length, plain.include_prompt, plain.prompts) == (
        "last", True, module.encoder.max_seq_length, False, module.encoder.prompts)
    texts = ["a short one", "a somewhat longer sentence about retrieval"]
    expected = module.encoder.encode(texts, prompt_name="query")
    assert torch.allclose(plain.encode(texts, prompt_name="query"), expected, atol=1e-5)
    base = CoDiEmbModule(str(tmp_path / "qwen2")).encoder.encode(texts, prompt=module.encoder.prompts["query"])
    assert not torch.allclose(base, expected, atol=1e-3)   # the adapters change the embeddings


def test_a_metric_the_validation_sets_do_not_give_stops_before_training(tiny_model_dir, tmp_path, capsys):
    """Without the check the run trained, fused, found no winner and exported nothing, silently."""
    run = tmp_path / "run"
    code = main(["fit", "--config", str(TINY_CONFIG), "--model.model_name_or_path", str(tiny_model_dir),
                 "--trainer.default_root_dir", str(run), "--trainer.callbacks+=codiemb_pl.callbacks.CheckpointFusion",
                 "--trainer.callbacks.metric", "val/demo_sts_dev/spearman"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("codiemb: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "CheckpointFusion.metric: 'val/demo_sts_dev/spearman' is not a metric the validation sets give" in lines[0]
    assert "did you mean val/demo_sts_dev/cosine_spearman?" in lines[0]
    assert not list(run.rglob("*.ckpt")) and not list(run.rglob("*.safetensors"))   # nothing trained or written


def test_method_lists_of_the_wrong_shape_are_one_line():
    from codiemb_pl.errors import InputError

    from codiemb_pl.callbacks import CheckpointFusion

    for methods, words in ((5, "must be a list of merge methods"), ("ties", "must be a list of merge methods"),
                           ([{"method": "dare", "params": {"drop_rate": 1.0}}], "drop_rate=1.0 is outside"),
                           ([{"method": "uniform_soup", "weights": ["x"]}], "weights must be a list of finite numbers"),
                           ([{"method": "slerp", "weights": [1, 1, 1]}], "slerp merges exactly 2 checkpoints")):
        with pytest.raises(InputError, match=words):
            CheckpointFusion(methods=methods)


def test_one_checkpoint_skips_the_merges_that_give_it_back(tmp_path):
    """With one snapshot a soup, Multi-SLERP, greedy soup or delta_guided at λ = 1 is the snapshot itself: not
    merged nor scored again, one line each; methods that change it (a scale, TIES' trim) still run; slerp,
    which needs two, no longer stops the fusion after training."""
    paths = []
    for seed in range(2):
        paths.append(tmp_path / f"s{seed}.safetensors")
        save_file(_tiny_state(seed), str(paths[-1]))
    scored, logged = [], []

    def evaluate(path: Path) -> dict[str, float]:
        scored.append(path.name)
        return {"val/avg": float(load_file(str(path))["layer.0.weight"].sum())}

    methods = parse_methods(["uniform_soup", "multi_slerp", "greedy_soup", "delta_guided", "slerp",
                             {"method": "task_arithmetic", "params": {"scale": 0.5}},
                             {"method": "task_arithmetic", "weights": [1.0], "name": "identity_arithmetic"},
                             {"method": "ties", "params": {"density": 0.5}}])
    board = run_fusion(FusionInputs(paths[0], [("last", paths[1])], model_folder=str(tmp_path)), methods, evaluate,
                       tmp_path / "c", log=logged.append, show_progress=False)
    assert [c.name for c in board.candidates] == ["base", "last", "task_arithmetic(scale=0.5)", "ties(density=0.5)"]
    assert scored == ["s0.safetensors", "s1.safetensors", "task_arithmetic_scale=0.5_.safetensors",
                      "ties_density=0.5_.safetensors"]
    assert set(board.skipped) == {"uniform_soup", "multi_slerp", "greedy_soup", "delta_guided", "slerp",
                                  "identity_arithmetic"}
    assert "[codiemb] fusion: skipped uniform_soup: one checkpoint only, and uniform_soup of one model is that model" \
        in logged
    assert "Skipped slerp: one checkpoint only, and slerp merges exactly two." in board.to_text()
    assert json.loads(board.to_json())["skipped"]["multi_slerp"].startswith("one checkpoint only")
    base, last = (_tiny_state(seed)["layer.0.weight"] for seed in range(2))
    half = next(c for c in board.candidates if c.name == "task_arithmetic(scale=0.5)")
    assert half.metrics["val/avg"] == pytest.approx(float((base + 0.5 * (last - base)).sum()), abs=1e-5)


def test_a_winning_base_model_is_said_plainly(tmp_path):
    from codiemb_pl.workflows.fusion.export import winner_card

    paths = []
    for seed in range(3):
        paths.append(tmp_path / f"s{seed}.safetensors")
        save_file(_tiny_state(seed), str(paths[-1]))
    scores = {"s0.safetensors": 0.9}   # the base scores best, every trained candidate 0.1
    inputs = FusionInputs(paths[0], [("epoch0", paths[1]), ("epoch1", paths[2])], model_folder=str(tmp_path))
    board = run_fusion(inputs, parse_methods(["uniform_soup"]),
                       lambda path: {"val/avg": scores.get(path.name, 0.1)}, tmp_path / "c", log=lambda _: None,
                       show_progress=False)
    assert board.winner().kind == "base"
    said = "The base model (θ0, before any training) scores best by val/avg"
    assert said in board.to_text() and said in board.to_markdown()
    record = json.loads(board.to_json())
    assert record["base_won"] is True and said in record["notes"][0]
    assert said in winner_card(board, inputs)
    scores["s1.safetensors"] = 0.95   # a trained checkpoint wins: no such note
    board = run_fusion(inputs, [], lambda path: {"val/avg": scores.get(path.name, 0.1)}, tmp_path / "c",
                       log=lambda _: None, show_progress=False)
    assert said not in board.to_text() and json.loads(board.to_json())["base_won"] is False
