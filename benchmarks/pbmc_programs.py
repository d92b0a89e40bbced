"""Programs on real cells: scanpy's bundled pbmc68k_reduced split into a pseudo case-control
study, fitted, and each program's top genes by raw weight and by specificity; and the
highly variable genes of deltanmf against scanpy's ``flavor="seurat_v3"`` on simulated counts.

scanpy is not a dependency of DeltaNMF: the steps that need it run in a virtualenv that has
it (``python3 -m venv /tmp/scanpy-venv && /tmp/scanpy-venv/bin/pip install scanpy scikit-misc``),
the others in the project's. In order:

    /tmp/scanpy-venv/bin/python benchmarks/pbmc_programs.py export /tmp/pbmc_cc.h5ad
    python benchmarks/pbmc_programs.py simulate /tmp/hvg_sim.h5ad
    /tmp/scanpy-venv/bin/python benchmarks/pbmc_programs.py scanpy-hvg /tmp/hvg_sim.h5ad /tmp/hvg_scanpy.txt
    python benchmarks/pbmc_programs.py run /tmp/pbmc_cc.h5ad /tmp/hvg_sim.h5ad /tmp/hvg_scanpy.txt

``run`` writes ``benchmarks/results/pbmc_programs.md``.

pbmc68k_reduced holds 700 cells x 765 genes with ``.X`` scaled (negative values) and
``.raw.X`` log-normalised; it has no counts, so the non-negative log-normalised values are
fitted. Cases: every CD14+ monocyte plus a random half of the other cells; controls: the
other half (no CD14+ monocyte), so a case program should take the monocytes' genes.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
UBIQUITOUS = ("RPS", "RPL", "FTL", "FTH1", "HNRNPA1", "EEF1A1", "TPT1", "MALAT1", "TMSB4X", "ACTB", "B2M")
N_TOP_HVG = 500


def export(out: str) -> None:
    import anndata as ad
    import scanpy as sc
    import scipy.sparse as sp

    pbmc = sc.datasets.pbmc68k_reduced()
    x = pbmc.raw.X
    x = x.toarray() if sp.issparse(x) else np.asarray(x)
    rng = np.random.default_rng(0)
    monocyte = (pbmc.obs["bulk_labels"] == "CD14+ Monocyte").to_numpy()
    condition = np.where(monocyte | (rng.random(pbmc.n_obs) < 0.5), "case", "control")
    obs = pd.DataFrame({"condition": condition, "cell_type": pbmc.obs["bulk_labels"].astype(str).to_numpy()},
                       index=pbmc.obs_names)
    ad.AnnData(sp.csr_matrix(x.astype(np.float32)), obs=obs, var=pd.DataFrame(index=pbmc.raw.var_names)).write_h5ad(out)
    print(f"{out}: {pbmc.n_obs} cells ({(condition == 'case').sum()} case, of which {monocyte.sum()} CD14+ monocytes)")


def simulate(out: str) -> None:
    import deltanmf

    deltanmf.simulate_case_control(n_genes=2000, n_programs=8, n_case_programs=2, n_control=1500, n_case=1500,
                                   markers_per_program=40, seed=11).write_h5ad(out)


def scanpy_hvg(path: str, out: str) -> None:
    import scanpy as sc

    adata = sc.read_h5ad(path)
    sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=N_TOP_HVG)
    Path(out).write_text("\n".join(adata.var_names[adata.var["highly_variable"]]))


def _top(scores: np.ndarray, genes, n: int = 10) -> list[list[str]]:
    return [list(np.asarray(genes)[np.argsort(-scores[:, j], kind="stable")[:n]]) for j in range(scores.shape[1])]


def _ubiquitous(gene: str) -> bool:
    return gene.startswith(UBIQUITOUS)


def run(data: str, sim: str, scanpy_genes: str) -> None:
    import anndata as ad

    load = Path("/proc/loadavg").read_text().split()[:3]
    out = Path("/tmp/pbmc_programs_run")
    command = [sys.executable, str(ROOT / "train.py"), "data=h5ad", f"data.path={data}", "K=8", "K_case=3",
               "data.group_key=cell_type", "logger=none", "trainer.enable_progress_bar=false", "overwrite=true",
               f"hydra.run.dir={out}"]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ))
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    result = ad.read_h5ad(out / "results" / "results.h5ad")
    names = list(result.uns["deltanmf"]["program_names"])
    genes = result.var_names
    usage = result.obsm["X_deltanmf_refit"]
    share = usage / usage.sum(axis=1, keepdims=True)
    by_type = pd.DataFrame(share, index=result.obs["cell_type"].to_numpy(), columns=names).groupby(level=0).mean()
    rankings = {"fitted (scaled) weight": result.varm["deltanmf_programs_scaled"],
                "expression weight": result.varm["deltanmf_programs"],
                "specificity": result.varm["deltanmf_specificity"]}
    tops = {label: _top(m, genes) for label, m in rankings.items()}
    lines = ["# Programs on real cells: pbmc68k_reduced, top genes by weight and by specificity", "",
             f"Written by `benchmarks/pbmc_programs.py` on {datetime.now():%Y-%m-%d %H:%M}; machine load "
             f"(1, 5, 15 min) {' '.join(load)}.", "", "Fit: `" + " ".join(["python", "train.py", *command[2:-1]])
             + " hydra.run.dir=...`", "",
             "Data: scanpy's `pbmc68k_reduced` (700 cells x 765 genes), its log-normalised `.raw.X` (the file holds "
             "no counts; `.X` is scaled and negative); cases = all CD14+ monocytes + a random half of the other "
             "cells, controls = the other half.", "",
             "## Ubiquitous genes among each program's 10 top genes", "",
             f"Ubiquitous: names starting with {', '.join(UBIQUITOUS)}.", "",
             "| ranking | programs with one in their top 10 | of the 110 top-10 places | RPS24 in the top 10 of |",
             "|---|---|---|---|"]
    summary = {}
    for label, top in tops.items():
        hits = [sum(_ubiquitous(g) for g in t) for t in top]
        rps24 = sum("RPS24" in t for t in top)
        summary[label] = {"programs_with_ubiquitous": sum(h > 0 for h in hits), "places": sum(hits), "rps24": rps24}
        lines.append(f"| {label} | {sum(h > 0 for h in hits)} of {len(top)} | {sum(hits)} | {rps24} programs |")
    lines += ["", "## Each program: the cell type using it most, and its 10 top genes", "",
              "| program | cell type (mean usage share) | by fitted weight (the old top_genes.csv) | by specificity |",
              "|---|---|---|---|"]
    for j, name in enumerate(names):
        cell_type = by_type[name].idxmax()
        lines.append(f"| {name} | {cell_type} ({by_type[name].max():.2f}) | {', '.join(tops['fitted (scaled) weight'][j])} "
                     f"| {', '.join(tops['specificity'][j])} |")
    metrics = json.loads((out / "results" / "metrics.json").read_text())
    cases = pd.read_csv(out / "results" / "case_programs.csv")
    lines += ["", f"Stage 2: {int(cases['emergent'].sum())} of {len(cases)} case programs emergent; explained-variance "
                  f"gain {metrics['stage2']['explained_variance_gain']:.4f}.", ""]

    # highly variable genes: deltanmf against scanpy's seurat_v3 (LOESS from scikit-misc) on the same counts
    from deltanmf.data import prepare, read_h5ad
    from deltanmf.workflow.config import default_settings

    simulated = read_h5ad(sim)
    settings = default_settings("data=h5ad", "data.source=anndata", "data.path=null", "data.min_cells=0",
                                f"data.n_top_genes={N_TOP_HVG}").data
    mine = set(prepare(simulated, settings, use_case=True).var.index)
    theirs = set(Path(scanpy_genes).read_text().split())
    truth = np.hstack([simulated.varm["sim_programs"], simulated.varm["sim_case_programs"]])
    marker = pd.Series((truth > np.median(truth, axis=1, keepdims=True) * (1 + 1e-9)).any(axis=1),
                       index=simulated.var_names)
    lines += ["## Highly variable genes against scanpy's seurat_v3", "",
              f"On simulated counts ({simulated.n_obs} cells x {simulated.n_vars} genes, {int(marker.sum())} planted "
              f"markers), {N_TOP_HVG} genes each (`data.n_top_genes={N_TOP_HVG}`, controls and cases pooled; scanpy "
              "`highly_variable_genes(flavor='seurat_v3')`, no batches):", "",
              "| | genes | shared with the other | planted markers among them |", "|---|---|---|---|",
              f"| deltanmf (LOWESS) | {len(mine)} | {len(mine & theirs)} | {int(marker[list(mine)].sum())} |",
              f"| scanpy (LOESS) | {len(theirs)} | {len(mine & theirs)} | {int(marker[list(theirs)].sum())} |", ""]
    path = ROOT / "benchmarks" / "results" / "pbmc_programs.md"
    path.write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    sub.add_parser("export").add_argument("out")
    sub.add_parser("simulate").add_argument("out")
    hvg = sub.add_parser("scanpy-hvg")
    hvg.add_argument("sim")
    hvg.add_argument("out")
    fit = sub.add_parser("run")
    fit.add_argument("data")
    fit.add_argument("sim")
    fit.add_argument("scanpy_genes")
    args = parser.parse_args()
    if args.step == "export":
        export(args.out)
    elif args.step == "simulate":
        simulate(args.out)
    elif args.step == "scanpy-hvg":
        scanpy_hvg(args.sim, args.out)
    else:
        run(args.data, args.sim, args.scanpy_genes)


if __name__ == "__main__":
    main()
