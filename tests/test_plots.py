"""Tests for ``deltanmf.pl``: every plot function returns a matplotlib Figure (no pyplot,
no backend change) built from the tables of ``deltanmf.tl.casecontrol``, saved by
``deltanmf.pl.save_figure`` as a valid, readable PNG, and what it draws matches those tables.

Drawn content is checked through the returned figure's axes: heatmap values, called dots,
arrows and stars are compared with the tables recomputed here with pandas.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import matplotlib.image as mpimg
import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from deltanmf import pl
from deltanmf.core.metrics import cosine_matrix
from deltanmf.tl.casecontrol import case_program_table, group_usage_table, usage_shift_table

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


def save_png(fig, path, min_side=100):
    """``fig`` is a Figure; written by :func:`deltanmf.pl.save_figure` to a valid PNG."""
    assert isinstance(fig, Figure)
    pl.save_figure(fig, path)
    return assert_png(path, min_side)


def plot_axes(fig):
    """The plotting axes of ``fig`` (its colorbar axes left out)."""
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


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
    cases = case_program_table(ctrl, case, NAMES, K, programs, programs, genes)
    return ctrl, case, programs, genes, shift, cases


def test_top_genes_plot_writes_png(tmp_path, fit):
    _, _, programs, genes, _, _ = fit
    fig = pl.top_genes_plot(programs, NAMES, genes, n_top=8)
    save_png(fig, tmp_path / "top_genes.png")
    axes = plot_axes(fig)
    assert len(axes) == 10 and all(ax.get_subplotspec().get_geometry()[:2] == (2, 5) for ax in axes)
    assert [ax.get_subplotspec().num1 for ax in axes] == list(range(10))  # 7 programs, 5 per row, row by row
    for j, ax in enumerate(axes[:len(NAMES)]):
        assert ax.get_title() == NAMES[j]
        labels = [t.get_text() for t in ax.get_yticklabels()]
        top = np.argsort(-programs[:, j])[:8]
        assert labels == list(genes[top][::-1])  # highest at the top of the chart
        widths = [bar.get_width() for bar in ax.patches]
        np.testing.assert_allclose(widths, programs[top[::-1], j])
    assert not axes[-1].axison  # the unused panel is hidden


def test_top_genes_weight_labels_do_not_run_together(tmp_path):
    """Programs sum to 1 over many genes, so weights are small decimals; the weight axis
    of each panel must still have readable, separate tick labels."""
    programs = np.random.default_rng(0).uniform(0.0, 1.6, size=(200, 4))
    programs[:10] = np.linspace(2.5, 3.0, 10)[:, None]  # top weights ~0.015, as a fit of 200 genes gives
    programs /= programs.sum(axis=0)
    fig = pl.top_genes_plot(programs, NAMES[:4], [f"ENSG{i:011d}" for i in range(200)])
    save_png(fig, tmp_path / "top_genes.png")
    canvas = FigureCanvasAgg(fig)  # a Figure without pyplot: lay it out on an Agg canvas
    canvas.draw()
    renderer = canvas.get_renderer()
    for ax in plot_axes(fig):
        lo, hi = ax.get_xlim()
        boxes = sorted((t.get_window_extent(renderer) for t, x in zip(ax.get_xticklabels(), ax.get_xticks())
                        if lo <= x <= hi and t.get_text()), key=lambda b: b.x0)
        assert len(boxes) >= 2
        assert all(a.x1 + 2 < b.x0 for a, b in zip(boxes, boxes[1:]))  # a gap of > 2 pixels


def test_top_genes_plot_single_program(tmp_path):
    fig = pl.top_genes_plot(np.arange(12.0)[:, None], ["base_1"], [f"g{i}" for i in range(12)])
    save_png(fig, tmp_path / "one.png", min_side=50)


def test_usage_share_plot_writes_png(tmp_path, fit):
    *_, shift, cases = fit
    assert set(shift["shift"]) == {"up", "down", "none"} and cases["emergent"].any()
    fig = pl.usage_share_plot(shift, cases)
    save_png(fig, tmp_path / "usage_share.png")
    ax1, ax2 = plot_axes(fig)
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
    cases = case_program_table(ctrl, case, NAMES, K, *[rng.gamma(1, 1, (G, K + C))] * 2, np.arange(G))
    assert (shift["shift"] == "none").all() and not cases["emergent"].any()
    save_png(pl.usage_share_plot(shift, cases), tmp_path / "quiet.png")


def test_usage_share_plot_shows_the_sample_level_intervals(tmp_path, fit):
    """With per-sample tests: a third panel with each baseline program's log2 FC and 95% CI."""
    ctrl, case, programs, genes, cell_shift, _ = fit
    labels = lambda n, prefix: np.array([f"{prefix}{i % 6}" for i in range(n)])  # noqa: E731
    samples = dict(control_samples=labels(len(ctrl), "c"), case_samples=labels(len(case), "x"))
    shift = usage_shift_table(ctrl, case, NAMES, K, **samples)
    cases = case_program_table(ctrl, case, NAMES, K, programs, programs, genes, **samples)
    fig = pl.usage_share_plot(shift, cases)
    save_png(fig, tmp_path / "usage_share_samples.png")
    axes = plot_axes(fig)
    assert len(axes) == 3 and len(plot_axes(pl.usage_share_plot(cell_shift, cases))) == 2
    assert "6 control, 6 case" in axes[0].get_title()
    forest = axes[2]
    points = np.concatenate([line.get_xdata() for line in forest.lines if len(line.get_xdata()) and
                             line.get_marker() == "o"])
    np.testing.assert_allclose(np.sort(points), np.sort(shift["log2_fold_change"]))
    ticks = sorted(zip(forest.get_yticks(), (t.get_text() for t in forest.get_yticklabels())), reverse=True)
    assert [label for _, label in ticks] == list(shift["program"])  # top to bottom, in the table's order


def test_similarity_plot_writes_png(tmp_path, fit):
    *_, programs, _, _, _ = fit
    cos = cosine_matrix(programs[:, :K], programs[:, K:])
    fig = pl.similarity_plot(cos, NAMES[:K], NAMES[K:])
    save_png(fig, tmp_path / "similarity.png")
    (ax,) = plot_axes(fig)
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


def test_group_usage_plot_writes_png(tmp_path):
    table = _group_table(8, cells=40)
    assert table["called"].any()
    fig = pl.group_usage_plot(table)
    save_png(fig, tmp_path / "groups.png")
    (ax,) = plot_axes(fig)
    wide = table.pivot(index="group", columns="program", values="log2_fold_change")[NAMES]
    assert [t.get_text() for t in ax.get_yticklabels()] == list(wide.index)
    assert [t.get_text() for t in ax.get_xticklabels()] == NAMES
    np.testing.assert_allclose(np.asarray(ax.images[0].get_array()), wide.to_numpy())
    dots = ax.collections[0].get_offsets()
    called = table.pivot(index="group", columns="program", values="called")[NAMES].to_numpy()
    ys, xs = np.nonzero(called)
    assert sorted(map(tuple, np.asarray(dots).tolist())) == sorted(zip(xs.tolist(), ys.tolist()))


def test_group_usage_plot_keeps_60_most_changed_groups(tmp_path):
    table = _group_table(75)
    assert table["group"].nunique() == 75
    fig = pl.group_usage_plot(table)
    save_png(fig, tmp_path / "many_groups.png")
    (ax,) = plot_axes(fig)
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


# -- no pyplot, no backend change ---------------------------------------------------------------
_NO_PYPLOT = textwrap.dedent("""
    import sys, tempfile
    from pathlib import Path
    import matplotlib
    before = matplotlib.get_backend(auto_select=False)  # None until chosen; does not import pyplot
    import numpy as np, pandas as pd
    import deltanmf
    import deltanmf.pl as pl
    from deltanmf.tl.casecontrol import case_program_table, group_usage_table, usage_shift_table
    rng = np.random.default_rng(0)
    names = ["base_1", "base_2", "base_3", "case_1"]
    ctrl, case = rng.gamma(1, 1, (40, 4)), rng.gamma(1, 1, (40, 4))
    programs = rng.gamma(1, 1, (20, 4))
    shift = usage_shift_table(ctrl, case, names, 3)
    cases = case_program_table(ctrl, case, names, 3, programs, programs, np.arange(20))
    groups = np.array(["ctrl"] * 40 + ["A"] * 20 + ["B"] * 20)
    table = group_usage_table(np.vstack([ctrl, case]), groups, groups == "ctrl", names, 3)
    ks = pd.DataFrame({"K": [3, 4, 5], "K_case": [None] * 3, "stage": ["onestage"] * 3,
                       "stability": [0.9, 0.8, 0.5], "stage1_relative_error": [0.5, 0.4, 0.38],
                       "explained_variance_gain": [np.nan] * 3, "null_explained_variance_gain": [np.nan] * 3})
    figures = [pl.top_genes_plot(programs, names, np.arange(20)), pl.usage_share_plot(shift, cases),
               pl.similarity_plot(np.full((3, 1), 0.5), names[:3], names[3:]), pl.group_usage_plot(table),
               pl.k_selection_plot(ks, k=4)]
    with tempfile.TemporaryDirectory() as folder:
        for i, fig in enumerate(figures):
            pl.save_figure(fig, Path(folder) / f"{i}.png")
            assert (Path(folder) / f"{i}.png").read_bytes()[:4] == b"\\x89PNG"
    assert "matplotlib.pyplot" not in sys.modules, "pyplot was imported"
    after = matplotlib.get_backend(auto_select=False)
    assert after == before, (before, after)
    print("backend", before, after)
""")


@pytest.mark.parametrize("backend", [None, "svg"])
def test_plotting_does_not_import_pyplot_or_change_the_backend(backend):
    """In a fresh interpreter: importing deltanmf and deltanmf.pl, building every figure and
    saving it leaves pyplot unimported and matplotlib's backend as it was (unset, or the
    user's choice)."""
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    if backend is not None:
        env["MPLBACKEND"] = backend
    proc = subprocess.run([sys.executable, "-c", _NO_PYPLOT], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["backend", str(backend), str(backend)]
