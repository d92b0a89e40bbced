"""Write a large simulated case-control ``.h5ad`` in chunks, never holding the whole matrix.

    python benchmarks/make_large.py /tmp/large.h5ad    # 1,000,000 controls + 100,000 cases x 2,000 genes
    python benchmarks/make_large.py small.h5ad --control 5000 --case 1000 --genes 500

The generative model is the demo simulator's (:mod:`deltanmf.data.simulate`), drawn one
chunk of cells at a time: the same planted programs (a shared lognormal background plus
disjoint marker sets), Dirichlet usage for controls, case cells with shifted usage of
``n_shifted`` baseline programs and case-only programs used by a fraction of their
perturbation group, and Poisson counts ``Poisson(library * usage @ programs.T)``. Only the
library size differs: its median is solved for so that about ``--density`` of the
entries are non-zero (10% by default, typical of 2,000 highly variable genes).
Controls and cases are interleaved in random order, as in a real screen.

The file is anndata's on-disk format, readable by ``anndata.read_h5ad``: ``.X`` float32
CSR (``data``/``indices``/``indptr`` appended per chunk), ``.obs`` (``condition``,
``perturbation``, ``library_size``), ``.var`` (``gene_symbol``) and the truth under the
keys :func:`deltanmf.data.simulation_truth` reads (``varm["sim_programs"]``,
``varm["sim_case_programs"]``, ``varm["sim_embedding"]``, ``obsm["sim_usage"]``,
``uns["simulation"]``).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deltanmf.data.generative import make_embedding, make_programs  # noqa: E402  (same planted programs)

LIBRARY_SIGMA = 0.3


def case_alpha(alpha: np.ndarray, shifted: np.ndarray, factor: float) -> np.ndarray:
    """Case concentrations: "down" programs divided by ``factor``, the concentration they
    give up shared among the "up" ones (as the demo simulator does)."""
    out = alpha.copy()
    down, up = shifted == -1, shifted == 1
    out[down] /= factor
    if down.any() and up.any():
        out[up] += (alpha[down] - out[down]).sum() * alpha[up] / alpha[up].sum()
    elif up.any():
        out[up] *= factor
    return out


def draw_usage(rng, is_case: np.ndarray, group: np.ndarray, alpha: np.ndarray, alpha_case: np.ndarray,
               n_case_programs: int, n_groups: int, case_fraction: float) -> np.ndarray:
    """Usage shares of a chunk of cells, cells x (K + K_case), rows on the simplex."""
    k = len(alpha)
    usage = np.zeros((len(is_case), k + n_case_programs))
    usage[~is_case, :k] = rng.dirichlet(alpha, size=int((~is_case).sum()))
    usage[is_case, :k] = rng.dirichlet(alpha_case, size=int(is_case.sum()))
    for c in range(n_case_programs):
        users = np.flatnonzero(is_case & (group == c % n_groups) & (rng.random(len(is_case)) < case_fraction))
        share = rng.uniform(0.3, 0.7, size=len(users))
        usage[users] *= (1.0 - share)[:, None]  # the whole row, so it stays on the simplex
        usage[users, k + c] = share
    return usage


def solve_library(rng, programs: np.ndarray, usage: np.ndarray, density: float) -> float:
    """Median library size at which the expected share of non-zero counts is ``density``."""
    spread = rng.lognormal(0.0, LIBRARY_SIGMA, size=len(usage))
    rate = (usage @ programs.T) * spread[:, None]
    lo, hi = np.log(1.0), np.log(1e8)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if np.mean(-np.expm1(-np.exp(mid) * rate)) < density:
            lo = mid
        else:
            hi = mid
    return float(np.exp(0.5 * (lo + hi)))


def write_annotations(path: str | Path, obs: pd.DataFrame, var: pd.DataFrame, uns: dict, programs: np.ndarray,
                      n_programs: int, embedding: np.ndarray) -> None:
    """Write an ``.h5ad`` of the annotations and the planted truth only (``varm["sim_programs"]``,
    ``["sim_case_programs"]``, ``["sim_embedding"]``, as :func:`deltanmf.data.simulation_truth`
    reads them); :func:`append_counts` adds the matrix and the usage."""
    meta = ad.AnnData(obs=obs, var=var, uns=uns)
    meta.varm["sim_programs"] = np.ascontiguousarray(programs[:, :n_programs])
    meta.varm["sim_case_programs"] = np.ascontiguousarray(programs[:, n_programs:])
    meta.varm["sim_embedding"] = embedding
    meta.write_h5ad(path)


def append_counts(path: str | Path, rng, programs_t: np.ndarray, library: np.ndarray, draw, chunk: int,
                  started: float | None = None) -> int:
    """Append ``.X`` (float32 CSR, ``Poisson(library * usage @ programs_t)``) and
    ``obsm["sim_usage"]`` to an ``.h5ad`` holding the annotations, ``chunk`` cells at a time:
    ``draw(first, last)`` gives those cells' usage. Progress lines every 10 chunks when
    ``started`` (a ``perf_counter`` time) is given. Returns the stored values."""
    n, n_genes, n_total = len(library), programs_t.shape[1], programs_t.shape[0]
    nnz = 0
    with h5py.File(path, "a") as f:
        x = f.create_group("X")
        x.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": np.array([n, n_genes])})
        data = x.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=(1 << 18,))
        indices = x.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 18,))
        indptr = x.create_dataset("indptr", shape=(n + 1,), dtype=np.int64)
        usage_out = f["obsm"].create_dataset("sim_usage", shape=(n, n_total), dtype=np.float32,
                                             chunks=(min(n, 65536), n_total))
        usage_out.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
        indptr[0] = 0
        for first in range(0, n, chunk):
            last = min(first + chunk, n)
            usage = draw(first, last)
            counts = rng.poisson((usage @ programs_t) * library[first:last, None])
            rows, cols = np.nonzero(counts)  # row-major: CSR order
            values = counts[rows, cols].astype(np.float32)
            data.resize((nnz + len(values),))
            indices.resize((nnz + len(values),))
            data[nnz:] = values
            indices[nnz:] = cols.astype(np.int32)
            indptr[first + 1:last + 1] = nnz + np.cumsum(np.bincount(rows, minlength=last - first))
            usage_out[first:last] = usage.astype(np.float32)
            nnz += len(values)
            del counts, rows, cols, values, usage
            if started is not None and (first // chunk) % 10 == 0:
                print(f"  {last:,} / {n:,} cells, {nnz / (last * n_genes):.3f} non-zero, "
                      f"{time.perf_counter() - started:.0f}s", flush=True)
    return nnz


def write_large(path: str | Path, n_control: int = 1_000_000, n_case: int = 100_000, n_genes: int = 2000,
                n_programs: int = 10, n_case_programs: int = 3, density: float = 0.1, n_groups: int = 3,
                n_shifted: int = 3, shift_factor: float = 3.0, case_fraction: float = 0.4,
                usage_concentration: float = 0.3, background_weight: float = 0.5, markers_per_program: int = 60,
                chunk: int = 20_000, seed: int = 0, verbose: bool = True) -> dict:
    """Write the file; returns a summary (cells, genes, non-zeros, density, library size, seconds)."""
    start = time.perf_counter()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_total = n_programs + n_case_programs
    if n_genes < n_total * markers_per_program:
        raise ValueError(f"n_genes={n_genes} is too small for {n_total} programs of {markers_per_program} markers")
    programs, specific = make_programs(rng, n_genes, n_total, markers_per_program, background_weight)
    embedding = make_embedding(rng, specific, 32, 0.5)
    alpha = np.full(n_programs, usage_concentration)
    shifted = np.zeros(n_programs, dtype=np.int64)
    shifted[rng.choice(n_programs, size=min(n_shifted, n_programs), replace=False)] = \
        np.where(np.arange(min(n_shifted, n_programs)) % 2 == 0, -1, 1)
    alpha_case = case_alpha(alpha, shifted, shift_factor)

    n = n_control + n_case
    is_case_all = np.zeros(n, dtype=bool)
    is_case_all[rng.choice(n, size=n_case, replace=False)] = True
    group_all = np.full(n, -1)
    group_all[is_case_all] = rng.permutation(np.arange(n_case) % n_groups)
    sample = rng.choice(n, size=min(n, 4000), replace=False)
    sample_usage = draw_usage(rng, is_case_all[sample], group_all[sample], alpha, alpha_case, n_case_programs,
                              n_groups, case_fraction)
    library_size = solve_library(rng, programs, sample_usage, density)
    library = rng.lognormal(np.log(library_size), LIBRARY_SIGMA, size=n)

    groups = [f"TARGET{g + 1}" for g in range(n_groups)]
    obs = pd.DataFrame({
        "condition": pd.Categorical(np.where(is_case_all, "case", "control"), categories=["control", "case"]),
        "perturbation": pd.Categorical(np.where(is_case_all, np.array(groups)[np.maximum(group_all, 0)], "NTC"),
                                       categories=["NTC", *groups]),
        "library_size": library,
    }, index=pd.Index([f"cell_{i}" for i in range(n)]))
    var = pd.DataFrame({"gene_symbol": [f"GENE{i + 1}" for i in range(n_genes)]},
                       index=pd.Index([f"ENSG{i + 1:011d}" for i in range(n_genes)]))
    params = dict(n_genes=n_genes, n_programs=n_programs, n_case_programs=n_case_programs, n_control=n_control,
                  n_case=n_case, n_groups=n_groups, n_shifted=n_shifted, shift_factor=shift_factor,
                  case_fraction=case_fraction, usage_concentration=usage_concentration,
                  background_weight=background_weight, markers_per_program=markers_per_program,
                  library_size=library_size, library_sigma=LIBRARY_SIGMA, density=density, seed=seed)
    uns = {"simulation": {
        "params": params, "shifted_programs": shifted,
        "case_program_groups": np.array([groups[c % n_groups] for c in range(n_case_programs)], dtype=object),
        "program_names": np.array([f"baseline_{k + 1}" for k in range(n_programs)], dtype=object),
        "case_program_names": np.array([f"case_{c + 1}" for c in range(n_case_programs)], dtype=object),
    }}
    write_annotations(path, obs, var, uns, programs, n_programs, embedding)
    del obs

    programs_t = np.ascontiguousarray(programs.T)

    def draw(first: int, last: int) -> np.ndarray:
        return draw_usage(rng, is_case_all[first:last], group_all[first:last], alpha, alpha_case, n_case_programs,
                          n_groups, case_fraction)

    nnz = append_counts(path, rng, programs_t, library, draw, chunk, start if verbose else None)
    summary = {"path": str(path), "cells": n, "control": n_control, "case": n_case, "genes": n_genes,
               "nonzeros": nnz, "density": nnz / (n * n_genes), "library_size": library_size,
               "seconds": time.perf_counter() - start, "bytes": path.stat().st_size}
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="the .h5ad file to write")
    parser.add_argument("--control", type=int, default=1_000_000, help="control cells")
    parser.add_argument("--case", type=int, default=100_000, help="case cells")
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--programs", type=int, default=10, help="planted baseline programs")
    parser.add_argument("--case-programs", type=int, default=3, help="planted case-only programs")
    parser.add_argument("--density", type=float, default=0.1, help="target share of non-zero entries")
    parser.add_argument("--markers", type=int, default=60, help="marker genes per program")
    parser.add_argument("--chunk", type=int, default=20_000, help="cells drawn and written at a time")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    s = write_large(args.path, args.control, args.case, args.genes, args.programs, args.case_programs, args.density,
                    markers_per_program=args.markers, chunk=args.chunk, seed=args.seed)
    print(f"wrote {s['path']}: {s['cells']:,} cells ({s['control']:,} control, {s['case']:,} case) x {s['genes']:,} "
          f"genes, {s['nonzeros']:,} non-zeros ({s['density']:.3f}), median library {s['library_size']:.0f}, "
          f"{s['bytes'] / 1e9:.2f} GB in {s['seconds']:.0f}s")


if __name__ == "__main__":
    main()
