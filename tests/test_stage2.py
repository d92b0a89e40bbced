"""Stage 2 and the case-control answer, on simulated data with a known truth."""
from __future__ import annotations

import re

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch

import deltanmf
import deltanmf.core.stage2 as stage2
from deltanmf.core import CellMatrix, matching, stage2_init
from deltanmf.errors import InputError
from deltanmf.train import Stage2Module
from helpers import consensus, data, datamodule, module_args, run

FAST = ["trainer.enable_progress_bar=false", "trainer.accelerator=cpu", "model.consensus.replicates=3",
        "model.consensus.iterations=100", "trainer.max_steps=600"]


def _simulate(**kw):
    args = dict(n_genes=300, n_programs=5, n_case_programs=2, n_control=300, n_case=300, n_groups=2,
                markers_per_program=30, seed=1)
    args.update(kw)
    return deltanmf.simulate_case_control(**args)


@pytest.fixture(scope="module")
def twostage(tmp_path_factory):
    adata = _simulate()
    out = tmp_path_factory.mktemp("twostage")
    result = deltanmf.fit_twostage(adata, K=5, K_case=2, group_key="perturbation", out_dir=out, overrides=FAST)
    return adata, result, out


def test_case_programs_and_shifts_are_recovered(twostage):
    _, result, _ = twostage
    rec = result.metrics["recovery"]
    assert min(rec["baseline_matched_cosine"]) >= 0.95
    assert min(rec["case_matched_cosine"]) >= 0.9
    assert all(rec["planted_case_programs_emergent"])
    shift = result.usage_shift.set_index("program")
    for row in rec["shifts"]:
        if row["planted_shift"] != "none":
            assert row["called_shift"] == row["planted_shift"], row
            assert shift.loc[row["fitted"], "q_value"] < 0.05
    assert rec["shifts_false"] == 0


def test_results_cover_all_cells_and_programs(twostage):
    adata, result, out = twostage
    res = result.results
    names = [f"baseline_{i}" for i in range(1, 6)] + ["case_1", "case_2"]
    assert list(res.uns["deltanmf"]["program_names"]) == names
    assert list(res.uns["deltanmf"]["program_kind"]) == ["baseline"] * 5 + ["case"] * 2
    assert res.n_obs == 600 and res.varm["deltanmf_programs"].shape == (res.n_vars, 7)
    is_control = (res.obs["condition"] == "control").to_numpy()
    usage = res.obsm["X_deltanmf"]
    assert np.all(usage[is_control, 5:] == 0)  # controls carry zero case usage
    assert np.all(res.obs["deltanmf_novelty"].to_numpy()[is_control] == 0)
    novelty = res.obs["deltanmf_novelty"].to_numpy()[~is_control]
    np.testing.assert_allclose(novelty, usage[~is_control, 5:].sum(1) / usage[~is_control].sum(1), rtol=1e-5)
    # case programs are used by the cells the simulator gave them to
    truth = deltanmf.simulation_truth(adata)
    planted_users = truth.usage[~is_control, 5:].sum(1) > 0
    assert novelty[planted_users].mean() > 5 * novelty[~planted_users].mean()
    # written back into the user's AnnData, scanpy style
    np.testing.assert_array_equal(adata.obsm["X_deltanmf"], usage)
    assert "deltanmf" in adata.uns and "X_deltanmf_refit" in adata.obsm
    for name in ["results/results.h5ad", "results/usage_shift.csv", "results/case_programs.csv",
                 "results/group_usage.csv", "results/usage_share.png", "results/group_usage.png",
                 "results/top_genes.png", "results/program_similarity.png", "checkpoints/stage1.ckpt",
                 "checkpoints/stage2.ckpt"]:
        assert (out / name).is_file(), name
    for png in (out / "results").glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cases = pd.read_csv(out / "results" / "case_programs.csv")
    assert {"case_fraction_using", "case_mean_share", "top_genes", "emergent", "q_value"} <= set(cases.columns)


def test_group_table_places_each_case_program_in_its_group(twostage):
    adata, result, _ = twostage
    truth = deltanmf.simulation_truth(adata[:, result.results.var_names])
    rec = result.metrics["recovery"]
    groups = result.group_usage
    assert set(groups["group"]) == {"TARGET1", "TARGET2"}  # control cells are the reference, not a group
    fitted = matching(
        result.programs.to_numpy()[:, 5:] * result.results.var["deltanmf_gene_scale"].to_numpy()[:, None],
        truth.case_programs)
    for planted, group in enumerate(truth.case_program_groups):
        name = f"case_{fitted[planted] + 1}"
        rows = groups[groups["program"] == name].set_index("group")
        assert rows.loc[group, "called"] and rows.loc[group, "log2_fold_change"] > 1
        others = rows.drop(index=group)
        assert (others["share"] < rows.loc[group, "share"] / 3).all()
    assert rec["case_min"] >= 0.9


@pytest.mark.smoke
def test_control_versus_control_calls_nothing():
    adata = _simulate(n_control=600, n_case=0 + 1, n_case_programs=0, n_shifted=0)
    adata = adata[adata.obs["condition"] == "control"].copy()
    rng = np.random.default_rng(0)
    adata.obs["split"] = np.where(rng.random(adata.n_obs) < 0.5, "A", "B")
    result = deltanmf.fit_twostage(adata, K=5, K_case=2, condition_key="split", control="A", overrides=FAST)
    assert (result.usage_shift["shift"] == "none").all(), result.usage_shift
    assert not result.case_programs["emergent"].any(), result.case_programs


@pytest.mark.smoke
def test_baseline_is_a_frozen_buffer_and_stays_bit_identical():
    adata = _simulate()
    x = adata.X[(adata.obs["condition"] == "case").to_numpy()].toarray()
    x = x / np.maximum(x.std(0), 1e-6)
    baseline = torch.from_numpy(np.abs(np.random.default_rng(0).random((x.shape[1], 5), dtype=np.float32)))
    before = baseline.clone()
    matrix = CellMatrix(x)
    case, usage = stage2_init(matrix, baseline, 2, consensus=consensus(replicates=2, iterations=30), refine_rounds=50,
                              refine_tol=1e-4, seed=0)
    module = Stage2Module(baseline, case, usage, rel_gamma=0.5, **module_args())
    names = [n for n, _ in module.named_parameters()]
    assert not any("fixed" in n for n in names) and len(names) == 2
    case_before = module.model.trainable_programs().detach().clone()
    trainer = L.Trainer(max_steps=40, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule(x, steps_per_epoch=10))
    programs = module.programs()
    assert torch.equal(programs[:, :5], before)          # bit for bit
    assert torch.equal(module.baseline, before)
    assert not torch.equal(programs[:, 5:], case_before)  # the case programs did train
    assert torch.isfinite(module.gamma) and module.gamma > 0


def test_raising_rel_gamma_lowers_baseline_case_similarity():
    adata = _simulate(seed=2)
    cos = {}
    for gamma in (0.0, 2.0):
        result = deltanmf.fit_twostage(adata, K=5, K_case=2, overrides=[*FAST, f"model.stage2.rel_gamma={gamma}"])
        w = np.asarray(result.results.varm["deltanmf_programs_scaled"])  # the units the penalty acts in
        w = w / np.linalg.norm(w, axis=0)
        cos[gamma] = float(np.mean((w[:, :5].T @ w[:, 5:]) ** 2))
        if gamma:
            assert result.metrics["stage2"]["ortho_gamma"] > 0 and "ortho" in result.metrics["stage2"]["loss"]
    assert cos[2.0] < 0.7 * cos[0.0], cos


def test_stage1_from_gives_the_same_stage2(tmp_path, caplog):
    adata = _simulate(seed=4)
    first = deltanmf.fit_twostage(adata.copy(), K=5, K_case=2, out_dir=tmp_path / "a", overrides=FAST)
    with caplog.at_level("WARNING", logger="deltanmf.workflow.run"):
        again = deltanmf.fit_twostage(adata.copy(), K=5, K_case=2, stage1_from=tmp_path / "a",
                                      out_dir=tmp_path / "b", overrides=FAST)
    assert not any("one-stage run" in r.getMessage() for r in caplog.records)  # a two-stage source is fine
    np.testing.assert_array_equal(again.programs.to_numpy()[:, :5], first.programs.to_numpy()[:, :5])
    np.testing.assert_allclose(again.programs.to_numpy(), first.programs.to_numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(again.usage.to_numpy(), first.usage.to_numpy(), rtol=1e-4, atol=1e-6)
    pd.testing.assert_frame_equal(again.usage_shift, first.usage_shift, rtol=1e-4)
    assert "from" in again.metrics["stage1"] and not (tmp_path / "b" / "checkpoints" / "stage1.ckpt").exists()
    # a different number of case programs from the same baseline
    more = deltanmf.fit_twostage(adata.copy(), K=5, K_case=3, stage1_from=tmp_path / "a", overrides=FAST)
    assert more.programs.shape[1] == 8
    np.testing.assert_array_equal(more.programs.to_numpy()[:, :5], first.programs.to_numpy()[:, :5])


def test_stage1_from_errors_name_the_problem(tmp_path):
    adata = _simulate()
    with pytest.raises(ValueError, match="no results.h5ad"):
        deltanmf.fit_twostage(adata, K=5, K_case=2, stage1_from=tmp_path, overrides=FAST)


def test_stage1_from_a_one_stage_run_is_warned_about(tmp_path, caplog):
    adata = _simulate(seed=4)
    deltanmf.fit_onestage(adata.copy(), K=5, out_dir=tmp_path / "one", overrides=FAST)
    with caplog.at_level("WARNING", logger="deltanmf.workflow.run"):
        deltanmf.fit_twostage(adata.copy(), K=5, K_case=2, stage1_from=tmp_path / "one", overrides=FAST)
    assert any("is a one-stage run" in r.getMessage() and "stage=twostage" in r.getMessage() for r in caplog.records)


def test_minibatch_two_stage_recovers_the_truth():
    adata = _simulate(seed=6)
    result = deltanmf.fit_twostage(adata, K=5, K_case=2, batch_size=128, overrides=FAST)
    rec = result.metrics["recovery"]
    assert rec["baseline_min"] >= 0.95 and rec["case_min"] >= 0.9, rec
    assert rec["shifts_called_correctly"] == rec["shifts_planted"] and rec["shifts_false"] == 0
    assert result.metrics["stage2"]["steps"] > 0


@pytest.mark.smoke
def test_case_program_refinement_lowers_the_loss_and_finds_the_planted_programs():
    """Stage 2's init refines the residual consensus by alternating NNLS on the case cells:
    every round lowers the reconstruction error, and the refined programs sit much closer
    to the planted case programs than the residual consensus does."""
    from deltanmf.core import fit_error, matched_cosine, refine_case_programs, refit_usage
    from deltanmf.data import prepare, simulation_truth

    prepared = prepare(_simulate(), data(), use_case=True)
    truth = simulation_truth(prepared.source)
    baseline = torch.tensor(truth.programs / prepared.gene_scale[:, None], dtype=torch.float64)
    matrix = CellMatrix(prepared.case, dtype=torch.float64)
    light = consensus(replicates=3, iterations=50)

    def recovery(case):
        return matched_cosine(case.numpy() * prepared.gene_scale[:, None], truth.case_programs).min()

    def error(case):
        joint = torch.cat([baseline, case], dim=1)
        return fit_error(matrix, joint, refit_usage(matrix, joint, 500))["relative_error"]

    start, _ = stage2_init(matrix, baseline, 2, consensus=light, refine_rounds=0, refine_tol=1e-4, seed=0)
    errors = [error(refine_case_programs(matrix, baseline, start, 200, rounds=r, tol=0)) for r in range(5)]
    assert all(b <= a + 1e-9 for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0]
    refined, usage = stage2_init(matrix, baseline, 2, consensus=light, refine_rounds=50, refine_tol=1e-4, seed=0)
    assert recovery(refined) > 0.995 and recovery(refined) > recovery(start) + 0.01, (recovery(start), recovery(refined))
    assert usage.shape == (matrix.n_cells, 7) and (usage >= 0).all()
    # a loose tolerance stops after the first round
    torch.testing.assert_close(refine_case_programs(matrix, baseline, start, 200, rounds=50, tol=1.0),
                               refine_case_programs(matrix, baseline, start, 200, rounds=1, tol=1e-4))


@pytest.mark.parametrize("override, named", [
    ("model.stage2.refine_rounds=-1", "model.stage2.refine_rounds=-1 must be a whole number >= 0"),
    ("model.stage2.refine_rounds=2.5", "model.stage2.refine_rounds=2.5 must be a whole number >= 0"),
    ("model.stage2.refine_tol=-0.1", "model.stage2.refine_tol=-0.1 must be a number >= 0"),
    ("model.stage2.refine_rounds=null", "model.stage2.refine_rounds=null must be a whole number >= 0"),
])
def test_bad_refinement_settings_stop_before_any_fit(make_cfg, override, named):
    cfg, run_dir = make_cfg(override)
    with pytest.raises(InputError, match=re.escape(named)):
        run(cfg, run_dir)
    assert not (run_dir / "checkpoints").exists()


def test_refinement_settings_reach_the_stage2_init(make_cfg, monkeypatch):
    seen = []
    original = stage2.refine_case_programs

    def recording(matrix, baseline, case, nnls_iter, rounds, tol):
        seen.append((rounds, tol))
        return original(matrix, baseline, case, nnls_iter, rounds, tol)

    monkeypatch.setattr(stage2, "refine_case_programs", recording)
    cfg, run_dir = make_cfg("model.stage2.refine_rounds=3", "model.stage2.refine_tol=0.25", "logger=none")
    run(cfg, run_dir)
    assert seen == [(3, 0.25)]


def test_each_stage_holds_one_device_copy_of_its_cells(make_cfg, monkeypatch):
    """The initialisation's full block (a GPU copy off the CPU) is released before the loader
    puts its own on the device, and the loader's is dropped after training."""
    import deltanmf.tl.fit as fit
    from deltanmf.train import CellDataModule

    events = []
    release, teardown, train = CellMatrix.release, CellDataModule.teardown, fit.fit_module

    def recording_release(self):
        events.append("release")
        release(self)

    def recording_teardown(self, stage):
        events.append("teardown")
        teardown(self, stage)
        assert self._device_batch is None

    def recording_train(module, datamodule, trainer, plan, name):
        events.append(name)
        return train(module, datamodule, trainer, plan, name)

    monkeypatch.setattr(CellMatrix, "release", recording_release)
    monkeypatch.setattr(CellDataModule, "teardown", recording_teardown)
    monkeypatch.setattr(fit, "fit_module", recording_train)
    cfg, run_dir = make_cfg("logger=none")
    run(cfg, run_dir)
    assert events == ["release", "stage1", "teardown", "release", "stage2", "teardown"]


class _RecordedRows:
    """A row source over an in-memory CSR matrix (as a file on disk is read): records the
    rows each read asks for."""

    def __init__(self, x):
        self.x, self.shape, self.reads = x, x.shape, []

    def read_rows(self, index):
        self.reads.append(len(index))
        return self.x[index]


def test_streamed_stage2_init_without_max_cells_keeps_streaming(monkeypatch):
    """model.consensus.max_cells=null with cells streamed from disk: the case cells, and their
    residual, are only ever held one batch at a time (never every case non-zero at once),
    and the case programs and usage are those of the same initialisation in memory."""
    from deltanmf.data import prepare, simulation_truth

    prepared = prepare(_simulate(n_control=100, n_case=300), data(), use_case=True)
    truth = simulation_truth(prepared.source)
    baseline = torch.tensor(truth.programs / prepared.gene_scale[:, None], dtype=torch.float32)
    iterations = 20
    settings = dict(seed=0, consensus=consensus(replicates=2, iterations=iterations, tol=0, max_cells=None),
                    refine_rounds=3, refine_tol=1e-4)
    batch = 64
    in_memory = stage2.stage2_init(CellMatrix(prepared.case, batch_size=batch), baseline, 2, **settings)

    def whole_residual(self):
        raise AssertionError("the residual of every streamed case cell was built in memory")

    residual_rows = []
    sparse_residual = stage2.sparse_residual

    def recorded_residual(x, programs, usage):
        residual_rows.append(x.shape[0])
        return sparse_residual(x, programs, usage)

    monkeypatch.setattr(stage2.ResidualMatrix, "to_cell_matrix", whole_residual)
    monkeypatch.setattr(stage2, "sparse_residual", recorded_residual)
    source = _RecordedRows(prepared.case)
    streamed = stage2.stage2_init(CellMatrix(source, batch_size=batch), baseline, 2, **settings)
    n_batches = -(-source.shape[0] // batch)
    assert max(source.reads) <= batch and max(residual_rows) <= batch
    # recomputed on every pass of the consensus, not kept for all cells
    assert len(residual_rows) >= iterations * n_batches
    for s, m in zip(streamed, in_memory):
        torch.testing.assert_close(s, m, rtol=1e-5, atol=1e-5 * float(m.abs().max()))
