"""Plain-text metric tables printed by the CLI and callbacks."""

from __future__ import annotations

import statistics


def format_metrics_table(per_set: dict[str, dict[str, float]], summary: dict[str, float], title: str) -> str:
    """A plain-text table: one row per validation set, one column per metric, then the averages."""
    metrics = sorted({m for values in per_set.values() for m in values})
    width = max([len(n) for n in per_set] + [8])
    lines = [title, f"{'set':<{width}}  " + "  ".join(f"{m:>15}" for m in metrics)]
    for name, values in per_set.items():
        lines.append(f"{name:<{width}}  " + "  ".join(
            f"{values[m]:>15.4f}" if m in values else f"{'':>15}" for m in metrics))
    for key, value in summary.items():
        lines.append(f"{key:<{width}}  {value:>15.4f}")
    return "\n".join(lines)


def comparison_table(history: list[tuple[str, dict[str, float]]]) -> str:
    """Rows: validation metrics; columns: the labelled validation passes (e.g. start, final)."""
    if not history:
        return ""
    keys = sorted({k for _, metrics in history for k in metrics})
    width = max(len(k) for k in keys)
    header = f"{'metric':<{width}}  " + "  ".join(f"{label:>12}" for label, _ in history)
    lines = [header, "-" * len(header)]
    for key in keys:
        cells = [f"{metrics[key]:>12.4f}" if key in metrics else f"{'':>12}" for _, metrics in history]
        lines.append(f"{key:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def hard_negative_report(name: str, distinct_counts, n_negatives: int) -> str:
    """How the `n_negatives` hard-negative slots of an IR sub-dataset are really filled, from the number of
    distinct negatives of each record (the collate's rule, `data.collate.pick_fixed_count`): a record with
    more draws N of them, one with fewer repeats them (re-sampled) to fill the N slots, one with none has
    its slots masked out (when others in its batch have negatives)."""
    counts = [int(c) for c in distinct_counts]
    if not counts or n_negatives <= 0:
        return ""
    low, median, high = min(counts), statistics.median(counts), max(counts)
    line = (f"[codiemb] {name}: {n_negatives} hard-negative slot{'s' if n_negatives != 1 else ''} per query; "
            f"records have {low:g}/{median:g}/{high:g} distinct hard negatives (min/median/max)")
    fewer = sum(0 < c < n_negatives for c in counts)
    empty = sum(c == 0 for c in counts)
    if fewer:
        line += f"; {fewer} of {len(counts)} records have fewer than {n_negatives} and repeat theirs to fill the slots"
    if empty:
        line += f"; {empty} have none (their slots are masked out)"
    return line
