"""Tests for the data layer: ``prepare``, ``read_h5ad``, ``demo_path``, ``CellDataModule`` and
the similarity resources. Every expected value is worked out independently in numpy."""
from __future__ import annotations

import re

import importlib
import json
import os
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from conftest import write_similarity
from deltanmf.core import CellMatrix
from deltanmf.data import (
    H5adRows,
    PreparedData,
    demo_path,
    open_h5ad,
    prepare,
    read_h5ad,
    simulate_case_control,
    simulation_truth,
    split_conditions,
)
from deltanmf.errors import InputError
from deltanmf.resources import FileResource, read_gene_list, similarity_from_embeddings
from deltanmf.train import CellDataModule
from helpers import data, datamodule, plan

# ``deltanmf.data.prepare`` the attribute is the function (re-exported by the package), so
# the modules are looked up by name.
demo_module = importlib.import_module("deltanmf.data.demo")

N_CTRL, N_DRUG, N_OTHER, N_GENES = 20, 15, 10, 30


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def make_adata(seed: int = 0, sparse: bool = False, n_genes: int = N_GENES) -> ad.AnnData:
    """45 cells (20 ctrl, 15 drug, 10 other, shuffled) x ``n_genes`` Poisson counts."""
    rng = np.random.default_rng(seed)
    n = N_CTRL + N_DRUG + N_OTHER
    cond = np.array(["ctrl"] * N_CTRL + ["drug"] * N_DRUG + ["other"] * N_OTHER)
    cond = cond[rng.permutation(n)]
    level = rng.permutation(np.geomspace(0.02, 3.0, n_genes))  # some genes rarely detected
    rate = rng.gamma(1.0, 3.0, size=(n, n_genes)) * rng.uniform(0.5, 2.0, size=(n, 1)) * level
    x = rng.poisson(rate).astype(np.float32)
    obs = pd.DataFrame(
        {"condition": cond, "batch": rng.integers(0, 2, n).astype(str)},
        index=[f"cell{i}" for i in range(n)],
    )
    var = pd.DataFrame({"symbol": [f"SYM{j}" for j in range(n_genes)]},
                       index=[f"gene{j}" for j in range(n_genes)])
    return ad.AnnData(X=sp.csr_matrix(x) if sparse else x, obs=obs, var=var)


def dense(x) -> np.ndarray:
    return x.toarray() if sp.issparse(x) else np.asarray(x)


def cells_in_use(adata: ad.AnnData, control="ctrl", case=None, use_case=True) -> np.ndarray:
    """Row indices in the order prepare must produce: controls then cases, file order."""
    cond = adata.obs["condition"].astype(str).to_numpy()
    ctrl = np.flatnonzero(cond == str(control))
    if not use_case:
        return ctrl
    cases = np.flatnonzero(cond != str(control)) if case is None else np.flatnonzero(cond == str(case))
    return np.concatenate([ctrl, cases])


RAW = dict(min_cells=0, scale_genes=False, normalize="none")


# --------------------------------------------------------------------------------------
# prepare: split
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", [None, "drug"])
def test_split_controls_first_then_cases_in_file_order(case):
    adata = make_adata()
    p = prepare(adata, data("condition", "ctrl", case=case, **RAW), use_case=True)
    rows = cells_in_use(adata, case=case)
    n_case = N_DRUG + N_OTHER if case is None else N_DRUG
    assert len(rows) == N_CTRL + n_case
    assert list(p.obs.index) == list(adata.obs_names[rows])
    np.testing.assert_array_equal(p.is_control, np.r_[np.ones(N_CTRL, bool), np.zeros(n_case, bool)])
    np.testing.assert_array_equal(p.X, adata.X[rows])
    assert set(p.obs["condition"][~p.is_control]) == ({"drug", "other"} if case is None else {"drug"})
    assert isinstance(p, PreparedData) and p.n_genes == N_GENES


def test_use_case_false_keeps_only_controls():
    adata = make_adata()
    p = prepare(adata, data("condition", "ctrl", **RAW), use_case=False)
    rows = cells_in_use(adata, use_case=False)
    assert p.X.shape == (N_CTRL, N_GENES)
    assert p.is_control.all()
    assert list(p.obs.index) == list(adata.obs_names[rows])
    np.testing.assert_array_equal(p.X, adata.X[rows])
    assert p.case.shape == (0, N_GENES)


@pytest.mark.parametrize("control,case", [("0", None), (0, None), (0, 1), ("0", "1")])
def test_integer_condition_column_compared_as_strings(control, case):
    adata = make_adata()
    adata.obs["grp"] = (adata.obs["condition"] != "ctrl").astype(int).to_numpy()
    assert adata.obs["grp"].dtype.kind == "i"
    p = prepare(adata, data("grp", control, case=case, **RAW), use_case=True)
    rows = cells_in_use(adata)  # ctrl <-> 0, everything else <-> 1
    assert list(p.obs.index) == list(adata.obs_names[rows])
    assert p.is_control.sum() == N_CTRL


def test_split_conditions_masks():
    adata = make_adata()
    cond = adata.obs["condition"].to_numpy()
    ctrl, case, counts = split_conditions(adata.obs, "condition", "ctrl", "other")
    np.testing.assert_array_equal(ctrl, cond == "ctrl")
    np.testing.assert_array_equal(case, cond == "other")
    assert counts == {"control": int(ctrl.sum()), "case": int(case.sum()), "unlabelled": 0,
                      "other": int((~ctrl & ~case).sum())}
    ctrl, case, counts = split_conditions(adata.obs, "condition", "ctrl")
    np.testing.assert_array_equal(case, cond != "ctrl")
    assert counts["other"] == 0


def test_labels_near_the_control_value_are_refused_with_the_fix():
    obs = pd.DataFrame({"condition": ["control", "case", "control ", "case"]})
    with pytest.raises(InputError, match=r"holds 'control ' beside data.control='control'.*"
                                         r"\.replace\(\{'control ': 'control'\}\)"):
        split_conditions(obs, "condition", "control")
    # the setting's spelling is not in the data: name the one that is
    obs = pd.DataFrame({"condition": ["control", "case"]})
    with pytest.raises(InputError, match=r"data.control='Control': no cell has this value, but .* holds "
                                         r"'control', .*: give data.control='control'$"):
        split_conditions(obs, "condition", "Control")


@pytest.mark.parametrize("missing", [np.nan, None, "", "  "])
@pytest.mark.parametrize("categorical", [False, True])
def test_cells_without_a_condition_are_left_out_and_counted_never_cases(missing, categorical):
    """Every 7th label missing: those cells are in neither condition (with data.case=null they
    had become cases), the counts say how many; data.allow_unlabelled=false refuses them."""
    adata = make_adata()
    labels = adata.obs["condition"].astype(object).to_numpy()
    labels[::7] = missing
    adata.obs["condition"] = pd.Categorical(labels) if categorical else labels
    ctrl, case, counts = split_conditions(adata.obs, "condition", "ctrl")
    unlabelled = np.zeros(adata.n_obs, dtype=bool)
    unlabelled[::7] = True
    assert not (ctrl & unlabelled).any() and not (case & unlabelled).any()
    assert counts["unlabelled"] == unlabelled.sum() and counts["control"] + counts["case"] == adata.n_obs - unlabelled.sum()
    p = prepare(adata, data("condition", "ctrl", min_cells=0), use_case=True)
    assert p.cell_counts["unlabelled"] == unlabelled.sum() and len(p.obs) == adata.n_obs - unlabelled.sum()
    assert set(p.obs.index).isdisjoint(adata.obs_names[unlabelled])
    with pytest.raises(InputError, match=r"have no condition .*data\.allow_unlabelled=true"):
        split_conditions(adata.obs, "condition", "ctrl", allow_unlabelled=False)


@pytest.mark.parametrize("variant, case_variant", [("ctrl ", "drug "), (" ctrl", " drug"), ("CTRL", "DRUG"),
                                                   ("Ctrl", "Drug")])
def test_labels_that_differ_only_by_spaces_or_capitals_are_refused(variant, case_variant):
    """'ctrl ' beside 'ctrl' would silently become a case (data.case=null): refused, both named."""
    adata = make_adata()
    labels = adata.obs["condition"].astype(str).to_numpy()
    labels[np.flatnonzero(labels == "ctrl")[0]] = variant
    adata.obs["condition"] = labels
    with pytest.raises(InputError, match=re.escape(repr(variant)) + r" beside data\.control='ctrl'"):
        split_conditions(adata.obs, "condition", "ctrl")
    labels = make_adata().obs["condition"].astype(str).to_numpy()
    labels[np.flatnonzero(labels == "drug")[0]] = case_variant
    adata.obs["condition"] = labels
    with pytest.raises(InputError, match=r"beside data\.case='drug'"):
        split_conditions(adata.obs, "condition", "ctrl", "drug")


# --------------------------------------------------------------------------------------
# prepare: errors
# --------------------------------------------------------------------------------------
def test_input_error_is_value_error():
    assert issubclass(InputError, ValueError)


def test_missing_condition_key_lists_columns():
    with pytest.raises(InputError) as err:
        prepare(make_adata(), data("treatment", "ctrl"), use_case=True)
    msg = str(err.value)
    assert "'treatment'" in msg and "'condition'" in msg and "'batch'" in msg


def test_absent_control_lists_values_with_counts():
    with pytest.raises(InputError) as err:
        prepare(make_adata(), data("condition", "ntc"), use_case=True)
    msg = str(err.value)
    assert "'ntc'" in msg
    for value, n in [("ctrl", N_CTRL), ("drug", N_DRUG), ("other", N_OTHER)]:
        assert f"'{value}' ({n} cells)" in msg


@pytest.mark.parametrize("use_case", [True, False])
def test_absent_case_lists_values_with_counts(use_case):
    with pytest.raises(InputError) as err:
        prepare(make_adata(), data("condition", "ctrl", case="kinase"), use_case=use_case)
    msg = str(err.value)
    assert "data.case='kinase'" in msg
    for value, n in [("ctrl", N_CTRL), ("drug", N_DRUG), ("other", N_OTHER)]:
        assert f"'{value}' ({n} cells)" in msg


def test_missing_layer_lists_the_other_matrices_as_settings():
    adata = make_adata()
    with pytest.raises(InputError, match=r"data\.layer=counts not found; the other matrices of this AnnData: "
                                         r"data\.layer=null \(\.X\)"):
        prepare(adata, data("condition", "ctrl", layer="counts"), use_case=True)
    adata.layers["spliced"] = adata.X.copy()
    adata.raw = adata.copy()
    with pytest.raises(InputError, match=r"data\.layer=counts not found; the other matrices of this AnnData: "
                                         r"data\.layer=spliced, data\.use_raw=true \(\.raw\), data\.layer=null"):
        prepare(adata, data("condition", "ctrl", layer="counts"), use_case=True)


def test_negative_values_name_the_matrices_that_could_be_used_instead():
    """pbmc68k_reduced's case: a scaled .X (negative values) beside counts in a layer and in .raw."""
    adata = make_adata()
    counts = adata.X.copy()
    adata.layers["counts"] = counts
    adata.raw = adata.copy()
    adata.X = (counts - counts.mean(axis=0)) / (counts.std(axis=0) + 1)  # scaled, as scanpy's scale() leaves it
    with pytest.raises(InputError, match=r"negative values .* The other matrices of this AnnData: "
                                         r"data\.layer=counts, data\.use_raw=true \(\.raw\)\."):
        prepare(adata, data("condition", "ctrl"), use_case=True)
    from_layer = prepare(adata, data("condition", "ctrl", layer="counts"), use_case=True)
    from_raw = prepare(adata, data("condition", "ctrl", use_raw=True), use_case=True)
    np.testing.assert_array_equal(dense(from_raw.X), dense(from_layer.X))
    assert list(from_raw.var.index) == list(from_layer.var.index)


def test_use_raw_takes_raw_genes_and_refuses_a_missing_raw_or_a_layer_too():
    adata = make_adata()
    full = adata.copy()
    adata.raw = full
    adata = adata[:, :10].copy()  # .X keeps 10 genes, .raw all of them
    p = prepare(adata, data("condition", "ctrl", use_raw=True, min_cells=0), use_case=True)
    assert p.n_genes == full.n_vars and list(p.var.index) == list(full.var_names)
    with pytest.raises(InputError, match=r"data\.use_raw=true but the AnnData has no \.raw"):
        prepare(make_adata(), data("condition", "ctrl", use_raw=True), use_case=True)
    with pytest.raises(InputError, match=r"data\.use_raw=true and data\.layer=counts choose two matrices"):
        data("condition", "ctrl", use_raw=True, layer="counts")


@pytest.mark.parametrize("sparse", [False, True])
def test_negative_values_counted(sparse):
    adata = make_adata()
    x = adata.X.copy()
    rows = cells_in_use(adata)
    x[rows[0], 0] = -1.0
    x[rows[3], 5] = -2.0
    x[rows[-1], 7] = -0.5
    adata.X = sp.csr_matrix(x) if sparse else x
    with pytest.raises(InputError, match=r"holds 3 negative values"):
        prepare(adata, data("condition", "ctrl"), use_case=True)


@pytest.mark.parametrize("sparse", [False, True])
def test_nan_and_inf_counted(sparse):
    adata = make_adata()
    x = adata.X.copy()
    rows = cells_in_use(adata)
    x[rows[1], 2] = np.nan
    x[rows[2], 2] = np.nan
    x[rows[-2], 9] = np.inf
    adata.X = sp.csr_matrix(x) if sparse else x
    with pytest.raises(InputError, match=r"holds 3 NaN or infinite values"):
        prepare(adata, data("condition", "ctrl"), use_case=True)


def test_bad_values_in_layer_name_the_layer():
    adata = make_adata()
    bad = adata.X.copy()
    bad[cells_in_use(adata)[0], 0] = -3
    adata.layers["counts"] = bad
    with pytest.raises(InputError, match=r"data.layer=counts holds 1 negative values"):
        prepare(adata, data("condition", "ctrl", layer="counts"), use_case=True)


def test_use_case_without_case_cells():
    adata = make_adata()
    adata.obs["condition"] = "ctrl"
    with pytest.raises(InputError, match=r"no case cells"):
        prepare(adata, data("condition", "ctrl"), use_case=True)
    # only controls are needed: fine
    p = prepare(adata, data("condition", "ctrl", **RAW), use_case=False)
    assert p.X.shape == adata.shape


def test_no_genes_left():
    with pytest.raises(InputError) as err:
        prepare(make_adata(), data("condition", "ctrl", min_cells=10_000), use_case=True)
    msg = str(err.value)
    assert "no genes left" in msg and "'input': 30" in msg and "'min_cells': 0" in msg
    with pytest.raises(InputError, match=r"no genes left.*'resource': 0"):
        prepare(make_adata(), data("condition", "ctrl"), use_case=True, resource_genes=["notagene"])


def test_case_equal_to_control_is_rejected():
    # refused by the data settings, before any data is read
    with pytest.raises(InputError, match=r"data.case=ctrl is the same as data.control"):
        data("condition", "ctrl", case="ctrl")


def test_bad_normalize_and_min_cells():
    # refused by the data settings, naming the key, the value and the allowed values
    with pytest.raises(InputError) as err:
        data("condition", "ctrl", normalize="log")
    msg = str(err.value)
    assert "data.normalize=log" in msg and "total" in msg and "median" in msg
    with pytest.raises(InputError, match=r"data.min_cells=-1"):
        data("condition", "ctrl", min_cells=-1)


# --------------------------------------------------------------------------------------
# prepare: gene filter
# --------------------------------------------------------------------------------------
def _with_case_only_gene():
    adata = make_adata()
    x = adata.X.copy()
    cond = adata.obs["condition"].to_numpy()
    x[:, 4] = 0.0
    x[np.flatnonzero(cond == "drug")[:5], 4] = 3.0  # only in 5 case cells
    adata.X = x
    return adata


def test_min_cells_counts_only_cells_in_use():
    adata = _with_case_only_gene()
    ctrl_only = prepare(adata, data("condition", "ctrl", min_cells=3, scale_genes=False), use_case=False)
    both = prepare(adata, data("condition", "ctrl", min_cells=3, scale_genes=False), use_case=True)
    assert "gene4" not in ctrl_only.var.index
    assert "gene4" in both.var.index
    # also dropped when the cases in use are the "other" cells, which do not express it
    other = prepare(adata, data("condition", "ctrl", case="other", min_cells=3, scale_genes=False), use_case=True)
    assert "gene4" not in other.var.index


@pytest.mark.parametrize("use_case", [True, False])
@pytest.mark.parametrize("min_cells", [0, 12, 18])
def test_min_cells_matches_numpy(use_case, min_cells):
    adata = make_adata(seed=3)
    rows = cells_in_use(adata, use_case=use_case)
    detected = (adata.X[rows] > 0).sum(axis=0)
    expected = adata.var_names[detected >= min_cells]
    assert 0 < len(expected) <= N_GENES
    p = prepare(adata, data("condition", "ctrl", min_cells=min_cells, scale_genes=False), use_case=use_case)
    assert list(p.var.index) == list(expected)
    assert p.gene_counts["min_cells"] == len(expected)


def test_remove_and_resource_genes_and_counts():
    adata = make_adata(seed=1)
    rows = cells_in_use(adata)
    detected = (adata.X[rows] > 0).sum(axis=0)
    keep = detected >= 25
    n_min = int(keep.sum())
    assert 5 < n_min < N_GENES
    kept_names = list(adata.var_names[keep])
    remove = [kept_names[0], kept_names[3], "not_in_data"]
    rng = np.random.default_rng(0)
    resource = [g for g in adata.var_names if g not in (kept_names[1],)] + ["extra1", "extra2"]
    resource = list(np.asarray(resource)[rng.permutation(len(resource))])  # scrambled order
    p = prepare(adata, data("condition", "ctrl", min_cells=25, remove_genes=remove, scale_genes=False), use_case=True,
                resource_genes=resource)
    expected = [g for g in adata.var_names if g in kept_names and g not in remove and g in resource]
    assert list(p.var.index) == expected  # the dataset's order, not the resource's
    assert p.gene_counts == {"input": N_GENES, "min_cells": n_min, "remove_genes": n_min - 2,
                             "resource": n_min - 3}
    assert list(p.gene_counts) == ["input", "min_cells", "remove_genes", "resource"]
    cols = [adata.var_names.get_loc(g) for g in expected]
    np.testing.assert_array_equal(p.X, adata.X[rows][:, cols])


def test_gene_counts_without_resource():
    p = prepare(make_adata(), data("condition", "ctrl", min_cells=0, remove_genes=["gene0", "gene1"]), use_case=True)
    assert p.gene_counts == {"input": N_GENES, "min_cells": N_GENES, "remove_genes": N_GENES - 2}
    assert "gene0" not in p.var.index and "gene1" not in p.var.index


@pytest.mark.parametrize("as_type", [pd.Index, np.asarray])
def test_remove_genes_accepts_names_from_an_index_or_array(as_type):
    # data.remove_genes is a list of names in the settings; names taken from an Index or an array
    # (numpy strings) are accepted
    adata = make_adata()
    remove = list(as_type(["gene0", "gene1"]))
    p = prepare(adata, data("condition", "ctrl", min_cells=0, remove_genes=remove), use_case=True)
    assert list(p.var.index) == list(adata.var_names[2:])


def test_gene_ids_used_for_remove_and_resource():
    adata = make_adata()
    ids = adata.var["symbol"].to_numpy()
    p = prepare(adata, data("condition", "ctrl", min_cells=0, remove_genes=["SYM2", "gene3"], scale_genes=False),
                use_case=True, resource_genes=[f"SYM{j}" for j in range(10)], gene_ids=ids)
    # removal and the resource match the symbols; var keeps the var_names
    assert list(p.var.index) == [f"gene{j}" for j in range(10) if j != 2]


# --------------------------------------------------------------------------------------
# prepare: normalisation
# --------------------------------------------------------------------------------------
def test_a_large_sparse_block_is_passed_over_in_bounded_pieces(monkeypatch):
    """The passes make several float64/int64 arrays per stored value: a sparse block is cut into
    pieces of whole rows holding at most about PASS_STORED values, with the same prepared matrix."""
    blocks_module = importlib.import_module("deltanmf.data.blocks")
    adata = make_adata(seed=4, sparse=True)
    settings = data("condition", "ctrl", normalize="total", scale_genes=True, min_cells=0)
    whole = prepare(adata, settings, use_case=True)
    monkeypatch.setattr(importlib.import_module("deltanmf.core.matrix"), "PASS_STORED", 37)
    pieces = list(blocks_module.Blocks(adata, settings, np.arange(adata.n_obs)))
    assert len(pieces) > 1 and max(block.nnz for _, block in pieces) <= 37 + adata.n_vars
    np.testing.assert_array_equal(np.concatenate([where for where, _ in pieces]), np.arange(adata.n_obs))
    cut = prepare(adata, settings, use_case=True)
    np.testing.assert_allclose(cut.gene_scale, whole.gene_scale, rtol=1e-12)
    np.testing.assert_allclose(dense(cut.X), dense(whole.X), rtol=1e-6)


@pytest.mark.parametrize("normalize, scale_genes", [("none", True), ("total", False), ("total", True)])
def test_prepared_sparse_matrix_is_canonical_and_shared_not_copied(normalize, scale_genes):
    """The training code takes a canonical CSR matrix as it is and copies any other: the
    prepared matrix must be canonical, or each holder of it keeps a copy of its own. Each
    condition's cells are a view of it (controls come first), not a copy, and stay one in
    the holders (the 20 controls of 45 cells: scipy would copy a view of less than half its base)."""
    adata = make_adata(seed=4, sparse=True)
    p = prepare(adata, data("condition", "ctrl", normalize=normalize, scale_genes=scale_genes, min_cells=0),
                use_case=True)
    assert p.X.has_canonical_format
    for cells, mask in ((p.control, p.is_control), (p.case, ~p.is_control)):
        assert (cells != p.X[np.flatnonzero(mask)]).nnz == 0 and cells.has_canonical_format
        for holder in (cells, CellMatrix(cells).data, datamodule(cells).rows.data):
            assert np.shares_memory(holder.data, p.X.data)


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("target_sum", [None, 500.0])
def test_normalize_total(sparse, target_sum):
    adata = make_adata(seed=2, sparse=sparse)
    p = prepare(adata, data("condition", "ctrl", normalize="total", target_sum=target_sum, min_cells=0,
                            scale_genes=False), use_case=True)
    target = 1e4 if target_sum is None else target_sum
    x_in = dense(adata.X)[cells_in_use(adata)].astype(np.float64)
    totals = x_in.sum(axis=1)
    np.testing.assert_allclose(dense(p.X).sum(axis=1), target, rtol=1e-5)
    np.testing.assert_allclose(dense(p.X), x_in * (target / totals)[:, None], rtol=1e-5)
    np.testing.assert_allclose(p.cell_scale, target / totals, rtol=1e-6)
    np.testing.assert_array_equal(p.gene_scale, 1.0)


def test_normalize_total_uses_kept_genes():
    adata = make_adata(seed=2)
    p = prepare(adata, data("condition", "ctrl", normalize="total", remove_genes=["gene0", "gene1"], min_cells=0,
                            scale_genes=False), use_case=True)
    np.testing.assert_allclose(p.X.sum(axis=1), 1e4, rtol=1e-5)


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("use_case", [True, False])
def test_normalize_median(sparse, use_case):
    adata = make_adata(seed=4, sparse=sparse)
    rows = cells_in_use(adata, use_case=use_case)
    totals = dense(adata.X)[rows].astype(np.float64).sum(axis=1)
    assert (totals > 0).all()
    p = prepare(adata, data("condition", "ctrl", normalize="median", min_cells=0, scale_genes=False), use_case=use_case)
    np.testing.assert_allclose(dense(p.X).sum(axis=1), np.median(totals), rtol=1e-5)
    np.testing.assert_allclose(p.cell_scale, np.median(totals) / totals, rtol=1e-6)


@pytest.mark.parametrize("sparse", [False, True])
def test_cells_left_empty_are_an_error(sparse):
    adata = make_adata(seed=5)
    x = adata.X.copy()
    rows = cells_in_use(adata)
    x[rows[2]] = 0.0
    adata.X = sp.csr_matrix(x) if sparse else x
    with pytest.raises(InputError, match=r"1 cells have no expression left in the \d+ kept genes") as err:
        prepare(adata, data("condition", "ctrl", normalize="total", min_cells=0), use_case=True)
    assert repr(str(adata.obs_names[rows[2]])) in str(err.value) and "'input': 30" in str(err.value)


# --------------------------------------------------------------------------------------
# prepare: per-gene scaling
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", [None, "drug"])
def test_scale_genes_pooled_unit_std(case):
    adata = make_adata(seed=6)
    rows = cells_in_use(adata, case=case)
    x_in = adata.X[rows].astype(np.float64)
    sd = x_in.std(axis=0)  # ddof=0, controls and cases pooled
    assert (sd > 0).all()
    p = prepare(adata, data("condition", "ctrl", case=case, min_cells=0), use_case=True)
    np.testing.assert_allclose(p.gene_scale, sd, rtol=1e-6)
    np.testing.assert_allclose(p.X, x_in / sd, rtol=1e-5)
    np.testing.assert_allclose(p.X.astype(np.float64).std(axis=0), 1.0, rtol=1e-5)
    # ONE divisor for both groups: each group is its input divided by the pooled sd
    np.testing.assert_allclose(p.control, x_in[p.is_control] / sd, rtol=1e-5)
    np.testing.assert_allclose(p.case, x_in[~p.is_control] / sd, rtol=1e-5)
    # ... which is not the per-group sd (the published behaviour we deliberately differ from)
    assert not np.allclose(p.case.astype(np.float64).std(axis=0), 1.0, rtol=1e-2)


def test_scale_genes_after_normalize_total():
    adata = make_adata(seed=7)
    rows = cells_in_use(adata)
    x_in = adata.X[rows].astype(np.float64)
    xn = x_in * (1e4 / x_in.sum(axis=1))[:, None]
    sd = xn.std(axis=0)
    p = prepare(adata, data("condition", "ctrl", min_cells=0, normalize="total"), use_case=True)
    np.testing.assert_allclose(p.gene_scale, sd, rtol=1e-5)
    np.testing.assert_allclose(p.X, xn / sd, rtol=1e-5)


def test_scale_genes_use_case_false_uses_controls_only():
    adata = make_adata(seed=6)
    rows = cells_in_use(adata, use_case=False)
    x_in = adata.X[rows].astype(np.float64)
    p = prepare(adata, data("condition", "ctrl", min_cells=0), use_case=False)
    np.testing.assert_allclose(p.gene_scale, x_in.std(axis=0), rtol=1e-6)


@pytest.mark.parametrize("value", [2.0, 0.0])
@pytest.mark.parametrize("sparse", [False, True])
def test_zero_variance_gene_divided_by_one_integer_constant(sparse, value):
    adata = make_adata(seed=8)
    x = adata.X.copy()
    x[:, 3] = value
    adata.X = sp.csr_matrix(x) if sparse else x
    p = prepare(adata, data("condition", "ctrl", min_cells=0), use_case=True)
    assert p.gene_scale[3] == 1.0
    np.testing.assert_array_equal(dense(p.X)[:, 3], value)


@pytest.mark.parametrize("sparse", [
    False,
    True,
])
def test_zero_variance_gene_divided_by_one_noninteger_constant(sparse):
    # a constant non-integer value, e.g. a gene of an already-normalised layer
    adata = make_adata(seed=8)
    x = adata.X.copy()
    x[:, 3] = 0.1
    adata.X = sp.csr_matrix(x) if sparse else x
    p = prepare(adata, data("condition", "ctrl", case="drug", min_cells=0), use_case=True)  # 35 cells in use
    assert p.gene_scale[3] == 1.0
    np.testing.assert_allclose(dense(p.X)[:, 3], np.float32(0.1), rtol=1e-6)


def test_sparse_gene_scale_matches_dense_for_low_variance_gene():
    adata = make_adata(seed=9)
    rng = np.random.default_rng(0)
    x = adata.X.copy()
    x[:, 5] = 1000.0 + rng.normal(0.0, 0.1, size=x.shape[0])  # CV ~ 1e-4
    dense_p = prepare(ad.AnnData(X=x, obs=adata.obs), data("condition", "ctrl", min_cells=0), use_case=True)
    sparse_p = prepare(ad.AnnData(X=sp.csr_matrix(x), obs=adata.obs), data("condition", "ctrl", min_cells=0),
                       use_case=True)
    sd = x.astype(np.float64).std(axis=0)  # all 45 cells are in use
    sd = np.where(sd > 0, sd, 1.0)
    np.testing.assert_allclose(dense_p.gene_scale, sd, rtol=1e-5)
    np.testing.assert_allclose(sparse_p.gene_scale, sd, rtol=1e-2)


@pytest.mark.parametrize("sparse", [False, True])
def test_scale_genes_false_leaves_values(sparse):
    adata = make_adata(seed=10, sparse=sparse)
    adata.X = adata.X.astype(np.float64) * 1.5
    p = prepare(adata, data("condition", "ctrl", min_cells=0, scale_genes=False), use_case=True)
    assert p.X.dtype == np.float32
    np.testing.assert_array_equal(dense(p.X), dense(adata.X)[cells_in_use(adata)].astype(np.float32))
    np.testing.assert_array_equal(p.gene_scale, 1.0)
    np.testing.assert_array_equal(p.cell_scale, 1.0)


# --------------------------------------------------------------------------------------
# prepare: sparse input, layers, input untouched, PreparedData accessors
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(normalize="total"),
    dict(normalize="median", case="other"),
    dict(normalize="total", use_case=False, min_cells=8),
    dict(scale_genes=False, remove_genes=["gene1"]),
])
def test_sparse_equals_dense(kwargs):
    d = make_adata(seed=11)
    s = make_adata(seed=11, sparse=True)
    changes = dict(kwargs)
    use_case = changes.pop("use_case", True)
    pd_ = prepare(d, data("condition", "ctrl", **changes), use_case=use_case)
    ps = prepare(s, data("condition", "ctrl", **changes), use_case=use_case)
    assert isinstance(pd_.X, np.ndarray) and pd_.X.dtype == np.float32
    assert sp.isspmatrix_csr(ps.X) and ps.X.dtype == np.float32
    np.testing.assert_allclose(ps.X.toarray(), pd_.X, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ps.gene_scale, pd_.gene_scale, rtol=1e-5)
    np.testing.assert_allclose(ps.cell_scale, pd_.cell_scale, rtol=1e-6)
    assert ps.gene_counts == pd_.gene_counts
    assert list(ps.var.index) == list(pd_.var.index) and list(ps.obs.index) == list(pd_.obs.index)
    assert sp.isspmatrix_csr(ps.control) and sp.isspmatrix_csr(ps.case)


def test_sparse_input_other_formats_and_dtypes():
    d = make_adata(seed=12)
    ref = prepare(d, data("condition", "ctrl", min_cells=0), use_case=True)
    for x in (sp.csc_matrix(d.X), sp.csr_matrix(d.X.astype(np.int64)), sp.csr_array(d.X)):
        p = prepare(ad.AnnData(X=x, obs=d.obs, var=d.var), data("condition", "ctrl", min_cells=0), use_case=True)
        assert sp.isspmatrix_csr(p.X) and p.X.dtype == np.float32
        np.testing.assert_allclose(p.X.toarray(), ref.X, rtol=1e-5)


@pytest.mark.parametrize("sparse", [False, True])
def test_layer_is_used(sparse):
    adata = make_adata(seed=13, sparse=sparse)
    counts = dense(adata.X) * 2 + 1
    adata.layers["counts"] = sp.csr_matrix(counts) if sparse else counts
    p = prepare(adata, data("condition", "ctrl", layer="counts", **RAW), use_case=True)
    np.testing.assert_array_equal(dense(p.X), counts[cells_in_use(adata)])
    p_x = prepare(adata, data("condition", "ctrl", **RAW), use_case=True)
    np.testing.assert_array_equal(dense(p_x.X), dense(adata.X)[cells_in_use(adata)])


@pytest.mark.parametrize("sparse", [False, True])
def test_input_anndata_not_modified(sparse):
    adata = make_adata(seed=14, sparse=sparse)
    adata.layers["counts"] = adata.X.copy()
    x_before = dense(adata.X).copy()
    layer_before = dense(adata.layers["counts"]).copy()
    obs_before, var_before = adata.obs.copy(), adata.var.copy()
    dtype_before = adata.X.dtype
    for changes, use_case in ((dict(normalize="total"), True), (dict(normalize="median", layer="counts"), True),
                              (dict(min_cells=5), False)):
        p = prepare(adata, data("condition", "ctrl", **changes), use_case=use_case)
        # writing to the output must not reach the input
        if sparse:
            p.X.data[:] = -7
        else:
            p.X[:] = -7
    np.testing.assert_array_equal(dense(adata.X), x_before)
    np.testing.assert_array_equal(dense(adata.layers["counts"]), layer_before)
    assert adata.X.dtype == dtype_before
    pd.testing.assert_frame_equal(adata.obs, obs_before)
    pd.testing.assert_frame_equal(adata.var, var_before)
    assert adata.shape == (N_CTRL + N_DRUG + N_OTHER, N_GENES)


@pytest.mark.parametrize("sparse", [False, True])
def test_control_case_and_source(sparse):
    adata = make_adata(seed=15, sparse=sparse)
    adata.obs["score"] = np.arange(adata.n_obs, dtype=float)
    p = prepare(adata, data("condition", "ctrl", case="drug", min_cells=10, normalize="total"), use_case=True)
    out = dense(p.X)
    np.testing.assert_array_equal(dense(p.control), out[:N_CTRL])
    np.testing.assert_array_equal(dense(p.case), out[N_CTRL:])
    assert p.control.shape[0] == N_CTRL and p.case.shape[0] == N_DRUG
    rows = cells_in_use(adata, case="drug")
    cols = [adata.var_names.get_loc(g) for g in p.var.index]
    assert p.source.shape == p.X.shape
    assert list(p.source.obs_names) == list(p.obs.index) == list(adata.obs_names[rows])
    assert list(p.source.var_names) == list(p.var.index)
    np.testing.assert_array_equal(p.source.obs["score"].to_numpy(), rows.astype(float))
    np.testing.assert_array_equal(p.source.var["symbol"].to_numpy(), adata.var["symbol"].to_numpy()[cols])
    np.testing.assert_array_equal(dense(p.source.X), dense(adata.X)[rows][:, cols])
    assert (p.obs["condition"].to_numpy()[: N_CTRL] == "ctrl").all()
    assert (p.obs["condition"].to_numpy()[N_CTRL:] == "drug").all()


def test_simulation_truth_survives_prepare():
    sim = simulate_case_control(n_genes=80, n_programs=3, n_case_programs=1, n_control=30, n_case=30,
                                n_groups=1, n_shifted=1, markers_per_program=10, embedding_dim=4,
                                library_size=300.0, seed=2)
    remove = list(sim.var_names[:5])
    p = prepare(sim, data("condition", "control", min_cells=8, remove_genes=remove), use_case=True)
    genes = [sim.var_names.get_loc(g) for g in p.var.index]
    assert 10 < len(genes) < 75  # some genes filtered
    truth = simulation_truth(p.source)
    assert truth is not None
    np.testing.assert_allclose(truth.programs, sim.varm["sim_programs"][genes])
    np.testing.assert_allclose(truth.case_programs, sim.varm["sim_case_programs"][genes])
    np.testing.assert_allclose(truth.embedding, sim.varm["sim_embedding"][genes])
    rows = [sim.obs_names.get_loc(c) for c in p.obs.index]
    np.testing.assert_allclose(truth.usage, sim.obsm["sim_usage"][rows])
    np.testing.assert_array_equal(truth.shifted, sim.uns["simulation"]["shifted_programs"])
    assert truth.programs.shape == (p.n_genes, 3)


# --------------------------------------------------------------------------------------
# read_h5ad
# --------------------------------------------------------------------------------------
def test_read_h5ad_missing_file(tmp_path):
    path = tmp_path / "nope.h5ad"
    with pytest.raises(InputError) as err:
        read_h5ad(path)
    assert str(path) in str(err.value) and "not found" in str(err.value)


def test_read_h5ad_not_an_h5ad(tmp_path):
    path = tmp_path / "table.h5ad"
    path.write_text("gene,cell\n1,2\n")
    with pytest.raises(InputError) as err:
        read_h5ad(path)
    assert str(path) in str(err.value) and "cannot read" in str(err.value)


def test_read_h5ad_roundtrip(tmp_path):
    adata = make_adata(sparse=True)
    path = tmp_path / "data.h5ad"
    adata.write_h5ad(path)
    back = read_h5ad(str(path))
    np.testing.assert_array_equal(dense(back.X), dense(adata.X))
    assert list(back.obs["condition"]) == list(adata.obs["condition"])


# --------------------------------------------------------------------------------------
# demo_path
# --------------------------------------------------------------------------------------
DEMO = dict(n_genes=40, n_programs=2, n_case_programs=1, n_control=12, n_case=12, n_groups=1,
            n_shifted=1, markers_per_program=5, embedding_dim=3, seed=0)


def test_demo_path_cached(tmp_path, monkeypatch):
    calls = []
    real = demo_module.simulate_case_control

    def counting(**kw):
        calls.append(kw)
        return real(**kw)

    monkeypatch.setattr(demo_module, "simulate_case_control", counting)
    cache = tmp_path / "cache" / "nested"
    first = demo_path(DEMO, cache_dir=cache)
    assert first.exists() and first.parent == cache and first.suffix == ".h5ad"
    assert len(calls) == 1 and calls[0] == DEMO
    mtime = first.stat().st_mtime_ns
    second = demo_path(dict(reversed(list(DEMO.items()))), cache_dir=str(cache))  # key order irrelevant
    assert second == first
    assert len(calls) == 1
    assert first.stat().st_mtime_ns == mtime

    other = demo_path({**DEMO, "seed": 1}, cache_dir=cache)
    assert other != first and other.exists() and len(calls) == 2
    assert sorted(os.listdir(cache)) == sorted([first.name, other.name])  # no temporary files left

    adata = read_h5ad(first)
    ref = real(**DEMO)
    np.testing.assert_array_equal(dense(adata.X), dense(ref.X))
    assert simulation_truth(adata) is not None


def test_demo_path_env_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTANMF_CACHE_DIR", str(tmp_path / "envcache"))
    path = demo_path(DEMO)
    assert path.parent == tmp_path / "envcache" and path.exists()


def test_demo_path_failure_leaves_no_temporary(tmp_path, monkeypatch):
    class Broken:
        def write_h5ad(self, path):
            open(path, "w").write("partial")
            raise OSError("disk full")

    monkeypatch.setattr(demo_module, "simulate_case_control", lambda **kw: Broken())
    with pytest.raises(OSError):
        demo_path(DEMO, cache_dir=tmp_path)
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------
# CellDataModule
# --------------------------------------------------------------------------------------
def _matrix(n=50, g=12, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.poisson(2.0, size=(n, g)).astype(np.float32)
    return x


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("batch_size", [None, 50, 80])
def test_full_batch(sparse, batch_size):
    x = _matrix()
    dm = datamodule(sp.csr_matrix(x) if sparse else x, batch_size=batch_size, steps_per_epoch=4)
    assert dm.full_batch and dm.n_cells == 50
    batches = list(dm.train_dataloader())
    assert len(batches) == 4
    for block, index in batches:
        assert isinstance(block, torch.Tensor) and block.dtype == torch.float32
        assert block.layout == (torch.sparse_csr if sparse else torch.strided)  # sparse stays sparse
        np.testing.assert_array_equal(block.to_dense().numpy(), x)
        np.testing.assert_array_equal(index.numpy(), np.arange(50))


def test_full_batch_default_steps_per_epoch(tmp_path):
    # a stage's data module at the defaults: one epoch is one convergence window (model.stop.check_every)
    from deltanmf.train.trainer import make_datamodule

    dm = make_datamodule(_matrix(), plan(tmp_path), seed=0, transposed_copy=False)
    assert dm.full_batch
    assert len(dm.train_dataloader()) == 10
    assert len(list(dm.train_dataloader())) == 10


def test_full_batch_transfer_cached():
    dm = datamodule(_matrix(), steps_per_epoch=3)
    loader = dm.train_dataloader()
    cpu = torch.device("cpu")
    moved = [dm.transfer_batch_to_device(b, cpu, 0) for b in loader]
    assert all(m is moved[0] for m in moved)
    np.testing.assert_array_equal(moved[0][0].numpy(), _matrix())
    assert moved[0][0].device == cpu


def test_full_batch_transfer_redone_on_device_change():
    dm = datamodule(_matrix(), steps_per_epoch=2)
    batch = next(iter(dm.train_dataloader()))
    on_cpu = dm.transfer_batch_to_device(batch, torch.device("cpu"), 0)
    on_meta = dm.transfer_batch_to_device(batch, torch.device("meta"), 0)
    assert on_meta is not on_cpu and on_meta[0].device.type == "meta"
    assert on_meta[0].shape == (50, 12)
    assert dm.transfer_batch_to_device(batch, torch.device("meta"), 0) is on_meta


def test_minibatch_transfer_not_cached():
    dm = datamodule(_matrix(), batch_size=16)
    b = next(iter(dm.train_dataloader()))
    cpu = torch.device("cpu")
    m1 = dm.transfer_batch_to_device(b, cpu, 0)
    m2 = dm.transfer_batch_to_device(b, cpu, 0)
    torch.testing.assert_close(m1[0], b[0])
    assert dm._device_batch is None
    assert m1[1].tolist() == m2[1].tolist()


def _epoch(dm_or_loader):
    loader = dm_or_loader.train_dataloader() if isinstance(dm_or_loader, CellDataModule) else dm_or_loader
    return [(b.to_dense().numpy().copy(), i.numpy().copy()) for b, i in loader]


@pytest.mark.parametrize("sparse", [False, True])
def test_minibatch_covers_every_cell_once(sparse):
    x = _matrix(n=50)
    dm = datamodule(sp.csr_matrix(x) if sparse else x, batch_size=16, seed=3)
    assert not dm.full_batch
    loader = dm.train_dataloader()
    assert len(loader) == 4
    for _ in range(2):  # two epochs of the same loader
        batches = _epoch(loader)
        assert [len(i) for _, i in batches] == [16, 16, 16, 2]
        all_idx = np.concatenate([i for _, i in batches])
        np.testing.assert_array_equal(np.sort(all_idx), np.arange(50))
        for block, idx in batches:
            assert block.dtype == np.float32
            np.testing.assert_array_equal(block, x[idx])


class _Ranks:
    """The two attributes of a Lightning trainer the data module reads under DDP."""

    def __init__(self, rank: int, world_size: int):
        self.global_rank, self.world_size = rank, world_size


@pytest.mark.parametrize("n, batch_size, world_size", [(50, 16, 2), (101, 20, 2), (100, 20, 3), (61, 20, 3),
                                                       (30, 7, 3)])
@pytest.mark.parametrize("backed", [False, True])
def test_ddp_ranks_share_every_batch_and_train_each_cell_once(tmp_path, n, batch_size, world_size, backed):
    """Under DDP each process takes its part of every batch: per epoch, every cell is trained
    exactly once by exactly one process, all processes take the same number of steps, and no
    process gets an empty batch (a last batch smaller than the processes joins the one before)."""
    x = _matrix(n=n)
    source = sp.csr_matrix(x)
    if backed:
        path = tmp_path / "cells.h5ad"
        ad.AnnData(X=source, obs=pd.DataFrame({"c": ["a"] * n}, index=[f"c{i}" for i in range(n)])).write_h5ad(path)
        source = H5adRows(open_h5ad(path).matrix(), np.arange(n), np.arange(x.shape[1]), np.ones(n),
                          np.ones(x.shape[1]))
    epochs = []
    for rank in range(world_size):
        dm = datamodule(source, batch_size=batch_size, seed=4)
        dm.trainer = _Ranks(rank, world_size)
        loader = dm.train_dataloader()
        epochs.append([_epoch(loader), _epoch(loader)])
        assert all(len(e) == len(loader) for e in epochs[-1])
    for epoch in range(2):
        steps = [epochs[rank][epoch] for rank in range(world_size)]
        assert len({len(s) for s in steps}) == 1  # the same number of steps in every process
        cells = np.concatenate([idx for s in steps for _, idx in s])
        np.testing.assert_array_equal(np.sort(cells), np.arange(n))  # each cell once
        for step in zip(*steps):
            sizes = [len(idx) for _, idx in step]
            assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
            for block, idx in step:
                np.testing.assert_array_equal(block, x[idx])
    # the processes' batches follow the single-process batches
    one = datamodule(source, batch_size=batch_size, seed=4)
    first = _epoch(one.train_dataloader())[0][1]
    np.testing.assert_array_equal(np.sort(np.concatenate([epochs[r][0][0][1] for r in range(world_size)])),
                                  np.sort(first))


def test_ddp_batch_smaller_than_the_processes_is_refused():
    dm = datamodule(_matrix(n=50), batch_size=2, seed=0)
    dm.trainer = _Ranks(0, 4)
    with pytest.raises(InputError, match="data.batch_size=2 is smaller than the 4 processes"):
        dm.train_dataloader()


def test_minibatch_shuffled_and_reproducible():
    x = _matrix(n=50)
    a = _epoch(datamodule(x, batch_size=10, seed=7))
    b = _epoch(datamodule(x, batch_size=10, seed=7))
    c = _epoch(datamodule(x, batch_size=10, seed=8))
    groups = lambda e: [tuple(i) for _, i in e]  # noqa: E731
    assert groups(a) == groups(b)
    assert groups(a) != groups(c)
    # not the file order: the first batch is not cells 0..9
    assert groups(a)[0] != tuple(range(10))
    assert set(groups(a)) != {tuple(range(k, k + 10)) for k in range(0, 50, 10)}
    # two epochs of one loader differ from each other
    loader = datamodule(x, batch_size=10, seed=7).train_dataloader()
    assert groups(_epoch(loader)) != groups(_epoch(loader))


def test_minibatch_sparse_equals_dense():
    x = _matrix(n=40, seed=2)
    d = _epoch(datamodule(x, batch_size=7, seed=1))
    s = _epoch(datamodule(sp.csr_matrix(x), batch_size=7, seed=1))
    assert len(d) == len(s) == 6
    for (bd, idd), (bs, ids) in zip(d, s):
        np.testing.assert_array_equal(idd, ids)
        np.testing.assert_array_equal(bd, bs)


@pytest.mark.parametrize("bad", [0, -3])
def test_batch_size_below_one(bad):
    # checked by the data settings now, before any data module is built
    with pytest.raises(ValueError, match=r"data.batch_size"):
        data(batch_size=bad)


def test_datamodule_from_prepared_sparse():
    adata = make_adata(seed=16, sparse=True)
    p = prepare(adata, data("condition", "ctrl", normalize="total"), use_case=True)
    dm = datamodule(p.control, batch_size=None, steps_per_epoch=1)
    (block, idx), = list(dm.train_dataloader())
    assert block.layout == torch.sparse_csr
    np.testing.assert_allclose(block.to_dense().numpy(), p.control.toarray())
    assert dm.n_cells == N_CTRL


# --------------------------------------------------------------------------------------
# resources
# --------------------------------------------------------------------------------------
def _resource(tmp_path, n=12, seed=0, sparse=False, genes=None):
    rng = np.random.default_rng(seed)
    s = rng.uniform(0.0, 1.0, size=(n, n))
    s[rng.uniform(size=(n, n)) < 0.4] = 0.0
    s = ((s + s.T) / 2).astype(np.float32)
    np.fill_diagonal(s, 5.0)  # a non-zero diagonal the graph must zero
    names = genes or [f"G{i}" for i in range(n)]
    path, genes_path = write_similarity(tmp_path, names, s, sparse)
    return s, names, FileResource(str(path), str(genes_path), name="test")


SUBSET = ["G9", "G2", "G7", "G0", "G11", "G4"]


def _expected_sub(s, names):
    rows = [int(g[1:]) for g in names]
    sub = s[rows][:, rows].astype(np.float64)
    np.fill_diagonal(sub, 0.0)
    return sub


def test_dense_resource_subset_in_given_order(tmp_path):
    s, names, res = _resource(tmp_path)
    assert res.gene_list() == names
    graph = res.graph(SUBSET)
    sim = graph.similarity
    assert sim.layout == torch.strided and sim.dtype == torch.float32
    np.testing.assert_array_equal(sim.numpy(), _expected_sub(s, SUBSET).astype(np.float32))
    np.testing.assert_allclose(graph.degree.numpy(), _expected_sub(s, SUBSET).sum(axis=1), rtol=1e-6)
    # the file itself is untouched (memory-mapped read)
    np.testing.assert_array_equal(np.load(tmp_path / "S.npy"), s)


def test_sparse_resource_matches_dense(tmp_path):
    dense_dir, sparse_dir = tmp_path / "d", tmp_path / "s"
    dense_dir.mkdir()
    sparse_dir.mkdir()
    s, _, dres = _resource(dense_dir)
    _, _, sres = _resource(sparse_dir, sparse=True)
    gd, gs = dres.graph(SUBSET), sres.graph(SUBSET)
    assert gs.similarity.layout != torch.strided
    expected = _expected_sub(s, SUBSET)
    np.testing.assert_allclose(gs.similarity.to_dense().numpy(), expected, rtol=1e-6)
    w = torch.from_numpy(np.random.default_rng(1).uniform(size=(len(SUBSET), 3)).astype(np.float32))
    wd = w.numpy().astype(np.float64)
    lap = np.diag(expected.sum(axis=1)) - expected
    want = np.trace(wd.T @ lap @ wd)
    assert float(gs.trace(w)) == pytest.approx(float(gd.trace(w)), rel=1e-5)
    assert float(gd.trace(w)) == pytest.approx(want, rel=1e-5)


def test_resource_gene_missing(tmp_path):
    _, _, res = _resource(tmp_path)
    with pytest.raises(InputError) as err:
        res.graph(["G1", "NOPE", "G3", "ALSO_NOPE"])
    assert "2 genes are not in resource 'test'" in str(err.value) and "NOPE" in str(err.value)


@pytest.mark.parametrize("sparse", [False, True])
def test_resource_shape_mismatch(tmp_path, sparse):
    _, _, res = _resource(tmp_path, sparse=sparse)
    (tmp_path / "genes.json").write_text(json.dumps([f"G{i}" for i in range(13)]))
    with pytest.raises(InputError) as err:
        res.graph(["G1", "G2"])
    msg = str(err.value)
    assert "(12, 12)" in msg and "13 genes" in msg and "genes.json" in msg


@pytest.mark.parametrize("sparse", [False, True])
def test_resource_negative_values(tmp_path, sparse):
    rng = np.random.default_rng(0)
    s = rng.uniform(0.1, 1.0, size=(6, 6)).astype(np.float32)
    s[1, 3] = -0.5
    path, genes_path = write_similarity(tmp_path, [f"G{i}" for i in range(6)], s, sparse)
    res = FileResource(str(path), str(genes_path))
    with pytest.raises(InputError, match=r"non-negative"):
        res.graph(["G3", "G1", "G0"])
    s[1, 3] = np.nan
    np.save(tmp_path / "nan.npy", s)
    with pytest.raises(InputError, match=r"finite"):
        FileResource(str(tmp_path / "nan.npy"), str(tmp_path / "genes.json")).graph(["G3", "G1"])


def test_resource_missing_files(tmp_path):
    _, _, _ = _resource(tmp_path)
    missing = tmp_path / "absent.npy"
    with pytest.raises(InputError) as err:
        FileResource(str(missing), str(tmp_path / "genes.json"))
    assert str(missing) in str(err.value) and "not found" in str(err.value)
    absent_genes = tmp_path / "absent.json"
    with pytest.raises(InputError) as err:  # both files are checked when the resource is opened
        FileResource(str(tmp_path / "S.npy"), str(absent_genes))
    assert str(absent_genes) in str(err.value) and "not found" in str(err.value)


def test_read_gene_list_forms(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"genes": ["A", "B"]}))
    assert read_gene_list(tmp_path / "a.json") == ["A", "B"]
    (tmp_path / "b.json").write_text(json.dumps([1, 2]))
    with pytest.raises(InputError, match=r"list of gene IDs"):
        read_gene_list(tmp_path / "b.json")


def test_similarity_from_embeddings():
    rng = np.random.default_rng(0)
    e = rng.standard_normal((15, 6))
    e[3] = e[0] * 2 + 1  # perfectly correlated pair
    s = similarity_from_embeddings(e)
    expected = np.maximum(np.corrcoef(e), 0.0)
    np.fill_diagonal(expected, 0.0)
    assert s.dtype == np.float32 and s.shape == (15, 15)
    np.testing.assert_allclose(s, expected, atol=1e-6)
    assert s[0, 3] == pytest.approx(1.0, abs=1e-6)
    assert (s >= 0).all() and (np.diag(s) == 0).all()
    np.testing.assert_array_equal(s, s.T)


def test_similarity_from_embeddings_constant_row():
    e = np.random.default_rng(1).standard_normal((5, 4))
    e[2] = 3.0  # zero variance: correlation undefined, treated as 0
    s = similarity_from_embeddings(e)
    assert np.isfinite(s).all()
    np.testing.assert_array_equal(s[2], 0.0)
    np.testing.assert_array_equal(s[:, 2], 0.0)


# --------------------------------------------------------------------------------------
# prepare: input checks that name what is wrong and where
# --------------------------------------------------------------------------------------
def test_duplicate_cell_and_gene_names_are_rejected():
    adata = make_adata()
    cells = adata.copy()
    cells.obs_names = [cells.obs_names[0]] + list(cells.obs_names[1:-1]) + [cells.obs_names[0]]
    with pytest.raises(InputError, match=r"1 cell names occur more than once .*obs_names_make_unique"):
        prepare(cells, data("condition", "ctrl"), use_case=True)
    genes = adata.copy()
    genes.var_names = ["G0", "G0"] + list(genes.var_names[2:])
    with pytest.raises(InputError, match=r"1 gene names occur more than once \(e.g. \['G0'\]\)"):
        prepare(genes, data("condition", "ctrl"), use_case=True)
    with pytest.raises(InputError, match=r"gene ID names occur more than once.*data.gene_id_column"):
        prepare(adata, data("condition", "ctrl"), use_case=True, gene_ids=["X"] * adata.n_vars)


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("value, kind", [(np.nan, "NaN or infinite"), (-2.0, "negative")])
def test_bad_values_say_how_many_and_where(sparse, value, kind):
    adata = make_adata()
    x = np.asarray(dense(adata.X), dtype=np.float32)
    rows = cells_in_use(adata)
    x[rows[4], 7] = value
    x[rows[9], 2] = value
    adata.X = sp.csr_matrix(x) if sparse else x
    with pytest.raises(InputError) as err:
        prepare(adata, data("condition", "ctrl"), use_case=True)
    first = min((rows[4], 7), (rows[9], 2))
    assert f"2 {kind} values (the first in cell {str(adata.obs_names[first[0]])!r}, " \
           f"gene {str(adata.var_names[first[1]])!r})" in str(err.value)


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int64, np.uint16, np.int8])
@pytest.mark.parametrize("sparse", [False, True])
def test_other_dtypes_are_converted_quietly_and_noted_in_the_log(dtype, sparse, caplog):
    """float64, float16 and integer counts give the float32 matrix of the same values, with one
    line in the log (not a warning on the console: a refused command prints only its error)."""
    if sparse and dtype == np.float16:
        pytest.skip("scipy's sparse matrices cannot hold float16")
    adata = make_adata()
    reference = prepare(adata, data("condition", "ctrl", min_cells=0), use_case=True)
    values = np.asarray(dense(adata.X))
    adata.X = sp.csr_matrix(values.astype(dtype)) if sparse else values.astype(dtype)
    with warnings.catch_warnings(), caplog.at_level("INFO", logger="deltanmf.data.prepare"):
        warnings.simplefilter("error")
        p = prepare(adata, data("condition", "ctrl", min_cells=0), use_case=True)
    assert p.X.dtype == np.float32
    np.testing.assert_allclose(dense(p.X), dense(reference.X), rtol=1e-6)
    assert any("the model trains in float32" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("draw", [None, "runs"])
def test_an_epochs_batches_depend_on_the_seed_and_epoch_alone(draw):
    """What makes minibatch resume exact: epoch e's batches are the same whether or not the
    epochs before it were drawn, every epoch covers every cell once, and epochs differ."""
    from deltanmf.data.backed import run_batches
    from deltanmf.train.samplers import EpochBatches, ResumableBatches

    n, batch_size = 103, 10
    runs = (lambda size, rng: run_batches(n, size, rng)) if draw else None  # as for cells on disk
    sampler = EpochBatches(n, batch_size, seed=3, draw=runs)

    def epoch(e):
        sampler.set_epoch(e)
        return [np.asarray(b) for b in sampler]

    in_order = [epoch(e) for e in range(4)]
    assert all(len(batches) == len(sampler) == 11 for batches in in_order)
    for batches in in_order:
        np.testing.assert_array_equal(np.sort(np.concatenate(batches)), np.arange(n))
    assert not np.array_equal(np.concatenate(in_order[2]), np.concatenate(in_order[3]))
    for e in (3, 1):  # drawn alone, out of order: the same batches
        assert all(np.array_equal(a, b) for a, b in zip(epoch(e), in_order[e]))
    # resuming epoch 2 after 4 of its batches: the other 7, in order
    rest = list(ResumableBatches(sampler, position=lambda: (2, 4)))
    assert len(rest) == 7 and all(np.array_equal(a, b) for a, b in zip(rest, in_order[2][4:]))
    # without a trainer, each pass is the next epoch
    passes = ResumableBatches(sampler)
    for e in range(2):
        assert all(np.array_equal(a, b) for a, b in zip(passes, in_order[e]))
