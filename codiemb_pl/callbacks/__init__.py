"""Lightning callbacks: model export, training monitoring, post-fit checkpoint fusion."""

from .export import ExportEncoder
from .fusion import CheckpointFusion
from .monitoring import TrainingMonitor, log_figures, log_leaderboard, log_weight_histograms

__all__ = ["CheckpointFusion", "ExportEncoder", "TrainingMonitor", "log_figures", "log_leaderboard",
           "log_weight_histograms"]
