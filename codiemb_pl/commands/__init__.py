"""Project commands beside LightningCLI's (`codiemb fuse`, `codiemb evaluate`, ...).

Each module in this package registers its command with `register_command` (into `EXTRA_COMMANDS`, which
`codiemb_pl.cli.main` dispatches to) when imported. `discover()` finds the commands without importing
anything (it reads each module's source for its `@register_command("NAME")` line and the first line of its
docstring), so `codiemb --help` and the dispatch stay fast; `load(name)` imports the one module that defines
`name` (the lazy dispatch); `import_all()` imports them all.
"""

from __future__ import annotations

import ast
import functools
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

EXTRA_COMMANDS: dict[str, Callable[[list[str]], int]] = {}
"""Project commands registered in this process (`register_command`), by name."""


def register_command(name: str):
    """Register a project command (`codiemb NAME ...`) handled outside LightningCLI."""
    def decorate(fn: Callable[[list[str]], int]):
        EXTRA_COMMANDS[name] = fn
        return fn
    return decorate


@dataclass(frozen=True)
class CommandInfo:
    """Where a project command is defined and what it does (its module docstring's first sentence)."""

    name: str
    module: str
    summary: str


@functools.lru_cache(maxsize=None)
def discover() -> dict[str, CommandInfo]:
    """`{name: CommandInfo}` of every `@register_command("name")` in this package, found by parsing, not importing."""
    found: dict[str, CommandInfo] = {}
    for info in pkgutil.iter_modules(__path__):
        module = f"{__name__}.{info.name}"
        tree = ast.parse(Path(info.module_finder.path, f"{info.name}.py").read_text(encoding="utf-8")) \
            if not info.ispkg else None
        if tree is None:
            continue
        for name in _registered_names(tree):
            found[name] = CommandInfo(name, module, _summary(ast.get_docstring(tree) or ""))
    return found


def _registered_names(tree: ast.Module) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for decorator in node.decorator_list:
                if (isinstance(decorator, ast.Call) and getattr(decorator.func, "id", getattr(decorator.func, "attr", ""))
                        == "register_command" and decorator.args and isinstance(decorator.args[0], ast.Constant)):
                    names.append(decorator.args[0].value)
    return names


def _summary(docstring: str) -> str:
    """The docstring's first line without its "`codiemb NAME`: " lead-in."""
    first = docstring.strip().splitlines()[0] if docstring.strip() else ""
    if first.startswith("`codiemb") and "`:" in first:
        first = first.split("`:", 1)[1].strip()
    return first.rstrip(".")


def load(name: str) -> None:
    """Import the module that registers command `name`."""
    importlib.import_module(discover()[name].module)


def import_all() -> None:
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
