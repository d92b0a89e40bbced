"""PNG figures of a fit, written next to the tables they show."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

MAX_GROUPS = 60


def _save(fig, path: Path) -> None:
    fig.savefig(path, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)


def top_genes_plot(path: Path, programs: np.ndarray, names: list[str], labels, n_top: int = 10) -> None:
    """One small bar chart per program: its ``n_top`` highest-weight genes."""
    labels = np.asarray(labels).astype(str)
    cols = min(5, len(names))
    rows = int(np.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 0.28 * n_top * rows + 0.8 * rows), squeeze=False)
    for j, ax in enumerate(axes.flat):
        if j >= len(names):
            ax.axis("off")
            continue
        order = np.argsort(-programs[:, j], kind="stable")[:n_top][::-1]
        color = "tab:red" if names[j].startswith("case") else "tab:blue"
        ax.barh(range(len(order)), programs[order, j], color=color)
        ax.set_yticks(range(len(order)), labels[order], fontsize=8)
        ax.set_title(names[j], fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=3))  # few weight ticks: long decimals otherwise run together
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle("Top genes per program (weight in the fitted, scaled units)", fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def usage_share_plot(path: Path, shift: pd.DataFrame, case_programs: pd.DataFrame) -> None:
    """Mean usage share per program, control vs case; called shifts and emergent programs starred."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(6, 0.55 * len(shift) + 2) + 3, 3.6),
                                   gridspec_kw={"width_ratios": [max(len(shift), 1), max(len(case_programs), 1) + 1]})
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
    _save(fig, path)


def group_usage_plot(path: Path, table: pd.DataFrame) -> None:
    """Heatmap of log2 fold change (group vs control) per program; dots mark called shifts."""
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
    fig, ax = plt.subplots(figsize=(0.45 * len(programs) + 3, 0.3 * len(wide) + 1.8))
    image = ax.imshow(wide.to_numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    ys, xs = np.nonzero(called.to_numpy().astype(bool))
    ax.scatter(xs, ys, s=10, c="black")
    ax.set_xticks(range(len(programs)), programs, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(wide)), wide.index, fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="log2 FC (saturates beyond the scale)", extend="both")
    fig.tight_layout()
    _save(fig, path)


def similarity_plot(path: Path, cosine: np.ndarray, baseline_names: list[str], case_names: list[str]) -> None:
    """Baseline x case program cosine similarity: high values mean leakage between the sets."""
    fig, ax = plt.subplots(figsize=(0.6 * len(case_names) + 2.5, 0.35 * len(baseline_names) + 1.5))
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
    _save(fig, path)
