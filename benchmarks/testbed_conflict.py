"""The test bed's task-conflict rows (issue 25): the gradient-conflict probe on the bed's fits, the dev-set choice of
task-routed LoRA's learning rate, the cross-fusion members (different data mixes and learning rates), and their part
of the results page (targets, per-layer conflict table and plot, paired bootstrap).

- **Probe** (`TestbedRow.probe`): the fit gets `data.val` = the suite's dev sets (`Suite.dev_sets()`: STS-B dev pairs
  and SciFact train queries no bed run trains on, written once as a small BEIR folder in the workdir) and
  `model.conflict_every: PROBE_EVERY`, with `trainer.limit_val_batches: 0` (the sets feed the probe only; no
  validation pass). The probe draws its batches from those sets, never from the training stream, and puts every RNG
  state back, so the row trains what it trained without it (`tests/test_joint_training.py`). The logged
  `conflict/...` series are read back from the run's CSV log into the results (`conflict_series`).
- **Dev-set choice of the learning rate** (`TestbedRow.lr_grid`): every candidate trains once at `SELECTION_SEED`
  with the bed's budget and is scored on the dev sets (never on a test set); the best dev `avg` is the row's lr at
  every seed (the candidate at the chosen lr is the row's seed-42 run itself).
- **Mixes** (`TestbedRow.mix`): a fraction of each training source's capped records (a prefix of the same seeded
  shuffle, so every mix is a subset of the bed's data and the SciFact hold-out stays unseen).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from experiment_runs import DATA_SEED, TRAIN_SOURCES, config_key, dev_sets_config
from experiments import bootstrap_lines, compare, log
from testbed_selection import SELECTION_SEED, best_by_dev, dev_scores, load_state, save_state

from codiemb_pl.storage.atomic import atomic_directory
from codiemb_pl.training.gradient_conflict import group_order

if TYPE_CHECKING:   # testbed imports this module
    from testbed import Testbed, TestbedRow

PROBE_EVERY = 6          # optimizer steps between conflict measurements (36 steps: 6 measurements)
HOLDOUT_SPLIT = "dev"
COMPARISONS = (          # (A, B) pairs of the issue-25 paired bootstrap per seed; best_member / best_joint resolved
    ("student", "naive_joint"),
    ("best_joint", "joint_sum"),
    ("task_lora_fused", "student"),
    ("cross_delta_fusion", "best_member"),
    ("cross_delta_fusion", "cross_uniform_soup"),
    ("cross_delta_fusion", "union_run"),
)


# -- data: mixes and the probe's validation sets --------------------------------------------------------------
def mixed_caps(bed: "Testbed", mix: dict[str, float]) -> dict[str, int]:
    """Records per training source of a mix: round(fraction · the budget's cap), at least one batch of its task."""
    budget = bed.budgets.train
    caps = {}
    for source in TRAIN_SOURCES:
        cap = getattr(budget, source.cap)
        batch = budget.ir_batch_size if source.task == "ir" else budget.sts_batch_size
        caps[source.name] = max(batch, round(mix.get(source.name, 1.0) * cap))
    return caps


def apply_mix(config: dict[str, Any], caps: dict[str, int]) -> None:
    """Cap every `data.train` entry of a fit config at its mix's records (same DATA_SEED: a prefix of the subset)."""
    for entry in config["data"]["train"]:
        entry["max_samples"] = min(caps[entry["name"]], entry.get("max_samples") or caps[entry["name"]])
        entry["seed"] = DATA_SEED


def holdout_folder(bed: "Testbed") -> Path:
    """The SciFact-train hold-out of `bed.dev_sets()` written once as a BEIR folder (split `dev`)."""
    key = config_key({"dev": dev_sets_config(bed.budgets), "mined": bed.mined_path().name})
    folder = bed.workdir / "dev" / f"scifact_holdout_{key}"
    if (folder / "qrels" / f"{HOLDOUT_SPLIT}.tsv").is_file():
        return folder
    vset = next(v for v in bed.dev_sets() if v.task == "ir")
    with atomic_directory(folder) as staging:
        (staging / "qrels").mkdir(parents=True)
        lines = [json.dumps({"_id": doc, "title": "", "text": text}) for doc, text in zip(vset.doc_ids,
                                                                                           vset.texts["corpus"])]
        (staging / "corpus.jsonl").write_text("\n".join(lines) + "\n", "utf-8")
        lines = [json.dumps({"_id": q, "text": text}) for q, text in zip(vset.query_ids, vset.texts["query"])]
        (staging / "queries.jsonl").write_text("\n".join(lines) + "\n", "utf-8")
        judged = [f"{q}\t{doc}\t{grade}" for q in vset.query_ids for doc, grade in sorted(vset.qrels.get(q, {}).items())]
        (staging / "qrels" / f"{HOLDOUT_SPLIT}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(judged)
                                                                 + "\n", "utf-8")
    return folder


def probe_config(bed: "Testbed") -> dict[str, Any]:
    """What a probed row adds to its unit (its key): the dev sets' config and the probe's period."""
    return {"every": PROBE_EVERY, "val": dev_sets_config(bed.budgets)}


def add_probe(bed: "Testbed", config: dict[str, Any]) -> None:
    """`data.val` = the dev sets (STS-B dev first 500 pairs, the SciFact hold-out folder), the probe on, no
    validation pass."""
    budget = bed.budgets.eval
    config["data"]["val"] = [
        {"name": "stsb_dev", "task": "sts", "path": str(bed.data / "sts/stsb/dev.jsonl"), "score_range": [0, 5],
         "max_samples": budget.dev_sts_samples, "seed": budget.documents_seed},
        {"name": "scifact_dev", "task": "ir", "path": str(holdout_folder(bed)), "split": HOLDOUT_SPLIT}]
    config["model"]["conflict_every"] = PROBE_EVERY
    config["trainer"]["limit_val_batches"] = 0


def conflict_series(folder: Path) -> dict[str, dict[str, float]]:
    """{step: {metric: value}} of the `conflict/...` columns of a fit's CSV log (`folder/logs/version_*/`)."""
    logs = sorted((folder / "logs").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    series: dict[str, dict[str, float]] = {}
    if not logs:
        return series
    with open(logs[-1], newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            values = {k: float(v) for k, v in row.items() if k and k.startswith("conflict/") and v not in ("", None)}
            if values:
                series.setdefault(str(int(row["step"])), {}).update(values)
    return series


# -- dev-set choice of a learning rate -------------------------------------------------------------------------
def chosen_lr(bed: "Testbed", row: "TestbedRow", train: bool = True) -> tuple[Optional[float], list[dict[str, Any]]]:
    """(the grid's lr with the best dev avg, [{lr, unit, dev}] of the scored candidates); None until all are scored
    (with `train`, the missing candidates are trained at SELECTION_SEED and scored now)."""
    path = bed.workdir / "selection" / f"{row.name}_{config_key(bed.unit_of(row, SELECTION_SEED))}.json"
    state = load_state(path)
    scored = []
    for lr in row.lr_grid:
        unit = bed.unit_of(row, SELECTION_SEED, lr=lr)
        key = config_key(unit)
        if key not in state and train:
            log(f"selection: {row.name} lr {lr:g} at seed {SELECTION_SEED}")
            state[key] = {"lr": lr, "dev": dev_scores(bed, bed.train_unit(unit) / "model")}
            log(f"selection: {row.name} lr {lr:g}: dev {state[key]['dev']}")
            save_state(path, state)
        if key in state:
            scored.append({**state[key], "unit": key})
    if len(scored) < len(row.lr_grid):
        return None, scored
    return best_by_dev(scored)["lr"], scored


# -- report ------------------------------------------------------------------------------------------------------
def resolve(bed: "Testbed", name: str, means: dict[str, Optional[float]]) -> Optional[str]:
    """A comparison side: `best_member` (the cross members' best overall mean), `best_joint` (PCGrad or MGDA),
    else the row itself."""
    group = {"best_member": [r.name for r in bed.rows.values() if r.mix],
             "best_joint": ["joint_pcgrad", "joint_mgda"]}.get(name)
    if group is None:
        return name
    measured = {n: means[n] for n in group if means.get(n) is not None}
    return max(measured, key=measured.get) if measured else None


def paired_comparisons(bed: "Testbed", means: dict[str, Optional[float]]) -> dict[str, Any]:
    """The paired bootstrap per seed of `COMPARISONS` (best_* sides resolved on the current means) from the saved
    per-item values, for the pairs whose items are all present; a pair already computed for the same two runs is
    kept (`issue25_runs` holds their keys), and so is what `bed.results.comparisons` holds for pairs without items
    here."""
    import torch

    from paired_comparison import paired_bootstrap_sets

    out = dict(bed.results.comparisons.get("issue25", {}))
    runs = dict(bed.results.comparisons.get("issue25_runs", {}))
    labels = []
    for a, b in COMPARISONS:
        a, b = resolve(bed, a, means), resolve(bed, b, means)
        if a is None or b is None:
            continue
        label = f"{a} vs {b}"
        labels.append(label)
        for seed in bed.testbed.seeds:
            ka, kb = bed.row_key(bed.rows[a], seed), bed.row_key(bed.rows[b], seed)
            paths = [(name, bed.items_path(ka, name), bed.items_path(kb, name)) for name in bed.set_keys]
            done = runs.get(label, {}).get(str(seed)) == [ka, kb] and str(seed) in out.get(label, {})
            if done or not all(pa.is_file() and pb.is_file() for _, pa, pb in paths):
                continue
            sets = [(bed.sets()[name], torch.load(pa), torch.load(pb)) for name, pa, pb in paths]
            out.setdefault(label, {})[str(seed)] = paired_bootstrap_sets(sets, bed.budgets.eval.bootstrap_resamples,
                                                                         seed)
            runs.setdefault(label, {})[str(seed)] = [ka, kb]
            bed.results.comparisons.update(issue25=out, issue25_runs=runs)
            bed.results.save()
    return {label: out[label] for label in labels if label in out}   # a `best_*` side may have changed since


def conflict_means(bed: "Testbed", row: "TestbedRow") -> dict[str, dict[int, tuple[float, int]]]:
    """{layer group (`all` = the whole gradient): {step: (mean cosine over seeds, seeds)}} of a probed row."""
    values: dict[str, dict[int, list[float]]] = {}
    for seed in bed.testbed.seeds:
        entry = bed.results.entries.get(bed.row_key(row, seed), {})
        for step, metrics in (entry.get("info", {}).get("conflict") or {}).items():
            for metric, value in metrics.items():
                parts = metric.split("/")
                if parts[-1] != "cosine":
                    continue
                group = "all" if len(parts) == 2 else parts[1]
                values.setdefault(group, {}).setdefault(int(step), []).append(value)
    order = ["all"] + group_order([group for group in values if group != "all"])   # model order: embeddings first
    return {group: {step: (sum(v) / len(v), len(v)) for step, v in sorted(values[group].items())}
            for group in order if group in values}


def write_conflict_plot(path: Path, series: dict[str, dict[str, dict[int, tuple[float, int]]]]) -> None:
    """One panel per probed row: the IR-STS gradient cosine per layer group over training (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [name for name, groups in series.items() if groups]
    fig, axes = plt.subplots(1, len(rows), figsize=(5.2 * len(rows), 3.8), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], rows):
        for group, steps in series[name].items():
            ax.plot(list(steps), [mean for mean, _ in steps.values()], marker="o", markersize=3,
                    linewidth=2.2 if group == "all" else 1.2, color="black" if group == "all" else None, label=group)
        ax.axhline(0.0, color="grey", linewidth=0.8, linestyle="--")
        ax.set_title(f"`{name}`", fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("cos(g_IR, g_STS), mean over seeds")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def conflict_lines(bed: "Testbed", plot: Path, report: Path) -> list[str]:
    """The per-layer conflict table of the probed rows (cosine per group and step, mean over seeds) and its plot."""
    probed = [row for row in bed.rows.values() if row.probe]
    series = {row.name: conflict_means(bed, row) for row in probed}
    if not any(series.values()):
        return ["- not measured yet (rerun the probed rows: " + ", ".join(f"`{r.name}`" for r in probed) + ")"]
    write_conflict_plot(plot, series)
    lines = [f"IR–STS gradient cosine on fixed probe batches (one global training batch each of STS-B dev and the "
             f"SciFact-train hold-out), every {PROBE_EVERY} steps before the step, per layer group and over the whole "
             f"gradient (`all`); mean over the seeds measured (n). Plot: [conflict.png]"
             f"({plot.relative_to(report.parent).as_posix()}).", ""]
    steps = sorted({step for groups in series.values() for per in groups.values() for step in per})
    lines += ["| row | group | " + " | ".join(f"step {s}" for s in steps) + " | n |",
              "|---|---|" + "---:|" * (len(steps) + 1)]
    for name, groups in series.items():
        for group in groups:
            cells = [f"{groups[group][s][0]:+.3f}" if s in groups[group] else "—" for s in steps]
            seeds = max(n for _, n in groups[group].values())
            lines.append(f"| `{name}` | {group} | " + " | ".join(cells) + f" | {seeds} |")
    return lines


def selection_lines(bed: "Testbed") -> list[str]:
    lines = []
    for row in (r for r in bed.rows.values() if r.lr_grid):
        lr, scored = chosen_lr(bed, row, train=False)
        lines.append(f"`{row.name}`: lr from {list(row.lr_grid)}, each trained once at seed {SELECTION_SEED} and "
                     "scored on the dev sets (×100); chosen: " + (f"**{lr:g}**" if lr is not None else
                                                                "not yet (candidates missing)"))
        if not scored:
            continue
        lines += ["", "| lr | " + " | ".join(k for k in scored[0]["dev"] if k != "avg") + " | dev avg |",
                  "|---:|" + "---:|" * len(scored[0]["dev"])]
        for entry in scored:
            cells = [f"{100 * v:.2f}" for k, v in entry["dev"].items() if k != "avg"]
            lines.append(f"| {entry['lr']:g} | " + " | ".join(cells) + f" | {100 * entry['dev']['avg']:.2f} |")
    return lines


def overall_scores(per_seed: dict[str, Any]) -> tuple[dict[str, list[float]], dict[str, Optional[float]]]:
    """({row: its overall score at each measured seed}, {row: their mean, None when unmeasured})."""
    overall = {name: [r["avg"] for r in rows.values() if r["avg"] is not None] for name, rows in per_seed.items()}
    return overall, {name: (sum(v) / len(v) if v else None) for name, v in overall.items()}


def target_lines(bed: "Testbed", overall: dict[str, list[float]], means: dict[str, Optional[float]]) -> list[str]:
    """Issue 25's targets with the tie rule (a difference of means under the larger seed sd is a tie)."""
    lines = []

    def versus(a: Optional[str], b: Optional[str], margin: float = 0.0, label: str = "", beyond_sd: bool = False,
               target: bool = True) -> None:
        """One comparison line: ✓/✗ for a target (≥, or + margin, or beyond the sd: the tie rule's `better`),
        the verdict alone for a plain comparison (`target=False`)."""
        if a is None or b is None or not overall.get(a) or not overall.get(b):
            lines.append(f"- {label or f'`{a}` ≥ `{b}`'}: not measured yet".replace("`None`", "—"))
            return
        c = compare(overall[a], overall[b])
        met = c["difference"] >= margin and (c["verdict"] == "better" if beyond_sd else
                                             margin > 0 or c["verdict"] != "worse")
        lines.append(f"- {label or f'`{a}` ≥ `{b}`'}{f' + {margin}' if margin else ''}: {c['difference']:+.2f} "
                     f"(sd {c['sd']:.2f}, {c['verdict']}, seeds {len(overall[a])}/{len(overall[b])})"
                     + (f" → {'✓' if met else '✗'}" if target else ""))

    versus("student", "naive_joint", label="`student` (CoDiEmb) ≥ `naive_joint` beyond the sd", beyond_sd=True)
    best_joint = resolve(bed, "best_joint", means)
    for other in ("joint_sum", "naive_joint", "student"):
        versus(best_joint, other, label=f"best of PCGrad/MGDA (`{best_joint}`) vs `{other}`", target=False)
    versus("task_lora_fused", "student", label="`task_lora_fused` vs full-parameter `student`", target=False)
    best_member = resolve(bed, "best_member", means)
    versus("cross_delta_fusion", best_member, 0.3, label=f"`cross_delta_fusion` ≥ best member (`{best_member}`)")
    versus("cross_delta_fusion", "cross_uniform_soup")
    versus("cross_delta_fusion", "union_run")
    return lines


def issue25_lines(bed: "Testbed", per_seed: dict[str, Any], plot: Path, report: Path) -> list[str]:
    """The results page's task-conflict section."""
    overall, means = overall_scores(per_seed)
    members = [row for row in bed.rows.values() if row.mix]
    caps = {row.name: mixed_caps(bed, row.mix) for row in members}
    lines = ["## Task conflict (issue 25)", "", "### Targets", "", *target_lines(bed, overall, means), "",
             "### Per-layer gradient conflict", "", *conflict_lines(bed, plot, report), "",
             "### Cross-fusion members (data mix and learning rate differ)", "",
             "| member | SciFact / SNLI / STS-B records | lr | steps |", "|---|---|---:|---:|"]
    for row in members:
        lr = row.overrides.get("lr", bed.testbed.lr)
        lines.append(f"| `{row.name}` | {' / '.join(str(v) for v in caps[row.name].values())} | {lr:g} | "
                     f"{bed.testbed.max_steps * row.step_factor} |")
    union = bed.rows.get("union_run")
    if union is not None:
        records = " / ".join(str(max(c[s] for c in caps.values())) for s in caps[members[0].name])
        lines.append(f"| `union_run` (control) | {records} | {union.overrides.get('lr', bed.testbed.lr):g} | "
                     f"{bed.testbed.max_steps * union.step_factor} |")
    lines += ["", "### Dev-set choice of task-routed LoRA's learning rate", "", *(selection_lines(bed) or ["—"]), "",
              "### Paired bootstrap per seed (test sets, ×100; overall = mean of the task averages)", ""]
    comparisons = paired_comparisons(bed, means)
    lines += bootstrap_lines(comparisons) if comparisons else ["- no pair with per-item values yet"]
    return lines
