"""Figures of the programs: their top genes, and how close case programs are to the baseline."""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def top_genes_plot(scores: np.ndarray, names: list[str], labels, n_top: int = 10,
                   xlabel: str = "specificity: the gene's z-score\nin a cell using only this program",
                   title: str = "Top genes per program, by specificity") -> Figure:
    """One small bar chart per program: the ``n_top`` genes with the highest ``scores``
    (genes x programs; the specificity score in ``top_genes.png``)."""
    labels = np.asarray(labels).astype(str)
    cols = min(5, len(names))
    rows = int(np.ceil(len(names) / cols))
    fig = Figure(figsize=(3.2 * cols, 0.28 * n_top * rows + 0.8 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for j, ax in enumerate(axes.flat):
        if j >= len(names):
            ax.axis("off")
            continue
        order = np.argsort(-scores[:, j], kind="stable")[:n_top][::-1]
        color = "tab:red" if names[j].startswith("case") else "tab:blue"
        ax.barh(range(len(order)), scores[order, j], color=color)
        ax.set_yticks(range(len(order)), labels[order], fontsize=8)
        ax.set_title(names[j], fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=3))  # few weight ticks: long decimals otherwise run together
        ax.tick_params(axis="x", labelsize=7)
        if j >= len(names) - cols:  # the bottom plot of each column
            ax.set_xlabel(xlabel, fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def similarity_plot(cosine: np.ndarray, baseline_names: list[str], case_names: list[str]) -> Figure:
    """Baseline x case program cosine similarity: high values mean leakage between the sets
    (``program_similarity.png``)."""
    fig = Figure(figsize=(0.6 * len(case_names) + 2.5, 0.35 * len(baseline_names) + 1.5))
    ax = fig.subplots()
    image = ax.imshow(cosine, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for i in range(cosine.shape[0]):
        for j in range(cosine.shape[1]):
            ax.text(j, i, f"{cosine[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if cosine[i, j] < 0.6 else "black")
    ax.set_xticks(range(len(case_names)), case_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(baseline_names)), baseline_names, fontsize=8)
    ax.set_title("Cosine similarity, baseline x case programs", fontsize=10)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


def annotation_plot(table: pd.DataFrame) -> Figure:
    """Mean share of each program per category of an ``.obs`` column (``program_annotation.png``,
    the table of :func:`deltanmf.tl.tables.program_annotation`): which cells use which program."""
    programs = [c for c in table.columns if c not in ("category", "n_cells")]
    values = table[programs].to_numpy(dtype=float)
    labels = [f"{c} ({n:,})" for c, n in zip(table["category"], table["n_cells"])]
    fig = Figure(figsize=(0.5 * len(programs) + 3, 0.35 * len(labels) + 1.8))
    ax = fig.subplots()
    image = ax.imshow(values, cmap="magma_r", vmin=0, aspect="auto")
    for i, j in zip(*np.nonzero(values == values.max(axis=0, keepdims=True))):
        ax.scatter(j, i, s=22, c="white", edgecolors="black", linewidths=0.8)  # each program's top category
    ax.set_xticks(range(len(programs)), programs, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_title("Mean share of usage per category (dot: the program's top category)", fontsize=9)
    fig.colorbar(image, ax=ax, label="mean share")
    fig.tight_layout()
    return fig
