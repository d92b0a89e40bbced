"""Does the gene-similarity prior help on real cells? Subsamples of real control cells, with and without it.

The 2,500 control (vehicle) cells of ``glioblastoma_lemur.h5ad`` (``../shared/data``; 300 genes,
raw counts) are split at random into two halves:

- half A stands in for a reference atlas: the similarity is the genes' co-expression over its
  cells, ``S = max(0, corr)`` of their log-normalised profiles (the same construction as a
  foundation-model resource, ``max(0, corr(E))``, with the cells as the embedding's dimensions),
  written as a ``resource=custom`` matrix;
- half B is the experiment: the programs fitted without the prior on all of its cells are the
  reference programs, and small subsamples of it (``--sizes``, ``--seeds`` each) are fitted
  with no prior, at fixed strengths and with ``rel_alpha=auto``.

Reported: the matched cosine of each subsample's programs with the reference programs (mean over
programs), its change against no prior on the same subsample (mean and standard error over
seeds), and for ``auto`` the strengths it chose. Co-expression from the same tissue is an
optimistic stand-in for a foundation-model resource: it describes these very cells.

    python benchmarks/prior_real.py            # writes benchmarks/results/prior_real.{md,png}
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import deltanmf  # noqa: E402
from deltanmf.core import matched_cosine  # noqa: E402
from deltanmf.resources import similarity_from_embeddings  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "glioblastoma_lemur.h5ad"
COMMON = ["trainer.enable_progress_bar=false", "trainer.accelerator=cpu", "logger=none"]


def log_profiles(counts) -> np.ndarray:
    """Genes x cells: log1p of counts scaled to the median library size."""
    x = np.asarray(counts.todense() if hasattr(counts, "todense") else counts, dtype=np.float64)
    totals = x.sum(axis=1, keepdims=True)
    x = x / np.maximum(totals, 1) * np.median(totals)
    return np.log1p(x).T


def write_resource(half: ad.AnnData, folder: Path) -> list[str]:
    """The co-expression similarity of ``half``'s cells as a ``resource=custom`` matrix and gene list."""
    s = similarity_from_embeddings(log_profiles(half.X))
    np.save(folder / "similarity.npy", s)
    genes = list(map(str, half.var_names))
    (folder / "genes.json").write_text(json.dumps(genes))
    return [f"resource.matrix={folder / 'similarity.npy'}", f"resource.genes={folder / 'genes.json'}"]


def fit(cells: ad.AnnData, k: int, seed: int, overrides: list[str]):
    return deltanmf.fit_onestage(cells, K=k, condition_key="condition", control="ctrl", normalize="median",
                                 seed=seed, overrides=[*COMMON, *overrides], verbose=False)


def programs_of(result) -> tuple[np.ndarray, list[str]]:
    return result.programs.to_numpy(), list(result.programs.index)


def run(args) -> tuple[dict, dict]:
    data = ad.read_h5ad(args.data)
    control = data[data.obs["condition"] == "ctrl"].copy()
    control.obs_names_make_unique()
    order = np.random.default_rng(args.split_seed).permutation(control.n_obs)
    half_a, half_b = control[order[: control.n_obs // 2]].copy(), control[order[control.n_obs // 2:]].copy()
    folder = Path(tempfile.mkdtemp(prefix="prior_real_"))
    resource = ["resource=custom", *write_resource(half_a, folder)]
    reference, genes = programs_of(fit(half_b, args.k, 0, ["model.stage1.rel_alpha=0"]))
    settings = {"none": ["model.stage1.rel_alpha=0"]}
    settings.update({f"{a:g}": [*resource, f"model.stage1.rel_alpha={a:g}"] for a in args.strengths})
    settings["auto"] = [*resource, "model.stage1.rel_alpha=auto"]
    rows = {}
    for size in args.sizes:
        for seed in range(args.seeds):
            pick = np.sort(np.random.default_rng(1000 * size + seed).choice(half_b.n_obs, size, replace=False))
            cells = half_b[pick].copy()
            for name, overrides in settings.items():
                result = fit(cells, args.k, seed, [*overrides, f"model.stage1.prior_from={args.prior_from}"])
                fitted, fitted_genes = programs_of(result)
                shared = [g for g in genes if g in set(fitted_genes)]
                ref = reference[[genes.index(g) for g in shared]]
                got = fitted[[fitted_genes.index(g) for g in shared]]
                stage = result.metrics["stage1"]
                rows[size, seed, name] = {"cosine": float(matched_cosine(got, ref).mean()),
                                          "chosen": stage.get("prior_selection", {}).get("chosen"),
                                          "laplacian": stage["loss"].get("laplacian")}
            print(f"{size} cells, seed {seed} done", flush=True)
    return rows, {"settings": list(settings), "cells_a": half_a.n_obs, "cells_b": half_b.n_obs,
                  "genes": len(genes)}


def table(rows: dict, args, names: list[str]) -> str:
    lines = ["| cells | setting | matched cosine to the reference (mean over programs) | change vs no prior | s.e. "
             "| seeds improved | smoothness (laplacian) | auto chose |", "|---|---|---|---|---|---|---|---|"]
    for size in args.sizes:
        base = np.array([rows[size, s, "none"]["cosine"] for s in range(args.seeds)])
        for name in names:
            got = [rows[size, s, name] for s in range(args.seeds)]
            cos = np.array([g["cosine"] for g in got])
            change = cos - base
            se = change.std(ddof=1) / np.sqrt(args.seeds)
            smooth = [g["laplacian"] for g in got if g["laplacian"] is not None]
            chosen = [g["chosen"] for g in got if g["chosen"] is not None]
            picks = ", ".join(f"{c:g} x{chosen.count(c)}" for c in sorted(set(chosen))) if chosen else ""
            label = "no prior" if name == "none" else f"rel_alpha={name}"
            lines.append(f"| {size} | {label} | {cos.mean():.4f} | {change.mean():+.4f} | {se:.4f} | "
                         f"{int(np.sum(change > 0))}/{args.seeds} | {np.mean(smooth) if smooth else float('nan'):.3f} "
                         f"| {picks} |")
    return "\n".join(lines)


def figure(rows: dict, args, names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name in names[1:]:
        change = np.array([[rows[size, s, name]["cosine"] - rows[size, s, "none"]["cosine"]
                            for s in range(args.seeds)] for size in args.sizes])
        se = change.std(axis=1, ddof=1) / np.sqrt(args.seeds)
        ax.errorbar(args.sizes, change.mean(axis=1), yerr=se, marker="o", capsize=3, label=f"rel_alpha={name}")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xticks(args.sizes, [str(s) for s in args.sizes])
    ax.minorticks_off()
    ax.set_xlabel("control cells in the subsample (half B)")
    ax.set_ylabel("matched cosine to the reference programs,\nchange vs no prior (mean ± s.e.)")
    ax.set_title("Glioblastoma control cells: prior from half A's co-expression", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 200, 400])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.1, 0.3])
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--prior-from", choices=("converged", "start"), default="start")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "prior_real.md"))
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else ["?"]
    start = time.perf_counter()
    rows, facts = run(args)
    elapsed = time.perf_counter() - start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure(rows, args, facts["settings"], out.with_suffix(".png"))
    command = " ".join(["python benchmarks/prior_real.py", *sys.argv[1:]])
    text = (f"Command: `{command}`  \n"
            f"Date: {datetime.date.today().isoformat()}; machine: {platform.machine()}, {os.cpu_count()} CPUs, load "
            f"{' '.join(load)} at the start; {elapsed:.0f} s.  \n"
            f"Data: `glioblastoma_lemur.h5ad`, control (vehicle) cells, split at random (seed {args.split_seed}) into "
            f"half A ({facts['cells_a']} cells: the co-expression similarity, resource=custom) and half B "
            f"({facts['cells_b']} cells); {facts['genes']} genes kept; K={args.k}; data.normalize=median; "
            f"prior_from={args.prior_from}. Reference: half B's programs fitted on all its cells without the prior. "
            f"Each subsample size x {args.seeds} seeds. Figure: {out.with_suffix('.png').name}.\n\n"
            + table(rows, args, facts["settings"]) + "\n")
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
