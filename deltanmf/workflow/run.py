"""One run, from typed settings to written files: the path shared by ``train.py`` and the
Python API.

:func:`run` checks what it can before any work, reads and prepares the data, fits stage 1 on
the controls (or reuses a finished one, ``stage1_from``), fits stage 2 on the cases
(``stage=twostage``), computes the case-control tables and writes every output into the run
directory.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import anndata as ad
import lightning as L
import numpy as np
import pandas as pd
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import OmegaConf

from ..core import CellMatrix, refit_and_score
from ..data import Baseline, PreparedData, load_input, load_stage1, prepare
from ..data.blocks import looks_like_counts, matrix_genes
from ..data.programs import is_run, results_file
from ..data.reference import ReferencePrograms, coverage, in_run_units, read_programs
from ..errors import InputError
from ..resources import strip_version
from ..settings import RunSettings
from ..tl import casecontrol
from ..tl.tables import case_control_tables, program_annotation
from ..tl.fit import StageFit, fit_null, fit_replicates
from ..tl.programs import expression_programs, specificity
from ..tl.recovery import recovery
from ..tl.samples import check_samples
from ..tl.strength import resolved
from ..train import TrainingPlan, check_trainer
from ..train.trainer import stage_device
from .outputs import GENE_SCALE_KEY, output_files, results_anndata, write_outputs
from .resume import check_resumable, resume_source, settings_record
from .rundir import RunLock, check_run_dir, clear_for_overwrite
from .sweeps import hparams_record

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """Everything a run produced: the results AnnData, the tables and the metrics."""

    results: ad.AnnData
    tables: dict[str, pd.DataFrame]
    metrics: dict


def instantiate_input(node: dict, **kwargs):
    """``hydra.utils.instantiate`` of a ``_target_`` mapping (a resource, a logger); an
    :class:`InputError` from the target comes through unwrapped."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, InputError):
            raise err.__cause__ from None
        raise


def gene_ids(adata, settings: RunSettings) -> list[str]:
    """The IDs genes are matched by: ``data.gene_id_column`` or the gene names (of ``.var``, or of
    ``.raw.var`` with ``data.use_raw``), Ensembl versions stripped."""
    var = matrix_genes(adata, settings.data)
    column = settings.data.gene_id_column
    if column:
        if column not in var:
            raise InputError(f"data.gene_id_column={column!r} is not a column of .var; columns: {list(var.columns)}")
        return [strip_version(g) for g in var[column].astype(str)]
    return [strip_version(g) for g in var.index.astype(str)]


def training_plan(settings: RunSettings, run_dir: Path) -> TrainingPlan:
    """How the stages are trained, from the settings (the Trainer, logger, checkpoints, loader)."""
    logger_node = settings.logger

    def logger(version: str):
        return instantiate_input(logger_node, save_dir=str(run_dir), version=version)

    return TrainingPlan(trainer=settings.trainer, stop=settings.model.stop, checkpoint=settings.checkpoint,
                        batch_size=settings.data.batch_size, num_workers=settings.data.num_workers,
                        transposed_copy=settings.data.transposed_copy, max_cells=settings.model.consensus.max_cells,
                        run_dir=run_dir, logger=None if logger_node is None else logger,
                        resume=resume_source(settings, run_dir), settings_record=settings_record(settings))


def _check_k(settings: RunSettings, k: int, source: str, given: frozenset[str]) -> None:
    """A K given on the command line must agree with the programs ``stage1_from`` brings."""
    if "K" in given and settings.K != k:
        raise InputError(f"K={settings.K} was given, but stage1_from={source} holds {k} baseline programs; "
                         f"leave K out (the programs set it) or give K={k}")
    if settings.K != k:
        log.info("stage1_from: using its %d baseline programs (the configured K=%d does not apply)", k, settings.K)


def _baseline_from(settings: RunSettings, given: frozenset[str] = frozenset()
                   ) -> Baseline | ReferencePrograms | None:
    """What ``stage1_from`` names: a finished run's baseline (:class:`Baseline`) or reference
    programs read from a file (:class:`~deltanmf.data.reference.ReferencePrograms`)."""
    if not settings.stage1_from:
        return None
    if settings.stage1_varm_key is not None or not is_run(settings.stage1_from):
        reference = read_programs(results_file(settings.stage1_from), settings.stage1_varm_key,
                                  settings.stage1_units)
        _check_k(settings, reference.k, settings.stage1_from, given)
        return reference
    baseline = load_stage1(settings.stage1_from)
    _check_k(settings, len(baseline.names), settings.stage1_from, given)
    ignored = [f"data.{key}" for key in ("remove_genes", "gene_mask_key", "n_top_genes")
               if getattr(settings.data, key)]
    if ignored:
        log.warning("stage1_from: %s not applied; stage 2 uses exactly the genes of %s", ", ".join(ignored),
                    baseline.source)
    if settings.twostage and not baseline.twostage:
        log.warning("stage1_from: %s is a one-stage run, whose gene scale comes from control cells only; "
                    "genes that controls barely express then get extreme values in case cells, and stage 2's "
                    "gains come out inflated (on the quick demo the baseline left relative error 0.99 on the "
                    "case cells). Reuse a stage=twostage run instead.", baseline.source)
    return baseline


def _control_usage_from(baseline: Baseline, prepared: PreparedData) -> np.ndarray:
    cells = prepared.obs.index[prepared.is_control]
    missing = cells.difference(baseline.usage.index)
    if len(missing):
        raise InputError(f"stage1_from: {len(missing)} control cells of this dataset are not in {baseline.source} "
                         f"(e.g. {list(missing[:3])}); use the same data and data.control as that run")
    return baseline.usage.loc[cells].to_numpy(dtype=np.float32)


def validate(settings: RunSettings, prepared: PreparedData, k: int) -> None:
    """Checks that need the prepared data, run before any fit."""
    n_control, n_case = int(prepared.is_control.sum()), int((~prepared.is_control).sum())
    for count, what, cells in ((k, "K", n_control), (settings.K_case if settings.twostage else 0, "K_case", n_case)):
        if count and count >= min(cells, prepared.n_genes):
            kind = "control" if what == "K" else "case"
            raise InputError(f"{what}={count} must be smaller than both the number of {kind} cells ({cells}) "
                             f"and of genes ({prepared.n_genes})")
    for key, frame, where in (("data.group_key", prepared.obs, ".obs"), ("data.symbol_key", prepared.var, ".var"),
                              ("data.celltype_key", prepared.obs, ".obs"), ("report.annotate_key", prepared.obs, ".obs")):
        group, name = key.split(".")
        column = getattr(getattr(settings, group), name)
        if column and column not in frame:
            raise InputError(f"{key}={column!r} is not a column of {where}; columns: {list(frame.columns)} "
                             f"({key}=null to leave it out)")
    data = settings.data
    if settings.twostage and (data.sample_key or data.pair_key):  # the case-control tables' design
        check_samples(prepared.obs, prepared.is_control, data.sample_key, settings.report.covariates,
                      settings.report.min_cells_per_sample, data.group_key, data.pair_key)


def _reference_stage1(reference: ReferencePrograms, prepared: PreparedData, report: dict, settings: RunSettings,
                      plan: TrainingPlan) -> StageFit:
    """Stage 1 from reference programs: frozen, in this run's units, with the controls' usage by NNLS."""
    programs = in_run_units(reference, prepared.gene_ids, prepared.gene_scale)
    matrix = CellMatrix(prepared.control, batch_size=settings.data.batch_size, device=stage_device(plan))
    usage, error, _ = refit_and_score(matrix, torch.from_numpy(programs), settings.model.consensus.nnls_iterations)
    report = {**report, "genes_used": prepared.n_genes}
    log.info("stage 1: %d reference programs from %s (%s units) on %d genes; relative error %.4f on the controls",
             reference.k, reference.source, reference.units, prepared.n_genes, error["relative_error"])
    return StageFit(programs, usage.numpy(), list(reference.names),
                    {"from": reference.source, "reference": report, "relative_error": error["relative_error"],
                     "n_cells": matrix.n_cells})


def run(settings: RunSettings, run_dir: str | Path, adata: ad.AnnData | None = None,
        on_checked: Callable[[], None] | None = None, progress: Callable[[str], None] | None = None,
        given: frozenset[str] = frozenset()) -> RunResult:
    """Run the configured stages and write every output into ``run_dir``.

    The directory is locked for the whole run (:class:`~deltanmf.workflow.rundir.RunLock`) by the
    first process; under DDP the others share it, and only the first checks and writes it.
    ``adata`` replaces reading ``data.path`` (the Python API passes its AnnData);
    ``on_checked`` is called once every check has passed, before any fit (the command line
    writes Hydra's record of the run then); ``progress(name)`` after each result file is
    written (before the set is committed); ``given`` names the settings the user gave (a
    ``K`` given must agree with ``stage1_from``'s programs).
    """
    run_dir = Path(run_dir)
    if rank_zero_only.rank != 0:  # DDP: a process the first one started, in the directory it holds
        return _run(settings, run_dir, adata, None, progress, given, leader=False)
    with RunLock(run_dir):
        return _run(settings, run_dir, adata, on_checked, progress, given, leader=True)


def _run(settings: RunSettings, run_dir: Path, adata, on_checked, progress, given: frozenset[str],
         leader: bool) -> RunResult:
    start = time.perf_counter()
    if leader:
        check_run_dir(settings, run_dir)
    baseline = _baseline_from(settings, given)
    if baseline is not None:  # a reused baseline fixes K; the recorded settings (and checkpoints) say so
        settings = replace(settings, K=len(baseline.names))
    plan = training_plan(settings, run_dir)  # a bad resume=/ckpt_path= fails here, before any fit
    check_trainer(plan)  # and a trainer setting Lightning refuses (trainer=gpu without a GPU)
    L.seed_everything(settings.seed, workers=True, verbose=False)
    reference = baseline if isinstance(baseline, ReferencePrograms) else None
    if reference is not None:
        baseline = None
    resource = instantiate_input(settings.resource) if settings.resource is not None else None
    clock = Clock()
    if adata is None:
        adata = load_input(settings.data)
    clock.mark("read")
    resource_coverage, reference_report = None, None
    if reference is not None:  # before any pass over the matrix: a file of the wrong IDs stops here
        reference_report = coverage_of(reference, adata, settings)
    if resource is not None:
        ids = gene_ids(adata, settings)
        if hasattr(resource, "bind"):  # resources read from the data itself (resource=demo)
            resource.bind(adata, ids)
        resource_coverage = resource.coverage(ids)
    prepared = prepare(adata, settings.data, use_case=settings.twostage,
                       resource_genes=None if resource is None or baseline is not None else resource.gene_list(),
                       gene_ids=gene_ids(adata, settings),
                       genes=None if baseline is None else baseline.genes,
                       gene_scale=None if baseline is None else baseline.gene_scale,
                       reference_genes=None if reference is None else reference.genes)
    input_counts = looks_like_counts(adata, settings.data)
    clock.mark("prepare")
    k = settings.K
    validate(settings, prepared, k)
    check_resumable(settings, plan.resume)
    if settings.overwrite and leader:
        clear_for_overwrite(run_dir)
    if on_checked is not None:
        on_checked()
    counts = prepared.cell_counts
    log.info("cells: %d control, %d case%s; left out: %d without a condition, %d of other conditions; genes: %d",
             counts["control"], counts["case"], "" if settings.twostage else " (stage=onestage fits controls only)",
             counts["unlabelled"], counts["other"], prepared.n_genes)
    graph = None if resource is None else resource.graph(list(prepared.gene_ids))
    model = settings.model

    metrics: dict = {"stage": settings.stage.name, "K": k, "cell_counts": prepared.cell_counts,
                     "gene_counts": prepared.gene_counts, "n_genes": prepared.n_genes}
    if resource_coverage is not None:
        metrics["resource"] = resource_coverage
    if reference is not None:
        stage1 = _reference_stage1(reference, prepared, reference_report, settings, plan)
        metrics["reference"] = stage1.stats["reference"]
    elif baseline is None:
        stage1 = fit_replicates(prepared.control, k, model, plan, seed=settings.seed, graph=graph)
    else:
        stage1 = StageFit(baseline.programs, _control_usage_from(baseline, prepared), baseline.names,
                          {**baseline.stats, "from": baseline.source})
        log.info("stage 1: reusing %d baseline programs from %s", len(baseline.names), baseline.source)
    metrics["stage1"] = stage1.stats
    clock.mark("stage1", stage1.stats)

    tables: dict[str, pd.DataFrame] = {}
    n_base = stage1.programs.shape[1]
    refit = None
    if settings.twostage:
        stage2 = fit_replicates(prepared.case, k, model, plan, seed=settings.seed, graph=graph, baseline=stage1,
                                k_case=settings.K_case)
        clock.mark("stage2", stage2.stats)
        if model.null_fit:
            chosen = {stage: fitted.stats["prior_selection"]["chosen"] for stage, fitted in
                      (("stage1", stage1), ("stage2", stage2)) if "prior_selection" in fitted.stats}
            stage2.stats.update(fit_null(prepared.X, prepared.is_control, k, settings.K_case,
                                         resolved(model, chosen), plan, seed=settings.seed, graph=graph))
            clock.mark("null_fit")
        metrics["stage2"] = stage2.stats
        metrics["K_case"] = settings.K_case
        programs, names = stage2.programs, stage2.names
        control_usage = np.hstack([stage1.usage, np.zeros((stage1.usage.shape[0], settings.K_case), np.float32)])
        usage = np.vstack([control_usage, stage2.usage])
        scores = specificity(prepared.X, usage)
        clock.mark("specificity")
        tables, refit, screen = case_control_tables(
            prepared, programs, names, n_base, settings.report, scores=scores, group_key=settings.data.group_key,
            symbol_key=settings.data.symbol_key, batch_size=settings.data.batch_size,
            nnls_iterations=model.consensus.nnls_iterations, device=torch.device(stage2.stats["device"]),
            sample_key=settings.data.sample_key, seed=settings.seed, pair_key=settings.data.pair_key,
            celltype_key=settings.data.celltype_key)
        clock.split(screen.pop("timings"))
        if "moderation" in screen:
            metrics["moderation"] = screen.pop("moderation")
        if screen:
            metrics["group_tests"] = screen
    else:
        programs, names, usage = stage1.programs, stage1.names, stage1.usage
        scores = specificity(prepared.X, usage)
        clock.mark("specificity")
        if settings.report.annotate_key:  # the controls' usage: what stage=onestage fits
            categories = prepared.obs[settings.report.annotate_key].to_numpy()[prepared.is_control]
            tables["program_annotation"] = program_annotation(usage, categories, names)
        if settings.data.celltype_key:
            log.warning("data.celltype_key=%s: per-cell-type contrasts compare conditions; stage=onestage fits the "
                        "controls only, so no celltype_shift.csv is written", settings.data.celltype_key)

    expression = expression_programs(programs, prepared.gene_scale)
    found = recovery(prepared, expression, n_base, tables.get("usage_shift"), tables.get("case_programs"))
    if found is not None:
        metrics["recovery"] = found

    var = prepared.var.copy()
    var[GENE_SCALE_KEY] = prepared.gene_scale
    kinds = ["baseline"] * n_base + ["case"] * (len(names) - n_base)
    uns = {
        "config": config_yaml(settings),
        "gene_counts": prepared.gene_counts,
        "cell_counts": prepared.cell_counts,
        "loss": {s: metrics[s]["loss"] for s in ("stage1", "stage2") if s in metrics and "loss" in metrics[s]},
        "stage1": {key: v for key, v in stage1.stats.items() if key != "loss"},
        "gene_scale_key": GENE_SCALE_KEY,
    }
    if resource_coverage is not None:
        uns["resource"] = resource_coverage
    if reference_report is not None:
        uns["reference"] = metrics["reference"]
    if prepared.target is not None:
        uns["normalize_target"] = prepared.target  # new cells are projected onto the same total
    uns["input_counts"] = input_counts  # deltanmf.project warns when new cells are not counts
    uns.update(tables)  # the case-control tables, for a notebook without the CSVs
    if settings.twostage:
        uns["stage2"] = {key: v for key, v in metrics["stage2"].items() if key != "loss"}
    result = results_anndata(prepared.obs, var, expression, usage, names, kinds, uns, scaled=programs,
                             specificity=scores)
    if settings.twostage:
        result.obs["deltanmf_novelty"] = casecontrol.novelty(usage, n_base)
        result.obsm["X_deltanmf_refit"] = refit.astype(np.float32)
    clock.mark("results")
    metrics["timings"] = clock.times
    metrics["wall_time_s"] = time.perf_counter() - start

    if not leader:  # DDP: the other processes trained alongside; the first one writes
        return RunResult(result, tables, metrics)
    files = output_files(result, tables, metrics, n_base, settings.data.symbol_key,
                         finish=lambda: _finish_timings(clock, metrics, start))
    written = write_outputs(run_dir, files, progress)
    log_hparams(settings, metrics, run_dir)
    if settings.twostage:
        log.info("summary: %s", summary_line(tables, settings.report.q_threshold))
    log.info("results written to %s", written)
    return RunResult(result, tables, metrics)


def summary_line(tables: dict[str, pd.DataFrame], q_threshold: float) -> str:
    """The run's answer in one line, with the caveat of an underpowered design."""
    shift, cases = tables["usage_shift"], tables["case_programs"]
    calls = shift["shift"]
    text = (f"{int((calls != 'none').sum())} of {len(calls)} baseline programs shift usage "
            f"({int((calls == 'up').sum())} up, {int((calls == 'down').sum())} down); "
            f"{int(cases['emergent'].sum())} of {len(cases)} case programs emergent "
            f"(q < {q_threshold:g}; tests across {shift['test_unit'].iloc[0]}s)")
    groups = tables.get("group_usage")
    if groups is not None and len(groups):
        called = groups.loc[groups["called"].astype(bool), "group"].nunique()
        text += f"; {called} of {groups['group'].nunique()} groups change a program (group_usage.csv)"
    weak = [what for what, table in (("baseline shifts (two-sided)", shift), ("case programs (one-sided)", cases))
            if table["underpowered"].astype(bool).any()]
    if weak:
        text += (f"; underpowered: {' and '.join(weak)} with {int(shift['n_control_samples'].iloc[0])} control and "
                 f"{int(shift['n_case_samples'].iloc[0])} case samples cannot support a call at q < {q_threshold:g} "
                 "(docs/statistics.md, 'Few samples')")
    return text


class Clock:
    """Seconds per phase of a run (``metrics.json``'s ``timings``): each :meth:`mark` books the
    time since the previous one; a stage's own record splits its time into start
    (``init_time_s``) and training (``train_time_s``), the rest being its final passes."""

    def __init__(self):
        self.times: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, phase: str, stage_stats: dict | None = None) -> None:
        now = time.perf_counter()
        elapsed, self._last = now - self._last, now
        if stage_stats is not None and "train_time_s" in stage_stats:
            init, train = stage_stats.get("init_time_s", 0.0), stage_stats["train_time_s"]
            self.times.update({f"{phase}_start": init, f"{phase}_training": train,
                               f"{phase}_rest": max(elapsed - init - train, 0.0)})
        else:
            self.times[phase] = elapsed

    def split(self, parts: dict[str, float]) -> None:
        """Book the time since the previous mark as ``parts`` measured inside it (the last
        part takes what they leave)."""
        now = time.perf_counter()
        elapsed, self._last = now - self._last, now
        self.times.update(parts)
        last = list(parts)[-1]
        self.times[last] += max(elapsed - sum(parts.values()), 0.0)


def _finish_timings(clock: Clock, metrics: dict, start: float) -> None:
    """Book the writing of the other files, just before metrics.json itself is written."""
    clock.mark("write")
    metrics["timings"] = clock.times
    metrics["wall_time_s"] = time.perf_counter() - start


def coverage_of(reference: ReferencePrograms, adata, settings: RunSettings) -> dict:
    """The reference's coverage of the data's genes (IDs as the run matches them); below
    ``stage1_min_coverage`` the run stops naming both ID conventions."""
    return coverage(reference, gene_ids(adata, settings), settings.stage1_min_coverage)


def config_yaml(settings: RunSettings) -> str:
    """The run's settings as YAML, as stored in ``results.h5ad``."""
    from dataclasses import asdict

    return OmegaConf.to_yaml(asdict(settings))


def log_hparams(settings: RunSettings, metrics: dict, run_dir: Path) -> None:
    """The run's hyperparameters and final metrics (:func:`~deltanmf.workflow.sweeps.hparams_record`)
    for TensorBoard's HParams tab, written through the configured logger as version ``hparams``
    (``<run>/tensorboard/hparams/``); nothing with ``logger=none``."""
    if settings.logger is None:
        return
    params, final = hparams_record(settings, metrics)
    logger = instantiate_input(settings.logger, save_dir=str(run_dir), version="hparams")
    logger.log_hyperparams(params, final)
    logger.finalize("success")


__all__ = ["RunResult", "run", "settings_record", "training_plan"]
