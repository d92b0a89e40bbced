"""The prior-strength figure of a ``rel_alpha=auto`` run."""
from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure


def prior_selection_plot(selections: dict[str, dict]) -> Figure:
    """Held-out error against the prior's strength (``prior_selection.png``), one panel per
    stage that chose it: the excess over the best strength with its standard error (the
    one-standard-error rule's yardstick), the chosen strength marked. ``selections`` maps a
    stage's name (``stage1``, ``stage2``) to its ``metrics.json`` record ``prior_selection``."""
    shown = {stage: record for stage, record in selections.items() if record.get("curve")}
    fig = Figure(figsize=(4.8 * max(len(shown), 1), 3.6), layout="constrained")
    axes = fig.subplots(1, max(len(shown), 1), squeeze=False).flat
    for ax, (stage, record) in zip(axes, shown.items()):
        curve = record["curve"]
        grid = np.asarray(curve["rel_alpha"], dtype=float)
        # a log axis with 0 drawn one step below the smallest strength
        positive = grid[grid > 0]
        zero_at = positive.min() / 3 if len(positive) else 1.0
        x = np.where(grid > 0, grid, zero_at)
        excess, se = np.asarray(curve["excess"]), np.asarray(curve["excess_se"])
        ax.errorbar(x, excess, yerr=se, fmt="-o", color="tab:blue", ms=5, capsize=3,
                    label="held-out error − best (± 1 SE)")
        ax.axhline(0, color="0.5", lw=0.8)
        chosen = record["chosen"]
        ax.axvline(chosen if chosen > 0 else zero_at, color="tab:red", ls="--", lw=1,
                   label=f"chosen rel_alpha={chosen:g}")
        ax.set_xscale("log")
        ax.set_xticks(x)
        ax.set_xticklabels([f"{g:g}" for g in grid])
        ax.minorticks_off()
        ax.set_xlabel(f"model.{stage}.rel_alpha")
        ax.set_ylabel("held-out MSE per entry − the best's")
        ax.set_title(f"{'Stage 1' if stage == 'stage1' else 'Stage 2'}: held-out error {100 * record['gain']:.2g}% "
                     "below no prior", fontsize=10)
        ax.legend(fontsize=8, loc="best")
    return fig
