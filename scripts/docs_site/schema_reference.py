"""The file formats the project reads besides fit configs, from the code that checks them: the sweep file
(`sweeps.schema.SweepFile`, its `fusion:` section `FusionSection`: field types, defaults, what each must be and an
example, as the one-line errors quote them), the `boom:` section (`commands.boom.YAML_OPTIONS` with the help of the
flag of the same name) and the `codiemb fuse` recipe (`commands.fuse.RECIPE_KEYS`, helped by the same flags)."""

from __future__ import annotations

import dataclasses
import typing

from docs_site.config_reference import type_name


def _cell(text: object) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def dataclass_rows(cls: type, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(cls)
    rows = ["| key | type | default | must be | example |", "|---|---|---|---|---|"]
    for field in dataclasses.fields(cls):
        if field.default_factory is not dataclasses.MISSING:
            default = repr(field.default_factory())
        else:
            default = repr(field.default)
        rows.append(f"| `{prefix}{field.name}` | `{_cell(type_name(hints[field.name]))}` | `{_cell(default)}` | "
                    f"{_cell(field.metadata.get('kind', ''))} | `{_cell(field.metadata.get('example', ''))}` |")
    return rows


def _types(value: object) -> str:
    kinds = value if isinstance(value, tuple) else (value,)
    return " or ".join(kind.__name__ for kind in kinds)


def option_help(parser, dest: str) -> str:
    for action in parser._actions:
        if action.dest == dest:
            return _cell(action.help or "")
    return ""


def markdown() -> str:
    from codiemb_pl.commands import boom, fuse
    from codiemb_pl.sweeps import schema

    boom_parser, fuse_parser = boom.build_parser(), fuse.build_parser()
    lines = [
        "# File formats: sweep files, `boom:` sections, fuse recipes", "",
        "Generated when the site is built from the classes and tables that check these files, so the keys, "
        "types and defaults are the ones the commands accept. A file with an unknown key or a wrong type stops "
        "with one line naming the file and the key (and the nearest valid key). Worked examples: "
        "[Sweeps](../sweeps.md), [BOOM](../boom.md), [Fusion](../fusion.md).", "",
        "## Sweep file (`codiemb sweep --sweep FILE`)", "",
        f"Top-level keys (`{schema.SweepFile.__name__}`). Overrides, run entries and grid keys are dotted fit "
        "config keys, as `codiemb fit --print_config` names them (see the [config reference](config.md)); every "
        "key of a run entry but `name` is an override.", "",
        *dataclass_rows(schema.SweepFile), "",
        "### `fusion:`", "",
        f"(`{schema.FusionSection.__name__}`.) `checkpoints` choices: `{schema.FINAL}` (the run's export) or a "
        "CheckpointFusion snapshot (`last`, `best_ir`, `best_sts`, `best`, `epochN`, `stepN`). Default `methods`: "
        + ", ".join(f"`{m['method']}`" + (f" {m['params']}" if m.get("params") else "")
                    for m in schema.DEFAULT_METHODS) + ".", "",
        *dataclass_rows(schema.FusionSection, "fusion."), "",
        "## `boom:` section (`codiemb boom --config FILE`)", "",
        "The keys of a YAML file's `boom:` mapping; the command-line flag of the same name (dashes for "
        "underscores) wins over the file. `overrides` is a mapping of dotted fit config keys, as in sweep files; "
        "any other top-level key of that file is a fit config piece.", "",
        "| key | type | what |", "|---|---|---|",
    ]
    for key, kinds in boom.YAML_OPTIONS.items():
        what = option_help(boom_parser, key) or ("a mapping of dotted fit config keys applied to every run"
                                                 if key == "overrides" else "")
        kinds = dict if key == "overrides" else kinds   # a list is read only to refuse it with the mapping to write
        lines.append(f"| `boom.{key}` | {_types(kinds)} | {what} |")
    recipe_only = {   # recipe keys whose shape differs from their flag's
        "models": "a list of `{path, weight}` mappings (weight optional): the checkpoints to merge",
        "parameters": "a mapping of the method's parameters (`{density: 0.2}`; flag: `--param KEY=VALUE`)",
        "evaluate": "a list of evaluation sets, as `data.val` entries: the merge is scored and the scores "
                    "go into its model card",
        "instruction_template": "as `data.instruction_template`, for the `evaluate` sets",
        "passage_prefix": "as `data.passage_prefix`, for the `evaluate` sets",
    }
    lines += ["", "## Fuse recipe (`codiemb fuse --recipe FILE`)", "",
              "Keys of a recipe; flags given beside `--recipe` override it.", "", "| key | what |", "|---|---|"]
    for key in fuse.RECIPE_KEYS:
        lines.append(f"| `{key}` | {recipe_only.get(key) or option_help(fuse_parser, key)} |")
    return "\n".join(lines) + "\n"
