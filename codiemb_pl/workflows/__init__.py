"""The library layer beneath the `codiemb` commands, for commands, benchmarks, notebooks and scripts alike.

- `encoders.load_encoder`: a `TextEncoder` from a model folder, hub id, `pkg://` model or Lightning `.ckpt`.
- `data.eval_builders.build_eval_sets`: evaluation sets from source configs (instruction
  prefixes, passage prefix), as training validates.
- `evaluation.evaluate`: what `codiemb evaluate` does (score the sets, optional embedding geometry).
- `fusion`: `run_fusion` (the CheckpointFusion callback's leaderboard) and `fuse` (`codiemb fuse`).
- `boom`: BOOM runs and incremental updates, merged with Multi-SLERP (`codiemb boom`).
- `probe`: Self Positioning on an IR + STS probe set.
- `sweep`: K runs of one config with different settings, fused across trajectories (`codiemb sweep`).

Commands (`codiemb_pl.commands.*`) are thin argument parsers over these functions; nothing here imports a
command module. Importing this package imports nothing else: each module pulls in what it needs.
"""
