"""Consensus of replicate fits (cNMF style): the programs of R fits with different seeds are
pooled, clustered into K groups, and each group's median is a consensus program.

The silhouette of that clustering is the *stability* of the number of programs: when the
data hold K programs, every replicate finds them and the R copies of each program sit in
tight, well separated clusters (silhouette near 1); with too many programs the replicates
split and merge the real ones in different ways and the silhouette drops.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .consensus import cluster_medians, kmeans, silhouette

_EPS = 1e-10


@dataclass
class ReplicateConsensus:
    """Outcome of :func:`replicate_consensus`.

    Attributes
    ----------
    programs
        Consensus programs, genes x K, each column summing to 1, ordered to match the
        first replicate's programs.
    labels
        Cluster (consensus program) of each pooled replicate program, R*K values; replicate
        r's programs are entries ``r*K ... r*K + K - 1``.
    stability
        Silhouette of the pooled, L2-normalised programs under ``labels`` (NaN for K=1).
    replicate_cosine
        Per replicate: mean over its programs of the cosine similarity to its best
        one-to-one matched consensus program.
    """

    programs: torch.Tensor
    labels: torch.Tensor
    stability: float
    replicate_cosine: list[float]


def _fill_empty_clusters(points: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Give every one of the ``k`` clusters at least one point.

    Lloyd's k-means re-seeds an empty cluster, but if its iteration cap is reached right
    after a re-seed a cluster can end empty; a consensus program then has no members. The
    point farthest from its own cluster's centre (in a cluster of two or more) moves there.
    """
    labels = labels.clone()
    for j in range(k):
        if int((labels == j).sum()):
            continue
        sizes = torch.bincount(labels, minlength=k)
        centres = torch.stack([points[labels == c].mean(0) if sizes[c] else points[0] for c in range(k)])
        dist = (points - centres[labels]).norm(dim=1)
        dist[sizes[labels] < 2] = -1.0
        labels[int(dist.argmax())] = j
    return labels


def _to_tensor(programs) -> torch.Tensor:
    if torch.is_tensor(programs):
        return programs.detach().cpu().to(torch.float64)
    return torch.from_numpy(np.asarray(programs, dtype=np.float64))


def replicate_consensus(programs: Sequence, seed: int, restarts: int) -> ReplicateConsensus:
    """Cluster the programs of R replicate fits into K consensus programs.

    Parameters
    ----------
    programs
        One array (numpy or torch) per replicate, genes x K, non-negative; all the same shape.
    seed
        Seeds the k-means restarts.
    restarts
        k-means restarts; the lowest-inertia clustering is kept.

    Returns
    -------
    ReplicateConsensus
        Programs are the element-wise median of each cluster's L2-normalised members,
        clipped at 0 and rescaled to sum to 1 (the scale of :func:`normalize_programs`).
    """
    if len(programs) < 1:
        raise ValueError("replicate_consensus needs at least one replicate")
    reps = [_to_tensor(p) for p in programs]
    shape = reps[0].shape
    if any(r.shape != shape for r in reps):
        raise ValueError(f"replicate programs differ in shape: {[tuple(r.shape) for r in reps]}")
    n_genes, k = shape
    # L2 rows, as cNMF clusters spectra: a program's scale lives in its usage and says nothing
    # about which program it is
    pool = torch.cat([r.T for r in reps])
    pool = pool / pool.norm(dim=1, keepdim=True).clamp_min(_EPS)
    if k == 1:
        labels = torch.zeros(pool.shape[0], dtype=torch.long)
    else:
        labels = _fill_empty_clusters(pool, kmeans(pool, k, seed=seed, restarts=restarts), k)
    centres = cluster_medians(pool, labels, k)

    # order the consensus like replicate 1's programs, so names stay comparable with a single fit
    first = pool[:k]
    cos = (first @ (centres / centres.norm(dim=0, keepdim=True).clamp_min(_EPS))).numpy()
    rows, cols = linear_sum_assignment(-cos)
    order = cols[np.argsort(rows)]
    centres = centres[:, order]
    relabel = torch.empty(k, dtype=torch.long)
    relabel[torch.as_tensor(order)] = torch.arange(k)
    labels = relabel[labels]

    unit = centres / centres.norm(dim=0, keepdim=True).clamp_min(_EPS)
    agreement = []
    for r in range(len(reps)):
        sim = (pool[r * k:(r + 1) * k] @ unit).numpy()
        i, j = linear_sum_assignment(-sim)
        agreement.append(float(sim[i, j].mean()))
    stability = silhouette(pool, labels) if k > 1 else float("nan")
    return ReplicateConsensus(centres.to(torch.float32), labels, stability, agreement)
