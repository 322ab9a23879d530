"""Fusion workflows, one concern a module (importing this package imports nothing):

- `settings`: the merge-method list and the ranking metric, checked before anything trains;
- `leaderboard`: candidates and their ranking, written as leaderboard.json / .md;
- `scoring`: `run_fusion`, every candidate merged and scored;
- `export`: `fuse_and_export`, score, merge, choose and export (CheckpointFusion, sweeps, BOOM);
- `fuse`: one merge into a sentence-transformers folder (`codiemb fuse`).
"""
