"""Geometry of suite v2's trained and merged weights (the numbers behind the suite-v2 reading in results/suite.md).

    python benchmarks/task_vector_geometry.py [--workdir benchmarks/suite_runs]

Per seed: ‖Δ‖ / ‖θ0‖ of each trained row (Δ = θ − θ0, θ0 = the base model), the pairwise cosines of the
`cross_*` members' and the specialists' Δ, and for each cross merge ‖Δ_merge‖ / mean ‖Δ_member‖ with its cosine
to each member; then the steps each sampler policy plans per training source (`TaskBatchSampler.plan`).
Reads the suite's cached models (`experiments.py` must have run); trains nothing.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))

import experiment_runs as runs  # noqa: E402

from codiemb_pl.data.sampler import TaskBatchSampler  # noqa: E402
from codiemb_pl.paths import resolve_location  # noqa: E402

TRAINED = runs.CROSS_MEMBERS + ("ir_only", "sts_only_codiemb", "naive_joint")
MERGES = ("cross_delta_fusion", "cross_uniform_soup", "cross_ties", "cross_self_positioning")


def flat(state: dict[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
    return torch.cat([state[key].float().flatten() for key in keys])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=str(BENCHMARKS / "suite_runs"))
    workdir = Path(parser.parse_args().workdir)
    budgets, model = runs.FULL, runs.DEFAULT_MODEL
    specs = {spec.name: spec for spec in runs.suite_runs(budgets)}
    base = load_file(str(Path(resolve_location(model)) / "model.safetensors"))
    for seed in budgets.seeds:
        weights = {name: load_file(str(workdir / "train" / runs.config_key(runs.unit_config(
            model, budgets, specs[name].train, seed)) / "model" / "model.safetensors")) for name in TRAINED}
        keys = [key for key in base if base[key].is_floating_point() and all(key in w for w in weights.values())]
        theta0 = flat(base, keys)
        deltas = {name: flat(w, keys) - theta0 for name, w in weights.items()}
        print(f"seed {seed}: ‖Δ‖/‖θ0‖ " + ", ".join(f"{n} {float(d.norm() / theta0.norm()):.2e}" for n, d in deltas.items()))
        for a, b in itertools.combinations(runs.CROSS_MEMBERS + ("ir_only", "sts_only_codiemb"), 2):
            print(f"  cos(Δ {a}, Δ {b}) = {cosine(deltas[a], deltas[b]):.3f}")
        members = [deltas[name] for name in runs.CROSS_MEMBERS]
        mean_norm = sum(float(d.norm()) for d in members) / len(members)
        for name in MERGES:
            key = runs.config_key(runs.run_config(specs[name], model, budgets, specs, seed))
            merged = flat(load_file(str(workdir / "merged" / key / "model.safetensors")), keys) - theta0
            print(f"  {name:<24} ‖Δ‖ / mean member ‖Δ‖ {float(merged.norm()) / mean_norm:.2f}, cos to "
                  + " / ".join(f"{cosine(merged, d):.2f}" for d in members) + f" ({' / '.join(runs.CROSS_MEMBERS)})")
    sizes = [getattr(budgets.train, source.cap) for source in runs.TRAIN_SOURCES]
    tasks = [source.task for source in runs.TRAIN_SOURCES]
    names = [source.name for source in runs.TRAIN_SOURCES]
    for policy in ("proportional", "balanced", "temperature"):
        for seed in budgets.seeds:
            sampler = TaskBatchSampler(sizes, tasks, batch_sizes=[budgets.train.ir_batch_size] * len(sizes),
                                       policy=policy, seed=seed, temperature_alpha=budgets.train.temperature_alpha)
            plan = sampler.plan(0)
            counts = Counter(batch.dataset for batch in plan)
            print(f"{policy:<12} seed {seed}: {len(plan)} steps = "
                  + " + ".join(f"{counts[i]} {name}" for i, name in enumerate(names)))


if __name__ == "__main__":
    main()
