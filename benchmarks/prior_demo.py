"""The demo with and without the gene-similarity prior: ``python train.py resource=demo`` against
``python train.py resource=none``, both stages, at the defaults.

Reported per run: recovery of the planted baseline and case programs (matched cosine, mean and
worst), and the programs' smoothness in the demo graph's sense (the prior's own measure, the
mean normalised Rayleigh quotient on ``S = max(0, corr(E))`` of the demo's simulated embeddings;
1 = unrelated to the graph, lower = smoother), computed the same way for both runs, beside the
planted programs' own smoothness on that graph. Usage:

    python benchmarks/prior_demo.py            # writes benchmarks/results/prior_demo.md
    python benchmarks/prior_demo.py seed=1     # extra Hydra overrides apply to both runs
"""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import torch

from deltanmf.core import GeneGraph
from deltanmf.data.demo import demo_path
from deltanmf.resources import similarity_from_embeddings
from deltanmf.workflow.config import default_settings

ROOT = Path(__file__).resolve().parents[1]
RESOURCES = ("none", "demo")


def smoothness(graph: GeneGraph, programs: np.ndarray) -> float:
    return float(graph.rayleigh(torch.as_tensor(programs, dtype=torch.float32)).mean())


def main() -> None:
    extra = sys.argv[1:]
    settings = default_settings(*extra)
    source = ad.read_h5ad(demo_path(settings.data.simulation, settings.data.cache_dir))
    load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else ["?"]
    lines = ["| run | baseline recovery mean | worst | case recovery mean | worst | baseline smoothness "
             "| case smoothness | stage 1 steps (stop) | stage 2 steps (stop) | wall (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    planted = None
    with tempfile.TemporaryDirectory(prefix="prior-demo-") as scratch:
        for name in RESOURCES:
            run_dir = Path(scratch) / name
            start = time.perf_counter()
            subprocess.run([sys.executable, str(ROOT / "train.py"), f"resource={name}", f"hydra.run.dir={run_dir}",
                            "trainer.enable_progress_bar=false", "logger=none", *extra], check=True,
                           capture_output=True, text=True)
            wall = time.perf_counter() - start
            metrics = json.loads((run_dir / "results" / "metrics.json").read_text())
            result = ad.read_h5ad(run_dir / "results" / "results.h5ad")
            genes = source.var_names.get_indexer(result.var_names)
            graph = GeneGraph(torch.from_numpy(
                similarity_from_embeddings(np.asarray(source.varm["sim_embedding"])[genes])))
            programs = np.asarray(result.varm["deltanmf_programs_scaled"])  # as fitted: what the prior shapes
            kind = np.asarray(result.uns["deltanmf"]["program_kind"])
            scale = result.var["deltanmf_gene_scale"].to_numpy()[:, None]
            planted = (smoothness(graph, np.asarray(source.varm["sim_programs"])[genes] / scale),
                       smoothness(graph, np.asarray(source.varm["sim_case_programs"])[genes] / scale))
            rec = metrics["recovery"]
            s1, s2 = metrics["stage1"], metrics["stage2"]
            lines.append(f"| resource={name} | {rec['baseline_mean']:.5f} | {rec['baseline_min']:.5f} | "
                         f"{rec['case_mean']:.5f} | {rec['case_min']:.5f} | "
                         f"{smoothness(graph, programs[:, kind == 'baseline']):.4f} | "
                         f"{smoothness(graph, programs[:, kind == 'case']):.4f} | {s1['steps']} ({s1['stop_reason']}) | "
                         f"{s2['steps']} ({s2['stop_reason']}) | {wall:.1f} |")
    lines.append(f"| planted programs | | | | | {planted[0]:.4f} | {planted[1]:.4f} | | | |")
    model = settings.model
    command = " ".join(["python benchmarks/prior_demo.py", *extra])
    text = (f"Command: `{command}`  \n"
            f"Date: {datetime.date.today().isoformat()}; {os.cpu_count()} CPUs, load {' '.join(load)} at the start. "
            f"Runs: `python train.py resource=none|demo` (two stages, the demo: 1,500 control + 1,500 case cells x "
            f"1,500 genes, K=10, K_case=3), model.stage1.rel_alpha={model.stage1.rel_alpha:g}, "
            f"model.stage2.rel_alpha={model.stage2.rel_alpha:g}. Smoothness: the mean normalised Rayleigh "
            "quotient on the demo graph (1 = unrelated to it, lower = smoother), the same computation for both "
            "runs.\n\n" + "\n".join(lines) + "\n")
    out = ROOT / "benchmarks" / "results" / "prior_demo.md"
    if not extra:
        out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
