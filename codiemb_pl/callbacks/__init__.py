"""Lightning callbacks: model export, training monitoring, post-fit checkpoint fusion."""

from codiemb_pl.callbacks.export import ExportEncoder
from codiemb_pl.callbacks.fusion import CheckpointFusion
from codiemb_pl.callbacks.monitoring import TrainingMonitor, log_figures, log_leaderboard, log_weight_histograms

__all__ = ["CheckpointFusion", "ExportEncoder", "TrainingMonitor", "log_figures", "log_leaderboard",
           "log_weight_histograms"]
