"""Tests for the case-control simulator in ``deltanmf.data.simulate``."""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from deltanmf.data.simulate import (
    SimulationTruth,
    simulate_case_control,
    simulation_truth,
)

SMALL = dict(
    n_genes=300,
    n_programs=6,
    n_case_programs=3,
    n_control=200,
    n_case=210,
    n_groups=3,
    n_shifted=3,
    markers_per_program=20,
    embedding_dim=16,
)


@pytest.fixture(scope="module")
def adata() -> anndata.AnnData:
    return simulate_case_control(**SMALL, seed=1)


@pytest.fixture(scope="module")
def truth(adata) -> SimulationTruth:
    result = simulation_truth(adata)
    assert result is not None
    return result


def _marker_owner(programs: np.ndarray) -> np.ndarray:
    """Index of the program a gene is a marker of, -1 for background-only genes.

    Every program shares the same background, so a gene's loading exceeds its
    minimum over programs only in the program it is a marker of.
    """
    excess = programs - programs.min(axis=1, keepdims=True)
    owner = excess.argmax(axis=1)
    owner[excess.max(axis=1) <= 1e-12] = -1
    return owner


def _mean_offdiag_cosine(mat: np.ndarray) -> float:
    unit = mat / np.linalg.norm(mat, axis=0, keepdims=True)
    cos = unit.T @ unit
    k = cos.shape[0]
    return float((cos.sum() - np.trace(cos)) / (k * k - k))


def test_shapes_dtypes_and_annotations(adata, truth):
    n_cells = SMALL["n_control"] + SMALL["n_case"]
    k, kc = SMALL["n_programs"], SMALL["n_case_programs"]
    assert adata.shape == (n_cells, SMALL["n_genes"])
    assert sp.issparse(adata.X) and adata.X.format == "csr"
    assert adata.X.dtype == np.float32
    x = adata.X.toarray()
    assert np.all(x >= 0) and np.array_equal(x, np.round(x))

    assert adata.obs_names[0] == "cell_0" and adata.obs_names[-1] == f"cell_{n_cells - 1}"
    assert adata.var_names[0] == "ENSG00000000001"
    assert all(len(g) == 15 and g.startswith("ENSG") for g in adata.var_names)
    assert adata.var_names.is_unique
    assert adata.var["gene_symbol"].iloc[0] == "GENE1"

    cond = adata.obs["condition"]
    assert isinstance(cond.dtype, pd.CategoricalDtype)
    assert (cond == "control").sum() == SMALL["n_control"]
    assert (cond == "case").sum() == SMALL["n_case"]
    pert = adata.obs["perturbation"]
    assert isinstance(pert.dtype, pd.CategoricalDtype)
    assert set(pert[cond == "control"]) == {"NTC"}
    case_groups = pert[cond == "case"].astype(str)
    assert set(case_groups) == {"TARGET1", "TARGET2", "TARGET3"}
    # Groups are as even as possible.
    sizes = case_groups.value_counts()
    assert sizes.max() - sizes.min() <= 1

    assert adata.varm["sim_programs"].shape == (SMALL["n_genes"], k)
    assert adata.varm["sim_programs"].dtype == np.float64
    assert adata.varm["sim_case_programs"].shape == (SMALL["n_genes"], kc)
    assert adata.varm["sim_embedding"].shape == (SMALL["n_genes"], SMALL["embedding_dim"])
    assert adata.varm["sim_embedding"].dtype == np.float32
    assert adata.obsm["sim_usage"].shape == (n_cells, k + kc)

    info = adata.uns["simulation"]
    assert list(info["program_names"]) == [f"baseline_{i + 1}" for i in range(k)]
    assert list(info["case_program_names"]) == [f"case_{i + 1}" for i in range(kc)]
    assert list(info["case_program_groups"]) == ["TARGET1", "TARGET2", "TARGET3"]
    assert info["params"]["n_genes"] == SMALL["n_genes"]
    np.testing.assert_allclose(info["params"]["case_share"], [0.3, 0.7])
    assert truth.shifted.shape == (k,)
    assert sorted(truth.shifted[truth.shifted != 0].tolist()) == [-1, -1, 1]


def test_library_size_median_and_counts(adata):
    lib = adata.obs["library_size"].to_numpy()
    assert 0.8 * 3000 < np.median(lib) < 1.2 * 3000
    totals = np.asarray(adata.X.sum(axis=1)).ravel()
    # Poisson totals track the drawn library size.
    assert np.corrcoef(totals, lib)[0, 1] > 0.9
    np.testing.assert_allclose(totals.mean(), lib.mean(), rtol=0.05)


def test_usage_on_simplex(truth):
    assert np.all(truth.usage >= 0)
    np.testing.assert_allclose(truth.usage.sum(axis=1), 1.0, atol=1e-10)


def test_programs_normalised_and_correlated(truth):
    allp = np.hstack([truth.programs, truth.case_programs])
    assert np.all(allp >= 0)
    np.testing.assert_allclose(allp.sum(axis=0), 1.0, atol=1e-10)

    # The specific parts have disjoint support, hence zero cosine; the shared
    # background must lift the programs' cosine clearly above that.
    specific = allp - allp.min(axis=1, keepdims=True)
    assert _mean_offdiag_cosine(specific) < 1e-12
    assert _mean_offdiag_cosine(truth.programs) > 0.3


def test_marker_sets_disjoint_and_sized(truth):
    allp = np.hstack([truth.programs, truth.case_programs])
    owner = _marker_owner(allp)
    counts = np.bincount(owner[owner >= 0], minlength=allp.shape[1])
    assert np.all(counts == SMALL["markers_per_program"])
    # A marker of one program is at background level in all others.
    excess = allp - allp.min(axis=1, keepdims=True)
    assert np.all((excess > 1e-12).sum(axis=1) <= 1)


def test_same_seed_identical_different_seed_differs(adata):
    again = simulate_case_control(**SMALL, seed=1)
    other = simulate_case_control(**SMALL, seed=2)
    assert (adata.X != again.X).nnz == 0
    np.testing.assert_array_equal(adata.obsm["sim_usage"], again.obsm["sim_usage"])
    np.testing.assert_array_equal(adata.varm["sim_embedding"], again.varm["sim_embedding"])
    assert list(adata.obs["perturbation"]) == list(again.obs["perturbation"])
    assert (adata.X != other.X).nnz > 0
    assert not np.allclose(adata.varm["sim_programs"], other.varm["sim_programs"])


def test_shifted_programs_change_usage(adata, truth):
    is_case = (adata.obs["condition"] == "case").to_numpy()
    k = SMALL["n_programs"]
    base = truth.usage[:, :k]
    for prog in np.flatnonzero(truth.shifted == 1):
        assert base[is_case, prog].mean() > base[~is_case, prog].mean()
    for prog in np.flatnonzero(truth.shifted == -1):
        assert base[is_case, prog].mean() < base[~is_case, prog].mean()


def test_shifts_are_large_and_leave_unshifted_programs_alone():
    # One down and one up program: the up program takes what the down one gives away,
    # so the shares of the unshifted programs do not move (shares are compositional).
    ad = simulate_case_control(**{**SMALL, "n_shifted": 2, "n_control": 4000, "n_case": 4000}, shift_factor=5.0, seed=3)
    tr = simulation_truth(ad)
    k = SMALL["n_programs"]
    share = tr.usage[:, :k] / tr.usage[:, :k].sum(axis=1, keepdims=True)
    is_case = (ad.obs["condition"] == "case").to_numpy()
    ratio = share[is_case].mean(axis=0) / share[~is_case].mean(axis=0)
    assert ratio[tr.shifted == -1][0] < 0.35
    assert ratio[tr.shifted == 1][0] > 1.5
    np.testing.assert_allclose(ratio[tr.shifted == 0], 1.0, atol=0.2)


def test_case_programs_only_in_their_group(adata, truth):
    k = SMALL["n_programs"]
    is_control = (adata.obs["condition"] == "control").to_numpy()
    pert = adata.obs["perturbation"].astype(str).to_numpy()
    lo, hi = adata.uns["simulation"]["params"]["case_share"]
    for c, group in enumerate(truth.case_program_groups):
        use = truth.usage[:, k + c]
        assert np.all(use[is_control] == 0)
        in_group = pert == group
        assert np.all(use[~in_group] == 0)
        users = use[in_group] > 0
        n_group = in_group.sum()
        assert users.sum() == round(0.4 * n_group)
        assert np.all((use[in_group][users] >= lo) & (use[in_group][users] <= hi))


def test_embeddings_cluster_by_program(truth):
    allp = np.hstack([truth.programs, truth.case_programs])
    owner = _marker_owner(allp)
    marker = owner >= 0
    emb = truth.embedding[marker].astype(np.float64)
    own = owner[marker]
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    cos = unit @ unit.T
    same = own[:, None] == own[None, :]
    np.fill_diagonal(same, False)
    diff = own[:, None] != own[None, :]
    assert cos[same].mean() > cos[diff].mean() + 0.05


def test_embeddings_without_noise_are_program_directions():
    ad = simulate_case_control(**SMALL, embedding_noise=0.0, seed=4)
    tr = simulation_truth(ad)
    allp = np.hstack([tr.programs, tr.case_programs])
    owner = _marker_owner(allp)
    emb = tr.embedding.astype(np.float64)
    # Background-only genes carry no signal at all.
    assert np.allclose(emb[owner < 0], 0.0)
    marker = emb[owner == 0]
    unit = marker / np.linalg.norm(marker, axis=1, keepdims=True)
    np.testing.assert_allclose(unit @ unit[0], 1.0, atol=1e-5)
    # Marker loadings are scaled so their mean norm is ~1.
    assert 0.8 < np.linalg.norm(marker, axis=1).mean() < 1.2


def test_truth_survives_gene_and_cell_subsetting(adata, truth):
    genes = adata.var_names[::3]
    sub = adata[:, genes]
    sub_truth = simulation_truth(sub)
    gene_idx = np.arange(adata.n_vars)[::3]
    np.testing.assert_array_equal(sub_truth.programs, truth.programs[gene_idx])
    np.testing.assert_array_equal(sub_truth.case_programs, truth.case_programs[gene_idx])
    np.testing.assert_array_equal(sub_truth.embedding, truth.embedding[gene_idx])
    np.testing.assert_array_equal(sub_truth.usage, truth.usage)
    np.testing.assert_array_equal(sub_truth.shifted, truth.shifted)

    cells = np.arange(0, adata.n_obs, 2)
    sub_cells = adata[cells].copy()
    np.testing.assert_array_equal(simulation_truth(sub_cells).usage, truth.usage[cells])


def test_truth_survives_h5ad_round_trip(adata, truth, tmp_path):
    path = tmp_path / "sim.h5ad"
    adata.write_h5ad(path)
    back = anndata.read_h5ad(path)
    rt = simulation_truth(back)
    np.testing.assert_array_equal(rt.programs, truth.programs)
    np.testing.assert_array_equal(rt.case_programs, truth.case_programs)
    np.testing.assert_array_equal(rt.usage, truth.usage)
    np.testing.assert_array_equal(rt.embedding, truth.embedding)
    np.testing.assert_array_equal(rt.shifted, truth.shifted)
    assert list(rt.case_program_groups) == list(truth.case_program_groups)
    assert (back.X != adata.X).nnz == 0
    assert list(back.obs["perturbation"]) == list(adata.obs["perturbation"])


def test_round_trip_without_case_programs(tmp_path):
    ad = simulate_case_control(
        **{**SMALL, "n_case_programs": 0, "n_shifted": 0, "n_control": 30, "n_case": 30}
    )
    path = tmp_path / "nocase.h5ad"
    ad.write_h5ad(path)
    rt = simulation_truth(anndata.read_h5ad(path))
    assert rt.case_programs.shape == (SMALL["n_genes"], 0)
    assert rt.case_program_groups.shape == (0,)
    assert np.all(rt.shifted == 0)
    np.testing.assert_allclose(rt.usage.sum(axis=1), 1.0)


def test_truth_absent_or_incomplete():
    plain = anndata.AnnData(X=np.ones((3, 4), dtype=np.float32))
    assert simulation_truth(plain) is None
    ad = simulate_case_control(**{**SMALL, "n_control": 20, "n_case": 20})
    del ad.obsm["sim_usage"]
    with pytest.raises(KeyError, match="sim_usage"):
        simulation_truth(ad)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n_genes": 0}, "n_genes"),
        ({"n_programs": 0}, "n_programs"),
        ({"n_case_programs": -1}, "n_case_programs"),
        ({"n_control": 0}, "n_control"),
        ({"n_case": 0}, "n_case"),
        ({"n_groups": 0}, "n_groups"),
        ({"n_shifted": 7}, "n_shifted"),
        ({"shift_factor": 0.5}, "shift_factor"),
        ({"case_fraction": 0.0}, "case_fraction"),
        ({"case_fraction": 1.5}, "case_fraction"),
        ({"case_share": (0.7, 0.3)}, "case_share"),
        ({"case_share": (0.0, 0.5)}, "case_share"),
        ({"case_share": 0.5}, "case_share"),
        ({"usage_concentration": 0.0}, "usage_concentration"),
        ({"background_weight": 1.0}, "background_weight"),
        ({"background_weight": -0.1}, "background_weight"),
        ({"markers_per_program": 0}, "markers_per_program"),
        ({"library_size": -1.0}, "library_size"),
        ({"library_sigma": -0.1}, "library_sigma"),
        ({"embedding_dim": 0}, "embedding_dim"),
        ({"embedding_noise": -1.0}, "embedding_noise"),
        ({"n_programs": 2.5}, "n_programs"),
        ({"library_size": float("nan")}, "library_size"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        simulate_case_control(**{**SMALL, **kwargs})


def test_too_few_genes_for_markers_raises():
    # 9 programs x 40 markers = 360 > 300 genes.
    with pytest.raises(ValueError, match="n_genes.*markers_per_program"):
        simulate_case_control(**{**SMALL, "markers_per_program": 40})


def test_chunked_counts_match_single_block(monkeypatch, adata):
    # Chunking bounds memory for large cell numbers; it must not change the data.
    import deltanmf.data.generative as generative
    import deltanmf.data.simulate as simulate

    monkeypatch.setattr(generative, "_CHUNK_ELEMENTS", SMALL["n_genes"] * 7)
    chunked = simulate.simulate_case_control(**SMALL, seed=1)
    assert chunked.X.format == "csr" and chunked.X.dtype == np.float32
    assert (chunked.X != adata.X).nnz == 0


# --------------------------------------------------------------------------------------
# samples (donors) with a donor random effect
# --------------------------------------------------------------------------------------
def _digest(ad) -> str:
    import hashlib

    h = hashlib.sha256()
    for arr in (ad.X.data, ad.X.indices, ad.X.indptr, ad.obsm["sim_usage"], ad.varm["sim_programs"],
                ad.obs["library_size"].to_numpy()):
        h.update(np.ascontiguousarray(arr).tobytes())
    h.update(",".join(ad.obs["perturbation"].astype(str)).encode())
    return h.hexdigest()


def test_without_samples_the_data_are_those_of_the_simulator_before_samples(adata):
    # digest of simulate_case_control(**SMALL, seed=1) taken on main (71b59d5), before samples
    # existed, with numpy < 2.4; numpy 2.4 draws another stream from one of the samplers, and the
    # digest under it was taken on 677843e (its sample-free path, the code this test guards)
    import numpy

    major, minor = (int(v) for v in numpy.__version__.split(".")[:2])
    if (major, minor) >= (2, 4):
        expected = "c4a6c6da8d51b8b4fdb1b8c3a22b9165c612880c99fb08d4faccabded99a56d6"
    else:
        expected = "6667f7bb8c4893a3b6a565f92c6a7e7bf8775cc9731b589ec0ec5d82365e56b4"
    assert _digest(adata) == expected
    assert "sample" not in adata.obs and "sample_effects" not in adata.uns["simulation"]


def test_samples_are_nested_in_conditions_and_carry_a_donor_effect():
    sim = simulate_case_control(**{**SMALL, "n_control": 600, "n_case": 600, "n_shifted": 0}, n_control_samples=6,
                                n_case_samples=4, sample_sigma=1.0, seed=5)
    obs = sim.obs
    counts = pd.crosstab(obs["sample"], obs["condition"])
    assert (counts.loc[[f"control_{i}" for i in range(1, 7)], "case"] == 0).all()
    assert (counts.loc[[f"case_{i}" for i in range(1, 5)], "control"] == 0).all()
    assert set(counts.loc[[f"control_{i}" for i in range(1, 7)], "control"]) == {100}
    assert set(counts.loc[[f"case_{i}" for i in range(1, 5)], "case"]) == {150}
    effects = sim.uns["simulation"]["sample_effects"]
    assert effects.shape == (10, SMALL["n_programs"])
    # each sample's mean usage share follows its own effect: within-sample means track exp(effect)
    k = SMALL["n_programs"]
    usage = simulation_truth(sim).usage[:, :k]
    share = usage / usage.sum(axis=1, keepdims=True)
    means = pd.DataFrame(share).groupby(obs["sample"].to_numpy()).mean()
    for i, name in enumerate([f"control_{j}" for j in range(1, 7)]):
        expected = np.exp(effects[i]) / np.exp(effects[i]).sum()
        assert np.corrcoef(np.log(means.loc[name]), np.log(expected))[0, 1] > 0.8, name
    again = simulate_case_control(**{**SMALL, "n_control": 600, "n_case": 600, "n_shifted": 0},
                                  n_control_samples=6, n_case_samples=4, sample_sigma=1.0, seed=5)
    assert (again.X != sim.X).nnz == 0


@pytest.mark.parametrize("kwargs, match", [
    ({"n_control_samples": 3}, "both be 0"),
    ({"n_control_samples": 0, "n_case_samples": 2}, "both be 0"),
    ({"n_control_samples": 201, "n_case_samples": 2}, "must not exceed"),
    ({"n_control_samples": -1, "n_case_samples": 2}, "n_control_samples"),
    ({"n_control_samples": 2, "n_case_samples": 2, "sample_sigma": -0.1}, "sample_sigma"),
])
def test_bad_sample_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        simulate_case_control(**SMALL, **kwargs)
