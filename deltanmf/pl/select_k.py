"""The K-selection figure of a sweep."""
from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure


def _mark(ax, x: float, text: str) -> None:
    """The suggested value: a red dashed line, named in the legend (a label could cover a curve)."""
    ax.axvline(x, color="tab:red", ls="--", lw=1, label=f"suggested {text}")


def k_selection_plot(table: pd.DataFrame, k: int | None = None, k_case: int | None = None,
                     margin: float = 0.05) -> Figure:
    """The K-selection figure (``k_selection.png``): stability and error against K, and the
    explained-variance gain against the null against K_case, from
    :func:`deltanmf.tl.select_k.collect`'s table; the suggestions marked."""
    twostage = table[(table["stage"] == "twostage") & table["explained_variance_gain"].notna()]
    show_k = table["K"].nunique() > 1 or twostage.empty
    show_gain = not twostage.empty and (twostage["K_case"].nunique() > 1 or not show_k)
    n = 2 * show_k + show_gain
    fig = Figure(figsize=(max(4.6 * n, 5.5), 3.8))
    axes = fig.subplots(1, n, squeeze=False)
    axes = list(axes.flat)
    if show_k:
        per_k = table.groupby("K")[["stability", "stage1_relative_error"]].mean().sort_index()
        ks = per_k.index.to_numpy(dtype=float)
        for ax, column, label, color in ((axes.pop(0), "stability", "stability (silhouette)", "tab:blue"),
                                         (axes.pop(0), "stage1_relative_error", "relative error, stage 1", "tab:gray")):
            ax.plot(table["K"].astype(float), table[column], "o", color=color, alpha=0.35, ms=4)
            ax.plot(ks, per_k[column], "-o", color=color, ms=5)
            if column == "stability" and per_k[column].notna().any():
                ax.axhline(per_k[column].max() - margin, color=color, ls=":", lw=1,
                           label=f"best − {margin:g}")
            if k is not None:
                _mark(ax, k, f"K={k}")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8, loc="best")
            ax.set_xlabel("K (baseline programs)")
            ax.set_ylabel(label)
            ax.set_xticks(ks if len(ks) <= 15 else ks[:: int(np.ceil(len(ks) / 15))])
            ax.set_title("Stability (higher: reproducible)" if column == "stability" else
                         "Reconstruction error (control cells)", fontsize=10)
    if show_gain:
        ax = axes.pop(0)
        colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
        several = twostage["K"].nunique() > 1
        for i, (kv, runs) in enumerate(twostage.groupby("K")):
            per = runs.groupby("K_case")[["explained_variance_gain", "null_explained_variance_gain"]].mean().sort_index()
            x = per.index.to_numpy(dtype=float)
            c = colors[i % len(colors)]
            # several K: colour says K, line style says case cells (solid) or null (dashed)
            ax.plot(x, per["explained_variance_gain"], "-o", color=c, ms=5,
                    label=f"K={kv}" if several else "case cells")
            if per["null_explained_variance_gain"].notna().any():
                ax.plot(x, per["null_explained_variance_gain"], "--s", color=c, ms=4, alpha=0.8,
                        label=None if several else "null: held-out controls")
        if several:
            ax.plot([], [], "-", color="black", label="case cells")
            if twostage["null_explained_variance_gain"].notna().any():
                ax.plot([], [], "--", color="black", label="null: held-out controls")
        case_ks = sorted(twostage["K_case"].dropna().astype(int).unique())
        if k_case is not None:
            _mark(ax, k_case, f"K_case={k_case}")
        ax.set_xticks(case_ks)
        ax.set_xlabel("K_case (case programs)")
        ax.set_ylabel("explained-variance gain over the baseline")
        ax.set_title("Case programs vs the null", fontsize=10)
        ax.legend(fontsize=8)
    title = ", ".join(t for t in (f"K={k}" if k is not None else "",
                                  f"K_case={k_case}" if k_case is not None else "") if t)
    if title:
        fig.suptitle(f"Suggested {title}", fontsize=11)
    fig.tight_layout()
    return fig
