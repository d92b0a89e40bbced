"""Does the gene-similarity prior help where data are scarce? Recovery and smoothness against its strength.

A simulated dataset with few control cells and shallow (noisy) counts is fitted in stage 1
through the pipeline (``deltanmf.fit_onestage``) with the simulated gene embeddings as the
similarity resource (``resource=demo``: ``S = max(0, corr(E))``), at several relative
strengths ``model.stage1.rel_alpha`` (0 = no prior), over several seeds, twice (``--stage 2``:
stage 2 of a two-stage fit with one planted case program and few case cells, varying
``model.stage2.rel_alpha`` with stage 1's prior off):

- informative: the embeddings as simulated (``--noise`` sets how much of the program
  structure they carry: ``embedding_noise`` of the simulator);
- uninformative: the same embeddings with their gene labels shuffled (rows permuted), so
  the graph has the same weights but says nothing about the programs.

Reported per strength, averaged over seeds: recovery of the planted programs (matched
cosine, mean over programs and worst program), its change against no prior on the same
seed (mean, standard error over seeds, seeds improved), and the programs' smoothness in
the graph's sense: the prior's term as metrics.json reports it (``loss.laplacian``, the
mean normalised Rayleigh quotient, 1 = unrelated to the graph, lower = smoother), beside
that of the planted programs on the same graph. Usage:

    python benchmarks/prior_strength.py            # writes benchmarks/results/prior_strength.{md,png}
    python benchmarks/prior_strength.py --noise 0.5 --out benchmarks/results/prior_strength_noise05.md
    python benchmarks/prior_strength.py --stage 2 --cases 60 --out benchmarks/results/prior_strength_stage2.md

``--strengths`` may name ``auto`` (``rel_alpha=auto``: the strength chosen from held-out entries,
reported with the strengths it chose); ``--prior-from start`` switches the prior on from the
first step instead of once the rest of the loss has converged.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

import deltanmf
from deltanmf.core import GeneGraph
from deltanmf.resources import similarity_from_embeddings

ROOT = Path(__file__).resolve().parents[1]
STRENGTHS = (0.0, 0.03, 0.1, 0.3, 1.0, 3.0)
GRAPHS = ("informative", "shuffled")
FLOOR = -0.04  # recovery changes below this are drawn at it, with their value written beside


def _plain_rayleigh(graph: GeneGraph, programs: torch.Tensor) -> torch.Tensor:
    """w^T L w / w^T w per program (the Laplacian of the column-L2-normalised programs), averaged."""
    return (graph.quadratic(programs) / torch.sum(programs**2, dim=0)).mean()


def _sum_normalised(graph: GeneGraph, programs: torch.Tensor) -> torch.Tensor:
    """The Laplacian of the column-sum-normalised programs, w^T L w / (1^T w)^2, averaged."""
    return (graph.quadratic(programs) / torch.sum(programs, dim=0) ** 2).mean()


# --penalty: the formulations compared in docs/prior.md; "normalised" is the package's own
PENALTIES = {"normalised": None, "rayleigh": _plain_rayleigh, "sum": _sum_normalised}


def simulate(seed: int, args, shuffled: bool):
    # stage 2: one case program, used by a share of all case cells (one perturbation group)
    adata = deltanmf.simulate_case_control(n_genes=args.genes, n_programs=args.programs, n_case_programs=1,
                                           n_control=args.controls, n_case=args.cases, n_groups=1,
                                           markers_per_program=args.markers, library_size=args.library,
                                           embedding_noise=args.noise, seed=seed)
    if shuffled:  # the same similarities, attached to the wrong genes
        order = np.random.default_rng(10_000 + seed).permutation(adata.n_vars)
        adata.varm["sim_embedding"] = np.asarray(adata.varm["sim_embedding"])[order]
    return adata


def planted_smoothness(adata, result, stage: int) -> float:
    """The prior's measure of the planted programs, on the graph the run used (its kept genes,
    in the scaled units the programs are fitted in)."""
    genes = adata.var_names.get_indexer(result.programs.index)
    graph = GeneGraph(torch.from_numpy(similarity_from_embeddings(np.asarray(adata.varm["sim_embedding"])[genes])))
    scale = result.results.var["deltanmf_gene_scale"].to_numpy()
    truth = np.asarray(adata.varm["sim_programs" if stage == 1 else "sim_case_programs"])[genes] / scale[:, None]
    return float(graph.rayleigh(torch.as_tensor(truth, dtype=torch.float32)).mean())


def run(args, strengths) -> dict:
    overrides = ["resource=demo", "trainer.enable_progress_bar=false", "trainer.accelerator=cpu",
                 f"model.stage{args.stage}.prior_from={args.prior_from}"]
    if args.stage == 2:  # the baseline without the prior, so that only stage 2's strength varies
        overrides.append("model.stage1.rel_alpha=0")
    rows = {}
    for graph in GRAPHS:
        for seed in range(args.seeds):
            for alpha in strengths:
                adata = simulate(seed, args, graph == "shuffled")
                key = f"model.stage{args.stage}.rel_alpha={alpha}"
                if args.stage == 1:
                    res = deltanmf.fit_onestage(adata, K=args.programs, seed=seed, overrides=[*overrides, key])
                else:
                    res = deltanmf.fit_twostage(adata, K=args.programs, K_case=1, seed=seed,
                                                overrides=[*overrides, key])
                stage = res.metrics[f"stage{args.stage}"]
                found = res.metrics["recovery"]
                cos = np.asarray(found["baseline_matched_cosine" if args.stage == 1 else "case_matched_cosine"])
                rows[graph, seed, alpha] = dict(mean=cos.mean(), worst=cos.min(), smooth=stage["loss"]["laplacian"],
                                                planted=planted_smoothness(adata, res, args.stage),
                                                steps=stage["steps"], reason=stage["stop_reason"],
                                                chosen=stage.get("prior_selection", {}).get("chosen"),
                                                curve=stage.get("prior_selection", {}).get("curve"))
            print(f"{graph} seed {seed} done", flush=True)
    return rows


def table(rows: dict, graph: str, strengths, seeds: int, default: float | None) -> str:
    lines = ["| rel_alpha | recovery mean | worst program | change vs no prior | s.e. | seeds improved "
             "| smoothness (laplacian) | planted programs' | steps | stop reasons |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    base = np.array([rows[graph, s, 0.0]["mean"] for s in range(seeds)])
    for alpha in strengths:
        got = [rows[graph, s, alpha] for s in range(seeds)]
        mean = np.array([g["mean"] for g in got])
        change = mean - base
        se = change.std(ddof=1) / np.sqrt(seeds) if seeds > 1 else float("nan")
        reasons = ", ".join(f"{r} {sum(g['reason'] == r for g in got)}"
                            for r in sorted({g["reason"] for g in got}))
        if alpha == "auto":
            chosen = [g["chosen"] for g in got]
            label = "auto (chose " + ", ".join(f"{c:g} x{chosen.count(c)}" for c in sorted(set(chosen))) + ")"
        else:
            label = f"**{alpha:g}** (default)" if alpha == default else f"{alpha:g}"
        lines.append(f"| {label} | {mean.mean():.4f} | {np.mean([g['worst'] for g in got]):.4f} | {change.mean():+.4f} "
                     f"| {se:.4f} | {int(np.sum(change > 0))}/{seeds} | {np.mean([g['smooth'] for g in got]):.3f} "
                     f"| {np.mean([g['planted'] for g in got]):.3f} | {np.mean([g['steps'] for g in got]):.0f} "
                     f"| {reasons} |")
    return "\n".join(lines)


def held_out_table(rows: dict, graph: str, seeds: int) -> str:
    """rel_alpha=auto's held-out curves: the held-out error per strength (mean over seeds) and the
    seeds on which each strength was the best."""
    curves = [rows[graph, s, "auto"]["curve"] for s in range(seeds)]
    grid = curves[0]["rel_alpha"]
    errors = np.array([c["heldout_recon"] for c in curves])
    best = errors.argmin(axis=1)
    lines = ["| rel_alpha | held-out MSE per entry (mean over seeds) | change vs no prior | seeds where best |",
             "|---|---|---|---|"]
    for i, alpha in enumerate(grid):
        change = errors[:, i] - errors[:, grid.index(0.0)]
        lines.append(f"| {alpha:g} | {errors[:, i].mean():.5f} | {change.mean():+.5f} | {int(np.sum(best == i))}/{seeds} |")
    return "\n".join(lines)


def figure(rows: dict, strengths, seeds: int, stage: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # a file, no display
    import matplotlib.pyplot as plt

    auto = "auto" in strengths
    strengths = [a for a in strengths if a != "auto"]
    x = np.array(strengths)
    x_plot = np.where(x == 0, x[x > 0].min() / 3, x)  # 0 drawn left of the smallest strength on a log axis
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for graph, colour, lift in zip(GRAPHS, ("tab:blue", "tab:orange"), (16, 5)):
        base = np.array([rows[graph, s, 0.0]["mean"] for s in range(seeds)])
        change = np.array([[rows[graph, s, a]["mean"] - b for s, b in enumerate(base)] for a in strengths])
        se = change.std(axis=1, ddof=1) / np.sqrt(seeds) if seeds > 1 else np.zeros(len(strengths))
        mean = change.mean(axis=1)
        if auto:
            axes[0].axhline(np.mean([rows[graph, s, "auto"]["mean"] - b for s, b in enumerate(base)]), color=colour,
                            linestyle="--", linewidth=1, label=f"rel_alpha=auto, {graph}")
        shown = np.maximum(mean, FLOOR)  # a collapse at the strongest strengths would flatten the rest
        axes[0].errorbar(x_plot, shown, yerr=np.where(mean > FLOOR, se, 0), marker="o", color=colour, capsize=3,
                         label=f"{graph} embeddings")
        for xi, m in zip(x_plot[mean < FLOOR], mean[mean < FLOOR]):
            axes[0].annotate(f"{m:+.3f}", (xi, FLOOR), textcoords="offset points", xytext=(-34, lift), fontsize=8,
                             color=colour)
        smooth = np.array([[rows[graph, s, a]["smooth"] for s in range(seeds)] for a in strengths]).mean(axis=1)
        planted = np.mean([rows[graph, s, 0.0]["planted"] for s in range(seeds)])
        axes[1].plot(x_plot, smooth, marker="o", color=colour, label=f"fitted, {graph}")
        axes[1].axhline(planted, color=colour, linestyle=":", label=f"planted, {graph}")
    axes[0].axhline(0, color="grey", linewidth=0.8)
    axes[0].set_ylim(FLOOR - 0.005, None)
    axes[0].set_ylabel("recovery change vs rel_alpha=0\n(matched cosine, mean ± s.e. over seeds)")
    axes[1].set_ylabel("smoothness: mean normalised\nRayleigh quotient (1 = unrelated)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xticks(x_plot, ["0"] + [f"{a:g}" for a in x[1:]])
        ax.minorticks_off()
        ax.set_xlabel(f"model.stage{stage}.rel_alpha")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--stage", type=int, choices=(1, 2), default=1,
                        help="1: baseline programs (stage=onestage); 2: one case program (stage=twostage, "
                             "model.stage1.rel_alpha=0), varying model.stage2.rel_alpha")
    parser.add_argument("--controls", type=int, default=40, help="control cells (few)")
    parser.add_argument("--cases", type=int, default=20, help="case cells (stage 2: few)")
    parser.add_argument("--library", type=float, default=150.0, help="median counts per cell (low = noisy)")
    parser.add_argument("--noise", type=float, default=0.3, help="embedding noise of the simulated resource")
    parser.add_argument("--genes", type=int, default=600)
    parser.add_argument("--programs", type=int, default=6)
    parser.add_argument("--markers", type=int, default=40, help="marker genes per program")
    parser.add_argument("--strengths", default=",".join(f"{a:g}" for a in STRENGTHS),
                        help="rel_alpha values, comma-separated (0 is always added: the reference)")
    parser.add_argument("--prior-from", choices=("converged", "start"), default="start",
                        help="when the prior switches on (model.stageN.prior_from)")
    parser.add_argument("--penalty", choices=list(PENALTIES), default="normalised",
                        help="the prior's formulation in training (the smoothness reported is the package's own "
                             "measure whatever this is): normalised (the package's), rayleigh (w^T L w / w^T w), "
                             "sum (w^T L w / (1^T w)^2)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "prior_strength.md"))
    args = parser.parse_args()
    if PENALTIES[args.penalty] is not None:  # training uses the alternative; metrics.json's measure stays the same
        import deltanmf.train.modules as modules

        modules.laplacian_penalty = PENALTIES[args.penalty]
    logging.disable(logging.INFO)
    torch.set_num_threads(1)
    default = getattr(deltanmf.default_settings().model, f"stage{args.stage}").rel_alpha
    named = args.strengths.split(",")
    strengths = {float(a) for a in named if a != "auto"} | {0.0}
    if args.penalty == "normalised":  # the default belongs to the package's formulation
        strengths.add(default)
    else:
        default = None
    strengths = tuple(sorted(strengths)) + (("auto",) if "auto" in named else ())
    load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else ["?"]
    start = time.perf_counter()
    rows = run(args, strengths)
    elapsed = time.perf_counter() - start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    picture = out.with_suffix(".png")
    figure(rows, strengths, args.seeds, args.stage, picture)
    sections = [f"### {graph} embeddings\n\n{table(rows, graph, strengths, args.seeds, default)}" for graph in GRAPHS]
    if "auto" in strengths:
        sections += [f"### held-out error, {graph} embeddings (rel_alpha=auto's curves)\n\n"
                     f"{held_out_table(rows, graph, args.seeds)}" for graph in GRAPHS]
    command = " ".join(["python benchmarks/prior_strength.py", *sys.argv[1:]])
    text = (f"Command: `{command}`  \n"
            f"Date: {datetime.date.today().isoformat()}; machine: {platform.machine()}, {os.cpu_count()} CPUs, "
            f"load {' '.join(load)} at the start; {elapsed:.0f} s.  \n"
            f"Data: {args.seeds} seeds (0..{args.seeds - 1}); {args.genes} genes, {args.programs} planted programs "
            f"with {args.markers} markers each, {args.controls} control cells, {args.cases} case cells, median "
            f"{args.library:g} counts per cell; resource=demo (S = max(0, corr(E)), dense) with embedding noise "
            f"{args.noise:g}; " + ("stage 1 (stage=onestage), recovery of the baseline programs; "
                                   if args.stage == 1 else
                                   "stage 2 (stage=twostage, K_case=1, model.stage1.rel_alpha=0), recovery of the "
                                   "planted case program (used by 40% of the case cells); ") +
            ("the prior on once the rest of the loss has converged (prior_from=converged); "
             if args.prior_from == "converged" else "") +
            ("" if args.penalty == "normalised" else
             f"the prior trained with the {args.penalty!r} formulation (--penalty; the smoothness column is still "
             "the package's measure); ") +
            "the defaults otherwise. Shuffled: the embedding's gene labels permuted. "
            f"Figure: {picture.name}.\n\n" + "\n\n".join(sections) + "\n")
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
