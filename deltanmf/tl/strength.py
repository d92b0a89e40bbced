"""``rel_alpha=auto``: the prior's strength chosen from held-out entries.

Each strength of the stage's ``alpha_grid`` (0 included) is fitted with a share of the
matrix's entries held out (``model.holdout``: the same entries for every strength); the
error of each fit's prediction of those entries is compared, and the smallest strength whose
error is within one standard error of the best is chosen (the one-standard-error rule of
cross-validated ridge regression and the lasso, leaning toward no prior). The standard error
is that of the paired difference to the best strength, over cells: every strength predicts the
same held-out entries, so their errors differ far less than the errors themselves vary. The
stage is then fitted on all entries at the chosen strength.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from ..settings import ModelSettings

log = logging.getLogger(__name__)


def with_strength(model: ModelSettings, stage: str, alpha: float, *, evaluate: bool | None = None) -> ModelSettings:
    """``model`` with ``model.<stage>.rel_alpha = alpha`` (and ``model.holdout.evaluate``)."""
    model = replace(model, **{stage: replace(getattr(model, stage), rel_alpha=float(alpha))})
    if evaluate is not None:
        model = replace(model, holdout=replace(model.holdout, evaluate=evaluate))
    return model


def resolved(model: ModelSettings, chosen: dict[str, float]) -> ModelSettings:
    """``model`` with each ``rel_alpha=auto`` of ``chosen``'s stages replaced by the chosen value."""
    for stage, alpha in chosen.items():
        if getattr(model, stage).rel_alpha == "auto":
            model = with_strength(model, stage, alpha)
    return model


def one_se_choice(grid: list[float], per_cell: list[np.ndarray], entries: int) -> tuple[int, list[dict]]:
    """The one-standard-error rule on paired held-out errors.

    ``per_cell[i]`` holds each cell's squared error at its held-out entries with strength
    ``grid[i]``; ``entries`` is their number. Returns the index of the chosen strength and the
    curve: per strength ``heldout_recon`` (mean squared error per held-out entry), ``excess``
    (its excess over the best strength's) and ``excess_se``, the standard error of that excess
    over cells: ``sqrt(n) sd(d) / entries`` with ``d`` the cells' paired differences to the best
    strength. Cells are the sampling unit (the programs are meant for new cells of the same
    kind); the genes are the same in every fit and in the final one.
    """
    totals = np.array([float(np.sum(e)) for e in per_cell])
    best = int(np.argmin(totals))
    n = len(per_cell[best])
    curve = []
    for alpha, errors in zip(grid, per_cell):
        diff = errors - per_cell[best]
        se = math.sqrt(n) * float(np.std(diff, ddof=1)) / entries if n > 1 else 0.0
        curve.append({"rel_alpha": alpha, "heldout_recon": float(np.sum(errors)) / entries,
                      "excess": float(np.sum(diff)) / entries, "excess_se": se})
    order = sorted(range(len(grid)), key=lambda i: grid[i])
    chosen = next(i for i in order if curve[i]["excess"] <= curve[i]["excess_se"])
    return chosen, curve


def choose_strength(stage: str, model: ModelSettings, graph, fit: Callable[[float, int], object]
                    ) -> tuple[float, dict]:
    """Fit ``fit(alpha, fold)`` (a :class:`~deltanmf.tl.fit.StageFit` with held-out errors) at every
    strength of ``model.<stage>.alpha_grid`` and each of ``model.holdout.folds`` folds, and choose
    one (:func:`one_se_choice`; a cell's errors are summed over the folds).

    Returns the chosen strength and the record ``metrics.json`` keeps under
    ``stageN.prior_selection``: the grid, the held-out share, the curve (a list per column of
    :func:`one_se_choice`'s curve, plus ``laplacian``, the fits' prior term), the best and the chosen
    strength, and the held-out error's relative change from no prior to the chosen strength
    (``gain``; positive: the prior predicts held-out entries better).
    """
    settings = getattr(model, stage)
    grid = sorted(set(settings.alpha_grid))
    label = "stage 1" if stage == "stage1" else "stage 2"
    if graph is None:
        log.warning("%s: model.%s.rel_alpha=auto without a similarity resource: there is no prior to choose a "
                    "strength for (resource=none); the fit has none", label, stage)
        return 0.0, {"grid": grid, "chosen": 0.0, "reason": "no resource"}
    folds = model.holdout.folds
    log.info("%s: rel_alpha=auto: fitting %d strengths %s, %d time(s) each with another %.0f%% of the entries held "
             "out", label, len(grid), grid, folds, 100 * model.holdout.fraction)
    fits = [[fit(alpha, fold) for fold in range(folds)] for alpha in grid]
    entries = sum(int(f.stats["heldout_entries"]) for f in fits[0])
    chosen, curve = one_se_choice(grid, [sum(f.heldout_per_cell for f in row) for row in fits], entries)
    for point, row in zip(curve, fits):
        point["laplacian"] = float(np.mean([f.stats["loss"].get("laplacian", math.nan) for f in row]))
    best = int(np.argmin([p["heldout_recon"] for p in curve]))
    none = curve[grid.index(0.0)]["heldout_recon"] if 0.0 in grid else math.nan
    record = {"grid": grid, "fraction": model.holdout.fraction, "folds": folds, "heldout_entries": entries,
              # by column (an AnnData's .uns stores lists of numbers, not of records)
              "curve": {key: [p[key] for p in curve] for key in curve[0]},
              "best": grid[best], "chosen": grid[chosen],
              "gain": (none - curve[chosen]["heldout_recon"]) / none if none > 0 else math.nan,
              "rule": "smallest strength within one standard error (paired over cells) of the best"}
    log.info("%s: rel_alpha=auto chose %g (lowest held-out error at %g); held-out error %s; %.3g%% below no prior",
             label, record["chosen"], record["best"],
             ", ".join(f"{p['rel_alpha']:g}: {p['heldout_recon']:.6g}" for p in curve), 100 * record["gain"])
    return record["chosen"], record
