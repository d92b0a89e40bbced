"""Peak memory of stage 1 on a large sparse matrix, relative to what it must hold.

Each case (a number of cells, a mode: full batch or minibatch, and a
``data.transposed_copy`` setting) runs in a fresh process that imports everything and
runs stage 1 once on a tiny matrix (so lazy imports count as overhead), records its
resident memory, builds a random sparse CSR matrix in chunks (no dense copy at any
time), and runs stage 1 through the real code path (:func:`deltanmf.tl.fit.fit_stage1`:
the default consensus initialisation, training, fit error, checkpoint). Reported: peak
RSS (``ru_maxrss``) minus the RSS before the matrix was built, divided by the bytes that
must exist anyway: the CSR arrays, the model's parameters (programs and per-cell usage)
and Adam's two moments of each. Usage:

    python benchmarks/memory.py                  # 40k, 100k and 200k cells x 2000 genes, 5% non-zero
    python benchmarks/memory.py --cells 20000 --steps 50   # a quick check

The sizes straddle ``model.consensus.max_cells`` (50,000): up to it the initialisation
fits every cell, above it a random subset of that many. The table is printed and
written to ``benchmarks/results/memory.md``.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (mode, data.transposed_copy)
CASES = (("full batch", "auto"), ("full batch", "false"), ("minibatch", "auto"))


def _rss_mb() -> float:
    """Current resident set size, from /proc (ru_maxrss is the peak, not the current value)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def random_csr(n_cells: int, n_genes: int, density: float, seed: int, chunk: int = 1000):
    """A random float32 CSR matrix built chunk by chunk into preallocated arrays.

    Two passes over the same seeded chunks: the first counts the non-zeros per cell, the
    second fills them in, so only one chunk of random numbers exists at a time.
    """
    import numpy as np
    import scipy.sparse as sp

    def mask(start: int):
        rng = np.random.default_rng([seed, start])
        rows = min(chunk, n_cells - start)
        return rng, rng.random((rows, n_genes), dtype=np.float32) < density

    indptr = np.zeros(n_cells + 1, dtype=np.int64)
    for start in range(0, n_cells, chunk):
        _, m = mask(start)
        indptr[start + 1:start + 1 + m.shape[0]] = m.sum(axis=1)
    np.cumsum(indptr, out=indptr)
    nnz = int(indptr[-1])
    index_dtype = np.int32 if nnz < 2**31 else np.int64
    indices = np.empty(nnz, dtype=index_dtype)
    data = np.empty(nnz, dtype=np.float32)
    for start in range(0, n_cells, chunk):
        rng, m = mask(start)
        lo, hi = indptr[start], indptr[start + m.shape[0]]
        indices[lo:hi] = np.nonzero(m)[1]  # row-major: sorted columns within each row
        data[lo:hi] = rng.gamma(2.0, 1.0, hi - lo).astype(np.float32)
    return sp.csr_matrix((data, indices, indptr.astype(index_dtype)), shape=(n_cells, n_genes))


def worker(args) -> dict:
    """One mode in this process; returns the measurements."""
    import torch

    from deltanmf.tl.fit import fit_stage1
    from deltanmf.workflow.config import default_settings
    from deltanmf.workflow.run import training_plan

    torch.set_num_threads(args.threads)
    run_dir = Path(tempfile.mkdtemp(prefix="deltanmf-memory-"))

    def stage1(x, batch: str, directory: Path):
        settings = default_settings(f"K={args.k}", f"data.batch_size={batch}", f"trainer.max_steps={args.steps}",
                                    "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "logger=none",
                                    f"data.transposed_copy={args.transposed_copy}")
        return fit_stage1(x, settings.K, settings.model, training_plan(settings, directory), seed=settings.seed)

    minibatch = args.mode != "full batch"
    # A tiny run first, in the same mode, so lazily imported modules and torch's one-off
    # allocations count as the process's overhead, not as memory used for the data.
    stage1(random_csr(1000, args.genes, args.density, args.seed + 1), "250" if minibatch else "null",
           run_dir / "warmup")
    before = _rss_mb()
    start = time.perf_counter()
    x = random_csr(args.cells, args.genes, args.density, args.seed)
    build_s = time.perf_counter() - start
    after_build = _rss_mb()
    start = time.perf_counter()
    fit = stage1(x, str(args.batch_size) if minibatch else "null", run_dir)
    fit_s = time.perf_counter() - start
    peak = _peak_mb()

    csr_bytes = x.data.nbytes + x.indices.nbytes + x.indptr.nbytes
    params = (args.cells + args.genes) * args.k * 4  # float32 programs and usage
    required = csr_bytes + 3 * params  # parameters + Adam's exp_avg and exp_avg_sq
    max_cells = default_settings().model.consensus.max_cells
    return {"mode": args.mode, "transposed_copy": args.transposed_copy, "max_cells": max_cells,
            "cells": args.cells, "genes": args.genes, "nnz": int(x.nnz),
            "csr_mb": csr_bytes / 2**20, "params_mb": params / 2**20, "required_mb": required / 2**20,
            "rss_before_mb": before, "rss_after_build_mb": after_build, "peak_rss_mb": peak,
            "ratio": (peak - before) * 2**20 / required, "steps": fit.stats["steps"],
            "build_s": build_s, "fit_s": fit_s, "relative_error": fit.stats["relative_error"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, nargs="+", default=[40_000, 100_000, 200_000])
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--steps", type=int, default=300, help="step cap of stage 1 (trainer.max_steps)")
    parser.add_argument("--batch-size", type=int, default=10_000, help="cells per minibatch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mode", choices=sorted({m for m, _ in CASES}), help=argparse.SUPPRESS)  # worker processes
    parser.add_argument("--transposed-copy", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory.md"))
    args = parser.parse_args(argv)
    if args.mode:
        args.cells = args.cells[0]
        print(json.dumps(worker(args)))
        return

    given = list(sys.argv[1:] if argv is None else argv)
    rows = []
    for cells in args.cells:
        for mode, copy in CASES:
            cmd = [sys.executable, __file__, *given, "--cells", str(cells), "--mode", mode,
                   "--transposed-copy", copy]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                sys.stderr.write(done.stderr)
                raise SystemExit(f"{cells} cells, {mode}, transposed_copy={copy}: the worker failed "
                                 f"(exit {done.returncode})")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)

    r0 = rows[0]
    command = "python benchmarks/memory.py " + " ".join(given)
    lines = [
        "# Peak memory of stage 1 on sparse input",
        "",
        f"`{command.strip()}` on {platform.machine()} CPU ({args.threads} threads), "
        f"{time.strftime('%Y-%m-%d')}.",
        "",
        f"Data: cells x {r0['genes']:,} genes, {args.density:.0%} non-zero, float32 CSR with int32 indices "
        f"(8 bytes per non-zero); K={args.k}. Required = the CSR arrays + the parameters (programs and usage) + "
        "Adam's two moments of each.",
        "",
        "Each case runs in a fresh process: RSS is read after all imports and a warm-up fit on 1,000 cells, "
        "then the matrix is built",
        "and stage 1 runs through `deltanmf.tl.fit.fit_stage1` with the default settings (the 5-run consensus "
        f"initialisation, on every cell up to `model.consensus.max_cells` = {r0['max_cells']:,} and on a random "
        f"subset of that many above it; training capped at {args.steps} steps; fit error over all cells; "
        "checkpoint), except `data.transposed_copy` where the table says `false`.",
        "Ratio = (peak RSS - RSS before the matrix) / required bytes; the target is < 2. Fit times are",
        "wall times on a machine possibly shared with other jobs: a memory benchmark, not a speed one.",
        "",
        "| cells | mode | `data.transposed_copy` | CSR (MiB) | required (MiB) | peak - before (MiB) | ratio | steps | "
        "fit time (s) |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mode = r["mode"] + ("" if r["mode"] == "full batch" else f" ({args.batch_size:,} cells)")
        lines.append(f"| {r['cells']:,} | {mode} | {r['transposed_copy']} | {r['csr_mb']:.0f} | {r['required_mb']:.0f} | "
                     f"{r['peak_rss_mb'] - r['rss_before_mb']:.0f} | {r['ratio']:.2f} | {r['steps']} | {r['fit_s']:.1f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(table)


if __name__ == "__main__":
    main()
