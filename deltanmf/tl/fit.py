"""Fitting the stages, with plain arguments: stage 1 on the controls, stage 2 on the cases with
the baseline frozen, the consensus of replicate fits, and stage 2's null on held-out controls.

Each fit is: an initialisation (:func:`deltanmf.core.consensus_init`, or
:func:`deltanmf.core.stage2` from the frozen baseline), a LightningModule trained by
:func:`deltanmf.train.fit_module`, and the facts a user reads (errors, steps, timings).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import lightning as L
import numpy as np
import torch

from ..core import (CellMatrix, GeneGraph, consensus_init, fit_error, laplacian_penalty, normalize_programs,
                    orthogonality_penalty, refit_and_score, replicate_consensus, stage2_init)
from ..core.holdout import EntryMask, HeldOutTotal
from ..settings import ModelSettings
from ..train import Stage1Module, Stage2Module, TrainingPlan, build_trainer, fit_module
from ..train.trainer import lazy_usage, make_datamodule, placeholder_start, saved_init
from .strength import choose_strength, with_strength

log = logging.getLogger(__name__)


@dataclass
class StageFit:
    """A trained stage: programs (genes x K), usage of its cells (cells x K) and facts about the fit;
    fitted with held-out entries, each cell's squared error at them (``heldout_per_cell``)."""

    programs: np.ndarray
    usage: np.ndarray
    names: list[str]
    stats: dict = field(default_factory=dict)
    heldout_per_cell: np.ndarray | None = None


def baseline_names(k: int) -> list[str]:
    return [f"baseline_{i + 1}" for i in range(k)]


def stage_label(name: str) -> str:
    """A fit's name as its log lines give it: ``stage 1``, ``stage 2 (replicate 2)``, and the
    null fit's halves as what they are, not a second run of the stages."""
    stage = "stage 1" if name.startswith("stage1") else "stage 2"
    if name.endswith("_null"):
        return ("null fit: baseline on half the controls" if stage == "stage 1"
                else "null fit: stage 2 on the other half as if cases")
    if "_alpha" in name:  # rel_alpha=auto's held-out fits: stage1_alpha0.3, stage1_alpha0.3_fold2
        strength, _, fold = name.split("_alpha", 1)[1].partition("_fold")
        return f"{stage} (entries held out, rel_alpha={strength}{f', fold {fold}' if fold else ''})"
    return f"{stage} (replicate {name.rsplit('_rep', 1)[1]})" if "_rep" in name else stage


def case_names(k_case: int) -> list[str]:
    return [f"case_{i + 1}" for i in range(k_case)]


def loss_summary(recon: float, graph: GeneGraph | None, prior_programs: torch.Tensor, alpha: float,
                 ortho: float | None = None, gamma: float = 0.0) -> dict:
    """A stage's final loss terms over all its cells (not one batch), in the units of the
    training loss (TensorBoard's ``train/*``): ``recon`` (mean squared error per entry of the
    prepared matrix), ``laplacian`` (with a gene graph: the mean normalised Rayleigh quotient
    of the programs the prior acts on, in [0, 2], 1 for programs unrelated to the graph; see
    :func:`deltanmf.core.laplacian_penalty`), ``ortho`` (with ``rel_gamma > 0``: the mean squared
    cosine between baseline and case programs), and ``total``, the sum weighted by the
    strengths the stage ended with (``alpha`` is 0 if the prior never switched on). The
    Laplacian term and ``ortho`` do not depend on the programs' scale, so rescaling the
    programs to unit sums for the outputs leaves them as training last saw them."""
    loss = {"recon": recon}
    total = recon
    if graph is not None:
        loss["laplacian"] = float(laplacian_penalty(graph, prior_programs.to(graph.degree.device)))
        total += alpha * loss["laplacian"]
    if ortho is not None:
        loss["ortho"] = ortho
        total += gamma * ortho
    loss["total"] = total
    return loss


def _train_stage(name: str, label: str, x, k_total: int, plan: TrainingPlan, seed: int,
                 start: Callable[[CellMatrix], tuple], build: Callable[..., L.LightningModule]):
    """What both stages do: the cells' loader, the trainer, the start (``start(matrix)`` ->
    ``(programs, usage, record)``, skipped for a stage continued from a checkpoint, which
    replaces them), the module (``build(programs, usage, minibatch=...)``), training."""
    transposed_copy = plan.keeps_transposed_copy(x.shape[0])
    datamodule = make_datamodule(x, plan, seed, transposed_copy)
    trainer = build_trainer(plan, name)
    matrix = CellMatrix(x, batch_size=plan.batch_size, device=trainer.strategy.root_device,
                        transposed_copy=transposed_copy)
    record = saved_init(plan, name)
    if record is None:
        programs, usage, record = start(matrix)
    else:
        log.info("%s: continuing from a checkpoint; its initialisation is not repeated", label)
        programs, usage = placeholder_start(matrix.n_genes, matrix.n_cells, k_total)
    module = build(programs, usage, minibatch=lazy_usage(datamodule, trainer))
    module.init_record, module.settings_record = record, plan.settings_record
    matrix.release()  # the loader puts its own copy of the cells on the device
    train_time = fit_module(module, datamodule, trainer, plan, name)
    return module, trainer, matrix, record, train_time


def _stats(label: str, module, trainer: L.Trainer, matrix: CellMatrix, error: dict, loss: dict,
           init_time: float, train_time: float, **extra) -> dict:
    """The facts both stages report (metrics.json, .uns), logged in one line."""
    start = module.prior_start_step
    stats = {
        "loss": loss,
        "relative_error": error["relative_error"],
        **extra,
        "steps": int(trainer.global_step),
        "converged": bool(module.converged),
        "stop_reason": module.stop_reason,
        "laplacian_alpha": float(module.alpha),
        "laplacian_start_step": start,
        "init_time_s": init_time,
        "train_time_s": train_time,
        "n_cells": matrix.n_cells,
        "device": str(trainer.strategy.root_device),
    }
    log.info("%s: %d steps (%s); loss %s; relative error %.4f", label, stats["steps"],
             describe_stop(stats, module.laplacian_steps), describe_loss(loss, stats["laplacian_alpha"],
                                                                       extra.get("ortho_gamma", 0.0)),
             stats["relative_error"])
    return stats


def describe_stop(stats: dict, laplacian_steps: int) -> str:
    """Why a stage stopped, in words: its ``stop_reason`` and where the prior's phase began."""
    start, reason = stats["laplacian_start_step"], stats["stop_reason"]
    prior = "" if start is None else f"the prior on from step {start}"
    if reason == "prior_steps":
        return f"converged, then {prior} until its laplacian_steps={laplacian_steps} ran out before converging"
    if reason == "converged" and start == 0:
        return "converged, the prior on from the first step"
    if reason == "converged":
        return "converged" if start is None else f"converged, then {prior} until it converged too"
    return "stopped at the step cap (trainer.max_steps)" + (f", {prior}" if prior else "")


def describe_loss(loss: dict, alpha: float, gamma: float) -> str:
    """The loss terms as metrics.json and TensorBoard give them (see docs/prior.md)."""
    parts = [f"recon {loss['recon']:.6g}"]
    if "laplacian" in loss:
        parts.append(f"laplacian {loss['laplacian']:.4f} (alpha {alpha:.4g})")
    if "ortho" in loss:
        parts.append(f"ortho {loss['ortho']:.4g} (gamma {gamma:.4g})")
    return ", ".join(parts) + f", total {loss['total']:.6g}"


def _module_args(model: ModelSettings) -> dict:
    return dict(activation=model.activation, beta=model.beta, lr=model.lr, window=model.stop.check_every)


def _holdout(model: ModelSettings, seed: int) -> EntryMask | None:
    """The entries a fit holds out (``model.holdout.evaluate``), chosen by the fit's seed."""
    return EntryMask(model.holdout.fraction, seed) if model.holdout.evaluate else None


def held_out(matrix: CellMatrix, programs, usage, mask: EntryMask | None) -> tuple[dict, np.ndarray | None]:
    """The fit's error at the held-out entries (one pass over ``matrix``): ``heldout_recon``,
    ``heldout_relative_error``, ``heldout_entries``, and each cell's squared error there."""
    if mask is None:
        return {}, None
    total = HeldOutTotal(torch.as_tensor(programs, dtype=matrix.dtype, device=matrix.device), mask, matrix.n_cells)
    h = torch.as_tensor(usage, dtype=matrix.dtype)
    for index, x in matrix.batches():
        total.add(x, h[torch.as_tensor(index)], index)
    return total.result(), total.per_cell.numpy()


def fit_stage1(x, k: int, model: ModelSettings, plan: TrainingPlan, *, seed: int, graph: GeneGraph | None = None,
               name: str = "stage1", mask: EntryMask | None = None) -> StageFit:
    """Consensus initialisation, then the neural NMF of the control cells (stage 1).

    ``name`` names the fit's checkpoint and TensorBoard folder (``stage1_rep2`` for a replicate).
    ``mask``: the entries held out (default: ``model.holdout``'s when ``evaluate`` is set).
    """
    def start(matrix):
        began = time.perf_counter()
        init = consensus_init(matrix, k, model.consensus, seed)
        record = {"init_time_s": time.perf_counter() - began, "consensus_stability": init.stability}
        log.info("%s: consensus initialisation of K=%d programs in %.1fs (stability %.3f)", stage_label(name), k,
                 record["init_time_s"], init.stability)
        return init.programs, init.usage, record

    mask = mask or _holdout(model, seed)

    def build(programs, usage, minibatch):
        return Stage1Module(programs, usage, graph=graph, rel_alpha=model.stage1.rel_alpha,
                            laplacian_steps=model.stage1.laplacian_steps, minibatch=minibatch,
                            prior_from=model.stage1.prior_from, holdout=mask, **_module_args(model))

    module, trainer, matrix, record, train_time = _train_stage(name, stage_label(name), x, k, plan, seed, start,
                                                               build)
    programs, usage = normalize_programs(module.programs().cpu(), module.usage().cpu())
    error = fit_error(matrix, programs, usage)
    heldout, per_cell = held_out(matrix, programs, usage, mask)
    loss = loss_summary(error["recon"], graph, programs, float(module.alpha))
    stats = _stats(stage_label(name), module, trainer, matrix, error, loss, record["init_time_s"], train_time,
                   consensus_stability=record["consensus_stability"], **heldout)
    return StageFit(programs.numpy(), usage.numpy(), baseline_names(k), stats, per_cell)


def fit_stage2(x, baseline: np.ndarray, names: list[str], k_case: int, model: ModelSettings, plan: TrainingPlan, *,
               seed: int, graph: GeneGraph | None = None, name: str = "stage2", mask: EntryMask | None = None
               ) -> StageFit:
    """Case-specific programs on the case cells with the baseline frozen (stage 2).

    The returned programs are ``[baseline, case]``; the baseline columns are exactly the
    given array, and only the case columns are rescaled to sum to 1. ``name`` names the fit's
    checkpoint and TensorBoard folder (``stage2_rep2``, ``stage2_null``).
    """
    k = baseline.shape[1]
    frozen = torch.from_numpy(np.ascontiguousarray(baseline, dtype=np.float32))
    stage2 = model.stage2

    def start(matrix):
        began = time.perf_counter()
        case, usage = stage2_init(matrix, frozen, k_case, consensus=model.consensus, refine_rounds=stage2.refine_rounds,
                                  refine_tol=stage2.refine_tol, seed=seed)
        record = {"init_time_s": time.perf_counter() - began}
        log.info("%s: initialised K_case=%d case programs in %.1fs", stage_label(name), k_case,
                 record["init_time_s"])
        return case, usage, record

    mask = mask or _holdout(model, seed)

    def build(programs, usage, minibatch):
        return Stage2Module(frozen, programs[:, -k_case:], usage, graph=graph, rel_alpha=stage2.rel_alpha,
                            rel_gamma=stage2.rel_gamma, laplacian_steps=stage2.laplacian_steps, minibatch=minibatch,
                            prior_from=stage2.prior_from, holdout=mask, **_module_args(model))

    L.seed_everything(seed, workers=True, verbose=False)  # stage 2 alone reproduces (stage1_from)
    module, trainer, matrix, record, train_time = _train_stage(name, stage_label(name), x, k + k_case, plan, seed,
                                                               start,
                                                               build)
    programs, usage = module.programs().cpu(), module.usage().cpu()
    case, case_usage = normalize_programs(programs[:, k:], usage[:, k:])
    programs = torch.cat([frozen, case], dim=1)
    usage = torch.cat([usage[:, :k], case_usage], dim=1)
    # one pass over the (possibly streamed) case cells: the fit's error, and the baseline alone refitted by NNLS
    _, baseline_only, (error,) = refit_and_score(matrix, frozen, model.consensus.nnls_iterations,
                                                 scored=[(programs, usage)])
    heldout, per_cell = held_out(matrix, programs, usage, mask)
    gamma = float(module.gamma) if stage2.rel_gamma > 0 else 0.0
    ortho = float(orthogonality_penalty(frozen, case)) if stage2.rel_gamma > 0 else None
    loss = loss_summary(error["recon"], graph, case, float(module.alpha), ortho, gamma)
    stats = _stats(stage_label(name), module, trainer, matrix, error, loss, record["init_time_s"], train_time,
                   baseline_only_relative_error=baseline_only["relative_error"],
                   explained_variance_gain=baseline_only["relative_error"] ** 2 - error["relative_error"] ** 2,
                   ortho_gamma=gamma, **heldout)
    log.info("%s: the baseline alone leaves relative error %.4f", stage_label(name),
             stats["baseline_only_relative_error"])
    return StageFit(programs.numpy(), usage.numpy(), list(names) + case_names(k_case), stats, per_cell)


# -- replicates and the stage-2 null ------------------------------------------------------
def replicate_seeds(seed: int, model: ModelSettings) -> list[int]:
    """Seeds of the ``model.replicates`` fits of a stage: ``seed + r * model.consensus.replicates``.

    A fit with seed s starts from a consensus of multiplicative-update runs seeded s, s+1, ...,
    s + model.consensus.replicates - 1. Replicates seeded s and s+1 would share all but one of
    those runs, and full-batch training is deterministic given its start, so they would return
    nearly the same programs and their agreement would say nothing about K. Spacing the seeds
    by the consensus size gives each replicate its own runs.
    """
    return [seed + r * model.consensus.replicates for r in range(model.replicates)]


def fit_replicates(x, k: int, model: ModelSettings, plan: TrainingPlan, *, seed: int, graph: GeneGraph | None = None,
                   baseline: StageFit | None = None, k_case: int = 0) -> StageFit:
    """Fit a stage ``model.replicates`` times and return the consensus (cNMF style).

    Stage 1 (``x``: control cells, ``k`` programs) without ``baseline``; stage 2 (``x``: case
    cells, ``k_case`` programs beside the frozen ``baseline``) with it. With one replicate
    this is :func:`fit_stage1` / :func:`fit_stage2`. With R > 1, replicate r (1-based) is
    fitted with seed :func:`replicate_seeds` [r-1] under the name ``<stage>_rep<r>`` (its own
    checkpoint and TensorBoard folder). The R*K programs (stage 2: the R*K_case case
    programs; the baseline is fixed) are clustered into K groups
    (:func:`deltanmf.core.replicate_consensus`); the consensus programs, medians of the
    clusters, are the stage's result, with usage refitted by NNLS on the stage's cells.

    Returns
    -------
    StageFit
        With R > 1 its stats add ``replicates``, ``replicate_seeds``, ``replicate_stability``
        (silhouette of the clustering), ``replicate_relative_error`` and ``replicate_cosine``
        (mean matched cosine of each replicate's programs to the consensus); ``relative_error``
        and ``loss`` are those of the consensus; ``steps``, ``init_time_s`` and ``train_time_s``
        are summed over replicates.
    """
    stage = "stage1" if baseline is None else "stage2"

    def fit(seed_r: int, name: str, settings: ModelSettings | None = None, mask: EntryMask | None = None
            ) -> StageFit:
        settings = settings or model  # the model as it stands when called (auto: the chosen strength)
        if baseline is None:
            return fit_stage1(x, k, settings, plan, seed=seed_r, graph=graph, name=name, mask=mask)
        return fit_stage2(x, baseline.programs, baseline.names, k_case, settings, plan, seed=seed_r, graph=graph,
                          name=name, mask=mask)

    selection = None
    if getattr(model, stage).rel_alpha == "auto":
        def held_out_fit(alpha: float, fold: int) -> StageFit:
            suffix = f"_fold{fold + 1}" if model.holdout.folds > 1 else ""
            return fit(seed, f"{stage}_alpha{alpha:g}{suffix}", with_strength(model, stage, alpha),
                       EntryMask(model.holdout.fraction, seed, fold))

        value, selection = choose_strength(stage, model, graph, held_out_fit)
        model = with_strength(model, stage, value)
    seeds = replicate_seeds(seed, model)
    if len(seeds) == 1:
        found = fit(seed, stage)
        if selection is not None:
            found.stats["prior_selection"] = selection
        return found
    fits = []
    for r, seed_r in enumerate(seeds, start=1):
        log.info("%s: replicate %d of %d (seed %d)", stage, r, len(seeds), seed_r)
        fits.append(fit(seed_r, f"{stage}_rep{r}"))

    n_base = 0 if baseline is None else baseline.programs.shape[1]
    found = replicate_consensus([f.programs[:, n_base:] for f in fits], seed=seed,
                                restarts=model.consensus.kmeans_restarts)
    first = fits[0].stats
    matrix = CellMatrix(x, batch_size=plan.batch_size, device=torch.device(first["device"]))
    frozen = None if baseline is None else torch.from_numpy(np.ascontiguousarray(baseline.programs, dtype=np.float32))
    programs = found.programs if frozen is None else torch.cat([frozen, found.programs], dim=1)
    usage, error, _ = refit_and_score(matrix, programs, model.consensus.nnls_iterations)

    alpha = float(np.mean([f.stats["laplacian_alpha"] for f in fits]))
    extra = {}
    if baseline is None:
        loss = loss_summary(error["recon"], graph, found.programs, alpha)
        extra["consensus_stability"] = float(np.nanmean([f.stats["consensus_stability"] for f in fits]))
    else:
        base_error = first["baseline_only_relative_error"]  # NNLS on the fixed baseline: the same for all
        gamma = float(np.mean([f.stats["ortho_gamma"] for f in fits]))
        ortho = float(orthogonality_penalty(frozen, found.programs)) if gamma > 0 else None
        loss = loss_summary(error["recon"], graph, found.programs, alpha, ortho, gamma)
        extra.update(baseline_only_relative_error=base_error,
                     explained_variance_gain=base_error ** 2 - error["relative_error"] ** 2, ortho_gamma=gamma)
    stats = {
        "loss": loss,
        "relative_error": error["relative_error"],
        **extra,
        "replicates": len(seeds),
        "replicate_seeds": seeds,
        "replicate_stability": found.stability,
        "replicate_relative_error": [f.stats["relative_error"] for f in fits],
        "replicate_cosine": found.replicate_cosine,
        "steps": int(sum(f.stats["steps"] for f in fits)),
        "converged": all(f.stats["converged"] for f in fits),
        "stop_reason": ",".join(sorted({f.stats["stop_reason"] for f in fits})),
        "laplacian_alpha": alpha,
        # the prior switches on in every replicate or in none (same settings)
        "laplacian_start_step": ([f.stats["laplacian_start_step"] for f in fits]
                                 if fits[0].stats["laplacian_start_step"] is not None else None),
        "init_time_s": float(sum(f.stats["init_time_s"] for f in fits)),
        "train_time_s": float(sum(f.stats["train_time_s"] for f in fits)),
        "n_cells": first["n_cells"],
        "device": first["device"],
    }
    if selection is not None:
        stats["prior_selection"] = selection
    log.info("%s: consensus of %d replicates, stability %.3f, relative error %.4f (replicates %s)", stage,
             len(seeds), found.stability, error["relative_error"],
             ", ".join(f"{e:.4f}" for e in stats["replicate_relative_error"]))
    return StageFit(programs.numpy(), usage.numpy(), fits[0].names, stats)


def fit_null(x, is_control: np.ndarray, k: int, k_case: int, model: ModelSettings, plan: TrainingPlan, *,
             seed: int, graph: GeneGraph | None = None) -> dict:
    """Stage 2 where there is no effect: how much ``k_case`` "case programs" explain in control cells.

    The control cells (``x[is_control]``) are split in two at random (seeded by ``seed``). A
    baseline of ``k`` programs is fitted on one half (``stage1_null``) and stage 2 on the
    other half as if its cells were cases (``stage2_null``). The held-out half is left out of
    that baseline on purpose: real case cells are new to the baseline, and a baseline that
    has seen the null cells fits them better, which makes the null gain too small (on the
    quick demo 0.0059 instead of 0.0064 with K_case=3). The run's own baseline (all
    controls) is not changed.

    Returns
    -------
    dict
        ``null_explained_variance_gain`` (compare with ``explained_variance_gain``),
        ``null_relative_error``, ``null_baseline_only_relative_error``, ``null_n_cells``,
        ``null_baseline_n_cells``, ``null_time_s``; or ``null_skipped`` with the reason
        when a half has too few cells for K (or K_case) programs.
    """
    start = time.perf_counter()
    controls = np.flatnonzero(is_control)
    order = np.random.default_rng(seed).permutation(len(controls))
    fit_half = np.sort(controls[order[: len(controls) // 2]])
    null_half = np.sort(controls[order[len(controls) // 2:]])
    for count, what, cells in ((k, "K", len(fit_half)), (k_case, "K_case", len(null_half))):
        if count >= min(cells, x.shape[1]):
            reason = f"{what}={count} needs more than {cells} cells in each half of the {len(controls)} control cells"
            log.warning("stage 2 null skipped: %s", reason)
            return {"null_skipped": reason}
    log.info("stage 2 null: baseline on %d control cells, stage 2 on the other %d", len(fit_half), len(null_half))
    base = fit_stage1(x[fit_half], k, model, plan, seed=seed, graph=graph, name="stage1_null")
    null = fit_stage2(x[null_half], base.programs, base.names, k_case, model, plan, seed=seed, graph=graph,
                      name="stage2_null")
    stats = {
        "null_explained_variance_gain": null.stats["explained_variance_gain"],
        "null_relative_error": null.stats["relative_error"],
        "null_baseline_only_relative_error": null.stats["baseline_only_relative_error"],
        "null_n_cells": len(null_half),
        "null_baseline_n_cells": len(fit_half),
        "null_time_s": time.perf_counter() - start,
    }
    log.info("stage 2 null: %d case programs explain %.4f of the variance of held-out control cells", k_case,
             stats["null_explained_variance_gain"])
    return stats
