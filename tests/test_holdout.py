"""Held-out entries and ``rel_alpha=auto``: the mask, the masked loss, the one-SE rule, the runs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from deltanmf.core.matrix import csr_tensor
from deltanmf.core.holdout import EntryMask, HeldOutTotal, held_out_error
from deltanmf.errors import InputError
from deltanmf.tl.strength import one_se_choice
from deltanmf.train import Stage1Module
from helpers import DEFAULTS, module_args, run


def test_mask_is_a_function_of_cell_gene_and_seed():
    mask = EntryMask(0.1, seed=3)
    cells = torch.arange(5000)
    whole = mask.block(cells, 300)
    assert whole.dtype == torch.bool and whole.shape == (5000, 300)
    assert whole.float().mean().item() == pytest.approx(0.1, abs=0.003)
    # the same entries whatever the batch: rows taken in another order and grouping
    order = torch.randperm(5000, generator=torch.Generator().manual_seed(0))
    for part in order.split(777):
        assert torch.equal(mask.block(part, 300), whole[part])
    # no row or column pattern: each gene's and each cell's share near the fraction
    assert whole.float().mean(0).std().item() < 0.01 and whole.float().mean(1).std().item() < 0.03
    other = EntryMask(0.1, seed=4).block(cells, 300)
    assert (whole & other).float().mean().item() == pytest.approx(0.01, abs=0.002)  # independent masks
    # cells beyond 2**32 positions are hashed too (not aliased onto small ones)
    assert not torch.equal(mask.block(cells + 2**32, 300), whole)
    with pytest.raises(ValueError, match="fraction"):
        EntryMask(0.0, seed=0)


def test_held_out_error_sparse_equals_dense_and_counts_zeros():
    x = sp.random(70, 50, density=0.2, random_state=1, format="csr", dtype=np.float32)
    w, u = torch.rand(50, 3), torch.rand(70, 3)
    mask, cells = EntryMask(0.2, 1), torch.arange(70) + 1000
    dense = held_out_error(torch.as_tensor(x.toarray()), w, u, cells, mask)
    sparse = held_out_error(csr_tensor(x), w, u, cells, mask)
    for a, b in zip(dense, sparse):
        assert torch.allclose(a.double(), b.double(), rtol=1e-5)
    held = mask.block(cells, 50).numpy()
    expected = ((x.toarray() - (u @ w.T).numpy()) ** 2 * held).sum(1)
    np.testing.assert_allclose(dense[0].numpy(), expected, rtol=1e-5)
    assert int(dense[2].sum()) == held.sum() > 3 * ((x.toarray() != 0) & held).sum()  # zeros are held out too


def _module(x, holdout):
    torch.manual_seed(0)
    k = 3
    return Stage1Module(torch.rand(x.shape[1], k), torch.rand(x.shape[0], k), **module_args(), holdout=holdout)


@pytest.mark.parametrize("sparse", [False, True])
def test_training_loss_ignores_the_held_out_entries(sparse):
    """Changing X at held-out entries changes neither the loss nor its gradient; changing a
    kept entry does."""
    rng = np.random.default_rng(1)
    x = (rng.random((40, 30)) * (rng.random((40, 30)) < 0.4)).astype(np.float32)
    mask = EntryMask(0.25, seed=7)
    held = mask.block(torch.arange(40), 30).numpy()
    changed, kept = x.copy(), x.copy()
    changed[held] += 5.0
    kept[~held] += 5.0
    index = torch.arange(40)

    def loss_and_grad(values):
        block = csr_tensor(sp.csr_matrix(values)) if sparse else torch.as_tensor(values)
        module = _module(values, mask)
        loss = module.loss_terms(block, index).total
        loss.backward()
        return loss.detach(), module.model.programs_raw.grad.clone()

    base, grad = loss_and_grad(x)
    other, other_grad = loss_and_grad(changed)
    assert torch.allclose(base, other, rtol=1e-5) and torch.allclose(grad, other_grad, rtol=1e-4, atol=1e-7)
    moved, _ = loss_and_grad(kept)
    assert moved > base * 1.5
    # the loss is the mean over the kept entries
    module = _module(x, mask)
    recon = (module.model.usage(index) @ module.model.programs().T).detach().numpy()
    expected = ((x - recon) ** 2)[~held].mean()
    assert float(base) == pytest.approx(expected, rel=1e-5)


def test_held_out_total_over_blocks_equals_one_block():
    rng = np.random.default_rng(2)
    x = torch.as_tensor(rng.random((90, 20)).astype(np.float32))
    w, u = torch.rand(20, 2), torch.rand(90, 2)
    mask = EntryMask(0.1, 0)
    whole = HeldOutTotal(w, mask, 90)
    whole.add(x, u, np.arange(90))
    parts = HeldOutTotal(w, mask, 90)
    for rows in np.array_split(np.arange(90), 4):
        parts.add(x[rows], u[rows], rows)
    assert parts.result() == pytest.approx(whole.result())
    np.testing.assert_allclose(parts.per_cell.numpy(), whole.per_cell.numpy())


def test_one_se_rule_leans_toward_no_prior():
    rng = np.random.default_rng(3)
    base = rng.gamma(2.0, 1.0, size=400)  # cells' held-out errors vary far more than strengths change them
    grid = [0.0, 0.1, 0.3, 1.0]
    noise = lambda: rng.normal(0, 0.01, 400)  # noqa: E731
    # 0.3 is best; 0.1 is within noise of it (paired over cells); 0 and 1 clearly worse
    per_cell = [base + 0.08 + noise(), base + 0.0002 + noise(), base + noise(), base + 0.5 + noise()]
    chosen, curve = one_se_choice(grid, per_cell, entries=4000)
    assert grid[chosen] == 0.1
    assert curve[2]["excess"] == 0 and all(p["excess_se"] > 0 for i, p in enumerate(curve) if i != 2)
    assert curve[0]["excess"] > 3 * curve[0]["excess_se"]
    # the paired standard error is far below the unpaired one: a real but small gain is seen
    assert curve[0]["excess_se"] < 0.1 * np.sqrt(400) * base.std() / 4000
    # no strength helps: 0 is chosen even when another is best by a hair
    flat = [base + noise() for _ in grid]
    assert one_se_choice(grid, flat, 4000)[0] == 0


def test_auto_needs_zero_in_the_grid():
    from dataclasses import replace

    with pytest.raises(InputError, match="must hold 0"):
        replace(DEFAULTS.model.stage1, rel_alpha="auto", alpha_grid=(0.1, 0.3))
    with pytest.raises(InputError, match="rel_alpha=fast must be a number >= 0 or auto"):
        replace(DEFAULTS.model.stage1, rel_alpha="fast")


def test_auto_run_chooses_a_strength_and_reports_the_curve(make_cfg):
    cfg, run_dir = make_cfg("resource=demo", "model.stage1.rel_alpha=auto", "model.stage2.rel_alpha=auto",
                            "model.stage1.alpha_grid=[0,0.3]", "model.stage2.alpha_grid=[0,0.1]",
                            "model.stage1.laplacian_steps=30", "model.stage2.laplacian_steps=30")
    result = run(cfg, run_dir)
    for stage in ("stage1", "stage2"):
        record = result.metrics[stage]["prior_selection"]
        assert record["curve"]["rel_alpha"] == [0.0, record["grid"][1]]
        assert record["chosen"] in record["grid"] and record["heldout_entries"] > 0
        assert all(e > 0 for e in record["curve"]["heldout_recon"])
        # the final fit is on all entries, at the chosen strength
        assert "heldout_recon" not in result.metrics[stage]
        assert (result.metrics[stage]["laplacian_alpha"] > 0) == (record["chosen"] > 0)
    saved = json.loads((run_dir / "results" / "metrics.json").read_text())
    assert saved["stage1"]["prior_selection"]["chosen"] == result.metrics["stage1"]["prior_selection"]["chosen"]
    assert (run_dir / "results" / "prior_selection.png").stat().st_size > 0
    assert (run_dir / "tensorboard" / "stage1_alpha0.3").is_dir()


def test_evaluate_reports_the_same_held_out_entries_in_minibatch_mode(make_cfg):
    counts = {}
    for batch in ("null", "64"):
        cfg, run_dir = make_cfg("stage=onestage", "model.holdout.evaluate=true", f"data.batch_size={batch}",
                                "trainer.max_steps=40", "overwrite=true")
        stage1 = run(cfg, run_dir).metrics["stage1"]
        counts[batch] = stage1["heldout_entries"]
        assert 0 < stage1["heldout_relative_error"] < 2
    assert counts["null"] == counts["64"]
