"""The library layer beneath the `codiemb` commands, for commands, benchmarks, notebooks and scripts alike.

- `encoders.load_encoder`: a `TextEncoder` from a model folder, hub id, `pkg://` model or Lightning `.ckpt`.
- `evaluation.evaluate`: what `codiemb evaluate` does (score the sets, optional embedding geometry).
- `fusion/`: `settings.parse_methods` (a method list checked before training), `scoring.run_fusion` (every
  candidate merged and scored into a `leaderboard.Leaderboard`), `export.fuse_and_export` (score, merge, choose,
  export: CheckpointFusion, sweeps, BOOM) and `fuse.fuse` (`codiemb fuse`).
- `mine`: hard-negative mining (`codiemb mine-negatives`).
- `probe`: Self Positioning on an IR + STS probe set.

The sets they score are built by `data.eval_builders.build_eval_sets` (instruction prefixes, passage prefix,
as training validates); the multi-run workflows over fits (sweeps, BOOM) are `codiemb_pl.sweeps`, above the
fit API of `codiemb_pl.cli.fit`.
Commands (`codiemb_pl.commands.*`) are thin argument parsers over these functions; nothing here imports a
command module. Importing this package imports nothing else: each module pulls in what it needs.
"""
