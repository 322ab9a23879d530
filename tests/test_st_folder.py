"""model.st_folder: one reader of a model folder's JSON files, used by TextEncoder, the prompt settings and fusion.

A broken file is the same one line whichever of them reads it; the settings read back are those `save` wrote.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from codiemb_pl.errors import InputError
from codiemb_pl.fusion.sources import open_checkpoint
from codiemb_pl.model.encoder import TextEncoder
from codiemb_pl.model.prompts import PromptSettings, folder_prompt_settings

FIX = "(repair or re-export the model folder)"
READERS = {"encoder": TextEncoder.load, "prompts": folder_prompt_settings, "fusion": open_checkpoint}


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("st_folder") / "export"
    TextEncoder(str(tiny_model_dir), pooling="cls", normalize=False, max_seq_length=64,
                prompts={"query": "query: "}, include_prompt=False).save(folder)
    return folder


def reader_errors(folder: Path) -> dict[str, str]:
    """{reader: its InputError's message} for the readers of `folder` that refuse it."""
    errors = {}
    for name, read in READERS.items():
        try:
            read(folder)
        except InputError as error:
            errors[name] = str(error)
    return errors


@pytest.mark.parametrize("file", ["modules.json", "config_sentence_transformers.json", "1_Pooling/config.json",
                                  "sentence_bert_config.json"])
@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe{}"], ids=["syntax", "not-utf8"])
def test_a_broken_file_is_the_same_line_from_every_reader(exported, tmp_path, file, content):
    folder = tmp_path / "model"
    shutil.copytree(exported, folder)
    (folder / file).write_bytes(content)
    errors = reader_errors(folder)
    assert "encoder" in errors and (file != "modules.json" or set(errors) == set(READERS)), errors
    assert len(set(errors.values())) == 1, errors
    line = errors["encoder"]
    assert line.startswith(f"{folder / file}: is not valid JSON (") and line.endswith(FIX), line


def test_a_modules_json_that_is_not_a_list_of_modules_is_one_line(exported, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(exported, folder)
    for content in ({"0": "sentence_transformers.models.Transformer"}, ["sentence_transformers.models.Pooling"]):
        (folder / "modules.json").write_text(json.dumps(content))
        errors = reader_errors(folder)
        assert set(errors) == set(READERS) and set(errors.values()) == {
            f"{folder / 'modules.json'}: is not a list of modules {FIX}"}, errors


def test_settings_read_back_are_those_save_wrote(exported, tiny_model_dir):
    from codiemb_pl.model.st_folder import SentenceTransformersSettings, read_settings, transformer_folder

    assert read_settings(exported) == SentenceTransformersSettings(
        transformer_subfolder="", pooling_modes=("cls",), include_prompt=False, normalize=False, max_seq_length=64,
        do_lower_case=False, prompts={"query": "query: "}, default_prompt_name=None, other_module_types=())
    assert folder_prompt_settings(exported) == PromptSettings({"query": "query: "}, None, False)
    assert read_settings(tiny_model_dir) is None and folder_prompt_settings(tiny_model_dir) is None
    assert transformer_folder(exported) == exported and transformer_folder(tiny_model_dir) == tiny_model_dir


def test_pooling_modes_from_the_v5_key_and_the_legacy_flags():
    from codiemb_pl.model.st_folder import pooling_modes

    assert pooling_modes({"pooling_mode": "lasttoken"}) == ("lasttoken",)
    assert pooling_modes({"pooling_mode": ["mean", "max"], "pooling_mode_cls_token": True}) == ("mean", "max")
    assert pooling_modes({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}) == ("cls",)
    assert pooling_modes({"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True}) == ("max", "mean")
    assert pooling_modes({"word_embedding_dimension": 32}) == ("mean",)


def test_an_old_layout_with_the_transformer_in_a_subfolder_loads_alike(exported, tmp_path):
    """sentence-transformers 2.x kept the transformer in 0_Transformer/ (modules.json names the path)."""
    from codiemb_pl.model.st_folder import read_settings, transformer_folder

    folder = tmp_path / "old"
    shutil.copytree(exported, folder)
    (folder / "0_Transformer").mkdir()
    for item in list(folder.iterdir()):
        if item.is_file() and item.name not in ("modules.json", "config_sentence_transformers.json", "README.md"):
            item.rename(folder / "0_Transformer" / item.name)
    modules = json.loads((folder / "modules.json").read_text())
    modules[0]["path"] = "0_Transformer"
    (folder / "modules.json").write_text(json.dumps(modules))

    assert transformer_folder(folder) == folder / "0_Transformer"
    assert read_settings(folder) == read_settings(exported).__class__(
        **{**vars(read_settings(exported)), "transformer_subfolder": "0_Transformer"})
    texts = ["query: a man plays a guitar", "two dogs run on the beach"]
    old, new = TextEncoder.load(folder), TextEncoder.load(exported)
    assert (old.pooling, old.normalize, old.max_seq_length, old.include_prompt, old.prompts) == \
        ("cls", False, 64, False, {"query": "query: "})
    torch.testing.assert_close(old.encode(texts, prompt_name="query"), new.encode(texts, prompt_name="query"))
    assert open_checkpoint(folder).model_folder == str(folder / "0_Transformer")
