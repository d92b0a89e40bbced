"""Figures of the case-control answer: usage shares, and usage per perturbation group."""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure


MAX_GROUPS = 60


def _unit(table: pd.DataFrame) -> str:
    """How a table's tests were run, for a title: across samples (how many) or cells. A table
    of groups or cell types gives its groups' range of case samples."""
    if "test_unit" not in table or not len(table) or table["test_unit"].iloc[0] != "sample":
        return "tests across cells"
    control = pd.to_numeric(table["n_control_samples"], errors="coerce")
    case = pd.to_numeric(table["n_case_samples"], errors="coerce")
    if "group" in table and table["group"].nunique() > 1:
        low, high = int(case.min()), int(case.max())
        per_group = f"{low}" if low == high else f"{low}-{high}"
        text = f"tests across samples: {int(control.max())} control, {per_group} case per {_group_word(table)}"
    else:
        text = f"tests across samples: {int(control.iloc[0])} control, {int(case.iloc[0])} case"
    if "underpowered" in table and table["underpowered"].astype(bool).any():
        text += "\nunderpowered: read calls as hypotheses"
    return text


def _group_word(table: pd.DataFrame) -> str:
    return "cell type" if "n_control_cells" in table else "group"


def usage_share_plot(shift: pd.DataFrame, case_programs: pd.DataFrame) -> Figure:
    """Mean usage share per program, control vs case; called shifts and emergent programs
    marked (``usage_share.png``). With sample-level tests a third panel shows each baseline
    program's log2 fold change with its 95% interval across samples."""
    forest = "ci_low" in shift and bool(np.isfinite(shift["ci_low"].to_numpy(dtype=float)).any())
    ratios = [max(len(shift), 1), max(len(case_programs), 1) + 1] + ([max(len(shift), 1) * 0.6] if forest else [])
    fig = Figure(figsize=(max(6, 0.55 * len(shift) + 2) + 3 + (0.35 * len(shift) + 1.5 if forest else 0), 3.6))
    axes = fig.subplots(1, len(ratios), gridspec_kw={"width_ratios": ratios})
    ax1, ax2 = axes[0], axes[1]
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
    ax1.set_title(f"Baseline programs (arrow: called shift)\n{_unit(shift)}", fontsize=9)
    ax1.legend(fontsize=8)
    x = np.arange(len(case_programs))
    ax2.bar(x - 0.2, case_programs["control_mean_share"], 0.4, label="control", color="tab:gray")
    ax2.bar(x + 0.2, case_programs["case_mean_share"], 0.4, label="case", color="tab:orange")
    for i, e in enumerate(case_programs["emergent"]):
        if e:
            ax2.text(i, case_programs["case_mean_share"].iloc[i] * 1.02, "*", ha="center", fontsize=13)
    ax2.set_ylim(0, max(float(np.maximum(case_programs["case_mean_share"], case_programs["control_mean_share"]).max()),
                        1e-3) * 1.15)
    ax2.set_xticks(x, case_programs["program"], rotation=60, ha="right", fontsize=8)
    ax2.set_ylabel("mean share of total usage")
    ax2.set_title(f"Case programs (*: emergent)\n{_unit(case_programs)}", fontsize=9)  # colours: ax1's legend
    if forest:
        _forest(axes[2], shift)
    fig.tight_layout()
    return fig


def _forest(ax, shift: pd.DataFrame) -> None:
    """log2 fold change with its 95% interval per baseline program; called shifts in colour."""
    y = np.arange(len(shift))[::-1]
    called = (shift["shift"] != "none").to_numpy()
    effect = shift["log2_fold_change"].to_numpy(dtype=float)
    low, high = shift["ci_low"].to_numpy(dtype=float), shift["ci_high"].to_numpy(dtype=float)
    for mask, color in ((~called, "tab:gray"), (called, "tab:red")):
        ax.errorbar(effect[mask], y[mask], xerr=[effect[mask] - low[mask], high[mask] - effect[mask]], fmt="o",
                    color=color, ms=4, capsize=2, lw=1)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(y, shift["program"], fontsize=8)
    ax.set_xlabel("log2 fold change (95% CI)", fontsize=8)
    ax.set_title("Shift across samples (red: called)", fontsize=10)


def group_usage_plot(table: pd.DataFrame, what: str = "group") -> Figure:
    """Heatmap of log2 fold change (group vs control) per program; dots mark called shifts
    (``group_usage.png``; ``celltype_shift.png`` with ``what="cell type"``, each type's cases
    against its own controls)."""
    wide = table.pivot(index="group", columns="program", values="log2_fold_change")
    called = table.pivot(index="group", columns="program", values="called").reindex_like(wide)
    programs = list(dict.fromkeys(table["program"]))
    wide, called = wide[programs], called[programs]
    versus = "vs control" if what == "group" else "vs the same type's controls"
    title = f"log2 fold change of usage share {versus} (dot: called)\n{_unit(table)}"
    if len(wide) > MAX_GROUPS:  # keep the most changed groups readable
        keep = wide.abs().max(axis=1).sort_values(ascending=False).index[:MAX_GROUPS]
        wide, called = wide.loc[keep], called.loc[keep]
        title += f"; {MAX_GROUPS} most changed of {len(table['group'].unique())} {what}s"
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
    if "p_value" in table:  # rows without a test (too few units): crossed out, not coloured as results
        untested = table.pivot(index="group", columns="program", values="p_value").reindex_like(wide)[programs]
        ys, xs = np.nonzero(untested.isna().to_numpy())
        ax.scatter(xs, ys, s=30, marker="x", c="gray", linewidths=0.8)
        if len(xs):
            title += "; x: not tested"
    ax.set_xticks(range(len(programs)), programs, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(wide)), wide.index, fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="log2 FC (saturates beyond the scale)", extend="both")
    fig.tight_layout()
    return fig


def negative_control_plot(table: pd.DataFrame, check: dict) -> Figure:
    """QQ plot of the negative-control check's p-values (``negative_controls.png``): each
    program kind's observed ``-log10 p`` against the uniform's expected, with the pointwise
    95% band of uniform order statistics. Points above the band at the right mean the group
    tests call more than chance on these data."""
    from scipy.stats import beta

    fig = Figure(figsize=(4.6, 4.2))
    ax = fig.subplots()
    top = 1.0
    for kind, color in (("baseline", "tab:blue"), ("case", "tab:orange")):
        p = np.sort(table.loc[table["program_kind"] == kind, "p_value"].to_numpy(dtype=float))
        p = p[np.isfinite(p)]
        if not len(p):
            continue
        rank = np.arange(1, len(p) + 1)
        expected = -np.log10(rank / (len(p) + 1))
        ax.scatter(expected, -np.log10(np.maximum(p, 1e-300)), s=6, color=color, label=f"{kind} programs ({len(p)})")
        low, high = beta.ppf([[0.025], [0.975]], rank, len(p) - rank + 1)
        ax.fill_between(expected, -np.log10(high), -np.log10(low), color=color, alpha=0.12, linewidth=0)
        top = max(top, expected.max(), float(-np.log10(max(p[0], 1e-300))))
    ax.plot([0, top], [0, top], color="black", linewidth=0.8)
    ax.set_xlabel("expected -log10 p (uniform)")
    ax.set_ylabel("observed -log10 p")
    below = check.get("fraction_below", {})
    detail = (f"{check.get('sets', '?')} sets of {check.get('units_per_set', '?')} control units; "
              f"p < 0.01: {below.get('0.01', float('nan')):.3f}") if below else ""
    ax.set_title("Negative controls tested as targets\n" + detail, fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    return fig
