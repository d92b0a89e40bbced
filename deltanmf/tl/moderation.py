"""Empirical-Bayes moderation of residual variances (Smyth 2004, Stat Appl Genet Mol Biol 3:3).

Many parallel tests with few residual degrees of freedom each (programs of a two-condition
table, targets of a screen) share one prior for their variances, ``s^2 ~ s0^2 F(d, d0)``;
each test then uses the posterior variance ``(d0 s0^2 + d s^2) / (d0 + d)`` on ``d0 + d``
degrees of freedom (limma's ``squeezeVar``). A *trend* lets ``s0^2`` follow a covariate (the
mean of ``log2`` share: programs near the share floor vary more), as limma's ``trend=TRUE``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import digamma, polygamma


def trigamma_inverse(x: float) -> float:
    """The ``y`` with ``trigamma(y) = x`` (Newton's method on a convex function, as limma's
    ``trigammaInverse``)."""
    if x > 1e7:
        return 1.0 / np.sqrt(x)
    if x < 1e-6:
        return 1.0 / x
    y = 0.5 + 1.0 / x
    for _ in range(50):
        tri = float(polygamma(1, y))
        step = tri * (1.0 - tri / x) / float(polygamma(2, y))
        y += step
        if -step / y < 1e-8:
            break
    return y


@dataclass(frozen=True)
class FPrior:
    """The scaled-F prior of residual variances: ``s^2 ~ s0^2 F(d, d0)``.

    ``df`` is ``d0`` (``inf``: the variances differ no more than sampling says, and the prior
    replaces them; 0: no prior, each variance stands alone); ``scale`` is ``s0^2``.
    """

    df: float
    scale: float | np.ndarray  # one per test with a trend

    def squeeze(self, variance: np.ndarray, df: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Posterior variances ``(d0 s0^2 + d s^2) / (d0 + d)`` and their degrees of freedom
        ``d0 + d``; a variance with ``d = 0`` takes the prior's."""
        variance, df = np.asarray(variance, dtype=np.float64), np.asarray(df, dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            if np.isinf(self.df):
                return np.broadcast_to(self.scale, variance.shape).astype(np.float64), np.full_like(df, np.inf)
            if self.df == 0:
                return np.where(df > 0, variance, np.nan), df
            own = np.where(df > 0, df * np.nan_to_num(variance), 0.0)
            return (self.df * self.scale + own) / (self.df + df), self.df + df


NO_PRIOR = FPrior(0.0, np.nan)


def fit_f_prior(variance: np.ndarray, df: np.ndarray, trend: np.ndarray | None = None) -> FPrior:
    """Fit ``s^2 ~ s0^2 F(d, d0)`` to residual variances by moments of ``log s^2`` (Smyth
    2004, limma's ``fitFDist``). Variances of 0 are raised to ``1e-5`` times the median, as
    limma does; fewer than 2 usable variances give :data:`NO_PRIOR`.

    ``trend`` (one value per variance): ``log s0^2`` is a straight line in it, fitted by least
    squares to the adjusted ``log s^2`` (limma fits a spline; a line is what a table of ten
    or twenty programs can support), when at least 6 variances are usable; ``scale`` is then
    one ``s0^2`` per variance (those not usable get the line's value too). Unlike limma, both
    ``d0`` and ``s0^2`` are taken at one-sided 95% confidence limits (see the code): with few
    tests the point estimates make moderated tests anti-conservative; and ``d0`` is at most
    the variances' total degrees of freedom (less the trend's terms), never infinite.
    """
    variance, df = np.asarray(variance, dtype=np.float64), np.asarray(df, dtype=np.float64)
    ok = np.isfinite(variance) & (df > 0) & np.isfinite(df)
    if trend is not None:
        trend = np.asarray(trend, dtype=np.float64)
        ok &= np.isfinite(trend)
    if ok.sum() < 2:
        return NO_PRIOR
    s2, d = np.maximum(variance[ok], 0.0), df[ok]
    middle = np.median(s2)
    s2 = np.maximum(s2, 1e-5 * (middle if middle > 0 else 1.0))
    e = np.log(s2) - digamma(d / 2) + np.log(d / 2)
    at = None if trend is None else np.where(np.isfinite(trend), trend, np.nanmean(trend[ok]))
    if at is not None and ok.sum() >= 6:
        fitted = np.column_stack([np.ones(ok.sum()), trend[ok]])
        everywhere = np.column_stack([np.ones(len(at)), at])
    else:
        fitted, everywhere = np.ones((ok.sum(), 1)), np.ones((len(variance) if at is not None else 1, 1))
    inverse = np.linalg.pinv(fitted.T @ fitted)
    coef = inverse @ fitted.T @ e
    residual, free = e - fitted @ coef, ok.sum() - fitted.shape[1]
    squares = residual ** 2 * len(residual) / max(free, 1)
    # Both halves of the prior are estimates; with few tests (a table of ten programs) they are
    # noisy, and an error toward a smaller or more trusted prior makes every test of the table
    # anti-conservative together. So the prior is taken at its one-sided 95% limits: d0 from
    # the upper limit of the excess spread of log s^2 over sampling's (the squared residuals'
    # standard error), s0^2 from the upper limit of its line (the fit's standard error there).
    # With thousands of tests (a screen's targets) both limits are the estimates themselves.
    margin = 1.645 * squares.std(ddof=1) / np.sqrt(len(squares)) if len(squares) > 1 else np.inf
    excess = squares.mean() - polygamma(1, d / 2).mean() + margin
    centre = everywhere @ coef + 1.645 * np.sqrt(squares.mean() * np.einsum("ij,jk,ik->i", everywhere, inverse,
                                                                           everywhere))
    if at is None:
        centre = float(centre[0])
    # nor can the prior be worth more degrees of freedom than the variances it was fitted to hold
    # between them (three programs of 2 df each cannot make a variance known exactly)
    cap = float(d.sum()) - fitted.shape[1]
    d0 = 2 * trigamma_inverse(float(excess)) if excess > 0 else np.inf
    d0 = min(d0, cap) if cap > 0 else 0.0
    if d0 == 0:
        return NO_PRIOR
    return FPrior(d0, np.exp(centre + digamma(d0 / 2) - np.log(d0 / 2)))


