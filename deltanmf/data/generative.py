"""The random pieces of the simulator (:mod:`deltanmf.data.simulate` describes the model):
planted programs, gene embeddings, usage with shifts and case programs, and Poisson counts."""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.special import ndtri

from ..errors import real_number, whole_number

# Spread of the background profile on the log scale.  Chosen so that with the
# default sizes the mean cosine between baseline programs is ~0.4: programs
# are clearly correlated but still distinguishable.
_BACKGROUND_SIGMA = 2.0
# Gamma shape of marker weights: markers differ in strength without a single
# marker dominating its program.
_MARKER_SHAPE = 2.0
# Bound on the dense rate matrix held at once when drawing counts (elements).
# Bump when the generative model changes, so cached demo files are not reused.
SIMULATOR_VERSION = 2
_CHUNK_ELEMENTS = 4_000_000


def check_int(name: str, value, minimum: int) -> int:
    if not whole_number(value):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_float(
    name: str,
    value,
    low: float,
    high: float,
    low_open: bool,
    high_open: bool,
) -> float:
    lo_br = "(" if low_open else "["
    hi_br = ")" if high_open else "]"
    allowed = f"{lo_br}{low}, {high}{hi_br}"
    if not real_number(value):
        raise ValueError(f"{name} must be a number in {allowed}, got {value!r}")
    value = float(value)
    ok = bool(np.isfinite(value))
    ok = ok and (value > low if low_open else value >= low)
    ok = ok and (value < high if high_open else value <= high)
    if not ok:
        raise ValueError(f"{name} must be a number in {allowed}, got {value!r}")
    return value


def check_case_share(case_share) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in case_share)
    except (TypeError, ValueError):
        raise ValueError(
            f"case_share must be a pair (low, high) with 0 < low <= high <= 1, "
            f"got {case_share!r}"
        ) from None
    if not (0.0 < lo <= hi <= 1.0):
        raise ValueError(
            f"case_share must be a pair (low, high) with 0 < low <= high <= 1, "
            f"got {case_share!r}"
        )
    return lo, hi


def make_programs(
    rng: np.random.Generator,
    n_genes: int,
    n_total: int,
    markers_per_program: int,
    background_weight: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Return (programs, specific), both genes x n_total, columns summing to 1."""
    quantiles = (np.arange(n_genes) + 0.5) / n_genes
    background = rng.permutation(np.exp(_BACKGROUND_SIGMA * ndtri(quantiles)))
    background /= background.sum()

    # One draw without replacement over all programs keeps marker sets disjoint.
    markers = rng.choice(n_genes, size=(n_total, markers_per_program), replace=False)
    specific = np.zeros((n_genes, n_total))
    weights = rng.gamma(_MARKER_SHAPE, 1.0, size=(n_total, markers_per_program))
    weights /= weights.sum(axis=1, keepdims=True)
    specific[markers.T, np.arange(n_total)] = weights.T

    programs = background_weight * background[:, None] + (1.0 - background_weight) * specific
    # Renormalise to remove floating-point drift; the mixture sums to 1 exactly in theory.
    programs /= programs.sum(axis=0, keepdims=True)
    return programs, specific


def make_embedding(
    rng: np.random.Generator,
    specific: np.ndarray,
    embedding_dim: int,
    embedding_noise: float,
) -> np.ndarray:
    n_genes, n_total = specific.shape
    directions = rng.standard_normal((n_total, embedding_dim))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    # Dividing by the mean marker weight puts a typical marker at loading ~1,
    # so the signal-to-noise ratio is governed by embedding_noise alone and
    # does not depend on markers_per_program.
    n_markers = np.count_nonzero(specific, axis=0)
    mean_marker = specific.sum(axis=0) / n_markers
    loadings = specific / mean_marker
    noise = rng.standard_normal((n_genes, embedding_dim))
    return (loadings @ directions + embedding_noise * noise).astype(np.float32)


def make_usage(
    rng: np.random.Generator,
    n_programs: int,
    n_case_programs: int,
    n_control: int,
    n_case: int,
    n_groups: int,
    n_shifted: int,
    shift_factor: float,
    case_fraction: float,
    case_share: tuple[float, float],
    usage_concentration: float,
    n_control_samples: int = 0,
    n_case_samples: int = 0,
    sample_sigma: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Return (usage, case_group_index, shifted, case_program_group_index, sample_index,
    sample_effect).

    Without samples (``n_control_samples = n_case_samples = 0``) the draws are those of
    the simulator before samples existed, so its datasets are unchanged; ``sample_index``
    and ``sample_effect`` are then None. With samples, ``sample_index`` gives each cell's
    sample (controls' samples first) and ``sample_effect`` (samples x K) each sample's
    log-scale factor on every baseline program's concentration.
    """
    base_alpha = np.full(n_programs, usage_concentration)
    sample_index = effect = None
    if n_control_samples:
        # round-robin then shuffle: sample sizes differ by at most one cell
        control_sample = rng.permutation(np.arange(n_control) % n_control_samples)
        case_sample = rng.permutation(np.arange(n_case) % n_case_samples)
        sample_index = np.concatenate([control_sample, n_control_samples + case_sample])
        effect = rng.normal(0.0, sample_sigma, size=(n_control_samples + n_case_samples, n_programs))
        control_usage = _dirichlet_by_sample(rng, base_alpha * np.exp(effect[:n_control_samples]), control_sample)
    else:
        control_usage = rng.dirichlet(base_alpha, size=n_control)

    shifted = np.zeros(n_programs, dtype=np.int64)
    chosen = rng.choice(n_programs, size=n_shifted, replace=False)
    shifted[chosen] = np.where(np.arange(n_shifted) % 2 == 0, -1, 1)
    case_alpha = base_alpha.copy()
    down, up = shifted == -1, shifted == 1
    case_alpha[down] /= shift_factor
    if down.any() and up.any():
        # The up programs take exactly the concentration the down programs gave away, so
        # the total stays put and every unshifted program keeps its expected share.
        gained = (base_alpha[down] - case_alpha[down]).sum()
        case_alpha[up] += gained * base_alpha[up] / base_alpha[up].sum()
    else:
        case_alpha[up] *= shift_factor
    if n_control_samples:  # the donor effect multiplies the shifted concentrations too
        case_usage = _dirichlet_by_sample(rng, case_alpha * np.exp(effect[n_control_samples:]), case_sample)
    else:
        case_usage = rng.dirichlet(case_alpha, size=n_case)

    # Round-robin then shuffle gives group sizes that differ by at most one.
    case_group = rng.permutation(np.arange(n_case) % n_groups)

    case_usage = np.hstack([case_usage, np.zeros((n_case, n_case_programs))])
    program_group = np.arange(n_case_programs) % n_groups
    lo, hi = case_share
    for c in range(n_case_programs):
        members = np.flatnonzero(case_group == program_group[c])
        if members.size == 0:
            continue
        # At least one user, so that every case program leaves a trace.
        n_users = max(1, int(round(case_fraction * members.size)))
        users = rng.choice(members, size=n_users, replace=False)
        share = rng.uniform(lo, hi, size=n_users)
        # Scaling the whole row (not only the baseline part) keeps it on the
        # simplex when a cell already uses another case program of its group.
        case_usage[users] *= (1.0 - share)[:, None]
        case_usage[users, n_programs + c] = share

    control_usage = np.hstack([control_usage, np.zeros((n_control, n_case_programs))])
    usage = np.vstack([control_usage, case_usage])
    return usage, case_group, shifted, program_group, sample_index, effect


def _dirichlet_by_sample(rng: np.random.Generator, alpha: np.ndarray, sample: np.ndarray) -> np.ndarray:
    """One Dirichlet draw per cell from its sample's concentrations (samples x K)."""
    usage = np.empty((len(sample), alpha.shape[1]))
    for s in range(len(alpha)):
        cells = np.flatnonzero(sample == s)
        usage[cells] = rng.dirichlet(alpha[s], size=len(cells))
    return usage


def draw_counts(
    rng: np.random.Generator,
    usage: np.ndarray,
    programs: np.ndarray,
    library: np.ndarray,
) -> sp.csr_matrix:
    n_cells = usage.shape[0]
    n_genes = programs.shape[0]
    chunk = max(1, _CHUNK_ELEMENTS // max(n_genes, 1))
    programs_t = programs.T.copy()
    blocks = []
    for start in range(0, n_cells, chunk):
        stop = min(start + chunk, n_cells)
        rate = usage[start:stop] @ programs_t
        rate *= library[start:stop, None]
        counts = rng.poisson(rate)
        # Convert to sparse immediately so at most one dense chunk is alive.
        blocks.append(sp.csr_matrix(counts.astype(np.float32)))
        del rate, counts
    if len(blocks) == 1:
        return blocks[0]
    return sp.vstack(blocks, format="csr").astype(np.float32)
