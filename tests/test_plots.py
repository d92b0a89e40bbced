"""Tests for ``deltanmf.report.plots``: every writer produces a valid, readable PNG from the
tables of ``deltanmf.report.casecontrol``, and what it draws matches those tables.

Drawn content is checked through the figure's axes (captured by wrapping
``plt.subplots``): heatmap values, called dots, arrows and stars are compared with the
tables recomputed here with pandas.
"""
from __future__ import annotations

import numpy as np
import pytest

import matplotlib

matplotlib.use("Agg")
import matplotlib.image as mpimg  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402

from deltanmf.nmf.metrics import cosine_matrix  # noqa: E402
from deltanmf.report import plots  # noqa: E402
from deltanmf.report.casecontrol import case_program_table, group_usage_table, usage_shift_table  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
K, C, G = 5, 2, 30
NAMES = [f"base_{i + 1}" for i in range(K)] + [f"case_{j + 1}" for j in range(C)]


def assert_png(path, min_side=100):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    assert image.shape[0] >= min_side and image.shape[1] >= min_side
    assert float(image[..., :3].std()) > 0.01  # not a blank canvas
    return image


@pytest.fixture
def capture_axes(monkeypatch):
    """Record the axes of every figure a plot function creates."""
    made = []
    original = plots.plt.subplots

    def spy(*args, **kwargs):
        fig, axes = original(*args, **kwargs)
        made.append(axes)
        return fig, axes

    monkeypatch.setattr(plots.plt, "subplots", spy)
    return made


def _usage(rng, n, alpha, case_fraction=0.0):
    base = rng.dirichlet(alpha, size=n) * rng.lognormal(1.0, 0.5, size=(n, 1))
    total = base.sum(axis=1)
    s = rng.uniform(0.2, 0.6, n) * (rng.random(n) < case_fraction)
    base *= (1 - s)[:, None]
    case = np.zeros((n, C))
    case[:, 0] = s * total
    return np.hstack([base, case])


@pytest.fixture(scope="module")
def fit():
    rng = np.random.default_rng(20)
    alpha = np.full(K, 2.0)
    shifted = alpha.copy()
    shifted[1], shifted[3] = 3.5, 0.5
    ctrl = _usage(rng, 300, alpha)
    case = _usage(rng, 300, shifted, case_fraction=0.5)
    programs = rng.gamma(0.5, 1.0, size=(G, K + C))
    genes = np.array([f"gene{i}" for i in range(G)])
    shift = usage_shift_table(ctrl, case, NAMES, K)
    cases = case_program_table(ctrl, case, NAMES, K, programs, genes)
    return ctrl, case, programs, genes, shift, cases


def test_top_genes_plot_writes_png(tmp_path, fit, capture_axes):
    _, _, programs, genes, _, _ = fit
    path = tmp_path / "top_genes.png"
    plots.top_genes_plot(path, programs, NAMES, genes, n_top=8)
    assert_png(path)
    axes = capture_axes[0]
    assert axes.shape == (2, 5)  # 7 programs, 5 per row
    for j, ax in enumerate(axes.flat[:len(NAMES)]):
        assert ax.get_title() == NAMES[j]
        labels = [t.get_text() for t in ax.get_yticklabels()]
        top = np.argsort(-programs[:, j])[:8]
        assert labels == list(genes[top][::-1])  # highest at the top of the chart
        widths = [bar.get_width() for bar in ax.patches]
        np.testing.assert_allclose(widths, programs[top[::-1], j])
    assert not axes.flat[-1].axison  # the unused panel is hidden


def test_top_genes_weight_labels_do_not_run_together(tmp_path, capture_axes):
    """Programs sum to 1 over many genes, so weights are small decimals; the weight axis
    of each panel must still have readable, separate tick labels."""
    programs = np.random.default_rng(0).uniform(0.0, 1.6, size=(200, 4))
    programs[:10] = np.linspace(2.5, 3.0, 10)[:, None]  # top weights ~0.015, as a fit of 200 genes gives
    programs /= programs.sum(axis=0)
    plots.top_genes_plot(tmp_path / "top_genes.png", programs, NAMES[:4], [f"ENSG{i:011d}" for i in range(200)])
    for ax in capture_axes[0].flat:
        renderer = FigureCanvasAgg(ax.figure).get_renderer()  # the figure is closed once saved
        lo, hi = ax.get_xlim()
        boxes = sorted((t.get_window_extent(renderer) for t, x in zip(ax.get_xticklabels(), ax.get_xticks())
                        if lo <= x <= hi and t.get_text()), key=lambda b: b.x0)
        assert len(boxes) >= 2
        assert all(a.x1 + 2 < b.x0 for a, b in zip(boxes, boxes[1:]))  # a gap of > 2 pixels


def test_top_genes_plot_single_program(tmp_path):
    path = tmp_path / "one.png"
    plots.top_genes_plot(path, np.arange(12.0)[:, None], ["base_1"], [f"g{i}" for i in range(12)])
    assert_png(path, min_side=50)


def test_usage_share_plot_writes_png(tmp_path, fit, capture_axes):
    *_, shift, cases = fit
    assert set(shift["shift"]) == {"up", "down", "none"} and cases["emergent"].any()
    path = tmp_path / "usage_share.png"
    plots.usage_share_plot(path, shift, cases)
    assert_png(path)
    ax1, ax2 = capture_axes[0]
    heights = [b.get_height() for b in ax1.patches]
    np.testing.assert_allclose(heights, list(shift["control_share"]) + list(shift["case_share"]))
    arrows = [t.get_text() for t in ax1.texts]
    assert sorted(arrows) == sorted("↑" if s == "up" else "↓" for s in shift["shift"] if s != "none")
    stars = [t.get_text() for t in ax2.texts]
    assert stars == ["*"] * int(cases["emergent"].sum())
    assert [t.get_text() for t in ax2.get_xticklabels()] == list(cases["program"])


def test_usage_share_plot_nothing_called(tmp_path):
    rng = np.random.default_rng(21)
    ctrl, case = _usage(rng, 50, np.full(K, 2.0)), _usage(rng, 50, np.full(K, 2.0))
    shift = usage_shift_table(ctrl, case, NAMES, K)
    cases = case_program_table(ctrl, case, NAMES, K, rng.gamma(1, 1, (G, K + C)), np.arange(G))
    assert (shift["shift"] == "none").all() and not cases["emergent"].any()
    path = tmp_path / "quiet.png"
    plots.usage_share_plot(path, shift, cases)
    assert_png(path)


def test_similarity_plot_writes_png(tmp_path, fit, capture_axes):
    *_, programs, _, _, _ = fit
    cos = cosine_matrix(programs[:, :K], programs[:, K:])
    path = tmp_path / "similarity.png"
    plots.similarity_plot(path, cos, NAMES[:K], NAMES[K:])
    assert_png(path)
    ax = capture_axes[0]
    np.testing.assert_allclose(np.asarray(ax.images[0].get_array()), cos)
    assert [t.get_text() for t in ax.texts] == [f"{v:.2f}" for v in cos.ravel()]


def _group_table(n_groups, seed=22, cells=12):
    rng = np.random.default_rng(seed)
    alpha = np.full(K, 2.0)
    blocks, groups = [_usage(rng, 200, alpha)], ["control"] * 200
    for g in range(n_groups):
        a = alpha.copy()
        a[g % K] *= 1 + 3 * (g % 4 == 0)  # every 4th group: one program raised
        blocks.append(_usage(rng, cells, a, case_fraction=0.5 * (g % 3 == 0)))
        groups += [f"g{g:03d}"] * cells
    is_control = np.array([grp == "control" for grp in groups])
    return group_usage_table(np.vstack(blocks), np.array(groups), is_control, NAMES, K)


def test_group_usage_plot_writes_png(tmp_path, capture_axes):
    table = _group_table(8, cells=40)
    assert table["called"].any()
    path = tmp_path / "groups.png"
    plots.group_usage_plot(path, table)
    assert_png(path)
    ax = capture_axes[0]
    wide = table.pivot(index="group", columns="program", values="log2_fold_change")[NAMES]
    assert [t.get_text() for t in ax.get_yticklabels()] == list(wide.index)
    assert [t.get_text() for t in ax.get_xticklabels()] == NAMES
    np.testing.assert_allclose(np.asarray(ax.images[0].get_array()), wide.to_numpy())
    dots = ax.collections[0].get_offsets()
    called = table.pivot(index="group", columns="program", values="called")[NAMES].to_numpy()
    ys, xs = np.nonzero(called)
    assert sorted(map(tuple, np.asarray(dots).tolist())) == sorted(zip(xs.tolist(), ys.tolist()))


def test_group_usage_plot_keeps_60_most_changed_groups(tmp_path, capture_axes):
    table = _group_table(75)
    assert table["group"].nunique() == 75
    path = tmp_path / "many_groups.png"
    plots.group_usage_plot(path, table)
    assert_png(path)
    ax = capture_axes[0]
    change = table.assign(a=table["log2_fold_change"].abs()).groupby("group")["a"].max()
    expected = list(change.sort_values(ascending=False).index[:60])
    shown = [t.get_text() for t in ax.get_yticklabels()]
    assert len(shown) == 60 and shown == expected
    assert np.asarray(ax.images[0].get_array()).shape == (60, K + C)
    wide = table.pivot(index="group", columns="program", values="log2_fold_change").loc[expected, NAMES]
    np.testing.assert_allclose(np.asarray(ax.images[0].get_array()), wide.to_numpy())
    assert "60 most changed of 75 groups" in ax.get_title()
    # dots only for called cells among the kept groups
    called = table.pivot(index="group", columns="program", values="called").loc[expected, NAMES]
    assert len(ax.collections[0].get_offsets()) == int(called.to_numpy().sum())
