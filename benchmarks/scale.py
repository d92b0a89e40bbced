"""Stage 1 on a million cells streamed from disk (``data.backed=true``), one machine.

    python benchmarks/make_large.py /tmp/large_1m.h5ad     # 1,000,000 control + 100,000 case cells
    python benchmarks/scale.py /tmp/large_1m.h5ad           # writes benchmarks/results/scale.md
    python benchmarks/scale.py FILE --batch-size 4096 --max-steps 2000 trainer.accelerator=gpu   # extra Hydra overrides

Two measurements:

1. Reading: rows per second that :class:`deltanmf.data.H5adRows` serves from the file for
   the control cells, as one epoch's block-shuffled minibatches (what training reads),
   as uniformly random minibatches (one read per cell, for comparison) and as
   consecutive blocks (what the preparation passes and the evaluation read).
2. The fit: ``train.py stage=onestage data=h5ad data.backed=true`` in a child process,
   from opening the file to the written outputs. Reported: wall time and the time of each
   part (preparation = everything before the consensus initialisation; the training
   steps; the rest = final usage/error passes and the outputs), optimiser steps,
   cells per second of training (steps x batch size / training time), the child's peak
   RSS (``getrusage(RUSAGE_CHILDREN).ru_maxrss``), relative error and the matched cosine
   of the fitted to the planted programs. The machine's load average is recorded too: on
   a shared machine the times vary with it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def read_speed(path: str, batch_size: int, batches: int = 60, seed: int = 0) -> dict:
    """Rows per second served from the control cells of ``path`` (raw counts, all genes)."""
    from deltanmf.data import H5adRows, open_h5ad
    from deltanmf.core.matrix import scan_rows

    file = open_h5ad(path)
    matrix = file.matrix()
    control = np.flatnonzero((file.obs["condition"].astype(str) == "control").to_numpy())
    rows = H5adRows(matrix, control, np.arange(matrix.shape[1]), np.ones(len(control)), np.ones(matrix.shape[1]))
    rng = np.random.default_rng(seed)

    def rate(indices) -> float:
        start, n = time.perf_counter(), 0
        for index in indices:
            n += rows.read_rows(index).shape[0]
        return n / (time.perf_counter() - start)

    block = rows.batch_indices(batch_size, rng)[:batches]
    scattered = [np.sort(rng.choice(len(rows), batch_size, replace=False)) for _ in range(max(3, batches // 10))]
    chunk = scan_rows(rows.shape[1])  # as preparation and evaluation read the file
    consecutive = [np.arange(s, min(s + chunk, len(rows))) for s in range(0, min(len(rows), 6 * chunk), chunk)]
    first = rate(block)  # as a training epoch reads them; parts of the file may not be in the page cache
    return {"block_shuffled": first, "block_shuffled_cached": rate(block), "uniform_random": rate(scattered),
            "consecutive": rate(consecutive), "consecutive_rows": chunk, "cells": len(rows), "total": file.n_obs, "nonzeros": matrix.n_stored,
            "file_gb": Path(path).stat().st_size / 1e9}


def fit(path: str, run_dir: Path, batch_size: int, max_steps: int, extra: list[str]) -> dict:
    """train.py in a child process; its wall time, peak RSS and metrics."""
    overrides = ["stage=onestage", "data=h5ad", f"data.path={path}", "data.backed=true",
                 f"data.batch_size={batch_size}", "data.condition_key=condition", "data.control=control",
                 f"trainer.max_steps={max_steps}", "logger=none", "trainer.enable_progress_bar=false",
                 f"hydra.run.dir={run_dir}", "overwrite=true", *extra]
    cmd = [sys.executable, str(ROOT / "train.py"), *overrides]
    log_path = run_dir.parent / f"{run_dir.name}.log"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    start, started = time.perf_counter(), time.time()
    with open(log_path, "w") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    wall = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9  # Linux reports KiB
    if code != 0:
        raise SystemExit(f"train.py failed with exit code {code}; see {log_path}")
    metrics = json.loads((run_dir / "results" / "metrics.json").read_text())
    return {"wall_s": wall, "peak_rss_gb": peak_gb, "metrics": metrics, "command": " ".join(cmd[1:]),
            "log": str(log_path), "run_dir": str(run_dir), "phases": _phases(log_path, started)}


def _phases(log_path: Path, started: float) -> dict:
    """Seconds from the child's start to the log lines that end each part of the run."""
    marks = {"prepared": "cells: ", "trained": "stage 1: ", "written": "results written to "}
    out = {}
    for line in log_path.read_text().splitlines():
        stamp = re.match(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+)\]", line)
        if not stamp:
            continue
        at = datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() - started
        for name, text in marks.items():
            if text in line and (name != "trained" or " steps (" in line):
                out[name] = at
    return out


def _load() -> str:
    return " / ".join(f"{v:.1f}" for v in os.getloadavg())


def report(path: str, speed: dict, result: dict, batch_size: int, load: tuple[str, str],
           extra: list[str]) -> str:
    s1 = result["metrics"]["stage1"]
    rec = result["metrics"].get("recovery", {})
    train_s = s1["train_time_s"]
    cells_per_s = s1["steps"] * batch_size / train_s
    phases = result["phases"]
    prepare_s = phases.get("prepared", float("nan"))
    final_s = phases.get("trained", float("nan")) - prepare_s - s1["init_time_s"] - train_s
    outputs_s = phases.get("written", float("nan")) - phases.get("trained", float("nan"))
    epochs = s1["steps"] * batch_size / s1["n_cells"]
    lines = [
        "# Stage 1 on a million cells streamed from disk",
        "",
        f"Data: `{Path(path).name}` written by `benchmarks/make_large.py`: {speed['cells']:,} control cells "
        f"(stage 1's cells) among {speed['total']:,} cells x "
        f"{result['metrics']['n_genes']:,} genes kept, {speed['nonzeros']:,} non-zeros in the file "
        f"({speed['file_gb']:.2f} GB), planted K=10 programs.",
        f"Machine: {os.cpu_count()} CPU cores, {platform.machine()}, shared with other jobs; load average "
        f"(1/5/15 min) {load[0]} before, {load[1]} after.",
        "",
        "Command:",
        "",
        "```",
        f"python benchmarks/scale.py {path} --batch-size {batch_size} --max-steps {s1['steps']} "
        f"{' '.join(extra)}".rstrip(),
        f"# runs: python {result['command']}",
        "```",
        "",
        "## Reading (rows per second, control cells, batches of "
        f"{batch_size:,})",
        "",
        "| access | rows/s |",
        "|---|---:|",
        f"| block-shuffled minibatches (training), first read | {speed['block_shuffled']:,.0f} |",
        f"| the same batches again (file in the page cache) | {speed['block_shuffled_cached']:,.0f} |",
        f"| uniformly random minibatches | {speed['uniform_random']:,.0f} |",
        f"| consecutive blocks of {speed['consecutive_rows']:,} (preparation, evaluation) | {speed['consecutive']:,.0f} |",
        "",
        "## The fit (`train.py`, one process)",
        "",
        "| quantity | value |",
        "|---|---:|",
        f"| wall time, file to written outputs | {result['wall_s']:.0f} s |",
        f"| consensus initialisation (on `model.consensus.max_cells` cells, usage of all) | "
        f"{s1['init_time_s']:.0f} s |",
        f"| training | {train_s:.0f} s ({s1['steps']:,} steps, {epochs:.1f} epochs, "
        f"{'converged' if s1['converged'] else 'step cap'}) |",
        f"| opening the file and the streamed preparation (2 passes) | {prepare_s:.0f} s |",
        f"| final checkpoint and relative error (1 pass over the cells) | {final_s:.0f} s |",
        f"| outputs (results.h5ad, usage.csv with a row per cell, ...) | {outputs_s:.0f} s |",
        f"| training throughput | {cells_per_s:,.0f} cells/s |",
        f"| peak RSS of the child process | {result['peak_rss_gb']:.2f} GB |",
        f"| relative error | {s1['relative_error']:.4f} |",
    ]
    if rec:
        lines.append(f"| planted programs, matched cosine mean / min | {rec['baseline_mean']:.4f} / "
                     f"{rec['baseline_min']:.4f} |")
    lines += ["", f"Device: {s1.get('device', 'cpu')}. Log of the run: `{result['log']}`.", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="h5ad written by benchmarks/make_large.py")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--max-steps", type=int, default=2000, help="step cap (trainer.max_steps)")
    parser.add_argument("--run-dir", default=str(Path(tempfile.gettempdir()) / "deltanmf-scale-run"),
                        help="where train.py writes its outputs (default: in the temporary folder)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale.md"))
    parser.add_argument("--skip-read", action="store_true", help="skip the reading measurement")
    args, extra = parser.parse_known_args(argv)
    load_before = _load()
    speed = read_speed(args.path, args.batch_size) if not args.skip_read else \
        {k: float("nan") for k in ("block_shuffled", "block_shuffled_cached", "uniform_random", "consecutive")}
    print(f"reading: {json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in speed.items()})}",
          flush=True)
    if args.skip_read:
        from deltanmf.data import open_h5ad

        file = open_h5ad(args.path)
        speed.update(cells=int((file.obs["condition"].astype(str) == "control").sum()), total=file.n_obs,
                     nonzeros=file.matrix().n_stored, file_gb=Path(args.path).stat().st_size / 1e9)
        del file
    result = fit(args.path, Path(args.run_dir), args.batch_size, args.max_steps, extra)
    text = report(args.path, speed, result, args.batch_size, (load_before, _load()), extra)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
