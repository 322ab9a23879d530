"""Diagrams of the documentation, drawn as SVG when the site is built (no JavaScript, no CDN: they render
offline in any browser).

- `flow_svg(steps)`: a left-to-right chain of boxes with arrows, wrapped into rows; used for one batch's data flow
  and for fit → checkpoints → fusion → export (`FLOWS`).
- `sampler_plan_svg()`: the step plan of every sampler policy for one small example, computed by
  `TaskBatchSampler.plan` itself: one cell per optimizer step, coloured by the sub-dataset it trains (a `mixed`
  or `joint` step is split by its share of IR and STS items).
"""

from __future__ import annotations

from html import escape

FONT = "font-family='system-ui, -apple-system, Segoe UI, Roboto, sans-serif'"
TASK_COLOURS = {"ir": "#3f7fbf", "sts": "#e0923f"}
SHADES = {"ir": ["#3f7fbf", "#8fbbe8", "#1f4f7f"], "sts": ["#e0923f", "#f5c993", "#9c5a17"]}


def dataset_colours(tasks: list[str]) -> list[str]:
    """One colour per sub-dataset: blues for IR, oranges for STS, shades in config order within a task."""
    seen = {task: 0 for task in SHADES}
    colours = []
    for task in tasks:
        colours.append(SHADES[task][seen[task] % len(SHADES[task])])
        seen[task] += 1
    return colours

FLOWS = {
    "batch-flow.svg": [
        ("TaskBatchSampler", "data/sampler.py", "one task, one sub-dataset per step, every rank"),
        ("token cache", "data/cache/", "memory-mapped Arrow token ids"),
        ("collate", "data/collate.py", "pad a group: queries, positives, negatives / sentence pairs"),
        ("objective", "losses/objectives.py", "embed the text groups, then score them"),
        ("gradient cache", "training/grad_cache.py", "optional: chunks of C texts, same gradients"),
        ("loss", "losses/ir.py · sts.py", "InfoNCE + cross-device negatives / Pearson, rank-KL, PRO, MidNCE"),
    ],
    "fit-to-export.svg": [
        ("codiemb fit", "cli/ · training/", "sampler steps, validation on data.val"),
        ("checkpoints", "checkpoints/", "last.ckpt (resume), epoch / best checkpoints"),
        ("snapshots", "fusion/snapshots/", "θ0 and encoder-only safetensors (CheckpointFusion)"),
        ("fusion", "fusion/ · workflows/fusion/", "merge, score every candidate, leaderboard"),
        ("export", "model/ · fusion/model/", "sentence-transformers folders with model cards"),
    ],
}


def _text(x: float, y: float, text: str, size: int, weight: str = "normal", colour: str = "#222") -> str:
    return (f"<text x='{x:.1f}' y='{y:.1f}' {FONT} font-size='{size}' font-weight='{weight}' fill='{colour}' "
            f"text-anchor='middle'>{escape(text)}</text>")


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return [*lines, line] if line else lines


def flow_svg(steps: list[tuple[str, str, str]], per_row: int = 3) -> str:
    """Boxes (title, where, what) joined by arrows, `per_row` boxes a row; rows read left to right."""
    box_w, box_h, gap_x, gap_y, pad = 210, 96, 54, 44, 12
    rows = (len(steps) + per_row - 1) // per_row
    width = pad * 2 + per_row * box_w + (per_row - 1) * gap_x
    height = pad * 2 + rows * box_h + (rows - 1) * gap_y
    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 {width} {height}' width='{width}' "
             f"height='{height}' role='img'>",
             "<defs><marker id='arrow' viewBox='0 0 10 10' refX='9' refY='5' markerWidth='7' markerHeight='7' "
             "orient='auto-start-reverse'><path d='M0,0 L10,5 L0,10 z' fill='#555'/></marker></defs>"]
    centres = []
    for index, (title, where, what) in enumerate(steps):
        row, col = divmod(index, per_row)
        x, y = pad + col * (box_w + gap_x), pad + row * (box_h + gap_y)
        centres.append((x, y))
        parts.append(f"<rect x='{x}' y='{y}' width='{box_w}' height='{box_h}' rx='10' fill='#f4f7fb' "
                     f"stroke='#3f7fbf' stroke-width='1.5'/>")
        parts.append(_text(x + box_w / 2, y + 22, title, 15, "bold"))
        parts.append(_text(x + box_w / 2, y + 40, where, 11, colour="#3f7fbf"))
        for k, line in enumerate(_wrap(what, 34)[:3]):
            parts.append(_text(x + box_w / 2, y + 60 + 14 * k, line, 11, colour="#444"))
    for (x0, y0), (x1, y1) in zip(centres, centres[1:]):
        if y1 == y0:   # same row: a straight arrow
            parts.append(f"<line x1='{x0 + box_w}' y1='{y0 + box_h / 2}' x2='{x1 - 2}' y2='{y1 + box_h / 2}' "
                         "stroke='#555' stroke-width='1.6' marker-end='url(#arrow)'/>")
        else:          # next row: down from the last box, across, down into the first
            mid = y0 + box_h + gap_y / 2
            parts.append(f"<polyline points='{x0 + box_w / 2},{y0 + box_h} {x0 + box_w / 2},{mid} "
                         f"{x1 + box_w / 2},{mid} {x1 + box_w / 2},{y1 - 2}' fill='none' stroke='#555' "
                         "stroke-width='1.6' marker-end='url(#arrow)'/>")
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


EXAMPLE = {"names": ["ir_a", "ir_b", "sts_c"], "tasks": ["ir", "ir", "sts"], "sizes": [96, 48, 32],
           "batch_sizes": [8, 8, 8], "seed": 1}
"""The example the step plan is drawn for: two IR sub-datasets and one smaller STS one, batch 8, one device."""


def sampler_plans(example: dict = EXAMPLE) -> dict[str, list[tuple[int, str, float]]]:
    """`{policy: [(sub-dataset, task, IR share of the step's items), ...]}` from `TaskBatchSampler.plan(0)`."""
    from codiemb_pl.data.sampler import MIXED_DATASET, POLICIES, TaskBatchSampler

    plans = {}
    for policy in POLICIES:
        sampler = TaskBatchSampler(example["sizes"], example["tasks"], example["batch_sizes"], policy=policy,
                                   seed=example["seed"], names=example["names"])
        steps = []
        for batch in sampler.plan(0):
            if batch.dataset == MIXED_DATASET:
                ir = sum(sampler.tasks[sampler.dataset_of(i)] == "ir" for i in batch.indices)
                steps.append((MIXED_DATASET, batch.task, ir / len(batch.indices)))   # mixed or joint
            else:
                steps.append((batch.dataset, batch.task, 1.0 if batch.task == "ir" else 0.0))
        plans[policy] = steps
    return plans


def sampler_plan_svg(example: dict = EXAMPLE) -> str:
    plans = sampler_plans(example)
    cell, label_w, pad, row_h = 16, 110, 10, 30
    longest = max(len(steps) for steps in plans.values())
    legend_h = 28
    width = pad * 2 + label_w + longest * cell + 30   # room for the step count
    colours = dataset_colours(example["tasks"])
    height = pad * 2 + legend_h + len(plans) * row_h + 18
    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 {width} {height}' width='{width}' "
             f"height='{height}' role='img'>"]
    x = pad
    for index, name in enumerate(example["names"]):   # legend
        parts.append(f"<rect x='{x}' y='{pad}' width='{cell}' height='{cell}' fill='{colours[index]}'/>")
        label = f"{name} ({example['tasks'][index]}, {example['sizes'][index]} items)"
        parts.append(f"<text x='{x + cell + 5}' y='{pad + 12}' {FONT} font-size='12'>{escape(label)}</text>")
        x += cell + 12 + 7 * len(label)
    for row, (policy, steps) in enumerate(plans.items()):
        y = pad + legend_h + row * row_h
        parts.append(f"<text x='{pad + label_w - 8}' y='{y + cell - 3}' {FONT} font-size='13' text-anchor='end'>"
                     f"{escape(policy)}</text>")
        for k, (dataset, task, ir_share) in enumerate(steps):
            cx = pad + label_w + k * cell
            if task in ("mixed", "joint"):
                ir_h = cell * ir_share
                parts.append(f"<rect x='{cx}' y='{y}' width='{cell - 2}' height='{ir_h:.1f}' "
                             f"fill='{TASK_COLOURS['ir']}'/>")
                parts.append(f"<rect x='{cx}' y='{y + ir_h:.1f}' width='{cell - 2}' height='{cell - ir_h:.1f}' "
                             f"fill='{TASK_COLOURS['sts']}'/>")
            else:
                parts.append(f"<rect x='{cx}' y='{y}' width='{cell - 2}' height='{cell}' "
                             f"fill='{colours[dataset]}'/>")
        parts.append(f"<text x='{pad + label_w + len(steps) * cell + 4}' y='{y + cell - 3}' {FONT} font-size='11' "
                     f"fill='#666'>{len(steps)}</text>")
    parts.append(f"<text x='{pad + label_w}' y='{height - pad}' {FONT} font-size='11' fill='#666'>optimizer steps "
                 "of epoch 0, left to right (number: steps per epoch); mixed, joint: IR share on top</text>")
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def plan_table(example: dict = EXAMPLE) -> str:
    """The same plans as a markdown table: steps per policy and per sub-dataset."""
    plans = sampler_plans(example)
    names = example["names"]
    lines = ["| policy | steps | " + " | ".join(names) + " | both tasks |", "|---|---:|" + "---:|" * (len(names) + 1)]
    for policy, steps in plans.items():
        counts = [sum(1 for d, _, _ in steps if d == i) for i in range(len(names))]
        mixed = sum(1 for _, task, _ in steps if task in ("mixed", "joint"))
        lines.append(f"| `{policy}` | {len(steps)} | " + " | ".join(map(str, counts)) + f" | {mixed} |")
    return "\n".join(lines)
