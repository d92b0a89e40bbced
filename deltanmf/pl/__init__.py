"""Figures. Every function takes tables or arrays and returns a :class:`matplotlib.figure.Figure`
(shown inline in a notebook); nothing here uses pyplot or changes matplotlib's backend.
:func:`save_figure` writes one to a PNG file."""
from pathlib import Path

from .casecontrol import group_usage_plot, negative_control_plot, usage_share_plot
from .prior import prior_selection_plot
from .programs import annotation_plot, similarity_plot, top_genes_plot
from .select_k import k_selection_plot

__all__ = ["annotation_plot", "group_usage_plot", "k_selection_plot", "negative_control_plot", "prior_selection_plot",
           "save_figure", "similarity_plot", "top_genes_plot", "usage_share_plot"]


def save_figure(fig, path: str | Path) -> None:
    """Write ``fig`` as a PNG (110 dpi, trimmed to its content)."""
    fig.savefig(path, dpi=110, bbox_inches="tight", format="png")
