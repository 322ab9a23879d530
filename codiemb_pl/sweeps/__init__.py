"""Multi-run workflows over `run_fit`: sweeps (K runs of one config fused across trajectories) and BOOM."""
