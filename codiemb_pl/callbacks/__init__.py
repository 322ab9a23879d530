"""Lightning callbacks: model export (and, with the fusion extra, post-fit fusion)."""

from .export import ExportEncoder

__all__ = ["ExportEncoder"]
