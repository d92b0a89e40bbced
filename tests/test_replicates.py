"""Replicate fits: their consensus and stability (deltanmf.core.replicates), and model.replicates /
model.null_fit in a run."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import silhouette_score

from helpers import DEFAULTS, model, run

from deltanmf.core.losses import fit_error
from deltanmf.core.metrics import matched_cosine
from deltanmf.core.replicates import _fill_empty_clusters, replicate_consensus
from deltanmf.errors import InputError
from deltanmf.tl.fit import replicate_seeds

RESTARTS = DEFAULTS.model.consensus.kmeans_restarts  # k-means restarts, as a run uses them


def _planted(n_genes=200, k=5, seed=0) -> np.ndarray:
    """K programs with disjoint marker blocks over a shared background, columns summing to 1."""
    rng = np.random.default_rng(seed)
    w = rng.uniform(0, 0.05, size=(n_genes, k))
    block = n_genes // k
    for j in range(k):
        w[j * block:(j + 1) * block, j] += rng.uniform(0.5, 1.5, size=block)
    return w / w.sum(0)


def _replicates(truth: np.ndarray, r: int, noise: float, seed: int = 0) -> list[np.ndarray]:
    """R noisy copies of the planted programs, each in its own column order and scale."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(r):
        w = truth * rng.lognormal(0, noise, size=truth.shape)
        w = w[:, rng.permutation(truth.shape[1])] * rng.uniform(0.5, 5, size=truth.shape[1])
        out.append(w)
    return out


def test_consensus_recovers_planted_programs_from_shuffled_noisy_replicates():
    truth = _planted()
    reps = _replicates(truth, r=6, noise=0.3)
    found = replicate_consensus(reps, seed=0, restarts=RESTARTS)
    programs = found.programs.numpy()
    assert programs.shape == truth.shape
    np.testing.assert_allclose(programs.sum(0), 1, rtol=1e-5)
    assert (programs >= 0).all()
    # the median of 6 noisy copies is closer to the truth than any single copy
    assert matched_cosine(programs, truth).min() > 0.98
    assert matched_cosine(programs, truth).min() > max(matched_cosine(w, truth).min() for w in reps)
    # each cluster holds exactly one program of every replicate
    labels = found.labels.numpy().reshape(6, 5)
    assert all(sorted(row) == list(range(5)) for row in labels)
    assert found.stability > 0.6
    assert len(found.replicate_cosine) == 6 and min(found.replicate_cosine) > 0.95


def test_consensus_is_ordered_like_the_first_replicate():
    truth = _planted()
    reps = _replicates(truth, r=4, noise=0.2, seed=3)
    programs = replicate_consensus(reps, seed=0, restarts=RESTARTS).programs.numpy()
    first = reps[0] / np.linalg.norm(reps[0], axis=0)
    cos = first.T @ (programs / np.linalg.norm(programs, axis=0))
    assert (np.argmax(cos, axis=1) == np.arange(5)).all()


def test_stability_is_the_silhouette_of_the_pooled_programs():
    reps = _replicates(_planted(), r=4, noise=0.6, seed=1)
    found = replicate_consensus(reps, seed=0, restarts=RESTARTS)
    pool = np.concatenate([w.T for w in reps])
    pool = pool / np.linalg.norm(pool, axis=1, keepdims=True)
    assert found.stability == pytest.approx(silhouette_score(pool, found.labels.numpy()), abs=1e-6)


def test_unstable_replicates_score_low():
    """Replicates that agree (same planted programs) against replicates that do not (fresh random
    programs each time): the stability must tell them apart."""
    truth = _planted()
    close = replicate_consensus(_replicates(truth, r=5, noise=0.1), seed=0, restarts=RESTARTS).stability
    noisy = replicate_consensus(_replicates(truth, r=5, noise=0.6), seed=0, restarts=RESTARTS).stability
    rng = np.random.default_rng(0)
    disagree = replicate_consensus([rng.uniform(size=truth.shape) for _ in range(5)], seed=0,
                                   restarts=RESTARTS).stability
    assert close > 0.85 > noisy > 0.3 > 0.1 > disagree


def test_one_program_and_bad_input():
    truth = _planted(k=1)
    found = replicate_consensus(_replicates(truth, r=3, noise=0.1), seed=0, restarts=RESTARTS)
    assert np.isnan(found.stability) and found.programs.shape == (200, 1)
    assert (found.labels == 0).all()
    with pytest.raises(ValueError, match="differ in shape"):
        replicate_consensus([np.ones((10, 2)), np.ones((10, 3))], seed=0, restarts=RESTARTS)
    with pytest.raises(ValueError, match="at least one"):
        replicate_consensus([], seed=0, restarts=RESTARTS)


def test_empty_clusters_are_filled():
    points = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.2, 5.0], [9.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1, 1])  # cluster 2 empty
    fixed = _fill_empty_clusters(points, labels, 3)
    assert set(fixed.tolist()) == {0, 1, 2}
    assert int(fixed[4]) == 2  # the point farthest from its cluster's centre moves


def test_replicate_seeds_give_each_replicate_its_own_initialisation_runs():
    assert replicate_seeds(7, model(replicates=3, consensus={"replicates": 3})) == [7, 10, 13]
    # the model settings replicate_seeds reads refuse no replicates at all
    with pytest.raises(InputError, match=r"model\.replicates=0"):
        model(replicates=0)


# a lighter fit than conftest's SMALL: these runs fit up to six stages
LIGHT = ["model.consensus.replicates=2", "model.consensus.iterations=60", "trainer.max_steps=250", "logger=none"]


def test_null_gain_is_far_below_the_gain_of_planted_case_programs(make_cfg):
    cfg, run_dir = make_cfg("model.null_fit=true", *LIGHT)
    s2 = run(cfg, run_dir).metrics["stage2"]
    assert s2["null_n_cells"] + s2["null_baseline_n_cells"] == 250
    assert 0 < s2["null_explained_variance_gain"] < 0.2 * s2["explained_variance_gain"]
    assert s2["null_relative_error"] < s2["null_baseline_only_relative_error"]
    for name in ("stage1", "stage2", "stage1_null", "stage2_null"):
        assert (run_dir / "checkpoints" / f"{name}.ckpt").is_file(), name
    saved = json.loads((run_dir / "results" / "metrics.json").read_text())
    assert saved["stage2"]["null_explained_variance_gain"] == s2["null_explained_variance_gain"]


def test_null_matches_the_gain_when_cases_are_controls(make_cfg):
    """No planted effect (the "cases" are more controls): case programs explain about what they
    explain in held-out controls, so the gain is not above the null."""
    cfg, run_dir = make_cfg("model.null_fit=true", "data.simulation.n_case_programs=0",
                            "data.simulation.n_shifted=0", "K_case=2", *LIGHT)
    s2 = run(cfg, run_dir).metrics["stage2"]
    assert s2["explained_variance_gain"] < 2 * s2["null_explained_variance_gain"]


@pytest.mark.slow
def test_twostage_run_with_replicates_and_the_null(make_cfg):
    """R=2 for both stages and the held-out-control null, on the small demo (5 + 2 planted programs)."""
    cfg, run_dir = make_cfg("model.replicates=2", "model.null_fit=true", "logger=none")
    metrics = run(cfg, run_dir).metrics
    s1, s2 = metrics["stage1"], metrics["stage2"]
    for stats in (s1, s2):
        assert stats["replicates"] == 2 and stats["replicate_seeds"] == [0, 3]
        assert len(stats["replicate_relative_error"]) == 2 and len(stats["replicate_cosine"]) == 2
        assert stats["replicate_stability"] > 0.8  # the planted K: replicates agree
    for name in ("stage1_rep1", "stage1_rep2", "stage2_rep1", "stage2_rep2", "stage1_null", "stage2_null"):
        assert (run_dir / "checkpoints" / f"{name}.ckpt").is_file(), name
    assert not (run_dir / "checkpoints" / "stage1.ckpt").exists()
    # the consensus is the result: planted programs recovered, error as reported
    assert metrics["recovery"]["baseline_min"] > 0.95 and metrics["recovery"]["case_min"] > 0.9
    assert s2["explained_variance_gain"] == pytest.approx(
        s2["baseline_only_relative_error"] ** 2 - s2["relative_error"] ** 2)
    saved = json.loads((run_dir / "results" / "metrics.json").read_text())
    assert saved["stage2"]["null_n_cells"] + saved["stage2"]["null_baseline_n_cells"] == 250
    # 2 planted case programs explain far more in case cells than 2 programs in held-out controls
    assert s2["explained_variance_gain"] > 5 * s2["null_explained_variance_gain"] > 0


def test_onestage_consensus_usage_is_the_nnls_refit(make_cfg):
    import anndata as ad

    from deltanmf.core import CellMatrix
    from deltanmf.data import load_input, prepare
    from deltanmf.workflow.config import load_settings

    cfg, run_dir = make_cfg("stage=onestage", "model.replicates=2", *LIGHT)
    metrics = run(cfg, run_dir).metrics
    result = ad.read_h5ad(run_dir / "results" / "results.h5ad")
    programs, usage = result.varm["deltanmf_programs_scaled"], result.obsm["X_deltanmf"]  # the units fitted
    np.testing.assert_allclose(programs.sum(0), 1, rtol=1e-5)
    # recompute the error from the written programs and usage on the prepared control matrix
    data = load_settings(cfg).data
    prepared = prepare(load_input(data), data, use_case=False)
    error = fit_error(CellMatrix(prepared.control), programs, usage)
    assert error["relative_error"] == pytest.approx(metrics["stage1"]["relative_error"], rel=1e-4)
    assert metrics["stage1"]["relative_error"] <= max(metrics["stage1"]["replicate_relative_error"]) + 1e-3


def test_null_fit_and_replicates_name_themselves_in_the_log():
    from deltanmf.tl.fit import stage_label

    assert stage_label("stage1") == "stage 1" and stage_label("stage2_rep2") == "stage 2 (replicate 2)"
    assert stage_label("stage1_null").startswith("null fit") and stage_label("stage2_null").startswith("null fit")
