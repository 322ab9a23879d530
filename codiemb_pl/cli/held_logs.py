"""Hold Lightning's start-up log lines (`Seed set to`, `GPU available`, tips) until the input is checked.

A run with a bad file or key must end with its one error line and nothing before it; a good run shows
the same lines as always, only a moment later. While held, the records of Lightning's loggers are
kept instead of shown; `release()` hands every kept record to its logger's own handlers, in order;
`discard()` (the run failed) shows only the warnings and errors among them.
"""

from __future__ import annotations

import logging

LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")


class _KeepRecords(logging.Handler):
    def __init__(self):
        super().__init__(logging.NOTSET)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class HeldLogs:
    """Divert the records of `names` (and their child loggers) into a list until `release` or `discard`."""

    def __init__(self, names: tuple[str, ...] = LIGHTNING_LOGGERS):
        self.names = names
        self.keeper = _KeepRecords()
        self.saved: dict[str, tuple[list[logging.Handler], bool]] | None = None

    @property
    def holding(self) -> bool:
        return self.saved is not None

    def hold(self) -> "HeldLogs":
        if self.saved is None:
            self.saved = {}
            for name in self.names:
                logger = logging.getLogger(name)
                self.saved[name] = (logger.handlers[:], logger.propagate)
                logger.handlers, logger.propagate = [self.keeper], False
        return self

    def release(self) -> None:
        """Restore the loggers and show every held record."""
        self._stop(lambda record: True)

    def discard(self) -> None:
        """Restore the loggers and show only the held warnings and errors."""
        self._stop(lambda record: record.levelno >= logging.WARNING)

    def _stop(self, show) -> None:
        if self.saved is None:
            return
        for name, (handlers, propagate) in self.saved.items():
            logger = logging.getLogger(name)
            logger.handlers, logger.propagate = handlers, propagate
        self.saved = None
        records, self.keeper.records = self.keeper.records, []
        for record in records:
            if show(record):
                logging.getLogger(record.name).handle(record)
