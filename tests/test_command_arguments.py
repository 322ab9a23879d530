"""The project commands' shared argument parser: one-line errors and `--config` YAML files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from codiemb_pl.cli.main import main
from codiemb_pl.commands.evaluate import build_parser as evaluate_parser
from codiemb_pl.commands.mine_negatives import build_parser as mine_parser
from codiemb_pl.errors import InputError


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_yaml_values_are_parsed_like_flags_and_the_command_line_wins(tmp_path):
    config = write(tmp_path / "eval.yaml", 'model: m1\nsts: [a=x.jsonl]\nbatch-size: "16"\nsts_range: [0, 5]\n'
                                          "geometry: true\n")
    args = evaluate_parser().parse_args(["--config", str(config)])
    assert (args.model, args.sts, args.batch_size, args.sts_range, args.geometry) == \
        ("m1", ["a=x.jsonl"], 16, [0, 5], True)
    assert (args.ir, args.split, args.max_length) == ([], "test", None)      # untouched defaults
    args = evaluate_parser().parse_args(["--config", str(config), "--sts", "b=y", "--batch-size", "8"])
    assert (args.model, args.sts, args.batch_size) == ("m1", ["b=y"], 8)    # a repeatable flag replaces the list


def test_later_files_override_earlier_ones_and_positionals_come_from_yaml(tmp_path):
    first = write(tmp_path / "a.yaml", "data: beir\nmodel: m\noutput: out.jsonl\nrange: [2, 4]\n")
    second = write(tmp_path / "b.yaml", "model: other\nno_margin: true\n")
    args = mine_parser().parse_args(["--config", str(first), "--config", str(second)])
    assert (args.data, args.model, args.output, args.range, args.no_margin) == ("beir", "other", "out.jsonl",
                                                                                [2, 4], True)
    assert mine_parser().parse_args(["given", "--config", str(first)]).data == "given"


@pytest.mark.parametrize("text, message", [
    ("batch_sise: 3\n", "batch_sise: unknown option (did you mean batch_size?"),
    ("- model\n", "must be a mapping of option names to values"),
    ("geometry: 1\n", "geometry: expected true or false"),
    ("sts_range: [0]\n", "sts_range: expected a list of 2 values"),
    ("batch_size: many\n", "batch_size: invalid value 'many'"),
    ("model: [a, b]\n", "model: expected a single value"),
    ("model: [\n", "is not valid YAML"),
])
def test_bad_yaml_is_one_error_naming_file_and_key(tmp_path, text, message):
    config = write(tmp_path / "bad.yaml", text)
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("(", r"\(").replace("?", r"\?")):
        evaluate_parser().parse_args(["--config", str(config), "--model", "m"])


def test_missing_config_and_missing_required_options_are_one_line(tmp_path, capsys):
    assert main(["evaluate", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml: no such file" in capsys.readouterr().err
    config = write(tmp_path / "partial.yaml", "batch_size: 4\n")
    assert main(["evaluate", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "required: --model" in err and len([l for l in err.splitlines() if l.startswith("codiemb: error:")]) == 1


def test_evaluate_from_a_config_file_equals_the_flags(tiny_model_dir, tmp_path, capsys):
    pairs = write(tmp_path / "pairs.jsonl", "".join(json.dumps({"sentence1": f"a sentence {i}", "sentence2": f"text {i}",
                                                                 "score": i % 5}) + "\n" for i in range(8)))
    flags_out, config_out = tmp_path / "flags.json", tmp_path / "config.json"
    assert main(["evaluate", "--model", str(tiny_model_dir), "--sts", f"pairs={pairs}", "--batch-size", "3",
                 "--instruction", "pairs=compare", "--output", str(flags_out)]) == 0
    config = write(tmp_path / "evaluate.yaml", f"model: {tiny_model_dir}\nsts: [pairs={pairs}]\nbatch_size: 3\n"
                                               f"instruction: [pairs=compare]\noutput: {config_out}\n")
    assert main(["evaluate", "--config", str(config)]) == 0, capsys.readouterr().err
    assert json.loads(config_out.read_text()) == json.loads(flags_out.read_text())
