"""The package's layers: every import runs downward and no modules import each other in a circle.

Every module of `codiemb_pl` is parsed (nothing is imported): module-level and function-level (lazy) imports,
`import a.b`, `from a import b` (a module `a.b` when there is one, else the names of `a/__init__.py`), relative
imports and `importlib.import_module("codiemb_pl....")` with a literal name. Importing `a.b.c` also runs the
`__init__.py` of `a.b` (and of `a`), so an importer depends on those packages too (except the packages it sits
in itself, already running when it runs). The layer list is the one `docs/ARCHITECTURE.md` states.
"""

from __future__ import annotations

import ast
import functools
import re
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "codiemb_pl"
PACKAGE_DIR = REPO_ROOT / PACKAGE
ARCHITECTURE = REPO_ROOT / "docs" / "ARCHITECTURE.md"

LAYERS: list[list[str]] = [
    ["__init__", "errors", "paths"],
    ["storage"],
    ["model"],
    ["losses"],
    ["data"],
    ["evaluation"],
    ["fusion"],
    ["workflows"],
    ["training"],
    ["callbacks"],
    ["cli"],
    ["sweeps"],
    ["commands"],
    ["cli.main", "__main__"],
]
"""Bottom to top, names relative to `codiemb_pl` (`__init__` = the package root); a module belongs to the layer
of the longest name that is it or one of its packages. A module may import its own layer and those below."""

MAX_ROOT_MODULES = 8
LIGHTNING_HOMES = ("training", "callbacks", "cli", "sweeps", "data.datamodule")
"""The only places (names relative to `codiemb_pl`, a folder or a module) that may import Lightning."""


@dataclass(frozen=True)
class Import:
    importer: str     # dotted module name
    target: str       # dotted module name inside the package
    file: Path
    line: int
    run_by: str = ""  # for a package's __init__.py run by importing one of its modules: that module


def module_files() -> dict[str, Path]:
    """`{dotted module name: file}` of every module of the package (a package's name is its `__init__.py`)."""
    modules = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def _resolve_relative(importer: str, level: int, module: str | None, modules: dict[str, Path]) -> str:
    base = importer.split(".") if _is_package(importer, modules) else importer.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, *([module] if module else [])])


def _literal_import_module(node: ast.Call) -> str | None:
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if name != "import_module" or not node.args:
        return None
    first = node.args[0]
    return first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else None


def _existing(name: str, modules: dict[str, Path]) -> str | None:
    """The module `name`, or the nearest package above it that exists (a name imported from a module)."""
    parts = name.split(".")
    while parts:
        if ".".join(parts) in modules:
            return ".".join(parts)
        parts.pop()
    return None


def imports_of(importer: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    """Every import of a package module in `path`, wherever it stands in the file."""
    found: list[Import] = []

    def add(target: str, line: int) -> None:
        resolved = _existing(target, modules)
        if resolved is not None and resolved != importer:
            found.append(Import(importer, resolved, path, line))

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            source = (_resolve_relative(importer, node.level, node.module, modules) if node.level
                      else node.module or "")
            if source != PACKAGE and not source.startswith(PACKAGE + "."):
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                add(submodule if submodule in modules else source, node.lineno)
        elif isinstance(node, ast.Call):
            name = _literal_import_module(node)
            if name and (name == PACKAGE or name.startswith(PACKAGE + ".")):
                add(name, node.lineno)
    return found


def _packages_run_by(imp: Import) -> list[str]:
    """The packages whose `__init__.py` importing `imp.target` runs, beyond those the importer sits in."""
    own = {".".join(imp.importer.split(".")[:k]) for k in range(1, imp.importer.count(".") + 2)}
    parts = imp.target.split(".")
    return [p for p in (".".join(parts[:k]) for k in range(2, len(parts))) if p not in own]


@functools.lru_cache(maxsize=1)
def all_imports() -> tuple[Import, ...]:
    modules = module_files()
    edges = []
    for name, path in modules.items():
        for imp in imports_of(name, path, modules):
            edges.append(imp)
            edges += [Import(imp.importer, package, imp.file, imp.line, imp.target) for package in _packages_run_by(imp)]
    return tuple(edges)


def layer_of(module: str, layers: list[list[str]] = LAYERS) -> int | None:
    relative = "__init__" if module == PACKAGE else module[len(PACKAGE) + 1:]
    best, best_length = None, -1
    for index, names in enumerate(layers):
        for name in names:
            if (relative == name or relative.startswith(name + ".")) and len(name) > best_length:
                best, best_length = index, len(name)
    return best


def layer_name(index: int) -> str:
    return "/".join(LAYERS[index])


def upward_imports(edges: tuple[Import, ...] | list[Import]) -> list[str]:
    problems = []
    for imp in edges:
        low, high = layer_of(imp.importer), layer_of(imp.target)
        if imp.run_by and layer_of(imp.run_by) == high:
            continue    # said already by the import of the module itself
        if low is not None and high is not None and high > low:
            how = f" (its __init__.py, run by importing {imp.run_by})" if imp.run_by else ""
            problems.append(f"{imp.file.relative_to(REPO_ROOT)}:{imp.line}: {imp.importer} (layer "
                            f"{layer_name(low)}) imports {imp.target}{how} (layer {layer_name(high)}, above it)")
    return sorted(set(problems))


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one node (iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return components


def import_cycles(edges: tuple[Import, ...] | list[Import]) -> list[str]:
    graph: dict[str, set[str]] = {}
    where: dict[tuple[str, str], Import] = {}
    for imp in edges:
        graph.setdefault(imp.importer, set()).add(imp.target)
        graph.setdefault(imp.target, set())
        where.setdefault((imp.importer, imp.target), imp)
    problems = []
    for component in strongly_connected(graph):
        members = set(component)
        ties = [f"{where[a, b].file.relative_to(REPO_ROOT)}:{where[a, b].line} {a} -> {b}"
                for a in component for b in sorted(graph[a] & members)]
        problems.append(f"circle of {len(component)} modules: " + "; ".join(ties))
    return problems


def stated_layers() -> list[list[str]]:
    """The layer list in the `<!-- layers -->` ... `<!-- /layers -->` block of docs/ARCHITECTURE.md, bottom first."""
    text = ARCHITECTURE.read_text(encoding="utf-8")
    match = re.search(r"<!-- layers -->(.*?)<!-- /layers -->", text, re.S)
    assert match, f"{ARCHITECTURE}: no <!-- layers --> ... <!-- /layers --> block"
    rows = []
    for line in match.group(1).splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("```"):
            rows.append(line.split())
    return rows[::-1]    # the block draws the top layer first


def test_every_import_runs_downward():
    problems = upward_imports(all_imports())
    assert not problems, f"{len(problems)} imports run upward:\n" + "\n".join(problems)


def test_no_modules_import_each_other_in_a_circle():
    problems = import_cycles(all_imports())
    assert not problems, "\n".join(problems)


def test_every_module_has_a_layer():
    missing = [name for name in module_files() if layer_of(name) is None]
    assert not missing, f"modules in no layer (add them to LAYERS and docs/ARCHITECTURE.md): {missing}"


def test_the_layers_are_the_ones_the_architecture_page_states():
    assert stated_layers() == LAYERS


def lightning_importers() -> list[str]:
    """`file:line module` of every import of Lightning (module-level or lazy) in the package."""
    found = []
    for name, path in module_files().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if any(n.split(".")[0] in ("lightning", "pytorch_lightning") for n in names):
                found.append((name, f"{path.relative_to(REPO_ROOT)}:{node.lineno}"))
    return sorted(found)


def test_lightning_is_imported_only_in_its_layers():
    outside = [f"{where} {name}" for name, where in lightning_importers()
               if not any(name == f"{PACKAGE}.{home}" or name.startswith(f"{PACKAGE}.{home}.") for home in LIGHTNING_HOMES)
               or name == f"{PACKAGE}.cli.main"]
    assert not outside, "Lightning imported outside training/, callbacks/, cli/, sweeps/, data/datamodule.py:\n" + \
        "\n".join(outside)
    assert any(name == f"{PACKAGE}.training.module" for name, _ in lightning_importers())   # the walk sees imports


def test_the_package_root_keeps_few_modules():
    root = sorted(p.name for p in PACKAGE_DIR.glob("*.py"))
    assert len(root) <= MAX_ROOT_MODULES, root


# The checker itself, on small made-up packages: it must see what it claims to see.

def _toy_package(tmp_path: Path, files: dict[str, str]) -> dict[str, Path]:
    modules = {}
    for relative, source in files.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source, encoding="utf-8")
        parts = list(Path(relative).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def test_the_checker_sees_lazy_relative_and_literal_dynamic_imports(tmp_path):
    modules = _toy_package(tmp_path, {
        "codiemb_pl/__init__.py": "",
        "codiemb_pl/model/__init__.py": "",
        "codiemb_pl/model/lora.py": "def f():\n    from codiemb_pl.fusion import sources\n",
        "codiemb_pl/model/pooling.py": "from ..fusion.sources import open_checkpoint\n",
        "codiemb_pl/model/card.py": "import importlib\nimportlib.import_module('codiemb_pl.fusion.sources')\n",
        "codiemb_pl/model/device.py": "import codiemb_pl.fusion.sources as s\nfrom codiemb_pl.fusion import Merge\n",
        "codiemb_pl/fusion/__init__.py": "Merge = 1\n",
        "codiemb_pl/fusion/sources.py": "",
    })
    found = {(imp.importer, imp.target, imp.line)
             for name in modules for imp in imports_of(name, modules[name], modules)}
    assert found == {("codiemb_pl.model.lora", "codiemb_pl.fusion.sources", 2),
                     ("codiemb_pl.model.pooling", "codiemb_pl.fusion.sources", 1),
                     ("codiemb_pl.model.card", "codiemb_pl.fusion.sources", 2),
                     ("codiemb_pl.model.device", "codiemb_pl.fusion.sources", 1),
                     ("codiemb_pl.model.device", "codiemb_pl.fusion", 2)}


def test_the_checker_reports_upward_imports_and_circles():
    a, b = Path(PACKAGE_DIR / "model" / "lora.py"), Path(PACKAGE_DIR / "fusion" / "sources.py")
    edges = [Import("codiemb_pl.model.lora", "codiemb_pl.fusion.sources", a, 7),
             Import("codiemb_pl.fusion.sources", "codiemb_pl.model.lora", b, 9),
             Import("codiemb_pl.cli.run_folder", "codiemb_pl.errors", b, 3)]
    assert upward_imports(edges) == [
        "codiemb_pl/model/lora.py:7: codiemb_pl.model.lora (layer model) imports codiemb_pl.fusion.sources "
        "(layer fusion, above it)"]
    assert import_cycles(edges) == [
        "circle of 2 modules: codiemb_pl/fusion/sources.py:9 codiemb_pl.fusion.sources -> codiemb_pl.model.lora; "
        "codiemb_pl/model/lora.py:7 codiemb_pl.model.lora -> codiemb_pl.fusion.sources"]
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_importing_a_module_depends_on_the_packages_it_runs():
    imp = Import("codiemb_pl.sweeps.sweep", "codiemb_pl.cli.lightning", PACKAGE_DIR, 1)
    assert _packages_run_by(imp) == ["codiemb_pl.cli"]
    inside = Import("codiemb_pl.callbacks.fusion", "codiemb_pl.callbacks.export", PACKAGE_DIR, 1)
    assert _packages_run_by(inside) == []
    assert layer_of("codiemb_pl.cli.main") == len(LAYERS) - 1
    assert layer_of("codiemb_pl.cli.lightning") == LAYERS.index(["cli"])
    assert layer_of("codiemb_pl") == 0
