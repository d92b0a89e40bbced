"""Figures of the case-control answer: usage shares, and usage per perturbation group."""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure


MAX_GROUPS = 60


def usage_share_plot(shift: pd.DataFrame, case_programs: pd.DataFrame) -> Figure:
    """Mean usage share per program, control vs case; called shifts and emergent programs
    marked (``usage_share.png``)."""
    fig = Figure(figsize=(max(6, 0.55 * len(shift) + 2) + 3, 3.6))
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [max(len(shift), 1), max(len(case_programs), 1) + 1]})
    x = np.arange(len(shift))
    ax1.bar(x - 0.2, shift["control_share"], 0.4, label="control", color="tab:gray")
    ax1.bar(x + 0.2, shift["case_share"], 0.4, label="case", color="tab:orange")
    top = np.maximum(shift["control_share"], shift["case_share"])
    for i, (s, q) in enumerate(zip(shift["shift"], shift["q_value"])):
        if s != "none":
            ax1.text(i, top[i] * 1.02, "↑" if s == "up" else "↓", ha="center", fontsize=11)
    ax1.set_ylim(0, float(top.max()) * 1.15)  # room for the arrows
    ax1.set_xticks(x, shift["program"], rotation=60, ha="right", fontsize=8)
    ax1.set_ylabel("mean share of baseline usage")
    ax1.set_title("Baseline programs (arrow: called shift)", fontsize=10)
    ax1.legend(fontsize=8)
    x = np.arange(len(case_programs))
    ax2.bar(x - 0.2, case_programs["control_mean_share"], 0.4, label="control", color="tab:gray")
    ax2.bar(x + 0.2, case_programs["case_mean_share"], 0.4, label="case", color="tab:red")
    for i, e in enumerate(case_programs["emergent"]):
        if e:
            ax2.text(i, case_programs["case_mean_share"].iloc[i] * 1.02, "*", ha="center", fontsize=13)
    ax2.set_ylim(0, max(float(np.maximum(case_programs["case_mean_share"], case_programs["control_mean_share"]).max()),
                        1e-3) * 1.15)
    ax2.set_xticks(x, case_programs["program"], rotation=60, ha="right", fontsize=8)
    ax2.set_ylabel("mean share of total usage")
    ax2.set_title("Case programs (*: emergent)", fontsize=10)
    fig.tight_layout()
    return fig


def group_usage_plot(table: pd.DataFrame) -> Figure:
    """Heatmap of log2 fold change (group vs control) per program; dots mark called shifts
    (``group_usage.png``)."""
    wide = table.pivot(index="group", columns="program", values="log2_fold_change")
    called = table.pivot(index="group", columns="program", values="called").reindex_like(wide)
    programs = list(dict.fromkeys(table["program"]))
    wide, called = wide[programs], called[programs]
    title = "log2 fold change of usage share vs control (dot: called)"
    if len(wide) > MAX_GROUPS:  # keep the most changed groups readable
        keep = wide.abs().max(axis=1).sort_values(ascending=False).index[:MAX_GROUPS]
        wide, called = wide.loc[keep], called.loc[keep]
        title += f"; {MAX_GROUPS} most changed of {len(table['group'].unique())} groups"
    # scaled to the baseline programs' changes: emerging case programs (log2 FC of 5+) would
    # otherwise wash out every baseline shift; they saturate instead
    kinds = table.drop_duplicates("program").set_index("program")["program_kind"]
    baseline = [p for p in programs if kinds[p] == "baseline"] or programs
    limit = max(float(np.nanmax(np.abs(wide[baseline].to_numpy()))), 0.5)
    fig = Figure(figsize=(0.45 * len(programs) + 3, 0.3 * len(wide) + 1.8))
    ax = fig.subplots()
    image = ax.imshow(wide.to_numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    ys, xs = np.nonzero(called.to_numpy().astype(bool))
    ax.scatter(xs, ys, s=10, c="black")
    ax.set_xticks(range(len(programs)), programs, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(wide)), wide.index, fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="log2 FC (saturates beyond the scale)", extend="both")
    fig.tight_layout()
    return fig
