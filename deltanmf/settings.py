"""Typed settings: what every configuration value must be, checked once.

The defaults live in one place, the YAML files under ``conf/``. These classes say what each
value means and which values are allowed; :func:`deltanmf.workflow.config.load_settings`
builds them from a composed Hydra config, and everything below the workflow layer receives
them (or plain values taken from them), never a ``DictConfig``. Building one checks every
field, so ``dataclasses.replace(settings, ...)`` is checked too; a bad value raises
:class:`~deltanmf.errors.InputError` naming the configuration key and a usable value.

This module imports nothing heavy: a command with a bad setting is refused before torch
or Lightning load.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from .errors import InputError, real_number, whole_number


@dataclass(frozen=True)
class Rule:
    """What one setting must be.

    ``kind``: ``int``, ``float``, ``bool``, ``str``, ``choice`` (one of ``choices``),
    ``strs`` (a list of names), ``floats`` (a non-empty list of numbers in the range), ``scalar`` (a number or text, compared as text) or
    ``mapping`` (passed on as it is, checked where it is used). Numbers must lie in
    ``[low, high]`` (open ends with ``low_open`` / ``high_open``); ``optional`` allows
    null; ``hint`` says what the value means or gives a usable one.
    """

    kind: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple = ()
    optional: bool = False
    hint: str = ""
    words: tuple = ()  # besides a value of ``kind``, these words are allowed (``rel_alpha=auto``)


def rule(kind: str, **options) -> Any:
    """A settings field checked by ``Rule(kind, **options)``; it has no default (see the module docstring)."""
    return field(metadata={"rule": Rule(kind, **options)})


def group(cls: type) -> Any:
    """A settings field holding the settings of a sub-group (``cls``), checked on its own."""
    return field(metadata={"group": cls})


def show(value, *, quoted: bool = False) -> str:
    """A value as it is written on the command line (``null``, ``true``, ``[a,b]``); ``quoted``:
    strings and paths in single quotes, as a Hydra override's value must be when built from
    arbitrary text."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(show(v, quoted=quoted) for v in value) + "]"
    if quoted and isinstance(value, (str, Path)):
        return "'" + str(value).replace("'", "\\'") + "'"
    return str(value)


def _interval(r: Rule) -> str:
    if r.low is not None and r.high is not None:
        return f"in {'(' if r.low_open else '['}{r.low:g}, {r.high:g}{')' if r.high_open else ']'}"
    if r.low is not None:
        return f"{'>' if r.low_open else '>='} {r.low:g}"
    if r.high is not None:
        return f"{'<' if r.high_open else '<='} {r.high:g}"
    return ""


def _requirement(r: Rule) -> str:
    what = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "a name",
            "strs": "a list of names, e.g. [a,b]", "scalar": "a value (number or text)",
            "mapping": "a group of settings", "floats": "a list of numbers, e.g. [0,0.1,0.3]"}.get(r.kind)
    if r.kind == "choice":
        what = "one of " + ", ".join(show(c) for c in r.choices)
    if r.kind in ("int", "float", "floats") and _interval(r):
        what += (" " if r.kind != "floats" else ", each ") + _interval(r)
    return what + "".join(f" or {w}" for w in r.words) + (" or null" if r.optional else "")


def _inside(value: float, r: Rule) -> bool:
    if r.low is not None and (value <= r.low if r.low_open else value < r.low):
        return False
    return not (r.high is not None and (value >= r.high if r.high_open else value > r.high))


def check_value(key: str, value, r: Rule):
    """``value`` normalised (numpy numbers to Python, lists to tuples), or :class:`InputError`."""
    if value is None:
        if r.optional:
            return None
    elif isinstance(value, str) and value in r.words:
        return value
    elif r.kind == "int" and whole_number(value) and _inside(value, r):
        return int(value)
    elif r.kind == "float" and real_number(value) and math.isfinite(value) and _inside(value, r):
        return float(value)
    elif r.kind == "bool" and isinstance(value, bool):
        return value
    elif r.kind == "str" and isinstance(value, str) and value:
        return value
    elif r.kind == "choice" and any(value == c and type(value) is type(c) for c in r.choices):
        return value
    elif r.kind == "strs" and isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    elif (r.kind == "floats" and isinstance(value, (list, tuple)) and value
          and all(real_number(v) and math.isfinite(v) and _inside(v, r) for v in value)):
        return tuple(float(v) for v in value)
    elif r.kind == "scalar" and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return value
    elif r.kind == "mapping" and isinstance(value, Mapping):
        return dict(value)
    hint = f" ({r.hint})" if r.hint else ""
    raise InputError(f"{key}={show(value)} must be {_requirement(r)}{hint}")


class Settings:
    """Base of the settings groups: checks every field when built (see the module docstring)."""

    PATH: ClassVar[str] = ""  # where the group sits in the configuration, e.g. "model.consensus"

    def key(self, name: str) -> str:
        """The configuration key of field ``name`` (``model.consensus.tol``)."""
        return f"{self.PATH}.{name}" if self.PATH else name

    def __post_init__(self) -> None:
        for f in fields(self):
            r = f.metadata.get("rule")
            if r is not None:
                object.__setattr__(self, f.name, check_value(self.key(f.name), getattr(self, f.name), r))
        self.check()

    def check(self) -> None:
        """Rules between fields; a subclass raises :class:`InputError` here."""


@dataclass(frozen=True)
class ConsensusSettings(Settings):
    """``model.consensus``: the consensus-NMF initialisation (see ``conf/model/neural_nmf.yaml``)."""

    PATH: ClassVar[str] = "model.consensus"
    replicates: int = rule("int", low=1, hint="seeded multiplicative-update runs pooled, e.g. 5")
    iterations: int = rule("int", low=1, hint="passes over the cells per run, at most, e.g. 15")
    tol: float = rule("float", low=0, high=1, high_open=True,
                      hint="the runs stop once a pass lowers no run's error by more than this, e.g. 1e-4; "
                           "0 runs every pass")
    inner_updates: int = rule("int", low=1, hint="1: plain multiplicative updates")
    neighbor_fraction: float = rule("float", low=0, high=1, low_open=True)
    density_quantile: float = rule("float", low=0, high=1, low_open=True)
    kmeans_restarts: int = rule("int", low=1)
    nnls_iterations: int = rule("int", low=1)
    max_cells: int | None = rule("int", low=1, optional=True, hint="null initialises from all cells")


@dataclass(frozen=True)
class StopSettings(Settings):
    """``model.stop``: the convergence stop (the step cap is ``trainer.max_steps``)."""

    PATH: ClassVar[str] = "model.stop"
    enabled: bool = rule("bool", hint="false: exactly trainer.max_steps steps")
    tol: float = rule("float", low=0, hint="relative improvement counted as progress, e.g. 1e-4")
    patience: int = rule("int", low=1, hint="checks without progress before stopping, e.g. 3; "
                                            "model.stop.enabled=false for no stop")
    check_every: int = rule("int", low=1, hint="steps per check, e.g. 10")


PRIOR_FROM = ("converged", "start")


@dataclass(frozen=True)
class Stage1Settings(Settings):
    """``model.stage1``: the baseline programs' prior."""

    PATH: ClassVar[str] = "model.stage1"
    rel_alpha: float | str = rule("float", low=0, words=("auto",),
                                  hint="Laplacian strength relative to the reconstruction loss; auto chooses it "
                                       "from held-out entries over alpha_grid (docs/prior.md)")
    alpha_grid: tuple = rule("floats", low=0, hint="the strengths rel_alpha=auto compares, 0 included")
    prior_from: str = rule("choice", choices=PRIOR_FROM)
    laplacian_steps: int = rule("int", low=1, hint="steps trained with the Laplacian on")

    def check(self) -> None:
        if self.rel_alpha == "auto" and 0.0 not in self.alpha_grid:
            raise InputError(f"{self.key('alpha_grid')}={show(self.alpha_grid)} must hold 0: rel_alpha=auto "
                             f"compares every strength with no prior (e.g. {self.key('alpha_grid')}=[0,0.1,0.3])")


@dataclass(frozen=True)
class Stage2Settings(Stage1Settings):
    """``model.stage2``: the case programs' prior, orthogonality and refined start."""

    PATH: ClassVar[str] = "model.stage2"
    rel_gamma: float = rule("float", low=0, hint="orthogonality strength; 0 = off")
    refine_rounds: int = rule("int", low=0, hint="alternating-NNLS rounds refining the start; 0 = none")
    refine_tol: float = rule("float", low=0, hint="the refinement stops once a round changes less than this")


@dataclass(frozen=True)
class HoldoutSettings(Settings):
    """``model.holdout``: entries held out of the training loss to measure a fit (docs/prior.md)."""

    PATH: ClassVar[str] = "model.holdout"
    fraction: float = rule("float", low=0, high=1, low_open=True, high_open=True,
                           hint="share of the matrix's entries held out, e.g. 0.1")
    folds: int = rule("int", low=1, hint="rel_alpha=auto fits each strength this many times, each holding out "
                                         "another share of the entries, e.g. 5 with fraction=0.2")
    evaluate: bool = rule("bool", hint="true: every fit trains without the held-out entries and reports their "
                                       "error (metrics.json heldout_*)")

    def check(self) -> None:
        if self.folds * self.fraction > 1 + 1e-9:
            raise InputError(f"model.holdout.folds={self.folds} shares of model.holdout.fraction={self.fraction:g} "
                             f"are more than all entries; use at most {int(1 / self.fraction + 1e-9)} folds or a "
                             "smaller fraction")


@dataclass(frozen=True)
class ModelSettings(Settings):
    """``model``: parametrisation, optimiser, replicates, and the groups above."""

    PATH: ClassVar[str] = "model"
    activation: str = rule("choice", choices=("softplus", "relu"))
    beta: float = rule("float", low=0, low_open=True, hint="softplus sharpness, e.g. 5")
    lr: float = rule("float", low=0, low_open=True, hint="Adam learning rate, e.g. 0.01")
    replicates: int = rule("int", low=1, hint="fits per stage with different seeds")
    null_fit: bool = rule("bool")
    consensus: ConsensusSettings = group(ConsensusSettings)
    stop: StopSettings = group(StopSettings)
    stage1: Stage1Settings = group(Stage1Settings)
    stage2: Stage2Settings = group(Stage2Settings)
    holdout: HoldoutSettings = group(HoldoutSettings)


NORMALIZE = ("none", "total", "median")


def existing_file(path: str | Path) -> Path:
    """``data.path`` as a Path (``~`` expanded), or an error naming it and, for a relative
    path, the directory it was looked for in."""
    path = Path(path).expanduser()
    if not path.exists():
        where = "" if path.is_absolute() else f" (looked for {path.absolute()})"
        raise InputError(f"data.path: file not found: {path}{where}. Give the path to an .h5ad file "
                         "(data.path=...).")
    return path


@dataclass(frozen=True)
class DataSettings(Settings):
    """``data``: the input and its preparation (``conf/data/h5ad.yaml``, ``conf/data/demo.yaml``)."""

    PATH: ClassVar[str] = "data"
    source: str = rule("choice", choices=("file", "demo", "anndata"),
                       hint="data=h5ad reads data.path, data=demo simulates; anndata: given by the Python API")
    path: str | None = rule("str", optional=True, hint="the .h5ad file, e.g. data.path=my.h5ad")
    layer: str | None = rule("str", optional=True, hint="null = .X")
    use_raw: bool = rule("bool", hint="true: factorise .raw.X (with .raw.var's genes)")
    condition_key: str = rule("str", hint="the .obs column telling controls from cases")
    control: Any = rule("scalar", hint="the value of data.condition_key marking control cells")
    case: Any = rule("scalar", optional=True, hint="null = every non-control cell")
    allow_unlabelled: bool = rule("bool", hint="true: cells without a condition are left out and counted; "
                                               "false: they stop the run")
    group_key: str | None = rule("str", optional=True)
    sample_key: str | None = rule("str", optional=True,
                                  hint="the .obs column of the replicate unit (donor, sample, guide), or null")
    pair_key: str | None = rule("str", optional=True,
                                hint="the .obs column of the unit measured in both conditions (donor, patient), or null")
    celltype_key: str | None = rule("str", optional=True,
                                    hint="the .obs column of the cell type, for per-cell-type contrasts, or null")
    symbol_key: str | None = rule("str", optional=True)
    gene_id_column: str | None = rule("str", optional=True)
    min_cells: int = rule("int", low=0, hint="keep genes detected in at least this many cells")
    remove_genes: tuple[str, ...] = rule("strs")
    gene_mask_key: str | None = rule("str", optional=True, hint="a boolean .var column, e.g. highly_variable")
    n_top_genes: int | None = rule("int", low=1, optional=True,
                                   hint="highly variable genes kept, e.g. 2000; null = every gene left")
    normalize: str = rule("choice", choices=NORMALIZE)
    target_sum: float | None = rule("float", low=0, low_open=True, optional=True, hint="null = 10,000")
    scale_genes: bool = rule("bool")
    batch_size: int | None = rule("int", low=1, optional=True, hint="cells per minibatch, e.g. 4096; null = full batch")
    backed: bool = rule("bool")
    num_workers: int = rule("int", low=0)
    transposed_copy: Any = rule("choice", choices=("auto", True, False),
                                hint="auto (by the stage's size), true (fastest full-batch steps) or false "
                                     "(least memory)")
    cache_dir: str | None = rule("str", optional=True)
    simulation: dict | None = rule("mapping", optional=True)

    def check(self) -> None:
        if self.use_raw and self.layer is not None:
            raise InputError(f"data.use_raw=true and data.layer={self.layer} choose two matrices: keep one (a layer, "
                             "or .raw)")
        if self.backed and self.batch_size is None:
            raise InputError("data.backed=true streams cells from disk and trains on minibatches: set "
                             "data.batch_size (e.g. data.batch_size=4096), or use data.backed=false")
        if self.source == "demo" and self.path is not None:
            raise InputError(f"data.path={self.path} was given with the demo's data settings; add data=h5ad "
                             "to read your own file (python train.py data=h5ad data.path=...)")
        if self.source == "file" and self.path in (None, "???"):  # ???: conf/data/h5ad.yaml's "required"
            raise InputError("data.path is not set: give your file with data.path=my.h5ad (or use data=demo)")
        if self.source == "file":
            existing_file(self.path)  # before anything heavy is imported
        if self.source == "anndata" and (self.path is not None or self.backed):
            raise InputError("data.source=anndata is the Python API's AnnData in memory: it takes no data.path "
                             "and no data.backed=true")
        if self.source == "demo" and self.simulation is None:
            raise InputError("data=demo needs data.simulation (conf/data/demo.yaml)")
        if self.case is not None and str(self.case) == str(self.control):
            raise InputError(f"data.case={show(self.case)} is the same as data.control; give the case value, "
                             "or data.case=null for every non-control cell")


@dataclass(frozen=True)
class ReportSettings(Settings):
    """``report``: the case-control statistics."""

    PATH: ClassVar[str] = "report"
    share_threshold: float = rule("float", low=0, high=1)
    q_threshold: float = rule("float", low=0, high=1, low_open=True)
    min_log2fc: float = rule("float", low=0)
    emergence_log2fc: float = rule("float", low=0)
    covariates: tuple[str, ...] = rule("strs", hint=".obs columns constant within each sample, e.g. [sex,batch]")
    permutations: int = rule("int", low=0, hint="relabellings for every sample-level permutation p-value; "
                                                "0: only with fewer than 6 samples in a condition")
    min_cells_per_sample: int = rule("int", low=1, hint="samples with fewer cells are left out of the tests, e.g. 10")
    moderate: bool = rule("bool", hint="true: variances moderated across programs (two-condition tables) and "
                                       "groups (screens) by empirical Bayes")
    annotate_key: str | None = rule("str", optional=True,
                                    hint="an .obs column (e.g. the cell type): mean share of each program per value, or null")
    negative_controls: int = rule("int", low=0, hint="random sets of control units tested as targets in a "
                                                     "screen design, e.g. 200; 0 = no check")


@dataclass(frozen=True)
class CheckpointSettings(Settings):
    """``checkpoint``: periodic checkpoints of a stage while it trains."""

    PATH: ClassVar[str] = "checkpoint"
    every_n_steps: int = rule("int", low=0, hint="0 = off")
    every_minutes: float = rule("float", low=0, hint="0 = off")


@dataclass(frozen=True)
class StageSettings(Settings):
    """``stage``: which stages run."""

    PATH: ClassVar[str] = "stage"
    name: str = rule("choice", choices=("onestage", "twostage"),
                     hint="stage=twostage (both stages) or stage=onestage (baseline programs only)")


STAGE1_UNITS = ("auto", "expression", "scaled")
SEED_MAX = 2**32 - 1  # what torch and numpy seeding accept


@dataclass(frozen=True)
class RunSettings(Settings):
    """Everything a run needs, as composed by ``conf/config.yaml``.

    ``trainer``, ``logger`` and ``resource`` are Lightning and resource objects' arguments
    (with Hydra's ``_target_``), checked when they are built.
    """

    K: int = rule("int", low=1, hint="the number of baseline programs, e.g. K=10")
    K_case: int = rule("int", low=0, hint="the number of case programs, e.g. K_case=3")
    seed: int = rule("int", low=0, high=SEED_MAX)
    stage1_from: str | None = rule("str", optional=True)
    stage1_varm_key: str | None = rule("str", optional=True, hint="the .varm key of an .h5ad's programs")
    stage1_units: str = rule("choice", choices=STAGE1_UNITS,
                             hint="auto: a programs x genes spectra file is scaled, others expression units")
    stage1_min_coverage: float = rule("float", low=0, high=1,
                                      hint="least share of a programs file's genes found in the data, e.g. 0.5")
    overwrite: bool = rule("bool")
    resume: bool = rule("bool")
    ckpt_path: str | None = rule("str", optional=True)
    stage: StageSettings = group(StageSettings)
    report: ReportSettings = group(ReportSettings)
    checkpoint: CheckpointSettings = group(CheckpointSettings)
    data: DataSettings = group(DataSettings)
    model: ModelSettings = group(ModelSettings)
    trainer: dict = rule("mapping")
    logger: dict | None = rule("mapping", optional=True)
    resource: dict | None = rule("mapping", optional=True)

    @property
    def twostage(self) -> bool:
        return self.stage.name == "twostage"

    def check(self) -> None:
        if self.twostage and self.K_case < 1:
            raise InputError(f"K_case={self.K_case}: stage=twostage needs at least 1 case program "
                             "(use stage=onestage for baseline programs only)")
        if self.stage1_varm_key and not self.stage1_from:
            raise InputError(f"stage1_varm_key={self.stage1_varm_key} names the programs of a stage1_from .h5ad, but "
                             "stage1_from is not set (stage1_from=<file>.h5ad)")
        if self.report.covariates and not (self.data.sample_key or self.data.pair_key):
            raise InputError(f"report.covariates={show(list(self.report.covariates))} are properties of samples: "
                             "set data.sample_key to the .obs column of the replicate unit (donor, sample, "
                             "guide), or data.pair_key for a paired design, or report.covariates=[]")
        if self.resume and self.ckpt_path:
            raise InputError("give resume=true (continue in this run directory) or ckpt_path=FILE (continue from "
                             "that checkpoint in a new directory), not both")
