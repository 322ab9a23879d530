"""`codiemb fuse` on tiny-model checkpoints: same tensors as the streaming merge, clear refusals, recipes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from codiemb_pl.cli.main import main
from codiemb_pl.fusion.engine import Merge as ChunkedMerge
from codiemb_pl.fusion.engine import merge_state_dicts
from codiemb_pl.fusion.sources import MappingSource as MappedStateDictSource
from codiemb_pl.fusion.sources import open_checkpoint
from codiemb_pl.model.encoder import TextEncoder
from conftest import build_tiny_bert


def perturbed_encoder(model_dir: Path, seed: int, scale: float = 0.002) -> TextEncoder:
    encoder = TextEncoder(str(model_dir))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in encoder.model.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return encoder


@pytest.fixture(scope="module")
def family(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """A base sentence-transformers folder, two fine-tuned folders and a Lightning .ckpt of a third."""
    root = tmp_path_factory.mktemp("family")
    TextEncoder(str(tiny_model_dir), pooling="cls", prompts={"query": "query: "}).save(root / "base")
    paths = {"base": root / "base"}
    for index in range(2):
        perturbed_encoder(root / "base", index).save(root / f"ft{index}")
        paths[f"ft{index}"] = root / f"ft{index}"
    ckpt_encoder = perturbed_encoder(root / "base", 7)
    torch.save({"state_dict": {f"encoder.{key}": value for key, value in ckpt_encoder.state_dict().items()},
                "hyper_parameters": {"model_name_or_path": str(root / "base")}, "global_step": 3},
               root / "run.ckpt")
    paths["ckpt"] = root / "run.ckpt"
    return paths


def weights_of(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".ckpt":
        state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
        return {key[len("encoder.model."):]: value for key, value in state.items()}
    return load_file(str(path / "model.safetensors"))


def fuse(*args: str) -> int:
    return main(["fuse", *args])


@pytest.mark.parametrize("method, params", [
    ("delta_guided", {"gamma": 1.0}), ("ties", {"density": 0.3}), ("multi_slerp", {})])
def test_fuse_matches_the_streaming_merge_on_folders_and_ckpt(family, tmp_path, method, params):
    out = tmp_path / "fused"
    flags = [arg for key, value in params.items() for arg in ("--param", f"{key}={value}")]
    assert fuse("--base", str(family["base"]), "--model", str(family["ft0"]), "--model", str(family["ckpt"]),
                "--method", method, *flags, "--output", str(out)) == 0
    expected = merge_state_dicts(weights_of(family["base"]),
                                 [weights_of(family["ft0"]), weights_of(family["ckpt"])], method, params)
    merged = load_file(str(out / "model.safetensors"))
    assert merged.keys() == expected.keys()
    for key in expected:
        assert torch.equal(merged[key], expected[key]), key


def test_slices_equal_whole_tensor_merges():
    generator = torch.Generator().manual_seed(0)
    base = {"enc.layer.0.w": torch.randn(40, 6, generator=generator), "enc.layer.0.b": torch.randn(6, generator=generator),
            "scale": torch.tensor(1.5), "ids": torch.arange(4)}
    models = [{k: v + 0.1 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
               for k, v in base.items()} for _ in range(3)]
    for method, params in [("ties", {"density": 0.25}), ("delta_guided", {"granularity": "row", "gamma": 2.0}),
                           ("delta_guided", {"granularity": "layer"}), ("dare", {"drop_rate": 0.3})]:
        chunked = ChunkedMerge(MappedStateDictSource(base), [MappedStateDictSource(m) for m in models], method,
                               params, max_elements=12).state_dict()
        expected = merge_state_dicts(base, models, method, params)
        assert all(torch.equal(chunked[k], expected[k]) for k in expected), (method, params)
    chunked = ChunkedMerge(MappedStateDictSource(base), [MappedStateDictSource(m) for m in models], "delta_guided",
                           {"granularity": "tensor"}, max_elements=12).state_dict()
    expected = merge_state_dicts(base, models, "delta_guided", {"granularity": "tensor"})
    assert all(torch.allclose(chunked[k], expected[k], atol=1e-6) for k in expected)


def test_output_keeps_pooling_prompts_and_loads_in_sentence_transformers(family, tmp_path):
    from sentence_transformers import SentenceTransformer

    out = tmp_path / "fused"
    assert fuse("--base", str(family["base"]), "--model", str(family["ft0"]), "--model", str(family["ft1"]),
                "--method", "uniform_soup", "--output", str(out)) == 0
    for name in ("modules.json", "1_Pooling/config.json", "config_sentence_transformers.json"):
        base_json = json.loads((family["base"] / name).read_text())
        assert json.loads((out / name).read_text()) == base_json, name
    model = SentenceTransformer(str(out), device="cpu")
    ours = TextEncoder.load(out).encode(["a sentence to embed"], prompt="query: ")
    theirs = model.encode(["a sentence to embed"], prompt_name="query", convert_to_tensor=True)
    assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("method", ["delta_guided", "multi_slerp"])
def test_identical_checkpoints_fuse_to_themselves(family, tmp_path, method):
    out = tmp_path / "fused"
    assert fuse("--base", str(family["base"]), "--model", str(family["ft0"]), "--model", str(family["ft0"]),
                "--model", str(family["ft0"]), "--method", method, "--output", str(out)) == 0
    merged, original = load_file(str(out / "model.safetensors")), weights_of(family["ft0"])
    for key in original:
        torch.testing.assert_close(merged[key], original[key])


def test_one_checkpoint_fuses_to_itself(family, tmp_path):
    out = tmp_path / "fused"
    assert fuse("--base", str(family["base"]), "--model", str(family["ckpt"]), "--method", "ties",
                "--param", "density=1.0", "--output", str(out)) == 0
    merged, original = load_file(str(out / "model.safetensors")), weights_of(family["ckpt"])
    for key in original:
        torch.testing.assert_close(merged[key], original[key])


def _refused(capsys, out: Path, *args: str) -> str:
    code = fuse(*args, "--method", "uniform_soup", "--output", str(out))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("codiemb: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*")), "nothing written under the output name"
    return lines[0]


def test_mismatched_inputs_are_refused_with_one_line(family, tmp_path, capsys):
    wider = build_tiny_bert(tmp_path / "deeper", layers=3)
    line = _refused(capsys, tmp_path / "a", "--base", str(family["base"]), "--model", str(wider))
    assert "num_hidden_layers" in line and "architecture" in line

    reshaped = weights_of(family["ft0"])
    key = "embeddings.position_embeddings.weight"
    reshaped[key] = reshaped[key][:64].contiguous()
    (tmp_path / "bare").mkdir()
    save_file(reshaped, str(tmp_path / "bare" / "weights.safetensors"))
    line = _refused(capsys, tmp_path / "b", "--base", str(family["base"]), "--model",
                    str(tmp_path / "bare" / "weights.safetensors"))
    assert key in line and "shape" in line

    stranger = build_tiny_bert(tmp_path / "stranger", seed=5)
    line = _refused(capsys, tmp_path / "c", "--base", str(family["base"]), "--model", str(family["ft0"]),
                    "--model", str(stranger))
    assert "not a fine-tuned copy of the base" in line and str(stranger) in line


def test_yaml_recipe_with_weights_and_evaluation(family, tmp_path, capsys):
    recipe = {"base": str(family["base"]),
              "models": [{"path": str(family["ft1"]), "weight": 3.0}, {"path": str(family["ckpt"]), "weight": 1.0}],
              "method": "delta_guided", "parameters": {"gamma": 2.0}, "output": str(tmp_path / "fused"),
              "evaluate": [{"name": "sts_dev", "task": "sts", "path": "pkg://codiemb_pl/demo/sts_dev.jsonl",
                            "score_range": [0, 5], "max_samples": 20}]}
    (tmp_path / "fuse.yaml").write_text(yaml.safe_dump(recipe))
    assert fuse("--recipe", str(tmp_path / "fuse.yaml")) == 0
    assert "cosine_spearman" in capsys.readouterr().out
    expected = merge_state_dicts(weights_of(family["base"]), [weights_of(family["ft1"]), weights_of(family["ckpt"])],
                                 "delta_guided", {"gamma": 2.0}, weights=[3.0, 1.0])
    merged = load_file(str(tmp_path / "fused" / "model.safetensors"))
    assert all(torch.equal(merged[k], expected[k]) for k in expected)


def test_ckpt_base_takes_its_files_from_the_model_it_names(family, tmp_path):
    opened = open_checkpoint(family["ckpt"])
    assert opened.model_folder == str(family["base"]) and opened.config["hidden_size"] == 32
    out = tmp_path / "fused"
    assert fuse("--base", str(family["ckpt"]), "--model", str(family["ft0"]), "--method", "uniform_soup",
                "--output", str(out)) == 0
    assert TextEncoder.load(out).pooling == "cls"


def test_untrained_keys_only_some_inputs_carry_are_left_out():
    from codiemb_pl.fusion.compatibility import drop_unshared_untrained_keys

    weights = {"encoder.layer.0.w": torch.ones(2, 2)}
    hub_save = dict(weights, **{"pooler.dense.weight": torch.ones(2, 2), "embeddings.position_ids": torch.arange(4)})
    sources = drop_unshared_untrained_keys([MappedStateDictSource(hub_save), MappedStateDictSource(weights)])
    assert [source.keys() for source in sources] == [["encoder.layer.0.w"], ["encoder.layer.0.w"]]
    trained_only_in_one = drop_unshared_untrained_keys([MappedStateDictSource(dict(weights, extra=torch.ones(1))),
                                                        MappedStateDictSource(weights)])
    assert "extra" in trained_only_in_one[0].keys()   # a trained tensor is not dropped: the key check refuses it


def test_fused_output_has_a_model_card_with_method_inputs_weights_parameters_and_scores(family, tmp_path):
    from codiemb_pl.data.eval_sets import EvalSet
    from codiemb_pl.data.sources import SourceConfig, load_sts_pairs
    from codiemb_pl.evaluation.suite import evaluate_encoder

    source = {"name": "sts_dev", "task": "sts", "path": "pkg://codiemb_pl/demo/sts_dev.jsonl", "score_range": [0, 5],
              "max_samples": 20}
    recipe = {"base": str(family["base"]), "models": [{"path": str(family["ft1"]), "weight": 3.0},
                                                      {"path": str(family["ckpt"]), "weight": 1.0}],
              "method": "ties", "parameters": {"density": 0.5}, "output": str(tmp_path / "fused"), "evaluate": [source]}
    (tmp_path / "fuse.yaml").write_text(yaml.safe_dump(recipe))
    assert fuse("--recipe", str(tmp_path / "fuse.yaml")) == 0
    card = (tmp_path / "fused" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: sentence-transformers") and "Method: `ties`." in card
    assert f"| {family['ft1']} | 3.0000 |" in card and f"| {family['ckpt']} | 1.0000 |" in card
    assert "Parameters: density = 0.5000." in card and "model.encode_query([" in card
    sets = [EvalSet.from_sts("sts_dev", load_sts_pairs(SourceConfig(**source)), "")]
    per_set, _ = evaluate_encoder(TextEncoder.load(tmp_path / "fused"), sets)
    assert f"| `val/sts_dev/cosine_spearman` | {per_set['sts_dev']['cosine_spearman']:.4f} |" in card


def test_help_names_every_merge_method_and_parsing_imports_no_torch():
    import subprocess
    import sys

    from codiemb_pl.commands.fuse import build_parser
    from codiemb_pl.fusion.methods import MERGE_METHODS

    text = build_parser().format_help()
    assert all(name in text for name in MERGE_METHODS)
    code = ("import sys; from codiemb_pl.commands.fuse import build_parser; build_parser().format_help(); "
            "import codiemb_pl.commands.boom; print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.stdout.strip() == "False", result.stderr[-2000:]


def test_fusing_without_evaluation_imports_no_transformers(family, tmp_path):
    """The merge streams tensors from the files: no model is loaded, so the memory benchmark's baseline holds."""
    import subprocess
    import sys

    out = tmp_path / "fused"
    code = ("import runpy, sys\n"
            f"sys.argv = ['codiemb', 'fuse', '--base', {str(family['base'])!r}, '--model', {str(family['ft0'])!r},"
            f" '--model', {str(family['ckpt'])!r}, '--method', 'ties', '--output', {str(out)!r}]\n"
            "try:\n    runpy.run_module('codiemb_pl', run_name='__main__')\nexcept SystemExit as stop:\n"
            "    assert not stop.code, stop.code\n"
            "print('transformers' in sys.modules, 'lightning' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "False False"
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()
