"""The config reference of `codiemb fit`: every `model.*` and `data.*` key, and the init arguments of the project's
callbacks, with type, default and docstring, read from the parser LightningCLI itself builds.

`fit_keys(parser)` walks the actions of `codiemb fit`'s jsonargparse parser (`cli.lightning.build_fit_parser`: the
signatures of `CoDiEmbModule.__init__` and `CoDiEmbDataModule.__init__` with their docstrings, as LightningCLI reads
them); the settings classes those keys take (`SourceConfig`, `STSLossConfig`, `LoraSettings`, `DistillationConfig`,
`TeacherSettings`) and the callbacks are
read from their signatures and docstrings the same way (`docstring_parser`, jsonargparse's own). `markdown()` is the
page; `tests/test_docs_reference.py` checks its keys against `codiemb fit --print_config`.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from dataclasses import dataclass
from typing import Any, Optional

SECTIONS = ("model", "data")
CALLBACKS = ("codiemb_pl.callbacks.ExportEncoder", "codiemb_pl.callbacks.CheckpointFusion",
             "codiemb_pl.callbacks.TrainingMonitor", "codiemb_pl.callbacks.interruption.GracefulInterruption")


@dataclass(frozen=True)
class Key:
    """One config key: dotted name, type as written in the signature, default (`repr`), description."""

    name: str
    type: str
    default: str
    doc: str


def type_name(hint: Any) -> str:
    """A type hint as a reader writes it: `Optional[list[SourceConfig]]`, not `typing.Optional[list[codiemb...]]`."""
    text = hint.__name__ if isinstance(hint, type) and not typing.get_args(hint) else str(hint)
    text = text.replace("typing.", "").replace("NoneType", "None")
    return re.sub(r"\b(?:[a-z_][a-z0-9_]*\.)+([A-Za-z_][A-Za-z0-9_]*)", r"\1", text)


def _default(value: Any) -> str:
    if value is inspect.Parameter.empty or value is dataclasses.MISSING:
        return "required"
    if isinstance(value, str) and value == "==SUPPRESS==":
        return ""
    return repr(value)


def _one_line(text: Optional[str]) -> str:
    return " ".join((text or "").split())


def fit_keys(parser: Any = None) -> list[Key]:
    """Every `model.*` and `data.*` key of `codiemb fit`'s parser, in signature order."""
    from jsonargparse._link_arguments import ActionLink

    if parser is None:
        from codiemb_pl.cli.lightning import build_fit_parser

        parser = build_fit_parser()
    keys = []
    for action in parser._actions:
        section = action.dest.split(".", 1)[0]
        if section not in SECTIONS or "." not in action.dest or action.dest.endswith(".help"):
            continue
        hint = getattr(action, "_typehint", None)
        doc = _one_line(action.help)
        if isinstance(action, ActionLink):
            hint = action.target[1]._typehint if hasattr(action.target[1], "_typehint") else hint
            source = ", ".join(s[0] for s in action.source)
            doc = f"{doc} *Set by the CLI from `{source}`; not a key of the config file.*".strip()
            default = ""
        else:
            default = _default(action.default)
        keys.append(Key(action.dest, type_name(hint) if hint is not None else "", default, doc))
    return keys


def linked_keys(parser: Any = None) -> set[str]:
    """The keys the CLI fills from other keys (`--print_config` leaves them out)."""
    from jsonargparse._link_arguments import ActionLink

    if parser is None:
        from codiemb_pl.cli.lightning import build_fit_parser

        parser = build_fit_parser()
    return {action.dest for action in parser._actions if isinstance(action, ActionLink)}


def _documented(cls: type) -> dict[str, str]:
    """`{parameter: description}` from the class docstring and its `__init__`'s (jsonargparse reads the same)."""
    import docstring_parser

    found: dict[str, str] = {}
    for text in (cls.__doc__, getattr(cls.__init__, "__doc__", None)):
        if text and text is not object.__init__.__doc__:
            for param in docstring_parser.parse(text).params:
                for name in param.arg_name.replace(" ", "").split(","):
                    found.setdefault(name, _one_line(param.description))
    return found


def class_keys(cls: type, prefix: str) -> list[Key]:
    """The fields of a settings dataclass or the init arguments of a class, as `Key`s under `prefix`."""
    docs = _documented(cls)
    hints = typing.get_type_hints(cls.__init__ if not dataclasses.is_dataclass(cls) else cls)
    if dataclasses.is_dataclass(cls):
        params = [(f.name, f.default if f.default_factory is dataclasses.MISSING else f.default_factory())
                  for f in dataclasses.fields(cls) if f.init]
    else:
        params = [(p.name, p.default) for p in inspect.signature(cls.__init__).parameters.values()
                  if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return [Key(f"{prefix}{name}", type_name(hints.get(name, Any)), _default(default), docs.get(name, ""))
            for name, default in params]


def nested_classes() -> list[tuple[str, type]]:
    """The settings classes `model.*` / `data.*` keys take, with the key prefix they appear under."""
    from codiemb_pl.data.sources import SourceConfig
    from codiemb_pl.losses.distillation import DistillationConfig
    from codiemb_pl.losses.sts import STSLossConfig
    from codiemb_pl.model.lora import LoraSettings
    from codiemb_pl.model.teacher import TeacherSettings

    return [("data.train[].", SourceConfig), ("model.sts_loss.", STSLossConfig), ("model.lora.", LoraSettings),
            ("model.distillation.", DistillationConfig), ("model.distillation.teacher.", TeacherSettings)]


def callback_classes() -> list[type]:
    import importlib

    classes = []
    for path in CALLBACKS:
        module, name = path.rsplit(".", 1)
        classes.append(getattr(importlib.import_module(module), name))
    return classes


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table(keys: list[Key]) -> list[str]:
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    rows += [f"| `{k.name}` | `{_cell(k.type)}` | {('`' + _cell(k.default) + '`') if k.default else ''} | "
             f"{_cell(k.doc)} |" for k in keys]
    return rows


def _summary(cls: type) -> str:
    doc = inspect.getdoc(cls) or ""
    return _one_line(doc.split("\n\n", 1)[0])


def markdown(parser: Any = None) -> str:
    """The config reference page."""
    keys = fit_keys(parser)
    lines = [
        "# Config reference: `codiemb fit`",
        "",
        "Generated when the site is built, from the parser `codiemb fit` itself builds (LightningCLI reading the "
        "signatures and docstrings of `CoDiEmbModule` and `CoDiEmbDataModule`), so it lists exactly the keys "
        "`codiemb fit --print_config` prints. `trainer.*` keys are Lightning's own "
        "([Trainer reference](https://lightning.ai/docs/pytorch/stable/common/trainer.html)); "
        "`codiemb fit --help` lists them. Set a key in a YAML file (`model:` / `data:` sections) or on the "
        "command line (`--data.policy balanced`).",
        "",
    ]
    for section in SECTIONS:
        lines += [f"## `{section}.*`", "", *table([k for k in keys if k.name.startswith(section + ".")]), ""]
    lines += ["## Settings objects", "",
              "Keys whose value is a mapping (or a list of mappings): their fields, read from the same "
              "dataclasses LightningCLI instantiates.", ""]
    for prefix, cls in nested_classes():
        lines += [f"### `{prefix.rstrip('.')}`: `{cls.__name__}`", "", _summary(cls), "",
                  *table(class_keys(cls, prefix)), ""]
    lines += ["## Callbacks", "",
              "The project's callbacks go under `trainer.callbacks` as `{class_path, init_args}` entries "
              "(`configs/quickstart.yaml` has ExportEncoder and CheckpointFusion; `codiemb fit` adds "
              "GracefulInterruption itself). Their `init_args`:", ""]
    for cls in callback_classes():
        path = f"{cls.__module__}.{cls.__name__}"
        lines += [f"### `{cls.__name__}`", "", f"`class_path: {path}`. {_summary(cls)}", "",
                  *table(class_keys(cls, "")), ""]
    return "\n".join(lines)
