"""Stage 1 (and, later, stage 2) from a composed config to files: the one code path
shared by ``train.py`` and the Python API."""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from .data import CellDataModule, InputError, PreparedData, demo_path, prepare, read_h5ad, simulation_truth
from .nmf import CellMatrix, GeneGraph, consensus_init, matched_cosine
from .nmf.metrics import fit_error, normalize_programs
from .report import results_anndata, standard_files, write_outputs
from .stages import ConvergenceStop, Stage1Module

log = logging.getLogger(__name__)


@dataclass
class StageFit:
    """A trained stage: programs (genes x K, columns sum to 1), usage (cells x K) and facts."""

    programs: np.ndarray
    usage: np.ndarray
    names: list[str]
    stats: dict = field(default_factory=dict)


# -- data ------------------------------------------------------------------------------
def load_data(data_cfg: DictConfig) -> ad.AnnData:
    """The input AnnData: ``data.path``, or the cached demo when ``data.path`` is null."""
    if data_cfg.get("path"):
        return read_h5ad(data_cfg.path)
    if data_cfg.get("simulation") is None:
        raise InputError("data.path is not set: give your file with data.path=my.h5ad (or use data=demo)")
    sim = OmegaConf.to_container(data_cfg.simulation, resolve=True)
    try:
        path = demo_path(sim, data_cfg.get("cache_dir"))
    except (TypeError, ValueError) as err:
        raise InputError(f"data.simulation: {err}") from err
    return read_h5ad(path)


def prepare_data(adata: ad.AnnData, data_cfg: DictConfig, use_case: bool, resource=None) -> PreparedData:
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
        resource_genes=None if resource is None else resource.gene_list(),
    )


# -- training ----------------------------------------------------------------------------
def _trainer(cfg: DictConfig, run_dir: Path, version: str) -> L.Trainer:
    logger = False
    if cfg.get("logger"):
        logger = instantiate(cfg.logger, save_dir=str(run_dir), version=version)
    stop = ConvergenceStop(**cfg.model.stop)
    return instantiate(cfg.trainer, logger=logger, callbacks=[stop], default_root_dir=str(run_dir))


def _save_checkpoint(trainer: L.Trainer, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    trainer.save_checkpoint(tmp)
    tmp.replace(path)


def fit_stage1(x_control, cfg: DictConfig, run_dir: Path, graph: GeneGraph | None = None) -> StageFit:
    """Consensus initialisation, then the neural NMF of the control cells (stage 1)."""
    batch_size = cfg.data.get("batch_size")
    datamodule = CellDataModule(x_control, batch_size=batch_size, num_workers=cfg.data.get("num_workers", 0),
                                seed=cfg.seed, steps_per_epoch=cfg.model.stop.check_every)
    trainer = _trainer(cfg, run_dir, "stage1")
    device = trainer.strategy.root_device
    matrix = CellMatrix(x_control, batch_size=batch_size, device=device)
    if cfg.K >= min(matrix.n_cells, matrix.n_genes):
        raise InputError(f"K={cfg.K} must be smaller than both the number of control cells ({matrix.n_cells}) "
                         f"and of genes ({matrix.n_genes})")

    start = time.perf_counter()
    init = consensus_init(matrix, cfg.K, seed=cfg.seed, **cfg.model.consensus)
    init_time = time.perf_counter() - start
    log.info("stage 1: consensus initialisation of K=%d programs in %.1fs (stability %.3f)",
             cfg.K, init_time, init.stability)
    module: Stage1Module = instantiate(cfg.model.stage1)(
        programs=init.programs, usage=init.usage, graph=graph, minibatch=not datamodule.full_batch)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    train_time = time.perf_counter() - start
    _save_checkpoint(trainer, run_dir / "checkpoints" / "stage1.ckpt")

    programs, usage = normalize_programs(module.programs().cpu(), module.usage().cpu())
    error = fit_error(matrix, programs, usage)
    loss = {"recon": error["recon"]}
    if graph is not None:
        lap = float(module.graph.trace(programs.to(device)) / programs.numel())
        loss["laplacian"] = lap
        loss["total"] = error["recon"] + float(module.alpha) * lap if module.prior_on else error["recon"]
    else:
        loss["total"] = error["recon"]
    stats = {
        "loss": loss,
        "relative_error": error["relative_error"],
        "steps": int(trainer.global_step),
        "converged": bool(module.converged),
        "laplacian_alpha": float(module.alpha),
        "consensus_stability": init.stability,
        "init_time_s": init_time,
        "train_time_s": train_time,
        "n_cells": matrix.n_cells,
        "device": str(device),
    }
    log.info("stage 1: %d steps (%s), relative error %.4f", stats["steps"],
             "converged" if stats["converged"] else "step cap", stats["relative_error"])
    names = [f"baseline_{i + 1}" for i in range(cfg.K)]
    return StageFit(programs.numpy(), usage.numpy(), names, stats)


# -- evaluation against a planted truth ------------------------------------------------
def recovery(prepared: PreparedData, fit: StageFit) -> dict | None:
    """Matched cosine of fitted vs planted baseline programs, when the data is simulated.

    Fitted programs are mapped back to expression units (times each gene's scale) and
    compared with the planted programs on the genes kept.
    """
    truth = simulation_truth(prepared.source)
    if truth is None:
        return None
    unscaled = fit.programs * prepared.gene_scale[:, None]
    cos = matched_cosine(unscaled, truth.programs)
    return {"baseline_matched_cosine": cos.tolist(), "baseline_mean": float(cos.mean()),
            "baseline_min": float(cos.min())}


def config_yaml(cfg: DictConfig) -> str:
    """The resolved run configuration as YAML (without Hydra's own settings)."""
    return OmegaConf.to_yaml({k: cfg[k] for k in cfg if k != "hydra"}, resolve=True)


# -- the run ---------------------------------------------------------------------------
def run(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Run the configured stages and write every output into ``run_dir``; return the metrics."""
    run_dir = Path(run_dir)
    start = time.perf_counter()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    resource = instantiate(cfg.resource) if cfg.get("resource") else None
    adata = load_data(cfg.data)
    prepared = prepare_data(adata, cfg.data, use_case=False, resource=resource)
    graph = None if resource is None else resource.graph(list(prepared.var_names))

    stage1 = fit_stage1(prepared.control, cfg, run_dir, graph)

    metrics = {"stage1": stage1.stats, "gene_counts": prepared.gene_counts,
               "n_genes": prepared.n_genes, "K": cfg.K}
    found = recovery(prepared, stage1)
    if found is not None:
        metrics["recovery"] = found
    metrics["wall_time_s"] = time.perf_counter() - start

    var = prepared.var.copy()
    var["deltanmf_gene_scale"] = prepared.gene_scale
    uns = {
        "config": config_yaml(cfg),
        "gene_counts": prepared.gene_counts,
        "loss": stage1.stats["loss"],
        "stage1": {k: v for k, v in stage1.stats.items() if k != "loss"},
        "gene_scale_key": "deltanmf_gene_scale",
    }
    result = results_anndata(prepared.obs, var, stage1.programs, stage1.usage, stage1.names,
                             ["baseline"] * len(stage1.names), uns)
    write_outputs(run_dir, standard_files(result, metrics, cfg.data.get("symbol_key")))
    log.info("results written to %s", run_dir)
    return metrics


def main(cfg: DictConfig) -> float:
    """Entry point of ``train.py``: run into Hydra's output directory; bad input exits with one message."""
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        metrics = run(cfg, run_dir)
    except InputError as err:
        log.error("%s", err)
        print(f"deltanmf: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    return float(metrics["stage1"]["relative_error"])
