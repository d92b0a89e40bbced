"""From a composed config to fitted stages and files: the one code path shared by
``train.py`` and the Python API (:mod:`deltanmf.api`).

``run`` reads the data, fits stage 1 on the controls (or reuses a finished stage 1 with
``stage1_from``), fits stage 2 on the cases when ``stage=twostage``, computes the
case-control tables, and writes every output into the run directory.
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import lightning as L
import numpy as np
import pandas as pd
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from .data import CellDataModule, InputError, PreparedData, demo_path, prepare, read_h5ad, simulation_truth
from .nmf import CellMatrix, GeneGraph, consensus_init, matched_cosine, orthogonality_penalty, refit_usage
from .nmf.metrics import cosine_matrix, fit_error, matching, normalize_programs
from .report import casecontrol, plots
from .report.outputs import results_anndata, standard_files, write_outputs
from .resources import strip_version
from .stages import ConvergenceStop, NonFiniteLossError, ProgressBar, Stage1Module, Stage2Module
from .sweeps import register_resolvers

register_resolvers()  # before Hydra resolves hydra.sweep.subdir

log = logging.getLogger(__name__)
STAGES = ("onestage", "twostage")


@dataclass
class StageFit:
    """A trained stage: programs (genes x K), usage of its cells (cells x K) and facts about the fit."""

    programs: np.ndarray
    usage: np.ndarray
    names: list[str]
    stats: dict = field(default_factory=dict)


@dataclass
class RunResult:
    """Everything a run produced: the results AnnData, the tables and the metrics."""

    results: ad.AnnData
    tables: dict[str, pd.DataFrame]
    metrics: dict


# -- data ------------------------------------------------------------------------------
def load_data(data_cfg: DictConfig) -> ad.AnnData:
    """The input AnnData: the file ``data.path``, or the cached demo (``data=demo``)."""
    demo = data_cfg.get("source") == "demo"
    if data_cfg.get("path"):
        if demo:
            raise InputError(f"data.path={data_cfg.path} was given with the demo's data settings; add data=h5ad "
                             "to read your own file (python train.py data=h5ad data.path=...)")
        return read_h5ad(data_cfg.path)
    if not demo:
        raise InputError("data.path is not set: give your file with data.path=my.h5ad (or use data=demo)")
    sim = OmegaConf.to_container(data_cfg.simulation, resolve=True)
    try:
        path = demo_path(sim, data_cfg.get("cache_dir"))
    except (TypeError, ValueError) as err:
        raise InputError(f"data.simulation: {err}") from err
    return read_h5ad(path)


def gene_ids(adata: ad.AnnData, data_cfg: DictConfig) -> list[str]:
    """The IDs genes are matched by: ``data.gene_id_column`` or ``.var_names``, Ensembl versions stripped."""
    column = data_cfg.get("gene_id_column")
    if column:
        if column not in adata.var:
            raise InputError(f"data.gene_id_column={column!r} is not a column of .var; columns: {list(adata.var.columns)}")
        return [strip_version(g) for g in adata.var[column].astype(str)]
    return [strip_version(g) for g in adata.var_names.astype(str)]


def instantiate_input(node, **kwargs):
    """``hydra.utils.instantiate``, letting an :class:`InputError` from the target through unwrapped."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, InputError):
            raise err.__cause__ from None
        raise


def prepare_data(adata: ad.AnnData, data_cfg: DictConfig, use_case: bool, resource=None,
                 baseline: "Baseline | None" = None) -> PreparedData:
    return prepare(
        adata,
        condition_key=data_cfg.condition_key,
        control=data_cfg.control,
        case=data_cfg.get("case"),
        layer=data_cfg.get("layer"),
        min_cells=data_cfg.min_cells,
        remove_genes=list(data_cfg.get("remove_genes") or []),
        normalize=data_cfg.normalize,
        target_sum=data_cfg.get("target_sum"),
        scale_genes=data_cfg.scale_genes,
        use_case=use_case,
        resource_genes=None if resource is None or baseline is not None else resource.gene_list(),
        gene_ids=gene_ids(adata, data_cfg),
        genes=None if baseline is None else baseline.genes,
        gene_scale=None if baseline is None else baseline.gene_scale,
    )


# -- a finished stage 1 ------------------------------------------------------------------
@dataclass
class Baseline:
    """The baseline programs of a finished stage 1, as read back by :func:`load_stage1`."""

    programs: np.ndarray
    names: list[str]
    genes: list[str]
    gene_scale: np.ndarray
    usage: pd.DataFrame
    stats: dict
    source: str


def load_stage1(path: str | Path) -> Baseline:
    """Read a finished stage 1 from its run directory or its ``results.h5ad``."""
    path = Path(path).expanduser()
    file = path / "results.h5ad" if path.is_dir() else path
    if not file.exists():
        raise InputError(f"stage1_from: no results.h5ad at {file}; give a finished run directory or its results.h5ad")
    result = ad.read_h5ad(file)
    info = result.uns.get("deltanmf")
    if info is None or "deltanmf_programs" not in result.varm:
        raise InputError(f"stage1_from: {file} is not a DeltaNMF result (no .uns['deltanmf'] / .varm['deltanmf_programs'])")
    kind = np.asarray(info["program_kind"]).astype(str)
    base = kind == "baseline"
    names = list(np.asarray(info["program_names"]).astype(str)[base])
    usage = pd.DataFrame(np.asarray(result.obsm["X_deltanmf"])[:, base], index=result.obs_names, columns=names)
    scale_key = "deltanmf_gene_scale"
    scale = result.var[scale_key].to_numpy() if scale_key in result.var else np.ones(result.n_vars)
    return Baseline(programs=np.asarray(result.varm["deltanmf_programs"])[:, base].astype(np.float32),
                    names=names, genes=list(result.var_names), gene_scale=scale, usage=usage,
                    stats=dict(info.get("stage1", {})), source=str(file))


# -- training ----------------------------------------------------------------------------
def _trainer(cfg: DictConfig, run_dir: Path, version: str) -> L.Trainer:
    logger = False
    if cfg.get("logger"):
        logger = instantiate(cfg.logger, save_dir=str(run_dir), version=version)
    callbacks = [ConvergenceStop(**cfg.model.stop)]
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(ProgressBar())
    return instantiate(cfg.trainer, logger=logger, callbacks=callbacks, default_root_dir=str(run_dir))


def _save_checkpoint(trainer: L.Trainer, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    trainer.save_checkpoint(tmp, weights_only=False)  # full state, so a run can be resumed
    tmp.replace(path)


def _train(module, datamodule, trainer: L.Trainer, run_dir: Path, name: str) -> float:
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    elapsed = time.perf_counter() - start
    _save_checkpoint(trainer, run_dir / "checkpoints" / f"{name}.ckpt")
    return elapsed


def _datamodule(x, cfg: DictConfig) -> CellDataModule:
    return CellDataModule(x, batch_size=cfg.data.get("batch_size"), num_workers=cfg.data.get("num_workers", 0),
                          seed=cfg.seed, steps_per_epoch=cfg.model.stop.check_every)


def _loss_summary(module, recon: float, programs: torch.Tensor) -> dict:
    """Final loss terms over all of the stage's cells (not one batch)."""
    loss = {"recon": recon}
    total = recon
    if module.graph is not None:
        loss["laplacian"] = float(module.graph.trace(programs.to(module.graph.degree.device)) / programs.numel())
        total += float(module.alpha) * loss["laplacian"] if module.prior_on else 0.0
    loss["total"] = total
    return loss


def _fit_stats(name: str, module, trainer: L.Trainer, matrix: CellMatrix, error: dict, loss: dict,
               init_time: float, train_time: float, **extra) -> dict:
    """The facts both stages report (metrics.json, .uns), logged in one line."""
    stats = {
        "loss": loss,
        "relative_error": error["relative_error"],
        **extra,
        "steps": int(trainer.global_step),
        "converged": bool(module.converged),
        "laplacian_alpha": float(module.alpha),
        "init_time_s": init_time,
        "train_time_s": train_time,
        "n_cells": matrix.n_cells,
        "device": str(trainer.strategy.root_device),
    }
    log.info("%s: %d steps (%s), relative error %.4f", name, stats["steps"],
             "converged" if stats["converged"] else "step cap", stats["relative_error"])
    return stats


def fit_stage1(x_control, cfg: DictConfig, run_dir: Path, graph: GeneGraph | None = None) -> StageFit:
    """Consensus initialisation, then the neural NMF of the control cells (stage 1)."""
    datamodule = _datamodule(x_control, cfg)
    trainer = _trainer(cfg, run_dir, "stage1")
    device = trainer.strategy.root_device
    matrix = CellMatrix(x_control, batch_size=cfg.data.get("batch_size"), device=device)

    start = time.perf_counter()
    init = consensus_init(matrix, cfg.K, seed=cfg.seed, **cfg.model.consensus)
    init_time = time.perf_counter() - start
    log.info("stage 1: consensus initialisation of K=%d programs in %.1fs (stability %.3f)",
             cfg.K, init_time, init.stability)
    module: Stage1Module = instantiate(cfg.model.stage1)(
        programs=init.programs, usage=init.usage, graph=graph, minibatch=not datamodule.full_batch)
    train_time = _train(module, datamodule, trainer, run_dir, "stage1")

    programs, usage = normalize_programs(module.programs().cpu(), module.usage().cpu())
    error = fit_error(matrix, programs, usage)
    stats = _fit_stats("stage 1", module, trainer, matrix, error, _loss_summary(module, error["recon"], programs),
                       init_time, train_time, consensus_stability=init.stability)
    return StageFit(programs.numpy(), usage.numpy(), [f"baseline_{i + 1}" for i in range(cfg.K)], stats)


def fit_stage2(x_case, baseline: np.ndarray, baseline_names: list[str], cfg: DictConfig, run_dir: Path,
               graph: GeneGraph | None = None) -> StageFit:
    """Case-specific programs on the case cells with the baseline frozen (stage 2).

    The returned programs are ``[baseline, case]``; the baseline columns are exactly the
    given array, and only the case columns are rescaled to sum to 1.
    """
    datamodule = _datamodule(x_case, cfg)
    trainer = _trainer(cfg, run_dir, "stage2")
    device = trainer.strategy.root_device
    matrix = CellMatrix(x_case, batch_size=cfg.data.get("batch_size"), device=device)
    k = baseline.shape[1]
    frozen = torch.from_numpy(np.ascontiguousarray(baseline, dtype=np.float32))

    start = time.perf_counter()
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # stage 2 alone reproduces (stage1_from)
    module: Stage2Module = instantiate(cfg.model.stage2)(
        matrix=matrix, baseline=frozen, k_case=cfg.K_case, seed=cfg.seed,
        consensus=OmegaConf.to_container(cfg.model.consensus), graph=graph, minibatch=not datamodule.full_batch)
    init_time = time.perf_counter() - start
    log.info("stage 2: initialised K_case=%d case programs in %.1fs", cfg.K_case, init_time)
    train_time = _train(module, datamodule, trainer, run_dir, "stage2")

    programs, usage = module.programs().cpu(), module.usage().cpu()
    case, case_usage = normalize_programs(programs[:, k:], usage[:, k:])
    programs = torch.cat([frozen, case], dim=1)
    usage = torch.cat([usage[:, :k], case_usage], dim=1)
    error = fit_error(matrix, programs, usage)
    baseline_only = fit_error(matrix, frozen, refit_usage(matrix, frozen).cpu())
    loss = _loss_summary(module, error["recon"], case)
    if module.rel_gamma > 0:
        loss["ortho"] = float(orthogonality_penalty(frozen, case))
        loss["total"] += float(module.gamma) * loss["ortho"]
    stats = _fit_stats("stage 2", module, trainer, matrix, error, loss, init_time, train_time,
                       baseline_only_relative_error=baseline_only["relative_error"],
                       explained_variance_gain=baseline_only["relative_error"] ** 2 - error["relative_error"] ** 2,
                       ortho_gamma=float(module.gamma) if module.rel_gamma > 0 else 0.0)
    log.info("stage 2: the baseline alone leaves relative error %.4f", stats["baseline_only_relative_error"])
    names = list(baseline_names) + [f"case_{i + 1}" for i in range(cfg.K_case)]
    return StageFit(programs.numpy(), usage.numpy(), names, stats)


# -- evaluation against a planted truth ------------------------------------------------
def recovery(prepared: PreparedData, programs: np.ndarray, n_baseline: int,
             shift: pd.DataFrame | None = None, case_table: pd.DataFrame | None = None) -> dict | None:
    """How well a fit found what the simulator planted (None for real data).

    Fitted programs are mapped back to expression units (times each gene's scale) and
    matched one-to-one with the planted ones on the kept genes. With stage 2, also: the
    planted case programs, and whether each planted usage shift was called in its
    direction (through the matching) and no other shift was called.
    """
    truth = simulation_truth(prepared.source)
    if truth is None:
        return None
    unscaled = programs * prepared.gene_scale[:, None]
    base = unscaled[:, :n_baseline]
    cos = matched_cosine(base, truth.programs)
    out = {"baseline_matched_cosine": cos.tolist(), "baseline_mean": float(cos.mean()),
           "baseline_min": float(cos.min())}
    if unscaled.shape[1] > n_baseline and truth.case_programs.shape[1]:
        case_cos = matched_cosine(unscaled[:, n_baseline:], truth.case_programs)
        out.update(case_matched_cosine=case_cos.tolist(), case_mean=float(case_cos.mean()),
                   case_min=float(case_cos.min()))
        if case_table is not None:
            match = matching(unscaled[:, n_baseline:], truth.case_programs)
            emergent = case_table["emergent"].to_numpy()
            out["planted_case_programs_emergent"] = [bool(emergent[m]) if m >= 0 else False for m in match]
    if shift is not None:
        match = matching(base, truth.programs)
        called = shift["shift"].to_numpy()
        expected = {1: "up", -1: "down", 0: "none"}
        rows = [{"planted": i + 1, "fitted": f"baseline_{m + 1}", "planted_shift": expected[int(s)],
                 "called_shift": called[m]} for i, (m, s) in enumerate(zip(match, truth.shifted))]
        out["shifts"] = rows
        out["shifts_called_correctly"] = sum(r["planted_shift"] == r["called_shift"] for r in rows if r["planted_shift"] != "none")
        out["shifts_planted"] = sum(r["planted_shift"] != "none" for r in rows)
        out["shifts_false"] = sum(r["called_shift"] != "none" and r["planted_shift"] != r["called_shift"] for r in rows)
    return out


# -- the run ---------------------------------------------------------------------------
def config_yaml(cfg: DictConfig) -> str:
    """The resolved run configuration as YAML (without Hydra's own settings)."""
    return OmegaConf.to_yaml({k: cfg[k] for k in cfg if k != "hydra"}, resolve=True)


def validate(cfg: DictConfig, prepared: PreparedData, twostage: bool) -> None:
    """Checks that would otherwise fail only after training: run before any fit."""
    if cfg.K < 1:
        raise InputError(f"K={cfg.K}: the number of baseline programs must be at least 1")
    if twostage and cfg.K_case < 1:
        raise InputError(f"K_case={cfg.K_case}: stage=twostage needs at least 1 case program "
                         "(use stage=onestage for baseline programs only)")
    n_control, n_case = int(prepared.is_control.sum()), int((~prepared.is_control).sum())
    for k, what, cells in ((cfg.K, "K", n_control), (cfg.K_case if twostage else 0, "K_case", n_case)):
        if k and k >= min(cells, prepared.n_genes):
            kind = "control" if what == "K" else "case"
            raise InputError(f"{what}={k} must be smaller than both the number of {kind} cells ({cells}) "
                             f"and of genes ({prepared.n_genes})")
    for key, frame, where in (("group_key", prepared.obs, ".obs"), ("symbol_key", prepared.var, ".var")):
        column = cfg.data.get(key)
        if column and column not in frame:
            raise InputError(f"data.{key}={column!r} is not a column of {where}; columns: {list(frame.columns)} "
                             f"(data.{key}=null to leave it out)")
    report = cfg.get("report")
    if twostage and report is not None:
        if not 0 < report.q_threshold <= 1 or not 0 <= report.share_threshold <= 1:
            raise InputError("report.q_threshold must be in (0, 1] and report.share_threshold in [0, 1]")


def _baseline_from(cfg: DictConfig) -> Baseline | None:
    source = cfg.get("stage1_from")
    if not source:
        return None
    baseline = load_stage1(source)
    if len(baseline.names) != cfg.K:
        log.info("stage1_from: using its %d baseline programs (the configured K=%d does not apply)",
                 len(baseline.names), cfg.K)
    if cfg.data.get("remove_genes"):
        log.warning("stage1_from: data.remove_genes is not applied; stage 2 uses exactly the genes of %s",
                    baseline.source)
    return baseline


def _control_usage_from(baseline: Baseline, prepared: PreparedData) -> np.ndarray:
    cells = prepared.obs.index[prepared.is_control]
    missing = cells.difference(baseline.usage.index)
    if len(missing):
        raise InputError(f"stage1_from: {len(missing)} control cells of this dataset are not in {baseline.source} "
                         f"(e.g. {list(missing[:3])}); use the same data and data.control as that run")
    return baseline.usage.loc[cells].to_numpy(dtype=np.float32)


def run(cfg: DictConfig, run_dir: str | Path, adata: ad.AnnData | None = None) -> RunResult:
    """Run the configured stages and write every output into ``run_dir``.

    ``adata`` replaces reading ``data.path`` (the Python API passes its AnnData).
    """
    run_dir = Path(run_dir)
    start = time.perf_counter()
    stage = cfg.stage.name
    if stage not in STAGES:
        raise InputError(f"stage={stage!r} is not one of {STAGES}")
    twostage = stage == "twostage"
    if (run_dir / "results.h5ad").exists() and not cfg.get("overwrite", False):
        raise InputError(f"{run_dir} already holds the results of a run; choose another directory "
                         "(hydra.run.dir=...) or replace them with overwrite=true")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    baseline = _baseline_from(cfg)
    resource = instantiate_input(cfg.resource) if cfg.get("resource") else None
    if adata is None:
        adata = load_data(cfg.data)
    coverage = None
    if resource is not None:
        ids = gene_ids(adata, cfg.data)
        if hasattr(resource, "bind"):  # resources read from the data itself (resource=demo)
            resource.bind(adata, ids)
        coverage = resource.coverage(ids)
    prepared = prepare_data(adata, cfg.data, use_case=twostage, resource=resource, baseline=baseline)
    if baseline is not None:  # the reused baseline fixes K; the saved config then says so
        cfg.K = len(baseline.names)
    validate(cfg, prepared, twostage)
    log.info("cells: %d control, %d case%s; genes: %d", int(prepared.is_control.sum()),
             int((~prepared.is_control).sum()), "" if twostage else " (not used by stage=onestage)",
             prepared.n_genes)
    graph = None if resource is None else resource.graph(list(prepared.gene_ids))

    metrics: dict = {"stage": stage, "K": cfg.K, "gene_counts": prepared.gene_counts, "n_genes": prepared.n_genes}
    if coverage is not None:
        metrics["resource"] = coverage
    if baseline is None:
        stage1 = fit_stage1(prepared.control, cfg, run_dir, graph)
        metrics["stage1"] = stage1.stats
    else:
        stage1 = StageFit(baseline.programs, _control_usage_from(baseline, prepared), baseline.names,
                          {**baseline.stats, "from": baseline.source})
        metrics["stage1"] = stage1.stats
        log.info("stage 1: reusing %d baseline programs from %s", len(baseline.names), baseline.source)

    tables: dict[str, pd.DataFrame] = {}
    n_base = stage1.programs.shape[1]
    if twostage:
        stage2 = fit_stage2(prepared.case, stage1.programs, stage1.names, cfg, run_dir, graph)
        metrics["stage2"] = stage2.stats
        metrics["K_case"] = cfg.K_case
        programs, names = stage2.programs, stage2.names
        control_usage = np.hstack([stage1.usage, np.zeros((stage1.usage.shape[0], cfg.K_case), np.float32)])
        usage = np.vstack([control_usage, stage2.usage])
        tables, refit = case_control_tables(prepared, programs, names, n_base, cfg,
                                            torch.device(stage2.stats["device"]))
    else:
        programs, names, usage, refit = stage1.programs, stage1.names, stage1.usage, None

    found = recovery(prepared, programs, n_base, tables.get("usage_shift"), tables.get("case_programs"))
    if found is not None:
        metrics["recovery"] = found

    var = prepared.var.copy()
    var["deltanmf_gene_scale"] = prepared.gene_scale
    kinds = ["baseline"] * n_base + ["case"] * (len(names) - n_base)
    uns = {
        "config": config_yaml(cfg),
        "gene_counts": prepared.gene_counts,
        "loss": {s: metrics[s]["loss"] for s in ("stage1", "stage2") if s in metrics and "loss" in metrics[s]},
        "stage1": {k: v for k, v in stage1.stats.items() if k != "loss"},
        "gene_scale_key": "deltanmf_gene_scale",
    }
    if coverage is not None:
        uns["resource"] = coverage
    if twostage:
        uns["stage2"] = {k: v for k, v in metrics["stage2"].items() if k != "loss"}
    result = results_anndata(prepared.obs, var, programs, usage, names, kinds, uns)
    if twostage:
        result.obs["deltanmf_novelty"] = casecontrol.novelty(usage, n_base)
        result.obsm["X_deltanmf_refit"] = refit.astype(np.float32)
    metrics["wall_time_s"] = time.perf_counter() - start

    symbol_key = cfg.data.get("symbol_key")
    files = standard_files(result, metrics, symbol_key)
    files.update(_table_files(tables))
    files.update(_plot_files(result, tables, n_base, symbol_key))
    write_outputs(run_dir, files)
    if twostage:
        shift = tables["usage_shift"]["shift"]
        log.info("summary: %d of %d baseline programs shift usage (%d up, %d down); %d of %d case programs "
                 "emergent (q < %g)", int((shift != "none").sum()), len(shift), int((shift == "up").sum()),
                 int((shift == "down").sum()), int(tables["case_programs"]["emergent"].sum()),
                 len(tables["case_programs"]), cfg.report.q_threshold)
    log.info("results written to %s", run_dir)
    return RunResult(result, tables, metrics)


def case_control_tables(prepared: PreparedData, programs: np.ndarray, names: list[str], n_base: int,
                        cfg: DictConfig, device: torch.device) -> tuple[dict[str, pd.DataFrame], np.ndarray]:
    """usage_shift, case_programs and (with data.group_key) group_usage, from usage refitted by
    NNLS on all programs for every cell (on ``device``), so controls and cases are measured
    the same way."""
    report = cfg.report
    matrix = CellMatrix(prepared.X, batch_size=cfg.data.get("batch_size"), device=device)
    refit = refit_usage(matrix, torch.from_numpy(programs)).cpu().numpy()
    ctrl, case = refit[prepared.is_control], refit[~prepared.is_control]
    symbols = None
    if cfg.data.get("symbol_key") and cfg.data.symbol_key in prepared.var:
        symbols = prepared.var[cfg.data.symbol_key].to_numpy()
    tables = {
        "usage_shift": casecontrol.usage_shift_table(ctrl, case, names, n_base, report.q_threshold,
                                                     report.min_log2fc),
        "case_programs": casecontrol.case_program_table(ctrl, case, names, n_base, programs, prepared.var.index,
                                                        symbols, report.share_threshold, report.q_threshold,
                                                        report.emergence_log2fc),
    }
    group_key = cfg.data.get("group_key")
    if group_key:
        if group_key not in prepared.obs:
            raise InputError(f"data.group_key={group_key!r} is not a column of .obs; columns: {list(prepared.obs.columns)}")
        tables["group_usage"] = casecontrol.group_usage_table(refit, prepared.obs[group_key].to_numpy(),
                                                              prepared.is_control, names, n_base,
                                                              report.q_threshold, report.min_log2fc,
                                                              report.emergence_log2fc)
    return tables, refit


def _table_files(tables: dict[str, pd.DataFrame]) -> dict:
    return {f"{name}.csv": (lambda path, t=table: t.to_csv(path, index=False)) for name, table in tables.items()}


def _plot_files(result: ad.AnnData, tables: dict, n_base: int, symbol_key: str | None) -> dict:
    names = list(result.uns["deltanmf"]["program_names"])
    programs = np.asarray(result.varm["deltanmf_programs"])
    labels = result.var[symbol_key] if symbol_key and symbol_key in result.var else result.var_names
    files = {"top_genes.png": lambda p: plots.top_genes_plot(p, programs, names, labels)}
    if "usage_shift" in tables:
        files["usage_share.png"] = lambda p: plots.usage_share_plot(p, tables["usage_shift"], tables["case_programs"])
        cos = cosine_matrix(programs[:, :n_base], programs[:, n_base:])
        files["program_similarity.png"] = lambda p: plots.similarity_plot(p, cos, names[:n_base], names[n_base:])
    if tables.get("group_usage") is not None and len(tables["group_usage"]):
        files["group_usage.png"] = lambda p: plots.group_usage_plot(p, tables["group_usage"])
    return files


def main(cfg: DictConfig) -> float:
    """Entry point of ``train.py``: run into Hydra's output directory; bad input exits with one message.

    Returns the final relative reconstruction error (of stage 2 when it ran), the value a
    Hydra sweeper would minimise.
    """
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        result = run(cfg, run_dir)
    except (InputError, NonFiniteLossError) as err:
        log.error("%s", err)
        print(f"deltanmf: error: {err}", file=sys.stderr)
        raise SystemExit(2 if isinstance(err, InputError) else 3) from None
    last = result.metrics.get("stage2", result.metrics["stage1"])
    return float(last.get("relative_error", float("nan")))
