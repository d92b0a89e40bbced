"""Simulated case-control single-cell counts with planted gene programs.

The simulator produces data with a known ground truth so that the two-stage
NMF (baseline programs learnt on controls, case-specific programs learnt on
the residual of case cells) can be checked end to end.

Generative model
----------------
Let ``G`` be the number of genes, ``K`` the number of baseline programs and
``C`` the number of case-only programs.

Gene programs
    A common background profile ``b`` over genes is built from evenly spaced
    quantiles of a lognormal distribution (``sigma = 2``), randomly assigned to
    genes and normalised to sum to one.  Using quantiles rather than random
    draws keeps the heavy tail (a few very highly expressed genes, as in real
    data) identical in shape between seeds, so that the correlation between
    programs does not swing with a single extreme draw.

    Every program (baseline and case) owns ``markers_per_program`` marker
    genes; the marker sets are disjoint and drawn without replacement from all
    genes.  The program's specific profile puts Gamma(2, 1) weights on its
    markers (zero elsewhere) and is normalised to sum to one.  The program is
    the mixture ``background_weight * b + (1 - background_weight) * specific``
    and therefore sums to one.  Because every program shares ``b`` the
    programs are correlated, as real programs are.

Usage
    Control cells draw baseline usage from
    ``Dirichlet(usage_concentration * ones(K))``.

    Case cells are split as evenly as possible into ``n_groups`` perturbation
    groups (``TARGET1`` ...).  ``n_shifted`` randomly chosen baseline programs
    change their Dirichlet concentration in all case cells, alternating in the
    order drawn: down, up, down, ...  A "down" program's concentration is
    divided by ``shift_factor``; the concentration it gives up is shared among
    the "up" programs, so the total concentration is unchanged and every
    unshifted program keeps its expected usage share (shares are compositional:
    raising one program without this would lower all the others).  A single
    shifted program (``n_shifted=1``, a "down" one) cannot be balanced: the
    other programs' shares then rise a little.

    Case program ``c`` is active in group ``c mod n_groups``: a random
    ``case_fraction`` of that group's cells give it a share
    ``s ~ Uniform(*case_share)`` and scale the usage they already had by
    ``1 - s``.  When several case programs share a group a cell may use more
    than one; each one scales everything before it, so every usage row stays
    on the simplex over the ``K + C`` programs.

Samples (donors)
    With ``n_control_samples`` and ``n_case_samples`` (both or neither), control
    and case cells are split as evenly as possible into that many samples
    (``obs["sample"]``: ``control_1`` ..., ``case_1`` ...), and every sample
    multiplies every baseline program's Dirichlet concentration by
    ``exp(e)``, ``e ~ Normal(0, sample_sigma)`` drawn per sample and program:
    a donor random effect, under which cells of one sample resemble each other
    more than cells of different samples. The planted shifts act on top of it,
    so the population-level truth (``shifted``) is unchanged; a program that
    is not shifted differs between case and control samples only by donor
    noise. Without samples no extra random number is drawn and the data are
    those of a simulator without samples.

Counts
    Library sizes are lognormal with median ``library_size`` and log-scale
    spread ``library_sigma``.  Counts are
    ``Poisson(library * usage @ programs.T)``.

Gene embeddings
    Each program gets a random unit direction in ``embedding_dim``
    dimensions.  A gene's embedding is the sum over programs of its specific
    loading (divided by the program's mean marker weight, so a typical marker
    has loading ~1 in its own program and 0 elsewhere) times the direction,
    plus ``embedding_noise`` times standard normal noise.  Markers of one
    program therefore point in a shared direction while background-only genes
    are pure noise.  This mimics pretrained gene embeddings that carry some,
    but noisy, information about co-regulation.

All randomness comes from ``numpy.random.default_rng(seed)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import anndata
import numpy as np
import pandas as pd

from ..errors import whole_number
from .generative import (SIMULATOR_VERSION, check_case_share, check_float, check_int, draw_counts,
                         make_embedding, make_programs, make_usage)

__all__ = ["SIMULATOR_VERSION", "SimulationTruth", "simulate_case_control", "simulation_truth"]

_UNS_KEY = "simulation"
_VARM_PROGRAMS = "sim_programs"
_VARM_CASE_PROGRAMS = "sim_case_programs"
_VARM_EMBEDDING = "sim_embedding"
_OBSM_USAGE = "sim_usage"


# eq=False: field-wise == on numpy arrays is ambiguous and would raise.
@dataclass(frozen=True, eq=False)
class SimulationTruth:
    """Ground truth of a simulated data set.

    Attributes
    ----------
    programs : numpy.ndarray
        Baseline programs, genes x K.
    case_programs : numpy.ndarray
        Case-only programs, genes x K_case.
    usage : numpy.ndarray
        True usage shares, cells x (K + K_case); baseline programs first.
    shifted : numpy.ndarray
        Integer array of length K: +1 when the program's usage is shifted up
        in case cells, -1 when shifted down, 0 when unchanged.
    case_program_groups : numpy.ndarray
        Perturbation group (e.g. ``"TARGET1"``) in which each case program is
        active, length K_case.
    embedding : numpy.ndarray
        Gene embeddings, genes x embedding_dim.
    """

    programs: np.ndarray
    case_programs: np.ndarray
    usage: np.ndarray
    shifted: np.ndarray
    case_program_groups: np.ndarray
    embedding: np.ndarray


def simulate_case_control(
    n_genes: int = 1500,
    n_programs: int = 10,
    n_case_programs: int = 3,
    n_control: int = 1500,
    n_case: int = 1500,
    n_groups: int = 3,
    n_shifted: int = 3,
    shift_factor: float = 3.0,
    case_fraction: float = 0.4,
    case_share: tuple[float, float] = (0.3, 0.7),
    usage_concentration: float = 0.3,
    background_weight: float = 0.5,
    markers_per_program: int = 60,
    library_size: float = 3000.0,
    library_sigma: float = 0.3,
    embedding_dim: int = 32,
    embedding_noise: float = 0.5,
    n_control_samples: int = 0,
    n_case_samples: int = 0,
    sample_sigma: float = 0.0,
    seed: int = 0,
) -> anndata.AnnData:
    """Simulate case-control single-cell counts with planted gene programs.

    See the module docstring for the generative model.

    Parameters
    ----------
    n_genes : int, default 1500
        Number of genes; must be at least
        ``(n_programs + n_case_programs) * markers_per_program``.
    n_programs : int, default 10
        Number of baseline programs K (>= 1).
    n_case_programs : int, default 3
        Number of case-only programs (>= 0).
    n_control : int, default 1500
        Number of control cells (>= 1).
    n_case : int, default 1500
        Number of case cells (>= 1).
    n_groups : int, default 3
        Number of perturbation groups among case cells (>= 1).
    n_shifted : int, default 3
        Number of baseline programs whose usage shifts in case cells
        (0 <= n_shifted <= n_programs).
    shift_factor : float, default 3.0
        Factor (>= 1) by which a shifted program's Dirichlet concentration is
        multiplied (up) or divided (down) in case cells.
    case_fraction : float, default 0.4
        Fraction, in (0, 1], of a case program's group cells that use it.
    case_share : tuple of float, default (0.3, 0.7)
        Range ``(low, high)``, ``0 < low <= high <= 1``, of the uniform
        distribution of a case program's share in a using cell.
    usage_concentration : float, default 0.3
        Symmetric Dirichlet concentration (> 0) of baseline usage.
    background_weight : float, default 0.5
        Share, in [0, 1), of each program's loading taken from the common
        background profile.
    markers_per_program : int, default 60
        Marker genes per program (>= 1).
    library_size : float, default 3000.0
        Median total counts per cell (> 0).
    library_sigma : float, default 0.3
        Log-scale standard deviation (>= 0) of library sizes.
    embedding_dim : int, default 32
        Dimension of the gene embeddings (>= 1).
    embedding_noise : float, default 0.5
        Standard deviation (>= 0) of the per-coordinate embedding noise.
    n_control_samples, n_case_samples : int, default 0
        Samples (donors) among control and case cells; both 0 (no samples) or
        both at least 1, and at most the number of cells.
    sample_sigma : float, default 0.0
        Log-scale standard deviation (>= 0) of each sample's factor on every
        baseline program's concentration (the donor random effect).
    seed : int, default 0
        Seed for ``numpy.random.default_rng``.

    Returns
    -------
    anndata.AnnData
        Cells x genes, controls first.  ``X`` holds the counts as float32
        CSR.  ``obs`` has ``condition`` (``control``/``case``),
        ``perturbation`` (``NTC`` or ``TARGET1`` ...), ``library_size`` and,
        with samples, ``sample``; ``uns["simulation"]["sample_effects"]``
        then holds each sample's log factors (samples x K).
        ``var_names`` are Ensembl-style IDs, ``var["gene_symbol"]`` gene
        symbols.  The truth is stored in ``varm["sim_programs"]``,
        ``varm["sim_case_programs"]``, ``varm["sim_embedding"]``,
        ``obsm["sim_usage"]`` and ``uns["simulation"]``; read it back with
        :func:`simulation_truth`.

    Raises
    ------
    ValueError
        If an argument is out of its allowed range, or ``n_genes`` is too
        small for the disjoint marker sets.
    """
    n_genes = check_int("n_genes", n_genes, 1)
    n_programs = check_int("n_programs", n_programs, 1)
    n_case_programs = check_int("n_case_programs", n_case_programs, 0)
    n_control = check_int("n_control", n_control, 1)
    n_case = check_int("n_case", n_case, 1)
    n_groups = check_int("n_groups", n_groups, 1)
    n_shifted = check_int("n_shifted", n_shifted, 0)
    if n_shifted > n_programs:
        raise ValueError(
            f"n_shifted must be in [0, n_programs] = [0, {n_programs}], got {n_shifted}"
        )
    shift_factor = check_float("shift_factor", shift_factor, 1.0, np.inf, False, True)
    case_fraction = check_float("case_fraction", case_fraction, 0.0, 1.0, True, False)
    case_share = check_case_share(case_share)
    usage_concentration = check_float(
        "usage_concentration", usage_concentration, 0.0, np.inf, True, True
    )
    background_weight = check_float(
        "background_weight", background_weight, 0.0, 1.0, False, True
    )
    markers_per_program = check_int("markers_per_program", markers_per_program, 1)
    library_size = check_float("library_size", library_size, 0.0, np.inf, True, True)
    library_sigma = check_float("library_sigma", library_sigma, 0.0, np.inf, False, True)
    embedding_dim = check_int("embedding_dim", embedding_dim, 1)
    embedding_noise = check_float(
        "embedding_noise", embedding_noise, 0.0, np.inf, False, True
    )
    n_control_samples = check_int("n_control_samples", n_control_samples, 0)
    n_case_samples = check_int("n_case_samples", n_case_samples, 0)
    if (n_control_samples == 0) != (n_case_samples == 0):
        raise ValueError(
            f"n_control_samples and n_case_samples must both be 0 (no samples) or both >= 1, "
            f"got {n_control_samples} and {n_case_samples}"
        )
    if n_control_samples > n_control or n_case_samples > n_case:
        raise ValueError(
            f"n_control_samples and n_case_samples must not exceed the cells of their condition "
            f"({n_control} and {n_case}), got {n_control_samples} and {n_case_samples}"
        )
    sample_sigma = check_float("sample_sigma", sample_sigma, 0.0, np.inf, False, True)
    if not whole_number(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)

    n_total = n_programs + n_case_programs
    needed = n_total * markers_per_program
    if n_genes < needed:
        raise ValueError(
            f"n_genes must be >= (n_programs + n_case_programs) * markers_per_program "
            f"= ({n_programs} + {n_case_programs}) * {markers_per_program} = {needed} "
            f"for disjoint marker sets, got n_genes={n_genes}"
        )

    rng = np.random.default_rng(seed)
    all_programs, specific = make_programs(
        rng, n_genes, n_total, markers_per_program, background_weight
    )
    embedding = make_embedding(rng, specific, embedding_dim, embedding_noise)
    usage, case_group, shifted, program_group, sample_index, sample_effects = make_usage(
        rng,
        n_programs,
        n_case_programs,
        n_control,
        n_case,
        n_groups,
        n_shifted,
        shift_factor,
        case_fraction,
        case_share,
        usage_concentration,
        n_control_samples,
        n_case_samples,
        sample_sigma,
    )
    n_cells = n_control + n_case
    library = rng.lognormal(mean=np.log(library_size), sigma=library_sigma, size=n_cells)
    counts = draw_counts(rng, usage, all_programs, library)

    group_names = [f"TARGET{g + 1}" for g in range(n_groups)]
    perturbation = np.array(["NTC"] * n_control + [group_names[g] for g in case_group])
    obs = pd.DataFrame(
        {
            "condition": pd.Categorical(
                ["control"] * n_control + ["case"] * n_case,
                categories=["control", "case"],
            ),
            "perturbation": pd.Categorical(
                perturbation, categories=["NTC", *group_names]
            ),
            "library_size": library,
        },
        index=pd.Index([f"cell_{i}" for i in range(n_cells)]),
    )
    if sample_index is not None:
        sample_names = [f"control_{i + 1}" for i in range(n_control_samples)] + [
            f"case_{i + 1}" for i in range(n_case_samples)
        ]
        obs["sample"] = pd.Categorical(np.asarray(sample_names)[sample_index], categories=sample_names)
    var = pd.DataFrame(
        {"gene_symbol": [f"GENE{i + 1}" for i in range(n_genes)]},
        index=pd.Index([f"ENSG{i + 1:011d}" for i in range(n_genes)]),
    )

    params = {
        "n_genes": n_genes,
        "n_programs": n_programs,
        "n_case_programs": n_case_programs,
        "n_control": n_control,
        "n_case": n_case,
        "n_groups": n_groups,
        "n_shifted": n_shifted,
        "shift_factor": shift_factor,
        "case_fraction": case_fraction,
        "case_share": np.asarray(case_share, dtype=np.float64),
        "usage_concentration": usage_concentration,
        "background_weight": background_weight,
        "markers_per_program": markers_per_program,
        "library_size": library_size,
        "library_sigma": library_sigma,
        "embedding_dim": embedding_dim,
        "embedding_noise": embedding_noise,
        "n_control_samples": n_control_samples,
        "n_case_samples": n_case_samples,
        "sample_sigma": sample_sigma,
        "seed": seed,
    }
    uns = {
        _UNS_KEY: {
            "params": params,
            "shifted_programs": shifted,
            "case_program_groups": np.array(
                [group_names[g] for g in program_group], dtype=object
            ),
            "program_names": np.array(
                [f"baseline_{k + 1}" for k in range(n_programs)], dtype=object
            ),
            "case_program_names": np.array(
                [f"case_{c + 1}" for c in range(n_case_programs)], dtype=object
            ),
        }
    }
    if sample_effects is not None:
        uns[_UNS_KEY]["sample_effects"] = sample_effects

    adata = anndata.AnnData(X=counts, obs=obs, var=var, uns=uns)
    adata.varm[_VARM_PROGRAMS] = np.ascontiguousarray(all_programs[:, :n_programs])
    adata.varm[_VARM_CASE_PROGRAMS] = np.ascontiguousarray(all_programs[:, n_programs:])
    adata.varm[_VARM_EMBEDDING] = embedding
    adata.obsm[_OBSM_USAGE] = usage
    return adata


def simulation_truth(adata: anndata.AnnData) -> SimulationTruth | None:
    """Read the simulation truth back from an AnnData.

    Works on the output of :func:`simulate_case_control`, also after it was
    subset to fewer genes or cells (``varm``/``obsm`` follow the subset) and
    after an h5ad round trip.

    Parameters
    ----------
    adata : anndata.AnnData
        Data written by :func:`simulate_case_control`.

    Returns
    -------
    SimulationTruth or None
        The truth, restricted to the genes and cells present; None when none
        of the simulation keys is present.

    Raises
    ------
    KeyError
        If only some of the simulation keys are present, which means the
        object was altered in a way that lost part of the truth.
    """
    locations = {
        f"varm['{_VARM_PROGRAMS}']": _VARM_PROGRAMS in adata.varm,
        f"varm['{_VARM_CASE_PROGRAMS}']": _VARM_CASE_PROGRAMS in adata.varm,
        f"varm['{_VARM_EMBEDDING}']": _VARM_EMBEDDING in adata.varm,
        f"obsm['{_OBSM_USAGE}']": _OBSM_USAGE in adata.obsm,
        f"uns['{_UNS_KEY}']": _UNS_KEY in adata.uns,
    }
    if not any(locations.values()):
        return None
    missing = [name for name, present in locations.items() if not present]
    if missing:
        raise KeyError(f"simulation truth is incomplete; missing {', '.join(missing)}")

    info = adata.uns[_UNS_KEY]
    n_programs = adata.varm[_VARM_PROGRAMS].shape[1]
    shifted = np.asarray(info.get("shifted_programs", np.zeros(n_programs)), dtype=np.int64)
    groups = info.get("case_program_groups", np.array([], dtype=str))
    # h5ad returns string arrays as object arrays; normalise to str.
    groups = np.asarray([str(g) for g in np.atleast_1d(np.asarray(groups))], dtype=str)
    return SimulationTruth(
        programs=np.asarray(adata.varm[_VARM_PROGRAMS], dtype=np.float64),
        case_programs=np.asarray(adata.varm[_VARM_CASE_PROGRAMS], dtype=np.float64),
        usage=np.asarray(adata.obsm[_OBSM_USAGE], dtype=np.float64),
        shifted=shifted,
        case_program_groups=groups,
        embedding=np.asarray(adata.varm[_VARM_EMBEDDING]),
    )
