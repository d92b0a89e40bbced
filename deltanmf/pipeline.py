"""From a composed config to fitted stages and files: the one code path shared by
``train.py`` and the Python API (:mod:`deltanmf.api`).

``run`` reads the data, fits stage 1 on the controls (or reuses a finished stage 1 with
``stage1_from``), fits stage 2 on the cases when ``stage=twostage``, computes the
case-control tables, and writes every output into the run directory.
"""
from __future__ import annotations

import copy
import logging
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import lightning as L
import numpy as np
import pandas as pd
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from .data import CellDataModule, InputError, PreparedData, demo_path, prepare, read_h5ad, simulation_truth
from .data.backed import H5adFile, open_h5ad, prepare_backed
from .nmf import CellMatrix, GeneGraph, consensus_init, matched_cosine, orthogonality_penalty, refit_usage
from .nmf.consensus import check_settings as check_consensus_settings
from .nmf.metrics import cosine_matrix, fit_error, matching, normalize_programs
from .nmf.replicates import replicate_consensus
from .report import casecontrol, plots
from .report.outputs import results_anndata, standard_files, write_outputs
from .resources import strip_version
from .stages import ConvergenceStop, NonFiniteLossError, ProgressBar, Stage1Module, Stage2Module
from .stages.convergence import check_stop_settings
from .stages.checkpoint import RunCheckpoint, TrainingInterrupted, save_checkpoint
from .stages.stage2 import check_refinement
from .sweeps import hparams_record, register_resolvers

register_resolvers()  # before Hydra resolves hydra.sweep.subdir

log = logging.getLogger(__name__)


def _no_advertising(record: logging.LogRecord) -> bool:
    """Drop Lightning's suggestion to install its cloud logger, printed once per Trainer (twice a run)."""
    return "litlogger" not in str(record.msg)


for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
    logging.getLogger(_name).addFilter(_no_advertising)
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
def load_data(data_cfg: DictConfig) -> ad.AnnData | H5adFile:
    """The input AnnData: the file ``data.path``, or the cached demo (``data=demo``).

    With ``data.backed=true`` the file is opened for streaming instead (an
    :class:`~deltanmf.data.backed.H5adFile`: annotations in memory, the matrix on disk).
    """
    demo = data_cfg.get("source") == "demo"
    read = read_h5ad
    if data_cfg.get("backed"):
        if not data_cfg.get("batch_size"):
            raise InputError("data.backed=true streams cells from disk and trains on minibatches: set "
                             "data.batch_size (e.g. data.batch_size=4096), or use data.backed=false")
        read = open_h5ad
    if data_cfg.get("path"):
        if demo:
            raise InputError(f"data.path={data_cfg.path} was given with the demo's data settings; add data=h5ad "
                             "to read your own file (python train.py data=h5ad data.path=...)")
        return read(data_cfg.path)
    if not demo:
        raise InputError("data.path is not set: give your file with data.path=my.h5ad (or use data=demo)")
    sim = OmegaConf.to_container(data_cfg.simulation, resolve=True)
    try:
        path = demo_path(sim, data_cfg.get("cache_dir"))
    except (TypeError, ValueError) as err:
        raise InputError(f"data.simulation: {err}") from err
    return read(path)


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
    """``prepare`` with the settings of ``data``; streamed (``prepare_backed``) for a file opened backed."""
    return (prepare_backed if isinstance(adata, H5adFile) else prepare)(
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
    twostage: bool = True  # the source run fitted case programs too (its gene scale pooled controls and cases)


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
                    stats=dict(info.get("stage1", {})), source=str(file), twostage=bool((~base).any()))


# -- training ----------------------------------------------------------------------------
def _trainer(cfg: DictConfig, run_dir: Path, version: str) -> L.Trainer:
    logger = False
    if cfg.get("logger"):
        logger = instantiate(cfg.logger, save_dir=str(run_dir), version=version)
    stop = {key: value for key, value in cfg.model.stop.items() if key != "enabled"}
    if not cfg.model.stop.get("enabled", True):
        # model.stop.enabled=false (experiment=published): exactly trainer.max_steps steps; the callback
        # stays for its non-finite-loss check, with a patience that never runs out
        stop["patience"] = float("inf")
    callbacks = [ConvergenceStop(**stop), _checkpointing(cfg, run_dir, version)]
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(ProgressBar(refresh_rate=cfg.model.stop.check_every))  # reading the loss syncs: not every step
    # under DDP the data module gives each process its share of the cells itself (RankShare);
    # Lightning's distributed sampler would share them out again, and pad with repeats
    return _instantiate_trainer(cfg, logger=logger, callbacks=callbacks, default_root_dir=str(run_dir))


def _instantiate_trainer(cfg: DictConfig, **kwargs) -> L.Trainer:
    """``cfg.trainer`` as a Lightning Trainer; settings Lightning refuses (trainer=gpu without a
    GPU, more devices than there are) raise :class:`InputError`."""
    try:
        return instantiate(cfg.trainer, use_distributed_sampler=False, **kwargs)
    except InstantiationException as err:
        if not isinstance(err.__cause__, MisconfigurationException):
            raise
        raise InputError(f"the trainer settings cannot run here: {err.__cause__} (trainer.accelerator="
                         f"{cfg.trainer.get('accelerator')}, trainer.devices={cfg.trainer.get('devices')}); "
                         "trainer=default uses a GPU only when there is one, trainer=cpu never does") from None


def check_trainer_settings(cfg: DictConfig) -> None:
    """Let Lightning check the trainer settings before any work (a Trainer is cheap to build
    and starts nothing), so a refused setting leaves nothing in the run directory."""
    _instantiate_trainer(cfg, logger=False, callbacks=[])


def _checkpointing(cfg: DictConfig, run_dir: Path, name: str) -> RunCheckpoint:
    """The stage's checkpoint callback, told which checkpoint (if any) the stage continues from."""
    callback = RunCheckpoint(run_dir / "checkpoints", name, **cfg.get("checkpoint", {}))
    source = resume_source(cfg, run_dir)
    if source is not None:
        directory, file = source
        if file is not None and _checkpoint_stage(file) == name:
            callback.resume_from = file
        else:
            callback.resume_from = RunCheckpoint(directory, name).resume_path()
    return callback


def _checkpoint_stage(path: Path) -> str:
    return path.name.removesuffix(".ckpt").removesuffix("-last")


def resume_source(cfg: DictConfig, run_dir: Path) -> tuple[Path, Path | None] | None:
    """Where an interrupted run's checkpoints are: ``(directory, file or None)``, or None.

    ``resume=true`` continues from this run directory's ``checkpoints/``; ``ckpt_path=FILE``
    continues FILE's stage from FILE, and takes finished earlier stages from FILE's directory.
    """
    if cfg.get("ckpt_path"):
        file = Path(cfg.ckpt_path).expanduser()
        if not file.is_file():
            raise InputError(f"ckpt_path={cfg.ckpt_path}: no such file; give a checkpoint from a run's "
                             "checkpoints/ directory (e.g. .../checkpoints/stage1-last.ckpt)")
        if not _checkpoint_stage(file).startswith(("stage1", "stage2")):
            raise InputError(f"ckpt_path={cfg.ckpt_path}: not a DeltaNMF stage checkpoint (expected a name like "
                             "stage1-last.ckpt or stage2.ckpt)")
        return file.parent, file
    if cfg.get("resume"):
        directory = run_dir / "checkpoints"
        if not list(directory.glob("*.ckpt")):
            raise InputError(f"resume=true: no checkpoints in {directory}; run in the interrupted run's directory "
                             "(hydra.run.dir=<its directory>) or give a checkpoint with ckpt_path=...")
        return directory, None
    return None


# settings that must match between an interrupted run and its continuation
_RESUME_KEYS = ("stage", "K", "K_case", "seed", "stage1_from", "data", "model", "resource")


def check_resumable(cfg: DictConfig, run_dir: Path) -> None:
    """Record this run's settings beside its checkpoints; when resuming, require the same settings."""
    settings = OmegaConf.to_yaml({k: cfg.get(k) for k in _RESUME_KEYS}, resolve=True)
    source = resume_source(cfg, run_dir)
    if source is not None:
        recorded = source[0] / "settings.yaml"
        if recorded.is_file() and recorded.read_text() != settings:
            before = OmegaConf.create(recorded.read_text())
            now = OmegaConf.create(settings)
            changed = [k for k in _RESUME_KEYS if before.get(k) != now.get(k)]
            raise InputError(f"cannot resume from {source[0]}: it was run with different settings ({', '.join(changed)}); "
                             "resume with the interrupted run's settings, or start a new run")
    directory = run_dir / "checkpoints"
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / ".settings.yaml.tmp"
    tmp.write_text(settings)
    tmp.replace(directory / "settings.yaml")


def _run_checkpoint(trainer: L.Trainer) -> RunCheckpoint:
    return next(c for c in trainer.callbacks if isinstance(c, RunCheckpoint))


def _saved_init(trainer: L.Trainer) -> dict | None:
    """What the initialisation of the stage this trainer continues reported, from its
    checkpoint (None: a fresh stage, or a checkpoint from before this was kept).

    Such a stage need not initialise again: the checkpoint replaces every parameter. The
    checkpoint is memory-mapped, so only this small record is read.
    """
    path = getattr(_run_checkpoint(trainer), "resume_from", None)
    if path is None:
        return None
    checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    return checkpoint.get("deltanmf", {}).get("init") or None


def _placeholder_start(n_genes: int, n_cells: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Programs and usage of the right shapes for a module whose checkpoint will replace them."""
    return torch.full((n_genes, k), 1.0 / n_genes), torch.ones(n_cells, k)


def _train(module, datamodule, trainer: L.Trainer, run_dir: Path, name: str) -> float:
    """Fit (continuing from a checkpoint when resuming) and write the stage's final checkpoint."""
    checkpoints = _run_checkpoint(trainer)
    resume_from = getattr(checkpoints, "resume_from", None)
    if resume_from is not None:
        log.info("%s: continuing from %s", name, resume_from)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            # Lightning warns that the loader keeps no state of its own; it needs none: every full-batch
            # step sees the same data, and minibatches resume from Lightning's restored batch count
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before")
            # steps are logged every log_every_n_steps across epochs, however few batches an epoch has
            warnings.filterwarnings("ignore", message="The number of training batches .* is smaller than the logging")
            trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
    except NonFiniteLossError as err:
        if checkpoints.last_path.is_file():
            raise NonFiniteLossError(f"{err} The last checkpoint with a finite loss is {checkpoints.last_path}.") from None
        raise
    elapsed = time.perf_counter() - start
    save_checkpoint(trainer, checkpoints.final_path)
    checkpoints.last_path.unlink(missing_ok=True)  # the final checkpoint supersedes it
    return elapsed


def _lazy_usage(datamodule: CellDataModule, trainer: L.Trainer) -> bool:
    """Row-lazy usage updates (sparse gradients) in minibatch mode; DDP averages dense gradients only."""
    return not datamodule.full_batch and trainer.world_size == 1


def transposed_copy_setting(cfg: DictConfig) -> str | bool:
    """``data.transposed_copy``, checked: ``"auto"``, True or False."""
    value = cfg.data.get("transposed_copy", "auto")
    if not (value == "auto" or isinstance(value, bool)):
        raise InputError(f"data.transposed_copy={value!r} must be auto, true or false: give data.transposed_copy=auto "
                         "(the default), true (fastest full-batch steps) or false (least memory)")
    return value


def keeps_transposed_copy(cfg: DictConfig, n_cells: int) -> bool:
    """Whether a stage's initialisation and its full-batch training keep a transposed copy
    of the cells' non-zeros (sparse data on the CPU; ``data.transposed_copy``).

    ``auto``: when the stage has at most ``model.consensus.max_cells`` cells (a small
    matrix: the copy buys ~2x faster steps for a few tens of MB), not above that, where
    memory matters more (the initialisation then fits a subset of that many cells; a copy
    of it would take the peak past twice the matrix, see README "Benchmarks").
    ``true``: always. ``false``: never.
    """
    value = transposed_copy_setting(cfg)
    if isinstance(value, bool):
        return value
    max_cells = cfg.model.consensus.get("max_cells")
    return max_cells is None or (isinstance(max_cells, int) and not isinstance(max_cells, bool)
                                 and n_cells <= max_cells)


def _datamodule(x, cfg: DictConfig, transposed_copy: bool) -> CellDataModule:
    return CellDataModule(x, batch_size=cfg.data.get("batch_size"), num_workers=cfg.data.get("num_workers", 0),
                          seed=cfg.seed, steps_per_epoch=cfg.model.stop.check_every,
                          transposed_copy=transposed_copy)


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


def fit_stage1(x_control, cfg: DictConfig, run_dir: Path, graph: GeneGraph | None = None,
               name: str = "stage1") -> StageFit:
    """Consensus initialisation, then the neural NMF of the control cells (stage 1).

    ``name`` names the fit's checkpoint and TensorBoard folder (``stage1_rep2`` for a replicate).
    """
    transposed_copy = keeps_transposed_copy(cfg, x_control.shape[0])
    datamodule = _datamodule(x_control, cfg, transposed_copy)
    trainer = _trainer(cfg, run_dir, name)
    device = trainer.strategy.root_device
    matrix = CellMatrix(x_control, batch_size=cfg.data.get("batch_size"), device=device,
                        transposed_copy=transposed_copy)

    record = _saved_init(trainer)
    if record is None:
        start = time.perf_counter()
        init = consensus_init(matrix, cfg.K, seed=cfg.seed, **cfg.model.consensus)
        record = {"init_time_s": time.perf_counter() - start, "consensus_stability": init.stability}
        log.info("stage 1: consensus initialisation of K=%d programs in %.1fs (stability %.3f)",
                 cfg.K, record["init_time_s"], init.stability)
        programs, usage = init.programs, init.usage
    else:
        log.info("stage 1: continuing from a checkpoint; its initialisation is not repeated")
        programs, usage = _placeholder_start(matrix.n_genes, matrix.n_cells, cfg.K)
    module: Stage1Module = instantiate(cfg.model.stage1)(
        programs=programs, usage=usage, graph=graph, minibatch=_lazy_usage(datamodule, trainer))
    module.init_record = record
    matrix.release()  # the loader puts its own copy of the cells on the device
    train_time = _train(module, datamodule, trainer, run_dir, name)

    programs, usage = normalize_programs(module.programs().cpu(), module.usage().cpu())
    error = fit_error(matrix, programs, usage)
    stats = _fit_stats("stage 1", module, trainer, matrix, error, _loss_summary(module, error["recon"], programs),
                       record["init_time_s"], train_time, consensus_stability=record["consensus_stability"])
    return StageFit(programs.numpy(), usage.numpy(), [f"baseline_{i + 1}" for i in range(cfg.K)], stats)


def fit_stage2(x_case, baseline: np.ndarray, baseline_names: list[str], cfg: DictConfig, run_dir: Path,
               graph: GeneGraph | None = None, name: str = "stage2") -> StageFit:
    """Case-specific programs on the case cells with the baseline frozen (stage 2).

    The returned programs are ``[baseline, case]``; the baseline columns are exactly the
    given array, and only the case columns are rescaled to sum to 1. ``name`` names the fit's
    checkpoint and TensorBoard folder (``stage2_rep2``, ``stage2_null``).
    """
    transposed_copy = keeps_transposed_copy(cfg, x_case.shape[0])
    datamodule = _datamodule(x_case, cfg, transposed_copy)
    trainer = _trainer(cfg, run_dir, name)
    device = trainer.strategy.root_device
    matrix = CellMatrix(x_case, batch_size=cfg.data.get("batch_size"), device=device,
                        transposed_copy=transposed_copy)
    k = baseline.shape[1]
    frozen = torch.from_numpy(np.ascontiguousarray(baseline, dtype=np.float32))

    record, start_at = _saved_init(trainer), None
    if record is not None:
        log.info("stage 2: continuing from a checkpoint; its initialisation is not repeated")
        case, usage = _placeholder_start(matrix.n_genes, matrix.n_cells, k + cfg.K_case)
        start_at = (case[:, k:], usage)
    start = time.perf_counter()
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # stage 2 alone reproduces (stage1_from)
    module: Stage2Module = instantiate(cfg.model.stage2)(
        matrix=matrix, baseline=frozen, k_case=cfg.K_case, seed=cfg.seed, start=start_at,
        consensus=OmegaConf.to_container(cfg.model.consensus), graph=graph, minibatch=_lazy_usage(datamodule, trainer))
    if record is None:
        record = {"init_time_s": time.perf_counter() - start}
        log.info("stage 2: initialised K_case=%d case programs in %.1fs", cfg.K_case, record["init_time_s"])
    module.init_record = record
    init_time = record["init_time_s"]
    matrix.release()  # the loader puts its own copy of the cells on the device
    train_time = _train(module, datamodule, trainer, run_dir, name)

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


# -- replicates and the stage-2 null ------------------------------------------------------
def replicate_seeds(cfg: DictConfig) -> list[int]:
    """Seeds of the ``model.replicates`` fits of a stage: ``seed + r * model.consensus.replicates``.

    A fit with seed s starts from a consensus of multiplicative-update runs seeded s, s+1, ...,
    s + model.consensus.replicates - 1. Replicates seeded s and s+1 would share all but one of
    those runs, and full-batch training is deterministic given its start, so they would return
    nearly the same programs and their agreement would say nothing about K. Spacing the seeds
    by the consensus size gives each replicate its own runs.
    """
    n = int(cfg.model.get("replicates", 1))
    if n < 1:
        raise InputError(f"model.replicates={n}: the number of fits per stage must be at least 1")
    stride = max(1, int(cfg.model.consensus.replicates))
    return [int(cfg.seed) + r * stride for r in range(n)]


def _with_seed(cfg: DictConfig, seed: int) -> DictConfig:
    out = copy.deepcopy(cfg)
    out.seed = seed
    return out


def fit_replicates(stage: str, x, cfg: DictConfig, run_dir: Path, graph: GeneGraph | None = None,
                   baseline: StageFit | None = None) -> StageFit:
    """Fit a stage ``model.replicates`` times and return the consensus (cNMF style).

    With one replicate this is :func:`fit_stage1` / :func:`fit_stage2` unchanged. With R > 1,
    replicate r (1-based) is fitted with seed :func:`replicate_seeds` [r-1] under the name
    ``<stage>_rep<r>`` (its own checkpoint and TensorBoard folder). The R*K programs (stage 2:
    the R*K_case case programs; the baseline is fixed) are clustered into K groups
    (:func:`deltanmf.nmf.replicates.replicate_consensus`); the consensus programs, medians of
    the clusters, are the stage's result, with usage refitted by NNLS on the stage's cells.

    Parameters
    ----------
    stage
        ``"stage1"`` (``x``: control cells) or ``"stage2"`` (``x``: case cells; needs ``baseline``).
    x
        The stage's cells x genes matrix.
    baseline
        Stage 2 only: the fitted (or reused) stage 1 whose programs stay frozen.

    Returns
    -------
    StageFit
        With R > 1 its stats add ``replicates``, ``replicate_seeds``, ``replicate_stability``
        (silhouette of the clustering), ``replicate_relative_error`` and ``replicate_cosine``
        (mean matched cosine of each replicate's programs to the consensus); ``relative_error``
        and ``loss`` are those of the consensus; ``steps``, ``init_time_s`` and ``train_time_s``
        are summed over replicates.
    """
    if stage not in ("stage1", "stage2"):
        raise ValueError(f"stage must be 'stage1' or 'stage2', got {stage!r}")
    if stage == "stage2" and baseline is None:
        raise ValueError("fit_replicates('stage2', ...) needs the baseline")

    def fit(c: DictConfig, name: str) -> StageFit:
        if stage == "stage1":
            return fit_stage1(x, c, run_dir, graph, name=name)
        return fit_stage2(x, baseline.programs, baseline.names, c, run_dir, graph, name=name)

    seeds = replicate_seeds(cfg)
    if len(seeds) == 1:
        return fit(cfg, stage)
    fits = []
    for r, seed in enumerate(seeds, start=1):
        log.info("%s: replicate %d of %d (seed %d)", stage, r, len(seeds), seed)
        fits.append(fit(_with_seed(cfg, seed), f"{stage}_rep{r}"))

    n_base = 0 if stage == "stage1" else baseline.programs.shape[1]
    found = replicate_consensus([f.programs[:, n_base:] for f in fits], seed=int(cfg.seed),
                                restarts=int(cfg.model.consensus.kmeans_restarts))
    first = fits[0].stats
    matrix = CellMatrix(x, batch_size=cfg.data.get("batch_size"), device=torch.device(first["device"]))
    frozen = torch.from_numpy(np.ascontiguousarray(baseline.programs, dtype=np.float32)) if n_base else None
    programs = found.programs if frozen is None else torch.cat([frozen, found.programs], dim=1)
    usage = refit_usage(matrix, programs, int(cfg.model.consensus.nnls_iterations)).cpu()
    error = fit_error(matrix, programs, usage)

    alpha = float(np.mean([f.stats["laplacian_alpha"] for f in fits]))
    loss = {"recon": error["recon"]}
    total = error["recon"]
    if graph is not None:
        loss["laplacian"] = float(graph.trace(found.programs.to(graph.degree.device)) / found.programs.numel())
        total += alpha * loss["laplacian"]
    extra = {}
    if stage == "stage1":
        extra["consensus_stability"] = float(np.nanmean([f.stats["consensus_stability"] for f in fits]))
    else:
        base_error = first["baseline_only_relative_error"]  # NNLS on the fixed baseline: the same for all
        gamma = float(np.mean([f.stats["ortho_gamma"] for f in fits]))
        if gamma > 0:
            loss["ortho"] = float(orthogonality_penalty(frozen, found.programs))
            total += gamma * loss["ortho"]
        extra.update(baseline_only_relative_error=base_error,
                     explained_variance_gain=base_error ** 2 - error["relative_error"] ** 2, ortho_gamma=gamma)
    loss["total"] = total
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
        "laplacian_alpha": alpha,
        "init_time_s": float(sum(f.stats["init_time_s"] for f in fits)),
        "train_time_s": float(sum(f.stats["train_time_s"] for f in fits)),
        "n_cells": first["n_cells"],
        "device": first["device"],
    }
    log.info("%s: consensus of %d replicates, stability %.3f, relative error %.4f (replicates %s)", stage,
             len(seeds), found.stability, error["relative_error"],
             ", ".join(f"{e:.4f}" for e in stats["replicate_relative_error"]))
    return StageFit(programs.numpy(), usage.numpy(), fits[0].names, stats)


def fit_null(prepared: PreparedData, cfg: DictConfig, run_dir: Path, graph: GeneGraph | None = None) -> dict:
    """Stage 2 where there is no effect: how much ``K_case`` "case programs" explain in control cells.

    The control cells are split in two at random (seeded by ``seed``). A baseline of ``K``
    programs is fitted on one half (``stage1_null``) and stage 2 on the other half as if its
    cells were cases (``stage2_null``). The held-out half is left out of that baseline on
    purpose: real case cells are new to the baseline, and a baseline that has seen the
    null cells fits them better, which makes the null gain too small (on the quick demo
    0.0059 instead of 0.0064 with K_case=3). The run's own baseline (all controls) is not changed.

    Returns
    -------
    dict
        ``null_explained_variance_gain`` (compare with ``explained_variance_gain``),
        ``null_relative_error``, ``null_baseline_only_relative_error``, ``null_n_cells``,
        ``null_baseline_n_cells``, ``null_time_s``; or ``null_skipped`` with the reason
        when a half has too few cells for K (or K_case) programs.
    """
    start = time.perf_counter()
    controls = np.flatnonzero(prepared.is_control)
    order = np.random.default_rng(int(cfg.seed)).permutation(len(controls))
    fit_half = np.sort(controls[order[: len(controls) // 2]])
    null_half = np.sort(controls[order[len(controls) // 2:]])
    for k, what, cells in ((cfg.K, "K", len(fit_half)), (cfg.K_case, "K_case", len(null_half))):
        if k >= min(cells, prepared.n_genes):
            reason = (f"{what}={k} needs more than {cells} cells in each half of the {len(controls)} control cells")
            log.warning("stage 2 null skipped: %s", reason)
            return {"null_skipped": reason}
    log.info("stage 2 null: baseline on %d control cells, stage 2 on the other %d", len(fit_half), len(null_half))
    base = fit_stage1(prepared.X[fit_half], cfg, run_dir, graph, name="stage1_null")
    null = fit_stage2(prepared.X[null_half], base.programs, base.names, cfg, run_dir, graph, name="stage2_null")
    stats = {
        "null_explained_variance_gain": null.stats["explained_variance_gain"],
        "null_relative_error": null.stats["relative_error"],
        "null_baseline_only_relative_error": null.stats["baseline_only_relative_error"],
        "null_n_cells": len(null_half),
        "null_baseline_n_cells": len(fit_half),
        "null_time_s": time.perf_counter() - start,
    }
    log.info("stage 2 null: %d case programs explain %.4f of the variance of held-out control cells",
             cfg.K_case, stats["null_explained_variance_gain"])
    return stats


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
    if twostage:
        check_refinement(cfg.model.stage2.get("refine_rounds", 0), cfg.model.stage2.get("refine_tol", 0.0))
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
    if cfg.stage.name == "twostage" and not baseline.twostage:
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
    if cfg.get("resume") and (run_dir / "results.h5ad").exists():
        raise InputError(f"resume=true: the run in {run_dir} has already finished (results.h5ad exists)")
    if (run_dir / "results.h5ad").exists() and not cfg.get("overwrite", False):
        raise InputError(f"{run_dir} already holds the results of a run; choose another directory "
                         "(hydra.run.dir=...) or replace them with overwrite=true")
    resume_source(cfg, run_dir)  # a bad resume=/ckpt_path= fails here, before any work
    transposed_copy_setting(cfg)  # and so does a bad data.transposed_copy
    check_consensus_settings(**cfg.model.consensus)  # or model.consensus setting
    check_stop_settings(**cfg.model.stop)  # or model.stop setting
    check_trainer_settings(cfg)  # or trainer setting Lightning refuses (trainer=gpu without a GPU)
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
    check_resumable(cfg, run_dir)
    log.info("cells: %d control, %d case%s; genes: %d", int(prepared.is_control.sum()),
             int((~prepared.is_control).sum()), "" if twostage else " (not used by stage=onestage)",
             prepared.n_genes)
    graph = None if resource is None else resource.graph(list(prepared.gene_ids))

    metrics: dict = {"stage": stage, "K": cfg.K, "gene_counts": prepared.gene_counts, "n_genes": prepared.n_genes}
    if coverage is not None:
        metrics["resource"] = coverage
    if baseline is None:
        stage1 = fit_replicates("stage1", prepared.control, cfg, run_dir, graph)
        metrics["stage1"] = stage1.stats
    else:
        stage1 = StageFit(baseline.programs, _control_usage_from(baseline, prepared), baseline.names,
                          {**baseline.stats, "from": baseline.source})
        metrics["stage1"] = stage1.stats
        log.info("stage 1: reusing %d baseline programs from %s", len(baseline.names), baseline.source)

    tables: dict[str, pd.DataFrame] = {}
    n_base = stage1.programs.shape[1]
    if twostage:
        stage2 = fit_replicates("stage2", prepared.case, cfg, run_dir, graph, baseline=stage1)
        if cfg.model.get("null_fit", False):
            stage2.stats.update(fit_null(prepared, cfg, run_dir, graph))
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
    if rank_zero_only.rank != 0:  # DDP: the other processes trained alongside; the first one writes
        return RunResult(result, tables, metrics)
    write_outputs(run_dir, files)
    log_hparams(cfg, metrics, run_dir)
    if twostage:
        shift = tables["usage_shift"]["shift"]
        log.info("summary: %d of %d baseline programs shift usage (%d up, %d down); %d of %d case programs "
                 "emergent (q < %g)", int((shift != "none").sum()), len(shift), int((shift == "up").sum()),
                 int((shift == "down").sum()), int(tables["case_programs"]["emergent"].sum()),
                 len(tables["case_programs"]), cfg.report.q_threshold)
    log.info("results written to %s", run_dir)
    return RunResult(result, tables, metrics)


def log_hparams(cfg: DictConfig, metrics: dict, run_dir: Path) -> None:
    """The run's hyperparameters and final metrics (:func:`deltanmf.sweeps.hparams_record`) for
    TensorBoard's HParams tab, written through the configured logger as version ``hparams``
    (``<run>/tensorboard/hparams/``); nothing with ``logger=none``."""
    if not cfg.get("logger"):
        return
    params, final = hparams_record(cfg, metrics)
    logger = instantiate(cfg.logger, save_dir=str(run_dir), version="hparams")
    logger.log_hyperparams(params, final)
    logger.finalize("success")


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


def _what_is_kept(run_dir: Path) -> str:
    """What an interrupted run leaves to continue from, said for the user."""
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("stage*.ckpt"))
    if kept:
        return (f"kept {', '.join(kept)} in {run_dir / 'checkpoints'}: continue with resume=true in the same "
                f"run directory (hydra.run.dir={run_dir})")
    return "no stage had started training, so nothing was saved: run the command again"


def main(cfg: DictConfig) -> float:
    """Entry point of ``train.py``: run into Hydra's output directory; bad input exits with one message.

    Returns the final relative reconstruction error (of stage 2 when it ran), the value a
    Hydra sweeper would minimise.
    """
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    staged = hydra_cfg.output_subdir == STAGED_RECORD  # null in DDP's extra processes: nothing to settle
    earlier_record = (run_dir / RECORD).exists()
    keep_record = True
    try:
        result = run(cfg, run_dir)
    except (InputError, NonFiniteLossError) as err:
        # refused input leaves an earlier run's record alone; a fresh directory keeps what was tried
        keep_record = not (isinstance(err, InputError) and earlier_record)
        log.error("%s", err)
        print(f"deltanmf: error: {err}", file=sys.stderr)
        raise SystemExit(2 if isinstance(err, InputError) else 3) from None
    except TrainingInterrupted as err:
        log.warning("%s", err)
        print(f"deltanmf: {err}", file=sys.stderr)
        raise SystemExit(128 + err.signum) from None  # the shell's convention for death by signal
    except KeyboardInterrupt:  # Ctrl+C outside training (reading data, initialising, writing outputs)
        message = f"interrupted (SIGINT) outside training; {_what_is_kept(run_dir)}"
        log.warning("%s", message)
        print(f"deltanmf: {message}", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None
    finally:
        if staged:
            settle_record(run_dir, keep_record)
    last = result.metrics.get("stage2", result.metrics["stage1"])
    return float(last.get("relative_error", float("nan")))


# Hydra writes its record of a run (config.yaml, hydra.yaml, overrides.yaml) before the run can
# check anything, so it is written to STAGED_RECORD (conf/hydra/default.yaml: hydra.output_subdir)
# and moved to RECORD by settle_record when the command ends.
RECORD, STAGED_RECORD = ".hydra", ".hydra.new"


def settle_record(run_dir: Path, keep: bool) -> None:
    """Move Hydra's staged record into place (``keep``), replacing the directory's earlier
    one, or drop it: a command refused for bad input (a directory holding another run's
    results, a resume with other settings) then leaves that run's record as it was."""
    new, old = run_dir / STAGED_RECORD, run_dir / RECORD
    if not new.is_dir():
        return
    if not keep:
        shutil.rmtree(new)
        return
    replaced = run_dir / (RECORD + ".old")
    if old.exists():
        shutil.rmtree(replaced, ignore_errors=True)
        old.rename(replaced)
    new.rename(old)
    shutil.rmtree(replaced, ignore_errors=True)
