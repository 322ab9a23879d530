"""Project commands beside LightningCLI's (`codiemb fuse`, `codiemb evaluate`, ...).

Each module in this package registers its command with `codiemb_pl.cli.register_command` when imported;
`import_all()` imports them all (the CLI calls it before dispatching).
"""

from __future__ import annotations

import importlib
import pkgutil


def import_all() -> None:
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
