"""Dev-set selection of the test bed's distillation weights and temperatures (issue 23).

Each family below is a small grid of `model.distillation` settings. Every candidate trains the student once, at
`SELECTION_SEED`, with the bed's budget, and is scored on the suite's dev sets (`Suite.dev_sets()`: 500 STS-B dev
pairs and 100 SciFact train queries that no training run saw, over 500 documents) — never on a test set. The
candidate with the best dev `avg` (mean of STS-B dev Spearman and SciFact dev nDCG@10) is the family's choice; the
`*_dev` rows of the bed train it at every seed. Families chain: the online teacher's and the embedding rows' grids
start from the score-distillation choice of weight and temperatures, so the whole selection costs
len(score_kd) + len(online) + len(embedding) fits (the recipe's settings are among them and are reused from the
cache when the bed already trained them).

Selection state lives in `<workdir>/selection/<family>.json` (each candidate's dev scores, keyed by its unit).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from experiment_runs import HEADLINE
from experiments import log

from codiemb_pl.storage.atomic import atomic_write_text

if TYPE_CHECKING:   # testbed imports this module
    from testbed import Testbed, TestbedRow

SELECTION_SEED = 42
RECIPE_TEMPERATURE = 0.05


def score_kd_grid() -> list[dict[str, Any]]:
    """λ_KD over {0.5, 1, 2, 4} at τ 0.05 (the recipe's), and τ_teacher = τ_student over {0.02, 0.1} at λ 1."""
    grid = [(weight, RECIPE_TEMPERATURE) for weight in (0.5, 1.0, 2.0, 4.0)] + [(1.0, 0.02), (1.0, 0.1)]
    return [{"ir_weight": weight, "scores_from": "data", "teacher_temperature": tau, "student_temperature": tau}
            for weight, tau in grid]


def online_grid(chosen_kd: dict[str, Any], teacher: dict[str, Any]) -> list[dict[str, Any]]:
    """The score-distillation choice with the teacher run online, and its STS blend β over {0.25, 0.5, 1}."""
    base = {key: value for key, value in chosen_kd.items() if key != "scores_from"}
    return [{**base, "sts_weight": beta, "teacher": teacher} for beta in (0.25, 0.5, 1.0)]


def embedding_grid(teacher: dict[str, Any]) -> list[dict[str, Any]]:
    """Embedding distillation (MSE to the online teacher's embeddings) with λ_E over {0.25, 1, 4}."""
    return [{"embedding_weight": weight, "scores_from": "data", "teacher": teacher,
             "teacher_temperature": RECIPE_TEMPERATURE, "student_temperature": RECIPE_TEMPERATURE}
            for weight in (0.25, 1.0, 4.0)]


FAMILIES = ("score_kd", "online_teacher", "embedding_kd")


def dev_scores(bed: "Testbed", model: Path) -> dict[str, float]:
    """Headline metric per dev set and their `avg` (the summary's mean of the task averages) of the saved `model`."""
    from codiemb_pl.model.encoder import TextEncoder
    from codiemb_pl.workflows.evaluation import evaluate_sets

    encoder = TextEncoder(str(model), max_seq_length=bed.budgets.eval.max_length)
    dev = bed.dev_sets()
    per_set, summary = evaluate_sets(encoder, dev, batch_size=bed.budgets.eval.batch_size)
    return {**{vset.name: per_set[vset.name][HEADLINE[vset.task]] for vset in dev}, "avg": summary["avg"]}


def best_by_dev(scored: list[dict[str, Any]]) -> dict[str, Any]:
    """The scored candidate ({..., dev: {..., avg}}) with the best dev avg: every dev-set choice of the bed."""
    return max(scored, key=lambda entry: entry["dev"]["avg"])


def load_state(path: Path) -> dict[str, Any]:
    """A selection state written by `save_state` ({} before the first candidate is scored)."""
    return json.loads(path.read_text("utf-8")) if path.is_file() else {}


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write a selection state (candidates' dev scores) atomically, so a killed selection keeps what it scored."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(state, indent=1, sort_keys=True) + "\n")


class Selection:
    """The dev-set selection of the bed's distillation families: `resolve(row, train=True)` trains and scores the
    missing candidates; everything else only reads what is scored (the report never trains)."""

    def __init__(self, bed: "Testbed"):
        self.bed = bed
        self.folder = Path(bed.workdir) / "selection"

    def candidates(self, family: str, train: bool = False) -> list[dict[str, Any]]:
        from testbed import TEACHER_SETTINGS

        if family == "score_kd":
            return score_kd_grid()
        if family == "online_teacher":
            chosen = self.choice("score_kd", train)
            return online_grid(chosen, TEACHER_SETTINGS) if chosen else []
        if family == "embedding_kd":
            return embedding_grid(TEACHER_SETTINGS)
        raise ValueError(f"unknown selection family {family!r}; known: {FAMILIES}")

    def state(self, family: str) -> dict[str, Any]:
        return load_state(self.folder / f"{family}.json")

    def scored(self, family: str, train: bool = False) -> list[dict[str, Any]]:
        """[{distillation, dev: {set: headline, avg}, unit}] of every candidate of `family`, training and scoring
        the missing ones when `train` (else only those already scored)."""
        state, out = self.state(family), []
        for candidate in self.candidates(family, train):
            row = self.candidate_row(family, candidate)
            key = self.bed.row_key(row, SELECTION_SEED)
            if key not in state and train:
                state[key] = {"distillation": candidate, "dev": self.dev_score(row)}
                save_state(self.folder / f"{family}.json", state)
            if key in state:
                out.append({**state[key], "unit": key})
        return out

    def choice(self, family: str, train: bool = False) -> Optional[dict[str, Any]]:
        """The candidate with the best dev avg, once every candidate of the family is scored; else None."""
        scored = self.scored(family, train)
        if not scored or len(scored) < len(self.candidates(family)):
            return None
        return best_by_dev(scored)["distillation"]

    def candidate_row(self, family: str, distillation: dict[str, Any]) -> "TestbedRow":
        from testbed import TestbedRow

        return TestbedRow(f"select_{family}", f"dev-set selection candidate ({family})", distillation=distillation)

    def dev_score(self, row: "TestbedRow") -> dict[str, float]:
        """Train `row` at the selection seed (cached like every bed fit) and score it on the dev sets."""
        log(f"selection: {row.name} {json.dumps(row.distillation)}")
        scores = dev_scores(self.bed, self.bed.train_unit(self.bed.unit_of(row, SELECTION_SEED)) / "model")
        log(f"selection: dev {scores}")
        return scores

    def reference_dev_score(self, train: bool = False) -> Optional[dict[str, float]]:
        """The undistilled student's dev scores at the selection seed (cached beside the families)."""
        path = self.folder / "student.json"
        if path.is_file():
            return json.loads(path.read_text("utf-8"))
        if not train:
            return None
        scores = self.dev_score(self.bed.rows["student"])
        save_state(path, scores)
        return scores

    def resolve(self, row: "TestbedRow", train: bool = False) -> "TestbedRow":
        """`row` with its family's chosen distillation (unchanged for rows without `select`); a row whose family
        is not fully scored keeps `distillation=None` (the report shows it as not run). `train`: run the family's
        missing candidates first (and the undistilled student's dev score, the table's reference)."""
        if not row.select:
            return row
        if train:
            self.reference_dev_score(train=True)
        return replace(row, distillation=self.choice(row.select, train))

    def report_lines(self) -> list[str]:
        """The selection tables of the results page."""
        lines = [f"Every candidate trained once (seed {SELECTION_SEED}, the bed's budget) and scored on the dev sets "
                 "(500 STS-B dev pairs; 100 SciFact train queries no run trained on, over 500 documents): "
                 "Spearman / nDCG@10 ×100, avg = their mean. **Bold** = the family's choice (best dev avg)."]
        reference = self.reference_dev_score()
        if reference:
            lines += ["", f"The undistilled `student` at seed {SELECTION_SEED}: dev avg {100 * reference['avg']:.2f}."]
        for family in FAMILIES:
            scored = self.scored(family)
            if not scored:
                continue
            best = best_by_dev(scored)
            complete = len(scored) == len(self.candidates(family))
            lines += ["", f"`{family}` ({len(scored)} of {len(self.candidates(family))} candidates scored"
                      + ("" if complete else "; no choice yet") + "):", "",
                      "| distillation | " + " | ".join(k for k in best["dev"] if k != "avg") + " | dev avg |",
                      "|---|" + "---:|" * len(best["dev"])]
            for entry in scored:
                described = _describe(entry["distillation"])
                cells = [f"{100 * v:.2f}" for k, v in entry["dev"].items() if k != "avg"]
                avg = f"{100 * entry['dev']['avg']:.2f}"
                if complete and entry is best:
                    described, avg = f"**{described}**", f"**{avg}**"
                lines.append(f"| {described} | " + " | ".join(cells) + f" | {avg} |")
        return lines


def _describe(distillation: dict[str, Any]) -> str:
    parts = []
    for key, label in (("ir_weight", "λ_KD"), ("sts_weight", "β"), ("embedding_weight", "λ_E"),
                       ("teacher_temperature", "τ")):
        if key in distillation:
            parts.append(f"{label} {distillation[key]:g}")
    parts.append("online teacher" if "teacher" in distillation and "embedding_weight" not in distillation
                 else "mined scores" if distillation.get("scores_from") == "data" and "ir_weight" in distillation
                 else "")
    return ", ".join(p for p in parts if p)
