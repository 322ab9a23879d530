"""The fusion leaderboard: `Candidate` rows (base θ0, checkpoints, merges) with their validation metrics,
ranked by one metric (`Leaderboard`, default `val/avg`, higher is better), shown as text, Markdown, JSON or
W&B table rows, and written to a folder (`write_leaderboard`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from codiemb_pl.storage.atomic import atomic_write_text

DEFAULT_METRIC = "val/avg"


@dataclass
class Candidate:
    """One leaderboard row: what it is, where its weights are, and its validation metrics."""

    name: str
    kind: str                    # "base" | "checkpoint" | "fused"
    method: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    weights_path: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    weights: list[float] | None = None

    def score(self, metric: str) -> float:
        """The value of `metric`; -inf when the candidate has none or it is not a finite number (ranked last)."""
        value = self.metrics.get(metric, math.nan)
        return value if isinstance(value, (int, float)) and math.isfinite(value) else -math.inf


@dataclass
class Leaderboard:
    """Candidates ranked by `metric` (higher is better; rows without it last); `skipped`: merges not made
    ({label: why}, e.g. a soup of one checkpoint)."""

    candidates: list[Candidate]
    metric: str = DEFAULT_METRIC
    skipped: dict[str, str] = field(default_factory=dict)

    def ranked(self) -> list[Candidate]:
        return sorted(self.candidates, key=lambda c: c.score(self.metric), reverse=True)

    def winner(self) -> Candidate | None:
        best = [c for c in self.ranked() if c.score(self.metric) > -math.inf]
        return best[0] if best else None

    def notes(self) -> list[str]:
        """What a reader of the table must not miss: the untrained base winning, merges that were skipped."""
        winner, notes = self.winner(), []
        if winner is not None and winner.kind == "base":
            notes.append(f"The base model (θ0, before any training) scores best by {self.metric}: no checkpoint and "
                         "no merge beat it, so the winner is the base model itself, unchanged. Training did not "
                         "improve these validation sets: check the learning rate, the training data and the "
                         "validation sets, or train longer.")
        notes += [f"Skipped {name}: {why}." for name, why in self.skipped.items()]
        return notes

    def table_rows(self) -> list[dict[str, Any]]:
        """One row per candidate, ranked: `rank`, `candidate`, `kind` and its metrics (a W&B table's rows)."""
        return [{"rank": rank, "candidate": c.name, "kind": c.kind, **c.metrics}
                for rank, c in enumerate(self.ranked(), 1)]

    def metric_names(self) -> list[str]:
        names = sorted({m for c in self.candidates for m in c.metrics})
        leading = [m for m in (self.metric, "val/ir_avg", "val/sts_avg") if m in names]
        return list(dict.fromkeys(leading + names))

    def to_json(self) -> str:
        winner = self.winner()
        data = {"metric": self.metric, "winner": getattr(winner, "name", None),
                "base_won": winner is not None and winner.kind == "base", "ranking": [asdict(c) for c in self.ranked()],
                "skipped": dict(self.skipped), "notes": self.notes()}
        return json.dumps(data, indent=2, default=str, allow_nan=True) + "\n"

    def _cells(self, candidate: Candidate, metrics: list[str]) -> list[str]:
        values = [f"{candidate.metrics[m]:.4f}" if m in candidate.metrics else "-" for m in metrics]
        return [candidate.name, candidate.kind] + values

    def to_markdown(self) -> str:
        metrics = self.metric_names()
        lines = ["| rank | candidate | kind | " + " | ".join(metrics) + " |",
                 "|---:|---|---|" + "---:|" * len(metrics)]
        for rank, candidate in enumerate(self.ranked(), 1):
            lines.append(f"| {rank} | " + " | ".join(self._cells(candidate, metrics)) + " |")
        return "\n".join(lines + [""] + [f"**Note:** {note}" for note in self.notes()]).rstrip() + "\n"

    def to_text(self) -> str:
        metrics = self.metric_names()
        headers = ["#", "candidate", "kind"] + [m.removeprefix("val/") for m in metrics]
        rows = [[str(rank)] + self._cells(c, metrics) for rank, c in enumerate(self.ranked(), 1)]
        widths = [max(len(row[i]) for row in rows + [headers]) for i in range(len(headers))]
        align = lambda row: "  ".join(cell.ljust(w) if i < 3 else cell.rjust(w)  # noqa: E731
                                      for i, (cell, w) in enumerate(zip(row, widths)))
        return "\n".join([align(headers), "-" * len(align(headers))] + [align(row) for row in rows]
                         + [f"note: {note}" for note in self.notes()])


def write_leaderboard(folder: str | os.PathLike, board: Leaderboard, title: str,
                      extra: Mapping[str, Any] | None = None) -> None:
    """`leaderboard.json` (the board, plus `extra` facts) and `leaderboard.md` (under `# TITLE (by `metric`)`),
    each written atomically."""
    record = board.to_json() if not extra else json.dumps({**json.loads(board.to_json()), **extra}, indent=2,
                                                          default=str) + "\n"
    atomic_write_text(Path(folder) / "leaderboard.md", f"# {title} (by `{board.metric}`)\n\n" + board.to_markdown())
    atomic_write_text(Path(folder) / "leaderboard.json", record)
