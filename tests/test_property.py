"""Property-based tests of input validation: any small dataset (dtypes, shapes, labels, extreme
values) either fits or is refused with an InputError (one line on the command line), never
another crash, and nothing non-finite comes out; unlabelled cells never become cases."""
from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import deltanmf
from deltanmf.data import prepare
from deltanmf.errors import InputError
from helpers import data

pytestmark = pytest.mark.filterwarnings("ignore")

TINY = ["model.consensus.replicates=1", "model.consensus.iterations=10", "model.consensus.nnls_iterations=10",
        "trainer.max_steps=15", "trainer.enable_progress_bar=false", "trainer.accelerator=cpu", "logger=none",
        "data.min_cells=1"]


EXTREMES = [np.nan, np.inf, -np.inf, -1.0, 1e-42, 1e30, 1e39, 3.0e38]


@st.composite
def datasets(draw):
    """A small AnnData with zeros, and sometimes NaN, inf, negatives, subnormal or huge values
    (some beyond float32), duplicate names, float16/float64/integer storage, sparse storage,
    labels that are missing (NaN, empty) or differ from ``control`` only by spaces or capitals,
    or no cases at all."""
    n_cells = draw(st.integers(3, 12))
    n_genes = draw(st.integers(1, 8))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.poisson(draw(st.floats(0.0, 5.0)), size=(n_cells, n_genes)).astype(np.float64)
    corrupt = draw(st.integers(0, 3)) == 3  # a quarter of the matrices carry odd values
    for bad in draw(st.lists(st.sampled_from(EXTREMES), min_size=1, max_size=2)) if corrupt else []:
        if draw(st.booleans()):  # a whole gene of it
            x[:, rng.integers(n_genes)] = bad
        else:
            x[rng.integers(n_cells), rng.integers(n_genes)] = bad
    dtype = draw(st.sampled_from([np.float32, np.float64, np.float16, np.int64, np.uint16, np.int8]))
    with np.errstate(all="ignore"):
        if np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            x = np.clip(np.where(np.isfinite(x), x, 0), info.min, info.max).astype(dtype)
        else:
            x = x.astype(dtype)
    if dtype is not np.float16 and draw(st.booleans()):
        x = sp.csr_matrix(x)
    labels = ["control", "case", "case ", "Control", "", None, np.nan]
    weights = draw(st.sampled_from(["clean", "messy"]))
    pool = labels[:2] if weights == "clean" else labels
    conditions = draw(st.lists(st.sampled_from(pool), min_size=n_cells, max_size=n_cells))
    cells = [f"c{i}" for i in range(n_cells)]
    genes = [f"g{j}" for j in range(n_genes)]
    conditions[0] = "control"
    if draw(st.integers(0, 4)) == 4 and n_cells > 1:
        cells[1] = cells[0]
    if draw(st.integers(0, 4)) == 4 and n_genes > 1:
        genes[1] = genes[0]
    with np.errstate(all="ignore"):
        adata = ad.AnnData(x, obs=pd.DataFrame({"condition": pd.array(conditions, dtype=object)}, index=cells),
                           var=pd.DataFrame(index=genes))
    return adata


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(adata=datasets(), normalize=st.sampled_from(["none", "total", "median"]), scale=st.booleans())
def test_prepare_returns_finite_data_or_raises_value_error(adata, normalize, scale):
    before = adata.X.copy()
    try:
        prepared = prepare(adata, data("condition", "control", min_cells=1, normalize=normalize, scale_genes=scale),
                           use_case=True)
    except InputError as err:
        assert str(err) and "\n" not in str(err)  # one line that names the problem
        event(f"refused: {str(err)[:30]}")
    else:
        event("prepared")
        x = prepared.X.data if sp.issparse(prepared.X) else prepared.X
        assert np.isfinite(x).all() and (x >= 0).all() and x.dtype == np.float32
        assert np.isfinite(prepared.gene_scale).all() and (prepared.gene_scale > 0).all()
        assert prepared.X.shape == (len(prepared.obs), len(prepared.var))
        labels = prepared.obs["condition"].astype(object)
        assert labels.notna().all() and (labels.astype(str).str.strip() != "").all()  # never an unlabelled cell
        assert set(labels[prepared.is_control]) == {"control"}
        # every other labelled cell is a case (data.case=null), but never a misspelt control
        assert not {str(v).strip().casefold() for v in labels[~prepared.is_control]} & {"control"}
    after = adata.X
    if sp.issparse(before):  # the input is never modified
        assert np.array_equal(before.indices, after.indices) and np.array_equal(before.indptr, after.indptr)
        before, after = before.data, after.data
    assert np.array_equal(before, after, equal_nan=True)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(adata=datasets(), k=st.integers(1, 2))
def test_fit_returns_finite_programs_or_raises_value_error(adata, k):
    try:
        result = deltanmf.fit_onestage(adata, K=k, overrides=TINY)
    except InputError as err:
        assert str(err)
        event(f"refused: {str(err)[:45]}")
    else:
        event("fitted")
        assert np.isfinite(result.programs.to_numpy()).all()
        assert (result.programs.to_numpy() >= 0).all()
        usage = adata.obsm["X_deltanmf"]
        control = (adata.obs["condition"] == "control").to_numpy()
        assert np.isfinite(usage[control]).all()
