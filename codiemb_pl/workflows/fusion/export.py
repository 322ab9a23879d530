"""Score, merge, choose and export: `fuse_and_export`, the one path of the CheckpointFusion callback, a sweep's
leaderboard and BOOM. The chosen candidate (`chosen_candidate`: by name, else the winner) becomes a
sentence-transformers folder with its model card (`winner_card`) and, for sweeps and BOOM, `merge.json`
(`merge_record`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from codiemb_pl.data.eval_sets import EvalSet
from codiemb_pl.errors import InputError
from codiemb_pl.model.card import build_fused_model_card
from codiemb_pl.model.prompts import folder_prompt_settings, members_prompt_settings
from codiemb_pl.storage.atomic import atomic_directory, atomic_write_text
from codiemb_pl.workflows.fusion.leaderboard import Candidate, Leaderboard
from codiemb_pl.workflows.fusion.scoring import FusionInputs, evaluate_at_trained_widths, run_fusion
from codiemb_pl.workflows.fusion.settings import MethodSpec


def winner_card(board: Leaderboard, inputs: FusionInputs, candidate: Candidate | None = None,
                **encoder_fields: Any) -> str:
    """The model card of the leaderboard's winner (or of `candidate`, exported by name): how it was made,
    from which snapshots, and every score."""
    winner = candidate or board.winner()
    if winner is None:
        raise InputError("fusion", "no candidate has a score", "check the validation sets")
    picked = winner is board.winner()
    labels = [label for label, _ in inputs.checkpoints]
    if winner.kind == "fused":
        method, merged = winner.method, labels
    else:
        method, merged = f"none: the {winner.kind} `{winner.name}`" + (" scored best" if picked else ""), [winner.name]
    source = (f"the validation sets (`{board.metric}` picked `{winner.name}` among {len(board.candidates)} candidates)"
              if picked else f"the validation sets (`{winner.name}` exported by name)" if winner.metrics else "")
    return build_fused_model_card(
        base_model=inputs.model_folder, method=method, inputs=merged, weights=winner.weights,
        params=winner.params, scores=winner.metrics or None, scores_source=source,
        leaderboard=board.to_markdown() if winner.metrics else "", **encoder_fields)


MERGE_MANIFEST = "merge.json"   # beside an exported merge: how it was made (sweeps, BOOM)


@dataclass
class FusionOutcome:
    """What `fuse_and_export` did: the leaderboard, the candidate chosen for export (None: nothing had a score)
    and the folder it was exported to (None: nothing exported)."""

    board: Leaderboard
    chosen: Candidate | None = None
    exported: Path | None = None


def fuse_and_export(inputs: FusionInputs, methods: Sequence[MethodSpec], encoder: Any, *,
                    sets: Sequence[EvalSet], eval_batch_size: int, metric: str, workdir: str | os.PathLike,
                    heading: str, export_folder: str | os.PathLike | None, export: str | None = None,
                    merge_facts: Mapping[str, Any] | None = None, prompt_folders: Sequence[tuple[str, Path]] = (),
                    log: Callable[[str], None] = print, show: Callable[[str], None] | None = None,
                    prefix: str = "[codiemb] fusion:", show_progress: bool = True) -> FusionOutcome:
    """Score θ0 and the members with `encoder` on `sets` (none: nothing scored), merge them with every method
    (`run_fusion`, candidates in `workdir`), show the leaderboard under `heading`, choose the candidate (`export`
    by name, else the winner) and export it to `export_folder` (None: no export) with its model card, the
    members' prompt settings (`prompt_folders`: (name, exported folder), when given) and `merge.json`
    (`merge_record` + `merge_facts`, when given). `encoder` is left holding the last weights it took."""
    def evaluate(path: Path) -> dict[str, float]:
        if not sets:
            return {}
        from codiemb_pl.evaluation.suite import flat_metrics
        from codiemb_pl.workflows.encoders import load_weights

        load_weights(encoder, path)
        per_set, summary = evaluate_at_trained_widths(encoder, sets, eval_batch_size)
        return flat_metrics(per_set, summary)

    board = run_fusion(inputs, methods, evaluate, workdir, metric, log=log, show_progress=show_progress)
    (show or log)(f"\n{heading}\n{board.to_text()}")
    outcome = FusionOutcome(board, chosen_candidate(board, export, log, prefix))
    if outcome.chosen is not None and export_folder is not None:
        outcome.exported = export_candidate(board, inputs, encoder, outcome.chosen, Path(export_folder),
                                            merge_facts=merge_facts, prompt_folders=prompt_folders,
                                            log=log, prefix=prefix)
    return outcome


def chosen_candidate(board: Leaderboard, export: str | None, log: Callable[[str], None] = print,
                     prefix: str = "[codiemb] fusion:") -> Candidate | None:
    """The candidate named `export`, else the winner (None: nothing scored). A named merge that was skipped
    because it would give the only member back (`Leaderboard.skipped`) is that member."""
    if export is None:
        return board.winner()
    if export in board.skipped:
        member = next(c for c in board.candidates if c.kind == "checkpoint")
        log(f"{prefix} fusion.export {export} was skipped ({board.skipped[export]}): exporting the member "
            f"{member.name} itself")
        return member
    return next(c for c in board.candidates if c.name == export)


def export_candidate(board: Leaderboard, inputs: FusionInputs, encoder: Any, candidate: Candidate, folder: Path, *,
                     merge_facts: Mapping[str, Any] | None = None, prompt_folders: Sequence[tuple[str, Path]] = (),
                     log: Callable[[str], None] = print, prefix: str = "[codiemb] fusion:") -> Path:
    """`candidate` as a sentence-transformers folder (written atomically) with its model card (`winner_card`);
    with `prompt_folders`, the prompt settings of the first member folder that declares some
    (`prompts.members_prompt_settings`: scoring ran with include_prompt False, the export takes the members'
    setting); with `merge_facts`, `merge.json` (`merge_record`: method, θ0, members, weights, scores, facts)."""
    from codiemb_pl.model.card import encoder_card_fields
    from codiemb_pl.model.prompts import apply_prompt_settings
    from codiemb_pl.workflows.encoders import load_weights

    load_weights(encoder, candidate.weights_path)
    if prompt_folders:
        settings, notes = members_prompt_settings(
            [(name, folder_prompt_settings(path) if Path(path).is_dir() else None) for name, path in prompt_folders])
        if settings is not None:
            apply_prompt_settings(encoder, settings)
        for note in notes:
            log(f"{prefix} {note}")
    card = winner_card(board, inputs, candidate=candidate, model_path=str(folder), **encoder_card_fields(encoder))
    if merge_facts is None:
        encoder.save(folder, model_card=card)
        return folder
    models = {"fused": [path for _, path in inputs.checkpoints], "checkpoint": [candidate.weights_path]}
    record = merge_record(candidate.method or candidate.kind, inputs.model_folder, models.get(candidate.kind, []),
                          candidate.weights, name=candidate.name, params=candidate.params, metric=board.metric,
                          metrics=candidate.metrics, **merge_facts)
    with atomic_directory(folder) as staging:
        encoder.save(staging, model_card=card)
        atomic_write_text(staging / MERGE_MANIFEST, json.dumps(record, indent=2, default=str) + "\n")
    return folder


def merge_record(method: str, base: str, models: Sequence[str | os.PathLike], weights: Sequence[float] | None = None,
                 **facts: Any) -> dict[str, Any]:
    """What an exported folder's merge.json says: the method, θ0, the members' paths, their weights, `facts`."""
    from codiemb_pl.paths import resolve_location

    return {"method": method, "base": str(base),
            "models": [str(Path(resolve_location(str(path))).resolve()) for path in models],
            "weights": None if weights is None else list(weights), **facts}
