"""Lightning callbacks: model export, training monitoring (and, with the fusion extra, post-fit fusion)."""

from .export import ExportEncoder
from .monitoring import TrainingMonitor, log_figures, log_leaderboard, log_weight_histograms

__all__ = ["ExportEncoder", "TrainingMonitor", "log_figures", "log_leaderboard", "log_weight_histograms"]
