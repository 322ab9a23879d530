"""Greedy soup (Wortsman et al. 2022) on top of the merge engine."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from torch import Tensor

from codiemb_pl.errors import InputError
from codiemb_pl.fusion.engine import Checkpoint, merge_state_dicts
from codiemb_pl.fusion.sources import as_source


@dataclass
class GreedySoupResult:
    """The chosen soup, the indices (into the candidate list) it averages and the score after each try."""

    state_dict: dict[str, Tensor]
    chosen: list[int]
    score: float
    scores: list[float]


def greedy_soup(candidates_in_score_order: Sequence[Checkpoint], evaluate: Callable[[dict[str, Tensor]], float], *,
                copy_keys: Collection[str] = ()) -> GreedySoupResult:
    """Greedy soup: walk candidates best-first, keep one if the uniform soup improves.

        soup = {c_0};  for c in c_1..c_n: if evaluate(mean(soup ∪ {c})) > evaluate(mean(soup)): soup ∪= {c}

    `candidates_in_score_order` must be sorted by the caller, best individual validation score first;
    `evaluate` takes a merged state dict and returns a score (higher is better). A candidate that does
    not strictly improve the score is skipped (later ones are still tried). `scores[i]` is the score of
    the soup tried at step i (step 0: the best candidate alone).
    """
    if not candidates_in_score_order:
        raise InputError("fusion.greedy_soup", "no candidates", "pass at least one checkpoint")
    sources = [as_source(c, f"candidates[{i}]") for i, c in enumerate(candidates_in_score_order)]

    def soup_of(indices: list[int]) -> dict[str, Tensor]:
        members = [sources[i] for i in indices]
        return merge_state_dicts(members[0], members, "uniform_soup", {}, copy_keys=copy_keys)

    chosen = [0]
    best_state = soup_of(chosen)
    best_score = float(evaluate(best_state))
    scores = [best_score]
    for index in range(1, len(sources)):
        trial_state = soup_of(chosen + [index])
        trial_score = float(evaluate(trial_state))
        scores.append(trial_score)
        if trial_score > best_score:
            chosen, best_state, best_score = chosen + [index], trial_state, trial_score
        del trial_state
    return GreedySoupResult(best_state, chosen, best_score, scores)
