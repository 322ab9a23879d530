"""The run's resolved `config.yaml`, written atomically.

LightningCLI's `SaveConfigCallback` writes `config.yaml` into the run's log folder (`trainer.log_dir`) in place:
a run killed while writing it left an empty or truncated file under that name (found by
`benchmarks/kill_anywhere.py`). `DurableSaveConfigCallback` is that callback with the parser's `save` going
through `storage.atomic.atomic_file` (a temporary beside the file, flushed, renamed): the previous file or
the new one, complete. Remote log folders (`s3://...`, written through fsspec) keep Lightning's own write.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.cli import SaveConfigCallback

from codiemb_pl.storage.atomic import atomic_file


class AtomicSaveParser:
    """`parser` whose `save(config, path, ...)` of a local single file writes through `atomic_file`; every other
    attribute is the parser's own."""

    def __init__(self, parser: Any):
        self._parser = parser

    def __getattr__(self, name: str) -> Any:
        return getattr(self._parser, name)

    def save(self, config: Any, path: str, *args: Any, **kwargs: Any) -> None:
        if "://" in str(path) or kwargs.get("multifile"):
            return self._parser.save(config, path, *args, **kwargs)
        with atomic_file(Path(path)) as temporary:   # the temporary exists: the parser must overwrite it
            self._parser.save(config, str(temporary), *args, **{**kwargs, "overwrite": True})


class DurableSaveConfigCallback(SaveConfigCallback):
    """LightningCLI's `SaveConfigCallback`, writing `config.yaml` atomically (`AtomicSaveParser`)."""

    def __init__(self, parser: Any, config: Any, *args: Any, **kwargs: Any):
        super().__init__(parser, config, *args, **kwargs)
        self.parser = AtomicSaveParser(parser)
